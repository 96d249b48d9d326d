"""Seconds per LoRA step of the default chat model, against the machine's own fp32 matmul rate.

    .venv/bin/python benchmarks/bench_lora_step.py [--json] [--device cpu|cuda|all] [--tokens 128 256]
                                                   [--top-layers all 8 4] [--threads N] [--attn sdpa|eager]
                                                   [--precision fp32 bf16 bf16-plain]

A step is what `Adapter.step` does for one passage: tokenise, forward, next-token loss, backward,
optimizer step. It is timed after warm-up on one passage of T tokens: median and best of a few
steps (on a shared machine the best is the cleaner number). The matmul rate is torch.mm of two
2048×2048 matrices (4096 on CUDA) in the step's precision, median of repeats, measured in the
same run before and after the steps (a busy machine shows as a gap between the two); the better
one is the reference. `--precision bf16` runs the step as the engine does where the start-up
probe chose bf16: the base weights' products on their kept bf16 copies (`lora.base_matmuls`),
fp32 everywhere else (LoRA, Adam, norms, attention); its kernels alone are timed the same way.

FLOPs of a step, with N decoder layers of P linear weights each, the top L of them adapted
(L = N for full depth), hidden size d, vocabulary V (the head is tied to the embeddings and
frozen), attention width A = heads·head_dim, and LoRA modules of rank r on (in → out) linears:

    forward  = 2·T·N·P + 2·(T−1)·V·d + 4·T²·A·N + F_lora            F_lora = 2·T·r·Σ(in + out)
    backward = 2·T·(L·P − P_qkv) + 2·(T−1)·V·d + 8·T²·A·L + 2·F_lora

The head runs on the T−1 positions that predict a token. The backward computes input gradients
through the head and the top L layers only (nothing below is recorded by autograd), weight
gradients for the LoRA matrices only, and none for the q/k/v projections of the lowest adapted
layer, whose input needs none (P_qkv). Attention is counted as full T×T like
torch.utils.flop_counter (a causal kernel may skip half). The count is cross-checked with
FlopCounterMode on one step run with eager attention (CPU SDPA kernels are not counted there).

"Kernels alone" runs the step's big kernels back to back with nothing between them (every
weight matmul, the head's, attention; see `kernel_floor`): the fastest a step could be here,
as a fraction of the matmul rate it is the ceiling for the step's own fraction.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


from sift_chat import lora  # noqa: E402
from sift_chat.adaptation import HEAD_CHUNK_ELEMENTS, AdaptationSettings, Adapter, next_token_loss  # noqa: E402
from sift_chat.lora import base_linear, base_matmuls, low_precision_product, matmul_dtype  # noqa: E402
from sift_chat.models import load_chat_model  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_rate(device: torch.device, n: int, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of torch.mm on two n×n matrices of `dtype` (2·n³ FLOPs), median of repeats."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / statistics.median(seconds(lambda: torch.mm(a, b), device, repeats, warmup=3)) / 1e9


def step_flops(adapter: Adapter, tokens: int) -> float:
    """The FLOPs of one step on `tokens` tokens, by the formula in the module docstring."""
    model = adapter.model
    config, layers, t = model.config, model.model.layers, tokens

    def base_weights(module: nn.Module, names=None) -> int:
        return sum(
            m.weight.numel()
            for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and "lora_" not in name and (names is None or any(n in name for n in names))
        )

    n, d, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    attention = config.num_attention_heads * (getattr(config, "head_dim", None) or d // config.num_attention_heads)
    adapted = adapter.adapted_layers
    p, p_qkv = base_weights(layers[0]), base_weights(layers[adapted[0]], ("q_proj", "k_proj", "v_proj"))
    lora = 2 * t * sum(m.lora_A.numel() + m.lora_B.numel() for m in adapter.lora_modules.values())
    head = 2 * (t - 1) * vocab * d
    forward = 2 * t * n * p + head + 4 * t**2 * attention * n + lora
    backward = 2 * t * (len(adapted) * p - p_qkv) + head + 8 * t**2 * attention * len(adapted) + 2 * lora
    return float(forward + backward)


def counted_flops(adapter: Adapter, text: str) -> float:
    """FLOPs of one step as FlopCounterMode counts them, with eager attention so that it sees them."""
    base = adapter.model
    previous = base.config._attn_implementation
    base.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter:
            adapter.step(text)
    finally:
        base.set_attn_implementation(previous)
    return float(counter.get_total_flops())


def kernel_floor(adapter: Adapter, tokens: int, device: torch.device, repeats: int) -> float:
    """Median seconds of the step's own big kernels run back to back with nothing between them:
    every base-weight matmul of the forward (T rows), the input-gradient matmul through each
    adapted layer's weights (none for the lowest one's q/k/v, as in the FLOP count), the head's
    forward and backward matmuls in the chunks `head_loss` uses, and causal SDPA attention
    (forward and backward in adapted layers). No LoRA products, norms, activations or autograd:
    the fastest a step with these kernels could be on this machine."""
    model, t = adapter.model, tokens
    config, layers = model.config, model.model.layers
    adapted = adapter.adapted_layers
    linears = [[(name, m.weight) for name, m in layer.named_modules() if isinstance(m, nn.Linear)] for layer in layers]
    weights = [[w for _, w in named] for named in linears]
    qkv = ("q_proj", "k_proj", "v_proj")
    backward = [[w for name, w in linears[i] if i != adapted[0] or not any(p in name for p in qkv)] for i in adapted]
    inputs = {w.shape[1]: torch.randn(t, w.shape[1], device=device) for ws in weights for w in ws}
    grads = {w.shape[0]: torch.randn(t, w.shape[0], device=device) for ws in weights for w in ws}
    head = model.get_output_embeddings().weight
    vocab, d = head.shape
    chunks = max(1, -(-(t - 1) * vocab // HEAD_CHUNK_ELEMENTS))
    rows = [(t - 1) * (i + 1) // chunks - (t - 1) * i // chunks for i in range(chunks)]
    hidden = {r: torch.randn(r, d, device=device) for r in rows}
    probs = {r: torch.randn(r, vocab, device=device) for r in rows}
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    q, k, v = (torch.randn(1, heads, t, head_dim, device=device, requires_grad=True) for _ in range(3))
    attention_grad = torch.randn(1, heads, t, head_dim, device=device)

    dtype = matmul_dtype()  # bf16 where the step's base matmuls run on kept bf16 copies (packed where they are)

    def product(x, weight, transposed=False):  # in the step's dtype, on the kept copy, as the step's are
        if dtype is None:
            return x @ weight if transposed else x @ weight.T
        return low_precision_product(x.to(dtype), weight, dtype, transposed).float()

    def run():
        for i, ws in enumerate(weights):
            for w in ws:
                base_linear(inputs[w.shape[1]], w, None, dtype)
            if i in adapted:
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(attention_grad)
            else:
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=True)
        for r in rows:
            product(hidden[r], head)
        for r in rows:
            product(probs[r], head, transposed=True)
        for ws in reversed(backward):
            for w in reversed(ws):
                product(grads[w.shape[0]], w, transposed=True)

    return statistics.median(seconds(run, device, repeats, warmup=2))


@contextmanager
def precision_context(precision: str):
    """What the engine runs a step in (`probe.Compute.context`): the base matmuls in bf16, or as
    stored; bf16-plain: on plain bf16 copies, not packed for oneDNN (the engine before 2026-12-05)."""
    packing = lora._packing
    if precision == "bf16-plain":
        lora._packing = False
    try:
        with base_matmuls(torch.bfloat16 if precision.startswith("bf16") else None):
            yield
    finally:
        lora._packing = packing


def bench_config(model, tokenizer, device, source, tokens, top_layers, steps, warmup, precision="fp32"):
    settings = AdaptationSettings(max_passage_tokens=tokens, top_layers=top_layers)
    # a passage about as long as the step reads, as the engine's are (a 200 kB text would add
    # 80 ms of tokenising to every step)
    text = source[: 8 * tokens]
    adapter = Adapter(model, tokenizer, settings)
    try:
        assert adapter.tokens(text).shape[1] == tokens
        with precision_context(precision):
            step_times = seconds(lambda: adapter.step(text), device, steps, warmup)
            ids = adapter.tokens(text)
            with torch.no_grad():
                forward = statistics.median(seconds(lambda: next_token_loss(adapter.model, ids), device, steps, 1))
            floor = kernel_floor(adapter, tokens, device, steps)
        counted = counted_flops(adapter, text)
        flops = step_flops(adapter, tokens)
    finally:
        adapter.reset()
        model = adapter.remove()  # the plain model again, for the next configuration
    return model, dict(precision=precision, tokens=tokens, lora_layers=top_layers or model.config.num_hidden_layers,
                       seconds=statistics.median(step_times), best_seconds=min(step_times), forward_seconds=forward, floor_seconds=floor, gflop=flops / 1e9,
                       counted_gflop=counted / 1e9)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (cpu, and cuda when present)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--top-layers", nargs="+", default=["all", "8", "4"], help="'all' or a layer count")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--model", default=None, help="chat model (default: the packaged SmolLM2)")
    parser.add_argument("--cache-dir", default=None, help="where the converted model is kept")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "bf16-plain"],
                        help="fp32, and/or bf16 as the engine runs a step where the probe chose it, and/or "
                             "bf16-plain: bf16 products on weight copies not packed for oneDNN (before 2026-12-05)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [torch.device(d) for d in devices if d != "cuda" or torch.cuda.is_available()]
    tops = [None if t == "all" else int(t) for t in args.top_layers]
    source = inspect.getsource(argparse)  # a real text that every machine has

    rows, machine = [], []
    for device in devices:
        model, tokenizer = load_chat_model(args.model, device=device, cache_dir=args.cache_dir)
        model.set_attn_implementation(args.attn)
        n = 4096 if device.type == "cuda" else 2048
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-plain": torch.bfloat16}
        rate_before = {p: matmul_rate(device, n, dtype=dtypes[p]) for p in args.precision}
        results = []
        for precision in args.precision:
            for tokens in args.tokens:
                for top in tops:
                    model, row = bench_config(model, tokenizer, device, source, tokens, top, args.steps, args.warmup,
                                              precision)
                    results.append(row)
        rate_after = {p: matmul_rate(device, n, dtype=dtypes[p]) for p in args.precision}
        model_layers = model.config.num_hidden_layers
        rates = {p: max(rate_before[p], rate_after[p]) for p in args.precision}
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
        machine.append(dict(device=str(device), name=name, threads=torch.get_num_threads(), attn=args.attn,
                            matmul_n=n, matmul_gflops_before=rate_before, matmul_gflops_after=rate_after,
                            load_average=os.getloadavg()[0]))
        full = {(r["precision"], r["tokens"]): r["best_seconds"] for r in results if r["lora_layers"] == model_layers}
        for row in results:  # speed-up of top-L over all layers, best steps (the less noisy ones)
            key = (row["precision"], row["tokens"])
            row["speedup"] = full[key] / row["best_seconds"] if key in full else None
            rate = rates[row["precision"]]
            row.update(device=str(device), gflops=row["gflop"] / row["seconds"], of_matmul=row["gflop"] / row["seconds"] / rate,
                       best_of_matmul=row["gflop"] / row["best_seconds"] / rate, floor_of_matmul=row["gflop"] / row["floor_seconds"] / rate)
            rows.append(row)
        del model

    if args.json:
        print(json.dumps(dict(machine=machine, steps=rows), indent=2))
        return
    for m in machine:
        rates = "; ".join(f"{p} mm {m['matmul_n']}² {m['matmul_gflops_before'][p]:.0f} GFLOP/s before, "
                          f"{m['matmul_gflops_after'][p]:.0f} after" for p in m["matmul_gflops_before"])
        print(f"- {m['device']} ({m['name']}), {m['threads']} threads, attention {m['attn']}: {rates}; "
              f"load average {m['load_average']:.2f}")
    print()
    print("| device | precision | tokens | LoRA layers | s/step | best | best vs all layers | s forward (no grad) | GFLOP/step | counted "
          "| GFLOP/s | of matmul rate | best step | s kernels alone | kernels alone, of matmul rate |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speedup = f"{r['speedup']:.2f}×" if r["speedup"] else "—"
        print(f"| {r['device']} | {r['precision']} | {r['tokens']} | {r['lora_layers']} | {r['seconds']:.3f} | {r['best_seconds']:.3f} | {speedup} "
              f"| {r['forward_seconds']:.3f} | {r['gflop']:.1f} | {r['counted_gflop']:.1f} | {r['gflops']:.0f} "
              f"| {100 * r['of_matmul']:.0f}% | {100 * r['best_of_matmul']:.0f}% | {r['floor_seconds']:.3f} "
              f"| {100 * r['floor_of_matmul']:.0f}% |")


if __name__ == "__main__":
    main()
