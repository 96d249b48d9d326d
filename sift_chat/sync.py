"""Synced folders: a folder on this machine kept in step with its documents in one collection.

    FolderSync     one pass over one folder. A stat-only scan (size and mtime_ns of every file,
                   compared with what the last pass recorded: `synced`) finds what changed; only
                   that is read. New and changed files are ingested (`corpus.ingest_files`: the
                   ingest's rules, limits and skip reasons); a renamed or moved file is found by
                   its content hash and its document renamed, not embedded again; a deleted file's
                   document is removed.
    stop_syncing   forget a folder, keeping or removing its documents.

When passes run (watchdog's events, rescans, the app's watchers) is `watching`'s.

Rules, as for an ingest: regular files only; hidden files and folders, tool folders and the data
folder never read; the size cap; the owner's quota (not the shared library's). Besides:
- A file is taken once its size and mtime have held for `settle` seconds (one still being written
  is left pending); a file last modified longer ago than that is taken at first sight.
- A folder that is gone (unmounted), cannot be listed, or is found empty while its files were in
  the corpus keeps its documents: nothing is removed until it is back (and synced as usual), or
  the user stops syncing it and chooses to remove them. A subfolder that cannot be listed keeps
  its files' documents too.
- Passes of one process take one lock (the app's ingests' line), never the model's; documents
  are written as the ingest writes them, each whole or absent, so a pass killed at any point is
  completed by the next (a written document whose state was not recorded is found unchanged).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .access import SHARED
from .corpus import IngestProgress, document_names, ingest_files
from .parsing import PARSE_SECONDS
from .reading import DEFAULT_MAX_FILE_BYTES, UnreadableFile, iter_files, read_bytes, regular_file_stat
from .store import Store
from .synced import IN_STEP, PENDING, SKIPPED

SETTLE_SECONDS = 1.0  # a file is taken once unchanged this long (a save, a copy still running)
UNLISTABLE = "cannot open the folder"  # `iter_files`' reason for a folder it could not list


@dataclass(frozen=True)
class SyncOptions:
    embedder_name: str
    forbidden: tuple[Path, ...] = ()  # never read (sift-chat's data folder)
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    parse_seconds: float | None = PARSE_SECONDS
    quota_documents: int | None = None  # the owner's quota; the shared library has none
    quota_bytes: int | None = None
    settle: float = SETTLE_SECONDS
    progress: bool = False  # a tqdm bar (the CLI)


@dataclass
class SyncReport:
    """What one pass did."""

    folder: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (old path, new path)
    removed: list[str] = field(default_factory=list)
    in_step: int = 0  # files in the corpus as they are (after the pass)
    pending: list[str] = field(default_factory=list)  # still changing: taken by a later pass
    settles_in: float = 0.0  # when a pending file may have settled, in s: the next pass is due then
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    error: str = ""  # why the pass could not finish, one line
    missing: bool = False  # the folder is gone: its documents are kept
    seconds: float = 0.0

    def summary(self) -> str:
        text = (f"{len(self.added)} added, {len(self.updated)} updated, {len(self.renamed)} renamed, "
                f"{len(self.removed)} removed; {self.in_step} in step, {len(self.pending)} pending, "
                f"{len(self.skipped)} skipped ({self.seconds:.1f} s)")
        return f"{text}; {self.error}" if self.error else text


def _state(path: str, size: int, mtime_ns: int, status: str, content_hash: str = "", reason: str = "") -> dict:
    """A file's row in `synced_files` (size -1: look at it again at the next pass)."""
    return {"path": path, "size": size, "mtime_ns": mtime_ns, "content_hash": content_hash, "status": status,
            "reason": reason}


def _same(row: dict | None, state: dict) -> bool:
    return row is not None and all(row[key] == value for key, value in state.items())


def inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def folder_refusal(folder: str | os.PathLike, store: Store, owner: str, forbidden=()) -> str:
    """Why `folder` cannot be synced into `owner`'s collection ('' when it can): a folder that
    is there, not hidden, not sift-chat's data, not inside or around one synced there already."""
    given = Path(folder).expanduser()
    if not given.is_dir():
        return f"not a folder: {folder}"
    path = given.resolve()
    if any(part.startswith(".") for part in (*Path(os.path.abspath(given)).parts, *path.parts)):
        return "a hidden folder (its name, or a folder's above it, starts with '.'): never read"
    for data in (store.folder, *forbidden):
        data = Path(data).resolve()
        if path == data or data in path.parents:
            return "that is sift-chat's own data folder: it is never read"
    for synced in store.synced_folders():
        if synced["owner"] == owner and synced["path"] != str(path) and (
                inside(str(path), synced["path"]) or inside(synced["path"], str(path))):
            return f"it overlaps a folder synced into that collection already ({synced['path']})"
    return ""


class FolderSync:
    """Passes over one synced folder (a row of `synced_folders`). `lock` is the line the passes
    wait in (the app's ingests'); `stop`, once set, ends a pass before its next file."""

    def __init__(self, store: Store, embedder, folder: dict, options: SyncOptions,
                 lock: threading.Lock | None = None, stop: threading.Event | None = None):
        self.store, self.embedder, self.options = store, embedder, options
        self.folder_id, self.owner, self.root = folder["id"], folder["owner"], Path(folder["path"])
        self.lock = lock or threading.Lock()
        self.stop = stop or threading.Event()
        self.name_of = document_names([self.root])
        self.progress: IngestProgress | None = None  # of the ingest running now, if any
        self._changing: dict[str, tuple[tuple[int, int], float]] = {}  # path → (stat, since when, monotonic)

    def run(self, on_progress: Callable[[IngestProgress], None] | None = None) -> SyncReport:
        """One pass: the folder's documents in step with its files, as far as they have settled."""
        with self.lock:
            started = time.perf_counter()
            report = SyncReport(str(self.root))
            if self.stop.is_set() or self.store.synced_folder(self.folder_id) is None:
                report.error = "no longer synced"  # stopped while this pass waited in the line
                return report
            try:
                self._sync(report, on_progress)
            except Exception as error:  # the store locked by another process, a disk error: the next pass retries
                report.error = " ".join(f"the pass stopped: {error}".split())
            finally:
                self.progress = None
            report.seconds = time.perf_counter() - started
            self.store.finish_sync_pass(self.folder_id, report.error, report.missing)
            return report

    def _gone(self) -> str:
        """Why the folder cannot be synced now ('' when it can)."""
        try:
            with os.scandir(self.root):
                return ""
        except FileNotFoundError:
            return "the folder is not there (unmounted, renamed or deleted?): its documents are kept"
        except OSError as error:
            return f"cannot open the folder ({error.strerror or error}): its documents are kept"

    def _settles_in(self, key: str, stat: tuple[int, int], mtime: float) -> float:
        """0 when a file is done changing (last modified over `settle` s ago, or seen with this
        size and mtime for that long), else the seconds until it may be."""
        now, settle = time.monotonic(), self.options.settle
        age = time.time() - mtime
        if age >= settle:
            self._changing.pop(key, None)
            return 0.0
        seen = self._changing.get(key)
        if seen is None or seen[0] != stat:
            self._changing[key] = seen = (stat, now)
        return max(min(settle - age, settle - (now - seen[1])), 0.0)

    def _sync(self, report: SyncReport, on_progress) -> None:
        rows = {row["path"]: row for row in self.store.synced_files(self.folder_id)}
        report.error = self._gone()
        if report.error:
            report.missing = True
            return
        documents = self.store.folder_documents(self.owner, str(self.root))
        states, changed, gone = self._scan(rows, documents, report)
        no_file_left = not changed and all(state["status"] == SKIPPED for state in states.values())
        if no_file_left and any(key in documents for key in gone):
            report.missing = True  # an emptied mount point looks like this: nothing is removed
            report.error = "the folder is empty (unmounted?): its documents are kept"
            return

        to_read = self._renames(changed, gone, documents, states, report)
        removed = [key for key in gone if key in documents]
        if removed:
            report.removed = self.store.remove(removed, self.owner)
        self.store.record_synced_files(self.folder_id, [], gone)
        to_read = self._within_quota(to_read, documents, states)
        if to_read:
            self._ingest(to_read, states, report, on_progress)
        self.store.record_synced_files(self.folder_id, [state for key, state in states.items()
                                                        if not _same(rows.get(key), state)])
        report.pending = sorted(key for key, state in states.items() if state["status"] == PENDING)
        report.skipped = sorted((key, state["reason"]) for key, state in states.items() if state["status"] == SKIPPED)
        report.in_step = sum(state["status"] == IN_STEP for state in states.values())

    def _scan(self, rows: dict, documents: dict, report: SyncReport) -> tuple[dict, list, list]:
        """The stat-only look: (every file's state as it stands, the settled files whose stat
        changed since the last pass (to read), the recorded files that are gone). Opens nothing."""
        walk_skipped: list[tuple[str, str]] = []
        files = list(iter_files([self.root], walk_skipped, forbidden=[self.store.folder, *self.options.forbidden]))
        states = {str(path): _state(str(path), -1, -1, SKIPPED, reason=reason) for path, reason in walk_skipped}
        changed = []
        for path in files:
            key = str(path)
            try:
                info = regular_file_stat(path)
            except UnreadableFile as reason:
                states[key] = _state(key, -1, -1, SKIPPED, reason=str(reason))
                continue
            row, stat = rows.get(key), (info.st_size, info.st_mtime_ns)
            if row is not None and (row["size"], row["mtime_ns"]) == stat and (
                    row["status"] == SKIPPED or (row["status"] == IN_STEP and key in documents)):
                states[key] = {name: row[name] for name in _state(key, 0, 0, "")}
            elif not (wait := self._settles_in(key, stat, info.st_mtime)):
                changed.append((path, info))
            else:
                states[key] = _state(key, *stat, PENDING)
                report.settles_in = min(report.settles_in or wait, wait)
        seen = {str(path) for path in files} | set(states)
        self._changing = {key: value for key, value in self._changing.items() if key in seen}
        unlisted = [str(path) for path, reason in walk_skipped if reason.startswith(UNLISTABLE)]
        gone = []
        for key in (key for key in rows if key not in seen):
            if any(key == folder or inside(key, folder) for folder in unlisted):
                states[key] = {name: rows[key][name] for name in _state(key, 0, 0, "")}  # kept as it was
            else:
                gone.append(key)
        return states, changed, gone

    def _renames(self, changed, gone: list[str], documents: dict, states: dict, report: SyncReport) -> list:
        """Give a gone file's document to a new file with its content (renamed or moved): kept,
        not embedded again. Only new files are hashed, and only while some file is gone. The
        files still to read."""
        by_hash: dict[str, list[str]] = {}
        for key in gone:
            if key in documents:
                by_hash.setdefault(documents[key]["content_hash"], []).append(key)
        to_read = []
        for path, info in changed:
            key = str(path)
            old = None
            if by_hash and key not in documents:
                try:
                    content_hash = hashlib.sha256(read_bytes(path, self.options.max_file_bytes)).hexdigest()
                except UnreadableFile:
                    content_hash = ""  # the ingest reports why
                olds = by_hash.get(content_hash)
                if olds:
                    old = olds.pop()
                    if not olds:
                        del by_hash[content_hash]
            if old is None:
                to_read.append((path, info))
                continue
            state = _state(key, info.st_size, info.st_mtime_ns, IN_STEP, content_hash)
            if self.store.move_document(self.folder_id, old, key, self.name_of(path), info.st_mtime, state,
                                        self.owner):
                gone.remove(old)
                documents[key] = documents.pop(old)
                states[key] = state
                report.renamed.append((old, key))
            else:
                to_read.append((path, info))
        return to_read

    def _within_quota(self, to_read: list, documents: dict, states: dict) -> list:
        """The files that fit in the owner's quota, in order; the rest skipped (and looked at
        again at every pass: removing documents makes room)."""
        if self.owner == SHARED or self.options.quota_documents is None:
            return to_read
        count, used = self.store.usage(self.owner)
        max_bytes = self.options.quota_bytes if self.options.quota_bytes is not None else float("inf")
        taken = []
        for path, info in to_read:
            key = str(path)
            known = documents.get(key)
            more_documents = count + (known is None)
            more_bytes = used + info.st_size - (known["size"] if known else 0)
            if more_documents > self.options.quota_documents or more_bytes > max_bytes:
                states[key] = _state(key, -1, -1, SKIPPED, reason=(
                    f"over your quota of {self.options.quota_documents} documents and "
                    f"{max_bytes / 2**20:.0f} MiB: remove some documents to add it"))
                continue
            count, used = more_documents, more_bytes
            taken.append((path, info))
        return taken

    def _ingest(self, to_read: list, states: dict, report: SyncReport, on_progress) -> None:
        def progress(state: IngestProgress) -> None:
            self.progress = state
            if on_progress:
                on_progress(state)

        result = ingest_files(self.store, self.embedder, [path for path, _ in to_read], self.name_of,
                              embedder_name=self.options.embedder_name, max_file_bytes=self.options.max_file_bytes,
                              progress=self.options.progress, on_progress=progress, owner=self.owner,
                              parse_seconds=self.options.parse_seconds, stop=self.stop)
        report.added, report.updated = result.added, result.updated
        documents = self.store.folder_documents(self.owner, str(self.root))
        reasons = dict(result.skipped)
        done = {*result.added, *result.updated, *result.unchanged}
        for path, info in to_read:
            key = str(path)
            if key in reasons:
                states[key] = _state(key, info.st_size, info.st_mtime_ns, SKIPPED, reason=reasons[key])
            elif key in done and key in documents:
                states[key] = _state(key, info.st_size, info.st_mtime_ns, IN_STEP, documents[key]["content_hash"])
            else:  # not reached (stopped): the next pass takes it
                states[key] = _state(key, -1, -1, PENDING)


def stop_syncing(store: Store, folder: dict, remove_documents: bool) -> list[str]:
    """Forget a synced folder; with `remove_documents`, its files' documents go too (the paths
    removed). Documents of files it never synced (an upload, an earlier ingest) stay."""
    removed = []
    if remove_documents:
        removed = store.remove([row["path"] for row in store.synced_files(folder["id"])], folder["owner"])
    store.remove_synced_folder(folder["id"])
    return removed
