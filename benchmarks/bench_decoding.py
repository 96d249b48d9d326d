"""Seconds per answer token: plain greedy, and context-aware decoding as two passes or as one batch.

    .venv/bin/python benchmarks/bench_decoding.py [--tokens 32] [--repeats 3] [--prompts N] [--threads N]
                                                  [--before] [--json PATH]

On the sample corpus and the default models, for each sample prompt the engine builds what the
chat default reads (the top passage in the prompt) and the same conversation without it; each way
of decoding then takes `--tokens` greedy steps from it (the stop token ignored, so every way
decodes as many tokens):

    plain greedy         one row, one forward per token (context-aware decoding off), the base
                         layers alone as the engine reads before any step (the adapter at B = 0)
    plain, adapter term  the same with the LoRA term computed (adding zeros: the engine before)
    two passes           a forward with the passage, then one without (the loop before issue 19)
    one batch, no steps  both conversations as two rows of one forward (`decoding.Rows`), the
                         base layers alone: `context` with context-aware decoding
    one batch            the same with the adapter term computed in both rows (the engine before,
                         and contrast against the adapted model after steps)
    one batch, base      the same, the row without the passage under the base model (adapter off):
                         the default's decoding after its steps
    side by side, base   the two rows of "one batch, base" each its own forward on its own thread
                         (one torch thread each), at the same time (`Rows(side_by_side=True)`);
                         what the engine ran where its start-up probe measured it faster
    on demand, no steps  the conversation with the passage alone per token; the one without it
                         runs only for tokens where more than one token is plausible (the only
                         ones where the contrast can change the choice), catching up on every
                         token since in one forward: what the engine runs, before any step
    on demand, base      the same with the adapter term in the first row and the base model in the
                         second: the default's decoding after its steps
    … torch's threads    (--before) plain greedy and two passes as before issue 19: steps on torch's threads
    … concatenated cache (--before) plain greedy and one batch with transformers' DynamicCache, which
                         copies every layer's keys and values into a new tensor per token (before
                         `decoding.GrowingLayer`)

Every step runs on `decoding.DECODE_THREADS` (1) thread, as the engine's do (side by side: one
per row), except the --before rows on torch's threads.

Prints the median seconds of the prefill (from the ids to the first token's logits) and per token
after it (each run's mean: on demand, tokens differ in cost), over prompts × repeats, the ways interleaved so all see the same load; each way's
per-token time against plain greedy in the same run; whether the two-pass and batched contrast
chose the same tokens; and the load average before and after (the machine may be shared). Bar
(issue 19): context-aware decoding ≤ 1.15× plain greedy per answer token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parent.parent

from sift_chat import config, decoding  # noqa: E402
from sift_chat.corpus import ingest  # noqa: E402
from sift_chat.decoding import DECODE_THREADS, Rows, at_most_threads  # noqa: E402
from sift_chat.engine import Engine  # noqa: E402
from sift_chat.settings import ChatSettings
from sift_chat.generation import contrast  # noqa: E402
from sift_chat.models import load_chat_model, load_embedder  # noqa: E402
from sift_chat.store import Store  # noqa: E402

PROMPTS = [
    "Who founded Brindlemoor and who keeps the lighthouse?",
    "When is the lantern festival and what is eaten there?",
    "How many people live in Brindlemoor, and when does the ferry leave?",
    "What are the bottles of the glassworks coloured with?",
    "Tell me about the history of the town.",
]
ALPHA = 1.0


@torch.no_grad()
def two_passes(model, read, unread, tokens: int, threads: int) -> tuple[float, list[float], list[int]]:
    """The loop before issue 19: each token a forward with the passage, then one without (the steps
    on at most `threads` threads)."""
    started = time.perf_counter()
    out, alone = model(input_ids=read, use_cache=True, logits_to_keep=1), model(input_ids=unread, use_cache=True,
                                                                               logits_to_keep=1)
    prefill, times, chosen = time.perf_counter() - started, [], []
    for _ in range(tokens):
        token = int(contrast(out.logits[0, -1].float(), alone.logits[0, -1], ALPHA).argmax())
        chosen.append(token)
        step = time.perf_counter()
        ids = torch.tensor([[token]])
        with at_most_threads(threads, ids.device):
            out = model(input_ids=ids, cache=out.cache, use_cache=True, logits_to_keep=1)
            alone = model(input_ids=ids, cache=alone.cache, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - step)
    return prefill, times, chosen


def rows(model, prompts, tokens: int, scales=None, threads: int = DECODE_THREADS,
         side_by_side: bool = False) -> tuple[float, list[float], list[int]]:
    started = time.perf_counter()
    decoding = Rows(model, prompts, scales, threads, side_by_side=side_by_side)
    logits = decoding.logits()
    prefill, times, chosen = time.perf_counter() - started, [], []
    for _ in range(tokens):  # a token's time: its choice from the last logits, then the forward after it
        step = time.perf_counter()
        token = int((contrast(logits[0], logits[1], ALPHA) if len(prompts) == 2 else logits[0]).argmax())
        chosen.append(token)
        decoding.append(token)
        logits = decoding.logits()
        times.append(time.perf_counter() - step)
    return prefill, times, chosen


CONTRASTED = {"tokens": 0, "with the prior": 0}  # on demand: how often the contrast needed the second row


def on_demand(model, read, unread, tokens: int, scales: tuple[float, float]) -> tuple[float, list[float], list[int]]:
    """The engine's context-aware decoding: the conversation without the passage a second `Rows`
    whose forward runs only when `contrast` asks for its logits."""
    started = time.perf_counter()
    reading, prior = Rows(model, [read], scales[:1]), Rows(model, [unread], scales[1:])
    logits = reading.logits()[0]
    prefill, times, chosen = time.perf_counter() - started, [], []

    def prior_logits():
        CONTRASTED["with the prior"] += 1
        return prior.logits()[0]

    for _ in range(tokens):
        step = time.perf_counter()
        token = int(contrast(logits, prior_logits, ALPHA).argmax())
        CONTRASTED["tokens"] += 1
        chosen.append(token)
        reading.append(token)
        prior.append(token)
        logits = reading.logits()[0]
        times.append(time.perf_counter() - step)
    return prefill, times, chosen


@contextmanager
def concatenated_cache():
    """`Rows` with transformers' own DynamicCache (keys and values concatenated per token)."""
    def concatenating(layer_states, config):
        cache = DynamicCache(config=config)
        for index, (keys, values) in enumerate(layer_states):
            cache.update(keys, values, index)
        return cache

    growing, decoding.growing = decoding.growing, concatenating
    try:
        yield
    finally:
        decoding.growing = growing


def concatenated(way):
    def decode(read, unread):
        with concatenated_cache():
            return way(read, unread)
    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="greedy steps per prompt (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs over the prompts (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--before", action="store_true",
                        help="also the steps on torch's threads, as before issue 19 (slow on a loaded machine), and "
                             "the cache concatenated per token")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    embedder = load_embedder(config.DEFAULT_EMBEDDER, args.device)
    model, tokenizer = load_chat_model(config.DEFAULT_CHAT_MODEL, args.device, config.data_dir() / "models")
    with tempfile.TemporaryDirectory() as folder, Store(folder) as store:
        ingest(store, embedder, [ROOT / "corpora" / "brindlemoor"], embedder_name=config.DEFAULT_EMBEDDER,
               progress=False)
        engine = Engine(store, embedder, model, tokenizer, embedder_name=config.DEFAULT_EMBEDDER)
        settings = ChatSettings()
        conversations = []
        for prompt in PROMPTS[: args.prompts]:
            picks = engine.select(engine.embed(prompt), settings).picks
            read = engine.chat_input(prompt, [], [picks[0].passage], settings)[0]
            conversations.append((read, engine.chat_input(prompt, [], [], settings)[0]))
    model = engine.model  # with the LoRA layers in it, at B = 0, as the engine answers
    ways = {
        "plain greedy": lambda read, unread: rows(model, [read], args.tokens, (0.0,)),
        "plain, adapter term": lambda read, unread: rows(model, [read], args.tokens),
        "two passes": lambda read, unread: two_passes(model, read, unread, args.tokens, DECODE_THREADS),
        "one batch, no steps": lambda read, unread: rows(model, [read, unread], args.tokens, (0.0, 0.0)),
        "one batch": lambda read, unread: rows(model, [read, unread], args.tokens),
        "one batch, base": lambda read, unread: rows(model, [read, unread], args.tokens, (1.0, 0.0)),
        "on demand, no steps": lambda read, unread: on_demand(model, read, unread, args.tokens, (0.0, 0.0)),
        "on demand, base": lambda read, unread: on_demand(model, read, unread, args.tokens, (1.0, 0.0)),
    }
    if torch.get_num_threads() >= 2 and model.device.type == "cpu":
        ways["side by side, base"] = lambda read, unread: rows(model, [read, unread], args.tokens, (1.0, 0.0),
                                                               side_by_side=True)
    if args.before:
        threads = torch.get_num_threads()
        ways["plain greedy, torch's threads"] = lambda read, unread: rows(model, [read], args.tokens, (0.0,),
                                                                          threads=threads)
        ways["two passes, torch's threads"] = lambda read, unread: two_passes(model, read, unread, args.tokens, threads)
        ways["plain greedy, concatenated cache"] = concatenated(ways["plain greedy"])
        ways["one batch, base, concatenated cache"] = concatenated(ways["one batch, base"])
    load_before = os.getloadavg()
    rows(model, list(conversations[0]), 4)  # warm-up
    prefill = {way: [] for way in ways}
    per_token = {way: [] for way in ways}
    chosen = {way: [] for way in ways}
    for repeat in range(args.repeats):
        for number, (read, unread) in enumerate(conversations, 1):
            print(f"repeat {repeat + 1}, prompt {number}", file=sys.stderr, flush=True)
            for way, decode in ways.items():  # interleaved: every way sees the same load
                seconds, times, tokens = decode(read, unread)
                prefill[way].append(seconds)
                per_token[way].append(statistics.mean(times))
                chosen[way].append(tokens)
    load_after = os.getloadavg()

    medians = {way: (statistics.median(prefill[way]), statistics.median(per_token[way])) for way in ways}
    reference = medians["plain greedy"][1]
    same = sum(a == b for a, b in zip(chosen["two passes"], chosen["one batch"]))
    print(f"{config.DEFAULT_CHAT_MODEL}, fp32, {torch.get_num_threads()} threads, {os.cpu_count()} cores; sample "
          f"corpus, {len(conversations)} prompts × {args.repeats} repeats, {args.tokens} tokens each; prompt with "
          f"the passage {statistics.median(r.shape[1] for r, _ in conversations):g} tokens, without "
          f"{statistics.median(u.shape[1] for _, u in conversations):g} (medians); α = {ALPHA:g}")
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    print("| decoding | prefill, s | per token, ms | per token vs plain greedy |")
    print("|---|---|---|---|")
    for way, (first, step) in medians.items():
        print(f"| {way} | {first:.3f} | {step * 1000:.1f} | {step / reference:.2f}x |")
    print(f"\nthe two passes and one batch chose the same tokens for {same} of {len(chosen['one batch'])} runs")
    if "side by side, base" in chosen:
        beside = sum(a == b for a, b in zip(chosen["one batch, base"], chosen["side by side, base"]))
        print(f"one batch and side by side (base) chose the same tokens for {beside} of {len(chosen['one batch'])} runs")
    demand = sum(a == b for a, b in zip(chosen["one batch, base"], chosen["on demand, base"]))
    print(f"on demand, the second row ran for {CONTRASTED['with the prior']} of {CONTRASTED['tokens']} tokens")
    print(f"one batch and on demand (base) chose the same tokens for {demand} of {len(chosen['one batch'])} runs")
    for label, way in (("reading (no steps)", "on demand, no steps"), ("after steps", "on demand, base")):
        ratio = medians[way][1] / reference
        print(f"bar: context-aware decoding <= 1.15x plain greedy per token, {label}: "
              f"{'met' if ratio <= 1.15 else 'MISSED'} ({ratio:.2f}x, {way})")
    if args.json:
        Path(args.json).write_text(json.dumps({"prefill": prefill, "per_token": per_token, "load": [load_before,
                                                                                                    load_after]}))


if __name__ == "__main__":
    main()
