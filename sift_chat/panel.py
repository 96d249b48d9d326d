"""The settings a request carries, and what one answer used: the passages it learned from, read
and cites (the side panel's data).

Both are shared by the app, the CLI and the API: the same names and checks for the settings, the
same picks, σ² and timings for a panel, a terminal table or a JSON extension field.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field, replace

from .adaptation import AdaptationSettings
from .events import Selected
from .generation import cite
from .record import AnswerRecord
from .settings import ChatSettings
from .vocabulary import SettingError, quoted

SETTING_NAMES = ("method", "mode", "context_contrast", "contrast_against", "passages", "read_passages",
                 "read_min_match", "lam", "adaptive", "min_reduction", "learning_rate", "lora_layers", "max_new_tokens")


def default_settings() -> dict:
    """The settings panel's starting values: the engine's own defaults."""
    chat, adaptation = ChatSettings(), AdaptationSettings()
    return {"method": chat.method, "mode": chat.mode, "context_contrast": chat.context_contrast,
            "contrast_against": chat.contrast_against, "passages": chat.passages,
            "read_passages": chat.read_passages, "read_min_match": chat.read_min_match, "lam": chat.lam,
            "adaptive": chat.min_reduction is not None, "min_reduction": chat.min_reduction or 0.02,
            "learning_rate": adaptation.learning_rate, "lora_layers": adaptation.top_layers or 0,
            "max_new_tokens": chat.max_new_tokens}


def parse_settings(values: dict, base: AdaptationSettings, chat_base: ChatSettings | None = None,
                   layers: int | None = None) -> tuple[ChatSettings, AdaptationSettings]:
    """Settings by name (SETTING_NAMES) as the engine's settings; `SettingError` (a ValueError)
    with a readable message naming the setting. A value left empty (None) takes its default; what
    `values` does not name comes from `chat_base` and `base`. The bounds are the settings' own
    (`ChatSettings`, `AdaptationSettings`), and lora_layers in [0, `layers`], the model's layers
    (0: all): the app and the API check the same."""
    unknown = set(values) - set(SETTING_NAMES)
    if unknown:
        raise SettingError(sorted(map(str, unknown))[0],
                           f"unknown setting(s) {', '.join(quoted(str(k)) for k in sorted(map(str, unknown))[:5])}: "
                           f"use {', '.join(SETTING_NAMES)}")
    values = {**default_settings(), **{k: v for k, v in values.items() if v is not None}}

    def number(name: str, kind=float):
        value = values[name]
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise SettingError(name, f"{name.replace('_', ' ')} must be {'an integer' if kind is int else 'a number'}, "
                                     f"got {quoted(value)}")
        try:
            value = kind(value)
        except (TypeError, ValueError, OverflowError):
            raise SettingError(name, f"{name.replace('_', ' ')} must be a number, got {quoted(values[name])}") from None
        if kind is float and not math.isfinite(value):
            raise SettingError(name, f"{name.replace('_', ' ')} must be a finite number")
        return value

    if not isinstance(values["adaptive"], bool):
        raise SettingError("adaptive", f"adaptive must be true or false, got {quoted(values['adaptive'])}")
    chat = replace(
        chat_base or ChatSettings(),
        method=values["method"], mode=values["mode"], context_contrast=number("context_contrast"),
        contrast_against=values["contrast_against"],
        passages=number("passages", int), read_passages=number("read_passages", int),
        read_min_match=number("read_min_match"),
        lam=number("lam"), min_reduction=number("min_reduction") if values["adaptive"] else None,
        max_new_tokens=number("max_new_tokens", int),
    )
    layers_given = number("lora_layers", int)
    if layers_given < 0 or (layers is not None and layers_given > layers):
        bound = f"in [0, {layers}] (the model has {layers} layers; 0: all)" if layers is not None else ">= 0 (0: all)"
        raise SettingError("lora_layers", f"lora_layers must be an integer {bound}, got {quoted(layers_given)}")
    adaptation = replace(base, learning_rate=number("learning_rate"),
                         top_layers=layers_given if layers_given > 0 else None)
    return chat, adaptation


@dataclass
class Panel:
    """What one answer used: the picks, σ² after each, NN's σ² for the same prompt, the loss of
    each step, the passages read in the prompt, the ones the answer cites and the seconds of
    each stage. Passages are numbered [1], [2] … as the answer cites them: in the context modes
    the selection's leads (its best candidates, read, picked or not) first, then the picks in
    the order they were first picked."""

    method: str
    prior_variance: float
    # step, passage_id, document_id, path (the document as the user named it, never the server's path),
    # start_char, end_char, text, similarity, posterior_variance, uncertainty_reduction, repeat
    picks: list[dict]
    nn_variance: list[float]
    stop_reason: str
    losses: list[float | None] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    mode: str = "fine-tune"
    read: list[int] = field(default_factory=list)  # passage ids in the prompt
    citations: list[int] = field(default_factory=list)  # numbers the answer cites
    # passage_id, document_id, path, start_char, end_char, text of each passage read, best first
    leads: list[dict] = field(default_factory=list)
    # passage id -> the answer's words that this passage, learned from, holds and no passage read does
    only_learned: dict[int, list[str]] = field(default_factory=dict)
    together: bool = False  # the passages were learned from in one step (`AdaptationSettings.together`)

    def add_step(self, step) -> None:
        """An `engine.Step`: the loss of the passage it learned from."""
        self.losses.append(step.loss)
        self.together = step.together

    @property
    def final_variance(self) -> float:
        return self.picks[-1]["posterior_variance"] if self.picks else self.prior_variance

    @property
    def passage_ids(self) -> set[int]:
        return {p["passage_id"] for p in self.picks}

    @property
    def distinct_picks(self) -> list[dict]:
        """The first pick of each passage, in order: passage n of the answer's citations [n]."""
        first: dict[int, dict] = {}
        for pick in self.picks:
            first.setdefault(pick["passage_id"], pick)
        return list(first.values())

    @property
    def numbered(self) -> list[dict]:
        """The passages in citation order: the leads (the passages read), then the distinct picks."""
        read = {lead["passage_id"] for lead in self.leads}
        return [*self.leads, *(p for p in self.distinct_picks if p["passage_id"] not in read)]

    @property
    def numbered_ids(self) -> list[int]:
        """The passage ids in citation order: the answer's [n] is numbered_ids[n - 1]."""
        return [p["passage_id"] for p in self.numbered]

    @property
    def numbers(self) -> dict[int, int]:
        """passage id -> its citation number."""
        return {p["passage_id"]: n for n, p in enumerate(self.numbered, 1)}

    @property
    def unpicked_leads(self) -> list[dict]:
        """The passages read that the method did not pick."""
        return [lead for lead in self.leads if lead["passage_id"] not in self.passage_ids]

    def cite(self, answer: str, question: str = "") -> tuple[str, list[int]]:
        """The answer with citation markers [n] for these passages' numbers (`generation.cite`)."""
        return cite(answer, [p["text"] for p in self.numbered], question)

    @property
    def learned(self) -> bool:
        return self.mode in ("fine-tune", "both")

    @classmethod
    def from_selected(cls, selected: Selected, mode: str = "fine-tune") -> "Panel":
        picks = [{"step": p.step, "passage_id": p.passage.id, "document_id": p.passage.document_id,
                  "path": shown_name(p.passage),
                  "start_char": p.passage.start_char, "end_char": p.passage.end_char, "text": p.passage.text,
                  "similarity": p.similarity, "posterior_variance": p.posterior_variance,
                  "uncertainty_reduction": p.uncertainty_reduction, "repeat": p.repeat}
                 for p in selected.picks]
        leads = [_passage(p.id, p) for p in selected.leads] if mode in ("context", "both") else []
        return cls(selected.method, selected.prior_variance, picks, list(selected.nn_posterior_variance),
                   selected.stop_reason, mode=mode, leads=leads)

    @classmethod
    def from_stored(cls, record: AnswerRecord | None, rows: list[dict], passages: dict) -> "Panel | None":
        """From an answer's stored record and selection rows (a removed document's passage keeps
        its numbers, without its text)."""
        if record is None or record.selection is None:
            return None
        picks, seen = [], set()
        for row in rows:
            passage = passages.get(row["passage_id"])
            picks.append({"step": row["step"], "passage_id": row["passage_id"],
                          "document_id": passage.document_id if passage else None,
                          "path": shown_name(passage) if passage else "(removed document)",
                          "start_char": passage.start_char if passage else None,
                          "end_char": passage.end_char if passage else None,
                          "text": passage.text if passage else "",
                          "similarity": row["similarity"], "posterior_variance": row["posterior_variance"],
                          "uncertainty_reduction": row["uncertainty_reduction"],
                          "repeat": row["passage_id"] in seen})
            seen.add(row["passage_id"])
        selection = record.selection
        losses = record.losses or [row["loss"] for row in rows]
        mode = record.settings.get("mode", "fine-tune")
        leads = [_passage(i, passages.get(i)) for i in record.read] if mode in ("context", "both") else []
        return cls(selection.method, selection.prior_variance, picks, list(selection.nn_posterior_variance),
                   selection.stop_reason, list(losses), dict(record.seconds), mode=mode, read=list(record.read),
                   citations=list(record.citations), leads=leads,
                   only_learned={int(k): list(v) for k, v in record.only_learned.items()},
                   together=bool(record.adaptation.get("together", False)))

    def to_json(self) -> dict:
        """The panel as JSON: each pick with its citation number, source (and its document's id),
        offsets, σ² after it, reduction, loss and the answer's words only it (learned from, not read)
        holds; the passage ids read in the prompt and the numbers the answer cites."""
        numbers = self.numbers
        picks = [{**{k: pick[k] for k in ("step", "passage_id", "path", "start_char", "end_char",
                                           "similarity", "posterior_variance", "uncertainty_reduction",
                                           "repeat", "text")},
                  "document_id": pick.get("document_id"),  # None: a pick made without one (a removed document's)
                  "number": numbers[pick["passage_id"]],
                  "loss": _finite(self.losses[pick["step"] - 1]) if pick["step"] <= len(self.losses) else None,
                  "only_learned": list(self.only_learned.get(pick["passage_id"], []))}
                 for pick in self.picks]
        return {"method": self.method, "mode": self.mode, "together": self.together,
                "prior_variance": self.prior_variance,
                "final_variance": self.final_variance, "stop_reason": self.stop_reason,
                "nn_posterior_variance": self.nn_variance, "picks": picks,
                "lead": {**self.leads[0], "number": 1} if self.leads else None,
                "leads": [{**lead, "number": n} for n, lead in enumerate(self.leads, 1)],
                "read": list(self.read), "citations": list(self.citations)}


def _passage(passage_id: int, passage) -> dict:
    """A passage as the panel keeps it (a removed document's: its id, without text)."""
    return {"passage_id": passage_id, "document_id": passage.document_id if passage else None,
            "path": shown_name(passage) if passage else "(removed document)",
            "start_char": passage.start_char if passage else None,
            "end_char": passage.end_char if passage else None, "text": passage.text if passage else ""}


def shown_name(passage) -> str:
    """A passage's document as users see it: the name it was given (an upload's, or its path in
    the folder ingested), never the server's path."""
    return passage.name or Path(passage.path).name


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
