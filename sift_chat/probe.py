"""Measured, not assumed: the precision and the decoding threads this machine runs the model fastest at.

At start-up (`Engine.load`) the probe times, on the loaded model's own shapes:

    matmuls   every distinct linear shape of the model (the head aside) on T = 128 rows, the shape
              of a LoRA step's and a prefill's matmuls: in fp32, and in bf16 as the LoRA layers
              run them (`lora.base_matmuls`: fp32 activations cast to bf16, times a bf16 copy
              of the weight kept beside it, the product cast back)
    decode    the one-token decoding step the chat runs (`decoding.Rows`, two rows as in
              context-aware decoding) on 1 thread and on torch's thread count, at each precision
              it may run at; and, on a CPU with two threads or more, the two rows side by side
              (a forward per row, each on its own thread) at the decode precision; and the contrast
              on demand: a token of the conversation with the passages alone, the one without
              them caught up on three tokens every third token (`demand`); and that step with
              a draft of k guessed tokens checked in the same forward (`draft_k`)

and chooses (`choose`, a pure function of the timings):

    precision         bf16 when its matmuls take at most 1/MIN_SPEEDUP of fp32's time, else fp32
    decode precision  the precision's, unless its decoding step is not MIN_SPEEDUP faster than
                      fp32's (one or two rows per token: bf16 GEMV is no faster on some CPUs);
                      a forced precision is the decoding's too
    decode threads    whichever count decodes faster at the decode precision
    side by side      when the two rows side by side decode MIN_SIDE_SPEEDUP faster than the
                      faster batched step
    on demand         when the contrast on demand is faster than both: where a second row costs
                      little (a GPU) the rows stay in step; where it costs most of a first one
                      (a CPU reading the weights) the second runs only for the tokens that need it
    drafts            the k among DRAFT_LENGTHS whose forward yields the most answer tokens per
                      second, TOKENS_PER_FORWARD[k] / draft_k against 1 / the plain step, when
                      that is MIN_DRAFT_SPEEDUP faster (on a CPU a forward over k + 1 positions
                      costs little more than over one until the matmuls stop streaming the weights)

The timings are cached per machine in <data dir>/compute.json, keyed by the CPU's model name (or
the GPU's), torch's version and thread count, the device and the model's shapes; a key not seen
before is measured (a few seconds) and added. `--precision fp32|bf16` (or $SIFT_CHAT_PRECISION)
forces the precision, $SIFT_CHAT_DECODE_THREADS the threads; the rest is still measured.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Protocol

import torch
from torch import nn

from .lora import base_linear, base_matmuls, drop_copies, keep_copies

PRECISIONS = ("fp32", "bf16")
MIN_SPEEDUP = 1.3  # bf16 only when clearly faster
MIN_SIDE_SPEEDUP = 1.1  # rows side by side only when faster beyond the noise of shared cores
ROWS = 128  # rows of the probe's matmuls: a step's passage, a prefill's prompt
# the conversations a decoding step is timed after: with a passage read and without (the sample's medians)
READ_TOKENS, UNREAD_TOKENS = 96, 35
# their adapter scales as the default decodes after its steps (the LoRA layers of the engine's model, if any)
AFTER_STEPS = (1.0, 0.0)
# answer tokens a forward yields with drafts of k tokens guessed from what the answer reads
# (`generation.PromptLookup`): measured on 200 answers of the world with `context` (README: Drafts)
TOKENS_PER_FORWARD = {1: 1.53, 2: 1.87, 3: 2.10, 4: 2.26}
DRAFT_LENGTHS = (2, 3, 4)
MIN_DRAFT_SPEEDUP = 1.1
VERSION = 5  # what the probe times; cached timings of another version are measured again
CACHE_FILE = "compute.json"
ENV_PRECISION = "SIFT_CHAT_PRECISION"
ENV_DECODE_THREADS = "SIFT_CHAT_DECODE_THREADS"


@dataclass(frozen=True)
class Compute:
    """How the engine runs the model: `precision` for the LoRA steps and the prefill,
    `decode_precision` and `decode_threads` for each decoding step. The default (nothing
    measured) is fp32 on one decoding thread, as before the probe."""

    precision: str = "fp32"
    decode_precision: str = "fp32"
    decode_threads: int = 1
    decode_side_by_side: bool = False  # the rows of a decoding step each on its own thread (`decoding.Rows`)
    contrast_on_demand: bool = False  # the conversation without the passages a forward only where the contrast needs it
    draft_tokens: int = 0  # tokens guessed from what the answer reads, checked in each decoding forward (0: none)
    source: str = "default"  # default, measured, cached (measured before), forced (a flag decided it)
    timings: dict = field(default_factory=dict)  # seconds, by name (Measure's)
    threads: int = 1  # torch's thread count when measured
    cache: str = ""  # where the timings are kept

    def context(self, stage: str = "step") -> ContextManager:
        """The context to run `stage` in ("step", "prefill" or "decode"): the base weights'
        matmuls on their kept bf16 copies (`lora.base_matmuls`), or as stored."""
        precision = self.decode_precision if stage == "decode" else self.precision
        return base_matmuls(torch.bfloat16 if precision == "bf16" else None)

    def keep_copies(self, model: nn.Module) -> None:
        """Make the model's kept bf16 weight copies now where steps and prefill run in bf16
        (`lora.keep_copies`), so that the first message does not pay for them (0.6 s here);
        elsewhere free any (the probe's bf16 timings of the model leave about 200 MB for SmolLM2-135M)."""
        if self.precision == "bf16":
            keep_copies(model, torch.bfloat16)
        else:
            drop_copies(model)

    def describe(self) -> str:
        """One line: what was chosen and on what evidence."""
        what = f"compute: {self.precision}, decode"
        if self.decode_precision != self.precision:
            what = f"compute: {self.precision} for steps and prefill, decode {self.decode_precision}"
        what += (" with each row on its own thread" if self.decode_side_by_side else
                 f" on {self.decode_threads} thread{'s' * (self.decode_threads != 1)}")
        what += ", the contrast on demand" if self.contrast_on_demand else ""
        what += f", drafts of {self.draft_tokens}" if self.draft_tokens else ""
        t, n = self.timings, self.threads
        evidence = []
        if "matmul_fp32" in t and "matmul_bf16" in t:
            evidence.append(f"bf16 matmuls {t['matmul_fp32'] / t['matmul_bf16']:.2f}x fp32's speed")
        for precision in PRECISIONS:
            one, many = t.get(f"decode_{precision}_1"), t.get(f"decode_{precision}_{n}")
            if one is not None and many is not None and n > 1:
                evidence.append(f"{precision} decode step {one * 1e3:.0f} ms on 1 thread, {many * 1e3:.0f} ms on {n}")
            elif one is not None:
                evidence.append(f"{precision} decode step {one * 1e3:.0f} ms")
            if f"decode_{precision}_side" in t:
                evidence.append(f"side by side {t[f'decode_{precision}_side'] * 1e3:.0f} ms")
            if f"decode_{precision}_demand" in t:
                evidence.append(f"on demand {t[f'decode_{precision}_demand'] * 1e3:.0f} ms")
            drafts = [f"{k}: {t[f'decode_{precision}_draft{k}'] * 1e3:.0f} ms" for k in DRAFT_LENGTHS
                      if f"decode_{precision}_draft{k}" in t]
            if drafts:
                evidence.append(f"with a draft of {', '.join(drafts)}")
        how = {"measured": "measured", "cached": "measured before", "forced": "forced; measured",
               "default": "not measured"}[self.source]
        return f"{what} ({how}{': ' if evidence else ''}{'; '.join(evidence)}{f'; kept in {self.cache}' if self.cache else ''})"


def choose(timings: dict, threads: int, precision: str = "auto", decode_threads: int | None = None,
           min_speedup: float = MIN_SPEEDUP) -> tuple[str, str, int]:
    """(precision, decode precision, decode threads) from the timings (seconds; lower is faster):

        precision = bf16  iff  matmul_fp32 / matmul_bf16 ≥ min_speedup    (unless forced)
        decode precision = bf16  iff  precision = bf16 and
                           min_k decode_fp32_k / min_k decode_bf16_k ≥ min_speedup
        decode threads = argmin_k decode_{decode precision}_k,  k ∈ {1, threads} (ties: 1)

    A forced precision (not "auto") is the decoding's too. A timing that is missing counts as
    never measured: fp32, and 1 thread."""
    forced = precision != "auto"
    if not forced:
        fp32, bf16 = timings.get("matmul_fp32"), timings.get("matmul_bf16")
        precision = "bf16" if fp32 and bf16 and fp32 / bf16 >= min_speedup else "fp32"

    def best(p: str) -> float | None:
        found = [timings[f"decode_{p}_{k}"] for k in {1, threads} if f"decode_{p}_{k}" in timings]
        return min(found) if found else None

    decode_precision = precision if forced else "fp32"
    if precision == "bf16" and not forced:
        fp32, bf16 = best("fp32"), best("bf16")
        decode_precision = "bf16" if fp32 and bf16 and fp32 / bf16 >= min_speedup else "fp32"
    if decode_threads is None:
        one, many = timings.get(f"decode_{decode_precision}_1"), timings.get(f"decode_{decode_precision}_{threads}")
        decode_threads = threads if one is not None and many is not None and many < one else 1
    return precision, decode_precision, decode_threads


def side_by_side(timings: dict, decode_precision: str, threads: int, min_speedup: float = MIN_SIDE_SPEEDUP) -> bool:
    """Whether the rows of a decoding step run each on its own thread:

        min_k decode_{p}_k / decode_{p}_side ≥ min_speedup,  k ∈ {1, threads},  p the decode precision

    (a batched step's small-M matmuls can cost more than one row's, and a second core reads the
    weights for the second row at the same time). Never when not measured."""
    side = timings.get(f"decode_{decode_precision}_side")
    batched = [timings[f"decode_{decode_precision}_{k}"] for k in {1, threads} if f"decode_{decode_precision}_{k}" in timings]
    return side is not None and bool(batched) and min(batched) >= min_speedup * side


def on_demand(timings: dict, decode_precision: str, threads: int) -> bool:
    """Whether context-aware decoding runs the conversation without the passages only for the
    tokens where the contrast can change the choice (`generation.contrast`), catching up then:

        decode_{p}_demand < min(decode_{p}_k, decode_{p}_side),  k ∈ {1, threads}

    `demand` is timed with the second conversation needed every third token, as for a third of
    the default's answer tokens on the sample corpus (README). Never when not measured."""
    demand = timings.get(f"decode_{decode_precision}_demand")
    in_step = [timings[name] for name in (f"decode_{decode_precision}_{k}" for k in {1, threads})
               if name in timings]
    in_step += [timings[f"decode_{decode_precision}_side"]] if f"decode_{decode_precision}_side" in timings else []
    return demand is not None and bool(in_step) and demand < min(in_step)


def draft_length(timings: dict, decode_precision: str, decode_threads: int,
                 min_speedup: float = MIN_DRAFT_SPEEDUP) -> int:
    """How many guessed tokens each decoding forward checks (0: none):

        k* = argmax_k TOKENS_PER_FORWARD[k] / draft_k,   k ∈ DRAFT_LENGTHS,
        drafts of k* iff TOKENS_PER_FORWARD[k*] / draft_k* ≥ min_speedup / decode_{p}_{threads}

    with draft_k the two rows' step checking k guesses, p the decode precision. Never when not measured."""
    plain = timings.get(f"decode_{decode_precision}_{decode_threads}")
    rates = {k: TOKENS_PER_FORWARD[k] / timings[f"decode_{decode_precision}_draft{k}"] for k in DRAFT_LENGTHS
             if timings.get(f"decode_{decode_precision}_draft{k}")}
    if not plain or not rates:
        return 0
    best = max(rates, key=rates.get)
    return best if rates[best] >= min_speedup / plain else 0


# -- measuring --------------------------------------------------------------------------------


class Measure(Protocol):
    def matmuls(self, precision: str) -> float: ...
    def decode(self, precision: str, threads: int) -> float: ...
    def decode_side_by_side(self, precision: str) -> float: ...
    def decode_on_demand(self, precision: str) -> float: ...
    def decode_draft(self, precision: str, threads: int, draft: int) -> float: ...


class ModelTimer:
    """Times the model's own shapes on its device (median of `repeats` after a warm-up)."""

    def __init__(self, model: nn.Module, repeats: int = 3):
        self.model = model
        self.repeats = repeats
        self.device = next(model.parameters()).device
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.shapes = sorted({(m.in_features, m.out_features) for m in model.modules()
                              if isinstance(m, nn.Linear) and m is not head})

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, run: Callable[[], None]) -> float:
        run()  # warm-up: allocations, kernels chosen
        times = []
        for _ in range(self.repeats):
            self._sync()
            started = time.perf_counter()
            run()
            self._sync()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    @torch.no_grad()
    def matmuls(self, precision: str) -> float:
        """Seconds for one product x Wᵀ of each shape on ROWS rows as a step's and a prefill's base
        layers compute it at `precision` (`lora.base_linear`: fp32 x, the weight's kept copy)."""
        generator = torch.Generator().manual_seed(0)
        pairs = [(torch.randn(ROWS, n_in, generator=generator).to(self.device),
                  torch.randn(n_out, n_in, generator=generator).to(self.device)) for n_in, n_out in self.shapes]
        dtype = torch.bfloat16 if precision == "bf16" else None

        def run():
            for x, w in pairs:
                base_linear(x, w, None, dtype)

        return self._timed(run)

    @torch.no_grad()
    def decode(self, precision: str, threads: int, side_by_side: bool = False, draft: int = 0) -> float:
        """Seconds for one decoding step of two rows (READ_TOKENS and UNREAD_TOKENS) on `threads` threads,
        or each row on its own thread; with `draft`, the step also checks that many guessed tokens
        (then dropped, so every run checks them after the same conversation)."""
        from .decoding import Rows

        compute = Compute(precision=precision, decode_precision=precision, decode_threads=threads)
        vocab = self.model.get_input_embeddings().weight.shape[0]
        prompts = [torch.arange(n, device=self.device)[None] % vocab for n in (READ_TOKENS, UNREAD_TOKENS)]
        rows = Rows(self.model, prompts, AFTER_STEPS, threads=threads,
                    prefill_context=lambda: compute.context("prefill"),
                    step_context=lambda: compute.context("decode"), side_by_side=side_by_side)
        token = iter(range(1, 10_000))

        def run():
            rows.append(next(token) % vocab)
            if draft:
                rows.logits([next(token) % vocab for _ in range(draft)])
                rows.keep(0)
            else:
                rows.logits()

        return self._timed(run)

    def decode_side_by_side(self, precision: str) -> float:
        return self.decode(precision, 1, side_by_side=True)

    def decode_draft(self, precision: str, threads: int, draft: int) -> float:
        return self.decode(precision, threads, draft=draft)

    @torch.no_grad()
    def decode_on_demand(self, precision: str) -> float:
        """Seconds per token of the contrast on demand, on 1 thread: a step of the first row
        (READ_TOKENS) every token, the second (UNREAD_TOKENS) caught up on three tokens every third."""
        from .decoding import Rows

        compute = Compute(precision=precision, decode_precision=precision)
        vocab = self.model.get_input_embeddings().weight.shape[0]
        how = {"prefill_context": lambda: compute.context("prefill"),
               "step_context": lambda: compute.context("decode")}
        reading = Rows(self.model, [torch.arange(READ_TOKENS, device=self.device)[None] % vocab], AFTER_STEPS[:1], **how)
        prior = Rows(self.model, [torch.arange(UNREAD_TOKENS, device=self.device)[None] % vocab], AFTER_STEPS[1:], **how)
        token = iter(range(1, 10_000))

        def run():
            for _ in range(3):
                step = next(token) % vocab
                reading.append(step)
                prior.append(step)
                reading.logits()
            prior.logits()

        return self._timed(run) / 3


# -- the cache ---------------------------------------------------------------------------------


def machine_key(model: nn.Module, device: torch.device | str, threads: int) -> dict:
    """What the timings depend on: the processor (the GPU on CUDA), torch, its threads, the device
    and the model's shapes."""
    device = torch.device(device)
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        processor = cpu_name()
    config = getattr(model, "config", None)
    shapes = [getattr(config, name, None) for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                       "num_attention_heads", "num_key_value_heads", "vocab_size")]
    return {"processor": processor, "torch": torch.__version__, "threads": threads, "device": device.type,
            "model": shapes, "probe": VERSION}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Cache:
    """compute.json: a list of {key, timings}, one per machine key seen."""

    def __init__(self, path: Path):
        self.path = path

    def load(self, key: dict) -> dict | None:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("timings"), dict):
                return dict(entry["timings"])
        return None

    def save(self, key: dict, timings: dict) -> None:
        try:
            entries = json.loads(self.path.read_text())
            entries = [e for e in entries if isinstance(e, dict) and e.get("key") != key]
        except (OSError, ValueError):
            entries = []
        entries.append({"key": key, "timings": timings, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(entries, indent=1))
            temporary.replace(self.path)
        except OSError:
            pass  # a read-only data folder: measured again next time


def requested_precision(flag: str | None = None) -> str:
    """The precision asked for: the flag, else $SIFT_CHAT_PRECISION, else auto; ValueError otherwise."""
    value = (flag or os.environ.get(ENV_PRECISION) or "auto").strip().lower()
    if value not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {value!r}")
    return value


def requested_decode_threads() -> int | None:
    value = os.environ.get(ENV_DECODE_THREADS, "").strip().lower()
    if value in ("", "auto"):
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"${ENV_DECODE_THREADS} must be auto or a positive integer, got {value!r}")
    return int(value)


def probe(model: nn.Module, data_dir: Path | str | None, precision: str | None = None,
          measure: Measure | None = None, decode_threads: int | None = None) -> Compute:
    """The compute for `model` on its device: the cached timings for this machine's key, the
    missing ones measured (and cached, in `data_dir`), and `choose`'s choice; a forced
    `precision` (flag or environment) is honoured."""
    precision = requested_precision(precision)
    decode_threads = decode_threads or requested_decode_threads()
    device = next(model.parameters()).device
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    key = machine_key(model, device, threads)
    cache = Cache(Path(data_dir) / CACHE_FILE) if data_dir is not None else None
    cached = cache.load(key) if cache else None
    timings = dict(cached or {})
    measure = measure or ModelTimer(model)
    measured = False

    def need(name: str, run: Callable[[], float]) -> None:
        nonlocal measured
        if name not in timings:
            try:
                timings[name] = run()
            except (RuntimeError, NotImplementedError):  # a precision this build cannot run
                timings[name] = float("inf")
            measured = True

    if precision == "auto":
        need("matmul_fp32", lambda: measure.matmuls("fp32"))
        need("matmul_bf16", lambda: measure.matmuls("bf16"))
    chosen = choose(timings, threads, precision)[0]
    for p in dict.fromkeys(["fp32", chosen]):  # fp32's decoding is the reference for bf16's
        for k in dict.fromkeys([1, threads]):
            need(f"decode_{p}_{k}", lambda p=p, k=k: measure.decode(p, k))
    chosen, decode_precision, chosen_threads = choose(timings, threads, precision, decode_threads)
    if device.type == "cpu" and threads >= 2 and not decode_threads:
        need(f"decode_{decode_precision}_side", lambda: measure.decode_side_by_side(decode_precision))
    beside = side_by_side(timings, decode_precision, threads) and not decode_threads
    need(f"decode_{decode_precision}_demand", lambda: measure.decode_on_demand(decode_precision))
    demand = on_demand(timings, decode_precision, threads) and (decode_threads or 1) == 1  # it runs on 1 thread
    decoding_threads = 1 if beside or demand else chosen_threads
    for k in DRAFT_LENGTHS:  # the draft lengths' timings are kept under this one thread count's name
        need(f"decode_{decode_precision}_draft{k}",
             lambda k=k: measure.decode_draft(decode_precision, decoding_threads, k))
    drafts = draft_length(timings, decode_precision, decoding_threads)
    if measured and cache:
        cache.save(key, timings)
    source = ("forced" if precision != "auto" or decode_threads else
              "measured" if measured else "cached")
    return Compute(chosen, decode_precision, decoding_threads, beside and not demand, demand,
                   drafts, source, timings, threads, str(cache.path) if cache else "")


def main(argv: list[str] | None = None) -> int:
    """`python -m sift_chat.probe`: measure this machine afresh (every timing, both precisions) for
    the default chat model, print the timings and what the probe would choose."""
    import argparse

    from . import config
    from .models import load_chat_model

    parser = argparse.ArgumentParser(prog="python -m sift_chat.probe", description=main.__doc__.splitlines()[0])
    parser.add_argument("--chat-model", help="chat model (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from .adaptation import Adapter

    model, tokenizer = load_chat_model(args.chat_model, args.device, config.data_dir() / "models")
    model = Adapter(model, tokenizer).model  # with the default LoRA layers, as the engine decodes
    timer, threads = ModelTimer(model, args.repeats), torch.get_num_threads() if args.device == "cpu" else 1
    timings = {f"matmul_{p}": timer.matmuls(p) for p in PRECISIONS}
    for p in PRECISIONS:
        for k in dict.fromkeys([1, threads]):
            timings[f"decode_{p}_{k}"] = timer.decode(p, k)
        if threads >= 2 and args.device == "cpu":
            timings[f"decode_{p}_side"] = timer.decode_side_by_side(p)
        timings[f"decode_{p}_demand"] = timer.decode_on_demand(p)
        for k in DRAFT_LENGTHS:
            timings[f"decode_{p}_draft{k}"] = timer.decode_draft(p, 1, k)
    shapes = ", ".join(f"{i}→{o}" for i, o in timer.shapes)
    print(f"{machine_key(model, args.device, threads)}; matmuls: one F.linear per shape ({shapes}) on {ROWS} rows; "
          f"decoding step: two rows; medians of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
    print("| measured | fp32 | bf16 | bf16 / fp32 speed |")
    print("|---|---|---|---|")
    rows = [("matmuls", "matmul_{}")] + [(f"decoding step, {k} thread{'s' * (k > 1)}", f"decode_{{}}_{k}")
                                         for k in dict.fromkeys([1, threads])]
    if "decode_fp32_side" in timings:
        rows.append(("decoding step, each row on its own thread", "decode_{}_side"))
    rows.append(("decoding step, the second row on demand (every third token)", "decode_{}_demand"))
    rows += [(f"decoding step checking a draft of {k}, 1 thread", f"decode_{{}}_draft{k}") for k in DRAFT_LENGTHS]
    for label, name in rows:
        fp32, bf16 = timings[name.format("fp32")], timings[name.format("bf16")]
        print(f"| {label} | {fp32 * 1e3:.1f} ms | {bf16 * 1e3:.1f} ms | {fp32 / bf16:.2f}x |")
    precision, decode_precision, decode_threads = choose(timings, threads)
    beside, demand = side_by_side(timings, decode_precision, threads), on_demand(timings, decode_precision, threads)
    print(Compute(precision, decode_precision, 1 if beside or demand else decode_threads, beside and not demand, demand,
                  draft_length(timings, decode_precision, 1), source="measured", timings=timings,
                  threads=threads).describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
