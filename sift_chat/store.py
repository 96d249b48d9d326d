"""The store: SQLite is the truth, an hnswlib index over the passage vectors is derived from it.

Layout of a store folder::

    store.db                       documents, passages (with their embeddings), meta, and the chats
                                   (`chats.ChatLog`: chats, messages, each answer's selections),
                                   the synced folders (`synced.SyncedFolders`: folders, file states)
    index-<version>-<sha256>.hnsw  the vector index (`vector_index`: cosine space, one point per
                                   distinct vector, label = the first passage id holding it)
    index.lock                     taken while an index file is written

`Store` is one class over one connection, made of a part per concern. This module: the
connection, the schema and its migrations, the transactions, meta, and the documents and passages
(their reads and writes). `vector_search.VectorSearch`: the vector index kept in step with SQLite,
and `nearest`. `lexical_search.LexicalSearch`: the BM25 search (`lexical`, `term_counts`).
`chats.ChatLog` and `synced.SyncedFolders`: the chats and the synced folders, each with its tables
(`CHAT_SCHEMA`, `SYNC_SCHEMA`, created with `SCHEMA`).

Every change to the passages bumps ``passages_version`` in the same SQLite transaction; the index
file carries that version, and one that disagrees with SQLite is rebuilt from it
(`vector_search`). A document is written in one transaction: a killed ingest leaves each document
fully in or absent. Writers take SQLite's write lock before they read (BEGIN IMMEDIATE), so two
processes writing at once queue instead of failing.

Each document has an owner (`access`: '' is the shared library); a search may be limited to some
owners' passages, which the index then skips during the search itself.

Beside the vectors, an FTS5 table (``passages_fts``, external content: it indexes passages.text
without a second copy) answers BM25 searches for a prompt's words (`lexical_search`). Triggers on
`passages` keep it in the same transactions as the passages, so a killed ingest or removal leaves
both in step; a store made before it gets it built on upgrade (schema 3).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import sqlite_utils

from .access import SHARED
from .chats import CHAT_SCHEMA, ChatLog
from .db import StoreError, now, serialized
from .lexical_search import LexicalSearch
from .synced import SYNC_SCHEMA, SyncedFolders
from .vector_search import VectorSearch

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5  # 2: documents have an owner ('' = the shared library); 3: and a name to show; 4: the FTS5
# table; 5: the synced folders' tables (`synced`)

# unicode61 keeps a name whole and folds case and accents (Malrosbré = malrosbre); "7:40" and
# "12,345" are two tokens each in passages and prompts alike (README: Retrieval, measured)
FTS_TOKENIZER = "unicode61 remove_diacritics 2"

DOCUMENT_COLUMNS = """(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL DEFAULT '',  -- whose document: '' the shared library, else a user's (`access`)
    path TEXT NOT NULL,  -- where it is read from on the server: never shown to users
    content_hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    passage_count INTEGER NOT NULL,
    ingested_at TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',  -- as the user named it: the upload's name, or the path in the folder ingested
    UNIQUE (owner, path)  -- one path may be two users' documents
)"""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS documents {DOCUMENT_COLUMNS};
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
CREATE INDEX IF NOT EXISTS passages_by_text ON passages(text);  -- a copied passage reuses its vector
CREATE VIRTUAL TABLE IF NOT EXISTS passages_fts USING fts5(
    text, content='passages', content_rowid='id', tokenize='{FTS_TOKENIZER}'
);
CREATE VIRTUAL TABLE IF NOT EXISTS passages_terms USING fts5vocab(passages_fts, 'row');  -- term → passages holding it
-- the lexical index follows every change of passages.text in the same transaction
-- (not sqlite-utils' enable_fts: its update trigger would rewrite the index on every re-embedding)
CREATE TRIGGER IF NOT EXISTS passages_fts_insert AFTER INSERT ON passages BEGIN
    INSERT INTO passages_fts (rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS passages_fts_delete AFTER DELETE ON passages BEGIN
    INSERT INTO passages_fts (passages_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TRIGGER IF NOT EXISTS passages_fts_update AFTER UPDATE OF text ON passages BEGIN
    INSERT INTO passages_fts (passages_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO passages_fts (rowid, text) VALUES (new.id, new.text);
END;
"""


def _owned_by(owners: Iterable[str] | None) -> tuple[str, list[str]]:
    """The WHERE clause (over documents as `d`) that keeps these owners' documents; all when None."""
    if owners is None:
        return "", []
    owners = list(dict.fromkeys(owners))
    return (f"WHERE d.owner IN ({','.join('?' * len(owners))})", owners) if owners else ("WHERE 0", [])


def _in_chunks(ids: list[int], size: int = 500):
    """(chunk, "?,?,…") pairs for `WHERE id IN (…)`: SQLite caps the number of parameters."""
    for start in range(0, len(ids), size):
        chunk = ids[start : start + size]
        yield chunk, ",".join("?" * len(chunk))


def _file_name(path: str) -> str:
    return os.path.basename(path.rstrip("/")) or path


def _busy_or(error: sqlite3.OperationalError, doing: str, busy_timeout: float) -> str:
    """The one-line message for an SQLite error while `doing` something."""
    if "locked" in str(error) or "busy" in str(error):
        return (f"{doing}: another process kept it locked for {busy_timeout:.0f} s "
                "(an ingest or a removal still running?); nothing was changed, try again when it ends")
    return f"{doing}: {error}"


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
    owner: str = SHARED
    name: str = ""  # as the user named it ('': the file's name)


@dataclass(frozen=True)
class Passage:
    id: int
    document_id: int
    path: str
    position: int
    start_char: int
    end_char: int
    text: str
    name: str = ""  # the document as the user named it (`path` is the server's, never shown)


class Store(ChatLog, SyncedFolders, VectorSearch, LexicalSearch):
    """Documents and passages in SQLite, their vectors in an hnswlib index kept in step.

    One Store may be shared by threads: its methods are serialized by `lock`. Several processes
    may open one store: writers queue on SQLite's write lock (waiting up to `busy_timeout`
    seconds), readers never wait for a writer (WAL). A store whose files cannot be written opens
    read-only: it answers searches and chats, and refuses every change with one line.
    """

    def __init__(self, folder: str | os.PathLike, busy_timeout: float = 30.0):
        self.folder = Path(folder)
        self.busy_timeout = busy_timeout
        self.lock = threading.RLock()
        self._warned: set[str] = set()
        database = self.folder / "store.db"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            if not self.folder.is_dir():
                raise StoreError(f"cannot create the store folder {self.folder}: {error.strerror or error}") from None
        self.read_only = not os.access(self.folder, os.W_OK) or (
            database.exists() and not os.access(database, os.W_OK))
        try:
            self.db = sqlite_utils.Database(self._connect(database))
            if not self.read_only:
                self.db.execute("PRAGMA foreign_keys = ON")
                self.db.enable_wal()  # readers (the app) go on while a writer (an ingest) works
                self.db.executescript(SCHEMA + CHAT_SCHEMA + SYNC_SCHEMA)
                if self.meta("schema_version") is None:
                    self.set_meta(schema_version=SCHEMA_VERSION, passages_version=0)
                self._migrate()
            elif "owner" not in (columns := {row[1] for row in self.db.execute("PRAGMA table_info(documents)")}):
                raise StoreError(f"the store {self.folder} was made by an older sift-chat and is read-only here: "
                                 "open it once where it can be written, to upgrade it")
            self._open_lexical()
        except sqlite3.OperationalError as error:
            raise StoreError(_busy_or(error, f"cannot open the store {database}", busy_timeout)) from None
        # a read-only store of schema 2 has no names: its documents show their file's name
        self._name = "d.name" if not self.read_only or "name" in columns else "''"
        self._open_index()

    def _migrate(self) -> None:
        """Bring an older store to SCHEMA_VERSION, in one transaction (a killed upgrade is redone
        at the next open). 1 → 2: documents get an owner, and the documents there become the
        shared library; chats kept under a browser's key (the app before sign-in) become the local
        owner's; the table is rebuilt (SQLite cannot change a UNIQUE constraint in place).
        2 → 3: documents get a name to show, their file's name (the folder they were ingested from
        is not known; ingesting them again names them by it). 3 → 4: the FTS5 table (created
        empty by SCHEMA) is built from the passages. 4 → 5: the synced folders' tables (created
        empty by SYNC_SCHEMA): nothing to convert."""
        version = int(self.meta("schema_version") or SCHEMA_VERSION)
        if version >= SCHEMA_VERSION:
            return
        self.db.execute("PRAGMA foreign_keys = OFF")  # dropping the old table must not cascade to passages
        try:
            with self._writing():
                columns = {row[1] for row in self.db.execute("PRAGMA table_info(documents)")}
                if "owner" not in columns:
                    copied = "id, path, content_hash, size, mtime, passage_count, ingested_at"
                    self.db.execute(f"CREATE TABLE documents_v2 {DOCUMENT_COLUMNS}")
                    self.db.execute(f"INSERT INTO documents_v2 ({copied}) SELECT {copied} FROM documents")
                    self.db.execute("DROP TABLE documents")
                    self.db.execute("ALTER TABLE documents_v2 RENAME TO documents")
                    self.db.execute("UPDATE chats SET owner = ''")
                elif "name" not in columns:
                    self.db.execute("ALTER TABLE documents ADD COLUMN name TEXT NOT NULL DEFAULT ''")
                for document_id, path in self.db.execute("SELECT id, path FROM documents WHERE name = ''").fetchall():
                    self.db.execute("UPDATE documents SET name = ? WHERE id = ?", [_file_name(path), document_id])
                if version < 4:
                    self.db.execute("INSERT INTO passages_fts (passages_fts) VALUES ('rebuild')")
                self._set_meta(schema_version=SCHEMA_VERSION)
        finally:
            self.db.execute("PRAGMA foreign_keys = ON")

    def _connect(self, database: Path) -> sqlite3.Connection:
        if not self.read_only:
            return sqlite3.connect(database, timeout=self.busy_timeout, check_same_thread=False)
        if not database.exists():
            raise StoreError(f"there is no store in {self.folder}, and the folder cannot be written")
        uri = f"file:{urllib.parse.quote(str(database.resolve()))}"
        connection = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=self.busy_timeout,
                                     check_same_thread=False)
        try:
            connection.execute("SELECT count(*) FROM meta").fetchone()
            return connection
        except sqlite3.OperationalError:  # WAL needs a -shm file it cannot create here
            connection.close()
            return sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False)

    # -- transactions ---------------------------------------------------------------------

    def check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"the store {self.folder} is read-only: nothing was changed "
                             "(fix its permissions, or use another --data-dir)")

    @contextlib.contextmanager
    def _writing(self):
        """A write transaction that holds SQLite's write lock from its first statement
        (BEGIN IMMEDIATE): a deferred one would read first and then fail at once, unable to
        upgrade, when another process is writing. Waits up to busy_timeout for the lock."""
        self.check_writable()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            raise StoreError(_busy_or(error, "cannot write to the store", self.busy_timeout)) from None
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.conn.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _snapshot(self):
        """Reads that see one state of the database, however many statements they take."""
        if self.db.conn.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message)

    # -- meta -----------------------------------------------------------------------------

    @serialized
    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    @serialized
    def set_meta(self, **values) -> None:
        with self._writing():
            self._set_meta(**values)

    def _set_meta(self, **values) -> None:
        self.db.conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 [(key, str(value)) for key, value in values.items()])

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

    @serialized
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

    @serialized
    def document_count(self, owners: Iterable[str] | None = None) -> int:
        where, values = _owned_by(owners)
        return self.db.execute(f"SELECT count(*) FROM documents d {where}", values).fetchone()[0]

    @serialized
    def passage_count(self, owners: Iterable[str] | None = None) -> int:
        """Every passage, or those of the documents of these owners."""
        if owners is None:
            return self.db.execute("SELECT count(*) FROM passages").fetchone()[0]
        where, values = _owned_by(owners)
        return self.db.execute(f"SELECT coalesce(sum(passage_count), 0) FROM documents d {where}",
                               values).fetchone()[0]

    @serialized
    def usage(self, owner: str) -> tuple[int, int]:
        """(documents, bytes) of one owner's documents."""
        count, size = self.db.execute("SELECT count(*), coalesce(sum(size), 0) FROM documents WHERE owner = ?",
                                      [owner]).fetchone()
        return count, size

    @serialized
    def document(self, path: str, owner: str = SHARED) -> dict | None:
        rows = list(self.db.query("SELECT * FROM documents WHERE owner = ? AND path = ?", [owner, path]))
        return rows[0] if rows else None

    @serialized
    def document_by_id(self, document_id: int) -> dict | None:
        rows = list(self.db.query("SELECT * FROM documents WHERE id = ?", [document_id]))
        return rows[0] if rows else None

    @serialized
    def documents(self, owners: Iterable[str] | None = None) -> list[dict]:
        """Every document, or those of these owners, by path."""
        where, values = _owned_by(owners)
        return list(self.db.query(f"SELECT * FROM documents d {where} ORDER BY path, owner", values))

    @serialized
    def documents_under(self, given: str | os.PathLike, owner: str = SHARED) -> list[str]:
        """The stored paths a user means by `given` among `owner`'s documents: that file, or every
        file under that folder, by the path as given (a link inside an ingested folder is stored
        under its own path), else by the path it resolves to (a file or folder given directly is
        stored resolved)."""
        given = Path(given).expanduser()
        stored = [d["path"] for d in self.documents([owner])]
        for spelling in dict.fromkeys([os.path.abspath(given), str(given.resolve())]):
            folder = spelling.rstrip(os.sep) + os.sep
            matches = [path for path in stored if path == spelling or path.startswith(folder)]
            if matches:
                return matches
        return []

    @serialized
    def passages(self, ids: Iterable[int]) -> dict[int, Passage]:
        """The passages with these ids (missing ids are left out), by id."""
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        found: dict[int, Passage] = {}
        for chunk, marks in _in_chunks(ids):
            for row in self.db.query(
                f"SELECT p.id, p.document_id, d.path, p.position, p.start_char, p.end_char, p.text, "
                f"{self._name} AS name FROM passages p JOIN documents d ON d.id = p.document_id WHERE p.id IN ({marks})",
                chunk,
            ):
                found[row["id"]] = Passage(**{**row, "name": row["name"] or _file_name(row["path"])})
        return found

    @serialized
    def document_passages(self, document_id: int, start: int, end: int) -> tuple[int, list[tuple[int, int, str]]]:
        """(the document's length: its last passage's end character, the (start_char, end_char,
        text) of its passages that hold a character of [start, end), in document order). The
        store keeps no other copy of a document's text: its passages, with their offsets, are it."""
        with self._snapshot():
            length = self.db.execute("SELECT coalesce(max(end_char), 0) FROM passages WHERE document_id = ?",
                                     [document_id]).fetchone()[0]
            rows = self.db.execute("SELECT start_char, end_char, text FROM passages WHERE document_id = ? "
                                   "AND end_char > ? AND start_char < ? ORDER BY start_char, position",
                                   [document_id, start, end]).fetchall()
        return length, [tuple(row) for row in rows]

    @serialized
    def embeddings(self, ids: Iterable[int] | None = None,
                   owners: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) from SQLite, for the given ids, or for every passage (of these owners'
        documents), in id order."""
        with self._snapshot():  # the count and the rows of one state: another process may be writing
            dimension = self.dimension or 0
            if ids is None:
                where, values = _owned_by(owners)
                count = self.passage_count(owners)
                batches = [(self.db.execute(f"SELECT p.id, p.embedding FROM passages p JOIN documents d "
                                            f"ON d.id = p.document_id {where} ORDER BY p.id", values), count)]
            else:
                wanted = sorted(int(i) for i in ids)
                batches = [(self.db.execute(f"SELECT id, embedding FROM passages WHERE id IN ({marks}) ORDER BY id",
                                            chunk), len(chunk)) for chunk, marks in _in_chunks(wanted)]
            labels = np.empty(sum(size for _, size in batches), dtype=np.int64)
            vectors = np.empty((len(labels), dimension), dtype=np.float32)
            row = 0
            for cursor, _ in batches:  # row by row into one array: a big store is read once, not thrice
                for passage_id, blob in cursor:
                    labels[row] = passage_id
                    vectors[row] = np.frombuffer(blob, dtype=np.float32)
                    row += 1
            return labels[:row], vectors[:row]

    @serialized
    def vectors_for_texts(self, texts: Iterable[str]) -> dict[str, np.ndarray]:
        """The stored vector of each of these passage texts that is already in the store."""
        found: dict[str, np.ndarray] = {}
        for chunk, marks in _in_chunks(list(dict.fromkeys(texts))):
            for text, blob in self.db.execute(
                    f"SELECT text, embedding FROM passages WHERE text IN ({marks})", chunk):
                found.setdefault(text, np.frombuffer(blob, dtype=np.float32))
        return found

    # -- writes ---------------------------------------------------------------------------

    @serialized
    def write_documents(self, documents: list[NewDocument], embedder: str) -> None:
        """Insert or replace these documents and their passages, all in one transaction."""
        if not documents:
            return
        if any(not document.passages for document in documents):
            raise ValueError("a document needs at least one passage")
        dimension = int(documents[0].embeddings.shape[1])
        removed: list[tuple[np.ndarray, np.ndarray]] = []
        added: list[tuple[np.ndarray, np.ndarray]] = []
        with self._writing():
            self.check_embedder(embedder, dimension)
            for document in documents:
                found = self._delete_document(document.path, document.owner)
                if found is not None:
                    removed.append(found)
                cursor = self.db.execute(
                    "INSERT INTO documents (owner, path, content_hash, size, mtime, passage_count, ingested_at, "
                    "name) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [document.owner, document.path, document.content_hash, document.size, document.mtime,
                     len(document.passages), now(), document.name or _file_name(document.path)],
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
                added.append((np.asarray(ids, dtype=np.int64), vectors, document.owner))
            version = self._bump_version(embedder=embedder, dimension=dimension)
        self._index_after_write(version, removed, added)

    @serialized
    def touch_document(self, path: str, mtime: float, owner: str = SHARED) -> None:
        """Record a new mtime for a document whose content did not change."""
        if self.read_only:
            return  # only a hint that spares the next ingest a hash
        with self._writing():
            self.db.execute("UPDATE documents SET mtime = ? WHERE owner = ? AND path = ?", [mtime, owner, path])

    @serialized
    def name_document(self, path: str, name: str, owner: str = SHARED) -> None:
        """Show an unchanged document by a new name (it was ingested again, from another folder)."""
        if self.read_only:
            return
        with self._writing():
            self.db.execute("UPDATE documents SET name = ? WHERE owner = ? AND path = ?", [name, owner, path])

    @serialized
    def remove(self, paths: Iterable[str], owner: str = SHARED) -> list[str]:
        """Remove these documents of `owner`, their passages and their vectors; return the paths removed."""
        removed_paths, removed = [], []
        with self._writing():
            for path in paths:
                found = self._delete_document(path, owner)
                if found is not None:
                    removed_paths.append(path)
                    removed.append(found)
            version = self._bump_version() if removed_paths else None
        if version is not None:
            self._index_after_write(version, removed, [])
        return removed_paths

    @serialized
    def replace_embeddings(self, ids: np.ndarray, vectors: np.ndarray, embedder: str) -> None:
        """Swap every passage's vector for one from another embedder (re-embedding), atomically."""
        with self._writing():
            self.db.conn.executemany(
                "UPDATE passages SET embedding = ? WHERE id = ?",
                [(vector.astype(np.float32).tobytes(), int(i)) for i, vector in zip(ids, vectors)],
            )
            self._bump_version(embedder=embedder, dimension=int(vectors.shape[1]))
        self._reload_index()

    def _bump_version(self, **meta) -> int:
        """Inside a write: the next passages_version, stored with `meta`."""
        version = self.passages_version + 1
        self._set_meta(passages_version=version, **meta)
        return version

    def _delete_document(self, path: str, owner: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Inside a write: delete `owner`'s document at `path`; the (ids, vectors) of its passages,
        or None when there is no such document."""
        row = self.db.execute("SELECT id FROM documents WHERE owner = ? AND path = ?", [owner, path]).fetchone()
        if row is None:
            return None
        rows = self.db.execute("SELECT id, embedding FROM passages WHERE document_id = ? ORDER BY id",
                               [row[0]]).fetchall()
        self.db.execute("DELETE FROM passages WHERE document_id = ?", [row[0]])
        self.db.execute("DELETE FROM documents WHERE id = ?", [row[0]])
        ids = np.asarray([r[0] for r in rows], dtype=np.int64)
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
        return ids, vectors.reshape(len(rows), self.dimension or 0)

    @serialized
    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
