"""The app exactly as `python app.py` serves it, in a subprocess: for the tests of guarantees that
depend on how the app is started (a library's check may run only under `launch()`)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT/
    log: Path  # what the server printed (stdout and stderr)

    def printed(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def served_app(data_dir: Path, *options: str, ready_headers: dict | None = None,
               env: dict | None = None, wait: bool = True) -> Iterator[Served]:
    """`python app.py --port P --data-dir DATA_DIR OPTIONS…` until the block ends; ready when it
    answers anything but the loading page's 503 (sending `ready_headers`); `wait=False`: as
    soon as it started (the port may not be open yet)."""
    port = free_port()
    log = data_dir.parent / f"app-{port}.log"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    environment.pop("SPACE_ID", None)
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--data-dir",
                                    str(data_dir), "--device", "cpu", *options],
                                   cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT)
    served = Served(f"http://127.0.0.1:{port}/", log)
    try:
        deadline = time.monotonic() + 240
        while wait:
            assert process.poll() is None, served.printed()[-3000:]
            assert time.monotonic() < deadline, served.printed()[-3000:]
            try:
                if httpx.get(served.url + "config", headers=ready_headers or {}, timeout=5).status_code != 503:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def call(client: httpx.Client, url: str, name: str, data: list) -> tuple[int, str | None, list | None]:
    """A raw call of a Gradio event handler, as any HTTP client can make it: (status of the call,
    the one-line error it ended with or None, the output data when it completed)."""
    response = client.post(f"{url}gradio_api/call/{name}", json={"data": data}, timeout=60)
    if response.status_code != 200:
        return response.status_code, response.text, None
    events = client.get(f"{url}gradio_api/call/{name}/{response.json()['event_id']}", timeout=300).text
    kinds = [line[len("event: "):] for line in events.splitlines() if line.startswith("event: ")]
    payloads = [line[len("data: "):] for line in events.splitlines() if line.startswith("data: ")]
    last = json.loads(payloads[-1]) if payloads else None
    if kinds and kinds[-1] == "error":
        return 200, (last or {}).get("error") if isinstance(last, dict) else str(last), None
    return 200, None, last


def trigger(client: httpx.Client, url: str, name: str, event_data, data: list | None = None,
            ) -> tuple[int, str | None, list | None]:
    """A call of the event handler `name` as the page makes it when a component's event fires, with
    that event's data (a gr.HTML's custom event carries its data there): through the queue
    (`/gradio_api/queue/join`, then its event stream), the one route that takes `event_data`, and so
    the one a hostile client would use. (status of the join, the one-line error or None, the output
    data when it completed)."""
    [dependency] = [d for d in client.get(url + "config").json()["dependencies"] if d.get("api_name") == name]
    session = secrets.token_hex(8)
    response = client.post(f"{url}gradio_api/queue/join", json={
        "data": data or [], "event_data": event_data, "fn_index": dependency["id"],
        "trigger_id": dependency["targets"][0][0], "session_hash": session}, timeout=60)
    if response.status_code != 200:
        return response.status_code, response.text, None
    with client.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}, timeout=300) as events:
        for line in events.iter_lines():
            message = json.loads(line[len("data: "):]) if line.startswith("data: ") else {}
            if message.get("msg") == "process_completed":
                output = message.get("output") or {}
                return (200, None, output.get("data")) if message.get("success") else (200, output.get("error"), None)
    return 200, "the event stream ended without an answer", None


def file_data(path: str) -> dict:
    """A Gradio FileData naming `path`, as the browser sends an uploaded file (and a hostile
    client any path at all)."""
    return {"path": path, "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}
