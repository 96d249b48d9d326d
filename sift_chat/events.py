"""What a message tells its consumers while it runs (`Engine.respond` yields these): the stages,
the selection, each step's loss, what the model reads, the answer's pieces, notices, and finally
the answer with its record. Plain frozen dataclasses: the application layer stores them, the
shells render them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .record import AnswerRecord
from .store import Passage


@dataclass(frozen=True)
class Stage:
    name: str  # embed, select, fine-tune, generate
    state: str  # started, finished
    seconds: float = 0.0


@dataclass(frozen=True)
class Picked:
    """One selected passage: which, and what it did to the prompt's uncertainty."""

    step: int
    passage: Passage
    similarity: float
    posterior_variance: float
    uncertainty_reduction: float
    repeat: bool  # the same passage was picked at an earlier step


@dataclass(frozen=True)
class Selected:
    """The picks, and the pre-selection they were made from: `leads` are its best candidates (fused
    rank 1, 2, …; at most `ChatSettings.read_passages` of them, those after the first matching the
    prompt nearly as well: `retrieval.read_count`), which the context modes read, picked or not
    (README: Retrieval)."""

    method: str
    picks: list[Picked]
    prior_variance: float
    stop_reason: str
    nn_posterior_variance: list[float]  # NN's σ² after each of its picks, for the same prompt
    leads: list[Passage] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)  # the K pre-selected passage ids, best fused first
    terms: list[str] = field(default_factory=list)  # the prompt's words searched in the lexical index
    seconds: dict[str, float] = field(default_factory=dict)  # pre-selection: vector, lexical, fuse

    @property
    def lead(self) -> Passage | None:
        """The pre-selection's best candidate, read first."""
        return self.leads[0] if self.leads else None

    def reading_order(self, uses_context: bool) -> list[Passage]:
        """The passages the answer numbers [1], [2] …: in the context modes the leads first, then
        the distinct picks in pick order; else the distinct picks."""
        distinct = [p.passage for p in self.picks if not p.repeat]
        if not uses_context:
            return distinct
        read = {p.id for p in self.leads}
        return [*self.leads, *(p for p in distinct if p.id not in read)]

    @property
    def final_variance(self) -> float:
        return self.picks[-1].posterior_variance if self.picks else self.prior_variance


@dataclass(frozen=True)
class Step:
    """Passage `index` of `total` (1-based, pass after pass) was learned from: `loss` is its
    next-token loss before its step, which it took alone or, `together`, with the other passages
    of its pass (one step on all of them, `AdaptationSettings.together`)."""

    index: int
    total: int
    loss: float
    together: bool = False

    @property
    def words(self) -> str:
        """For a status line: "step 2 of 3", or "passage 2 of 4 (one step on all 4)"."""
        if self.together:
            return f"passage {self.index} of {self.total} (one step on all {self.total})"
        return f"step {self.index} of {self.total}"


@dataclass(frozen=True)
class Prompted:
    """What the model reads for the answer: the conversation's token ids (one conversation per
    passage read, each in its own row: `readings`), and the passages read (none outside the
    context modes), numbered from 1 as the answer cites them; `weights`, how much each reading
    weighs in the answer's tokens (`generation.mixture`)."""

    readings: list[torch.Tensor] = field(repr=False)
    passages: list[Passage]
    weights: torch.Tensor = field(default_factory=lambda: torch.ones(1), repr=False)

    @property
    def input_ids(self) -> torch.Tensor:
        """The first conversation: the one reading the best passage (or none)."""
        return self.readings[0]


@dataclass(frozen=True)
class HandedOver:
    """The model is free for the next message while this one goes on (decoding together): it
    learns on its own, its steps in rounds that a message let in now can share (`learning`), or it
    has joined the shared batch to write its answer."""

    learning: bool


@dataclass(frozen=True)
class Token:
    text: str


@dataclass(frozen=True)
class Notice:
    message: str


@dataclass(frozen=True)
class Done:
    """The answer as stored: with its citation markers [n], where n numbers the passages in the
    order they were picked (repeats keep their first number; in the context modes [1]… are the
    passages read). `raw_answer` is the text the model generated."""

    answer: str
    record: AnswerRecord
    raw_answer: str = ""  # the text the model generated, before citation markers

    @property
    def citations(self) -> tuple[int, ...]:
        return tuple(self.record.citations)

    @property
    def ended(self) -> str:
        return self.record.ended


Event = Stage | Selected | Step | Prompted | HandedOver | Token | Notice | Done
