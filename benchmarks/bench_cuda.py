"""The message on a CUDA GPU: bench_message.py's stage table at fp32 and bf16, and the LoRA step
against the GPU's own bf16 matmul rate.

    .venv/bin/python benchmarks/bench_cuda.py [--modes default,context,both] [--prompts 5] [--tokens 256]

On the sample corpus with the default models on `cuda`, for each precision (fp32; bf16 products
on kept bf16 copies of the weights, fp32 LoRA weights and Adam state, as `probe.Compute` runs it) and each mode: the median
seconds of embed, select, fine-tune (the 8 steps), first token, generation and the whole answer,
the answer's tokens, and the whole answer against `context` at fp32 in the same run; whether the
bf16 answers are the fp32 ones word for word. Then one LoRA step on a passage of `--tokens`
tokens (all layers) at each precision: seconds (median of 7), its FLOPs (bench_lora_step.py's
count) per second, and that as a fraction of torch.mm's bf16 rate (8192² matrices) and fp32 rate
measured in the same run. Exits with one line on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="default,context,both", help="comma-separated chat modes (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256, help="passage tokens of the timed LoRA step")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the answers' limit (the chat's default)")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--device", default="cuda", help="cuda (cpu: a dry run of this script's logic, slow)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_cuda: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with an "
              "NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
        return 1

    from bench_lora_step import seconds, step_flops  # noqa: E402  (beside this file)
    from bench_message import PROMPTS, answer  # noqa: E402

    from sift_chat import config
    from sift_chat.corpus import ingest
    from sift_chat.engine import Engine
    from sift_chat.settings import ChatSettings
    from sift_chat.models import load_chat_model, load_embedder
    from sift_chat.probe import Compute
    from sift_chat.store import Store

    device = torch.device(args.device)
    modes = list(dict.fromkeys(ChatSettings.mode if m == "default" else m for m in args.modes.split(",") if m.strip()))
    precisions = ("fp32", "bf16")
    embedder = load_embedder(config.DEFAULT_EMBEDDER, args.device)
    model, tokenizer = load_chat_model(config.DEFAULT_CHAT_MODEL, args.device, config.data_dir() / "models")
    prompts = PROMPTS[: args.prompts]
    runs: dict[tuple[str, str], list[dict]] = {}
    answers: dict[tuple[str, str], list[str]] = {}
    with tempfile.TemporaryDirectory() as folder, Store(folder) as store:
        ingest(store, embedder, [ROOT / "corpora" / "brindlemoor"], embedder_name=config.DEFAULT_EMBEDDER, progress=False)
        engine = Engine(store, embedder, model, tokenizer, embedder_name=config.DEFAULT_EMBEDDER)
        for precision in precisions:
            engine.compute = Compute(precision, precision, 1, source="forced")
            answer(engine, prompts[0], ChatSettings(mode=modes[0], max_new_tokens=args.max_new_tokens))  # warm-up
            for prompt in prompts:  # modes interleaved: all see the same state of the GPU
                for mode in modes:
                    result = answer(engine, prompt, ChatSettings(mode=mode, max_new_tokens=args.max_new_tokens))
                    runs.setdefault((precision, mode), []).append(result)
                    answers.setdefault((precision, mode), []).append(result.pop("answer", ""))

        # one LoRA step at each precision, against the GPU's matmul rates
        adapter = engine.adapter
        text = inspect.getsource(argparse)[: 8 * args.tokens]
        step = {}
        for precision in precisions:
            compute = Compute(precision, precision, 1, source="forced")

            def one_step():
                with compute.context("step"):
                    adapter.step(text)

            saved = adapter.settings
            adapter.settings = replace(saved, max_passage_tokens=args.tokens)
            try:
                assert adapter.tokens(text).shape[1] == args.tokens
                step[precision] = statistics.median(seconds(one_step, device, args.steps, warmup=2))
            finally:
                adapter.settings = saved
                adapter.reset()
        flops = step_flops(adapter, args.tokens)
        rates = {p: mm_rate(device, dtype, args.matmul_size) for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    stages = ["embed", "select", "fine-tune", "first_token", "generate", "whole", "tokens"]
    medians = {row: {s: statistics.median(r.get(s, 0.0) for r in results) for s in stages} for row, results in runs.items()}
    reference = medians.get(("fp32", "context"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"{name}, torch {torch.__version__}; sample corpus, default models and chat "
          f"settings; median of {len(prompts)} prompts after a warm-up")
    print("| precision | mode | embed | select | fine-tune | first token | generate | whole answer | vs context fp32 "
          "| answer tokens | ended | answers as fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (precision, mode), m in medians.items():
        ratio = f"{m['whole'] / reference['whole']:.2f}x" if reference else "-"
        ended = ", ".join(f"{n} {how}" for how, n in Counter(r["ended"] for r in runs[(precision, mode)]).items())
        same = sum(a == b for a, b in zip(answers[(precision, mode)], answers[("fp32", mode)]))
        print(f"| {precision} | {mode} | {m['embed']:.3f} | {m['select']:.3f} | {m['fine-tune']:.3f} | "
              f"{m['first_token']:.3f} | {m['generate']:.3f} | {m['whole']:.3f} | {ratio} | {m['tokens']:g} | {ended} | "
              f"{same}/{len(prompts)} |")
    print(f"\ntorch.mm {args.matmul_size}²: fp32 {rates['fp32'] / 1e12:.1f} TFLOP/s, bf16 {rates['bf16'] / 1e12:.1f} TFLOP/s")
    print(f"LoRA step, {args.tokens} tokens, all layers, {flops / 1e9:.1f} GFLOP:")
    for precision in precisions:
        achieved = flops / step[precision]
        print(f"  {precision}: {step[precision] * 1e3:.1f} ms, {achieved / 1e12:.2f} TFLOP/s = "
              f"{achieved / rates['bf16']:.1%} of the bf16 matmul rate ({achieved / rates[precision]:.1%} of {precision}'s)")
    return 0


def mm_rate(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of torch.mm on two n×n matrices (2·n³ FLOPs), median of repeats after warm-up."""
    from bench_lora_step import seconds

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / statistics.median(seconds(lambda: torch.mm(a, b), device, repeats, warmup=3))


if __name__ == "__main__":
    sys.exit(main())
