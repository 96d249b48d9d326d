"""The lexical search: BM25 over the FTS5 table ``passages_fts`` for a prompt's words.

The table, its vocabulary (``passages_terms``: term → passages holding it) and the triggers that
keep it in the passages' transactions are `store.SCHEMA`'s. A search limited to some owners keeps
their passages among the ranked matches before k are counted, by the owners the vector index
keeps (`vector_search`).

`LexicalSearch` is a mixin of `store.Store` (which holds the connection and its lock:
`self.db`, `self.lock`, `self.passages_version`, `self._warn_once()`; and, from `VectorSearch`,
`self._sync_index()` and `self._owner_of`).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .db import serialized


def _fts_term(term: str) -> str:
    """A term as an FTS5 string: quoted, so that no word of a prompt is read as query syntax."""
    return '"' + term.replace('"', '""') + '"'


class LexicalSearch:
    """BM25 searches and term counts over the passages (a mixin of `store.Store`)."""

    def _open_lexical(self) -> None:
        """At the store's opening: whether it has the lexical index (a read-only store made before
        schema 4 has none), and no term counted yet."""
        self.has_lexical = self.db["passages_fts"].exists() and self.db["passages_terms"].exists()
        self._term_counts: dict[str, int] = {}  # term → passages holding it (capped), at _term_counts_at
        self._term_counts_at: tuple[int, int] | None = None  # (passages_version, cap)

    @serialized
    def term_counts(self, terms: Iterable[str], cap: int) -> dict[str, int]:
        """How many passages hold each of these terms (folded as the FTS tokenizer folds them:
        `retrieval.prompt_terms`), counted up to cap + 1 (more is cap + 1: counting walks the
        term's list of passages); a term no passage holds is left out. Counts are kept until the
        passages change: a prompt's common words are the costly ones and come back."""
        if not self.has_lexical:
            return {}
        version = self.passages_version
        if self._term_counts_at != (version, cap):
            self._term_counts, self._term_counts_at = {}, (version, cap)
        found = {}
        for term in dict.fromkeys(terms):
            if term not in self._term_counts:
                self._term_counts[term] = self.db.execute(
                    "SELECT count(*) FROM (SELECT rowid FROM passages_fts WHERE passages_fts MATCH ? LIMIT ?)",
                    [_fts_term(term), cap + 1]).fetchone()[0]
            if self._term_counts[term]:
                found[term] = self._term_counts[term]
        return found

    @serialized
    def lexical(self, terms: Iterable[str], k: int,
                owners: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k passages that best match any of `terms` by BM25 (FTS5's `bm25`, negated so that
        higher is better): (ids, scores), best first; only passages of these owners' documents
        when `owners` is given. The owner filter runs over the ranked matches before k are
        counted (as the vector index's filter does), so k of the caller's passages come back
        however many better ones belong to others. Without the lexical index (a read-only store
        made before it) nothing is found."""
        terms = [term for term in dict.fromkeys(terms) if term]
        empty = np.zeros(0, np.int64), np.zeros(0, np.float32)
        if not self.has_lexical:
            self._warn_once(f"the store {self.folder} has no lexical index (made by an older sift-chat, read-only "
                            "here): searching by vectors only; open it once where it can be written")
            return empty
        if not terms or k <= 0:
            return empty
        self._sync_index()  # the owners of the passages, as of now
        allowed = None if owners is None else set(owners)
        cursor = self.db.execute(
            "SELECT rowid, -bm25(passages_fts) FROM passages_fts WHERE passages_fts MATCH ? "
            "ORDER BY bm25(passages_fts), rowid", [" OR ".join(_fts_term(term) for term in terms)])
        ids, scores = [], []
        for passage_id, score in cursor:
            # a passage written since the sync has no owner here yet: left out, never shown to the wrong caller
            if allowed is None or self._owner_of.get(passage_id) in allowed:
                ids.append(passage_id)
                scores.append(score)
                if len(ids) == k:
                    break
        cursor.close()
        return np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float32)
