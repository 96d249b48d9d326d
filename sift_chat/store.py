"""The store: SQLite is the truth, an hnswlib index over the passage vectors is derived from it.

Layout of a store folder::

    store.db              documents, passages (with their embeddings), meta; later chats and messages
    index-<version>.hnsw  the vector index (cosine space, label = passage id)

Every change to the passages bumps ``passages_version`` in the same SQLite transaction. The index
file carries the version it was saved at in its name, so an index that is missing, or older than
the database (a process killed before it saved), is rebuilt from the embeddings in SQLite when the
store is opened. A document is written in one transaction: a killed ingest leaves each document
fully in or absent.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import hnswlib
import numpy as np
import sqlite_utils

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    content_hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    passage_count INTEGER NOT NULL,
    ingested_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so an index label means one passage
    document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    start_char INTEGER NOT NULL,
    end_char INTEGER NOT NULL,
    token_count INTEGER NOT NULL,
    text TEXT NOT NULL,
    embedding BLOB NOT NULL  -- float32, L2-normalised
);
CREATE INDEX IF NOT EXISTS passages_by_document ON passages(document_id);
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL DEFAULT '',  -- whose chat: '' on the CLI, a browser's private key in the app
    title TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    role TEXT NOT NULL,        -- "user" or "assistant"
    content TEXT NOT NULL,
    created_at TEXT NOT NULL,
    record TEXT                -- JSON, on answers: settings, seed, σ² traces, losses, seconds per stage
);
CREATE INDEX IF NOT EXISTS messages_by_chat ON messages(chat_id);
CREATE TABLE IF NOT EXISTS selections (  -- one row per pick of the passages an answer learned from
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    passage_id INTEGER NOT NULL,  -- no foreign key: the log outlives a removed document
    similarity REAL NOT NULL,
    posterior_variance REAL NOT NULL,
    uncertainty_reduction REAL NOT NULL,
    loss REAL,
    PRIMARY KEY (message_id, step)
);
"""


def _in_chunks(ids: list[int], size: int = 500):
    """(chunk, "?,?,…") pairs for `WHERE id IN (…)`: SQLite caps the number of parameters."""
    for start in range(0, len(ids), size):
        chunk = ids[start : start + size]
        yield chunk, ",".join("?" * len(chunk))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class NewPassage:
    position: int
    start_char: int
    end_char: int
    token_count: int
    text: str


@dataclass(frozen=True)
class NewDocument:
    """A document ready to be written: its passages and their embeddings (one row each)."""

    path: str
    content_hash: str
    size: int
    mtime: float
    passages: list[NewPassage]
    embeddings: np.ndarray  # (len(passages), dim) float32


@dataclass(frozen=True)
class Passage:
    id: int
    document_id: int
    path: str
    position: int
    start_char: int
    end_char: int
    text: str


def _serialized(method):
    """Run `method` holding the store's lock: one connection serves every thread (the app's
    workers), and a transaction must not interleave with another thread's statements."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


class Store:
    """Documents and passages in SQLite, their vectors in an hnswlib index kept in step.

    One Store may be shared by threads: its methods are serialized by `lock`.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        connection = sqlite3.connect(self.folder / "store.db", check_same_thread=False)
        self.db = sqlite_utils.Database(connection)
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA busy_timeout = 30000")
        self.db.enable_wal()  # readers (the app) go on while a writer (an ingest) works
        self.db.executescript(SCHEMA)
        if self.meta("schema_version") is None:
            self.set_meta(schema_version=SCHEMA_VERSION, passages_version=0)
        self.index: hnswlib.Index | None = None
        self._index_version = -1
        self._sync_index()

    # -- meta -----------------------------------------------------------------------------

    @_serialized
    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    @_serialized
    def set_meta(self, **values) -> None:
        self.db["meta"].upsert_all(
            [{"key": key, "value": str(value)} for key, value in values.items()], pk="key"
        )

    @property
    def passages_version(self) -> int:
        return int(self.meta("passages_version") or 0)

    @property
    def embedder(self) -> str | None:
        return self.meta("embedder")

    @property
    def dimension(self) -> int | None:
        value = self.meta("dimension")
        return int(value) if value else None

    @_serialized
    def check_embedder(self, name: str, dimension: int) -> None:
        """Refuse to mix vectors of two embedding models in one store."""
        if self.embedder is None or self.passage_count() == 0:
            return
        if self.embedder != name or self.dimension != dimension:
            raise StoreError(
                f"this store was built with the embedder {self.embedder!r} (dimension {self.dimension}), "
                f"not {name!r} (dimension {dimension}): use that embedder, or re-embed the store "
                "with `ingest --reembed`"
            )

    # -- counts and reads -----------------------------------------------------------------

    @_serialized
    def document_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM documents").fetchone()[0]

    @_serialized
    def passage_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM passages").fetchone()[0]

    @_serialized
    def document(self, path: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM documents WHERE path = ?", [path]))
        return rows[0] if rows else None

    @_serialized
    def documents(self) -> list[dict]:
        return list(self.db.query("SELECT * FROM documents ORDER BY path"))

    @_serialized
    def passages(self, ids: Iterable[int]) -> dict[int, Passage]:
        """The passages with these ids (missing ids are left out), by id."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        found: dict[int, Passage] = {}
        for chunk, marks in _in_chunks(ids):
            for row in self.db.query(
                "SELECT p.id, p.document_id, d.path, p.position, p.start_char, p.end_char, p.text "
                f"FROM passages p JOIN documents d ON d.id = p.document_id WHERE p.id IN ({marks})",
                chunk,
            ):
                found[row["id"]] = Passage(**row)
        return found

    @_serialized
    def embeddings(self, ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) from SQLite, for the given ids or for every passage, in id order."""
        dimension = self.dimension or 0
        if ids is None:
            rows = self.db.execute("SELECT id, embedding FROM passages ORDER BY id").fetchall()
        else:
            wanted = sorted(int(i) for i in ids)
            rows = []
            for chunk, marks in _in_chunks(wanted):
                rows += self.db.execute(
                    f"SELECT id, embedding FROM passages WHERE id IN ({marks}) ORDER BY id", chunk
                ).fetchall()
        labels = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32)
        return labels, vectors.reshape(len(rows), dimension).copy()

    # -- writes ---------------------------------------------------------------------------

    @_serialized
    def write_documents(self, documents: list[NewDocument], embedder: str) -> None:
        """Insert or replace these documents and their passages, all in one transaction."""
        if not documents:
            return
        dimension = int(documents[0].embeddings.shape[1])
        self.check_embedder(embedder, dimension)
        removed: list[int] = []
        added: list[tuple[np.ndarray, np.ndarray]] = []
        with self.db.atomic():
            for document in documents:
                removed += self._delete_document(document.path) or []
                cursor = self.db.execute(
                    "INSERT INTO documents (path, content_hash, size, mtime, passage_count, ingested_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [document.path, document.content_hash, document.size, document.mtime,
                     len(document.passages), _now()],
                )
                document_id = cursor.lastrowid
                vectors = np.ascontiguousarray(document.embeddings, dtype=np.float32)
                ids = []
                for passage, vector in zip(document.passages, vectors):
                    cursor = self.db.execute(
                        "INSERT INTO passages (document_id, position, start_char, end_char, token_count, "
                        "text, embedding) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [document_id, passage.position, passage.start_char, passage.end_char,
                         passage.token_count, passage.text, vector.tobytes()],
                    )
                    ids.append(cursor.lastrowid)
                added.append((np.asarray(ids, dtype=np.int64), vectors))
            self.set_meta(embedder=embedder, dimension=dimension,
                          passages_version=self.passages_version + 1)
        self._apply_to_index(removed, added)

    @_serialized
    def touch_document(self, path: str, mtime: float) -> None:
        """Record a new mtime for a document whose content did not change."""
        self.db.execute("UPDATE documents SET mtime = ? WHERE path = ?", [mtime, path])
        self.db.conn.commit()

    @_serialized
    def remove(self, paths: Iterable[str]) -> list[str]:
        """Remove these documents, their passages and their vectors; return the paths removed."""
        removed_paths, removed_ids = [], []
        with self.db.atomic():
            for path in paths:
                ids = self._delete_document(path)
                if ids is not None:
                    removed_paths.append(path)
                    removed_ids += ids
            if removed_paths:
                self.set_meta(passages_version=self.passages_version + 1)
        if removed_paths:
            self._apply_to_index(removed_ids, [])
        return removed_paths

    @_serialized
    def replace_embeddings(self, ids: np.ndarray, vectors: np.ndarray, embedder: str) -> None:
        """Swap every passage's vector for one from another embedder (re-embedding), atomically."""
        with self.db.atomic():
            self.db.conn.executemany(
                "UPDATE passages SET embedding = ? WHERE id = ?",
                [(vector.astype(np.float32).tobytes(), int(i)) for i, vector in zip(ids, vectors)],
            )
            self.set_meta(embedder=embedder, dimension=int(vectors.shape[1]),
                          passages_version=self.passages_version + 1)
        self._rebuild_index()

    def _delete_document(self, path: str) -> list[int] | None:
        row = self.db.execute("SELECT id FROM documents WHERE path = ?", [path]).fetchone()
        if row is None:
            return None
        ids = [r[0] for r in self.db.execute("SELECT id FROM passages WHERE document_id = ?", [row[0]])]
        self.db.execute("DELETE FROM passages WHERE document_id = ?", [row[0]])
        self.db.execute("DELETE FROM documents WHERE id = ?", [row[0]])
        return ids

    # -- the vector index -----------------------------------------------------------------

    def _index_path(self, version: int) -> Path:
        return self.folder / f"index-{version}.hnsw"

    def _sync_index(self) -> None:
        """Make the in-memory index match SQLite: load the saved one of the right version, or rebuild."""
        version = self.passages_version
        if version == self._index_version:
            return
        path = self._index_path(version)
        if self.dimension and path.is_file():
            index = hnswlib.Index(space="cosine", dim=self.dimension)
            try:
                index.load_index(str(path), allow_replace_deleted=True)
                self.index, self._index_version = index, version
                self._check_index()
                return
            except (RuntimeError, StoreError):
                pass  # unreadable or disagreeing: rebuild from the truth
        self._rebuild_index()

    def _check_index(self) -> None:
        """SQLite and the index agree: every passage has a vector (no more is checked: cheap)."""
        live = self.index.element_count - int(self.meta("index_deleted") or 0) if self.index else 0
        if live != self.passage_count():
            raise StoreError("the vector index disagrees with SQLite")

    def _rebuild_index(self) -> None:
        ids, vectors = self.embeddings()
        version = self.passages_version
        if len(ids) == 0:
            self.index, self._index_version = None, version
            self._save_index()
            return
        index = hnswlib.Index(space="cosine", dim=vectors.shape[1])
        index.init_index(max_elements=max(1024, 2 * len(ids)), ef_construction=200, M=16,
                         allow_replace_deleted=True)
        index.add_items(vectors, ids)
        self.index, self._index_version = index, version
        self.set_meta(index_deleted=0)
        self._save_index()

    def _apply_to_index(self, removed: list[int], added: list[tuple[np.ndarray, np.ndarray]]) -> None:
        if self._index_version != self.passages_version - 1 or self.index is None:
            self._rebuild_index()  # another process wrote meanwhile, or the first vectors arrived
            return
        deleted = int(self.meta("index_deleted") or 0) + len(removed)
        if deleted > max(1024, self.passage_count()):
            self._rebuild_index()  # mostly tombstones: a fresh graph is smaller and faster
            return
        for label in removed:
            self.index.mark_deleted(label)
        new = sum(len(ids) for ids, _ in added)
        if self.index.element_count + new > self.index.get_max_elements():
            self.index.resize_index(2 * (self.index.element_count + new))
        for ids, vectors in added:
            if len(ids):
                self.index.add_items(vectors, ids)
        self.set_meta(index_deleted=deleted)
        self._index_version = self.passages_version
        self._save_index()

    def _save_index(self) -> None:
        """Write index-<version>.hnsw under a temporary name, rename it, drop older versions."""
        target = self._index_path(self._index_version)
        if self.index is not None:
            staging = target.with_suffix(".tmp")
            self.index.save_index(str(staging))
            os.replace(staging, target)
        for old in [*self.folder.glob("index-*.hnsw"), *self.folder.glob("index-*.tmp")]:
            if old != target:
                old.unlink(missing_ok=True)  # older versions, and what a killed save left

    # -- chats ----------------------------------------------------------------------------

    @_serialized
    def create_chat(self, title: str, owner: str = "") -> int:
        now = _now()
        with self.db.atomic():
            cursor = self.db.execute(
                "INSERT INTO chats (owner, title, created_at, updated_at) VALUES (?, ?, ?, ?)",
                [owner, title, now, now])
        return cursor.lastrowid

    @_serialized
    def chats(self, owner: str = "") -> list[dict]:
        """One owner's chats, the most recently used first."""
        return list(self.db.query("SELECT * FROM chats WHERE owner = ? ORDER BY updated_at DESC, id DESC",
                                  [owner]))

    @_serialized
    def chat(self, chat_id: int) -> dict | None:
        rows = list(self.db.query("SELECT * FROM chats WHERE id = ?", [chat_id]))
        return rows[0] if rows else None

    @_serialized
    def rename_chat(self, chat_id: int, title: str) -> None:
        with self.db.atomic():
            self.db.execute("UPDATE chats SET title = ? WHERE id = ?", [title, chat_id])

    @_serialized
    def delete_chat(self, chat_id: int) -> None:
        with self.db.atomic():
            self.db.execute("DELETE FROM chats WHERE id = ?", [chat_id])

    @_serialized
    def messages(self, chat_id: int) -> list[dict]:
        return list(self.db.query("SELECT * FROM messages WHERE chat_id = ? ORDER BY id", [chat_id]))

    @_serialized
    def selection_rows(self, message_id: int) -> list[dict]:
        return list(self.db.query("SELECT * FROM selections WHERE message_id = ? ORDER BY step", [message_id]))

    @_serialized
    def record_exchange(self, chat_id: int, prompt: str, answer: str, record: dict,
                        picks: list[dict]) -> int:
        """The prompt, the answer (with its record) and its picks, in one transaction; the answer's id."""
        with self.db.atomic():
            return self._insert_exchange(chat_id, prompt, answer, record, picks)

    @_serialized
    def start_chat(self, title: str, owner: str, prompt: str, answer: str, record: dict,
                   picks: list[dict]) -> tuple[int, int]:
        """A new chat and its first exchange, in one transaction (a chat never exists empty):
        (the chat's id, the answer's id)."""
        now = _now()
        with self.db.atomic():
            chat_id = self.db.execute(
                "INSERT INTO chats (owner, title, created_at, updated_at) VALUES (?, ?, ?, ?)",
                [owner, title, now, now]).lastrowid
            return chat_id, self._insert_exchange(chat_id, prompt, answer, record, picks)

    def _insert_exchange(self, chat_id, prompt, answer, record, picks) -> int:
        now = _now()
        self.db.execute("INSERT INTO messages (chat_id, role, content, created_at) VALUES (?, ?, ?, ?)",
                        [chat_id, "user", prompt, now])
        cursor = self.db.execute(
            "INSERT INTO messages (chat_id, role, content, created_at, record) VALUES (?, ?, ?, ?, ?)",
            [chat_id, "assistant", answer, now, json.dumps(record)])
        message_id = cursor.lastrowid
        self.db["selections"].insert_all({"message_id": message_id, **pick} for pick in picks)
        self.db.execute("UPDATE chats SET updated_at = ? WHERE id = ?", [now, chat_id])
        return message_id

    # -- search ---------------------------------------------------------------------------

    @_serialized
    def nearest(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k passages most similar to `query` (cosine): (ids, similarities, vectors), best first.

        When the store holds at most k passages, every passage is returned (exact).
        """
        self._sync_index()
        count = self.passage_count()
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if count == 0 or k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, len(query)), np.float32)
        if self.dimension and len(query) != self.dimension:
            raise StoreError(f"the query has dimension {len(query)}, the store {self.dimension}")
        if k >= count:
            ids, vectors = self.embeddings()
            similarities = vectors @ query / max(float(np.linalg.norm(query)), 1e-12)
            order = np.argsort(-similarities, kind="stable")
            return ids[order], similarities[order], vectors[order]
        self.index.set_ef(max(2 * k, 64))
        labels, distances = self.index.knn_query(query, k=k)
        ids = labels[0].astype(np.int64)
        vectors = np.asarray(self.index.get_items(ids, return_type="numpy"), dtype=np.float32)
        return ids, (1.0 - distances[0]).astype(np.float32), vectors

    @_serialized
    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
