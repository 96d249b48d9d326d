"""The vector index: an hnswlib graph over the distinct passage vectors, derived from SQLite.

Identical vectors (the passages of copied files: the ingest gives identical text the same vector)
are indexed once, under the smallest passage id that holds them, and a search hands back every
copy. A graph full of identical points loses its way (with half the passages copies, the search
missed passages it should have found, even at k = 200); one point per distinct vector does not.

Saved as ``index-<passages_version>-<sha256 of the file>.hnsw``. A file is used only when its
bytes hash to its name, its version is the database's, and it holds exactly the database's
distinct vectors (every one present and equal on a sample, every other label deleted); anything
else is rebuilt from SQLite. Saves are serialised between processes by a lock file, and a save
never replaces a newer version.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import hnswlib
import numpy as np

INDEX_NAME = re.compile(r"index-(\d+)-([0-9a-f]{64})\.hnsw")
SAMPLE_CHECKED = 64  # vectors compared with SQLite when a saved index is loaded


class IndexMismatch(Exception):
    """A saved index that cannot be trusted; str(error) says why."""


class IndexGone(Exception):
    """The saved index was replaced by another process while this one read it: not damage."""


def _key(vector: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(vector, dtype=np.float32).tobytes(), digest_size=16).digest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class VectorIndex:
    """hnswlib over distinct vectors (label = the smallest passage id with that vector), with the
    copies of each vector beside it."""

    def __init__(self, dimension: int, version: int):
        self.dimension, self.version = dimension, version
        self.graph = hnswlib.Index(space="cosine", dim=dimension)
        self.label_of: dict[bytes, int] = {}  # vector → its label
        self.copies: dict[int, list[int]] = {}  # label → the other passage ids with its vector
        self.deleted = 0  # labels marked deleted in the graph

    # -- building and loading ---------------------------------------------------------------

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, version: int) -> "VectorIndex":
        index = cls(vectors.shape[1], version)
        labels = index._group(ids, vectors)
        index.graph.init_index(max_elements=max(1024, 2 * len(labels)), ef_construction=200, M=16,
                               allow_replace_deleted=True)
        if labels:
            rows = np.searchsorted(ids, labels)
            index.graph.add_items(vectors[rows], np.asarray(labels, dtype=np.int64))
        return index

    @classmethod
    def empty(cls, dimension: int, version: int) -> "VectorIndex":
        return cls.build(np.zeros(0, np.int64), np.zeros((0, dimension), np.float32), version)

    @classmethod
    def load(cls, path: Path, ids: np.ndarray, vectors: np.ndarray, version: int) -> "VectorIndex":
        """The saved index at `path`, checked against SQLite's (ids, vectors) at `version`."""
        match = INDEX_NAME.fullmatch(path.name)
        if not match or int(match[1]) != version:
            raise IndexMismatch("not the database's version")
        try:
            digest = file_digest(path)
        except FileNotFoundError:
            raise IndexGone(path.name) from None
        if digest != match[2]:
            raise IndexMismatch("its checksum does not match: the file is damaged")
        index = cls(vectors.shape[1], version)
        labels = index._group(ids, vectors)
        try:
            index.graph.load_index(str(path), allow_replace_deleted=True)
        except RuntimeError as error:
            if not path.exists():
                raise IndexGone(path.name) from None
            raise IndexMismatch(f"hnswlib cannot read it ({error})") from None
        if index.graph.dim != index.dimension:
            raise IndexMismatch("another dimension")
        stored = set(index.graph.get_ids_list())
        if not stored.issuperset(labels):
            raise IndexMismatch("passages are missing from it")
        for label in stored.difference(labels):  # a label not in SQLite must be a deleted one
            try:
                index.graph.get_items([label])
            except RuntimeError:
                continue
            raise IndexMismatch("it holds passages the database does not")
        index.deleted = len(stored) - len(labels)
        sample = np.random.default_rng(version).choice(labels, min(SAMPLE_CHECKED, len(labels)), replace=False)
        if len(sample):
            sample = np.sort(sample)
            saved = np.asarray(index.graph.get_items(sample, return_type="numpy"), dtype=np.float32)
            if not np.allclose(saved, vectors[np.searchsorted(ids, sample)], atol=1e-5):
                raise IndexMismatch("its vectors differ from the database's")
        return index

    def _group(self, ids: np.ndarray, vectors: np.ndarray) -> list[int]:
        """Fill label_of and copies from (ids, vectors) in id order; the labels, ascending."""
        labels = []
        for passage_id, vector in zip(ids.tolist(), vectors):
            key = _key(vector)
            label = self.label_of.setdefault(key, passage_id)
            if label == passage_id:
                labels.append(passage_id)
            else:
                self.copies.setdefault(label, []).append(passage_id)
        return labels

    # -- changes ----------------------------------------------------------------------------

    @property
    def element_count(self) -> int:
        """Distinct vectors searched (copies not counted)."""
        return len(self.label_of)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        fresh_ids, fresh_rows = [], []
        for row, (passage_id, vector) in enumerate(zip(ids.tolist(), vectors)):
            key = _key(vector)
            label = self.label_of.get(key)
            if label is None:
                self.label_of[key] = passage_id
                fresh_ids.append(passage_id)
                fresh_rows.append(row)
            else:
                self.copies.setdefault(label, []).append(passage_id)
        if len(fresh_rows) < len(vectors):
            vectors = vectors[fresh_rows]  # (a copy: only when some rows are copies)
        self._insert(vectors, fresh_ids)

    def remove(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Remove these passages; a removed label whose copies remain passes to the first copy."""
        for passage_id, vector in zip(ids.tolist(), vectors):
            key = _key(vector)
            label = self.label_of.get(key)
            if label is None:
                continue
            if label != passage_id:
                others = self.copies.get(label, [])
                if passage_id in others:
                    others.remove(passage_id)
                    if not others:
                        del self.copies[label]
                continue
            self.graph.mark_deleted(label)
            self.deleted += 1
            others = self.copies.pop(label, [])
            if others:
                heir = min(others)
                others.remove(heir)
                self.label_of[key] = heir
                if others:
                    self.copies[heir] = others
                self._insert(vector[None, :], [heir])
            else:
                del self.label_of[key]

    def _insert(self, vectors: np.ndarray, labels: list[int]) -> None:
        if not labels:
            return
        needed = self.graph.get_current_count() + len(labels)
        if needed > self.graph.get_max_elements():
            self.graph.resize_index(2 * needed)
        self.graph.add_items(vectors, np.asarray(labels, dtype=np.int64))

    def mostly_tombstones(self) -> bool:
        """A fresh graph would be smaller and faster."""
        return self.deleted > max(1024, len(self.label_of))

    # -- search -----------------------------------------------------------------------------

    def search(self, query: np.ndarray, k: int,
               allowed: Callable[[int], bool] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k passages nearest to `query`: (ids, similarities, vectors), best first; the copies
        of a vector follow it. With `allowed` (a test on passage ids), the graph search itself
        passes over every vector none of whose passages is allowed (hnswlib's filter), so the k
        found are k allowed ones, not the allowed rest of k found."""
        distinct = min(k, len(self.label_of))
        if distinct == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, self.dimension), np.float32)
        passages = (lambda label: [label, *self.copies.get(label, ())]) if allowed is None else \
            (lambda label: [p for p in (label, *self.copies.get(label, ())) if allowed(p)])
        keep = None if allowed is None else (lambda label: bool(passages(label)))
        self.graph.set_ef(max(2 * distinct, 64))
        try:
            labels, distances = self.graph.knn_query(query, k=distinct, num_threads=1, filter=keep)
        except RuntimeError:  # too few reachable neighbours (deletions, a narrow filter): search all vectors
            labels, distances = self._exact(query, distinct, keep)
        labels = labels[0].astype(np.int64)
        vectors = np.asarray(self.graph.get_items(labels, return_type="numpy"), dtype=np.float32)
        ids, rows = [], []
        for row, label in enumerate(labels.tolist()):
            for passage_id in passages(label):
                if len(ids) < k:
                    ids.append(passage_id)
                    rows.append(row)
        similarities = (1.0 - distances[0]).astype(np.float32)
        return np.asarray(ids, dtype=np.int64), similarities[rows], vectors[rows]

    def _exact(self, query: np.ndarray, k: int,
               keep: Callable[[int], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        labels = np.asarray([label for label in sorted(self.label_of.values()) if keep is None or keep(label)],
                            dtype=np.int64)
        vectors = np.asarray(self.graph.get_items(labels, return_type="numpy"), dtype=np.float32)
        similarities = vectors @ (query / max(float(np.linalg.norm(query)), 1e-12))
        best = np.argsort(-similarities, kind="stable")[:k]
        return labels[best][None, :], (1.0 - similarities[best])[None, :]

    # -- files ------------------------------------------------------------------------------

    def save(self, folder: Path) -> Path | None:
        """Write index-<version>-<sha256>.hnsw and drop every other index file, unless a newer
        version is there already (another process wrote after us). The saved path, or None."""
        with _index_lock(folder):
            if any(version > self.version for version, _ in saved_indexes(folder)):
                return None
            staging = folder / f"index-{self.version}.{os.getpid()}.tmp"
            self.graph.save_index(str(staging))
            target = folder / f"index-{self.version}-{file_digest(staging)}.hnsw"
            os.replace(staging, target)
            for old in [*folder.glob("index-*.hnsw"), *folder.glob("index-*.tmp")]:
                if old != target:
                    old.unlink(missing_ok=True)  # older versions, and what a killed save left
            return target


def saved_indexes(folder: Path) -> list[tuple[int, Path]]:
    """(version, path) of every well-named index file in `folder`."""
    found = []
    for path in folder.glob("index-*.hnsw"):
        match = INDEX_NAME.fullmatch(path.name)
        if match:
            found.append((int(match[1]), path))
    return sorted(found)


@contextmanager
def _index_lock(folder: Path):
    """One process at a time writes or removes index files (a file lock: freed when a process dies)."""
    with open(folder / "index.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
