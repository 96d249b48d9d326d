"""The chat log, kept in the store's SQLite database: chats (each with its owner), their
messages, and for each answer its record and selection (the picks with σ² after each, the
uncertainty each removed, and the loss of its step). A chat is written together with its first
exchange, and an exchange in one transaction; a read-only store answers and records nothing.

`CHAT_SCHEMA` is its tables (chats, messages, selections), created with the store's. `ChatLog` is
the chat half of `store.Store` (which holds the connection, its lock and the transactions:
`self.db`, `self.lock`, `self._writing()`, `self.read_only`).
"""

from __future__ import annotations

import json

from .db import now, serialized

CHAT_SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL DEFAULT '',  -- whose chat: '' the local owner (and the CLI), else a user (`access`)
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


class ChatLog:
    """Chats, messages and selections in the store (a mixin of `store.Store`)."""

    def _chat_not_recorded(self) -> bool:
        """On a read-only store, chats are answered but not recorded (said once)."""
        if self.read_only:
            self._warn_once(f"the store {self.folder} is read-only: chats are answered but not recorded")
        return self.read_only

    @serialized
    def create_chat(self, title: str, owner: str = "") -> int | None:
        """The new chat's id (None on a read-only store)."""
        if self._chat_not_recorded():
            return None
        with self._writing():
            return self._insert_chat(title, owner)

    @serialized
    def chats(self, owner: str = "") -> list[dict]:
        """One owner's chats, the most recently used first."""
        return list(self.db.query("SELECT * FROM chats WHERE owner = ? ORDER BY updated_at DESC, id DESC",
                                  [owner]))

    @serialized
    def chat(self, chat_id: int) -> dict | None:
        rows = list(self.db.query("SELECT * FROM chats WHERE id = ?", [chat_id]))
        return rows[0] if rows else None

    @serialized
    def rename_chat(self, chat_id: int, title: str) -> None:
        with self._writing():
            self.db.execute("UPDATE chats SET title = ? WHERE id = ?", [title, chat_id])

    @serialized
    def delete_chat(self, chat_id: int) -> None:
        with self._writing():
            self.db.execute("DELETE FROM chats WHERE id = ?", [chat_id])

    @serialized
    def messages(self, chat_id: int) -> list[dict]:
        return list(self.db.query("SELECT * FROM messages WHERE chat_id = ? ORDER BY id", [chat_id]))

    @serialized
    def selection_rows(self, message_id: int) -> list[dict]:
        return list(self.db.query("SELECT * FROM selections WHERE message_id = ? ORDER BY step", [message_id]))

    @serialized
    def record_exchange(self, chat_id: int | None, prompt: str, answer: str, record: dict,
                        picks: list[dict]) -> int | None:
        """The prompt, the answer (with its record) and its picks, in one transaction; the answer's
        id (None on a read-only store)."""
        if self._chat_not_recorded() or chat_id is None:
            return None
        with self._writing():
            return self._insert_exchange(chat_id, prompt, answer, record, picks)

    @serialized
    def start_chat(self, title: str, owner: str, prompt: str, answer: str, record: dict,
                   picks: list[dict]) -> tuple[int, int] | None:
        """A new chat and its first exchange, in one transaction (a chat never exists empty):
        (the chat's id, the answer's id); None on a read-only store."""
        if self._chat_not_recorded():
            return None
        with self._writing():
            chat_id = self._insert_chat(title, owner)
            return chat_id, self._insert_exchange(chat_id, prompt, answer, record, picks)

    def _insert_chat(self, title: str, owner: str) -> int:
        """Inside a write: a new chat; its id."""
        stamp = now()
        return self.db.execute("INSERT INTO chats (owner, title, created_at, updated_at) VALUES (?, ?, ?, ?)",
                               [owner, title, stamp, stamp]).lastrowid

    def _insert_exchange(self, chat_id, prompt, answer, record, picks) -> int:
        """Inside a write: the prompt, the answer and its picks; the answer's id."""
        stamp = now()
        self.db.execute("INSERT INTO messages (chat_id, role, content, created_at) VALUES (?, ?, ?, ?)",
                        [chat_id, "user", prompt, stamp])
        cursor = self.db.execute(
            "INSERT INTO messages (chat_id, role, content, created_at, record) VALUES (?, ?, ?, ?, ?)",
            [chat_id, "assistant", answer, stamp, json.dumps(record)])
        message_id = cursor.lastrowid
        self.db["selections"].insert_all({"message_id": message_id, **pick} for pick in picks)
        self.db.execute("UPDATE chats SET updated_at = ? WHERE id = ?", [stamp, chat_id])
        return message_id
