"""Pre-selection: the K candidates a message's selection chooses from, found by meaning and by words.

    prompt ─embed─▶ q ─hnswlib─▶ the K nearest passages ───────────────┐
           ─terms─▶ its rare words ─FTS5 BM25─▶ the K best matches ────┴─fuse─▶ K candidates

Both searches keep to the caller's collections during the search (`Store.nearest`,
`Store.lexical`). A sentence vector weighs a name lightly: two towns whose names differ in one
syllable embed almost alike, and the wrong one's passage can come first. BM25 over the prompt's
rare words finds the passages that name what the prompt names. The fusion is a weighted sum of
the cosine and the scaled BM25 score (measured against reciprocal rank fusion: README,
Retrieval). Selection (SIFT, NN, NN-F, US) then works on the candidates' vectors, unchanged; a
candidate found only by its words gets its stored vector from SQLite.
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .store import Store

FUSIONS = ("weighted", "rrf", "vector")  # "vector": the vector search alone (as before)
FUSION = "weighted"  # the app's: its best candidate held the answer most often (README: Retrieval)
RRF_K = 60  # the constant of Cormack et al. (2009); ranks below it count alike
WEIGHT = 0.5  # of the cosine in the weighted sum (its measured alternative)
MAX_TERMS = 8  # the rarest words of a prompt searched
MATCH_BUDGET = 500  # at most this many passages hold the words searched, together: what BM25 ranks
#                     (and counting a word's passages) costs grows with it, not with the store
LEXICAL_CANDIDATES = 50  # the best BM25 matches fused with the vector search's K (fewer when K is)

_TOKEN = re.compile(r"[^\W_]+")  # unicode61's tokens: runs of letters and digits


def prompt_terms(text: str) -> list[str]:
    """The words of `text` as the FTS tokenizer indexes them (unicode61, remove_diacritics 2):
    runs of letters and digits, accents dropped, lower case; each once, in order."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return list(dict.fromkeys(token.lower() for token in _TOKEN.findall(folded)))


def rare_terms(counts: dict[str, int], max_terms: int = MAX_TERMS, budget: int = MATCH_BUDGET) -> list[str]:
    """The words worth searching, rarest first: as many of the rarest as `max_terms` allows while
    the passages holding them number at most `budget` together. A common word says little (BM25
    weighs it near zero) and is what makes a search slow."""
    kept, matched = [], 0
    for count, term in sorted((count, term) for term, count in counts.items() if count > 0):
        if len(kept) == max_terms or matched + count > budget:
            break
        kept.append(term)
        matched += count
    return kept


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of ranked id lists::

        score(d) = Σ_r 1 / (k + rank_r(d))      rank_r(d) = 1, 2, … in list r; a list without d adds 0

    (id, score) best first; ties keep the order of first appearance (the first list first)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, passage_id in enumerate(ranking, 1):
            scores[int(passage_id)] = scores.get(int(passage_id), 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])


def weighted_fusion(ids: Sequence[int], similarities: np.ndarray, bm25: dict[int, float],
                    weight: float = WEIGHT) -> list[tuple[int, float]]:
    """A weighted sum of the cosine and the BM25 score scaled to the best match::

        score(d) = w · cos(q, d) + (1 − w) · bm25(d) / max_d' bm25(d')      bm25(d) = 0 when unmatched

    over `ids` (every candidate, with its cosine in `similarities`); (id, score) best first."""
    best = max(bm25.values(), default=0.0) or 1.0
    scores = [(int(i), weight * float(s) + (1 - weight) * bm25.get(int(i), 0.0) / best)
              for i, s in zip(ids, similarities)]
    return sorted(scores, key=lambda item: -item[1])


@dataclass(frozen=True)
class Candidates:
    """What pre-selection hands to selection: K passages, best fused first, with their vectors."""

    ids: np.ndarray  # (K,) passage ids
    vectors: np.ndarray  # (K, d) their stored vectors
    similarities: np.ndarray  # (K,) cosine to the prompt
    match: np.ndarray  # (K,) how well each matches the prompt: the score it was ranked by, best first
    terms: list[str] = field(default_factory=list)  # the prompt's words searched in the lexical index
    lexical: int = 0  # candidates the lexical search found
    lexical_only: int = 0  # candidates the vector search alone would not have had
    seconds: dict[str, float] = field(default_factory=dict)  # vector, lexical, fuse

    @property
    def rank(self) -> dict[int, int]:
        """passage id → its fused rank (0 best)."""
        return {int(i): n for n, i in enumerate(self.ids.tolist())}


def preselect(store: Store, query: np.ndarray, prompt: str, k: int, owners: Iterable[str] | None = None,
              fusion: str = FUSION) -> Candidates:
    """The k candidates for `prompt` (embedded as `query`) among these owners' passages: the k
    nearest by vector and the LEXICAL_CANDIDATES best by BM25 over the prompt's rare words (each
    costs a read of its vector from SQLite; further down, matches share only commoner words),
    fused by `fusion` (weighted, rrf, or vector for the vector search alone), best first."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    owners = None if owners is None else list(owners)
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    seconds = {}
    started = time.perf_counter()
    vector_ids, similarities, vectors = store.nearest(query, k, owners)
    seconds["vector"] = time.perf_counter() - started
    if fusion == "vector" or k <= 0:
        return Candidates(vector_ids, vectors, similarities, similarities, seconds=seconds)

    started = time.perf_counter()
    terms = rare_terms(store.term_counts(prompt_terms(prompt), MATCH_BUDGET))
    lexical_ids, bm25 = store.lexical(terms, min(k, LEXICAL_CANDIDATES), owners)
    seconds["lexical"] = time.perf_counter() - started

    started = time.perf_counter()
    vector_ranked = vector_ids.tolist()  # best first
    known = set(vector_ranked)
    missing = [int(i) for i in lexical_ids.tolist() if int(i) not in known]
    if missing:  # found by words only: their vectors from SQLite (hnswlib's get_items is 3x slower: README)
        extra_ids, extra_vectors = store.embeddings(missing)
        norm = max(float(np.linalg.norm(query)), 1e-12)
        vector_ids = np.concatenate([vector_ids, extra_ids])
        vectors = np.concatenate([vectors, extra_vectors])
        similarities = np.concatenate([similarities, extra_vectors @ query / norm]).astype(np.float32)
    if fusion == "rrf":
        fused = reciprocal_rank_fusion([vector_ranked, lexical_ids.tolist()])
    else:
        fused = weighted_fusion(vector_ids.tolist(), similarities,
                                dict(zip(lexical_ids.tolist(), bm25.tolist())))
    row = {int(i): n for n, i in enumerate(vector_ids.tolist())}
    rows = [row[i] for i, _ in fused[:k]]
    chosen = vector_ids[rows]
    seconds["fuse"] = time.perf_counter() - started
    match = np.array([score for _, score in fused[:k]], dtype=np.float32)
    return Candidates(chosen, vectors[rows], similarities[rows], match, terms, len(lexical_ids),
                      len(set(chosen.tolist()) - known), seconds)


def read_count(match: np.ndarray, most: int, min_match: float) -> int:
    """How many of the best candidates to read: the first, and each of the next `most` − 1 whose
    match is close to the first's::

        R = 1 + |{ i ∈ 2..most : match_i ≥ min_match · match_1 }|      (match best first)

    A prompt with one clear best passage reads that one; where several match about as well (two
    facts in two documents, or passages retrieval cannot tell apart) it reads them all. With
    `min_match` 0 it reads `most`; a first match ≤ 0 reads only the first."""
    count = min(most, len(match))
    if count <= 1 or min_match <= 0:
        return count
    if match[0] <= 0:
        return 1
    return 1 + int(np.sum(np.asarray(match[1:count]) >= min_match * match[0]))
