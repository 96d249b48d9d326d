"""The app: a shell over the application layer (`sift_chat.service`); its Gradio layout is in
`sift_chat.layout`.

    Handlers   plain functions (methods) that take and return plain values: strings, lists, dicts,
               `Panel`s. They render what the Service does; no chat, selection or training logic
               lives here. Tested as they are (tests/test_ui.py).
    render_*   turn a `Panel` (one answer's selection) into what the side panel shows.

Every handler takes the caller (`access.Caller`), which the layout gets from the server's side of
the request (the sign-in), never from a value the browser sends: a user never lists, opens,
renames or deletes another's chats, nor sees or removes another's documents. Chat, compare and
ingest share one queue slot ("model"), and messages wait in the Service's line for the model with
the API's requests: one adaptation at a time per loaded model, and a waiting user sees their
place. Stop is the Service's stop switch for the caller's message, not a cancelled request: the
message ends where it is, and reports whether anything was stored.
"""

from __future__ import annotations

import html
import math
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator

from .access import SHARED, Caller
from .adaptation import AdaptationSettings
from .corpus import IngestProgress
from .document_view import DocumentView, NotReadable
from .engine import ChatSettings, Engine, Notice, Prompted, Selected, Stage, Step, Token
from .panel import Panel, parse_settings, shown_name
from .reading import shown as printable_path
from .service import Answered, IngestOutcome, Service, Stopped, Stored, Waiting, first_line
from .store import Store
from .turns import Busy, Turn
from .vocabulary import METHOD_LABELS

DEMO_QUESTION = "Who founded Brindlemoor and who keeps the lighthouse?"
NO_ANSWER = "*(no answer: the model stopped at once)*"
# The answer reaches the page at most this often while it is written (seconds; 0: every token).
# Each update re-renders the chat in the browser, on the cores that decode (README: One message).
STREAM_SECONDS = 0.5
ENV_STREAM_SECONDS = "SIFT_CHAT_STREAM_SECONDS"


def stream_seconds_from_env() -> float:
    """$SIFT_CHAT_STREAM_SECONDS, else STREAM_SECONDS; ValueError saying what to fix."""
    value = os.environ.get(ENV_STREAM_SECONDS, "").strip()
    try:
        seconds = float(value) if value else STREAM_SECONDS
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 60:
        raise ValueError(f"${ENV_STREAM_SECONDS} must be a number of seconds in [0, 60], got {value!r}")
    return seconds


class Throttle:
    """Time-based chunking of a stream: `due()` is True at most once per `seconds` (the first call
    at once), so the tokens between two updates travel together."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.last: float | None = None

    def due(self) -> bool:
        now = self.clock()
        if self.last is not None and now - self.last < self.seconds:
            return False
        self.last = now
        return True


# -- one answer's selection, as the side panel shows it ---------------------------------------


def coverage_verdict(prior: float, final: float) -> str:
    """How much the documents say about a prompt, from the σ² their passages leave (rough bands)."""
    share = final / prior if prior > 0 else 1.0
    if share <= 0.5:
        return "a lot"
    if share <= 0.8:
        return "something"
    return "little"


def render_coverage(panel: Panel | None, note: str = "") -> str:
    if panel is None:
        return note or "No passages were used for this answer."
    if not panel.picks:
        return f"No passage was selected ({panel.stop_reason}): the answer comes from the base model."
    prior, final = panel.prior_variance, panel.final_variance
    removed = 1 - final / prior if prior > 0 else 0.0
    nn = (f" NN's {len(panel.nn_variance)} nearest passages would leave σ² {panel.nn_variance[-1]:.2f}."
          if panel.nn_variance and panel.method != "nn" else "")
    return (f"**What your documents say about this question: {coverage_verdict(prior, final)}**. "
            f"σ² {prior:.2f} → {final:.2f} after {len(panel.picks)} {METHOD_LABELS.get(panel.method, panel.method)} "
            f"picks: {removed:.0%} of the uncertainty removed.{nn}\n\n"
            "<small>σ² is the uncertainty about your question that the chosen passages leave: 1 when your "
            "documents say nothing related, lower the more they say. It describes your documents, not the "
            "answer: check the answer against the passages it cites.</small>")


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


def _usage(panel: Panel) -> str:
    """What the model did with the passages, in the words of the panel's caption."""
    read = "passage [1]" if len(panel.read) == 1 else f"passages [1]–[{len(panel.read)}]"
    steps = sum(1 for x in panel.losses if isinstance(x, (int, float)) and math.isfinite(x))
    taught = len(panel.only_learned)
    not_read = f" that {read} does not" if panel.read else ""
    taught = f" {taught} of them hold words of the answer{not_read}: what the steps put into it." if taught else ""
    passes = len(panel.losses) // len(panel.picks) if panel.picks else 1
    each = "one fine-tuning step each" if passes <= 1 else f"{passes} fine-tuning steps each, pass after pass"
    if panel.learned and panel.read:
        return (f"The model read {read} in its prompt and learned from {len(panel.picks)} "
                f"({each}, in this order).{taught}")
    if panel.learned:
        return (f"The model learned from these {len(panel.picks)} passages ({each}, in "
                f"this order{'' if steps else '; the steps are still to come'}); it did not read them in its prompt."
                f"{taught}")
    if panel.read:
        return f"The model read {read} in its prompt; it learned from none ({panel.mode} mode takes no fine-tuning step)."
    return "Selected passages (the model has not used them yet)."


def render_passages(panel: Panel | None, shared: set[int] | frozenset = frozenset()) -> str:
    """The picks as cards: their citation number, step, uncertainty reduction (with a bar), σ²
    after, similarity, loss of the step, source document and characters, the passage text; what
    the model did with each (read, learned from, cited). Repeats and passages picked by both
    methods (in a comparison) are marked."""
    if panel is None or not panel.picks:
        return "<div class='sc-empty'>No passages yet: ask a question.</div>"
    numbers, read, cards = panel.numbers, set(panel.read), []
    for pick in panel.picks:
        step, number = pick["step"], numbers[pick["passage_id"]]
        loss = panel.losses[step - 1] if step <= len(panel.losses) else None
        share = pick["uncertainty_reduction"] / panel.prior_variance if panel.prior_variance > 0 else 0
        badges = "".join(f"<span class='sc-badge {cls}'>{label}</span>" for label, cls, on in (
            ("cited", "sc-cited", number in panel.citations and not pick["repeat"]),
            ("read", "sc-read", pick["passage_id"] in read and not pick["repeat"]),
            ("learned from", "sc-learned", panel.learned),
            ("repeat", "", pick["repeat"]),
            ("★ both", "sc-shared", pick["passage_id"] in shared)) if on)
        taught = panel.only_learned.get(pick["passage_id"]) if not pick["repeat"] else None
        if taught:  # the answer says what only this learned passage says: the steps put it there
            badges += (f"<span class='sc-badge sc-taught' title='words of the answer that no passage read holds'>"
                       f"answer words only here: {html.escape(', '.join(taught))}</span>")
        text = " ".join(pick["text"].split())
        text = text if len(text) <= 700 else text[:699] + "…"
        loss_text = f" · loss {loss:.3f}" if isinstance(loss, (int, float)) and math.isfinite(loss) else ""
        where = _where(pick)
        cards.append(
            f"<div class='sc-pick' data-passage='{pick['passage_id']}' data-number='{number}'{_opens(pick)}>"
            f"<div class='sc-head'><b>[{number}]</b> step {step} · "
            f"<span class='sc-reduction'>−{pick['uncertainty_reduction']:.3f} σ²</span> "
            f"→ {pick['posterior_variance']:.3f} · similarity {pick['similarity']:.2f}{loss_text} · "
            f"<span class='sc-source' title='{html.escape(pick['path'], quote=True)}{where}'>"
            f"{html.escape(Path(pick['path']).name)}{where}</span> {badges}</div>"
            f"<div class='sc-bar'><span style='width:{max(0.0, min(share, 1.0)) * 100:.1f}%'></span></div>"
            f"<div class='sc-text'>{html.escape(text)}</div></div>")
    if panel.lead is not None and not panel.lead_picked:  # read first, though the method did not pick it
        lead, where = panel.lead, _where(panel.lead)
        badges = "".join(f"<span class='sc-badge {cls}'>{label}</span>" for label, cls, on in (
            ("cited", "sc-cited", 1 in panel.citations), ("read", "sc-read", lead["passage_id"] in read)) if on)
        text = " ".join(lead["text"].split())
        text = text if len(text) <= 700 else text[:699] + "…"
        cards.insert(0,
            f"<div class='sc-pick sc-lead' data-passage='{lead['passage_id']}' data-number='1'{_opens(lead)}>"
            f"<div class='sc-head'><b>[1]</b> the pre-selection's best match (by words and meaning), not picked "
            f"by {html.escape(panel.method)} · <span class='sc-source' title='{html.escape(lead['path'], quote=True)}"
            f"{where}'>{html.escape(Path(lead['path']).name)}{where}</span> {badges}</div>"
            f"<div class='sc-text'>{html.escape(text)}</div></div>")
    header = (f"<div class='sc-caption'>{html.escape(_usage(panel))} [n] is how the answer cites a passage; "
              f"−x σ² is how much uncertainty each removed (selection stopped: {html.escape(panel.stop_reason)}).</div>")
    return f"<div class='sc-picks'>{header}{''.join(cards)}</div>"


def _where(passage: dict) -> str:
    return f":{passage['start_char']}–{passage['end_char']}" if passage.get("start_char") is not None else ""


def what_differed(nn: Panel, sift: Panel, nn_answer: str, sift_answer: str) -> str:
    """One line on what a comparison changed: the picks only one method made, the σ² each left,
    the mean loss of each method's steps (a high loss: the passage was new to the model) and
    whether the answers differ."""
    only_sift = [p for p in sift.distinct_picks if p["passage_id"] not in nn.passage_ids]
    only_nn = [p for p in nn.distinct_picks if p["passage_id"] not in sift.passage_ids]
    picks = ("They picked the same passages." if not only_sift and not only_nn else
             f"SIFT picked {len(only_sift)} passage{'s' * (len(only_sift) != 1)} NN did not "
             f"({', '.join(Path(p['path']).name for p in only_sift[:3])}{', …' if len(only_sift) > 3 else ''}), "
             f"NN {len(only_nn)} SIFT did not.")
    variance = f"σ² left: NN {nn.final_variance:.2f}, SIFT {sift.final_variance:.2f}."

    def mean_loss(panel: Panel) -> float | None:
        losses = [x for x in panel.losses if isinstance(x, (int, float)) and math.isfinite(x)]
        return sum(losses) / len(losses) if losses else None

    losses = (f" Mean step loss: NN {mean_loss(nn):.2f}, SIFT {mean_loss(sift):.2f}."
              if mean_loss(nn) is not None and mean_loss(sift) is not None else "")
    same = " ".join(nn_answer.split()) == " ".join(sift_answer.split())
    return f"{picks} {variance}{losses} {'The answers are the same.' if same else 'The answers differ.'}"


def _listed(document: dict, caller: Caller) -> list:
    """A document's row in the documents table: [name, collection, passages, size, added]."""
    return [_document_name(document), _collection(document["owner"], caller), document["passage_count"],
            _size(document["size"]), document["ingested_at"].replace("T", " ")]


def _document_name(document: dict) -> str:
    """As the user named it (the upload's name, the path in the folder ingested), else the file's."""
    return document.get("name") or Path(document["path"]).name


def _cells(row) -> list[str]:
    """A table row compared as the page sends it back: numbers as numbers (3 and 3.0 alike)."""
    def cell(value) -> str:
        try:
            return repr(float(value))
        except (TypeError, ValueError):
            return str(value)
    return [cell(value) for value in row]


def _opens(passage: dict) -> str:
    """The attributes that make a card open its passage's document in the pane (a click, or Enter
    or Space once focused: the layout's page script); none for a removed document's passage."""
    if passage.get("start_char") is None:
        return ""
    return _opening(int(passage["passage_id"]))


def _opening(passage_id: int) -> str:
    return f" data-open-passage='{passage_id}' tabindex='0' role='button' title='Open the document at this passage'"


# -- citations, and the document they open ---------------------------------------------------

CITATION_MARK = re.compile(r"\[(\d+)\](?!\()")  # [n], not already a link's text


def link_citations(answer: str, passage_ids: list[int]) -> str:
    """The answer (Markdown) with each marker [n] a link to passage n of `passage_ids` (the
    answer's numbered passages, `Panel.numbered`): `#sc-passage-<id>`, which the page opens in the
    document pane. A marker without a passage stays as it is."""
    def linked(match: re.Match) -> str:
        n = int(match.group(1))
        return f"[[{n}]](#sc-passage-{int(passage_ids[n - 1])})" if 1 <= n <= len(passage_ids) else match.group(0)

    return CITATION_MARK.sub(linked, answer)


def render_document(view: DocumentView, collection: str, number: int | None = None) -> str:
    """The document pane: the document's name, its collection and where the passage is, then its
    stored text (HTML-escaped: a document never becomes markup) with the passage in a <mark> the
    pane scrolls to."""
    before, passage, after = (html.escape(part) for part in view.parts())
    if view.passage_id is not None:
        cited = f"passage [{number}]" if number else "the passage"
        where = f"{cited}: characters {view.passage_start}–{view.passage_end} of {view.length}"
    else:
        where = f"{view.length} characters"
    if view.start > 0 or view.end < view.length:
        where += f" (characters {view.start}–{view.end} shown)"
    marked = f"<mark id='sc-doc-passage' class='sc-doc-passage'>{passage}</mark>" if passage else ""
    text = f"{'…' if view.start > 0 else ''}{before}{marked}{after}{'…' if view.end < view.length else ''}"
    name = html.escape(view.name)
    return (f"<div class='sc-doc-backdrop'><div class='sc-doc' role='dialog' aria-modal='true' aria-label='{name}' "
            f"data-document='{view.document_id}'><div class='sc-doc-head'><div><b class='sc-doc-name'>{name}</b> · "
            f"{html.escape(collection)}<br><small>{html.escape(where)}</small></div>"
            f"<button type='button' class='sc-doc-close' aria-label='Close the document'>Close ✕</button></div>"
            f"<div class='sc-doc-text'>{text}</div></div></div>")


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


def _error(message: str) -> str:
    return f"⚠️ **{message}**"


def _failure(message: str) -> dict:
    """An update that shows `message` in the status line (and, in the app, as a warning)."""
    return {"status": _error(message), "error": message}


class Handlers:
    """What the app shows, as plain functions over the application layer (one per process).

    Every handler takes the caller and plain values, and returns plain values (strings, lists,
    dicts, `Panel`s); the work, and the checks of who may do what, are the Service's.
    """

    def __init__(self, service: Service, stream_seconds: float | None = None):
        self.service = service
        # the answer's updates while it is written: at most one per this many seconds
        self.stream_seconds = stream_seconds_from_env() if stream_seconds is None else stream_seconds
        self.clock = time.monotonic  # what the chunking of a stream reads the time from

    @property
    def engine(self) -> Engine:
        return self.service.engine

    @property
    def store(self) -> Store:
        return self.service.store

    @property
    def base_adaptation(self) -> AdaptationSettings:
        return self.service.base_adaptation

    # -- chats -----------------------------------------------------------------------------

    def chat_choices(self, caller: Caller) -> list[tuple[str, int]]:
        """(title, id) of the caller's chats, the most recently used first."""
        return self.service.chats(caller)

    def own_chat(self, chat_id, caller: Caller) -> dict | None:
        return self.service.own_chat(chat_id, caller)

    def open_chat(self, chat_id, caller: Caller) -> dict:
        """{history, title, panel, chat_id, error}: the chat's messages and its last answer's panel."""
        view = self.service.open_chat(chat_id, caller)
        if view is None:
            return {"history": [], "title": "", "panel": None, "chat_id": None,
                    "error": "This chat does not exist (any more)." if chat_id is not None else ""}
        return {"history": _history(view.messages), "title": view.title, "chat_id": view.chat_id, "error": "",
                "panel": view.panel}

    def message_panel(self, chat_id, caller: Caller, index: int) -> Panel | None:
        """The panel of the answer at position `index` of the chat (a clicked message)."""
        return self.service.message_panel(chat_id, caller, index)

    def rename_chat(self, chat_id, title: str, caller: Caller) -> str:
        """'' when renamed, else why not."""
        return self.service.rename_chat(chat_id, title, caller)

    def delete_chat(self, chat_id, caller: Caller) -> str:
        """'' when deleted, else why not."""
        return self.service.delete_chat(chat_id, caller)

    # -- one message -----------------------------------------------------------------------

    def _checked(self, text, settings: dict, what: str) -> tuple[str, ChatSettings, AdaptationSettings]:
        """The stripped text and the parsed settings, or ValueError saying what to fix."""
        text = (text or "").strip()
        if not text:
            raise ValueError(f"The {what} is empty: type a question.")
        try:
            return text, *parse_settings(settings, self.base_adaptation, layers=self.engine.layer_count)
        except ValueError as error:
            raise ValueError(f"Check the settings: {error}") from None

    def new_turn(self, caller: Caller) -> Turn:
        """A ticket for the message about to be sent: Stop works from now on, even while it waits."""
        return self.service.new_turn(caller.key)

    def stop(self, caller: Caller) -> str:
        """Stop the caller's message; the status line for the click (the message itself then
        reports where it stopped)."""
        stopped, kept = self.service.stop(caller.key)
        if stopped:
            return "Stopping…"
        if kept is not None and kept.chat_id is None:
            return "Too late to stop: the answer was complete (not recorded: the store is read-only)."
        if kept is not None:
            return "Too late to stop: the answer was complete, and it is stored."
        return "Nothing to stop."

    def respond(self, message: str, chat_id, caller: Caller, settings: dict, turn: Turn | None = None) -> Iterator[dict]:
        """Answer `message` in the caller's chat (a new one when chat_id is None), yielding
        updates: history, status, message (the input box), chat_id, chats, panel, error.

        The exchange is stored only when the answer is complete and was not stopped (and never a
        visitor's); a new chat is created with it. On a failure or a stop the message goes back
        into the input box and the chat is as it was.
        """
        try:
            message, chat_settings, adaptation = self._checked(message, settings, "message")
        except ValueError as error:
            if turn is not None:
                self.service.queue.leave(turn)  # the ticket is spent: Stop has nothing to stop
            yield _failure(str(error))
            return
        try:
            turn = turn if turn is not None and turn.owner in (caller.key, None) else self.service.new_turn(caller.key)
        except Busy as error:  # one message at a time per user
            yield _failure(str(error))
            return
        turn.owner = caller.key

        chat = self.own_chat(chat_id, caller)
        chat_id = chat["id"] if chat else None
        shown = _history(self.service.chat_messages(chat)) if chat else []
        answer, notes, panel, current, sent = "", [], None, "Starting…", None
        throttle = Throttle(self.stream_seconds, self.clock)

        def view(status: str | None = None, **more) -> dict:
            """The chat with the answer so far; the status line only when it changed (an unchanged
            component is not sent, so the page does not re-render it)."""
            nonlocal current, sent
            current = status or current
            line = current + "".join(f"\n\n*Note: {n}*" for n in notes)
            update = {"history": [*shown, {"role": "user", "content": message},
                                  {"role": "assistant", "content": answer or "…"}], **more}
            if line != sent:
                update["status"] = sent = line
            return update

        def undone(status: str, **more) -> dict:  # the chat as it was, the message back in the box
            return {"history": shown, "status": status, "message": message, "panel": None, "chat_id": chat_id,
                    "chats": self.chat_choices(caller), **more}

        yield view("Starting…", message="", chat_id=chat_id, panel=None)
        try:
            for event in self.service.chat_turn(turn, message, chat_id, caller, chat_settings, adaptation):
                if isinstance(event, Token):  # in chunks: the next event or update carries the rest
                    answer += event.text
                    if throttle.due():
                        yield view("Generating the answer…")
                elif isinstance(event, Waiting):
                    yield view(f"Waiting for the model: {event.ahead} ahead of yours…")
                elif isinstance(event, Stage) and event.state == "started":
                    yield view(_stage_text(event.name, chat_settings))
                elif isinstance(event, Selected):
                    panel = Panel.from_selected(event, chat_settings.mode)
                    yield view(f"Selected {len(panel.picks)} passages.", panel=panel)
                elif isinstance(event, Prompted) and panel is not None:
                    panel.read = [p.id for p in event.passages]
                elif isinstance(event, Step):
                    panel.losses.append(event.loss)
                    yield view(f"Fine-tuning: step {event.index} of {event.total} · loss {event.loss:.3f}",
                               panel=panel)
                elif isinstance(event, Notice):
                    notes.append(event.message)
                    yield view()
                elif isinstance(event, Answered):
                    answer, panel = event.answer, event.panel
                elif isinstance(event, Stored):
                    seconds = dict(panel.seconds) if panel else {}
                    total = sum(v for k, v in seconds.items() if k != "first_token")
                    recorded = ("" if event.chat_id is not None else " Not kept: sign in to keep your chats."
                                if not caller.signed_in else " Not recorded: the store is read-only.")
                    yield {**view(f"Answered in {total:.1f} s.{recorded}"), "history": [
                        *shown, {"role": "user", "content": message},
                        {"role": "assistant", "content": _answer_shown(answer, _ids(panel))}],
                        "panel": panel, "seconds": seconds, "chat_id": event.chat_id,
                        "chats": self.chat_choices(caller)}
                elif isinstance(event, Stopped):
                    yield undone(f"Stopped {event.where}: the model is back at base and nothing of this "
                                 "message was stored; it is back in the box.")
        except Exception as error:  # the engine left the model at base and stored nothing
            yield {**undone(""), **_failure(f"The answer failed: {first_line(error)}. Nothing was stored; "
                                            "your message is back in the box to try again.")}

    # -- compare ---------------------------------------------------------------------------

    def compare(self, prompt: str, settings: dict, caller: Caller) -> Iterator[dict]:
        """NN and SIFT on one prompt: both selections (with the passages both picked), both σ²
        curves, then both answers, streamed. Nothing is stored. Yields updates: nn, sift (Panels),
        shared (passage ids), nn_answer, sift_answer, status, error."""
        try:
            prompt, chat_settings, adaptation = self._checked(prompt, settings, "prompt")
        except ValueError as error:
            yield _failure(str(error))
            return
        if self.store.passage_count(caller.readable) == 0:
            yield _failure("The corpus is empty: add documents in the Corpus tab first.")
            return
        panels: dict[str, Panel] = {}
        answers = {"nn": "", "sift": ""}
        written = dict(answers)  # as the model wrote them, without the citations' links
        throttle = Throttle(self.stream_seconds, self.clock)

        def view(status: str, with_panels: bool = True) -> dict:
            """Both answers so far and the status; the panels too unless only the answers moved."""
            update = {"nn_answer": answers["nn"], "sift_answer": answers["sift"], "status": status}
            if with_panels:
                shared = panels["nn"].passage_ids & panels["sift"].passage_ids if len(panels) == 2 else set()
                update |= {"nn": panels.get("nn"), "sift": panels.get("sift"), "shared": shared}
            return update

        mode = self.service.compared(chat_settings).mode
        try:
            turn = self.service.new_turn(caller.key)
        except Busy as error:
            yield _failure(str(error))
            return
        try:
            for method, event in self.service.compare(turn, prompt, chat_settings, adaptation, caller=caller):
                label = METHOD_LABELS.get(method, method)
                if isinstance(event, Selected):
                    panels[method] = Panel.from_selected(event, mode)
                    if len(panels) == 2:
                        yield view("Selected both; now fine-tuning on the NN picks…")
                elif isinstance(event, Waiting):
                    yield view(f"Waiting for the model: {event.ahead} ahead of yours…")
                elif isinstance(event, Token):  # in chunks, as in respond
                    answers[method] += event.text
                    if throttle.due():
                        yield view(f"{label}: generating…", with_panels=False)
                elif isinstance(event, Prompted) and method in panels:
                    panels[method].read = [p.id for p in event.passages]
                elif isinstance(event, Step):
                    panels[method].losses.append(event.loss)
                    yield view(f"{label}: fine-tuning step {event.index} of {event.total} · loss {event.loss:.3f}")
                elif isinstance(event, Answered):
                    if event.panel is not None:
                        panels[method] = event.panel
                    answers[method] = _answer_shown(event.answer, _ids(panels.get(method)))
                    written[method] = event.answer
                elif isinstance(event, Stopped):
                    yield view(f"Stopped {event.where}.")
                    return
            yield view("Done: ★ marks the passages both methods picked. "
                       + what_differed(panels["nn"], panels["sift"], written["nn"], written["sift"]))
        except Exception as error:
            yield {**view(""), **_failure(f"The comparison failed: {first_line(error)}")}

    # -- the corpus ------------------------------------------------------------------------

    def corpus_summary(self, caller: Caller) -> str:
        documents = self.service.documents(caller)
        passages = sum(d["passage_count"] for d in documents)
        if not passages:
            return "**The corpus is empty.** Upload files below (or add the sample corpus) to chat with them."
        own = sum(d["owner"] != SHARED for d in documents)
        mine = f" ({own} of them yours, the rest the shared library)" if caller.owner not in (None, SHARED) else ""
        return (f"**{len(documents)} documents{mine}, {passages} passages**, embedded with "
                f"`{self.store.embedder or self.engine.embedder_name}`.")

    def search(self, text: str, caller: Caller) -> str:
        """The passages a chat message with these words would read first, as cards (HTML)."""
        try:
            result = self.service.search(text, caller)
        except ValueError as error:
            return _error(str(error))
        if not result.passages:
            return "<div class='sc-empty'>Nothing found: the corpus you read is empty.</div>"
        words = ", ".join(result.terms) or "none (only meaning)"
        cards = []
        for rank, (passage, similarity) in enumerate(zip(result.passages, result.similarities), 1):
            text = " ".join(passage.text.split())
            text = text if len(text) <= 500 else text[:499] + "…"
            where = f":{passage.start_char}–{passage.end_char}"
            cards.append(
                f"<div class='sc-pick' data-passage='{passage.id}'{_opening(passage.id)}><div class='sc-head'><b>{rank}.</b> "
                f"similarity {similarity:.2f} · <span class='sc-source' title='{html.escape(shown_name(passage), quote=True)}"
                f"{where}'>{html.escape(shown_name(passage))}{where}</span></div>"  # never the server's path
                f"<div class='sc-text'>{html.escape(text)}</div></div>")
        caption = (f"<div class='sc-caption'>The passages a chat message saying this would pre-select first, "
                   f"by meaning and by its rarest words (searched: {html.escape(words)}).</div>")
        return f"<div class='sc-picks'>{caption}{''.join(cards)}</div>"

    def open_document(self, passage_id, caller: Caller, document_id=None, number=None) -> str:
        """The document pane (HTML) for a passage (a citation [n] or a pick: `number` is how the
        answer cites it) or a document; `document_view.NotReadable` (one line) when it is not the
        caller's own or the shared library's, or does not exist."""
        view = self.service.read_document(caller, passage_id, document_id)
        number = number if isinstance(number, int) and not isinstance(number, bool) and 0 < number < 1000 else None
        return render_document(view, _collection(view.owner, caller), number)

    def offers_sample(self) -> bool:
        return self.service.offers_sample()

    def documents(self, caller: Caller) -> list[list]:
        """[name, collection, passages, size, added] for every document the caller reads."""
        return [_listed(d, caller) for d in self.service.documents(caller)]

    def open_listed_document(self, row, caller: Caller) -> str:
        """The document pane for a row of the documents table as the page shows it (`documents`;
        sorted or not): the caller's document listed so, from its beginning; `NotReadable` when
        none is (removed since, or a row the page never showed)."""
        shown = _cells(row) if isinstance(row, (list, tuple)) else None
        for document in self.service.documents(caller) if shown else []:
            if _cells(_listed(document, caller)) == shown:
                return self.open_document(None, caller, document_id=document["id"])
        raise NotReadable("That document is no longer in the corpus: refresh the list.")

    def removable(self, caller: Caller) -> list[tuple[str, int]]:
        """(name and collection, id) of the documents the caller may remove."""
        return [(f"{_document_name(d)} ({_collection(d['owner'], caller)})", d["id"])
                for d in self.service.documents(caller) if caller.may_change(d["owner"])]

    def ingest(self, uploads: list | None = None, folder: str | None = None,
               progress: Callable[[float, str], None] | None = None, *, caller: Caller, shared: bool = False) -> dict:
        """Ingest uploaded files and a server folder or file, into the caller's documents (or, for
        an admin, the shared library). Returns {report, error}: what was added, skipped and why."""
        return _ingest_view(self.service.ingest(uploads, folder, _progress(progress), caller=caller,
                                                shared=bool(shared)))

    def add_sample(self, progress: Callable[[float, str], None] | None = None, *, caller: Caller) -> dict:
        return _ingest_view(self.service.add_sample(_progress(progress), caller=caller))

    def remove_document(self, document_id, caller: Caller) -> str:
        """A readable result of removing the document (its passages and vectors go with it)."""
        if document_id is None:
            return _error("Choose a document to remove.")
        try:
            document = self.store.document_by_id(int(document_id))
        except (TypeError, ValueError, OverflowError):
            document = None
        problem = self.service.remove_document(document_id, caller)
        return _error(problem) if problem else f"Removed {Path(document['path']).name}."

    # -- synced folders --------------------------------------------------------------------

    def may_sync(self, caller: Caller) -> bool:
        return not self.service.sync_refusal(caller)

    def synced_folders(self, caller: Caller) -> str:
        """The caller's synced folders as Markdown: last sync, files in step, pending and
        skipped (each with its reason), errors, the first ingest's progress."""
        folders = self.service.synced_folders(caller)
        if not folders:
            return "No synced folders yet." if self.may_sync(caller) else ""
        lines = []
        for folder in folders:
            root = folder["path"]
            lines.append(f"**{html.escape(printable_path(root))}** ({_collection(folder['owner'], caller)}): "
                         f"last sync {folder['synced_at'].replace('T', ' ') if folder['synced_at'] else 'not yet'}; "
                         f"{folder['in_step']} in step, {folder['pending']} pending, {folder['skipped']} skipped")
            if folder["progress"]:
                lines.append(f"- syncing: {html.escape(folder['progress'])}")
            if folder["error"]:
                lines.append(f"- {_error(html.escape(folder['error']))}")
            for path, reason in folder["skipped_files"][:50]:
                shown_path = path[len(root) + 1:] if path.startswith(root + "/") else Path(path).name
                lines.append(f"- skipped {html.escape(printable_path(shown_path))}: {html.escape(reason)}")
            if len(folder["skipped_files"]) > 50:
                lines.append(f"- … and {len(folder['skipped_files']) - 50} more skipped")
        return "\n".join(lines)

    def synced_choices(self, caller: Caller) -> list[tuple[str, int]]:
        return [(printable_path(folder["path"]), folder["id"]) for folder in self.service.synced_folders(caller)]

    def sync_folder(self, folder: str, shared, caller: Caller) -> str:
        problem = self.service.sync_folder(folder, caller, shared=bool(shared))
        return _error(problem) if problem else ("Syncing: its files are being ingested now, then kept in step "
                                                "(Refresh shows how far it is).")

    def sync_now(self, folder_id, caller: Caller) -> str:
        report = self.service.sync_now(folder_id, caller)
        if isinstance(report, str):
            return _error(report)
        return _error(report.error) if report.error else f"**Synced:** {html.escape(report.summary())}."

    def stop_syncing(self, folder_id, remove: str, caller: Caller) -> str:
        removing = remove == "remove"
        problem = self.service.stop_syncing(folder_id, caller, remove_documents=removing)
        if problem:
            return _error(problem)
        return ("Stopped syncing; its documents were removed." if removing else
                "Stopped syncing; its documents stay in the corpus (remove them below, one by one, if you wish).")


def _collection(owner: str, caller: Caller) -> str:
    return "shared library" if owner == SHARED else "yours" if owner == caller.owner else "another user's"


def _history(messages: list[dict]) -> list[dict]:
    """The chat as the Chatbot shows it: each answer's citations [n] link to their passages."""
    return [{"role": m["role"], "content": _answer_shown(m["content"], m.get("passages", []))
             if m["role"] == "assistant" else m["content"]} for m in messages]


def _answer_shown(answer: str, passage_ids: list[int]) -> str:
    return link_citations(answer, passage_ids) if answer.strip() else NO_ANSWER


def _ids(panel: Panel | None) -> list[int]:
    return panel.numbered_ids if panel is not None else []


def _progress(progress: Callable[[float, str], None] | None) -> Callable[[IngestProgress], None] | None:
    """The ingest's progress (passages done, expected, time left) as the progress bar's (fraction, text)."""
    if progress is None:
        return None
    progress(0.0, "reading files")
    return lambda state: progress(state.fraction, state.describe())


def _ingest_view(outcome: IngestOutcome) -> dict:
    if outcome.report is None and not outcome.skipped:
        return {"report": _error(outcome.error), "error": outcome.error}
    if outcome.report is None and outcome.error != "Nothing could be ingested.":
        return {"report": _error(outcome.error), "error": outcome.error}
    return {"report": _report(outcome.report, outcome.skipped), "error": outcome.error}


def _stage_text(name: str, settings: ChatSettings) -> str:
    return {"embed": "Reading your question…",
            "select": f"Selecting passages ({METHOD_LABELS.get(settings.method, settings.method)})…",
            "fine-tune": "Fine-tuning on the selected passages…",
            "generate": "Generating the answer…"}.get(name, f"{name}…")


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"


def _report(report, skipped: list[tuple[str, str]]) -> str:
    lines = []
    if report is not None:
        lines.append(f"**Ingested:** {report.summary()}.")
        skipped = [*skipped, *report.skipped]
    if skipped:
        lines.append("**Skipped** (the rest went on):")
        lines += [f"- {html.escape(printable_path(Path(path).name))}: {html.escape(reason)}" for path, reason in skipped]
    if report is None or (report.ingested == 0 and not report.unchanged):
        lines.insert(0, _error("Nothing could be ingested."))
    return "\n".join(lines)
