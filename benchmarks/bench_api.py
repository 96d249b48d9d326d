"""What `/v1` costs over calling the application layer directly: one message, the same settings,
run in the same process through `Service.run` and through HTTP (not streamed, and streamed) to
the server that `app.py` starts (FastAPI with the Gradio app mounted on it), with the models'
thread and decoding together as `app.py` runs them.

    .venv/bin/python benchmarks/bench_api.py [--runs 5] [--max-tokens 16] [--data-dir DIR]

Prints the median seconds per message for each path and the difference to the direct call.
The default models; the sample corpus is ingested into the data folder when its store is empty.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from sift_chat import config, torch_thread
from sift_chat.access import LOCAL
from sift_chat.corpus import ingest
from sift_chat.engine import Engine
from sift_chat.events import Token
from sift_chat.panel import parse_settings
from sift_chat.server import create_server
from sift_chat.service import Service

SAMPLE = Path(__file__).resolve().parent.parent / "corpora" / "brindlemoor"
PROMPT = "Who keeps the lighthouse in Brindlemoor?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    home = config.data_dir(args.data_dir)
    torch_thread.enable()  # as app.py runs: the direct calls and the server's threads on one models' thread
    engine = torch_thread.run(Engine.load, home, device="cpu")
    engine.decode_together()
    if engine.store.passage_count() == 0:
        ingest(engine.store, engine.embedder, [SAMPLE], embedder_name=engine.embedder_name, progress=False)
    service = Service(engine, home)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_server(service), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    print("| settings | path | first word (s) | whole answer (s) | vs direct |\n|---|---|---|---|---|")
    for sift in ({"mode": "off"}, {"mode": "fine-tune", "passages": 2}):
        chat, adaptation = parse_settings({**sift, "max_new_tokens": args.max_tokens}, engine.default_adaptation)
        body = {"model": "sift-chat", "max_tokens": args.max_tokens, "sift": sift,
                "messages": [{"role": "user", "content": PROMPT}]}

        def direct():
            started, first = time.perf_counter(), None
            for event in service.run(service.new_turn(), PROMPT, [], chat, adaptation, caller=LOCAL):
                if isinstance(event, Token) and first is None:
                    first = time.perf_counter() - started
            return first, time.perf_counter() - started

        def plain():
            started = time.perf_counter()
            httpx.post(url, json=body, timeout=600).raise_for_status()
            return None, time.perf_counter() - started

        def streamed():
            started, first = time.perf_counter(), None
            with httpx.stream("POST", url, json={**body, "stream": True}, timeout=600) as response:
                for line in response.iter_lines():
                    if first is None and '"content": "' in line and '"content": ""' not in line:
                        first = time.perf_counter() - started
            return first, time.perf_counter() - started

        paths = {"direct (Service.run)": direct, "/v1, not streamed": plain, "/v1, streamed": streamed}
        times = {name: [] for name in paths}
        for run in range(args.runs + 1):  # interleaved, so that a load change hits every path alike
            for name, path in paths.items():
                measured = path()
                if run:  # the first round warms up
                    times[name].append(measured)
        rows = {}
        for name, measured in times.items():
            firsts = [f for f, _ in measured if f is not None]
            rows[name] = (statistics.median(firsts) if firsts else None, statistics.median(t for _, t in measured))
        base = rows["direct (Service.run)"][1]
        for name, (first, whole) in rows.items():
            first_text = f"{first:.3f}" if first is not None else "—"
            print(f"| {sift} | {name} | {first_text} | {whole:.3f} | {whole - base:+.3f} s |")
    server.should_exit = True


if __name__ == "__main__":
    main()
