"""What the command modules (`cli`, `cli_sync`, `cli_eval`) share: the store and the embedder
that the global flags (--data-dir, --embedder, --device) name."""

from __future__ import annotations

from . import config


def open_store(args):
    from .store import Store

    return Store(config.data_dir(args.data_dir) / "store")


def open_embedder(args):
    from .models import load_embedder

    return load_embedder(config.embedder_name(args.embedder), args.device)
