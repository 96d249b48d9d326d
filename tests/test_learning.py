"""Several messages learning at once: each learner's step in a shared round is the step it takes alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from sift_chat import learning as learning_module
from sift_chat.adaptation import AdaptationSettings, Adapter, next_token_loss
from sift_chat.learning import Learning

from .tiny import tiny_model, tiny_tokenizer

PASSAGES = [
    "SIFT selects passages that reduce the uncertainty about the answer.",
    "Nearest neighbours retrieve the most similar passages, duplicates included.",
    "A LoRA adapter adds a low-rank update to each targeted weight matrix.",
    "The quick brown fox jumps over the lazy dog, again and again.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(" ".join(PASSAGES))


@pytest.fixture
def adapter(tokenizer):
    return Adapter(tiny_model(tokenizer), tokenizer, AdaptationSettings(rank=4, learning_rate=1e-2))


def weights_after(adapter: Adapter, settings: AdaptationSettings, passages: list[list[str]]) -> list[torch.Tensor]:
    """The adapter's A and B, flattened, after a step on each group of passages on the model's own
    adapter (`Adapter.step`, or `step_together` for a group of several): the reference."""
    adapter.settings = settings
    adapter.reset()
    for group in passages:
        if len(group) == 1:
            adapter.step(group[0])
        else:
            adapter.step_together(group)
    flat = [p.detach().clone() for layer in adapter.lora_modules.values() for p in (layer.lora_A, layer.lora_B)]
    adapter.reset()
    return flat


def learn_at_once(adapter: Adapter, plans: list[tuple[AdaptationSettings, list[list[str]]]]) -> tuple[Learning, list]:
    """Each plan's learner on its own thread, all started together: their steps share rounds."""
    learning = Learning(gather_seconds=5.0)  # generous: every learner asks before a round runs
    learners = [learning.join(adapter, settings) for settings, _ in plans]
    errors = []

    def run(learner, passages):
        try:
            for group in passages:
                learner.step(group[0]) if len(group) == 1 else learner.step_together(group)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            learner.close()

    threads = [threading.Thread(target=run, args=(learner, passages)) for learner, (_, passages) in zip(learners, plans)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return learning, learners


def flat(learner) -> list[torch.Tensor]:
    return [p.detach() for pair in learner.weights for p in pair]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_learners_in_one_round_each_take_the_step_they_take_alone(adapter, optimizer):
    """Three messages with other passages, seeds and rates step in the same rounds, each row through
    its own matrices: each ends where the model's own adapter ends on its passages alone. With SGD
    the update is the gradient itself (1e-5); Adam's first step divides each gradient by its own
    size, so an entry whose gradient is float noise may move the other way: all but a few agree."""
    plans = [(AdaptationSettings(rank=4, learning_rate=1e-2, optimizer=optimizer, seed=seed), passages)
             for seed, passages in [(0, [[PASSAGES[0]], [PASSAGES[1]]]),
                                    (1, [[PASSAGES[2]], [PASSAGES[3]]]),
                                    (2, [[PASSAGES[1], PASSAGES[3]], [PASSAGES[0], PASSAGES[2]]])]]  # a step on two together
    references = [weights_after(adapter, settings, passages) for settings, passages in plans]
    learning, learners = learn_at_once(adapter, plans)
    assert learning.rounds == 2 and learning.steps == 6  # shared, not one after the other
    for learner, reference in zip(learners, references):
        assert learner.steps == 2
        for learned, expected in zip(flat(learner), reference):
            if optimizer == "sgd":
                torch.testing.assert_close(learned, expected, atol=1e-5, rtol=1e-4)
            else:
                assert (learned - expected).abs().gt(1e-4).float().mean() < 0.01
    assert all(layer.lora_B.abs().sum() == 0 for layer in adapter.lora_modules.values())  # the model's own: untouched
    assert learning.learners == 0 and learning.open == 0


def test_a_learner_alone_steps_as_the_adapter_does_and_answers_with_what_it_learned(adapter, tokenizer):
    """Alone in its rounds, a learner takes the model's own adapter's steps (the same layers, no
    mask) with Adam, and its weights give the adapted model's logits."""
    settings = AdaptationSettings(rank=4, learning_rate=1e-2, seed=5)
    reference = weights_after(adapter, settings, [[PASSAGES[0]], [PASSAGES[2]]])
    learning = Learning()
    learner = learning.join(adapter, settings)
    losses = [learner.step(PASSAGES[0]), learner.step(PASSAGES[2])]
    for learned, expected in zip(flat(learner), reference):
        torch.testing.assert_close(learned, expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        for layer, (a, b) in zip(adapter.lora_modules.values(), learner.lora_weights()):
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        ids = adapter.tokens(PASSAGES[0])
        adapted = next_token_loss(adapter.model, ids).item()
    assert adapted < losses[0]  # the model with the learner's matrices predicts the passage better
    assert learner.step("") != learner.step("")  # nothing to predict: nan, no step
    assert learner.steps == 2
    learner.leave()
    learner.close()
    learner.close()
    assert learning.learners == 0 and learning.open == 0


def test_a_failed_round_fails_its_learners_and_the_next_learner_steps(adapter, monkeypatch):
    settings = AdaptationSettings(rank=4, learning_rate=1e-2)
    learning = Learning(gather_seconds=5.0)
    first, second = learning.join(adapter, settings), learning.join(adapter, settings)
    real = learning_module.next_token_losses

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(learning_module, "next_token_losses", broken)
    failures = []

    def step(learner):
        try:
            learner.step(PASSAGES[0])
        except RuntimeError as error:
            failures.append(str(error))
        finally:
            learner.close()

    threads = [threading.Thread(target=step, args=(learner,)) for learner in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(failures) == ["learning failed: out of memory", "out of memory"]  # the leader's own, the other's
    assert learning.learners == 0 and learning.rounds == 0
    assert all(p.grad is None for p in flat(first))
    monkeypatch.setattr(learning_module, "next_token_losses", real)
    third = learning.join(adapter, settings)
    assert third.step(PASSAGES[1]) > 0 and learning.rounds == 1
    third.close()


def test_learners_of_other_lora_layers_wait_their_turn(adapter, tokenizer):
    """The LoRA layers may change (another rank, other layers) only once no learner's matrices are
    tied to them: not while one steps, nor after its steps until its message decodes with them."""
    learning = Learning()
    learner = learning.join(adapter)
    other = Adapter(tiny_model(tokenizer), tokenizer, AdaptationSettings(rank=2))
    with pytest.raises(RuntimeError, match="other LoRA layers"):
        learning.join(other)
    learner.leave()  # its steps are taken: out of the rounds, its matrices still to be decoded with
    assert learning.learners == 0 and learning.open == 1
    with pytest.raises(RuntimeError, match="other LoRA layers"):
        learning.join(other)
    waited = threading.Event()
    waiter = threading.Thread(target=lambda: (learning.wait_until_empty(), waited.set()))
    waiter.start()
    assert not waited.wait(0.2)
    learner.close()
    waiter.join(5)
    assert waited.is_set()
    learning.join(other).close()


def test_rounds_wait_for_a_message_on_its_way_until_it_joins_or_for_a_while(adapter):
    """A message announced by `expect` (the server let it in as another began its steps) is
    waited for before a round runs, so that its first step shares that round; `arrived` (it takes
    no steps after all) releases the rounds at once, and one that never comes holds them back for
    `expect_seconds` only."""
    settings = AdaptationSettings(rank=4, learning_rate=1e-2)
    learning = Learning(gather_seconds=1.0, expect_seconds=30.0)
    first = learning.join(adapter, settings)
    learning.expect()
    done = threading.Event()
    thread = threading.Thread(target=lambda: (first.step(PASSAGES[0]), done.set()))
    thread.start()
    assert not done.wait(0.3)  # the round waits for the message on its way
    second = learning.join(adapter, settings)  # it arrives, and asks
    second.step(PASSAGES[1])
    thread.join(10)
    assert done.is_set() and learning.rounds == 1 and learning.steps == 2
    second.close()

    learning.expect()
    learning.arrived()
    started = time.monotonic()
    first.step(PASSAGES[2])
    assert time.monotonic() - started < 5.0 and learning.rounds == 2
    first.close()

    impatient = Learning(gather_seconds=0.001, expect_seconds=0.2)
    lone = impatient.join(adapter, settings)
    impatient.expect()
    started = time.monotonic()
    lone.step(PASSAGES[0])
    assert 0.15 < time.monotonic() - started < 5.0  # waited for the announced one, not for ever
    lone.close()



def test_a_learner_with_lora_dropout_is_refused(adapter):
    with pytest.raises(ValueError, match="dropout"):  # rounds take none: the engine steps on the adapter
        Learning().join(adapter, AdaptationSettings(rank=4, dropout=0.1))
