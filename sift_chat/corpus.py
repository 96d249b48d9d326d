"""The corpus stage: read a user's files, split them into passages, embed them, write them to the store.

Plain text, Markdown, source code (anything that decodes as UTF-8), HTML (its visible text) and
PDF (its text layer, through pypdf) are read. A file that cannot be read is reported with its
reason and skipped; the ingest goes on.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .store import NewDocument, NewPassage, Store

DEFAULT_PASSAGE_TOKENS = 192
DEFAULT_OVERLAP_TOKENS = 16
DEFAULT_MAX_FILE_BYTES = 32 * 1024 * 1024
SKIPPED_FOLDERS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", ".tox"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}


class UnreadableFile(Exception):
    """A file that is skipped; str(error) is the one-line reason."""


# -- reading ------------------------------------------------------------------------------


def iter_files(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Every file under `paths` (files as given, folders recursively, hidden and tool folders skipped),
    each once, in sorted order."""
    seen: set[Path] = set()
    for root in paths:
        root = Path(root).expanduser().resolve()
        if root.is_dir():
            candidates = sorted(
                Path(folder) / name
                for folder, folders, names in os.walk(root)
                if not _prune(folders)
                for name in names
                if not name.startswith(".")
            )
        else:
            candidates = [root]  # a missing path is reported by read_text
        for path in candidates:
            if path not in seen:
                seen.add(path)
                yield path


def _prune(folders: list[str]) -> bool:
    folders[:] = sorted(f for f in folders if f not in SKIPPED_FOLDERS and not f.startswith("."))
    return False


def read_text(path: Path, data: bytes | None = None, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str:
    """The text of a file, or UnreadableFile with the reason."""
    if data is None:
        data = read_bytes(path, max_bytes)
    if path.suffix.lower() == ".pdf" or data.startswith(b"%PDF-"):
        text = _pdf_text(data)
    elif b"\x00" in data[:8192]:
        raise UnreadableFile("binary file")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise UnreadableFile(f"not UTF-8 text (byte {error.start})") from None
        if path.suffix.lower() in HTML_SUFFIXES:
            text = _html_text(text)
    if not text.strip():
        raise UnreadableFile("no text")
    return text


def read_bytes(path: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UnreadableFile(f"too large ({size / 2**20:.1f} MiB > {max_bytes / 2**20:.0f} MiB)")
        return path.read_bytes()
    except FileNotFoundError:
        raise UnreadableFile("no such file") from None
    except OSError as error:
        raise UnreadableFile(f"cannot read: {error.strerror or error}") from None


def _pdf_text(data: bytes) -> str:
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # malformed PDFs are reported once, below
    try:
        reader = PdfReader(io.BytesIO(data))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as error:
        raise UnreadableFile(f"malformed PDF ({type(error).__name__})") from None


def _html_text(html: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for hidden in soup(["script", "style", "noscript", "template"]):
        hidden.decompose()
    lines = (line.strip() for line in soup.get_text("\n").splitlines())
    return "\n".join(line for line in lines if line)


# -- splitting ----------------------------------------------------------------------------


def split_passages(text: str, tokenizer, max_tokens: int, overlap: int = DEFAULT_OVERLAP_TOKENS) -> list[NewPassage]:
    """Split `text` into windows of at most `max_tokens` tokens that overlap by about `overlap` tokens.

    Windows end at a word boundary where one lies in the last quarter of the window, so a passage
    re-tokenised on its own has no more tokens than its window. Offsets are character offsets into
    `text`, so ``text[start_char:end_char] == passage.text``.
    """
    if max_tokens < 8:
        raise ValueError(f"passages need at least 8 tokens, got {max_tokens}")
    if not 0 <= overlap < max_tokens // 2:
        raise ValueError(f"overlap must be in [0, {max_tokens // 2}), got {overlap}")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)["offset_mapping"]
    offsets = [(a, b) for a, b in offsets if b > a]
    passages: list[NewPassage] = []
    start = 0
    while start < len(offsets):
        end = min(start + max_tokens, len(offsets))
        if end < len(offsets):
            end = _word_boundary(text, offsets, start + max_tokens * 3 // 4, end)
        first_char, last_char = offsets[start][0], offsets[end - 1][1]
        passages.append(NewPassage(position=len(passages), start_char=first_char, end_char=last_char,
                                   token_count=end - start, text=text[first_char:last_char]))
        if end == len(offsets):
            break
        start = max(end - overlap, start + 1)
    return passages


def _word_boundary(text: str, offsets: list[tuple[int, int]], lowest: int, end: int) -> int:
    """The largest e in (lowest, end] where token e starts a new word (after whitespace or punctuation)."""
    for e in range(end, lowest, -1):
        start_of_next = offsets[e][0]
        if start_of_next > offsets[e - 1][1] or not text[start_of_next - 1].isalnum():
            return e
    return end


# -- ingesting ----------------------------------------------------------------------------


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    passages: int = 0
    seconds: float = 0.0

    @property
    def ingested(self) -> int:
        return len(self.added) + len(self.updated)

    def summary(self) -> str:
        rate = self.passages / self.seconds if self.seconds else 0.0
        return (f"{len(self.added)} added, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
                f"{len(self.skipped)} skipped; {self.passages} passages in {self.seconds:.1f} s "
                f"({rate:.0f} passages/s)")


def passage_token_limit(embedder, passage_tokens: int) -> int:
    """Passages must fit the embedder whole: its max sequence less [CLS] and [SEP]."""
    return min(passage_tokens, int(embedder.max_seq_length) - 2)


def ingest(
    store: Store,
    embedder,
    paths: Iterable[str | os.PathLike],
    *,
    embedder_name: str,
    passage_tokens: int = DEFAULT_PASSAGE_TOKENS,
    overlap: int = DEFAULT_OVERLAP_TOKENS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    batch_passages: int = 256,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Ingest files and folders. Unchanged files (same content hash) are left as they are; changed
    ones replace their passages. Documents are embedded in batches across files and written one
    batch per SQLite transaction, so every document is either fully in the store or absent.

    `on_progress(files_done, files_total)` is called after each file (the app's progress bar).
    """
    import time

    from tqdm.auto import tqdm

    dimension = embedder.get_embedding_dimension()
    store.check_embedder(embedder_name, dimension)
    max_tokens = passage_token_limit(embedder, passage_tokens)
    report = IngestReport()
    started = time.perf_counter()
    own_folder = store.folder.resolve()
    files = [path for path in iter_files(paths) if own_folder not in path.parents]
    pending: list[tuple[str, str, int, float, list[NewPassage]]] = []
    pending_passages = 0
    bar = tqdm(total=len(files), unit="file", disable=not progress, desc="ingest")

    def flush() -> None:
        texts = [p.text for *_, passages in pending for p in passages]
        vectors = embedder.encode(texts, batch_size=64, normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
        documents, row = [], 0
        for path, content_hash, size, mtime, passages in pending:
            documents.append(NewDocument(path, content_hash, size, mtime, passages,
                                         vectors[row : row + len(passages)]))
            row += len(passages)
        store.write_documents(documents, embedder_name)
        report.passages += len(texts)
        pending.clear()

    for number, path in enumerate(files, 1):
        key = str(path)
        try:
            known = store.document(key)
            stat = path.stat() if path.exists() else None
            if known and stat and known["size"] == stat.st_size and known["mtime"] == stat.st_mtime:
                report.unchanged.append(key)
                continue
            data = read_bytes(path, max_file_bytes)
            content_hash = hashlib.sha256(data).hexdigest()
            if known and known["content_hash"] == content_hash:
                store.touch_document(key, stat.st_mtime)
                report.unchanged.append(key)
                continue
            passages = split_passages(read_text(path, data, max_file_bytes), embedder.tokenizer,
                                      max_tokens, overlap)
        except UnreadableFile as reason:
            report.skipped.append((key, str(reason)))
            continue
        finally:
            bar.update(1)
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(f"{report.passages / elapsed:.0f} passages/s", refresh=False)
            if on_progress:
                on_progress(number, len(files))
        (report.updated if known else report.added).append(key)
        pending.append((key, content_hash, len(data), stat.st_mtime, passages))
        pending_passages += len(passages)
        if pending_passages >= batch_passages:
            flush()
            pending_passages = 0
    if pending:
        flush()
    bar.close()
    report.seconds = time.perf_counter() - started
    return report


def reembed(store: Store, embedder, embedder_name: str, progress: bool = True) -> int:
    """Re-embed every passage with another embedder (one transaction); return the passage count."""
    ids, _ = store.embeddings()
    by_id = store.passages(ids)
    texts = [by_id[int(i)].text for i in ids]
    vectors = embedder.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                              show_progress_bar=progress)
    store.replace_embeddings(ids, np.asarray(vectors, dtype=np.float32), embedder_name)
    return len(ids)
