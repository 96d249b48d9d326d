"""Several messages decoded together: one forward per token for every conversation being answered.

Decoding a small model on a CPU is bound by reading its weights: a forward over eight rows costs
little more than over one. So when several users wait, each message takes its steps (on an adapter
of its own, in rounds with the other messages' steps: `learning`; or on the model's adapter,
keeping a copy of what it learned, `lora.lora_weights`), and decodes with what it learned as rows
of one shared batch:

    join     each new conversation prefilled alone (its own LoRA weights), its cache then
             left-padded into the batch's one cache (or the batch's into its length)
    step     every member that asked for its next logits gives its token; one forward over all
             rows, each with its own LoRA matrices (`lora.row_weights`), its own attention mask
             and its own positions; a member not ready in time gets a masked column instead of a
             token, so no one waits for a slow reader longer than `gather_seconds`
    leave    a member's rows are dropped before the next forward, and the columns that are now
             padding for every row with them
    draft    a member may give several tokens at once (its pending token and a draft guessed
             after it, `decoding.Rows.logits`); the forward is as wide as the most given, a
             member with fewer has masked columns after its tokens, and the draft's tokens the
             member does not keep are masked out before the next forward (holes in its row)

A row's attention mask is 0 over its padding and over the columns where it had no token, and its
position ids count its own tokens only: each row computes what it would alone (up to the order of
floating-point sums in a batched matmul).

Every use of the model (a prefill, a batch's forward, a message's step) holds one lock, `lock`,
and runs on the models' thread (`torch_thread`): the steps of the next message run between two
forwards of the batch, never beside them.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F

from . import torch_thread
from .decoding import DECODE_THREADS, at_most_threads, forward_last, growing, left_padded
from .lora import LayerWeights, row_weights, stack_row_weights

GATHER_SECONDS = 0.01  # how long a forward waits for members that have not asked for their next token yet
MAX_ROWS = 16  # rows in one batch; a message joining a full batch waits for room
IDLE_SECONDS = 60.0  # a member that asks for nothing this long (its reader went away) is dropped


class Batch:
    """Conversations of several messages decoded together (module docstring). `join` adds a
    message's conversations as a `Member`, which decodes like `decoding.Rows`: `append(token)`,
    then `logits()`."""

    def __init__(self, model, lock=None, *, threads: int = DECODE_THREADS,
                 prefill_context: Callable[[], ContextManager] = nullcontext,
                 step_context: Callable[[], ContextManager] = nullcontext,
                 max_rows: int = MAX_ROWS, gather_seconds: float = GATHER_SECONDS,
                 idle_seconds: float = IDLE_SECONDS):
        self.model = model
        self.lock = lock or threading.Lock()  # the model's: held for every forward, prefill and step
        self.threads = threads
        self.prefill_context, self.step_context = prefill_context, step_context
        self.max_rows, self.gather_seconds, self.idle_seconds = max_rows, gather_seconds, idle_seconds
        self._changed = threading.Condition()
        self._members: list[Member] = []  # in row order
        self._reserved = 0  # rows of members being prefilled
        self._running = False  # a forward is being run (or waits for the model's lock)
        self._free_since = 0.0  # when the last forward ended
        self._cache = None  # the rows' keys and values, left-padded: [rows, heads, T, d] per layer
        self._mask: torch.Tensor | None = None  # [rows, T]: 1 where a row has a token
        self._positions: torch.Tensor | None = None  # [rows]: each row's own token count
        self._first_column = 0  # the number of column 0 of `_mask`, counting every column the batch ever had
        self._weights: dict = {}  # each LoRA layer's RowWeights for the rows
        self.forwards = 0  # batched forwards run (for the benchmarks and tests)
        self.rows_forwarded = 0  # rows in them, together

    @property
    def members(self) -> int:
        with self._changed:
            return sum(not m.gone for m in self._members)

    def wait_until_empty(self) -> None:
        """Return once no member decodes and none is joining."""
        with self._changed:
            self._changed.wait_for(lambda: self._rows() == 0 and self._reserved == 0)

    def join(self, prompts: Sequence[torch.Tensor], adapters: Sequence[tuple[LayerWeights | None, float]]) -> "Member":
        """A message's conversations [1, T_i], row i decoded with adapters[i] = (LoRA weights from
        `lora.lora_weights`, or None for the base model; the scale of the adapter in that row):
        prefilled, each alone, and put into the batch. Waits while the batch is full."""
        if not prompts or len(prompts) != len(adapters):
            raise ValueError("a member needs one adapter for each of its conversations")
        if len(prompts) > self.max_rows:
            raise ValueError(f"a member of at most {self.max_rows} rows")
        with self._changed:
            self._changed.wait_for(lambda: self._rows() + self._reserved + len(prompts) <= self.max_rows)
            self._reserved += len(prompts)
        try:
            with self.lock:
                member = torch_thread.run(self._prefill_and_add, prompts, adapters)
        finally:
            with self._changed:
                self._reserved -= len(prompts)
                self._changed.notify_all()
        return member

    def _prefill_and_add(self, prompts, adapters) -> "Member":
        caches, logits = [], []
        for ids, adapter in zip(prompts, adapters):  # each alone: prefill is compute-bound, padding would cost
            with self.prefill_context():
                output = self._forward(ids, stack_row_weights(self.model, [adapter]))
            caches.append(output.cache)
            logits.append(output.logits[:, -1].float())
        member = Member(self, list(adapters), torch.cat(logits))
        with self._changed:
            self._compact()
            self._add(member, caches, [ids.shape[1] for ids in prompts])
        return member

    def _forward(self, input_ids, weights, positions: int = 1, **inputs):
        return forward_last(self.model, input_ids, row_weights(self.model, weights), positions, **inputs)

    def _rows(self) -> int:
        return sum(m.rows for m in self._members if not m.gone)

    # -- the batch's state: changed holding the model's lock and `_changed` ------------------

    def _add(self, member: "Member", caches, lengths: list[int]) -> None:
        """The member's prefilled caches, left-padded with the batch's to the longer of the two."""
        held = 0 if self._mask is None else self._mask.shape[1]
        longest = max(held, *lengths)
        self._first_column = 0 if self._mask is None else self._first_column - (longest - held)
        self._cache = left_padded([*([self._cache] if self._cache is not None else []), *caches],
                                  self.model.config, self.model.dtype)
        device = caches[0].layers[0].keys.device
        masks = [torch.tensor([[0] * (longest - n) + [1] * n], device=device) for n in lengths]
        if self._mask is not None:
            masks.insert(0, F.pad(self._mask, (longest - held, 0)))
        self._mask = torch.cat(masks)
        counts = torch.tensor(lengths, device=device)
        self._positions = counts if self._positions is None else torch.cat([self._positions, counts])
        self._members.append(member)
        self._restack()

    def _compact(self) -> None:
        """Drop the rows of members that left, and the columns no remaining row has a token in."""
        if not any(m.gone for m in self._members):
            return
        keep = [row for m, rows in zip(self._members, self._row_ranges()) if not m.gone for row in rows]
        self._members = [m for m in self._members if not m.gone]
        if not keep:
            self._cache = self._mask = self._positions = None
            self._weights = {}
            return
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(0).nonzero()[0])  # the first column some row has a token in
        self._mask, self._positions = mask[:, first:], self._positions.index_select(0, index)
        self._first_column += first
        self._cache = growing([(layer.keys.index_select(0, index)[..., first:, :],
                                layer.values.index_select(0, index)[..., first:, :])
                               for layer in self._cache.layers], self.model.config, self.model.dtype)
        self._restack()

    def _restack(self) -> None:
        self._weights = stack_row_weights(self.model, [a for m in self._members for a in m.adapters])
        start = 0
        for member in self._members:
            member.start, start = start, start + member.rows

    def _row_ranges(self) -> list[range]:
        return [range(m.start, m.start + m.rows) for m in self._members]

    # -- a step ---------------------------------------------------------------------------

    def _step(self, member: "Member") -> None:
        """Wait until the member's pending token has been through a forward: as its leader when
        no forward runs and every member is ready or the first ready one has waited
        `gather_seconds` (since it asked and since the last forward ended), else as a passenger
        of the forward another member leads."""
        with self._changed:
            member.asked = time.monotonic()
            self._changed.notify_all()
            while member.pending is not None:
                if member.failed is not None:
                    raise RuntimeError(f"decoding failed: {member.failed}")
                if not self._running:
                    active = [m for m in self._members if not m.gone]
                    ready = [m for m in active if m.pending is not None]
                    # from the end of the last forward too: its members ask again a moment after it
                    waited = time.monotonic() - max(min(m.asked for m in ready), self._free_since)
                    if len(ready) == len(active) or waited >= self.gather_seconds:
                        self._running = True
                        break
                    self._changed.wait(self.gather_seconds - waited)
                else:
                    self._changed.wait()
            else:
                return
        try:  # the leader
            with self.lock:
                with self._changed:
                    now = time.monotonic()
                    for idle in [m for m in self._members if m.pending is None and now - m.asked > self.idle_seconds]:
                        idle.gone = True  # its reader went away without closing it
                    tokens = [(m, list(m.pending)) for m in self._members if m.pending is not None]
                try:
                    torch_thread.run(self._run, tokens)
                except BaseException as error:  # the cache may be half-written: every member fails, the batch empties
                    with self._changed:
                        for m in self._members:
                            m.failed, m.gone = m.failed or (str(error) or type(error).__name__), True
                        torch_thread.run(self._compact)
                    raise
        finally:
            with self._changed:
                self._running, self._free_since = False, time.monotonic()
                self._changed.notify_all()

    def _run(self, tokens: list[tuple["Member", list[int]]]) -> None:
        """One forward: each ready member's tokens in its rows (as many columns as the most
        tokens given), masked columns in the others' (the rows of members that left dropped
        first, the drafted tokens members did not keep masked out)."""
        with self._changed:
            self._compact()
            self._drop_rejected()
        rows = self._mask.shape[0]
        device = self._mask.device
        width = max(len(given) for _, given in tokens)
        input_ids = torch.zeros(rows, width, dtype=torch.long, device=device)
        present = torch.zeros(rows, width, dtype=self._mask.dtype, device=device)
        for member, given in tokens:
            input_ids[member.start: member.start + member.rows, :len(given)] = torch.tensor(given, device=device)
            present[member.start: member.start + member.rows, :len(given)] = 1
        mask = torch.cat([self._mask, present], 1)
        first_new = self._first_column + self._mask.shape[1]
        with at_most_threads(self.threads, device), self.step_context():
            output = self._forward(input_ids, self._weights, width, cache=self._cache, attention_mask=mask,
                                   position_ids=self._positions.view(-1, 1) + torch.arange(width, device=device))
        self._mask, self._positions = mask, self._positions + present.sum(1)
        self._cache = output.cache
        logits = output.logits.float()
        self.forwards += 1
        self.rows_forwarded += rows
        with self._changed:
            for member, given in tokens:
                member.after = logits[member.start: member.start + member.rows, :len(given)]
                member.current = member.after[:, -1]
                member.columns = range(first_new, first_new + len(given))
                member.pending = None

    def _drop_rejected(self) -> None:
        """Mask out the drafted tokens each member did not keep, and take them off its positions."""
        for member in self._members:
            if member.rejected and not member.gone:
                local = [column - self._first_column for column in member.rejected if column >= self._first_column]
                rows = slice(member.start, member.start + member.rows)
                self._mask[rows, local] = 0
                self._positions[rows] -= len(member.rejected)
            member.rejected = []


class Member:
    """One message's conversations in a `Batch`, decoded as `decoding.Rows` decodes them: every
    row gets the same tokens (`append`); `logits()` [rows, V] (fp32) after the last one, or with a
    draft [rows, len(draft) + 1, V] and then `keep(n)`; `leave()` when the answer is done."""

    def __init__(self, batch: Batch, adapters: list, logits: torch.Tensor):
        self.batch = batch
        self.adapters = adapters
        self.rows = len(adapters)
        self.start = 0  # its first row in the batch
        self.current = logits
        self.after = logits[:, None]  # the logits at its positions in its last forward
        self.columns = range(0)  # the batch's columns of its tokens in its last forward
        self.rejected: list[int] = []  # columns of drafted tokens not kept, masked out before the next forward
        self.pending: list[int] | None = None  # tokens given to the batch, not yet through a forward
        self.asked = time.monotonic()  # when it last asked for logits
        self._next: list[int] = []
        self._drafted: torch.Tensor | None = None
        self.gone = False
        self.failed: str | None = None  # why the batch's forward failed, when it did

    def append(self, token: int) -> None:
        self._next.append(token)

    def logits(self, draft: Sequence[int] = ()) -> torch.Tensor:
        torch_thread.one_torch_thread_here()  # the caller's own ops on these logits start no team
        if self._drafted is not None:
            raise RuntimeError("keep(n) of the last draft first")
        before = self.current
        tokens = [*self._next, *draft]
        if tokens:
            if self.gone:
                raise RuntimeError(f"decoding failed: {self.failed}" if self.failed else
                                   "this answer's reader was away too long: it left the batch")
            with self.batch._changed:
                self.pending, self._next = tokens, []
            self.batch._step(self)
        if not draft:
            return self.current
        after = self.after if len(tokens) > len(draft) else torch.cat([before[:, None], self.after], 1)
        self._drafted = after[:, -len(draft) - 1:]
        return self._drafted

    def keep(self, n: int) -> None:
        """Keep the first `n` tokens of the last draft; the others are masked out of its rows."""
        drafted, self._drafted = self._drafted, None
        if drafted is None or not 0 <= n < drafted.shape[1]:
            raise ValueError(f"keep {n} of a draft of {0 if drafted is None else drafted.shape[1] - 1} tokens")
        dropped = drafted.shape[1] - 1 - n
        if dropped:
            with self.batch._changed:
                self.rejected = list(self.columns[len(self.columns) - dropped:])
        self.current = drafted[:, n]

    def leave(self) -> None:
        """Out of the batch (its rows dropped before the next forward); again is a no-op."""
        with self.batch._changed:
            self.gone = True
            self.pending = None
            self.batch._changed.notify_all()
