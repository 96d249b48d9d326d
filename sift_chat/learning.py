"""Several messages learning at once: the next step of every message that is taking steps, in one
forward and backward over all of their passages.

Each message learns an adapter of its own, a `Learner`: LoRA matrices A_u, B_u in the shapes of
the model's LoRA layers, starting where `Adapter.reset` starts (A drawn from the seed, B = 0), and
its own optimizer. A round takes the pending step of every learner that asked for one: their
passages as rows of one right-padded batch (`adaptation.next_token_losses`), each row through
its own learner's matrices (`lora.row_weights` with gradients: A = [A_1; …; A_U],
B = [B_1 … B_U], and M keeping each row's own columns):

    L = Σ_u L_u        L_u = the mean next-token loss of learner u's passages in the round
    ∂L/∂A_u = ∂L_u/∂A_u,   ∂L/∂B_u = ∂L_u/∂B_u        (row i reads no other learner's matrices)

so each learner gets the gradient it would get alone, up to the order of floating-point sums in
the wider matmuls, and its own optimizer steps its own matrices. A learner alone in a round runs
the same layers without a mask: the step `Adapter.step` takes, on the learner's matrices.

A round runs once every learner has asked for its step or the first to ask has waited
`gather_seconds`, counted from the end of the last round and from the last learner's joining
too, so that the learners of that round, which ask again a moment after it, and a learner just
arrived are waited for rather than left to the next round. A message that
is known to be on its way (`expect`: the server let the next one in as this one began its steps)
is waited for too, until it joins or `expect_seconds` have passed: its selection takes the models'
thread between rounds, and without the wait it would join rounds behind and learn alone. It holds the model's lock on the models' thread (`torch_thread`), as the
decoding batch's forwards do, so steps and decoding take turns. The model's own adapter is not
touched: a learner's matrices travel with it, to the decoding batch (`lora_weights`).
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

import torch

from . import torch_thread
from .adaptation import (Adapter, AdaptationSettings, initial_lora_a, new_optimizer, next_token_losses,
                         training_tokens)
from .lora import LayerWeights, RowWeights, row_weights, stack_row_weights

GATHER_SECONDS = 0.01  # how long a round waits for learners that have not asked for their next step yet
EXPECT_SECONDS = 0.25  # how long rounds wait for a message on its way to its first step


class Learning:
    """The learners of the messages now taking steps, and their rounds (module docstring)."""

    def __init__(self, lock=None, *, step_context: Callable[[], ContextManager] = nullcontext,
                 gather_seconds: float = GATHER_SECONDS, expect_seconds: float = EXPECT_SECONDS):
        self.lock = lock or threading.Lock()  # the model's: held for every round
        self.step_context = step_context  # the precision the probe chose for steps, entered around each round
        self.gather_seconds, self.expect_seconds = gather_seconds, expect_seconds
        self._changed = threading.Condition()
        self._learners: list[Learner] = []  # those taking steps: in the rounds
        self._open: set[Learner] = set()  # those whose matrices are still in use with the model's LoRA layers
        self._expected: list[float] = []  # when each message on its way was announced
        self._running = False
        self._gather_from = 0.0  # when the last round ended or the last learner joined
        self.rounds = 0  # rounds run (for the benchmarks and tests)
        self.steps = 0  # learners' steps in them, together

    @property
    def learners(self) -> int:
        """Learners taking steps (in the rounds)."""
        with self._changed:
            return len(self._learners)

    @property
    def open(self) -> int:
        """Learners not closed: their matrices are in the LoRA layers' shapes still in use."""
        with self._changed:
            return len(self._open)

    def join(self, adapter: Adapter, settings: AdaptationSettings | None = None) -> "Learner":
        """A fresh learner for one message, in the shapes of `adapter`'s LoRA layers, learning
        with `settings` (default: the adapter's): from now on its steps share rounds. It is the
        message `expect` announced, if one was. Rounds apply no dropout: settings with dropout
        are refused."""
        settings = settings or adapter.settings
        if settings.dropout > 0:
            raise ValueError("steps in shared rounds take no LoRA dropout: step on the adapter itself")
        learner = Learner(self, adapter, settings)
        with self._changed:
            if any(other.layers != learner.layers for other in self._open):
                raise RuntimeError("a learner of other LoRA layers is still open: wait_until_empty first")
            self._learners.append(learner)
            self._open.add(learner)
            self._gather_from = time.monotonic()
            self._arrived()
        return learner

    def expect(self) -> None:
        """Another message is on its way to its steps: rounds wait for it (`expect_seconds` at most)."""
        with self._changed:
            self._expected.append(time.monotonic())

    def arrived(self) -> None:
        """A message `expect` announced takes no steps after all: rounds wait for it no more."""
        with self._changed:
            self._arrived()

    def _arrived(self) -> None:
        if self._expected:
            self._expected.pop(0)
        self._changed.notify_all()

    def _still_expected(self, now: float) -> float:
        """Seconds until the last announced message stops being waited for (0: none is)."""
        self._expected = [t for t in self._expected if now - t < self.expect_seconds]
        return max((t + self.expect_seconds - now for t in self._expected), default=0.0)

    def wait_until_empty(self) -> None:
        """Return once every learner is closed (before the LoRA layers change: a learner's
        matrices are in their shapes until its message has joined the decoding batch)."""
        with self._changed:
            self._changed.wait_for(lambda: not self._open)

    def _leave(self, learner: "Learner", close: bool) -> None:
        with self._changed:
            if learner in self._learners:
                self._learners.remove(learner)
            if close:
                self._open.discard(learner)
            learner.pending = None
            self._changed.notify_all()

    # -- a round ------------------------------------------------------------------------------

    def _step(self, learner: "Learner", requests: list[tuple[torch.Tensor, int]]) -> list[float]:
        """The losses of the learner's passages (`requests`: [1, T] ids and where the loss
        starts) before the step they take together in the next round. It leads the round when
        none runs, no message announced by `expect` is still on its way, and every learner is
        ready or the first ready one has waited `gather_seconds` (since it asked, since the last
        round ended and since the last learner joined); else it waits as a passenger of the
        round another learner leads."""
        with self._changed:
            learner.pending, learner.result, learner.asked = requests, None, time.monotonic()
            self._changed.notify_all()
            while learner.pending is not None:
                if not self._running:
                    now = time.monotonic()
                    ready = [l for l in self._learners if l.pending is not None]
                    waited = now - max(min(l.asked for l in ready), self._gather_from)
                    expected = self._still_expected(now)
                    if not expected and (len(ready) == len(self._learners) or waited >= self.gather_seconds):
                        self._running = True
                        break
                    self._changed.wait(max(expected, self.gather_seconds - waited, 0.001))
                else:
                    self._changed.wait()
            else:
                if learner.failed is not None:
                    raise RuntimeError(f"learning failed: {learner.failed}")
                return learner.result
        try:  # the leader
            with self.lock:
                with self._changed:
                    ready = [l for l in self._learners if l.pending is not None]
                try:
                    torch_thread.run(self._run, ready)
                except BaseException as error:  # every learner of the round fails; the others go on
                    with self._changed:
                        for other in ready:
                            other.failed, other.pending = str(error) or type(error).__name__, None
                    raise
        finally:
            with self._changed:
                self._running, self._gather_from = False, time.monotonic()
                self._changed.notify_all()
        return learner.result

    def _run(self, learners: list["Learner"]) -> None:
        """One forward and backward over every ready learner's passages, each row through its
        own learner's matrices; then each learner's optimizer step."""
        sequences, firsts, owners = [], [], []
        for u, learner in enumerate(learners):
            for ids, first in learner.pending:
                sequences.append(ids[0])
                firsts.append(first)
                owners.append(u)
        model = learners[0].model
        stacked = _stacked(model, learners, owners)
        model.train()
        try:
            with row_weights(model, stacked), self.step_context():
                losses = next_token_losses(model, sequences, firsts)
            rows = torch.tensor(owners)
            each = [losses[rows == u] for u in range(len(learners))]
            torch.stack([own.mean() for own in each]).sum().backward()
            for learner, own in zip(learners, each):
                for group in learner.optimizer.param_groups:  # one step on several passages: their rate each
                    group["lr"] = learner.settings.learning_rate * len(own)
                learner.optimizer.step()
                learner.optimizer.zero_grad(set_to_none=True)
        finally:
            model.eval()
            for learner in learners:
                for a, b in learner.weights:
                    a.grad = b.grad = None
        with self._changed:
            self.rounds += 1
            self.steps += len(learners)
            for learner, own in zip(learners, each):
                learner.steps += 1
                learner.result, learner.pending = own.tolist(), None


def _stacked(model, learners: Sequence["Learner"], owners: list[int]) -> dict[int, RowWeights]:
    """Each LoRA layer's `RowWeights` for rows owned by `owners[i]` (an index into `learners`):
    the learners' matrices concatenated with the mask keeping each row's own columns
    (`lora.stack_row_weights`; the gradients flow back to each learner's own); one learner: its
    own matrices, no mask (the layer's own step)."""
    if len(learners) == 1:
        return {key: RowWeights(a, b, None) for key, (a, b) in zip(learners[0].layers, learners[0].weights)}
    return stack_row_weights(model, [(learners[u].weights, 1.0) for u in owners])


class Learner:
    """One message's adapter, learned in `Learning`'s rounds: `step`, `step_together`; `leave`
    the rounds once its steps are taken; `lora_weights` for decoding; `close` once the decoding
    batch holds them or the message is done (also when it failed)."""

    def __init__(self, learning: Learning, adapter: Adapter, settings: AdaptationSettings):
        self.learning = learning
        self.settings = settings
        self.model = adapter.model
        self.tokenizer = adapter.tokenizer
        layers = list(adapter.lora_modules.values())
        self.layers = [id(layer) for layer in layers]  # the model's LoRA layers, in module order
        self.weights = [(a.requires_grad_(), torch.zeros_like(layer.lora_B, requires_grad=True))
                        for a, layer in zip(initial_lora_a(layers, settings.seed), layers)]
        self.optimizer = new_optimizer([p for pair in self.weights for p in pair], settings)
        self.device = layers[0].lora_A.device
        self.steps = 0
        self.pending: list[tuple[torch.Tensor, int]] | None = None  # its passages for the next round
        self.result: list[float] | None = None  # their losses, once the round ran
        self.asked = 0.0
        self.failed: str | None = None

    def step(self, text: str, prefix: str = "") -> float:
        """One optimizer step on the next-token loss of `text` (read after `prefix`, not learned),
        in the next round; the loss before the step (nan, and no step, when there is nothing to
        predict)."""
        return self.step_together([text], [prefix])[0]

    def step_together(self, texts: Sequence[str], prefixes: Sequence[str] | None = None) -> list[float]:
        """One optimizer step on the mean of the passages' losses at the learning rate × their
        number (`AdaptationSettings.together`), in the next round; each passage's loss before
        it (nan for one with nothing to predict, which is left out)."""
        prefixes = list(prefixes) if prefixes is not None else [""] * len(texts)
        tokenised = [training_tokens(self.tokenizer, text, prefix, self.settings.max_passage_tokens, self.device)
                     for text, prefix in zip(texts, prefixes)]
        learnable = [i for i, (ids, first) in enumerate(tokenised) if ids.shape[1] > first]
        losses = [math.nan] * len(texts)
        if learnable:
            for i, loss in zip(learnable, self.learning._step(self, [tokenised[i] for i in learnable])):
                losses[i] = loss
        return losses

    def lora_weights(self) -> LayerWeights:
        """What it learned, every LoRA layer's (A, B) in module order, as `lora.lora_weights` keeps
        them for decoding; not to be stepped any more."""
        return [(a.detach(), b.detach()) for a, b in self.weights]

    def leave(self) -> None:
        """Out of the rounds (its matrices still in use); again is a no-op."""
        self.learning._leave(self, close=False)

    def close(self) -> None:
        """Out of the rounds, and its matrices no longer tied to the model's LoRA layers (which may
        change after this); again is a no-op."""
        self.learning._leave(self, close=True)
