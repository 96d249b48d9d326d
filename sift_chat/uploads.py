"""What a caller may add to a collection, and where it is kept: uploads are read only from the web
server's upload folder, copied owner-only into the data folder (one folder per collection), and
counted against the owner's quota before anything is read.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path

from .access import SHARED
from .reading import UnreadableFile, iter_files, regular_file_stat
from .store import Store


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
