"""The pre-selection within a caller's collections: `Store.nearest` with owners (hnswlib's filter
during the search) against the same search over every passage, and its recall against an exact
search over the caller's passages. One command, one table.

    .venv/bin/python benchmarks/bench_collections.py [--passages 50000] [--queries 50] [-k 200]

Clustered random unit vectors (d = 384, as the default embedder's; 1 000 topics, so that
neighbours mean something as they do between real passages) in documents of 100 passages: half
the shared library's, 45% one user's, 5% another's. Queries are drawn like passages. Each reader
(the shared library and a user) is searched for K candidates, as a chat message does, and beside it
the same search over every passage with its own recall (the reference); "after" is what filtering
the unfiltered K afterwards would have kept. Targets: recall@K no lower than the unfiltered
search's (the filter loses nothing; the index's own recall on real passages is bench_ingest's); a
filtered search <= 10x the unfiltered.

Then the chat's whole pre-selection (`retrieval.preselect`, K candidates) fused with the lexical
search against the vector search alone, same store, same queries, in the same run. Each passage
has 100 words drawn from a Zipf law (s = 1.1) over 50 000 words, so that a few words are in most
passages and most words in few, as in prose; a prompt is 10 words of one passage. A first pass
warms the caches (SQLite's pages, the store's word counts); the timed pass uses other prompts.
Target: fused <= 1.5x the vector search alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from sift_chat.access import SHARED
from sift_chat.retrieval import preselect
from sift_chat.store import NewDocument, NewPassage, Store

DIMENSION = 384
VOCABULARY = 50_000
WORDS_PER_PASSAGE = 100


def zipf_texts(rng: np.random.Generator, count: int) -> list[str]:
    """`count` passages of WORDS_PER_PASSAGE words drawn from a Zipf law over VOCABULARY words."""
    weights = 1.0 / np.arange(1, VOCABULARY + 1) ** 1.1
    words = rng.choice(VOCABULARY, size=(count, WORDS_PER_PASSAGE), p=weights / weights.sum())
    return [" ".join(f"w{word}" for word in row) for row in words]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("-k", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    topics = rng.normal(size=(1000, DIMENSION)).astype(np.float32)

    def drawn(count: int) -> np.ndarray:
        points = topics[rng.integers(0, len(topics), count)] + 0.6 * rng.normal(size=(count, DIMENSION))
        return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)

    vectors, queries = drawn(args.passages), drawn(args.queries)
    texts = zipf_texts(rng, args.passages)
    prompts = [" ".join(rng.choice(texts[rng.integers(len(texts))].split(), 10, replace=False))
               for _ in range(2 * args.queries)]

    def owner(document: int) -> str:
        share = document % 20
        return "user:small" if share == 0 else SHARED if share % 2 else "user:big"

    with tempfile.TemporaryDirectory() as folder:
        store = Store(folder)
        documents = [NewDocument(f"/doc-{d}.txt", f"hash-{d}", 100, 0.0,
                                 [NewPassage(i, 0, 1, 1, texts[d * 100 + i]) for i in range(100)],
                                 vectors[d * 100:(d + 1) * 100], owner(d))
                     for d in range(args.passages // 100)]
        started = time.perf_counter()
        store.write_documents(documents, "random-unit-vectors")
        print(f"{store.passage_count()} passages written and indexed in {time.perf_counter() - started:.0f} s\n")
        ids, stored = store.embeddings()
        owners = np.asarray([store._owner_of[int(i)] for i in ids])
        print(f"| reader | its passages | ms/query, filtered | unfiltered | ratio | recall@{args.k} filtered | "
              f"unfiltered | of K kept by filtering after |")
        print("|---|---|---|---|---|---|---|---|")
        for readers in ([SHARED], [SHARED, "user:big"], [SHARED, "user:small"], ["user:small"]):
            mask = np.isin(owners, readers)
            timings = {"filtered": 0.0, "unfiltered": 0.0}
            recall, reference, kept = [], [], []
            for query in queries:
                started = time.perf_counter()
                found, _, _ = store.nearest(query, args.k, readers)
                timings["filtered"] += time.perf_counter() - started
                started = time.perf_counter()
                everything, _, _ = store.nearest(query, args.k)
                timings["unfiltered"] += time.perf_counter() - started
                similarities = stored[mask] @ query
                kth = np.sort(similarities)[-args.k]
                found_similarities = stored[np.searchsorted(ids, found)] @ query
                recall.append(np.mean(found_similarities >= kth - 1e-6) * len(found) / args.k)
                kept.append(np.isin(owners[np.searchsorted(ids, everything)], readers).mean())
                every_kth = np.sort(stored @ query)[-args.k]
                reference.append(np.mean(stored[np.searchsorted(ids, everything)] @ query >= every_kth - 1e-6))
            filtered, unfiltered = (1000 * timings[name] / len(queries) for name in ("filtered", "unfiltered"))
            name = " + ".join("shared" if r == SHARED else r for r in readers)
            print(f"| {name} | {mask.mean():.0%} | {filtered:.1f} | {unfiltered:.1f} | {filtered / unfiltered:.1f}× | "
                  f"{np.mean(recall):.4f} (worst {np.min(recall):.2f}) | {np.mean(reference):.4f} | "
                  f"{np.mean(kept) * args.k:.0f} of {args.k} |")

        print(f"\n| reader | pre-selection (K = {args.k}), ms/query: vector only | fused, weighted | ratio | "
              "fused, RRF | ratio | of it the lexical search | vectors and fusion | candidates found by words only |")
        print("|---|---|---|---|---|---|---|---|---|")
        for readers in (None, [SHARED, "user:big"], [SHARED]):
            timings = {"vector": 0.0, "weighted": 0.0, "rrf": 0.0}
            lexical, fuse, lexical_only = 0.0, 0.0, []
            for run in range(2):  # the first pass warms the caches; the second, with other prompts, is timed
                timings = dict.fromkeys(timings, 0.0)
                lexical, fuse, lexical_only = 0.0, 0.0, []
                for query, prompt in zip(queries, prompts[run * len(queries):]):
                    for fusion in timings:
                        started = time.perf_counter()
                        found = preselect(store, query, prompt, args.k, readers, fusion)
                        timings[fusion] += time.perf_counter() - started
                        if fusion == "weighted":
                            lexical += found.seconds["lexical"]
                            fuse += found.seconds["fuse"]
                            lexical_only.append(found.lexical_only)
            vector, weighted, rrf = (1000 * timings[name] / len(queries) for name in ("vector", "weighted", "rrf"))
            name = "everyone" if readers is None else " + ".join("shared" if r == SHARED else r for r in readers)
            print(f"| {name} | {vector:.1f} | {weighted:.1f} | **{weighted / vector:.2f}×** | {rrf:.1f} | "
                  f"{rrf / vector:.2f}× | {1000 * lexical / len(queries):.1f} | {1000 * fuse / len(queries):.1f} | "
                  f"{np.mean(lexical_only):.0f} |")
        store.close()


if __name__ == "__main__":
    main()
