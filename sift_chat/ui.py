"""The app: a shell over the application layer (`sift_chat.service`); its Gradio layout is in
`sift_chat.layout`.

    Handlers   plain functions (methods) that take and return plain values: strings, lists, dicts,
               `Panel`s. They render what the Service does; no chat, selection or training logic
               lives here. Tested as they are (tests/test_ui.py).

The HTML and Markdown of a panel, a document and a search are `sift_chat.rendering`'s.

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
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from .access import SHARED, Caller
from .adaptation import AdaptationSettings
from .corpus import IngestProgress
from .corpus_service import IngestOutcome
from .document_view import NotReadable
from .engine import Engine
from .events import Notice, Prompted, Selected, Stage, Step, Token
from .panel import Panel, parse_settings
from .reading import shown as printable_path
from .rendering import link_citations, render_document, render_search, what_differed
from .service import Answered, Service, Stopped, Stored, Waiting
from .settings import ChatSettings
from .store import Store
from .turns import Busy, Turn
from .vocabulary import METHOD_LABELS, first_line

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
                    panel.add_step(event)
                    yield view(f"Fine-tuning: {event.words} · loss {event.loss:.3f}", panel=panel)
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
                    panels[method].add_step(event)
                    yield view(f"{label}: fine-tuning, {event.words} · loss {event.loss:.3f}")
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
        documents = self.service.corpus.documents(caller)
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
            result = self.service.corpus.search(text, caller)
        except ValueError as error:
            return _error(str(error))
        return render_search(result)

    def open_document(self, passage_id, caller: Caller, document_id=None, number=None) -> str:
        """The document pane (HTML) for a passage (a citation [n] or a pick: `number` is how the
        answer cites it) or a document; `document_view.NotReadable` (one line) when it is not the
        caller's own or the shared library's, or does not exist."""
        view = self.service.corpus.read_document(caller, passage_id, document_id)
        number = number if isinstance(number, int) and not isinstance(number, bool) and 0 < number < 1000 else None
        return render_document(view, _collection(view.owner, caller), number)

    def offers_sample(self) -> bool:
        return self.service.corpus.offers_sample()

    def documents(self, caller: Caller) -> list[list]:
        """[name, collection, passages, size, added] for every document the caller reads."""
        return [_listed(d, caller) for d in self.service.corpus.documents(caller)]

    def open_listed_document(self, row, caller: Caller) -> str:
        """The document pane for a row of the documents table as the page shows it (`documents`;
        sorted or not): the caller's document listed so, from its beginning; `NotReadable` when
        none is (removed since, or a row the page never showed)."""
        shown = _cells(row) if isinstance(row, (list, tuple)) else None
        for document in self.service.corpus.documents(caller) if shown else []:
            if _cells(_listed(document, caller)) == shown:
                return self.open_document(None, caller, document_id=document["id"])
        raise NotReadable("That document is no longer in the corpus: refresh the list.")

    def removable(self, caller: Caller) -> list[tuple[str, int]]:
        """(name and collection, id) of the documents the caller may remove."""
        return [(f"{_document_name(d)} ({_collection(d['owner'], caller)})", d["id"])
                for d in self.service.corpus.documents(caller) if caller.may_change(d["owner"])]

    def ingest(self, uploads: list | None = None, folder: str | None = None,
               progress: Callable[[float, str], None] | None = None, *, caller: Caller, shared: bool = False) -> dict:
        """Ingest uploaded files and a server folder or file, into the caller's documents (or, for
        an admin, the shared library). Returns {report, error}: what was added, skipped and why."""
        return _ingest_view(self.service.corpus.ingest(uploads, folder, _progress(progress), caller=caller,
                                                shared=bool(shared)))

    def add_sample(self, progress: Callable[[float, str], None] | None = None, *, caller: Caller) -> dict:
        return _ingest_view(self.service.corpus.add_sample(_progress(progress), caller=caller))

    def remove_document(self, document_id, caller: Caller) -> str:
        """A readable result of removing the document (its passages and vectors go with it)."""
        if document_id is None:
            return _error("Choose a document to remove.")
        try:
            document = self.store.document_by_id(int(document_id))
        except (TypeError, ValueError, OverflowError):
            document = None
        problem = self.service.corpus.remove_document(document_id, caller)
        return _error(problem) if problem else f"Removed {Path(document['path']).name}."

    # -- synced folders --------------------------------------------------------------------

    def may_sync(self, caller: Caller) -> bool:
        return not self.service.corpus.sync_refusal(caller)

    def synced_folders(self, caller: Caller) -> str:
        """The caller's synced folders as Markdown: last sync, files in step, pending and
        skipped (each with its reason), errors, the first ingest's progress."""
        folders = self.service.corpus.synced_folders(caller)
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
        return [(printable_path(folder["path"]), folder["id"]) for folder in self.service.corpus.synced_folders(caller)]

    def sync_folder(self, folder: str, shared, caller: Caller) -> str:
        problem = self.service.corpus.sync_folder(folder, caller, shared=bool(shared))
        return _error(problem) if problem else ("Syncing: its files are being ingested now, then kept in step "
                                                "(Refresh shows how far it is).")

    def sync_now(self, folder_id, caller: Caller) -> str:
        report = self.service.corpus.sync_now(folder_id, caller)
        if isinstance(report, str):
            return _error(report)
        return _error(report.error) if report.error else f"**Synced:** {html.escape(report.summary())}."

    def stop_syncing(self, folder_id, remove: str, caller: Caller) -> str:
        removing = remove == "remove"
        problem = self.service.corpus.stop_syncing(folder_id, caller, remove_documents=removing)
        if problem:
            return _error(problem)
        return ("Stopped syncing; its documents were removed." if removing else
                "Stopped syncing; its documents stay in the corpus (remove them below, one by one, if you wish).")


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
