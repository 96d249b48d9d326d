"""The lexical search: BM25 over the FTS5 table ``passages_fts`` for a prompt's words.

The table, its vocabulary (``passages_terms``: term → passages holding it) and the triggers that
keep it in the passages' transactions are `store.SCHEMA`'s; each connection reads how often a
term occurs in each passage from a temporary ``fts5vocab`` table over it (``instance``: no
storage, nothing in the store changes, also read-only). A search limited to some owners keeps
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

BM25_K1 = 1.2  # the term-frequency saturation of Robertson et al. (and FTS5's)


def _fts_term(term: str) -> str:
    """A term as an FTS5 string: quoted, so that no word of a prompt is read as query syntax."""
    return '"' + term.replace('"', '""') + '"'


class LexicalSearch:
    """BM25 searches and term counts over the passages (a mixin of `store.Store`)."""

    def _open_lexical(self) -> None:
        """At the store's opening: whether it has the lexical index (a read-only store made before
        schema 4 has none), and no term counted yet."""
        self.has_lexical = self.db["passages_fts"].exists() and self.db["passages_terms"].exists()
        if self.has_lexical:  # per connection, in the temp schema: a read-only store gets it too
            self.db.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.passages_instances "
                            "USING fts5vocab(main, passages_fts, 'instance')")
        self._term_counts: dict[str, int] = {}  # term → passages holding it (capped), at _term_counts_at
        self._term_counts_at: tuple[int, int] | None = None  # (passages_version, cap)
        self._indexed, self._indexed_at = 0, None  # passages indexed, at passages_version

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

    def _indexed_count(self) -> int:
        """N for BM25's idf: the passages indexed, counted once per change of the passages."""
        version = self.passages_version
        if self._indexed_at != version:
            self._indexed, self._indexed_at = self.passage_count(), version
        return self._indexed

    @serialized
    def lexical(self, terms: Iterable[str], k: int,
                owners: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k passages that best match any of `terms` by BM25 without length normalization
        (`bm25_scores`): (ids, scores), best first, ties by id; only passages of these owners'
        documents when `owners` is given. The owner filter runs over the ranked matches before k
        are counted (as the vector index's filter does), so k of the caller's passages come back
        however many better ones belong to others. Every passage holding a term is scored: the
        caller searches words held by few passages (`retrieval.rare_terms`). Without the lexical
        index (a read-only store made before it) nothing is found."""
        terms = [term for term in dict.fromkeys(terms) if term]
        empty = np.zeros(0, np.int64), np.zeros(0, np.float32)
        if not self.has_lexical:
            self._warn_once(f"the store {self.folder} has no lexical index (made by an older sift-chat, read-only "
                            "here): searching by vectors only; open it once where it can be written")
            return empty
        if not terms or k <= 0:
            return empty
        self._sync_index()  # the owners of the passages, as of now
        rows = self.db.execute(
            f"SELECT doc, term, count(*) FROM temp.passages_instances WHERE term IN ({', '.join('?' * len(terms))}) "
            "GROUP BY doc, term", terms).fetchall()
        if not rows:
            return empty
        passage_ids = sorted({doc for doc, _, _ in rows})
        column = {passage_id: n for n, passage_id in enumerate(passage_ids)}
        term_row = {term: n for n, term in enumerate(terms)}
        frequencies = np.zeros((len(terms), len(passage_ids)), dtype=np.float64)
        for doc, term, count in rows:
            frequencies[term_row[term], column[doc]] = count
        scores = bm25_scores(frequencies, self._indexed_count())
        ids, kept = [], []
        allowed = None if owners is None else set(owners)
        for n in np.lexsort((passage_ids, -scores)):  # best first, ties by id
            # a passage written since the sync has no owner here yet: left out, never shown to the wrong caller
            if allowed is None or self._owner_of.get(passage_ids[n]) in allowed:
                ids.append(passage_ids[n])
                kept.append(scores[n])
                if len(ids) == k:
                    break
        return np.asarray(ids, dtype=np.int64), np.asarray(kept, dtype=np.float32)


def bm25_scores(frequencies: np.ndarray, total: int, k1: float = BM25_K1) -> np.ndarray:
    """BM25 with b = 0 (no length normalization) of each passage for the searched terms::

        score(d) = Σ_t idf(t) · f(t, d) (k1 + 1) / (f(t, d) + k1)
        idf(t)   = ln(1 + (N − n(t) + 0.5) / (n(t) + 0.5))                 (Lucene's: never below 0)

    `frequencies` [terms, passages]: f(t, d), how often term t occurs in passage d (every passage
    holding a term is a column, so n(t), the passages holding t, is its row's non-zero count);
    `total`: N, the passages indexed. FTS5's own bm25 normalizes by length (b = 0.75) and floors
    the idf of a word most passages hold at 10⁻⁶: there a short passage naming a town twice
    outranked the longer one that says what was asked ("founded", in most of a town's passages,
    counted for nothing), while passages, chunks of a bounded size, differ in length for no
    reason a search should weigh (README: Retrieval)."""
    holding = (frequencies > 0).sum(axis=1, keepdims=True)
    idf = np.log1p((total - holding + 0.5) / (holding + 0.5))
    return (idf * frequencies * (k1 + 1) / (frequencies + k1)).sum(axis=0)
