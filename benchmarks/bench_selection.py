"""Benchmark sift_chat.selection.select("sift") against activeft's VTL and LazyVTL.

Same random unit vectors (fixed seed) and λ for all three; prints a Markdown table.

    .venv/bin/python benchmarks/bench_selection.py
    .venv/bin/python benchmarks/bench_selection.py --ks 200,1000 --n 50 --repeats 5 --json out.json

Times are medians over --repeats runs after one warm-up run (ours), and over up to
--repeats runs for activeft (one run when a single one takes over 2 s). activeft is
skipped at a K where the time extrapolated from the previous K (VTL ~ K², LazyVTL ~ K)
exceeds --activeft-budget seconds. "same picks" compares the index sequences.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from sift_chat.selection import select  # noqa: E402


def unit_vectors(K: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    query = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    candidates = torch.nn.functional.normalize(torch.randn(K, d, generator=g), dim=1)
    return query, candidates


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(query, candidates, n, lam, repeats) -> tuple[float, list[int]]:
    device = candidates.device
    select(query, candidates, "sift", n=n, lam=lam)  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        sel = select(query, candidates, "sift", n=n, lam=lam)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), sel.indices.tolist()


def run_activeft(query, candidates, n, lam, lazy: bool) -> list[int]:
    """One exact VTL/LazyVTL selection with activeft 0.1.1, all K candidates in one mini-batch.

    (activeft's Retriever keeps the default mini_batch_size = 1000; for K > 1000 that selects
    hierarchically from mini-batches, a different and approximate result.)
    """
    from activeft import ActiveDataLoader
    from activeft.acquisition_functions.lazy_vtl import LazyVTL
    from activeft.acquisition_functions.vtl import VTL
    from activeft.sift import Dataset

    K = candidates.shape[0]
    kwargs = dict(target=query[None], noise_std=math.sqrt(lam), mini_batch_size=max(K, n) + 1,
                  num_workers=0, subsample=False)
    acquisition = LazyVTL(**kwargs) if lazy else VTL(**kwargs)  # fresh: LazyVTL keeps its queue
    torch.manual_seed(0)  # its DataLoader shuffles (only matters for ties)
    indices, _ = ActiveDataLoader(Dataset(candidates), batch_size=n, acquisition_function=acquisition,
                                  device=candidates.device).next()
    return indices.tolist()


def time_activeft(query, candidates, n, lam, lazy, repeats) -> tuple[float, list[int]]:
    device = candidates.device
    times, picks = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        picks = run_activeft(query, candidates, n, lam, lazy)
        sync(device)
        times.append(time.perf_counter() - start)
        if times[0] > 2.0:
            break
    return statistics.median(times), picks


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="200,1000,10000,100000", help="comma-separated candidate counts")
    parser.add_argument("--n", type=int, default=50, help="picks per selection")
    parser.add_argument("--d", type=int, default=384, help="embedding dimension")
    parser.add_argument("--lam", type=float, default=0.01, help="SIFT's λ")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--activeft-budget", type=float, default=60.0,
                        help="skip activeft where its extrapolated time exceeds this many seconds")
    parser.add_argument("--no-activeft", action="store_true", help="time ours only")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k.replace("_", "")) for k in args.ks.split(",") if k.strip()]
    try:
        import activeft  # noqa: F401
        from importlib.metadata import version

        activeft_version = version("activeft")
    except ImportError:
        activeft_version = None
    use_activeft = activeft_version is not None and not args.no_activeft

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        last = {}  # method -> (K, seconds) of the last measured run, for extrapolation
        for K in ks:
            query, candidates = unit_vectors(K, args.d, seed=K)
            query, candidates = query.to(device), candidates.to(device)
            ours_s, ours_picks = time_ours(query, candidates, args.n, args.lam, args.repeats)
            row = {"device": str(device), "K": K, "n": args.n, "d": args.d, "lam": args.lam, "ours_s": ours_s}
            for name, lazy, power in (("vtl", False, 2), ("lazy_vtl", True, 1)):
                if not use_activeft:
                    row[name] = "not installed" if activeft_version is None else "not run"
                    continue
                if name in last:
                    k0, t0 = last[name]
                    estimate = t0 * (K / k0) ** power
                    if estimate > args.activeft_budget:
                        row[name] = f"skipped (est. {estimate:.0f} s)"
                        row[f"{name}_est_s"] = estimate
                        continue
                try:
                    seconds, picks = time_activeft(query, candidates, args.n, args.lam, lazy, args.repeats)
                except Exception as e:  # report, don't crash the whole table
                    row[name] = f"error: {type(e).__name__}"
                    continue
                last[name] = (K, seconds)
                row[f"{name}_s"] = seconds
                row[f"{name}_speedup"] = seconds / ours_s
                row[f"{name}_same_picks"] = picks == ours_picks
                row[f"{name}_first_diff"] = next((i for i, (a, b) in enumerate(zip(picks, ours_picks)) if a != b), None)
            rows.append(row)
            print(f"# done {device} K={K}", file=sys.stderr, flush=True)

    print(f"SIFT selection, n = {args.n}, d = {args.d}, λ = {args.lam}, random unit vectors; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), activeft {activeft_version}; "
          f"median of {args.repeats}\n")
    print("| device | K | ours (SIFT) | activeft VTL | speed-up | same picks | activeft LazyVTL | speed-up | same picks |")
    print("|---|---:|---:|---:|---:|:---:|---:|---:|:---:|")
    for row in rows:
        cells = [row["device"], f"{row['K']:,}", fmt_time(row["ours_s"])]
        for name in ("vtl", "lazy_vtl"):
            if f"{name}_s" in row:
                first_diff = row[f"{name}_first_diff"]
                same = "yes" if row[f"{name}_same_picks"] else f"no (from pick {(first_diff or 0) + 1})"
                cells += [fmt_time(row[f"{name}_s"]), f"{row[f'{name}_speedup']:.0f}×", same]
            else:
                cells += [row[name], "", ""]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "activeft": activeft_version,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
