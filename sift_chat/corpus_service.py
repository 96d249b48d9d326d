"""The application layer's corpus: the documents a caller reads and what changes them, whichever
shell asks (the app, the API's server, the tests). `service.Service` holds one, as `Service.corpus`.

    ingest     uploads and folders into the corpus, with a report of what was skipped and why; in
               its own line (one ingest at a time), beside the model's: a chat never waits for it
    search     the passages a prompt would pre-select (the chat's fused search), for the Corpus tab
    documents  the list a caller reads; a document's stored text around a passage, marked
               (`document_view`): what a citation opens; removing one
    sync       folders on the server kept in step with a collection (`sync`): added by the local
               owner or an admin, each seen by whoever added it; their passes wait in the ingests' line

Every call names its caller (`access.Caller`): a caller reads their own documents and the shared
library, and changes their own (the shared library's as an admin); a visitor who has not signed
in changes nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import config
from .access import QUOTA_BYTES, QUOTA_DOCUMENTS, SHARED, Caller
from .corpus import DEFAULT_MAX_FILE_BYTES, IngestProgress, IngestReport, ingest
from .document_view import DocumentView, read_document
from .engine import Engine
from .settings import ChatSettings
from .store import Store, StoreError
from .sync import SyncOptions, SyncReport, folder_refusal, stop_syncing
from .uploads import collection_folder, private_copy, quota_refusal, safe_name, upload_refusal
from .vocabulary import first_line
from .watching import Syncing

SAMPLE_CORPUS = Path(__file__).resolve().parent.parent / "corpora" / "brindlemoor"
MAX_UPLOAD_BYTES = DEFAULT_MAX_FILE_BYTES  # 32 MiB, as the corpus stage reads at most
MAX_INGEST_FILES, MAX_INGEST_BYTES = 100, 64 * 2**20  # the uploads one ingest takes: bounded work per request
MAX_SEARCH_CHARACTERS, MAX_SEARCH_RESULTS = 1000, 50  # what one search may cost


@dataclass(frozen=True)
class SearchResult:
    passages: list  # store.Passage, best first
    similarities: list[float]  # each one's cosine to the query
    terms: list[str]  # the query's words searched in the lexical index


@dataclass
class IngestOutcome:
    report: IngestReport | None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason), before reading
    error: str = ""


class CorpusService:
    """The documents of every caller, over one engine's store and embedder (one per process), and
    one line for the ingests."""

    def __init__(self, engine: Engine, data_dir: str | Path, *, allow_server_paths: bool = True,
                 upload_folder: str | Path | None = None,
                 sample_corpus: Path | None = SAMPLE_CORPUS, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 quota_documents: int = QUOTA_DOCUMENTS, quota_bytes: int = QUOTA_BYTES,
                 parse_seconds: float | None = None):
        """`allow_server_paths`: admins may ingest folders on the server; `upload_folder`: where
        the web server puts uploads (Gradio's), the only place an upload is read from (None:
        uploads are refused); the quota bounds each user's own documents; `parse_seconds`, the
        time one HTML or PDF file may take to parse (default: `config.parse_seconds()`)."""
        self.engine = engine
        self.data_dir = Path(data_dir)
        self.uploads = self.data_dir / "uploads"  # the copies, one folder per collection
        self.upload_folder = Path(upload_folder).resolve() if upload_folder else None
        self.allow_server_paths = allow_server_paths
        self.quota_documents, self.quota_bytes = quota_documents, quota_bytes
        self.sample_corpus = sample_corpus if sample_corpus and Path(sample_corpus).is_dir() else None
        self.max_upload_bytes = max_upload_bytes
        self.max_ingest_files, self.max_ingest_bytes = MAX_INGEST_FILES, MAX_INGEST_BYTES
        self.parse_seconds = config.parse_seconds(parse_seconds)
        self.ingest_lock = threading.Lock()  # the ingests' line: one at a time, never the model's
        self.syncing = Syncing(self.store, engine.embedder, SyncOptions(
            engine.embedder_name, forbidden=(self.data_dir,), max_file_bytes=DEFAULT_MAX_FILE_BYTES,
            parse_seconds=self.parse_seconds, quota_documents=quota_documents, quota_bytes=quota_bytes),
            lock=self.ingest_lock)  # no thread runs before `start_syncing`

    @property
    def store(self) -> Store:
        return self.engine.store

    # -- documents and ingests -------------------------------------------------------------

    def search(self, text: str, caller: Caller, k: int = 10) -> SearchResult:
        """The k passages among the caller's and the shared documents that a chat message saying
        `text` would pre-select first (the same fused search, `Engine.preselect`, with the chat's
        settings), best first.
        ValueError (one line) for an empty or overlong query."""
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            raise ValueError("type a few words to search for")
        if len(text) > MAX_SEARCH_CHARACTERS:
            raise ValueError(f"the search is longer than {MAX_SEARCH_CHARACTERS} characters: shorten it")
        k = max(1, min(int(k), MAX_SEARCH_RESULTS))
        if self.store.passage_count(caller.readable) == 0:
            return SearchResult([], [], [])
        # the chat's own K (and so its K lexical matches), cut to k after fusing: a K of k would drop
        # a passage that is neither among the k nearest nor the k best by words yet fuses first
        found = self.engine.preselect(self.engine.embed(text), text, ChatSettings(), caller.readable)
        ids, similarities = found.ids[:k], found.similarities[:k]
        passages = self.store.passages(ids)
        return SearchResult([passages[int(i)] for i in ids if int(i) in passages],
                            [float(s) for i, s in zip(ids, similarities) if int(i) in passages],
                            list(found.terms))

    def read_document(self, caller: Caller, passage_id=None, document_id=None) -> DocumentView:
        """The stored text of a document around one of its passages, the passage marked (or of a
        document from its beginning), when it is the caller's own or the shared library's;
        `document_view.NotReadable` (one line) for anything else, whoever else's it is."""
        return read_document(self.store, caller.readable, passage_id, document_id)

    def documents(self, caller: Caller) -> list[dict]:
        """The documents the caller reads: the shared library's and their own, by path."""
        return self.store.documents(caller.readable)

    def offers_sample(self) -> bool:
        """The sample corpus may be added (by anyone) while the shared library is empty."""
        return self.sample_corpus is not None and self.store.passage_count([SHARED]) == 0

    def ingest(self, uploads: list | None = None, folder: str | None = None,
               progress: Callable[[IngestProgress], None] | None = None, *, caller: Caller,
               shared: bool = False) -> IngestOutcome:
        """Ingest uploaded files (copied into the data folder first, owner-only) and a folder or
        file on the server, into the caller's own documents (`shared`: the shared library, for
        admins). Reads only what it was given: uploads from the upload folder, server paths only
        for an admin where they are allowed; hidden files and the data folder never."""
        uploads = [u for u in uploads if u] if isinstance(uploads, (list, tuple)) else []
        folder = folder.strip() if isinstance(folder, str) else ""
        if not uploads and not folder:
            return IngestOutcome(None, error="Choose files to upload (or give a folder) first.")
        if not caller.signed_in:
            return IngestOutcome(None, error="Sign in to add documents: visitors chat over the shared library.")
        if shared and not caller.admin:
            return IngestOutcome(None, error="Only admins change the shared library.")
        owner = SHARED if shared else caller.collection
        roots = []
        if folder:
            if not self.allow_server_paths:
                return IngestOutcome(None, error="Ingesting folders on the server is turned off here: upload files instead.")
            if not caller.admin:
                return IngestOutcome(None, error="Only admins ingest folders on the server: upload files instead.")
            path = Path(folder).expanduser()
            if not path.exists():
                return IngestOutcome(None, error=f"No such file or folder: {folder}")
            if self.data_dir.resolve() in (path.resolve(), *path.resolve().parents):
                return IngestOutcome(None, error="That is sift-chat's own data folder: it is never ingested.")
            roots.append(path)
        given, skipped = [], []
        for upload in uploads:
            name = getattr(upload, "name", upload)  # a path, or a file object with one
            source = Path(name) if isinstance(name, str) else None
            refusal = upload_refusal(source, self.upload_folder, self.max_upload_bytes)
            if refusal:
                skipped.append((safe_name(source.name) if source else "upload", refusal))
            else:
                given.append(source)
        given, over = within_one_ingest(given, self.max_ingest_files, self.max_ingest_bytes)
        skipped += over
        copies = {self.uploads / collection_folder(owner) / safe_name(source.name): source for source in given}
        with self.ingest_lock:  # the quota is checked against what the ingest before this one stored
            problem = quota_refusal(self.store, owner,
                                    {copy: source.stat().st_size for copy, source in copies.items()},
                                    roots, [self.data_dir], self.quota_documents, self.quota_bytes)
            if problem:
                return IngestOutcome(None, skipped, problem)
            paths = []
            for copy, source in copies.items():
                try:
                    paths.append(private_copy(source, copy))
                except OSError as error:
                    skipped.append((safe_name(source.name), f"cannot read the upload: {error.strerror or error}"))
            return self._ingest(paths + roots, skipped, progress, owner)

    def add_sample(self, progress: Callable[[IngestProgress], None] | None = None, *,
                   caller: Caller) -> IngestOutcome:
        """The sample corpus into the shared library: by an admin, or by anyone while it is empty."""
        if self.sample_corpus is None:
            return IngestOutcome(None, error="The sample corpus is not here.")
        with self.ingest_lock:
            if not (caller.admin or self.offers_sample()):
                return IngestOutcome(None, error="Only admins change the shared library.")
            return self._ingest([self.sample_corpus], [], progress, SHARED)

    def _ingest(self, paths: list[Path], skipped: list[tuple[str, str]], progress, owner: str) -> IngestOutcome:
        """Called holding `ingest_lock`; the embedder is shared with the chat batch by batch
        (`embedding.SharedEmbedder`), the parsing is done by a child process (`parsing`)."""
        if not paths:
            return IngestOutcome(None, skipped, "Nothing could be ingested.")
        try:
            report = ingest(self.store, self.engine.embedder, paths, embedder_name=self.engine.embedder_name,
                            progress=False, on_progress=progress, owner=owner, forbidden=[self.data_dir],
                            trusted=[self.uploads, *([self.sample_corpus] if self.sample_corpus else [])],
                            parse_seconds=self.parse_seconds)
        except Exception as error:  # each document is written in one transaction: nothing half-stored
            return IngestOutcome(None, skipped, f"The ingest failed: {first_line(error)}. Documents stored before are kept.")
        for path, _ in report.skipped:  # an unreadable upload is not kept
            if self.uploads.resolve() in Path(path).parents:
                Path(path).unlink(missing_ok=True)
        nothing = report.ingested == 0 and not report.unchanged
        return IngestOutcome(report, skipped, "Nothing could be ingested." if nothing else "")

    def remove_document(self, document_id, caller: Caller) -> str:
        """Remove the document (its passages and vectors go with it, and an uploaded copy): ''
        when removed, else why not. One's own documents; the shared library's as an admin."""
        try:
            document = self.store.document_by_id(int(document_id))
        except (TypeError, ValueError, OverflowError):
            document = None
        if document is None or document["owner"] not in caller.readable:
            return "That document is not in the corpus."
        if not caller.may_change(document["owner"]):
            return ("Only admins change the shared library." if caller.signed_in
                    else "Sign in to change documents: visitors chat over the shared library.")
        try:
            removed = self.store.remove([document["path"]], document["owner"])
        except StoreError as error:  # read-only, or another process kept the store locked
            return str(error)
        if removed and self.uploads.resolve() in Path(document["path"]).parents:
            Path(document["path"]).unlink(missing_ok=True)
        return "" if removed else "That document is not in the corpus."

    # -- synced folders --------------------------------------------------------------------

    def start_syncing(self) -> None:
        """Watch every synced folder (the server does this once it serves)."""
        self.syncing.refresh()

    def close(self) -> None:
        """Stop every folder's watcher: a pass running ends before its next file."""
        self.syncing.close()

    def sync_refusal(self, caller: Caller, shared: bool = False) -> str:
        """Why the caller may not sync a server folder ('' when they may): the local owner and admins only."""
        if not caller.signed_in:
            return "Sign in to add documents: visitors chat over the shared library."
        if not self.allow_server_paths:
            return "Syncing folders on the server is turned off here: upload files instead."
        if not caller.admin:
            return "Only admins sync folders on the server: upload files instead."
        return ""

    def sync_folder(self, folder: str, caller: Caller, shared: bool = False) -> str:
        """Sync a folder on the server into the caller's documents (`shared`: the shared library,
        an admin's other choice): ingested at once by its watcher, then kept in step. '' when it
        is synced, else why not."""
        refusal = self.sync_refusal(caller, shared)
        if refusal:
            return refusal
        folder = folder.strip() if isinstance(folder, str) else ""
        if not folder:
            return "Give a folder on this machine to sync."
        owner = SHARED if shared else caller.collection
        problem = folder_refusal(folder, self.store, owner, [self.data_dir])
        if problem:
            return problem[0].upper() + problem[1:] + "."
        try:
            self.store.add_synced_folder(str(Path(folder).expanduser().resolve()), owner, caller.owner)
        except StoreError as error:
            return str(error)
        self.syncing.refresh()
        return ""

    def synced_folders(self, caller: Caller) -> list[dict]:
        """The folders the caller syncs (nobody else's), each with its files' counts, its skipped
        files (path, reason), and the progress of its first ingest while it runs."""
        if not caller.signed_in:
            return []
        self.syncing.refresh()  # folders another process (the CLI) added meanwhile
        folders = []
        for folder in self.store.synced_folders(added_by=caller.owner):
            watcher = self.syncing.watcher(folder["id"])
            progress = watcher.sync.progress if watcher is not None else None
            folders.append({**folder, "progress": progress.describe() if progress else "",
                            "skipped_files": [(row["path"], row["reason"])
                                              for row in self.store.synced_files(folder["id"], "skipped")]})
        return folders

    def _own_synced(self, folder_id, caller: Caller) -> dict | None:
        try:
            folder = self.store.synced_folder(int(folder_id))
        except (TypeError, ValueError, OverflowError):
            return None
        return folder if folder is not None and caller.signed_in and folder["added_by"] == caller.owner else None

    def sync_now(self, folder_id, caller: Caller) -> SyncReport | str:
        """One pass over the caller's synced folder now (waiting in the ingests' line): its
        report, or why not."""
        folder = self._own_synced(folder_id, caller)
        if folder is None:
            return "Choose one of your synced folders."
        self.syncing.refresh()
        watcher = self.syncing.watcher(folder["id"])
        if watcher is None:
            return "This folder is not being synced here (a read-only store?)."
        return watcher.sync.run()

    def stop_syncing(self, folder_id, caller: Caller, remove_documents: bool = False) -> str:
        """Stop syncing the caller's folder; its documents stay in the corpus unless
        `remove_documents`. '' when done, else why not."""
        folder = self._own_synced(folder_id, caller)
        if folder is None:
            return "Choose one of your synced folders."
        watcher = self.syncing.watcher(folder["id"])
        if watcher is not None:
            watcher.sync.stop.set()  # a pass running ends before its next file, and lets go of the line
        try:
            with self.ingest_lock:
                stop_syncing(self.store, folder, bool(remove_documents))
        except StoreError as error:
            return str(error)
        finally:
            self.syncing.forget(folder["id"])
        return ""


def within_one_ingest(sources: list[Path], max_files: int, max_bytes: int) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files one ingest takes, in the order given, while they fit together in `max_files`
    files and `max_bytes`; the rest as (name, why) skipped. A file that cannot be measured is
    taken: its reading fails later with its own reason."""
    taken, skipped, used = [], [], 0
    for source in sources:
        try:
            size = source.stat().st_size
        except OSError:
            size = 0
        if len(taken) >= max_files or used + size > max_bytes:
            skipped.append((safe_name(source.name), f"over what one ingest takes ({max_files} files, "
                                                    f"{max_bytes / 2**20:.0f} MiB): add it in another"))
        else:
            taken.append(source)
            used += size
    return taken, skipped

