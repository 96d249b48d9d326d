"""Decoding several conversations at once: one forward per token for all of them, each with its own KV cache.

Context-aware decoding scores every answer token from two conversations, with and without the
passages (`generation.contrast`). Decoding a small model on a CPU is bound by reading its weights,
so the two are rows of one batch, not two forwards one after the other:

    prefill   each conversation alone (no work on padding), its own DynamicCache
    merge     the caches left-padded to the longest, as one batch's DynamicCache; the attention
              mask is 0 over each row's padding, and each row's position ids count its own tokens
    step      the chosen token appended to every row, one forward over the batch; each layer's
              keys and values are written into room kept after them (`GrowingLayer`), not
              concatenated into a new tensor per token as `DynamicCache` does

or, where the start-up probe measured it faster (two cores, and a batch of two rows costing
more than one row), each row its own forward on its own core, side by side (`Rows`).

Each row may weigh the LoRA adapter on its own (`lora.row_scales`: 1 the adapted model, 0 the base
model), so one forward serves "adapted, with the passages" and "base, without them".

The steps run on one CPU thread unless the engine's start-up probe measured more to be faster
(`probe`; the prefill on torch's): a token per row makes every matmul memory-bound, so a second
thread only adds a barrier to every op, and on shared cores each barrier waits for a descheduled
thread (README: a batch of two at 2 threads took 5x its time at 1 thread on the loaded 2-core
machine, one row 2.7x).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from . import torch_thread
from .lora import row_scales

DECODE_THREADS = 1  # torch threads for a decoding step on the CPU unless the engine's probe measured otherwise (module docstring)


class GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values [batch, heads, T, d] are views of buffers with room for
    `room` more positions: a token's states are written in place, O(1) per token, where
    `DynamicLayer` copies the whole layer into a new tensor (O(T) per token, most of the time of a
    decoding step after the matmuls). When the room runs out the buffers grow by `room` again."""

    def __init__(self, room: int = 256):
        super().__init__()
        self.room = room
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]  # no positions yet
        length = self.keys.shape[-2]
        end = length + key_states.shape[-2]
        if not self._holds(end):  # first update, out of room, or keys replaced (a crop keeps them)
            self._buffers = (_with_room(self.keys, end + self.room), _with_room(self.values, end + self.room))
        keys, values = self._buffers
        keys[..., length:end, :] = key_states
        values[..., length:end, :] = value_states
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        return self.keys, self.values

    def _holds(self, end: int) -> bool:
        """Whether keys and values are views of the buffers, which have room up to `end`."""
        return (self._buffers is not None and self._buffers[0].shape[-2] >= end
                and self.keys.data_ptr() == self._buffers[0].data_ptr()
                and self.values.data_ptr() == self._buffers[1].data_ptr())


def _with_room(states: torch.Tensor, capacity: int) -> torch.Tensor:
    """A buffer [batch, heads, capacity, d] whose first T positions are `states` [batch, heads, T, d]."""
    batch, heads, length, dim = states.shape
    buffer = states.new_empty(batch, heads, capacity, dim)
    buffer[..., :length, :] = states
    return buffer


def growing(layer_states: Sequence[tuple[torch.Tensor, torch.Tensor]], config,
            dtype: torch.dtype | None = None) -> DynamicCache:
    """A cache holding each layer's (keys, values), in `GrowingLayer`s where the model's layers are
    plain `DynamicLayer`s (a sliding-window layer, which drops old positions, is kept as it is),
    as `dtype` where given: a prefill under bf16 autocast leaves bf16 values beside fp32 keys (the
    rotary embedding computes in fp32), which a step without autocast cannot attend to."""
    cache = DynamicCache(config=config)
    layers = list(cache.layers) or [DynamicLayer() for _ in layer_states]
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in layers]
    for index, (keys, values) in enumerate(layer_states):
        cache.update(keys.to(dtype or keys.dtype), values.to(dtype or values.dtype), index)
    return cache


def left_padded(caches: Sequence[DynamicCache], config, dtype: torch.dtype | None = None) -> DynamicCache:
    """One batch's cache from single-row caches of lengths T_i: each layer's keys and values
    [1, heads, T_i, d] zero-padded on the left to max T_i and stacked on the batch dimension. The
    padding is never attended to (the caller's attention mask is 0 there)."""
    longest = max(cache.get_seq_length() for cache in caches)
    return growing([(torch.cat([F.pad(layer.keys, (0, 0, longest - layer.keys.shape[-2], 0)) for layer in layers]),
                     torch.cat([F.pad(layer.values, (0, 0, longest - layer.values.shape[-2], 0)) for layer in layers]))
                    for layers in zip(*(cache.layers for cache in caches))], config, dtype)


def forward_last(model, input_ids: torch.Tensor, adapters: ContextManager, positions: int = 1, **inputs):
    """One cached forward under torch.no_grad() with the rows' adapters set (`lora.row_scales` or
    `lora.row_weights`), keeping the logits of the last `positions` positions only: the head over
    a large vocabulary is costly."""
    with torch.no_grad(), adapters:
        return model(input_ids=input_ids, use_cache=True, logits_to_keep=positions, **inputs)


class Rows:
    """Conversations [1, T_i] decoded together by a causal LM, each row weighing the adapter by
    `adapter_scales[i]` (None: every row adapted). `logits()` are the next-token logits of every
    row [B, V] (fp32); `append(token)` adds the same token to every row. The forward runs when
    logits are asked for, one over every token appended since: a token after which decoding stops
    costs none, and a conversation asked for its logits only now and then (the one without the
    passages, in context-aware decoding) catches up in one forward.
    The prefill runs inside `prefill_context()` and every step inside `step_context()` (the
    precision `probe.Compute` chose: bf16 base products or nothing), entered and left around each
    forward in the thread that runs it, so that a consumer resuming the decoding on another
    thread (Gradio does) runs it the same way.

    How the rows share the machine (the probe measures which is faster here):

        batched        one forward per token over all rows (`Lane`), on at most `threads` threads
        side_by_side   a forward per row, the first in the caller's thread and the others on a
                       second thread at the same time, one torch thread each: two cores each
                       reading the weights for one row, where one batched forward's small-M
                       matmuls cost more than one row's

    One row decodes exactly as a plain loop does (no mask, no position ids).

    A draft (`logits(draft)`: tokens guessed to come next, `generation.PromptLookup`) goes through
    the same forward as the pending tokens, which then returns the logits after each of them, so
    that the caller can check the guesses against its own choices at once; `keep(n)` keeps the
    first n drafted tokens in the caches and drops the others."""

    def __init__(self, model, prompts: Sequence[torch.Tensor], adapter_scales: Sequence[float] | None = None,
                 threads: int = DECODE_THREADS, prefill_context: Callable[[], ContextManager] = nullcontext,
                 step_context: Callable[[], ContextManager] = nullcontext, side_by_side: bool = False):
        if not prompts:
            raise ValueError("no conversation to decode")
        scales = None if adapter_scales is None else list(adapter_scales)
        groups = [[row] for row in range(len(prompts))] if side_by_side else [list(range(len(prompts)))]
        self.lanes = torch_thread.run(lambda: [Lane(model, [prompts[row] for row in group],
                                                    None if scales is None else [scales[row] for row in group],
                                                    prefill_context) for group in groups])
        self.threads = 1 if len(self.lanes) > 1 else threads  # torch threads per lane, on the CPU
        self.step_context = step_context
        self._logits = torch.cat([lane.logits for lane in self.lanes])
        self._pending: list[int] = []
        self._drafted: torch.Tensor | None = None  # the logits of the last draft's positions, until `keep`

    def append(self, token: int) -> None:
        self._pending.append(token)

    def logits(self, draft: Sequence[int] = ()) -> torch.Tensor:
        """[B, V]: every row's logits after its tokens so far. With a draft, [B, len(draft) + 1, V]:
        after the tokens so far and after each drafted token, which the caches hold until `keep`."""
        if self._drafted is not None:
            raise RuntimeError("keep(n) of the last draft first")
        if not draft:
            if self._pending:
                tokens, self._pending = self._pending, []
                self._logits = torch_thread.run(self._step, tokens, 1)[:, -1]
            return self._logits
        tokens, self._pending = [*self._pending, *draft], []
        after = torch_thread.run(self._step, tokens, len(draft) + (1 if len(tokens) > len(draft) else 0))
        if after.shape[1] == len(draft):  # no token pending: the logits before the draft are known
            after = torch.cat([self._logits[:, None], after], 1)
        self._drafted = after
        return after

    def keep(self, n: int) -> None:
        """Keep the first `n` tokens of the last draft (the logits after them are the current
        ones), drop the rest from every cache."""
        drafted, self._drafted = self._drafted, None
        if drafted is None or not 0 <= n < drafted.shape[1]:
            raise ValueError(f"keep {n} of a draft of {0 if drafted is None else drafted.shape[1] - 1} tokens")
        dropped = drafted.shape[1] - 1 - n
        if dropped:
            torch_thread.run(lambda: [lane.drop(dropped) for lane in self.lanes])
        self._logits = drafted[:, n]

    def _step(self, tokens: list[int], positions: int) -> torch.Tensor:
        first, others = self.lanes[0], self.lanes[1:]
        with at_most_threads(self.threads, self._logits.device):
            beside = _SIDE.submit(_step_all, others, tokens, positions, self.step_context) if others else None
            try:
                first.step(tokens, self.step_context, positions)
            finally:  # waits: the other lanes are done with the model before anything else touches it
                failed = beside.exception() if beside is not None else None
        if failed is not None:
            raise failed
        return torch.cat([lane.after for lane in self.lanes])


class Lane:
    """Rows decoded by one forward per token: each prefilled alone (no work on padding), their
    caches left-padded into one (`left_padded`), an attention mask 0 over each row's padding and
    position ids counting each row's own tokens. `after` [rows, positions, V] (fp32) are the
    logits of the last step's last `positions` positions, `logits` [rows, V] its last."""

    def __init__(self, model, prompts: Sequence[torch.Tensor], adapter_scales: Sequence[float] | None,
                 prefill_context: Callable[[], ContextManager] = nullcontext):
        self.model = model
        self.scales = None if adapter_scales is None or all(s == 1 for s in adapter_scales) else list(adapter_scales)
        caches, logits = [], []
        for row, ids in enumerate(prompts):  # each alone: prefill is compute-bound, padding would cost
            with prefill_context():
                output = self._forward(ids, None if self.scales is None else self.scales[row: row + 1])
            caches.append(output.cache)
            logits.append(output.logits[:, -1])
        lengths = [ids.shape[1] for ids in prompts]
        # the cache in the model's own dtype, whatever precision the prefill ran in
        self.cache = (growing([(layer.keys, layer.values) for layer in caches[0].layers], model.config, model.dtype)
                      if len(caches) == 1 else left_padded(caches, model.config, model.dtype))
        device = prompts[0].device
        if len(prompts) == 1:
            self.mask = self.positions = None
        else:
            longest = max(lengths)
            self.mask = torch.tensor([[0] * (longest - n) + [1] * n for n in lengths], device=device)
            self.positions = torch.tensor([[n] for n in lengths], device=device)
        self.after = torch.cat(logits).float()[:, None]

    def _forward(self, input_ids, scales, positions: int = 1, **inputs):
        return forward_last(self.model, input_ids, row_scales(self.model, scales), positions, **inputs)

    def step(self, tokens: Sequence[int], step_context: Callable[[], ContextManager] = nullcontext,
             positions: int = 1) -> None:
        """Append `tokens` to every row: one forward, in the calling thread, keeping the logits of
        the last `positions` positions."""
        batch, count = self.logits.shape[0], len(tokens)
        input_ids = torch.tensor([list(tokens)] * batch, dtype=torch.long, device=self.logits.device)
        inputs = {}
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(batch, count)], 1)
            inputs = {"attention_mask": self.mask,
                      "position_ids": self.positions + torch.arange(count, device=self.positions.device)}
            self.positions = self.positions + count
        with step_context():
            output = self._forward(input_ids, self.scales, positions, cache=self.cache, **inputs)
        self.cache = output.cache
        self.after = output.logits.float()

    @property
    def logits(self) -> torch.Tensor:
        return self.after[:, -1]

    def drop(self, count: int) -> None:
        """Forget every row's last `count` tokens (a draft's guesses that were not kept)."""
        self.cache.crop(-count)
        if self.mask is not None:
            self.mask, self.positions = self.mask[:, :-count], self.positions - count


def _step_all(lanes: Sequence[Lane], tokens: Sequence[int], positions: int, step_context) -> None:
    for lane in lanes:
        lane.step(tokens, step_context, positions)


# the one thread that steps side-by-side lanes beside the caller's, on one torch thread (started on first use)
_SIDE = ThreadPoolExecutor(1, thread_name_prefix="sift-chat-decode", initializer=torch.set_num_threads, initargs=(1,))


@contextmanager
def at_most_threads(count: int, device: torch.device) -> Iterator[None]:
    """At most `count` torch threads inside, for work on the CPU; the caller's count again after."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before <= count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
