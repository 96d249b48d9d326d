"""The command line: `python -m sift_chat ingest|rm|stats|search ...`. A thin shell over the stages."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import config
from .corpus import DEFAULT_OVERLAP_TOKENS, DEFAULT_PASSAGE_TOKENS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sift_chat",
        description="Chat with your documents, learning at test time (SIFT + LoRA).",
    )
    parser.add_argument("--data-dir", help=f"store and model cache (default: ${config.ENV_HOME} "
                        "or ~/.local/share/sift-chat)")
    parser.add_argument("--embedder", help=f"embedding model: package, folder or HF id "
                        f"(default: ${config.ENV_EMBEDDER} or {config.DEFAULT_EMBEDDER})")
    parser.add_argument("--chat-model", help=f"chat model: package, folder, .gguf or HF id "
                        f"(default: ${config.ENV_CHAT_MODEL} or {config.DEFAULT_CHAT_MODEL})")
    parser.add_argument("--device", help="cpu, cuda or auto (default: auto)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = commands.add_parser("ingest", help="add files and folders to the store")
    ingest.add_argument("paths", nargs="*", metavar="PATH")
    ingest.add_argument("--passage-tokens", type=int, default=DEFAULT_PASSAGE_TOKENS,
                        help="tokens per passage (default: %(default)s)")
    ingest.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP_TOKENS,
                        help="tokens shared by consecutive passages (default: %(default)s)")
    ingest.add_argument("--reembed", action="store_true",
                        help="re-embed every stored passage with this embedder first")
    ingest.add_argument("--quiet", action="store_true", help="no progress bar")

    remove = commands.add_parser("rm", help="remove documents (files or whole folders) from the store")
    remove.add_argument("paths", nargs="+", metavar="PATH")

    commands.add_parser("stats", help="documents, passages, index and models")

    search = commands.add_parser("search", help="the passages nearest to a query")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=10, help="how many passages (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: the store keeps every document that was fully written", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError) as error:  # our errors carry a one-line message
        print(f"error: {error}", file=sys.stderr)
        return 2


def _store(args):
    from .store import Store

    return Store(config.data_dir(args.data_dir) / "store")


def _embedder(args):
    from .models import load_embedder

    return load_embedder(config.embedder_name(args.embedder), args.device)


def cmd_ingest(args) -> int:
    from .corpus import ingest, reembed

    if not args.paths and not args.reembed:
        print("error: give files or folders to ingest", file=sys.stderr)
        return 2
    name = config.embedder_name(args.embedder)
    with _store(args) as store:
        embedder = _embedder(args)
        if args.reembed:
            count = reembed(store, embedder, name, progress=not args.quiet)
            print(f"re-embedded {count} passages with {name}")
        if not args.paths:
            return 0
        report = ingest(store, embedder, args.paths, embedder_name=name,
                        passage_tokens=args.passage_tokens, overlap=args.overlap,
                        progress=not args.quiet)
    for path, reason in report.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(report.summary())
    nothing_done = report.ingested == 0 and not report.unchanged
    return 1 if nothing_done else 0


def cmd_rm(args) -> int:
    with _store(args) as store:
        known = [d["path"] for d in store.documents()]
        targets = []
        for given in args.paths:
            path = Path(given).expanduser().resolve()
            matches = [p for p in known if p == str(path) or p.startswith(str(path) + os.sep)]
            if not matches:
                print(f"not in the store: {given}", file=sys.stderr)
            targets += matches
        removed = store.remove(targets)
    for path in removed:
        print(f"removed {path}")
    return 0 if removed else 1


def cmd_stats(args) -> int:
    with _store(args) as store:
        index_file = next(store.folder.glob("index-*.hnsw"), None)
        rows = [
            ("store", str(store.folder)),
            ("documents", store.document_count()),
            ("passages", store.passage_count()),
            ("index", f"{store.index.element_count if store.index else 0} vectors, "
                      f"{index_file.stat().st_size / 2**20:.1f} MiB" if index_file else "empty"),
            ("embedder", f"{store.embedder} (dimension {store.dimension})" if store.embedder
                         else config.embedder_name(args.embedder)),
            ("chat model", config.chat_model_name(args.chat_model)),
        ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def cmd_search(args) -> int:
    with _store(args) as store:
        if store.passage_count() == 0:
            print("the store is empty: ingest some documents first", file=sys.stderr)
            return 1
        embedder = _embedder(args)
        store.check_embedder(config.embedder_name(args.embedder), embedder.get_embedding_dimension())
        query = embedder.encode(args.query, normalize_embeddings=True)
        ids, similarities, _ = store.nearest(query, args.k)
        passages = store.passages(ids)
    for rank, (passage_id, similarity) in enumerate(zip(ids, similarities), 1):
        passage = passages[int(passage_id)]
        print(f"{rank:>3}. {similarity:.3f}  {passage.path}:{passage.start_char}-{passage.end_char}")
        print(f"      {_one_line(passage.text)}")
    return 0


def _one_line(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


COMMANDS = {"ingest": cmd_ingest, "rm": cmd_rm, "stats": cmd_stats, "search": cmd_search}
