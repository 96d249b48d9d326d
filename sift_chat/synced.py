"""The synced folders' tables, kept in the store's SQLite database (schema 5): which folders are
synced into which collection, by whom, and each file's state as the last pass saw it (its size
and mtime, so that a rescan reads no content; its content hash, so that a renamed file keeps its
document). The logic that keeps a folder in step is `sync`'s.

`SyncedFolders` is a mixin of `store.Store` (which holds the connection, its lock and the
transactions: `self.db`, `self.lock`, `self._writing()`, and the document writes it reuses).
"""

from __future__ import annotations

import os
from typing import Iterable

from .db import now, serialized

IN_STEP, PENDING, SKIPPED = "in step", "pending", "skipped"  # a file's status

SYNC_SCHEMA = """
CREATE TABLE IF NOT EXISTS synced_folders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,           -- the collection its documents go into ('' the shared library)
    added_by TEXT NOT NULL,        -- who syncs it (a caller's owner): only they see it in the app
    path TEXT NOT NULL,            -- the folder, resolved
    added_at TEXT NOT NULL,
    synced_at TEXT,                -- when the last pass ended
    error TEXT NOT NULL DEFAULT '', -- why the last pass could not finish, one line ('' when it did)
    missing_since TEXT,            -- since when the folder is gone (unmounted?): its documents are kept
    UNIQUE (owner, path)
);
CREATE TABLE IF NOT EXISTS synced_files (
    folder_id INTEGER NOT NULL REFERENCES synced_folders(id) ON DELETE CASCADE,
    path TEXT NOT NULL,            -- the file, as its document's path
    size INTEGER NOT NULL,         -- as last seen; -1: look again at the next pass
    mtime_ns INTEGER NOT NULL,
    content_hash TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,          -- 'in step', 'pending' (still changing) or 'skipped'
    reason TEXT NOT NULL DEFAULT '', -- why it was skipped, one line
    PRIMARY KEY (folder_id, path)
);
"""


def _under(folder: str) -> tuple[str, str]:
    """The range of paths inside `folder` (for `path >= ? AND path < ?`: the index answers it)."""
    prefix = folder.rstrip(os.sep) + os.sep
    return prefix, prefix[:-1] + chr(ord(os.sep) + 1)


class SyncedFolders:
    """Synced folders and their files' states in the store (a mixin of `store.Store`)."""

    def _has_sync_tables(self) -> bool:
        return self.db["synced_folders"].exists()  # a read-only store of schema 4 has none

    @serialized
    def add_synced_folder(self, path: str, owner: str, added_by: str) -> dict:
        """The folder synced into `owner`'s collection (added now, or as it was)."""
        with self._writing():
            self.db.execute("INSERT OR IGNORE INTO synced_folders (owner, added_by, path, added_at) "
                            "VALUES (?, ?, ?, ?)", [owner, added_by, path, now()])
        return next(self.db.query("SELECT * FROM synced_folders WHERE owner = ? AND path = ?", [owner, path]))

    @serialized
    def synced_folders(self, added_by: str | None = None) -> list[dict]:
        """Every synced folder (or those `added_by` syncs), with its files counted by status."""
        if not self._has_sync_tables():
            return []
        where, values = ("WHERE f.added_by = ?", [added_by]) if added_by is not None else ("", [])
        return list(self.db.query(
            "SELECT f.*, "
            f"(SELECT count(*) FROM synced_files s WHERE s.folder_id = f.id AND s.status = '{IN_STEP}') AS in_step, "
            f"(SELECT count(*) FROM synced_files s WHERE s.folder_id = f.id AND s.status = '{PENDING}') AS pending, "
            f"(SELECT count(*) FROM synced_files s WHERE s.folder_id = f.id AND s.status = '{SKIPPED}') AS skipped "
            f"FROM synced_folders f {where} ORDER BY f.path, f.owner", values))

    @serialized
    def synced_folder(self, folder_id: int) -> dict | None:
        if not self._has_sync_tables():
            return None
        rows = list(self.db.query("SELECT * FROM synced_folders WHERE id = ?", [folder_id]))
        return rows[0] if rows else None

    @serialized
    def synced_files(self, folder_id: int, status: str | None = None) -> list[dict]:
        where, values = ("AND status = ?", [status]) if status else ("", [])
        return list(self.db.query(f"SELECT * FROM synced_files WHERE folder_id = ? {where} ORDER BY path",
                                  [folder_id, *values]))

    @serialized
    def folder_documents(self, owner: str, folder: str) -> dict[str, dict]:
        """`owner`'s documents inside `folder`, by path (path, content_hash, size, mtime)."""
        low, high = _under(folder)
        return {row["path"]: row for row in self.db.query(
            "SELECT path, content_hash, size, mtime FROM documents WHERE owner = ? AND path >= ? AND path < ?",
            [owner, low, high])}

    @serialized
    def record_synced_files(self, folder_id: int, rows: Iterable[dict], gone: Iterable[str] = ()) -> None:
        """Write these files' states and forget the `gone` ones, in one transaction."""
        rows, gone = list(rows), list(gone)
        if not rows and not gone:
            return
        with self._writing():
            self.db["synced_files"].upsert_all([{**row, "folder_id": folder_id} for row in rows],
                                               pk=("folder_id", "path"))
            self.db.conn.executemany("DELETE FROM synced_files WHERE folder_id = ? AND path = ?",
                                     [(folder_id, path) for path in gone])

    @serialized
    def finish_sync_pass(self, folder_id: int, error: str = "", missing: bool = False) -> None:
        """A pass ended: when, with what error, and whether the folder was missing (since the
        first pass that found it gone)."""
        with self._writing():
            self.db.execute(
                "UPDATE synced_folders SET synced_at = ?, error = ?, "
                "missing_since = CASE WHEN ? THEN coalesce(missing_since, ?) ELSE NULL END WHERE id = ?",
                [now(), error, int(missing), now(), folder_id])

    @serialized
    def move_document(self, folder_id: int, old: str, new: str, name: str, mtime: float, row: dict,
                      owner: str) -> bool:
        """A synced file was renamed or moved: its document (passages, vectors) is kept under the
        new path and name, and its file state with it, in one transaction; a document that was
        at the new path is replaced. False when there was no document at `old`."""
        replaced, version = None, None
        with self._writing():
            found = self.db.execute("SELECT id FROM documents WHERE owner = ? AND path = ?", [owner, old]).fetchone()
            if found is None:
                return False
            replaced = self._delete_document(new, owner)
            self.db.execute("UPDATE documents SET path = ?, name = ?, mtime = ? WHERE id = ?",
                            [new, name, mtime, found[0]])
            self.db.execute("DELETE FROM synced_files WHERE folder_id = ? AND path IN (?, ?)", [folder_id, old, new])
            self.db["synced_files"].insert({**row, "folder_id": folder_id, "path": new})
            if replaced is not None:
                version = self._bump_version()
        if version is not None:
            self._index_after_write(version, [replaced], [])
        return True

    @serialized
    def remove_synced_folder(self, folder_id: int) -> None:
        """Stop syncing the folder (its file states go with it; its documents are the caller's
        to keep or remove first)."""
        with self._writing():
            self.db.execute("DELETE FROM synced_files WHERE folder_id = ?", [folder_id])
            self.db.execute("DELETE FROM synced_folders WHERE id = ?", [folder_id])
