"""Per-token decoding time with the growing cache (`decoding.GrowingLayer`) against transformers'
concatenating `DynamicCache`, alternated in one run, on random prompts of several lengths.

    .venv/bin/python benchmarks/bench_cache.py [--lengths 100,400,1500] [--tokens 24] [--repeats 3]

One and two rows (the second under the base model, as context-aware decoding runs it), on 1 torch
thread as the engine decodes; prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from bench_decoding import concatenated_cache  # beside this file: run as a script

from sift_chat import config
from sift_chat.decoding import Rows
from sift_chat.models import load_chat_model


def per_token(model, prompts, tokens: int) -> float:
    rows = Rows(model, prompts, None if len(prompts) == 1 else [1.0, 0.0])
    rows.logits()
    started = time.perf_counter()
    for i in range(tokens):
        rows.append(100 + i)
        rows.logits()
    return (time.perf_counter() - started) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="100,400,1500", help="prompt lengths in tokens")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_chat_model(config.DEFAULT_CHAT_MODEL)
    print("| prompt tokens | rows | concatenated, ms | growing, ms | growing / concatenated |")
    print("|---|---|---|---|---|")
    for length in (int(n) for n in args.lengths.split(",")):
        read = torch.randint(100, 20_000, (1, length))
        unread = torch.randint(100, 20_000, (1, max(10, length - 60)))
        for prompts in ([read], [read, unread]):
            times = {"concatenated": [], "growing": []}
            for _ in range(args.repeats):
                for name, cache in (("concatenated", concatenated_cache), ("growing", nullcontext)):
                    with cache():
                        times[name].append(per_token(model, prompts, args.tokens))
            before, after = (statistics.median(times[name]) for name in ("concatenated", "growing"))
            print(f"| {length} | {len(prompts)} | {before * 1000:.1f} | {after * 1000:.1f} | {after / before:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
