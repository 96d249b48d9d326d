"""The vector index's life beside SQLite, and the search by meaning (`nearest`).

The index (`vector_index`, hnswlib) is derived from the embeddings in SQLite. Its file carries
``passages_version`` and its own checksum in its name; one that is missing, older than the
database, damaged, or disagreeing with SQLite is rebuilt from the embeddings in SQLite (and a
failed check is reported once). A write this process just committed is applied to the index in
place; one another process made is found by its version, and the index synced. Beside the index,
the owner of each passage it holds (`access`), so that a search limited to some owners skips the
others' passages during the search itself.

`VectorSearch` is a mixin of `store.Store` (which holds the folder, the connection, its lock and
the passages' reads it uses: `self.folder`, `self.read_only`, `self.db`, `self.lock`,
`self._snapshot()`, `self.embeddings()`, `self.passage_count()`, `self.passages_version`,
`self.dimension`, `self._warn_once()`); the store's writes hand it what they changed
(`_index_after_write`).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .db import StoreError, serialized
from .vector_index import IndexGone, IndexMismatch, VectorIndex, saved_indexes


class VectorSearch:
    """The store's vector index, kept in step with SQLite, and its search (a mixin of `store.Store`)."""

    def _open_index(self) -> None:
        """At the store's opening: the index as of SQLite now (loaded, or rebuilt)."""
        self.index: VectorIndex | None = None
        self._index_version = -1
        self._owner_of: dict[int, str] = {}  # passage id → its document's owner, in step with the index
        self._sync_index()

    def _reload_index(self) -> None:
        """Every vector changed (re-embedding): the index made again from SQLite."""
        self.index, self._index_version = None, -1
        self._sync_index()

    def _sync_index(self) -> None:
        """Make the in-memory index match SQLite: load the saved one if it verifies, else rebuild
        (and say why, once, when a saved file was there and failed its checks)."""
        if self.passages_version == self._index_version:
            return
        with self._snapshot():  # the version, the vectors and their owners of one and the same state
            version = self.passages_version
            ids, vectors = self.embeddings()
            self._owner_of = dict(self.db.execute(
                "SELECT p.id, d.owner FROM passages p JOIN documents d ON d.id = p.document_id").fetchall())
        if len(ids) == 0:
            self.index, self._index_version = None, version
            return
        problems = []
        for saved_version, path in reversed(saved_indexes(self.folder)):
            if saved_version != version:
                continue
            try:
                self.index = VectorIndex.load(path, ids, vectors, version)
                self._index_version = version
                return
            except IndexMismatch as reason:
                problems.append(f"{path.name}: {reason}")
            except IndexGone:
                continue  # another process saved a newer one meanwhile: nothing is wrong
        if problems:
            self._warn_once(f"the vector index did not verify ({'; '.join(problems)}): "
                            "rebuilt from the passages in SQLite")
        self.index, self._index_version = VectorIndex.build(ids, vectors, version), version
        self._save_index()

    def _index_after_write(self, version: int, removed, added) -> None:
        """Apply a write this process just committed as `version` to the index, in place when the
        index was at the version before it; else (another process wrote in between) sync."""
        if self._index_version != version - 1:
            self._sync_index()
            return
        if self.index is None:  # the first vectors: built from what was just written
            if not added:
                self._sync_index()
                return
            self.index = VectorIndex.empty(int(added[0][1].shape[1]), version - 1)
        for ids, vectors in removed:
            self.index.remove(ids, vectors)
            for passage_id in ids.tolist():
                self._owner_of.pop(passage_id, None)
        if self.index.mostly_tombstones():
            self._index_version = -1
            self._sync_index()
            return
        for ids, vectors, owner in added:
            self.index.add(ids, vectors)
            self._owner_of.update(dict.fromkeys(ids.tolist(), owner))
        self.index.version = self._index_version = version
        self._save_index()

    def _save_index(self) -> None:
        if self.read_only or self.index is None:
            return
        try:
            self.index.save(self.folder)
        except OSError as error:  # the index is derived: the next open rebuilds it
            self._warn_once(f"could not save the vector index: {error.strerror or error}")

    # -- search ---------------------------------------------------------------------------

    @serialized
    def nearest(self, query: np.ndarray, k: int,
                owners: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k passages most similar to `query` (cosine): (ids, similarities, vectors), best first;
        only passages of these owners' documents when `owners` is given. The index skips every
        other passage during the search (hnswlib's filter), so k of the caller's passages come
        back however many nearer ones belong to others.

        When the store holds at most k such passages, every one is returned (exact).
        """
        self._sync_index()
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        empty = np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, len(query)), np.float32)
        if self.index is None or k <= 0:
            return empty
        if self.dimension and len(query) != self.dimension:
            raise StoreError(f"the query has dimension {len(query)}, the store {self.dimension}")
        owners = None if owners is None else set(owners)
        available = self.passage_count(owners)
        if available == 0:
            return empty
        if k >= available:
            ids, vectors = self.embeddings(owners=owners)
            similarities = vectors @ query / max(float(np.linalg.norm(query)), 1e-12)
            order = np.argsort(-similarities, kind="stable")
            return ids[order], similarities[order], vectors[order]
        allowed = None if owners is None else (lambda passage_id: self._owner_of.get(passage_id) in owners)
        return self.index.search(query, k, allowed)
