"""What a caller may add to a collection, and where it is kept: an upload is read only when this
caller's own upload request brought it (`UploadLedger`, kept by the web layer) and it lies in the
web server's upload folder; it is copied owner-only into the data folder (one folder per
collection), and counted against the owner's quota before anything is read.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

from .access import SHARED
from .reading import UnreadableFile, iter_files, regular_file_stat
from .store import Store


class UploadLedger:
    """The files the web server wrote for each caller's upload requests, as the paths it answered
    with: what that caller may later name as an upload. Gradio makes this check itself only in an
    app started by `launch()` (not when mounted, as `server.py` serves it), and never per user.
    A path is held for `max_age` seconds; a caller's oldest paths go beyond `per_caller`."""

    def __init__(self, max_age: float = 3600, per_caller: int = 1000):
        self.max_age, self.per_caller = max_age, per_caller
        self._paths: dict[str, OrderedDict[str, float]] = {}
        self._lock = threading.Lock()

    def record(self, caller_key: str, paths: Iterable[str]) -> None:
        now = time.monotonic()
        with self._lock:
            held = self._paths.setdefault(caller_key, OrderedDict())
            for path in paths:
                held[os.path.abspath(path)] = now
                held.move_to_end(os.path.abspath(path))
            while len(held) > self.per_caller:
                held.popitem(last=False)

    def holds(self, caller_key: str, path: str) -> bool:
        """Whether `path` came with one of this caller's upload requests in the last `max_age` s."""
        if not isinstance(path, str) or not path:
            return False
        with self._lock:
            recorded = self._paths.get(caller_key, {}).get(os.path.abspath(path))
        return recorded is not None and time.monotonic() - recorded <= self.max_age


def upload_refusal(source: Path | None, upload_folder: Path | None, max_bytes: int) -> str:
    """Why this upload is not read ('' when it is): only a regular file inside `upload_folder`,
    as given and as resolved (no link out of it), not hidden, at most `max_bytes`."""
    if source is None:
        return "not an uploaded file"
    if upload_folder is None:
        return "uploads are not accepted here"
    if not (upload_folder in Path(os.path.abspath(source)).parents and upload_folder in source.resolve().parents):
        return "not an uploaded file (only files uploaded through the app are read)"
    if source.name.startswith("."):
        return "a hidden file (its name starts with '.'): not read"
    try:
        size = regular_file_stat(source).st_size
    except UnreadableFile as reason:
        return str(reason)
    if size > max_bytes:
        return f"too large ({size / 2**20:.1f} MiB > {max_bytes / 2**20:.0f} MiB)"
    return ""


def quota_refusal(store: Store, owner: str, copies: dict[Path, int], folders: list[Path], forbidden: list[Path],
                  max_documents: int, max_bytes: int) -> str:
    """'' when `owner`'s documents stay within the quota once these copies (path → size) and the
    files under `folders` are in, else one line saying so. A file replacing a stored one of the
    same path counts only its growth; the shared library has no quota."""
    if owner == SHARED:
        return ""
    incoming = dict(copies)
    for path in iter_files(folders, forbidden=forbidden):
        try:
            incoming[path] = regular_file_stat(path).st_size
        except UnreadableFile:  # skipped by the ingest, with its reason
            continue
    documents, used = store.usage(owner)
    added_documents, added_bytes = 0, 0
    for path, size in incoming.items():
        known = store.document(str(path.resolve()), owner)
        added_documents += known is None
        added_bytes += size - (known["size"] if known else 0)
    if documents + added_documents <= max_documents and used + added_bytes <= max_bytes:
        return ""
    return (f"Over your quota of {max_documents} documents and {max_bytes / 2**20:.0f} MiB: you have {documents} "
            f"({used / 2**20:.1f} MiB), this would add {added_documents} ({max(added_bytes, 0) / 2**20:.1f} MiB); "
            "nothing was added, remove some documents first.")


def collection_folder(owner: str) -> str:
    """The folder of a collection's uploaded copies: a user's name never becomes a path."""
    return "shared" if owner == SHARED else hashlib.sha256(owner.encode()).hexdigest()[:24]


def private_copy(source: Path, target: Path) -> Path:
    """Copy `source` to `target`, readable by this process's user only (its folders too)."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for folder in (target.parent.parent, target.parent):
        folder.chmod(0o700)
    staging = target.with_name(f".{target.name}.{secrets.token_hex(8)}.part")  # two copies at once: two files
    with open(source, "rb") as reading, \
            os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as writing:
        shutil.copyfileobj(reading, writing)
    os.replace(staging, target)
    return target


def safe_name(name: str) -> str:
    name = re.sub(r"[^\w.\- ]+", "_", Path(name).name).strip(" .") or "upload"
    return name[:120]
