"""Fitting a long conversation into the model's context: `Engine.chat_input` (each turn tokenised
once, a running sum, a few renderings) against the reference it replaced (render the whole
conversation, drop the two oldest turns, render again …), on the default chat model's tokenizer
and template, in the same run.

    .venv/bin/python benchmarks/bench_fit.py [--turns 125,250,500,1000,2000] [--reference-max 500] [--data-dir DIR]

Prints per number of turns: the conversation's characters, the seconds of each (median of
--runs; the reference once, up to --reference-max turns: it is quadratic), their ratio, the
renderings of the chat template, and whether both kept the same token ids.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sift_chat import config
from sift_chat.engine import Engine
from sift_chat.settings import ChatSettings
from sift_chat.generation import conversation


def dropping_two_per_rendering(engine: Engine, prompt: str, history: list[dict], budget: int) -> list[int]:
    """The reference: what `chat_input` did before (quadratic in the turns)."""
    turns = [m for m in history if m.get("role") in ("user", "assistant") and m.get("content")]
    while True:
        ids = engine.template.ids(conversation(prompt, turns, []))
        if len(ids) <= budget or not turns:
            return ids
        turns = turns[2:] if len(turns) > 1 else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", default="125,250,500,1000,2000")
    parser.add_argument("--reference-max", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data-dir", default=None, help="its model cache is used (default: sift-chat's)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    engine = Engine.load(config.data_dir(args.data_dir), device="cpu")
    settings = ChatSettings()
    budget = settings.max_context_tokens - settings.max_new_tokens
    prompt = "And who keeps the lighthouse now?"
    renderings = []
    render = engine.tokenizer.apply_chat_template
    engine.tokenizer.apply_chat_template = lambda messages, **kw: renderings.append(1) or render(messages, **kw)
    warm = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    engine.chat_input(prompt, warm, [], settings)  # the template's overhead per message, measured once
    print("| turns | characters | chat_input (s) | reference (s) | reference / chat_input | renderings | same ids |")
    print("|---|---|---|---|---|---|---|")
    for turns in (int(n) for n in args.turns.split(",")):
        history = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}: who keeps the lighthouse?"}
                   for i in range(turns)]
        seconds = []
        for _ in range(args.runs):
            renderings.clear()
            started = time.perf_counter()
            ids, _ = engine.chat_input(prompt, history, [], settings)
            seconds.append(time.perf_counter() - started)
        fitted, count = statistics.median(seconds), len(renderings)
        if turns <= args.reference_max:
            started = time.perf_counter()
            reference = dropping_two_per_rendering(engine, prompt, history, budget)
            slow = time.perf_counter() - started
            cells = f"{slow:.2f} | {slow / fitted:.0f}x | {count} | {ids[0].tolist() == reference}"
        else:
            cells = f"— | — | {count} | —"
        characters = sum(len(t["content"]) for t in history)
        print(f"| {turns} | {characters} | {fitted:.4f} | {cells} |")


if __name__ == "__main__":
    main()
