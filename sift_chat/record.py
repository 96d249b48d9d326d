"""What is kept of one answer: a typed record, written by the engine, stored as JSON with the
answer, and read back as the same type (never as a dict picked apart with .get)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class SelectionRecord:
    """The selection an answer learned from, in summary (the picks themselves are rows of their own)."""

    method: str
    prior_variance: float
    final_variance: float
    stop_reason: str
    nn_posterior_variance: list[float]  # NN's σ² after each of its picks, for the same prompt
    lead: int | None = None  # the best candidate of the pre-selection (fused rank 1), read first in context
    terms: list[str] = field(default_factory=list)  # the prompt's words searched in the lexical index
    candidates: int = 0  # K: how many passages the selection chose from


@dataclass(frozen=True)
class AnswerRecord:
    """The settings an answer was made with, its selection, the loss of each step, the seconds
    of each stage (embed, select, fine-tune, generate, first_token), how the answer ended, and
    which passages it read and cites, and the answer's words only the passages learned from hold.

    `numbered` lists the ids of the passages the answer numbers, in reading order (in the context
    modes the selection's lead first, then the distinct picks in pick order; else the distinct
    picks): passage `numbered[n - 1]` is the one the answer cites as [n]; `read` the ids of those
    in the prompt (a prefix of `numbered` in the context modes, empty otherwise); `citations` the
    numbers the answer cites."""

    settings: dict  # ChatSettings, as given
    adaptation: dict  # AdaptationSettings, as used
    seconds: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    selection: SelectionRecord | None = None
    ended: str = "end"  # end (the model stopped), limit (max_new_tokens), repeat (it looped)
    citations: list[int] = field(default_factory=list)
    read: list[int] = field(default_factory=list)
    numbered: list[int] = field(default_factory=list)
    # passage id (as text: JSON keys) -> the answer's words that passage, learned from, holds and no
    # passage read does (`generation.only_learned_words`): what the steps alone can have put there
    only_learned: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> "AnswerRecord | None":
        """The record stored with an answer; None for an answer stored without one."""
        if not text:
            return None
        data = json.loads(text)
        selection = data.get("selection")
        return cls(settings=data.get("settings", {}), adaptation=data.get("adaptation", {}),
                   seconds=dict(data.get("seconds", {})), losses=list(data.get("losses", [])),
                   selection=SelectionRecord(**selection) if selection else None,
                   ended=data.get("ended", "end"), citations=list(data.get("citations", [])),
                   read=list(data.get("read", [])), numbered=list(data.get("numbered", [])),
                   only_learned={str(k): list(v) for k, v in (data.get("only_learned") or {}).items()})
