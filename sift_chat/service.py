"""The application layer: what sift-chat does, whichever shell asks (the app, the CLI, the API).

    chats      create (with their first answer), list, open, rename, delete; each owned by one owner
    turns      one message: wait in the line for the model, run the engine with this request's
               settings, store the exchange only when it is complete and not stopped
    compare    one prompt, NN and SIFT: selected once each, both answers, nothing stored
    corpus     ingest, search, the documents and synced folders: `Service.corpus`, a
               `corpus_service.CorpusService`, in its own line beside the model's

Every call names its caller (`access.Caller`, which the shell got from the server's side of the
request): a caller sees their own chats, and selects from their own documents and the shared
library; a visitor who has not signed in chats over the shared library, and nothing is stored.
The shells turn the events below into what they show; nothing here knows about Gradio, argparse
or HTTP. The engine holds no per-request state: settings travel with each call.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

from .access import Caller
from .adaptation import AdaptationSettings
from .corpus_service import CorpusService
from .engine import Engine
from .events import Done, Event, HandedOver, Notice, Prompted, Selected, Stage, Step, Token
from .panel import Panel
from .record import AnswerRecord
from .settings import ChatSettings
from .store import Store, StoreError
from .turns import Kept, Turn, TurnQueue
from .vocabulary import one_line

TITLE_CHARACTERS = 60


# -- what a turn reports, besides the engine's own events --------------------------------------


@dataclass(frozen=True)
class Waiting:
    ahead: int  # turns before this one in the line for the model


@dataclass(frozen=True)
class Answered:
    """The complete answer, before it is stored: with its citation markers [n] (`raw_answer`:
    as the model wrote it)."""

    answer: str
    record: AnswerRecord
    panel: Panel | None
    notices: list[str]
    raw_answer: str = ""


@dataclass(frozen=True)
class Stored:
    """The exchange is stored (both None: answered, not recorded, on a read-only store)."""

    chat_id: int | None
    message_id: int | None


@dataclass(frozen=True)
class Stopped:
    """The turn was stopped: the model is at base and nothing of it was stored."""

    where: str  # what it was doing: "before it started", "while selecting", "at step 2 of 8", …


TurnEvent = Event | Waiting | Answered | Stored | Stopped


@dataclass
class ChatView:
    chat_id: int
    title: str
    messages: list[dict]  # role, content, id; on answers, passages: the ids their citations [n] stand for
    panel: Panel | None  # the last answer's


class Service:
    """Everything sift-chat does, over one engine (one per process) and one line for it."""

    def __init__(self, engine: Engine, data_dir: str | Path, *, max_waiting: int = 16, **corpus_options):
        """`max_waiting`: how many turns may wait in the line for the model; `data_dir` and
        `corpus_options` are the corpus's (`CorpusService`: server paths, the upload folder,
        the sample corpus, the limits and quota of an ingest)."""
        self.engine = engine
        self.queue = TurnQueue(max_waiting)
        self.last_turn: dict[str, Turn] = {}  # each owner's latest finished turn, for Stop's answer
        self.corpus = CorpusService(engine, data_dir, **corpus_options)

    @property
    def store(self) -> Store:
        return self.engine.store

    @property
    def base_adaptation(self) -> AdaptationSettings:
        return self.engine.default_adaptation

    # -- chats -----------------------------------------------------------------------------

    def chats(self, caller: Caller) -> list[tuple[str, int]]:
        """(title, id) of the caller's chats, the most recently used first."""
        return [(chat["title"], chat["id"]) for chat in self.store.chats(caller.owner)] if caller.signed_in else []

    def own_chat(self, chat_id, caller: Caller) -> dict | None:
        """The chat if it exists and belongs to the caller, else None."""
        if chat_id is None or not caller.signed_in:
            return None
        try:
            chat = self.store.chat(int(chat_id))
        except (TypeError, ValueError, OverflowError):
            return None
        return chat if chat and chat["owner"] == caller.owner else None

    def open_chat(self, chat_id, caller: Caller) -> ChatView | None:
        chat = self.own_chat(chat_id, caller)
        if chat is None:
            return None
        messages = self.store.messages(chat["id"])
        answers = [m for m in messages if m["role"] == "assistant"]
        return ChatView(chat["id"], chat["title"], self.chat_messages(chat, messages),
                        self.answer_panel(answers[-1]) if answers else None)

    def chat_messages(self, chat: dict, messages: list[dict] | None = None) -> list[dict]:
        """role, content and id of each message of a chat (one `own_chat` gave), and on answers
        `passages`: the passage ids their citations [1], [2] … stand for."""
        messages = self.store.messages(chat["id"]) if messages is None else messages
        return [{"role": m["role"], "content": m["content"], "id": m["id"],
                 **({"passages": self.cited_passages(m)} if m["role"] == "assistant" else {})} for m in messages]

    def cited_passages(self, message: dict) -> list[int]:
        """The passage ids an answer's markers [1], [2] … stand for (`Panel.numbered_ids`)."""
        panel = Panel.from_stored(AnswerRecord.from_json(message.get("record")),
                                  self.store.selection_rows(message["id"]), {})
        return panel.numbered_ids if panel is not None else []

    def answer_panel(self, message: dict) -> Panel | None:
        rows = self.store.selection_rows(message["id"])
        record = AnswerRecord.from_json(message.get("record"))
        read = list(record.read) if record else []
        return Panel.from_stored(record, rows, self.store.passages([*(r["passage_id"] for r in rows), *read]))

    def message_panel(self, chat_id, caller: Caller, index) -> Panel | None:
        """The panel of the answer at position `index` of the chat; for a question, the answer after it."""
        chat = self.own_chat(chat_id, caller)
        if chat is None or not isinstance(index, int):
            return None
        for message in self.store.messages(chat["id"])[max(index, 0):]:
            if message["role"] == "assistant":
                return self.answer_panel(message)
        return None

    def rename_chat(self, chat_id, title: str, caller: Caller) -> str:
        """'' when renamed, else why not."""
        title = one_line(title if isinstance(title, str) else "", 80)
        if not title:
            return "Give the chat a title."
        if self.own_chat(chat_id, caller) is None:
            return "Open one of your chats first."
        try:
            self.store.rename_chat(int(chat_id), title)
        except StoreError as error:  # read-only, or another process kept the store locked
            return str(error)
        return ""

    def delete_chat(self, chat_id, caller: Caller) -> str:
        """'' when deleted, else why not."""
        if self.own_chat(chat_id, caller) is None:
            return "Open one of your chats first."
        try:
            self.store.delete_chat(int(chat_id))
        except StoreError as error:
            return str(error)
        return ""

    # -- turns -----------------------------------------------------------------------------

    def new_turn(self, owner: str | None = None) -> Turn:
        """A ticket for one request: from now on `stop(owner)` stops it, even before it runs."""
        return self.queue.issue(owner)

    def release(self, turn: Turn) -> None:
        """The shell is done with this turn (its client went away, or it answered): stopped if it
        still runs (the model is let go at its next event), and its owner may send the next one now."""
        self.queue.release(turn)

    def stop(self, owner: str) -> tuple[int, Kept | None]:
        """Stop the owner's open turns: (how many were stopped before storing anything, what one
        had stored already). A turn that finished a moment ago counts as stored too late to stop."""
        turns = self.queue.open_turns(owner)
        results = [turn.stop() for turn in turns]
        kept = next((k for k in results if k is not None), None)
        recent = self.last_turn.get(owner)
        if not turns and recent is not None and recent.finished_at and time.monotonic() - recent.finished_at < 5:
            kept = recent.kept
        return sum(k is None for k in results), kept

    def chat_turn(self, turn: Turn, prompt: str, chat_id, caller: Caller, chat: ChatSettings,
                  adaptation: AdaptationSettings | None = None) -> Iterator[TurnEvent]:
        """One message in the caller's chat `chat_id` (a new chat when it is None or not theirs):
        the engine's events, then Answered and Stored; or Stopped, with nothing stored. A new
        chat is created in the same transaction as its first exchange. A visitor's exchange is
        answered and not stored (Stored(None, None))."""
        existing = self.own_chat(chat_id, caller)
        history = [{"role": m["role"], "content": m["content"]}
                   for m in (self.store.messages(existing["id"]) if existing else [])]

        def store(answered: Answered) -> Kept:
            if not caller.signed_in:
                return Kept(None, None)
            record = asdict(answered.record)
            picks = [{"step": p["step"], "passage_id": p["passage_id"], "similarity": p["similarity"],
                      "posterior_variance": p["posterior_variance"],
                      "uncertainty_reduction": p["uncertainty_reduction"],
                      "loss": answered.record.losses[p["step"] - 1] if p["step"] <= len(answered.record.losses) else None}
                     for p in (answered.panel.picks if answered.panel else [])]
            if existing:
                message_id = self.store.record_exchange(existing["id"], prompt.strip(), answered.answer,
                                                        record, picks)
                return Kept(existing["id"] if message_id is not None else None, message_id)
            started = self.store.start_chat(one_line(prompt, TITLE_CHARACTERS), caller.owner, prompt.strip(),
                                            answered.answer, record, picks)
            return Kept(*started) if started else Kept(None, None)  # None: a read-only store

        for event in self.run(turn, prompt, history, chat, adaptation, caller=caller):
            if isinstance(event, Answered):  # stored while the turn is still open: Stop sees it
                kept = turn.keep(lambda: store(event))
                yield event
                yield Stored(kept.chat_id, kept.message_id) if kept else Stopped("after the last word")
            else:
                yield event

    def run(self, turn: Turn, prompt: str, history: list[dict], chat: ChatSettings,
            adaptation: AdaptationSettings | None = None, *, caller: Caller) -> Iterator[TurnEvent]:
        """Wait for the model, then answer from the caller's documents and the shared library:
        Waiting while in the line, the engine's events, and Answered; or Stopped when the turn is
        stopped (checked after every event). The engine's errors propagate. Always leaves the
        line, and the model at base."""
        try:
            for event in self._wait(turn):
                yield event
                if isinstance(event, Stopped):
                    return
            yield from self._answer(turn, prompt, history, chat, adaptation, owners=caller.readable, step_aside=True)
        finally:
            self._leave(turn)

    def _wait(self, turn: Turn) -> Iterator[Waiting | Stopped]:
        """Join the line and wait for the model: Waiting while others are ahead; Stopped (last)
        when the turn was stopped meanwhile; nothing more once it has the model."""
        self.queue.enter(turn)
        while (ahead := self.queue.wait(turn, timeout=0.5)) > 0 and not turn.stopped:
            yield Waiting(ahead)
        if turn.stopped:
            yield Stopped("before it started")

    def _leave(self, turn: Turn) -> None:
        self.queue.leave(turn)
        for owner, last in list(self.last_turn.items()):  # only a moment ago matters to Stop
            if time.monotonic() - last.finished_at > 60:
                self.last_turn.pop(owner, None)
        if turn.owner is not None:
            self.last_turn[turn.owner] = turn

    def _answer(self, turn: Turn, prompt: str, history: list[dict], chat: ChatSettings,
                adaptation: AdaptationSettings | None, selected: Selected | None = None,
                owners: tuple[str, ...] = (), step_aside: bool = False) -> Iterator[TurnEvent]:
        """The engine's events for one answer, as the turn's; with `step_aside`, where messages
        decode together, the turn lets the next one in once the engine hands the model over
        (`HandedOver`: as it starts its steps in shared rounds, or once it joins the shared batch)."""
        where = "before it started"
        stream = self.engine.respond(prompt, history, chat, adaptation=adaptation, selected=selected, owners=owners)
        panel, notices = None, []
        try:
            for event in stream:
                if turn.stopped:  # seen at the next event: `where` is the last one the caller saw
                    yield Stopped(where)
                    return
                if isinstance(event, Selected):
                    panel = Panel.from_selected(event, chat.mode)
                    where = "after selecting"
                elif isinstance(event, Prompted) and panel is not None:
                    panel.read = [p.id for p in event.passages]
                elif isinstance(event, Stage) and event.state == "started":
                    where = {"embed": "while reading the question", "select": "while selecting",
                             "fine-tune": "before the first step", "generate": "before the first word"
                             }.get(event.name, f"while in {event.name}")
                elif isinstance(event, HandedOver):  # the engine is free: the next message may start
                    if step_aside:
                        if event.learning and self.queue.waiting:  # its steps will share this one's rounds
                            self.engine.learning.expect()
                        self.queue.step_aside(turn)
                    continue  # the line's business, not the caller's
                elif isinstance(event, Step):
                    panel.add_step(event)
                    where = f"after {event.words}"
                elif isinstance(event, Token):
                    where = "while writing the answer"
                elif isinstance(event, Notice):
                    notices.append(event.message)
                elif isinstance(event, Done):
                    if panel is not None:
                        panel.seconds = dict(event.record.seconds)
                        panel.citations = list(event.record.citations)
                        panel.only_learned = {int(k): v for k, v in event.record.only_learned.items()}
                    event = Answered(event.answer, event.record, panel, notices, event.raw_answer)
                yield event
        finally:
            stream.close()  # the engine resets the adapter and lets go of its lock

    # -- compare ---------------------------------------------------------------------------

    @staticmethod
    def compared(chat: ChatSettings) -> ChatSettings:
        """The settings a comparison runs with: modes that learn nothing ("off", and "context",
        where both methods read the same first pick) compare "both": what each learns differs."""
        return replace(chat, mode="both") if chat.mode in ("off", "context") else chat

    def compare(self, turn: Turn, prompt: str, chat: ChatSettings,
                adaptation: AdaptationSettings | None = None, *, caller: Caller) -> Iterator[tuple[str, TurnEvent]]:
        """NN and SIFT on one prompt, over the caller's documents and the shared library, as
        (method, event) pairs: both selections first (each made once, shown side by side), then
        each answer made from its selection. Nothing is stored. Mode "off" compares fine-tuning.
        Holds the model for the whole comparison."""
        prompt = (prompt or "").strip() if isinstance(prompt, str) else ""
        if not prompt:
            raise ValueError("the prompt is empty: type a question")
        if self.store.passage_count(caller.readable) == 0:
            raise ValueError("the corpus is empty: add documents first")
        chat = self.compared(chat)
        try:
            for event in self._wait(turn):
                yield "", event
                if isinstance(event, Stopped):
                    return
            query = self.engine.embed(prompt)
            selections = {method: self.engine.select(query, chat, method, owners=caller.readable, prompt=prompt)
                          for method in ("nn", "sift")}
            for method, selected in selections.items():
                yield method, selected
            for method, selected in selections.items():
                for event in self._answer(turn, prompt, [], replace(chat, method=method), adaptation, selected,
                                          caller.readable):
                    yield method, event
                    if isinstance(event, Stopped):
                        return
        finally:
            self._leave(turn)

    def close(self) -> None:
        """Stop the corpus's folder watchers: a pass running ends before its next file."""
        self.corpus.close()
