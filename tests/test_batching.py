"""Several messages decoded in one batch: each row with its own adapter computes what it would alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from sift_chat.batching import Batch
from sift_chat.lora import add_lora, lora_weights, row_scales, row_weights, stack_row_weights

from .tiny import logits, tiny_model, tiny_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


def model_and_adapters(tokenizer, count: int):
    """The tiny model with LoRA layers, and `count` different adapters kept from them."""
    model = tiny_model(tokenizer)
    layers = list(add_lora(model, TARGETS, rank=2, alpha=4.0).values())
    torch.manual_seed(3)
    adapters = []
    for _ in range(count):
        with torch.no_grad():
            for layer in layers:
                layer.lora_A.normal_()
                layer.lora_B.normal_(std=0.3)
        adapters.append(lora_weights(model))
    return model, layers, adapters


def alone(model, layers, adapter, scale, ids: torch.Tensor) -> torch.Tensor:
    """The last position's logits of `ids` under one adapter (None: the base model) at `scale`,
    computed from scratch (no cache, no batch)."""
    with torch.no_grad():
        for layer, (a, b) in zip(layers, adapter or [(torch.zeros_like(l.lora_A), torch.zeros_like(l.lora_B))
                                                     for l in layers]):
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        with row_scales(model, [scale]):
            return logits(model, ids)[0, -1]


def test_each_row_of_a_batch_computes_with_its_own_adapter_and_scale(tokenizer):
    model, layers, (first, second) = model_and_adapters(tokenizer, 2)
    rows = [(first, 1.0), (second, 1.0), (None, 1.0), (first, 0.0), (second, 0.5)]
    texts = ["The quick brown fox jumps.", "SIFT selects passages that", "Nearest neighbours retrieve",
             "The quick brown fox jumps.", "SIFT selects passages that"]
    prompts = [ids_of(tokenizer, t) for t in texts]
    width = min(p.shape[1] for p in prompts)
    batch = torch.cat([p[:, :width] for p in prompts])
    stacked = stack_row_weights(model, rows)
    assert stacked[id(layers[0])].a.shape[0] == 2 * 2  # two adapters of rank 2, each once
    with torch.no_grad(), row_weights(model, stacked):
        together = model(input_ids=batch, use_cache=False).logits[:, -1]
    for row, (adapter, scale) in enumerate(rows):
        expected = alone(model, layers, adapter, scale, batch[row: row + 1])
        torch.testing.assert_close(together[row], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(together[0], together[3])  # the adapter does change what row 0 computes

    with pytest.raises(ValueError, match="other LoRA layers"):
        stack_row_weights(model, [(first[:-1], 1.0)])


def decode_alone(model, layers, adapters, prompt, tokens) -> list[torch.Tensor]:
    """Each row's logits after the prompt and after each of `tokens`, computed from scratch."""
    steps = []
    for count in range(len(tokens) + 1):
        ids = torch.cat([prompt, torch.tensor([tokens[:count]], dtype=torch.long).reshape(1, -1)], 1)
        steps.append(torch.stack([alone(model, layers, a, s, ids) for a, s in adapters]))
    return steps


def test_members_joining_waiting_and_leaving_decode_as_each_would_alone(tokenizer):
    # one thread: each member's forward runs without the others, whose rows get a masked column
    model, layers, (first, second, third) = model_and_adapters(tokenizer, 3)
    batch = Batch(model, gather_seconds=0.0)
    plans = {  # prompt, rows' adapters, tokens, joins before step, leaves after token
        "a": (ids_of(tokenizer, "SIFT selects passages that reduce the uncertainty about the answer."),
              [(first, 1.0), (first, 0.0)], " over the lazy dog, and then returns", 0, None),
        "b": (ids_of(tokenizer, "The quick brown fox."), [(second, 1.0)], " jumps over the lazy", 2, 3),
        "c": (ids_of(tokenizer, "Nearest neighbours retrieve the most similar passages, duplicates included."),
              [(third, 1.0), (None, 1.0)], " and the most similar", 3, None),
    }
    tokens = {name: tokenizer(plan[2], add_special_tokens=False)["input_ids"] for name, plan in plans.items()}
    expected = {name: decode_alone(model, layers, plan[1], plan[0], tokens[name]) for name, plan in plans.items()}
    members, given = {}, {name: 0 for name in plans}
    for step in range(20):
        for name, (prompt, adapters, _, joins, leaves) in plans.items():
            if step == joins:
                members[name] = batch.join([prompt], [adapters[0]]) if len(adapters) == 1 else \
                    batch.join([prompt, prompt], adapters)
            member = members.get(name)
            if member is None or member.gone or (name == "c" and step % 2):  # c skips every other step
                continue
            torch.testing.assert_close(member.logits(), expected[name][given[name]], atol=1e-5, rtol=0)
            if given[name] == len(tokens[name]) or given[name] == leaves:
                member.leave()
                continue
            member.append(tokens[name][given[name]])
            given[name] += 1
    assert given == {"a": len(tokens["a"]), "b": 3, "c": len(tokens["c"])}
    assert batch.members == 0 or all(m.gone for m in members.values())


def test_members_on_their_own_threads_share_forwards_and_each_decodes_as_alone(tokenizer):
    torch.set_num_threads(1)
    model, layers, adapters = model_and_adapters(tokenizer, 4)
    prompts = [ids_of(tokenizer, t) for t in ["The quick brown fox.", "SIFT selects passages that reduce",
                                              "Nearest neighbours retrieve the most", "Test-time fine-tuning takes"]]
    continuation = tokenizer(" over the lazy dog, and then returns to the base", add_special_tokens=False)["input_ids"]
    expected = [decode_alone(model, layers, [(adapter, 1.0), (None, 1.0)], prompt, continuation)
                for adapter, prompt in zip(adapters, prompts)]
    batch = Batch(model, gather_seconds=1.0)  # long enough that every member is in every forward
    members = [batch.join([p, p], [(a, 1.0), (None, 1.0)]) for a, p in zip(adapters, prompts)]
    seen = [[] for _ in members]
    errors = []

    def decode(index):
        try:
            for token in continuation:
                seen[index].append(members[index].logits().clone())
                members[index].append(token)
            seen[index].append(members[index].logits().clone())
            members[index].leave()
        except Exception as error:  # reported in the main thread
            errors.append(error)
            members[index].leave()

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(members))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    for got, want in zip(seen, expected):
        assert len(got) == len(want)
        for step_got, step_want in zip(got, want):
            torch.testing.assert_close(step_got, step_want, atol=1e-5, rtol=0)
    assert batch.forwards == len(continuation)  # every token of all four in one forward
    assert batch.rows_forwarded == len(continuation) * 8


def test_members_with_drafts_share_forwards_and_each_decodes_as_alone(tokenizer):
    """Members giving drafts of different lengths (some guesses wrong) in the same forwards: the
    logits after each token they keep are their own alone, whatever the others gave, and the
    guesses they did not keep leave nothing behind (masked holes in their rows)."""
    torch.set_num_threads(1)
    model, layers, adapters = model_and_adapters(tokenizer, 3)
    prompts = [ids_of(tokenizer, t) for t in ["The quick brown fox.", "SIFT selects passages that reduce",
                                              "Nearest neighbours retrieve the most"]]
    continuation = tokenizer(" over the lazy dog, and then returns to the base", add_special_tokens=False)["input_ids"]
    expected = [decode_alone(model, layers, [(adapter, 1.0), (None, 1.0)], prompt, continuation)
                for adapter, prompt in zip(adapters, prompts)]
    batch = Batch(model, gather_seconds=1.0)
    members = [batch.join([p, p], [(a, 1.0), (None, 1.0)]) for a, p in zip(adapters, prompts)]
    lengths = [1, 2, 3]  # member i guesses this many tokens each time; every other guess ends wrong
    checked, dropped = [0 for _ in members], [0 for _ in members]
    errors = []

    def decode(index):
        member, given, cycle = members[index], 0, 0
        try:
            while given < len(continuation):
                length = min(lengths[index], len(continuation) - given - 1)
                draft = list(continuation[given:given + length])
                if draft and cycle % 2:
                    draft[-1] = (draft[-1] + 1) % len(tokenizer)  # the last guess wrong
                right = next((j for j, (a, b) in enumerate(zip(draft, continuation[given:])) if a != b), len(draft))
                logits = member.logits(draft) if draft else member.logits()[:, None]
                for position in range(right + 1):  # after each token that is the continuation's
                    torch.testing.assert_close(logits[:, position], expected[index][given + position], atol=1e-5, rtol=0)
                    checked[index] += 1
                if draft:
                    member.keep(right)
                    dropped[index] += len(draft) - right
                member.append(continuation[given + right])
                given, cycle = given + right + 1, cycle + 1
            torch.testing.assert_close(member.logits(), expected[index][-1], atol=1e-5, rtol=0)
        except Exception as error:  # reported in the main thread
            errors.append(error)
        finally:
            member.leave()

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(members))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[0]
    assert checked == [len(continuation)] * 3  # the logits after every token, once
    assert all(dropped)  # guesses not kept left holes
    assert batch.forwards < len(continuation)  # the guesses kept saved forwards


def test_a_guess_not_kept_stays_masked_when_others_join_longer_and_leave(tokenizer):
    """A member's rejected guesses are masked at its next forward, wherever its columns moved in
    between: a longer prompt joining pads the batch on the left, a member leaving drops columns."""
    model, layers, (first, second, third) = model_and_adapters(tokenizer, 3)
    batch = Batch(model, gather_seconds=0.0)  # one thread: each forward carries only the caller's tokens
    short = ids_of(tokenizer, "The quick brown fox.")
    longer = ids_of(tokenizer, "Nearest neighbours retrieve the most similar passages, duplicates included.")
    continuation = tokenizer(" over the lazy dog, and then", add_special_tokens=False)["input_ids"]
    expected = decode_alone(model, layers, [(first, 1.0)], short, continuation)
    leaving = batch.join([short], [(third, 1.0)])
    member = batch.join([short], [(first, 1.0)])
    wrong = (continuation[1] + 1) % len(tokenizer)
    logits = member.logits([continuation[0], wrong])  # the first guess right, the second wrong
    torch.testing.assert_close(logits[:, 0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[:, 1], expected[1], atol=1e-5, rtol=0)
    member.keep(1)
    member.append(continuation[1])
    leaving.leave()  # its rows go at the next forward
    width = batch._mask.shape[1]
    joined = batch.join([longer], [(second, 1.0)])  # longer than the batch: padded on the left
    assert longer.shape[1] > width and batch._first_column < 0  # the member's columns moved right
    torch.testing.assert_close(member.logits(), expected[2], atol=1e-5, rtol=0)
    for given in range(2, len(continuation)):
        member.append(continuation[given])
        torch.testing.assert_close(member.logits(), expected[given + 1], atol=1e-5, rtol=0)
    alone_second = decode_alone(model, layers, [(second, 1.0)], longer, [])
    torch.testing.assert_close(joined.logits(), alone_second[0], atol=1e-5, rtol=0)


def test_a_failed_forward_fails_every_member_and_the_batch_starts_clean_after(tokenizer):
    model, layers, (first, second) = model_and_adapters(tokenizer, 2)
    batch = Batch(model, gather_seconds=0.0)
    prompt = ids_of(tokenizer, "The quick brown fox.")
    members = [batch.join([prompt], [(first, 1.0)]), batch.join([prompt], [(second, 1.0)])]
    forward = model.forward
    model.forward = lambda *args, **kwargs: (_ for _ in ()).throw(MemoryError("out of memory"))
    members[0].append(5)
    with pytest.raises(MemoryError):  # the member whose forward it was
        members[0].logits()
    members[1].append(5)
    with pytest.raises(RuntimeError, match="decoding failed: out of memory"):  # and the one beside it
        members[1].logits()
    model.forward = forward
    assert batch.members == 0
    again = batch.join([prompt], [(first, 1.0)])
    again.append(5)
    expected = alone(model, layers, first, 1.0, torch.cat([prompt, torch.tensor([[5]])], 1))
    torch.testing.assert_close(again.logits()[0], expected, atol=1e-5, rtol=0)


def test_a_member_whose_reader_went_away_is_dropped_and_the_others_go_on(tokenizer):
    model, layers, (first, second) = model_and_adapters(tokenizer, 2)
    batch = Batch(model, gather_seconds=0.0, idle_seconds=0.05)
    prompt = ids_of(tokenizer, "The quick brown fox.")
    away, reading = batch.join([prompt], [(first, 1.0)]), batch.join([prompt], [(second, 1.0)])
    time.sleep(0.1)
    reading.append(5)
    expected = alone(model, layers, second, 1.0, torch.cat([prompt, torch.tensor([[5]])], 1))
    torch.testing.assert_close(reading.logits()[0], expected, atol=1e-5, rtol=0)
    assert away.gone and batch.members == 1
    away.append(5)
    with pytest.raises(RuntimeError, match="away too long"):
        away.logits()


def test_in_a_server_every_forward_runs_on_the_one_models_thread_and_answers_the_same(tokenizer):
    from sift_chat import torch_thread
    from sift_chat.decoding import Rows

    model, layers, (first,) = model_and_adapters(tokenizer, 1)
    prompt = ids_of(tokenizer, "The quick brown fox.")
    threads = []
    forward = model.forward
    model.forward = lambda *args, **kwargs: threads.append(threading.current_thread().name) or forward(*args, **kwargs)

    def decode(make):
        rows = make()
        out = []
        for token in (5, 9, 11):
            rows.append(token)
            out.append(rows.logits().clone())
        return out

    in_place = decode(lambda: Rows(model, [prompt]))
    assert set(threads) == {threading.current_thread().name}
    torch_thread.enable()
    try:
        threads.clear()
        on_thread = decode(lambda: Rows(model, [prompt]))
        batch = Batch(model, gather_seconds=0.0)
        member = batch.join([prompt], [(first, 1.0)])  # the adapter the model holds, as Rows uses it
        batched = decode(lambda: member)
    finally:
        torch_thread.disable()
    assert len(set(threads)) == 1 and threads[0].startswith("sift-chat-torch")
    for a, b, c in zip(in_place, on_thread, batched):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
