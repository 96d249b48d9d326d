"""What the command modules (`cli`, `cli_sync`, `cli_eval`) share: the store and the embedder
that the global flags (--data-dir, --embedder, --device) name, and the options of what is read."""

from __future__ import annotations

from . import config


def open_store(args):
    from .store import Store

    return Store(config.data_dir(args.data_dir) / "store")


def open_embedder(args):
    from .models import load_embedder

    return load_embedder(config.embedder_name(args.embedder), args.device)


def add_reading_options(parser, *read_flags: str) -> None:
    """How many passages an answer reads (`read_flags`, e.g. "--read"), which of them, and how
    much the best weighs: `ChatSettings.read_passages`, `read_min_match`, `lead_weight`."""
    from .settings import ChatSettings

    parser.add_argument(*read_flags, dest="read_passages", type=int, default=ChatSettings.read_passages,
                        help="at most this many of the best matches read, each in its own row of the decoding: "
                             "more than one answers questions about several facts (default: %(default)s)")
    parser.add_argument("--read-min-match", type=float, default=ChatSettings.read_min_match,
                        help="a passage after the first is read when it matches at least this share of the "
                             "first's score (default: %(default)s)")
    parser.add_argument("--lead-weight", type=float, default=ChatSettings.lead_weight,
                        help="how much the best match weighs in the answer among those read (default: all alike)")


def reading_settings(args) -> dict:
    """The `ChatSettings` fields that `add_reading_options` set."""
    return {"read_passages": args.read_passages, "read_min_match": args.read_min_match,
            "lead_weight": args.lead_weight}
