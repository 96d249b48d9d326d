"""The engine: one user message, end to end.

    prompt ─embed─▶ q ─hnswlib + FTS5 BM25, fused─▶ K candidates ─select─▶ N passages + σ² trace
           ─adapt (fresh LoRA, one step per passage)─▶ generate, streamed ─▶ cite ─▶ a typed record

`Engine.respond` is a generator of events (stages, the selection, each step's loss, what the
model reads, tokens, notices, and finally the answer with its citations and its record), which
the application layer (`sift_chat.service`, which stores it) and the benchmarks consume. It holds
no UI code and stores nothing. The settings of a message travel with it: the adaptation settings
are applied under the engine's lock for that message only. The adapter is reset before and after
every message, also when the consumer stops early or a step fails, so no message ever sees another
one's adaptation.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Generator, Iterable, Iterator, Sequence

import torch

from . import config
from .adaptation import AdaptationSettings, Adapter, decoder_layers
from .batching import GATHER_SECONDS, MAX_ROWS, Batch
from .decoding import Rows
from .embedding import shared
from .learning import Learner, Learning
from .events import Done, Event, HandedOver, Notice, Picked, Prompted, Selected, Stage, Step, Token
from .generation import (PromptLookup, answer_processors, cite, contrast, mixture, next_token, only_learned_words,
                         reading_weights, repeat_start, training_text)
from . import torch_thread
from .lora import lora_weights
from .probe import Compute, probe
from .prompting import ChatTemplate
from .record import AnswerRecord, SelectionRecord
from .retrieval import FUSION, Candidates, preselect, read_count
from .selection import Selection, select
from .settings import ChatSettings
from .store import Passage, Store

# -- the engine -----------------------------------------------------------------------------


class Engine:
    """A store, an embedder and a chat model with its adapter: everything one message needs."""

    def __init__(self, store: Store, embedder, model, tokenizer, *, embedder_name: str,
                 adaptation: AdaptationSettings | None = None, compute: Compute | None = None):
        self.store = store
        self.compute = compute or Compute()  # precision and decoding threads (`probe`; default fp32, 1 thread)
        store.check_embedder(embedder_name, embedder.get_embedding_dimension())
        self.embedder = shared(embedder)  # the ingest embeds beside the chat: one batch at a time
        self.embedder_name = embedder_name
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer)  # what the model reads, fitted into its context
        self.default_adaptation = adaptation or AdaptationSettings()  # for a message that names none
        self.adapter = Adapter(model, tokenizer, self.default_adaptation)
        self.lock = threading.Lock()  # one adaptation at a time per loaded model
        self.model_lock = threading.Lock()  # one forward at a time: a step, a prefill, a batch's token
        self.batch: Batch | None = None  # messages decoding together (`decode_together`), or one at a time
        self.learning: Learning | None = None  # messages taking their steps together (`decode_together`)
        self.fusion = FUSION  # how pre-selection combines the vector and the lexical search

    @classmethod
    def load(cls, data_dir: str | Path | None = None, *, embedder: str | None = None,
             chat_model: str | None = None, device: str | None = None,
             adaptation: AdaptationSettings | None = None, precision: str | None = None) -> "Engine":
        """The default models (or the named ones) over the store in `data_dir`, at the precision
        and decoding threads `probe` measures for this machine (cached in `data_dir`; `precision`
        fp32 or bf16 forces it, None reads $SIFT_CHAT_PRECISION, else auto)."""
        from .models import load_chat_model, load_embedder

        home = config.data_dir(data_dir)
        embedder_name = config.embedder_name(embedder)
        model, tokenizer = load_chat_model(chat_model, device, home / "models")
        engine = cls(Store(home / "store"), load_embedder(embedder_name, device), model, tokenizer,
                     embedder_name=embedder_name, adaptation=adaptation)
        engine.compute = probe(engine.model, home, precision)  # with its LoRA layers, as it decodes
        engine.compute.keep_copies(engine.model)
        return engine

    def decode_together(self, max_rows: int = MAX_ROWS, gather_seconds: float = GATHER_SECONDS,
                        learn_together: bool = True) -> None:
        """From now on a message decodes as rows of one batch with the other messages being
        answered (`batching`), and hands the adapter to the next message when it starts writing;
        with `learn_together`, it learns an adapter of its own (`learning.Learner`), its steps in
        rounds with the other messages' (`learning`), and hands the adapter on before its first
        step: for a server with several users."""
        self.batch = Batch(self.model, self.model_lock, threads=self.compute.decode_threads, **self._decoding_contexts(),
                           max_rows=max_rows, gather_seconds=gather_seconds)
        self.learning = (Learning(self.model_lock, step_context=lambda: self.compute.context("step"),
                                  gather_seconds=gather_seconds) if learn_together else None)

    def _decoding_contexts(self) -> dict:
        """The precision the probe chose for a prefill and for a decoding step, entered around each."""
        return {"prefill_context": lambda: self.compute.context("prefill"),
                "step_context": lambda: self.compute.context("decode")}

    @property
    def model(self):
        return self.adapter.model

    @property
    def layer_count(self) -> int:
        return decoder_layers(self.model)[1]

    def _use(self, adaptation: AdaptationSettings) -> None:
        """Adapt this message with these settings (called holding the lock). What only the
        optimizer or the data sees (learning rate, optimizer, seed, passage length, training
        format, passes, steps together) takes a fresh optimizer; another LoRA shape (rank, targets, layers) rebuilds the
        adapter on the base model, or keeps the old one when the new settings do not fit the
        model. The adapter's shape is a cache: the next message states its own settings again."""
        current = self.adapter.settings
        if adaptation == current:
            return
        same_shape = replace(adaptation, learning_rate=current.learning_rate, optimizer=current.optimizer,
                             seed=current.seed, max_passage_tokens=current.max_passage_tokens,
                             training=current.training, epochs=current.epochs, together=current.together) == current
        if same_shape:
            self.adapter.settings = adaptation
            self.adapter.reset()
            return
        if self.learning is not None:  # learners of the current LoRA layers finish first
            self.learning.wait_until_empty()
        if self.batch is not None:  # rows decoding with weights of the current LoRA layers finish first
            self.batch.wait_until_empty()
        base = self.adapter.remove()  # the base model, LoRA layers taken out
        try:
            self.adapter = Adapter(base, self.tokenizer, adaptation)
        except Exception:
            self.adapter = Adapter(base, self.tokenizer, current)
            raise

    # -- stages -----------------------------------------------------------------------------

    def embed(self, text: str) -> torch.Tensor:
        vector = self.embedder.encode(text, normalize_embeddings=True, convert_to_tensor=True)
        return vector.float().cpu()

    def preselect(self, query: torch.Tensor, prompt: str, settings: ChatSettings,
                  owners: Iterable[str] | None = None) -> Candidates:
        """K candidates for `prompt` (embedded as `query`) among the documents of `owners` (the
        caller's and the shared library): the vector and the lexical search, fused (`retrieval`)."""
        return preselect(self.store, query.numpy(), prompt, settings.candidates, owners, self.fusion)

    def select(self, query: torch.Tensor, settings: ChatSettings, method: str | None = None,
               owners: Iterable[str] | None = None, prompt: str = "") -> Selected:
        """Pre-select K candidates (`preselect`; by vector alone without a prompt), then pick up
        to N of them with `method`, on the candidates' vectors."""
        with self.store.lock:  # an ingest may replace a document: its passages go with the ids found
            found = self.preselect(query, prompt, settings, owners)
            candidates = torch.from_numpy(found.vectors)
            method = method or settings.method
            selection, nn = torch_thread.run(lambda: (  # one call: the models' thread may be between steps
                select(query, candidates, method, settings.passages, settings.lam, settings.min_reduction,
                       settings.alpha),
                select(query, candidates, "nn", settings.passages, settings.lam)))
            reading = read_count(found.match, settings.read_passages, settings.read_min_match)
            return self._describe(selection, found, nn, reading)

    def _describe(self, selection: Selection, found: Candidates, nn: Selection, reading: int) -> Selected:
        ids = found.ids
        passage_ids = [int(ids[i]) for i in selection.indices.tolist()]
        leads = [int(i) for i in ids[:reading]]  # what the context modes read: the best fused candidates
        passages = self.store.passages([*passage_ids, *leads])
        picks, seen = [], set()
        for step, passage_id in enumerate(passage_ids):
            picks.append(Picked(
                step=step + 1, passage=passages[passage_id],
                similarity=float(selection.similarity[step]),
                posterior_variance=float(selection.posterior_variance[step]),
                uncertainty_reduction=float(selection.uncertainty_reduction[step]),
                repeat=passage_id in seen,
            ))
            seen.add(passage_id)
        return Selected(selection.method, picks, selection.prior_variance, selection.stop_reason,
                        nn.posterior_variance.tolist(), [passages[i] for i in leads if i in passages],
                        [int(i) for i in ids.tolist()], list(found.terms), dict(found.seconds))

    # -- one message ------------------------------------------------------------------------

    def respond(self, prompt: str, history: Sequence[dict] = (), settings: ChatSettings | None = None, *,
                adaptation: AdaptationSettings | None = None, selected: Selected | None = None,
                owners: Iterable[str] | None = None) -> Iterator[Event]:
        """Answer `prompt` (after `history`, a list of {"role", "content"}), yielding events.

        `adaptation` is this message's (default: the engine's own); `selected`, a selection made
        already for this prompt (a comparison selects once), skips embedding and selecting;
        `owners`, whose documents it selects from (default: every document). An interrupted or
        failed message leaves the model at base; nothing is stored here.
        """
        settings = settings or ChatSettings()
        prompt = prompt.strip() if isinstance(prompt, str) else ""
        if not prompt:
            raise ValueError("the message is empty: type a question")
        torch_thread.one_torch_thread_here()  # a server's request thread: its small ops start no team of workers
        held = self.lock.acquire()

        def hand_over() -> None:  # the adapter is free for the next message (decoding together)
            nonlocal held
            if held:
                held = False
                self.lock.release()
        try:
            self._use(adaptation or self.default_adaptation)
            yield from self._respond(prompt, list(history), settings, selected, owners, hand_over)
        finally:
            hand_over()

    def _respond(self, prompt, history, settings, selected, owners, hand_over) -> Iterator[Event]:
        seconds: dict[str, float] = {}
        message_started = time.perf_counter()
        adaptation = asdict(self.adapter.settings)
        losses = []
        torch.manual_seed(settings.seed)

        wants_passages = settings.fine_tunes or settings.uses_context
        if wants_passages and self.store.passage_count(owners) == 0:
            yield Notice("the corpus is empty: answering with the base model (ingest documents first)")
            wants_passages = False
        elif wants_passages and settings.passages == 0:
            yield Notice("0 passages asked for: answering with the base model")
            wants_passages = False
        if not wants_passages:
            selected = None

        if selected is not None:
            yield selected
        elif wants_passages:
            selected = yield from self._embed_and_select(prompt, settings, owners, seconds)
        if selected is not None and not selected.picks:
            yield Notice(f"no passage was selected ({selected.stop_reason}): answering with the base model")

        self.adapter.reset()
        rows = learner = None
        try:
            learns = bool(selected and selected.picks and settings.fine_tunes)
            # learns its own matrices, the adapter free for the next message (rounds take no dropout:
            # a message with dropout steps on the model's adapter, holding it to its first token)
            if self.learning is not None and learns and self.adapter.settings.dropout == 0:
                learner = self.learning.join(self.adapter)
                hand_over()
                yield HandedOver(learning=True)
            elif self.learning is not None:
                self.learning.arrived()  # if this one was expected to learn, the rounds wait for it no more
            if learns:
                yield Stage("fine-tune", "started")
                started = time.perf_counter()
                yield from self._learn(prompt, selected.picks, losses, learner)
                if learner is not None:  # the rounds wait for it no more; what it learned stays with it
                    learner.leave()
                seconds["fine-tune"] = time.perf_counter() - started
                yield Stage("fine-tune", "finished", seconds["fine-tune"])

            numbered = selected.reading_order(settings.uses_context) if selected else []
            context = list(selected.leads) if selected and settings.uses_context else []
            # each passage read in a conversation of its own (a row): the small model reads one well
            fitted = [self.chat_input(prompt, history, [passage], settings) for passage in context]
            if not fitted:  # nothing read: the conversation alone
                fitted = [self.chat_input(prompt, history, [], settings)]
            readings = [ids for ids, _ in fitted]
            truncated = next((notice for _, notice in fitted if notice), None)
            if truncated:
                yield Notice(truncated)
            weights = reading_weights(len(readings), settings.lead_weight)
            yield Prompted(readings, context, weights)
            # the same conversation without the passages, for context-aware decoding; against the
            # base model it differs from the adapted one reading the same words once steps were taken
            learned = (learner or self.adapter).steps > 0
            contrasts = context or (settings.contrast_against == "base" and learned)
            unread = (self.chat_input(prompt, history, [], settings)[0]
                      if contrasts and settings.context_contrast > 0 else None)
            yield Stage("generate", "started")
            started = time.perf_counter()
            pieces: list[str] = []
            rows, prior = self._conversations(readings, unread, settings, learned, learner)
            if learner is not None:  # what it learned is in the batch now: the LoRA layers may change
                learner.close()
            elif self.batch is not None:  # what was learned travels with the rows: the adapter is free
                self.adapter.reset()
                hand_over()
                yield HandedOver(learning=False)
            lookup = (PromptLookup([token for ids in readings for token in ids[0].tolist()])
                      if self.compute.draft_tokens else None)
            generation = self.generate(rows, prior, settings, lookup=lookup, weights=weights)
            while True:
                try:
                    piece = next(generation)
                except StopIteration as end:
                    ended, raw_answer = end.value
                    break
                if not pieces:  # what the user waits for: from sending to the first word
                    seconds["first_token"] = time.perf_counter() - message_started
                pieces.append(piece)
                yield Token(piece)
            seconds["generate"] = time.perf_counter() - started
            yield Stage("generate", "finished", seconds["generate"])
        finally:
            if learner is not None:
                learner.close()
            if rows is not None and self.batch is not None:
                rows.leave()
            elif learner is None:
                self.adapter.reset()

        if ended == "limit":
            yield Notice(f"the answer was cut at the limit of {settings.max_new_tokens} new tokens "
                         "(Maximum new tokens)")
        elif ended == "repeat":
            yield Notice("the answer started repeating itself: it was stopped there")
        answer, citations = cite(raw_answer, [p.text for p in numbered], prompt)
        summary = None if selected is None else SelectionRecord(
            selected.method, selected.prior_variance, selected.final_variance, selected.stop_reason,
            list(selected.nn_posterior_variance), selected.lead.id if selected.lead else None,
            list(selected.terms), len(selected.candidates))
        learned = [p.passage for p in selected.picks if not p.repeat] if selected and losses else []
        only_learned = only_learned_words(raw_answer, [p.text for p in learned], [p.text for p in context], prompt)
        record = AnswerRecord(asdict(settings), adaptation, seconds, losses, summary, ended=ended,
                              citations=list(citations), read=[p.id for p in context],
                              numbered=[p.id for p in numbered],
                              only_learned={str(p.id): words for p, words in zip(learned, only_learned) if words})
        yield Done(answer, record, raw_answer)

    def _embed_and_select(self, prompt, settings, owners, seconds) -> Generator[Event, None, Selected]:
        """Embed the prompt and select its passages, timing both into `seconds`; return the selection."""
        yield Stage("embed", "started")
        started = time.perf_counter()
        query = self.embed(prompt)
        seconds["embed"] = time.perf_counter() - started
        yield Stage("embed", "finished", seconds["embed"])

        yield Stage("select", "started")
        started = time.perf_counter()
        selected = self.select(query, settings, owners=owners, prompt=prompt)
        seconds["select"] = time.perf_counter() - started
        seconds["preselect"] = sum(selected.seconds.values())  # of which: finding the K candidates
        yield selected
        yield Stage("select", "finished", seconds["select"])
        return selected

    def _learn(self, prompt: str, picks: list[Picked], losses: list[float],
               learner: Learner | None = None) -> Iterator[Step]:
        """A step on each pick in pick order, pass after pass (`epochs`), or with `together` one
        step a pass on all its passages as one batch, appending each passage's loss to `losses`:
        on the model's adapter, each under the model lock on the models' thread, or on the
        message's own `learner`, in rounds with the other messages' steps."""
        settings = (learner or self.adapter).settings
        texts = [training_text(prompt, pick.passage.text, settings.training, self.template.render) for pick in picks]
        total = len(texts) * settings.epochs
        if settings.together:
            prefixes, passages = zip(*texts)
            for _ in range(settings.epochs):
                losses += self._take_step("step_together", learner, passages, prefixes)
                for index in range(len(losses) - len(texts) + 1, len(losses) + 1):
                    yield Step(index, total, losses[index - 1], together=True)
            return
        for index, (prefix, text) in enumerate(texts * settings.epochs, 1):
            losses.append(self._take_step("step", learner, text, prefix))
            yield Step(index, total, losses[-1])

    def _take_step(self, kind: str, learner: Learner | None, *args):
        """`Adapter.step` or `step_together` (`kind`) on the learner, or on the model's adapter
        under the model lock on the models' thread."""
        if learner is not None:
            return getattr(learner, kind)(*args)
        with self.model_lock:
            return torch_thread.run(self._step, getattr(self.adapter, kind), *args)

    def _step(self, step, *args):
        with self.compute.context("step"):  # bf16 base matmuls where chosen; fp32 LoRA and Adam
            return step(*args)

    # -- generation -------------------------------------------------------------------------

    def chat_input(self, prompt: str, history: list[dict], context: list[Passage],
                   settings: ChatSettings) -> tuple[torch.Tensor, str | None]:
        """The conversation's token ids in the model's chat template, fitted into
        `max_context_tokens - max_new_tokens` (`ChatTemplate.fit`), and a notice when it was shortened."""
        budget = max(settings.max_context_tokens - settings.max_new_tokens, 32)
        return self.template.fit(prompt, history, [p.text for p in context], budget)

    def _conversations(self, readings: list[torch.Tensor], unread_ids: torch.Tensor | None, settings: ChatSettings,
                       learned: bool, learner: Learner | None = None):
        """(rows, prior): what `generate` decodes. The first rows read the passages (a row each,
        `readings`) with the adapter as the steps left it; with `unread_ids` (the conversation
        without passages) and `settings.context_contrast` > 0, a last row without them, under the base model when
        `settings.contrast_against` is "base". Both as rows of one forward per token
        (`decoding.Rows`), or, where the probe measured it faster, the second a forward only for
        the tokens where the contrast can change the choice (`Compute.contrast_on_demand`, then
        `prior`); or, decoding together (`decode_together`), as a member of the shared batch
        with a copy of the adapter's weights (or the `learner`'s own). Not `learned`: the
        adapter adds zeros, and the rows run the base layers alone."""
        device = self.adapter.device
        contrasted = unread_ids is not None and settings.context_contrast > 0
        reading_scale = 1.0 if learned else 0.0
        prior_scale = 0.0 if not learned or settings.contrast_against == "base" else 1.0
        prompts = [ids.to(device) for ids in readings] + ([unread_ids.to(device)] if contrasted else [])
        scales = [reading_scale] * len(readings) + [prior_scale] * contrasted
        if self.batch is not None:
            weights = (None if not learned else learner.lora_weights() if learner is not None
                       else torch_thread.run(lora_weights, self.model))
            return self.batch.join(prompts, [(weights, scale) for scale in scales]), None
        how = {"threads": self.compute.decode_threads,  # as the probe measured this machine
               "side_by_side": self.compute.decode_side_by_side, **self._decoding_contexts()}
        if contrasted and self.compute.contrast_on_demand:  # the last conversation's forward only when asked
            return (Rows(self.model, prompts[:-1], scales[:-1], **how),
                    Rows(self.model, prompts[-1:], scales[-1:], **how))
        return Rows(self.model, prompts, scales, **how), None

    @torch.no_grad()
    def generate(self, rows, prior, settings: ChatSettings, lookup: PromptLookup | None = None,
                 weights: torch.Tensor | None = None) -> Generator[str, None, tuple[str, str]]:
        """Stream the answer of `rows` (and `prior`, from `_conversations`) as text pieces, one
        forward pass per token with the KV cache; return (how it ended, the answer's text): "end"
        at a stop token, "limit" after max_new_tokens, "repeat" when its last `loop_tokens` tokens
        repeated earlier ones (the text then ends before the repeat). With `weights` [R], the first
        R rows each read a passage and the token is chosen from their `generation.mixture`; with a
        row after them (or `prior`), by `generation.contrast` from the mixture and it. Sampling draws from a
        generator of the message's own seed, so that other messages' draws in other threads
        change nothing.

        With `lookup` (the conversation read so far), each forward also checks the next
        `Compute.draft_tokens` tokens it guesses (`generation.PromptLookup`): the tokens are
        chosen one after the other from the logits after each guess, exactly as without a draft,
        and the guesses up to the first that differs from the choice are kept; so the answer is
        the same, in fewer forwards where it quotes what it reads.

        Written as a loop in the caller's thread (not `generate` with a streamer thread) so that a
        consumer that stops reading, or a Ctrl-C, stops generation at the next token, and the
        adapter is reset in the same frame.
        """
        processors = answer_processors(settings.repetition_penalty, settings.no_repeat_ngram)
        sampler = torch.Generator().manual_seed(settings.seed) if settings.temperature > 0 else None
        generated: list[int] = []
        emitted = ""
        weights = torch.ones(1) if weights is None else weights
        reading_rows = len(weights)
        contrasted = prior is not None or rows.logits().shape[0] > reading_rows
        ended = None
        while ended is None and len(generated) < settings.max_new_tokens:
            room = settings.max_new_tokens - len(generated) - 1
            draft = lookup.draft(min(self.compute.draft_tokens, room)) if lookup is not None else []
            reading = rows.logits(draft) if draft else rows.logits()[:, None]
            without: list[torch.Tensor] = []  # the prior's logits at the draft's positions, once asked for

            def prior_at(position: int) -> torch.Tensor:
                if not without:
                    without.append(prior.logits(draft) if draft else prior.logits()[:, None])
                return without[0][0, position]

            chosen = []
            for position in range(len(draft) + 1):
                read = mixture(reading[:reading_rows, position], weights)
                if contrasted:  # on demand, the prior's forward runs only for tokens where it can change the choice
                    unread = (lambda at=position: prior_at(at)) if prior else reading[reading_rows, position]
                    logits = contrast(read, unread, settings.context_contrast)
                else:
                    logits = read
                token = next_token(logits, generated, processors, settings.temperature, sampler)
                if token in self.template.stop_ids:
                    ended = "end"
                    break
                generated.append(token)
                chosen.append(token)
                repeat = repeat_start(generated, settings.loop_tokens)
                if repeat is not None:
                    generated = generated[:repeat]
                    ended = "repeat"
                    break
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > len(emitted):  # not half of a multi-byte character
                    yield text[len(emitted):]
                    emitted = text
                if position == len(draft) or token != draft[position]:
                    break
            if ended is not None:
                break
            kept = len(chosen) - 1  # the draft's tokens before the last choice, in the caches already
            if draft:
                rows.keep(kept)
            if prior is not None:
                if without and draft:
                    prior.keep(kept)
                else:
                    for token in chosen[:-1]:
                        prior.append(token)
            for conversation in (rows, prior) if prior else (rows,):
                conversation.append(chosen[-1])
            if lookup is not None:
                lookup.extend(chosen)
        return ended or "limit", self.tokenizer.decode(generated, skip_special_tokens=True).strip()

