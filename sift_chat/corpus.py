"""The corpus stage: read a user's files (`reading`), split them into passages, embed them, write
them to the store. A file that cannot be read is reported with its reason and skipped; the ingest
goes on.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .parsing import PARSE_SECONDS, ParseWorker
from .reading import (DEFAULT_MAX_FILE_BYTES, UnreadableFile, iter_files, parse_here, read_bytes,  # noqa: F401
                      read_text, regular_file_stat, shown)
from .store import SHARED, NewDocument, NewPassage, Store

DEFAULT_PASSAGE_TOKENS = 192
DEFAULT_OVERLAP_TOKENS = 16
ENCODE_BATCH = 16  # as fast as 64 on a CPU, and a third less memory at 256 tokens


# -- splitting ----------------------------------------------------------------------------

_WHITESPACE = re.compile(r"\s")


def split_passages(text: str, tokenizer, max_tokens: int, overlap: int = DEFAULT_OVERLAP_TOKENS) -> list[NewPassage]:
    """`iter_passages` as a list."""
    return list(iter_passages(text, tokenizer, max_tokens, overlap))


def iter_passages(text: str, tokenizer, max_tokens: int, overlap: int = DEFAULT_OVERLAP_TOKENS,
                  block_chars: int = 1 << 16) -> Iterator[NewPassage]:
    """Split `text` into windows of at most `max_tokens` tokens that overlap by about `overlap` tokens.

    Windows end at a word boundary where one lies in the last quarter of the window, so a passage
    re-tokenised on its own has no more tokens than its window. Offsets are character offsets into
    `text`, so ``text[start_char:end_char] == passage.text``. The text is tokenised in blocks of
    about `block_chars` characters cut before whitespace, and only the tokens of the current window
    are kept: memory stays flat however long the file.
    """
    if max_tokens < 8:
        raise ValueError(f"passages need at least 8 tokens, got {max_tokens}")
    if not 0 <= overlap < max_tokens // 2:
        raise ValueError(f"overlap must be in [0, {max_tokens // 2}), got {overlap}")
    offsets: list[tuple[int, int]] = []  # (start, end) characters of the tokens not yet passed
    tokenized = 0  # characters of `text` tokenised so far
    start, position = 0, 0

    def tokenize_next_block() -> bool:
        nonlocal tokenized
        if tokenized >= len(text):
            return False
        cut = len(text)
        if tokenized + block_chars < len(text):
            space = _WHITESPACE.search(text, tokenized + block_chars, tokenized + 2 * block_chars)
            cut = space.start() if space else tokenized + block_chars
        block = tokenizer(text[tokenized:cut], add_special_tokens=False, return_offsets_mapping=True,
                          verbose=False)["offset_mapping"]
        offsets.extend((a + tokenized, b + tokenized) for a, b in block if b > a)
        tokenized = cut
        return True

    while True:
        while len(offsets) - start <= max_tokens and tokenize_next_block():
            pass  # one token past the window, to see where a word starts
        if start >= len(offsets):
            return
        end = min(start + max_tokens, len(offsets))
        if end < len(offsets):
            end = _word_boundary(text, offsets, start + max_tokens * 3 // 4, end)
        first_char, last_char = offsets[start][0], offsets[end - 1][1]
        yield NewPassage(position=position, start_char=first_char, end_char=last_char,
                         token_count=end - start, text=text[first_char:last_char])
        position += 1
        if end == len(offsets):
            return
        start = max(end - overlap, start + 1)
        if start > 4096:  # drop the tokens behind the window
            del offsets[:start]
            start = 0


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


@dataclass(frozen=True)
class IngestProgress:
    """Where a running ingest stands. The passage total is an estimate until the last file is
    split: the passages per byte of the files split so far, times the bytes still to read."""

    files_done: int
    files_total: int
    passages_done: int
    passages_expected: int
    seconds: float

    @property
    def fraction(self) -> float:
        if self.passages_expected:
            return min(self.passages_done / self.passages_expected, 1.0)
        return self.files_done / max(self.files_total, 1)

    @property
    def seconds_left(self) -> float | None:
        if not self.passages_done or not self.seconds:
            return None
        return max(self.passages_expected - self.passages_done, 0) * self.seconds / self.passages_done

    def describe(self) -> str:
        """e.g. "1,024 of about 50,800 passages (3 of 10 files), about 9 min left"."""
        text = (f"{self.passages_done:,} of about {self.passages_expected:,} passages "
                f"({self.files_done} of {self.files_total} files)")
        left = self.seconds_left
        if left is not None:
            text += f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"
        return text


def passage_token_limit(embedder, passage_tokens: int) -> int:
    """Passages must fit the embedder whole: its max sequence less [CLS] and [SEP]."""
    return min(passage_tokens, int(embedder.max_seq_length) - 2)


def ingest(
    store: Store,
    embedder,
    paths: Iterable[str | os.PathLike],
    *,
    forbidden: Iterable[str | os.PathLike] = (),
    trusted: Iterable[str | os.PathLike] = (),
    **options,
) -> IngestReport:
    """Ingest files and folders: the files under `paths` that may be read, through `ingest_files`
    (whose keyword `options` these are: embedder_name, passage sizes, limits, progress, owner, the
    parse bound). Unchanged files (same content hash) are left as they are; changed ones replace
    their passages.

    Hidden files and folders, the store and the `forbidden` folders are never read, also when named
    directly (`iter_files`); a file that cannot be read is reported in `report.skipped` with its
    reason and the run goes on.
    """
    report = IngestReport()
    started = time.perf_counter()
    paths = list(paths)
    files = list(iter_files(paths, report.skipped, forbidden=[store.folder, *forbidden], trusted=trusted))
    return ingest_files(store, embedder, files, document_names(paths), report=report, started=started, **options)


def ingest_files(
    store: Store,
    embedder,
    files: list[Path],
    name_of: Callable[[Path], str],
    *,
    embedder_name: str,
    passage_tokens: int = DEFAULT_PASSAGE_TOKENS,
    overlap: int = DEFAULT_OVERLAP_TOKENS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    batch_passages: int = 256,
    progress: bool = True,
    on_progress: Callable[[IngestProgress], None] | None = None,
    owner: str = SHARED,
    parse_seconds: float | None = PARSE_SECONDS,
    report: IngestReport | None = None,
    started: float | None = None,
    stop: threading.Event | None = None,
) -> IngestReport:
    """`ingest` of files already found (`iter_files`: the rules of what is read are applied
    there), each shown as `name_of(path)`. `stop`, once set, ends the run before its next file;
    the files read so far are written (a synced folder's watcher stops so at shutdown).

    Documents are embedded in batches across files and written one batch per SQLite transaction,
    so every document is either fully in the store or absent. A passage whose exact text is already
    stored (a copied file) reuses that vector. Every file that cannot be read, decoded, parsed or
    split into at least one passage is reported in `report.skipped` with its reason; the run goes
    on. `on_progress` is called as files are read and passages embedded (the app's progress bar;
    the CLI shows the same in a tqdm bar). The documents are `owner`'s (by default the shared
    library's). HTML and PDF files are parsed in a child process (`parsing.ParseWorker`): one
    whose parse takes over `parse_seconds` is skipped with that reason (None: parsed here)."""
    from tqdm.auto import tqdm

    dimension = embedder.get_embedding_dimension()
    store.check_embedder(embedder_name, dimension)
    store.check_writable()
    max_tokens = passage_token_limit(embedder, passage_tokens)
    report = report if report is not None else IngestReport()
    started = started if started is not None else time.perf_counter()
    sizes = [_size_or_zero(path) for path in files]
    total_bytes = sum(sizes)
    counts = {"files": 0, "bytes": 0, "split_bytes": 0, "split_passages": 0, "embedded": 0}
    pending: list[tuple[str, str, int, float, list[NewPassage], str]] = []
    bar = tqdm(total=0, unit="passage", disable=not progress, desc="ingest", dynamic_ncols=True, delay=1.0)

    def tell() -> None:
        rate = counts["split_passages"] / counts["split_bytes"] if counts["split_bytes"] else 0.0
        expected = counts["split_passages"] + round(rate * max(total_bytes - counts["bytes"], 0))
        bar.total = max(expected, counts["embedded"])
        bar.update(counts["embedded"] - bar.n)
        if on_progress:
            on_progress(IngestProgress(counts["files"], len(files), counts["embedded"], bar.total,
                                       time.perf_counter() - started))

    def flush() -> None:
        # one matrix per document, filled in place: a long document's vectors are held once
        matrices = [np.empty((len(passages), dimension), np.float32) for *_, passages, _ in pending]
        wanted: dict[str, list[tuple[int, int]]] = {}  # text → (document, row) slots to fill
        for number, (*_, passages, _) in enumerate(pending):
            for row, passage in enumerate(passages):
                wanted.setdefault(passage.text, []).append((number, row))

        def fill(text: str, vector: np.ndarray) -> None:
            for number, row in wanted.pop(text):
                matrices[number][row] = vector
                counts["embedded"] += 1

        for text, vector in store.vectors_for_texts(wanted).items():
            fill(text, vector)  # copies of stored passages are not embedded again
        new = list(wanted)
        for chunk_start in range(0, len(new), batch_passages):
            chunk = new[chunk_start : chunk_start + batch_passages]
            encoded = embedder.encode(chunk, batch_size=ENCODE_BATCH, normalize_embeddings=True,
                                      convert_to_numpy=True, show_progress_bar=False)
            for text, vector in zip(chunk, encoded):
                fill(text, vector)
            tell()
        store.write_documents([NewDocument(path, content_hash, size, mtime, passages, matrix, owner, name)
                               for (path, content_hash, size, mtime, passages, name), matrix in zip(pending, matrices)],
                              embedder_name)
        report.passages += sum(len(matrix) for matrix in matrices)
        pending.clear()

    parser = ParseWorker(parse_seconds) if parse_seconds else None
    try:
        for path, size in zip(files, sizes):
            if stop is not None and stop.is_set():
                break
            key = str(path)
            try:
                passages, content_hash, info, known = _read_and_split(
                    store, path, owner, max_file_bytes, embedder.tokenizer, max_tokens, overlap, parser or parse_here)
            except UnreadableFile as reason:
                report.skipped.append((key, str(reason)))
                passages = None
            finally:
                counts["files"] += 1
                counts["bytes"] += size
            if passages is None:
                tell()
                continue
            if not passages:  # unchanged
                if known and known.get("name") != name_of(path):  # given again, from another folder
                    store.name_document(key, name_of(path), owner)
                report.unchanged.append(key)
                tell()
                continue
            counts["split_bytes"] += size
            counts["split_passages"] += len(passages)
            (report.updated if known else report.added).append(key)
            pending.append((key, content_hash, info.st_size, info.st_mtime, passages, name_of(path)))
            tell()
            if sum(len(p) for *_, p, _ in pending) >= batch_passages:
                flush()
    finally:
        if parser is not None:
            parser.close()
    if pending:
        flush()
    tell()
    bar.close()
    report.seconds = time.perf_counter() - started
    return report


def document_names(given: Iterable[str | os.PathLike]) -> Callable[[Path], str]:
    """How a file found under `given` (`iter_files`) is shown: by the path the user named, not
    the server's. A file given directly (an upload's copy) by its name; a file in a folder by the
    folder's name and its path inside it (brindlemoor/lighthouse.md)."""
    roots = [Path(path).expanduser().resolve() for path in given]

    def name_of(path: Path) -> str:
        for root in roots:
            if path == root:
                return root.name
            if root in path.parents:
                return (Path(root.name) / path.relative_to(root)).as_posix()
        return path.name

    return name_of


def _read_and_split(store: Store, path: Path, owner: str, max_file_bytes: int, tokenizer, max_tokens: int,
                    overlap: int, parse=parse_here):
    """(passages, content hash, stat, known document) for a file to write, ([], …) for one that
    is unchanged, or UnreadableFile."""
    key = str(path)
    info = regular_file_stat(path)
    known = store.document(key, owner)
    if known and known["size"] == info.st_size and known["mtime"] == info.st_mtime:
        return [], None, info, known
    data = read_bytes(path, max_file_bytes)
    content_hash = hashlib.sha256(data).hexdigest()
    if known and known["content_hash"] == content_hash:
        store.touch_document(key, info.st_mtime, owner)
        return [], None, info, known
    text = read_text(path, data, max_file_bytes, parse)
    del data
    passages = list(iter_passages(text, tokenizer, max_tokens, overlap))
    if not passages:
        raise UnreadableFile("no text (no word the embedder can read)")
    return passages, content_hash, info, known


def _size_or_zero(path: Path) -> int:
    try:
        return regular_file_stat(path).st_size
    except UnreadableFile:
        return 0


def reembed(store: Store, embedder, embedder_name: str, progress: bool = True) -> int:
    """Re-embed every passage with another embedder (one transaction); return the passage count."""
    ids, _ = store.embeddings()
    by_id = store.passages(ids)
    texts = [by_id[int(i)].text for i in ids]
    unique = list(dict.fromkeys(texts))  # copies keep sharing one vector
    vectors = embedder.encode(unique, batch_size=ENCODE_BATCH, normalize_embeddings=True, convert_to_numpy=True,
                              show_progress_bar=progress)
    row = {text: number for number, text in enumerate(unique)}
    vectors = np.asarray(vectors, dtype=np.float32)[[row[text] for text in texts]]
    store.replace_embeddings(ids, vectors, embedder_name)
    return len(ids)
