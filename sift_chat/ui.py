"""The app: a Gradio shell over the engine, the store and the corpus stage.

    Handlers   plain functions (methods) that take and return plain values: strings, lists, dicts,
               `Panel`s. They call the Engine, the Store and `corpus.ingest`; no selection math and
               no training code lives here. Tested as they are (tests/test_ui.py).
    render_*   turn a `Panel` (one answer's selection) into what the side panel shows.
    build      the layout, and the wiring of components to handlers (Gradio-specific, thin).
    create_app load the models and the store, build the Blocks; `launch` serves it.

Each browser gets a random private key, kept in its localStorage (gr.BrowserState), and its chats
are stored under that key: one visitor never lists, opens, renames or deletes another's chats.
Chat, compare and ingest share one queue slot ("model"): one adaptation at a time per loaded model,
and a waiting user sees their place in the queue.
"""

from __future__ import annotations

import html
import json
import math
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr

from . import config
from .adaptation import AdaptationSettings
from .corpus import DEFAULT_MAX_FILE_BYTES, ingest
from .engine import ChatSettings, Done, Engine, Notice, Selected, Stage, Step, Token
from .store import Store, StoreError

SAMPLE_CORPUS = Path(__file__).resolve().parent.parent / "corpora" / "brindlemoor"
MAX_UPLOAD_BYTES = DEFAULT_MAX_FILE_BYTES  # 32 MiB, as the corpus stage reads at most
DEMO_QUESTION = "Who founded Brindlemoor and who keeps the lighthouse?"
METHOD_LABELS = {"sift": "SIFT", "nn": "NN", "nnf": "NN-F", "us": "US"}
NO_ANSWER = "*(no answer: the model stopped at once)*"
SETTING_NAMES = ("method", "mode", "passages", "lam", "adaptive", "min_reduction",
                 "learning_rate", "lora_layers", "max_new_tokens")


# -- settings --------------------------------------------------------------------------------


def default_settings() -> dict:
    """The settings panel's starting values: the engine's own defaults."""
    chat, adaptation = ChatSettings(), AdaptationSettings()
    return {"method": chat.method, "mode": chat.mode, "passages": chat.passages, "lam": chat.lam,
            "adaptive": chat.min_reduction is not None, "min_reduction": chat.min_reduction or 0.02,
            "learning_rate": adaptation.learning_rate, "lora_layers": adaptation.top_layers or 0,
            "max_new_tokens": chat.max_new_tokens}


def parse_settings(values: dict, base: AdaptationSettings) -> tuple[ChatSettings, AdaptationSettings]:
    """The settings panel's values as engine settings; ValueError with a readable message.
    A value left empty (None) takes its default."""
    values = {**default_settings(), **{k: v for k, v in values.items() if v is not None}}

    def number(name: str, kind=float):
        try:
            value = kind(values[name])
        except (TypeError, ValueError):
            raise ValueError(f"{name.replace('_', ' ')} must be a number, got {values[name]!r}") from None
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{name.replace('_', ' ')} must be a finite number")
        return value

    chat = ChatSettings(
        method=values["method"], mode=values["mode"], passages=number("passages", int),
        lam=number("lam"), min_reduction=number("min_reduction") if values["adaptive"] else None,
        max_new_tokens=number("max_new_tokens", int),
    )
    layers = number("lora_layers", int)
    adaptation = replace(base, learning_rate=number("learning_rate"), top_layers=layers if layers > 0 else None)
    return chat, adaptation


# -- one answer's selection, as the side panel shows it ---------------------------------------


@dataclass
class Panel:
    """What one answer learned from: the picks, σ² after each, NN's σ² for the same prompt,
    the loss of each step and the seconds of each stage."""

    method: str
    prior_variance: float
    picks: list[dict]  # step, passage_id, path, text, similarity, posterior_variance, uncertainty_reduction, repeat
    nn_variance: list[float]
    stop_reason: str
    losses: list[float | None] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def final_variance(self) -> float:
        return self.picks[-1]["posterior_variance"] if self.picks else self.prior_variance

    @property
    def passage_ids(self) -> set[int]:
        return {p["passage_id"] for p in self.picks}

    @classmethod
    def from_selected(cls, selected: Selected) -> "Panel":
        picks = [{"step": p.step, "passage_id": p.passage.id, "path": p.passage.path, "text": p.passage.text,
                  "similarity": p.similarity, "posterior_variance": p.posterior_variance,
                  "uncertainty_reduction": p.uncertainty_reduction, "repeat": p.repeat}
                 for p in selected.picks]
        return cls(selected.method, selected.prior_variance, picks, list(selected.nn_posterior_variance),
                   selected.stop_reason)

    @classmethod
    def from_stored(cls, record: dict | None, rows: list[dict], passages: dict) -> "Panel | None":
        """From an answer's stored record and selection rows (a removed document's passage keeps
        its numbers, without its text)."""
        record = record or {}
        selection = record.get("selection")
        if not selection:
            return None
        picks, seen = [], set()
        for row in rows:
            passage = passages.get(row["passage_id"])
            picks.append({"step": row["step"], "passage_id": row["passage_id"],
                          "path": passage.path if passage else "(removed document)",
                          "text": passage.text if passage else "",
                          "similarity": row["similarity"], "posterior_variance": row["posterior_variance"],
                          "uncertainty_reduction": row["uncertainty_reduction"],
                          "repeat": row["passage_id"] in seen})
            seen.add(row["passage_id"])
        losses = record.get("losses") or [row.get("loss") for row in rows]
        return cls(selection["method"], selection["prior_variance"], picks,
                   list(selection.get("nn_posterior_variance") or []), selection.get("stop_reason", ""),
                   list(losses), dict(record.get("seconds") or {}))


def coverage_verdict(prior: float, final: float) -> str:
    """How well the corpus covers a prompt, from the σ² its passages leave (rough bands)."""
    share = final / prior if prior > 0 else 1.0
    if share <= 0.5:
        return "good"
    if share <= 0.8:
        return "partial"
    return "poor"


def render_coverage(panel: Panel | None, note: str = "") -> str:
    if panel is None:
        return note or "No passages were used for this answer."
    if not panel.picks:
        return f"No passage was selected ({panel.stop_reason}): the answer comes from the base model."
    prior, final = panel.prior_variance, panel.final_variance
    removed = 1 - final / prior if prior > 0 else 0.0
    nn = (f" NN's {len(panel.nn_variance)} nearest passages would leave σ² {panel.nn_variance[-1]:.2f}."
          if panel.nn_variance and panel.method != "nn" else "")
    return (f"**How well your documents cover this prompt: {coverage_verdict(prior, final)}**. "
            f"σ² {prior:.2f} → {final:.2f} after {len(panel.picks)} {METHOD_LABELS.get(panel.method, panel.method)} "
            f"picks: {removed:.0%} of the uncertainty removed.{nn}\n\n"
            "<small>σ² is the uncertainty about your prompt left by the chosen passages: 1 when your "
            "documents say nothing about it, lower the better they cover it.</small>")


def render_variance(panel: Panel | None, *others: Panel | None):
    """σ² after each step (0 = the prior) for the panel's method and for NN, as a long table
    (columns step, variance, method); None when there is nothing to draw."""
    import pandas as pd

    rows = []
    for item in (panel, *others):
        if item is None:
            continue
        label = METHOD_LABELS.get(item.method, item.method)
        curve = [item.prior_variance] + [p["posterior_variance"] for p in item.picks]
        rows += [{"step": i, "variance": float(v), "method": label} for i, v in enumerate(curve)]
    if panel is not None and panel.method != "nn" and panel.nn_variance \
            and not any(o is not None and o.method == "nn" for o in others):
        curve = [panel.prior_variance] + list(panel.nn_variance)
        rows += [{"step": i, "variance": float(v), "method": "NN"} for i, v in enumerate(curve)]
    if not rows:
        return None  # nothing to draw (an empty frame would leave Gradio's chart without lines later)
    return pd.DataFrame(rows, columns=["step", "variance", "method"])


def render_passages(panel: Panel | None, shared: set[int] | frozenset = frozenset()) -> str:
    """The picks as cards: step, uncertainty reduction (with a bar), σ² after, similarity, loss of
    the step, source document, the passage text. Repeats and passages picked by both methods (in
    a comparison) are marked."""
    if panel is None or not panel.picks:
        return "<div class='sc-empty'>No passages yet: ask a question.</div>"
    cards = []
    for pick in panel.picks:
        step = pick["step"]
        loss = panel.losses[step - 1] if step <= len(panel.losses) else None
        share = pick["uncertainty_reduction"] / panel.prior_variance if panel.prior_variance > 0 else 0
        badges = ("<span class='sc-badge'>repeat</span>" if pick["repeat"] else "") + (
            "<span class='sc-badge sc-shared'>★ both</span>" if pick["passage_id"] in shared else "")
        text = " ".join(pick["text"].split())
        text = text if len(text) <= 700 else text[:699] + "…"
        loss_text = f" · loss {loss:.3f}" if isinstance(loss, (int, float)) and math.isfinite(loss) else ""
        cards.append(
            f"<div class='sc-pick' data-passage='{pick['passage_id']}'>"
            f"<div class='sc-head'><b>{step}.</b> "
            f"<span class='sc-reduction'>−{pick['uncertainty_reduction']:.3f} σ²</span> "
            f"→ {pick['posterior_variance']:.3f} · similarity {pick['similarity']:.2f}{loss_text} · "
            f"<span class='sc-source' title='{html.escape(pick['path'], quote=True)}'>"
            f"{html.escape(Path(pick['path']).name)}</span> {badges}</div>"
            f"<div class='sc-bar'><span style='width:{max(0.0, min(share, 1.0)) * 100:.1f}%'></span></div>"
            f"<div class='sc-text'>{html.escape(text)}</div></div>")
    header = (f"<div class='sc-caption'>{len(panel.picks)} passages, in the order the model learned from "
              f"them; −x σ² is how much uncertainty each removed (stopped: {html.escape(panel.stop_reason)})</div>")
    return f"<div class='sc-picks'>{header}{''.join(cards)}</div>"


def render_timings(panel: Panel | None, seconds: dict | None = None) -> str:
    seconds = seconds if seconds is not None else (panel.seconds if panel else {})
    parts = []
    for name in ("embed", "select", "fine-tune", "generate"):
        if name in seconds:
            extra = ""
            steps = len([x for x in (panel.losses if panel else []) if x is not None])
            if name == "fine-tune" and steps:
                extra = f" ({steps} steps, {seconds[name] / steps:.2f} s each)"
            parts.append(f"{name} {seconds[name]:.2f} s{extra}")
    if "first_token" in seconds:
        parts.append(f"first word after {seconds['first_token']:.2f} s")
    lines = ["**Time per stage:** " + " · ".join(parts)] if parts else []
    losses = [x for x in (panel.losses if panel else []) if isinstance(x, (int, float)) and math.isfinite(x)]
    if losses:
        lines.append("**Loss per step:** " + " → ".join(f"{x:.3f}" for x in losses))
    return "\n\n".join(lines)


# -- the handlers ----------------------------------------------------------------------------


def _one_line(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _shown(content: str) -> str:
    return content if content.strip() else NO_ANSWER


def _error(message: str) -> str:
    return f"⚠️ **{message}**"


def _failure(message: str) -> dict:
    """An update that shows `message` in the status line (and, in the app, as a warning)."""
    return {"status": _error(message), "error": message}


class Handlers:
    """Everything the app does, as plain functions over one engine (one per process)."""

    def __init__(self, engine: Engine, data_dir: str | Path, *, allow_server_paths: bool = True,
                 sample_corpus: Path | None = SAMPLE_CORPUS, max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.engine = engine
        self.data_dir = Path(data_dir)
        self.uploads = self.data_dir / "uploads"
        self.allow_server_paths = allow_server_paths
        self.sample_corpus = sample_corpus if sample_corpus and Path(sample_corpus).is_dir() else None
        self.max_upload_bytes = max_upload_bytes
        self.base_adaptation = engine.adapter.settings

    @property
    def store(self) -> Store:
        return self.engine.store

    # -- owners and chats ------------------------------------------------------------------

    @staticmethod
    def new_owner() -> str:
        """A random private key for one browser: the owner of its chats."""
        return secrets.token_urlsafe(24)

    @staticmethod
    def valid_owner(owner) -> bool:
        return isinstance(owner, str) and len(owner) >= 16

    def chat_choices(self, owner: str) -> list[tuple[str, int]]:
        """(title, id) of the owner's chats, the most recently used first."""
        if not self.valid_owner(owner):
            return []
        return [(chat["title"], chat["id"]) for chat in self.store.chats(owner)]

    def own_chat(self, chat_id, owner) -> dict | None:
        """The chat if it exists and belongs to `owner`, else None."""
        if chat_id is None or not self.valid_owner(owner):
            return None
        try:
            chat = self.store.chat(int(chat_id))
        except (TypeError, ValueError):
            return None
        return chat if chat and chat["owner"] == owner else None

    def open_chat(self, chat_id, owner) -> dict:
        """{history, title, panel, chat_id, error}: the chat's messages and its last answer's panel."""
        chat = self.own_chat(chat_id, owner)
        if chat is None:
            return {"history": [], "title": "", "panel": None, "chat_id": None,
                    "error": "This chat does not exist (any more)." if chat_id is not None else ""}
        messages = self.store.messages(chat["id"])
        answers = [m for m in messages if m["role"] == "assistant"]
        return {"history": [{"role": m["role"], "content": _shown(m["content"]) if m["role"] == "assistant"
                             else m["content"]} for m in messages],
                "title": chat["title"], "chat_id": chat["id"], "error": "",
                "panel": self.answer_panel(answers[-1]) if answers else None}

    def answer_panel(self, message: dict) -> Panel | None:
        record = json.loads(message["record"]) if message.get("record") else None
        rows = self.store.selection_rows(message["id"])
        return Panel.from_stored(record, rows, self.store.passages(r["passage_id"] for r in rows))

    def message_panel(self, chat_id, owner, index: int) -> Panel | None:
        """The panel of the answer at position `index` of the chat (a clicked message); for a
        question, the answer that follows it."""
        chat = self.own_chat(chat_id, owner)
        if chat is None:
            return None
        messages = self.store.messages(chat["id"])
        for message in messages[max(int(index), 0):]:
            if message["role"] == "assistant":
                return self.answer_panel(message)
        return None

    def rename_chat(self, chat_id, title: str, owner) -> str:
        """'' when renamed, else why not."""
        title = _one_line(title or "", 80)
        if not title:
            return "Give the chat a title."
        if self.own_chat(chat_id, owner) is None:
            return "Open one of your chats first."
        self.store.rename_chat(int(chat_id), title)
        return ""

    def delete_chat(self, chat_id, owner) -> str:
        """'' when deleted, else why not."""
        if self.own_chat(chat_id, owner) is None:
            return "Open one of your chats first."
        self.store.delete_chat(int(chat_id))
        return ""

    # -- one message -----------------------------------------------------------------------

    def _checked(self, text, settings: dict, what: str) -> tuple[str, ChatSettings, AdaptationSettings]:
        """The stripped text and the parsed settings, or ValueError saying what to fix."""
        text = (text or "").strip()
        if not text:
            raise ValueError(f"The {what} is empty: type a question.")
        try:
            return text, *parse_settings(settings, self.base_adaptation)
        except ValueError as error:
            raise ValueError(f"Check the settings: {error}") from None

    def respond(self, message: str, chat_id, owner, settings: dict) -> Iterator[dict]:
        """Answer `message` in the chat (a new one when chat_id is None), yielding updates:
        history, status, message (the input box), chat_id, chats, panel, error, and owner when
        the browser had no key yet (a message sent before the page finished loading).

        The exchange is stored only when the answer is complete; on a failure the message goes
        back into the input box and the chat is as it was.
        """
        try:
            message, chat_settings, adaptation = self._checked(message, settings, "message")
        except ValueError as error:
            yield _failure(str(error))
            return
        new_owner = {} if self.valid_owner(owner) else {"owner": (owner := self.new_owner())}

        chat = self.own_chat(chat_id, owner)
        created = chat is None
        chat_id = chat["id"] if chat else self.store.create_chat(_one_line(message, 60), owner)
        history = [{"role": m["role"], "content": m["content"]} for m in self.store.messages(chat_id)]
        shown = [{"role": m["role"], "content": _shown(m["content"]) if m["role"] == "assistant" else m["content"]}
                 for m in history]
        answer, notes, panel, finished, current = "", [], None, False, "Starting…"

        def view(status: str | None = None, **more) -> dict:
            nonlocal current
            current = status or current
            return {"history": [*shown, {"role": "user", "content": message},
                                {"role": "assistant", "content": answer or "…"}],
                    "status": current + "".join(f"\n\n*Note: {n}*" for n in notes), **more}

        yield view("Starting…", message="", chat_id=chat_id, chats=self.chat_choices(owner), panel=None,
                   **new_owner)
        stream = None
        try:
            self.engine.configure(adaptation)
            stream = self.engine.respond(message, history, chat_settings, chat_id)
            for event in stream:
                if isinstance(event, Token):
                    answer += event.text
                    yield view("Generating the answer…")
                elif isinstance(event, Stage) and event.state == "started":
                    yield view(_stage_text(event.name, chat_settings))
                elif isinstance(event, Selected):
                    panel = Panel.from_selected(event)
                    yield view(f"Selected {len(panel.picks)} passages.", panel=panel)
                elif isinstance(event, Step):
                    panel.losses.append(event.loss)
                    yield view(f"Fine-tuning: step {event.index} of {event.total} · loss {event.loss:.3f}",
                               panel=panel)
                elif isinstance(event, Notice):
                    notes.append(event.message)
                    yield view()
                elif isinstance(event, Done):
                    finished = True
                    answer = event.answer
                    seconds = event.record.get("seconds", {})
                    if panel is not None:
                        panel.seconds = dict(seconds)
                    total = sum(v for k, v in seconds.items() if k != "first_token")
                    yield {**view(f"Answered in {total:.1f} s."), "history": [
                        *shown, {"role": "user", "content": message}, {"role": "assistant", "content": _shown(answer)}],
                        "panel": panel, "seconds": seconds, "chats": self.chat_choices(owner)}
        except Exception as error:  # the engine left the model at base and stored nothing
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if created:
                self._drop_if_empty(chat_id, owner)
            yield {**_failure(f"The answer failed: {reason}. Nothing was stored; your message is back in "
                              "the box to try again."),
                   "history": shown, "message": message, "panel": None,
                   "chat_id": None if created else chat_id, "chats": self.chat_choices(owner)}
        finally:
            if stream is not None:
                stream.close()
            if created and not finished:
                self._drop_if_empty(chat_id, owner)

    def _drop_if_empty(self, chat_id: int, owner: str) -> None:
        try:
            if self.own_chat(chat_id, owner) and not self.store.messages(chat_id):
                self.store.delete_chat(chat_id)
        except Exception:
            pass  # best effort: an empty chat left behind is harmless

    # -- compare ---------------------------------------------------------------------------

    def compare(self, prompt: str, settings: dict) -> Iterator[dict]:
        """NN and SIFT on one prompt: both selections (with the passages both picked), both σ²
        curves, then both answers, streamed. Nothing is stored. Yields updates: nn, sift (Panels),
        shared (passage ids), nn_answer, sift_answer, status, error."""
        try:
            prompt, chat_settings, adaptation = self._checked(prompt, settings, "prompt")
        except ValueError as error:
            yield _failure(str(error))
            return
        if self.store.passage_count() == 0:
            yield _failure("The corpus is empty: add documents in the Corpus tab first.")
            return
        if chat_settings.mode == "off":
            chat_settings = replace(chat_settings, mode="fine-tune")
        panels: dict[str, Panel] = {}
        answers = {"nn": "", "sift": ""}

        def view(status: str) -> dict:
            shared = panels["nn"].passage_ids & panels["sift"].passage_ids if len(panels) == 2 else set()
            return {"nn": panels.get("nn"), "sift": panels.get("sift"), "shared": shared,
                    "nn_answer": answers["nn"], "sift_answer": answers["sift"], "status": status}

        stream = None
        try:
            self.engine.configure(adaptation)
            with self.engine.lock:
                query = self.engine.embed(prompt)
                for method in ("nn", "sift"):
                    panels[method] = Panel.from_selected(self.engine.select(query, chat_settings, method))
            yield view("Selected both; now fine-tuning on the NN picks…")
            for method in ("nn", "sift"):
                label = METHOD_LABELS[method]
                stream = self.engine.respond(prompt, [], replace(chat_settings, method=method), None)
                for event in stream:
                    if isinstance(event, Token):
                        answers[method] += event.text
                        yield view(f"{label}: generating…")
                    elif isinstance(event, Selected):
                        panels[method] = Panel.from_selected(event)
                    elif isinstance(event, Step):
                        panels[method].losses.append(event.loss)
                        yield view(f"{label}: fine-tuning step {event.index} of {event.total} · loss {event.loss:.3f}")
                    elif isinstance(event, Done):
                        answers[method] = _shown(event.answer)
                        if method in panels:
                            panels[method].seconds = dict(event.record.get("seconds", {}))
                stream = None
            yield view("Done: ★ marks the passages both methods picked.")
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            yield {**view(""), **_failure(f"The comparison failed: {reason}")}
        finally:
            if stream is not None:
                stream.close()

    # -- the corpus ------------------------------------------------------------------------

    def corpus_summary(self) -> str:
        documents, passages = self.store.document_count(), self.store.passage_count()
        if not passages:
            return "**The corpus is empty.** Upload files below (or add the sample corpus) to chat with them."
        return (f"**{documents} documents, {passages} passages**, embedded with "
                f"`{self.store.embedder or self.engine.embedder_name}`.")

    def offers_sample(self) -> bool:
        return self.sample_corpus is not None and self.store.passage_count() == 0

    def documents(self) -> list[list]:
        """[name, folder, passages, size, added] for every document."""
        return [[Path(d["path"]).name, str(Path(d["path"]).parent), d["passage_count"],
                 _size(d["size"]), d["ingested_at"].replace("T", " ")] for d in self.store.documents()]

    def document_paths(self) -> list[str]:
        return [d["path"] for d in self.store.documents()]

    def ingest(self, uploads: list | None = None, folder: str | None = None,
               progress: Callable[[float, str], None] | None = None) -> dict:
        """Ingest uploaded files (copied into the data folder first) and a server folder or
        file. Returns {report, error}: a readable report of what was added, skipped and why."""
        uploads = [u for u in (uploads or []) if u]
        folder = (folder or "").strip()
        if not uploads and not folder:
            return _ingest_failure("Choose files to upload (or give a folder) first.")
        paths, skipped = [], []
        for upload in uploads:
            source = Path(getattr(upload, "name", upload))
            name = _safe_name(source.name)
            try:
                size = source.stat().st_size
                if size > self.max_upload_bytes:
                    skipped.append((name, f"too large ({size / 2**20:.1f} MiB > {self.max_upload_bytes / 2**20:.0f} MiB)"))
                    continue
                self.uploads.mkdir(parents=True, exist_ok=True)
                target = self.uploads / name
                shutil.copyfile(source, target)
                paths.append(target)
            except OSError as error:
                skipped.append((name, f"cannot read the upload: {error.strerror or error}"))
        if folder:
            if not self.allow_server_paths:
                return _ingest_failure("Ingesting folders on the server is turned off here: upload files instead.")
            path = Path(folder).expanduser()
            if not path.exists():
                return _ingest_failure(f"No such file or folder: {folder}")
            paths.append(path)
        return self._ingest(paths, skipped, progress)

    def add_sample(self, progress: Callable[[float, str], None] | None = None) -> dict:
        if self.sample_corpus is None:
            return _ingest_failure("The sample corpus is not here.")
        return self._ingest([self.sample_corpus], [], progress)

    def _ingest(self, paths: list[Path], skipped: list[tuple[str, str]], progress) -> dict:
        def on_progress(state) -> None:  # an IngestProgress: passages done, expected, time left
            if progress:
                progress(state.fraction, state.describe())

        if not paths:
            return {"report": _report(None, skipped), "error": "Nothing could be ingested."}
        try:
            if progress:
                progress(0.0, "reading files")
            report = ingest(self.store, self.engine.embedder, paths, embedder_name=self.engine.embedder_name,
                            progress=False, on_progress=on_progress)
        except Exception as error:  # each document is written in one transaction: nothing half-stored
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return _ingest_failure(f"The ingest failed: {reason}. Documents stored before are kept.")
        for path, _ in report.skipped:  # an unreadable upload is not kept
            if Path(path).parent == self.uploads.resolve():
                Path(path).unlink(missing_ok=True)
        nothing = report.ingested == 0 and not report.unchanged
        return {"report": _report(report, skipped), "error": "Nothing could be ingested." if nothing else ""}

    def remove_document(self, path: str | None) -> str:
        """A readable result of removing the document (its passages and vectors go with it)."""
        if not path:
            return _error("Choose a document to remove.")
        try:
            removed = self.store.remove([path])
        except StoreError as error:  # read-only, or another process kept the store locked
            return _error(str(error))
        if removed and Path(path).parent == self.uploads.resolve():
            Path(path).unlink(missing_ok=True)  # an uploaded copy goes with its document
        return f"Removed {Path(path).name}." if removed else _error(f"{Path(path).name} is not in the corpus.")


def _ingest_failure(message: str) -> dict:
    return {"report": _error(message), "error": message}


def _stage_text(name: str, settings: ChatSettings) -> str:
    return {"embed": "Reading your question…",
            "select": f"Selecting passages ({METHOD_LABELS.get(settings.method, settings.method)})…",
            "fine-tune": "Fine-tuning on the selected passages…",
            "generate": "Generating the answer…"}.get(name, f"{name}…")


def _safe_name(name: str) -> str:
    name = re.sub(r"[^\w.\- ]+", "_", Path(name).name).strip(" .") or "upload"
    return name[:120]


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"


def _report(report, skipped: list[tuple[str, str]]) -> str:
    lines = []
    if report is not None:
        lines.append(f"**Ingested:** {report.summary()}.")
        skipped = [*skipped, *report.skipped]
    if skipped:
        lines.append("**Skipped** (the rest went on):")
        lines += [f"- {html.escape(Path(path).name)}: {html.escape(reason)}" for path, reason in skipped]
    if report is None or (report.ingested == 0 and not report.unchanged):
        lines.insert(0, _error("Nothing could be ingested."))
    return "\n".join(lines)


# -- the layout --------------------------------------------------------------------------------

CSS = """
.sc-picks { display: flex; flex-direction: column; gap: 8px; }
.sc-caption { font-size: 0.85em; opacity: 0.75; }
.sc-pick { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 10px; }
.sc-head { font-size: 0.9em; }
.sc-reduction { font-weight: 600; color: var(--color-accent); }
.sc-source { font-family: var(--font-mono); }
.sc-badge { font-size: 0.75em; border-radius: 6px; padding: 1px 6px; margin-left: 4px;
            background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary); }
.sc-shared { background: #fde68a; color: #1f2937; }
.sc-bar { height: 4px; background: var(--background-fill-secondary); border-radius: 2px; margin: 4px 0; }
.sc-bar span { display: block; height: 4px; background: var(--color-accent); border-radius: 2px; }
.sc-text { font-size: 0.88em; white-space: pre-wrap; max-height: 9em; overflow: auto; }
.sc-empty { opacity: 0.7; padding: 8px; }
"""

HELP = {
    "method": "SIFT picks passages that each remove the most remaining uncertainty, skipping what "
              "an earlier pick already said. NN takes the most similar ones, duplicates included.",
    "mode": "Fine-tune: one LoRA step per passage, then answer. Context: put the passages in the "
            "prompt. Both (the best in the evaluation, with a longer prompt), or off (the base model).",
    "passages": "At most this many passages, one fine-tuning step each (0: none).",
    "lam": "SIFT's λ: small favours diverse passages, large the most similar ones (λ→∞ repeats the nearest, as NN-F).",
    "adaptive": "Stop selecting once another passage would remove little uncertainty.",
    "min_reduction": "…when a pick removes less than this share of the prompt's initial uncertainty.",
    "learning_rate": "Step size of each LoRA step: larger learns more from each passage, and risks more.",
    "lora_layers": "Fine-tune only the top L layers (faster steps); 0 = all layers.",
    "max_new_tokens": "The longest answer, in tokens.",
}


def build(handlers: Handlers, *, secret: str | None = None):
    """The Gradio Blocks: chats and settings in the sidebar; Chat, Compare and Corpus tabs."""
    h = handlers
    defaults = default_settings()
    skip = gr.skip

    with gr.Blocks(title="sift-chat", fill_height=True) as demo:
        owner = gr.BrowserState(None, storage_key="sift-chat-owner", secret=secret)
        chat_id = gr.State(None)

        with gr.Sidebar(label="Chats", open=True, width=300):
            new_chat = gr.Button("New chat", variant="primary", elem_id="new-chat")
            chat_list = gr.Radio(choices=[], label="Your chats", elem_id="chat-list")
            with gr.Accordion("Rename or delete this chat", open=False):
                title = gr.Textbox(label="Title", max_lines=1, elem_id="chat-title")
                with gr.Row():
                    rename = gr.Button("Rename", size="sm")
                    delete = gr.Button("Delete", size="sm", variant="stop")
            with gr.Accordion("Settings", open=False, elem_id="settings"):
                method = gr.Radio([("SIFT", "sift"), ("NN", "nn"), ("NN-F (repeats)", "nnf"), ("US", "us")],
                                  value=defaults["method"], label="Selection", info=HELP["method"])
                mode = gr.Radio([("Fine-tune", "fine-tune"), ("Context", "context"), ("Both", "both"),
                                 ("Off", "off")], value=defaults["mode"], label="Use the passages to",
                                info=HELP["mode"])
                passages = gr.Slider(0, 32, value=defaults["passages"], step=1, label="Passages",
                                     info=HELP["passages"])
                lam = gr.Number(value=defaults["lam"], label="λ", minimum=1e-6, info=HELP["lam"])
                adaptive = gr.Checkbox(value=defaults["adaptive"], label="Adaptive stopping", info=HELP["adaptive"])
                min_reduction = gr.Slider(0.001, 0.2, value=defaults["min_reduction"], step=0.001,
                                          label="Minimum reduction", info=HELP["min_reduction"])
                learning_rate = gr.Number(value=defaults["learning_rate"], label="Learning rate", minimum=0,
                                          info=HELP["learning_rate"])
                lora_layers = gr.Slider(0, h.engine.layer_count, value=defaults["lora_layers"], step=1,
                                        label="LoRA layers", info=HELP["lora_layers"])
                max_new_tokens = gr.Slider(16, 1024, value=defaults["max_new_tokens"], step=16,
                                           label="Maximum new tokens", info=HELP["max_new_tokens"])
        settings = [method, mode, passages, lam, adaptive, min_reduction, learning_rate, lora_layers, max_new_tokens]

        gr.Markdown("# sift-chat\nChat with your documents. For every message the model picks the passages "
                    "that most reduce its uncertainty about your question (SIFT), takes one fine-tuning "
                    "step on each, and answers; then it forgets them again.")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chatbot",
                                             feedback_options=None, buttons=["copy"])
                        status = gr.Markdown(elem_id="status")
                        with gr.Row():
                            message = gr.Textbox(placeholder="Ask about your documents…", show_label=False,
                                                 scale=6, max_lines=6, elem_id="message", autofocus=True)
                            send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                            stop = gr.Button("Stop", scale=1, min_width=80, elem_id="stop")
                    with gr.Column(scale=2, elem_id="panel"):
                        gr.Markdown("### What the model learned from\n<small>Click an answer to see its "
                                    "passages.</small>")
                        coverage = gr.Markdown(elem_id="coverage")
                        gr.Markdown("**σ² after each step**, beside NN's for the same prompt")
                        chart = gr.LinePlot(None, x="step", y="variance", color="method",
                                            x_title="step (0 = the prior)", y_title="σ² (uncertainty)", color_title="",
                                            y_lim=[0, 1.05], height=300, show_label=False,
                                            elem_id="variance-chart")
                        picked = gr.HTML(render_passages(None), elem_id="passages")
                        timings = gr.Markdown(elem_id="timings")

            with gr.Tab("Compare", id="compare"):
                gr.Markdown("One prompt, **NN** and **SIFT** side by side, with the settings from the sidebar. "
                            "★ marks a passage both picked. Nothing is stored.")
                with gr.Row():
                    compare_prompt = gr.Textbox(value=DEMO_QUESTION, show_label=False, scale=6,
                                                elem_id="compare-prompt")
                    compare_go = gr.Button("Compare", variant="primary", scale=1, elem_id="compare-go")
                compare_status = gr.Markdown(elem_id="compare-status")
                compare_chart = gr.LinePlot(None, x="step", y="variance", color="method",
                                            x_title="step (0 = the prior)", y_title="σ² (uncertainty)", color_title="",
                                            y_lim=[0, 1.05], height=300, show_label=False)
                with gr.Row(equal_height=False):
                    with gr.Column():
                        gr.Markdown("### Nearest neighbours (NN)")
                        nn_coverage = gr.Markdown()
                        nn_picks = gr.HTML(render_passages(None), elem_id="nn-passages")
                        nn_answer = gr.Markdown(label="NN answer", elem_id="nn-answer")
                    with gr.Column():
                        gr.Markdown("### SIFT")
                        sift_coverage = gr.Markdown()
                        sift_picks = gr.HTML(render_passages(None), elem_id="sift-passages")
                        sift_answer = gr.Markdown(label="SIFT answer", elem_id="sift-answer")

            with gr.Tab("Corpus", id="corpus"):
                corpus_summary = gr.Markdown(elem_id="corpus-summary")
                with gr.Row(visible=False) as sample_row:
                    gr.Markdown("New here? Add a small sample corpus: notes about Brindlemoor, an invented "
                                "harbour town, with some facts repeated in other words.")
                    add_sample = gr.Button("Add the sample corpus", variant="primary", elem_id="add-sample")
                uploads = gr.File(label="Upload files (text, Markdown, HTML, source code, PDF; "
                                  f"at most {MAX_UPLOAD_BYTES // 2**20} MiB each)",
                                  file_count="multiple", type="filepath", elem_id="uploads")
                folder = gr.Textbox(label="Or a folder or file on this machine", visible=h.allow_server_paths,
                                    placeholder="~/notes", max_lines=1, elem_id="folder")
                ingest_go = gr.Button("Ingest", variant="primary", elem_id="ingest")
                ingest_report = gr.Markdown(elem_id="ingest-report")
                documents = gr.Dataframe(headers=["document", "folder", "passages", "size", "added"],
                                         datatype=["str", "str", "number", "str", "str"], interactive=False,
                                         label="Documents", elem_id="documents")
                with gr.Row():
                    document = gr.Dropdown(choices=[], label="Document", scale=4)
                    remove = gr.Button("Remove from the corpus", variant="stop", scale=1)
                remove_report = gr.Markdown()

        panel_outputs = [coverage, chart, picked, timings]

        def show_panel(panel, note: str = "", seconds: dict | None = None):
            return [render_coverage(panel, note), render_variance(panel), render_passages(panel),
                    render_timings(panel, seconds)]

        def chats_update(owner_key, selected=None):
            return gr.update(choices=h.chat_choices(owner_key), value=selected)

        def corpus_view():
            paths = h.document_paths()
            return [h.corpus_summary(), gr.update(visible=h.offers_sample()), h.documents(),
                    gr.update(choices=paths, value=None)]

        corpus_outputs = [corpus_summary, sample_row, documents, document]

        # page load: this browser's key, its chats, the corpus
        def on_load(owner_key):
            if not h.valid_owner(owner_key):
                owner_key = h.new_owner()
            return [owner_key, chats_update(owner_key), *corpus_view()]

        demo.load(on_load, inputs=[owner], outputs=[owner, chat_list, *corpus_outputs])

        # chat
        def on_send(text, current, owner_key, *values):
            for update in h.respond(text, current, owner_key, dict(zip(SETTING_NAMES, values))):
                if update.get("error"):
                    gr.Warning(update["error"])
                panel = (show_panel(update["panel"], "", update.get("seconds")) if "panel" in update
                         else [skip()] * 4)
                yield [update.get("history", skip()), update.get("status", skip()), update.get("message", skip()),
                       update.get("chat_id", skip()), update.get("owner", skip()),
                       gr.update(choices=update["chats"], value=update.get("chat_id")) if "chats" in update else skip(),
                       *panel]

        chat_outputs = [chatbot, status, message, chat_id, owner, chat_list, *panel_outputs]
        sending = [send.click(on_send, [message, chat_id, owner, *settings], chat_outputs,
                              concurrency_id="model", concurrency_limit=1, show_progress_on=[chatbot]),
                   message.submit(on_send, [message, chat_id, owner, *settings], chat_outputs,
                                  concurrency_id="model", concurrency_limit=1, show_progress_on=[chatbot])]

        def on_stopped(current, owner_key):
            time.sleep(0.5)  # after the last streamed update of the cancelled message has landed
            current = current if h.own_chat(current, owner_key) else None  # a new chat is dropped unanswered
            return ["Stopped: the model is back at base and nothing of this message was stored.",
                    current, chats_update(owner_key, current)]

        stop.click(None, None, None, cancels=sending).then(on_stopped, [chat_id, owner], [status, chat_id, chat_list])

        def on_open(selected, owner_key):
            view = h.open_chat(selected, owner_key)
            if view["error"]:
                gr.Warning(view["error"])
            return [view["history"], view["chat_id"], view["title"], "", *show_panel(view["panel"])]

        chat_list.input(on_open, [chat_list, owner], [chatbot, chat_id, title, status, *panel_outputs])

        def on_new(owner_key):
            return [[], None, "", "", chats_update(owner_key), *show_panel(None)]

        new_chat.click(on_new, [owner], [chatbot, chat_id, title, status, chat_list, *panel_outputs])
        chatbot.clear(on_new, [owner], [chatbot, chat_id, title, status, chat_list, *panel_outputs])  # stays stored

        def on_rename(current, new_title, owner_key):
            problem = h.rename_chat(current, new_title, owner_key)
            if problem:
                gr.Warning(problem)
            return chats_update(owner_key, current)

        rename.click(on_rename, [chat_id, title, owner], [chat_list])

        def on_delete(current, owner_key):
            problem = h.delete_chat(current, owner_key)
            if problem:
                gr.Warning(problem)
                return [skip(), skip(), skip(), skip(), chats_update(owner_key, current), *[skip()] * 4]
            return on_new(owner_key)

        delete.click(on_delete, [chat_id, owner], [chatbot, chat_id, title, status, chat_list, *panel_outputs])

        def on_pick_message(current, owner_key, event: gr.SelectData):
            index = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
            return show_panel(h.message_panel(current, owner_key, int(index or 0)),
                              "No passages were used for this answer.")

        chatbot.select(on_pick_message, [chat_id, owner], panel_outputs)

        # compare
        def on_compare(prompt, *values):
            for update in h.compare(prompt, dict(zip(SETTING_NAMES, values))):
                if update.get("error"):
                    gr.Warning(update["error"])
                nn, sift, shared = update.get("nn"), update.get("sift"), update.get("shared", set())
                yield [update.get("status", ""), render_variance(sift, nn),
                       render_coverage(nn, " "), render_passages(nn, shared), update.get("nn_answer", ""),
                       render_coverage(sift, " "), render_passages(sift, shared), update.get("sift_answer", "")]

        compare_go.click(on_compare, [compare_prompt, *settings],
                         [compare_status, compare_chart, nn_coverage, nn_picks, nn_answer,
                          sift_coverage, sift_picks, sift_answer],
                         concurrency_id="model", concurrency_limit=1, show_progress_on=[compare_status])

        # corpus
        def on_ingest(files, path, progress=gr.Progress()):
            result = h.ingest(files, path, lambda fraction, text: progress(fraction, desc=text))
            if result["error"]:
                gr.Warning(result["error"])
            return [result["report"], None, *corpus_view()]

        ingest_go.click(on_ingest, [uploads, folder], [ingest_report, uploads, *corpus_outputs],
                        concurrency_id="model", concurrency_limit=1)

        def on_sample(progress=gr.Progress()):
            result = h.add_sample(lambda fraction, text: progress(fraction, desc=text))
            return [result["report"], *corpus_view()]

        add_sample.click(on_sample, None, [ingest_report, *corpus_outputs],
                         concurrency_id="model", concurrency_limit=1)

        def on_remove(path):
            return [h.remove_document(path), *corpus_view()]

        remove.click(on_remove, [document], [remove_report, *corpus_outputs])

    demo.queue(default_concurrency_limit=4, max_size=64)
    return demo


# -- loading and serving -----------------------------------------------------------------------


def app_secret(data_dir: Path) -> str:
    """The key that encrypts each browser's private chat key in its localStorage: kept in the data
    folder, so a browser keeps its chats across restarts."""
    path = data_dir / "app-secret"
    try:
        secret = path.read_text().strip()
        if len(secret) >= 16:
            return secret
    except OSError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    path.write_text(secret)
    path.chmod(0o600)
    return secret


def create_app(data_dir: str | Path | None = None, *, embedder: str | None = None, chat_model: str | None = None,
               device: str | None = None, allow_server_paths: bool = True):
    """Load the models and the store, and build the app (not yet serving)."""
    home = config.data_dir(data_dir)
    engine = Engine.load(home, embedder=embedder, chat_model=chat_model, device=device)
    handlers = Handlers(engine, home, allow_server_paths=allow_server_paths)
    return build(handlers, secret=app_secret(home))


def launch(demo, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs):
    """Serve the app (blocks until stopped unless prevent_thread_lock=True)."""
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "SFMono-Regular", "monospace"])  # no web fonts: offline
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD_BYTES,
                       show_error=True, theme=theme, css=CSS, **kwargs)
