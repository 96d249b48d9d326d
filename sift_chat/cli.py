"""The command line: `python -m sift_chat ingest|sync|watch|rm|stats|search|chat|eval|eval-qa|make-world|users|serve ...`.
A thin shell over the stages and the application layer (`sift_chat.service`). It acts as the local
owner: its documents are the shared library, its chats the local owner's.

This module holds the parser, `main` and the everyday commands (ingest, rm, stats, search, chat,
users); `cli_sync` the folder commands (sync, watch), `cli_eval` the evaluation commands (eval,
eval-qa, make-world); `serve` is `server`'s."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from . import cli_eval, cli_sync, config
from .access import LOCAL, UsersFile
from .adaptation import AdaptationSettings
from .cli_common import add_reading_options, open_embedder, open_store, reading_settings
from .corpus import DEFAULT_OVERLAP_TOKENS, DEFAULT_PASSAGE_TOKENS, shown
from .retrieval import preselect
from .settings import ChatSettings
from .vocabulary import METHODS, MODES, method_label


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sift-chat",
        description="Chat with your documents, learning at test time (SIFT + LoRA).",
    )
    parser.add_argument("--data-dir", help=f"store and model cache (default: ${config.ENV_HOME} "
                        "or ~/.local/share/sift-chat)")
    parser.add_argument("--embedder", help=f"embedding model: package, folder or HF id "
                        f"(default: ${config.ENV_EMBEDDER} or {config.DEFAULT_EMBEDDER})")
    parser.add_argument("--chat-model", help=f"chat model: package, folder, .gguf or HF id "
                        f"(default: ${config.ENV_CHAT_MODEL} or {config.DEFAULT_CHAT_MODEL})")
    parser.add_argument("--device", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                        help="the chat model's compute precision (default: $SIFT_CHAT_PRECISION or auto: "
                             "measured at start-up, cached per machine)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = commands.add_parser("ingest", help="add files and folders to the store")
    ingest.add_argument("paths", nargs="*", metavar="PATH")
    ingest.add_argument("--passage-tokens", type=int, default=DEFAULT_PASSAGE_TOKENS,
                        help="tokens per passage (default: %(default)s)")
    ingest.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP_TOKENS,
                        help="tokens shared by consecutive passages (default: %(default)s)")
    ingest.add_argument("--reembed", action="store_true",
                        help="re-embed every stored passage with this embedder first")
    ingest.add_argument("--parse-seconds", type=float,
                        help=f"skip an HTML or PDF file whose parsing takes longer (default: "
                             f"${config.ENV_PARSE_SECONDS} or 60)")
    ingest.add_argument("--quiet", action="store_true", help="no progress bar")

    cli_sync.add_parsers(commands)

    remove = commands.add_parser("rm", help="remove documents (files or whole folders) from the store")
    remove.add_argument("paths", nargs="+", metavar="PATH")

    commands.add_parser("stats", help="documents, passages, index and models")

    search = commands.add_parser("search", help="the passages a chat message would pre-select (meaning and rare words)",
                                 description="The passages a chat message saying QUERY would pre-select, in the "
                                             "chat's order (vector and word searches fused), each with its cosine "
                                             "similarity to the query: a passage found by a rare word can rank "
                                             "above a more similar one.")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=10, help="how many passages (default: %(default)s)")

    commands.add_parser("serve", help="the app and the OpenAI-compatible API on one port (see serve --help)",
                        add_help=False)

    chat = commands.add_parser("chat", help="ask a question (or, without one, chat interactively)")
    chat.add_argument("prompt", nargs="?", help="the question; omit it for an interactive chat")
    chat.add_argument("--method", default="sift", choices=METHODS, help="selection (default: %(default)s)")
    chat.add_argument("--mode", default=ChatSettings.mode, choices=MODES,
                      help="read the best passages (context), learn from the passages (fine-tune), "
                           "both, or neither (default: %(default)s)")
    chat.add_argument("-n", "--passages", type=int, default=ChatSettings.passages,
                      help="at most this many passages, one LoRA step each (default: %(default)s)")
    add_reading_options(chat, "--read")
    chat.add_argument("--candidates", type=int, default=ChatSettings.candidates,
                      help="K, pre-selected from the index (default: %(default)s)")
    chat.add_argument("--lam", type=float, default=ChatSettings.lam, help="SIFT's λ (default: %(default)s)")
    chat.add_argument("--min-reduction", type=float,
                      help="stop when a pick removes less than this fraction of the prior σ²")
    chat.add_argument("--alpha", type=float, help="stop by activeft's rule: keep pick n while α·n·σ_n ≤ 1")
    chat.add_argument("--lr", type=float, default=AdaptationSettings.learning_rate,
                      help="LoRA learning rate (default: %(default)s)")
    chat.add_argument("--epochs", type=int, default=AdaptationSettings.epochs,
                      help="passes over the selected passages, one step per passage each (default: %(default)s)")
    chat.add_argument("--rank", type=int, default=AdaptationSettings.rank, help="LoRA rank (default: %(default)s)")
    chat.add_argument("--top-layers", type=int, default=AdaptationSettings.top_layers,
                      help="LoRA on the top L layers only (default: %(default)s)")
    chat.add_argument("--targets", default=AdaptationSettings.target_modules,
                      help="LoRA targets: all-linear or attention (default: %(default)s)")
    chat.add_argument("--max-new-tokens", type=int, default=ChatSettings.max_new_tokens)
    chat.add_argument("--temperature", type=float, default=ChatSettings.temperature, help="0: greedy")
    chat.add_argument("--seed", type=int, default=ChatSettings.seed)
    chat.add_argument("--compare", action="store_true", help="NN and SIFT side by side on the same prompt")

    cli_eval.add_eval_parsers(commands)

    users = commands.add_parser("users", help="the users file of `serve --auth FILE`: add, rm, list")
    users.add_argument("action", choices=["add", "rm", "list"])
    users.add_argument("name", nargs="?", help="the user's name (add, rm)")
    users.add_argument("--admin", action="store_true", help="add: the user may change the shared library "
                       "(and, on a server that allows it, ingest its folders)")
    users.add_argument("--file", default=None, help="the users file (default: $SIFT_CHAT_AUTH or "
                       "<data-dir>/users.json)")

    cli_eval.add_world_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecations, not the user's concern
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the app and the API: the flags of app.py
        from .server import main as serve

        return serve(argv[1:], prog="sift-chat serve")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: the store keeps every document that was fully written", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError) as error:  # our errors carry a one-line message
        print(f"error: {error}", file=sys.stderr)
        return 2


def cmd_ingest(args) -> int:
    from .corpus import ingest, reembed

    if not args.paths and not args.reembed:
        print("error: give files or folders to ingest", file=sys.stderr)
        return 2
    name = config.embedder_name(args.embedder)
    parse_seconds = config.parse_seconds(args.parse_seconds)
    with open_store(args) as store:
        embedder = open_embedder(args)
        if args.reembed:
            count = reembed(store, embedder, name, progress=not args.quiet)
            print(f"re-embedded {count} passages with {name}")
        if not args.paths:
            return 0
        report = ingest(store, embedder, args.paths, embedder_name=name,
                        passage_tokens=args.passage_tokens, overlap=args.overlap,
                        progress=not args.quiet, forbidden=[config.data_dir(args.data_dir)],
                        parse_seconds=parse_seconds)
    for path, reason in report.skipped:
        print(f"skipped {shown(path)}: {reason}", file=sys.stderr)
    print(report.summary())
    nothing_done = report.ingested == 0 and not report.unchanged
    return 1 if nothing_done else 0


def cmd_rm(args) -> int:
    with open_store(args) as store:
        targets = []
        for given in args.paths:
            matches = store.documents_under(given)
            if not matches:
                print(f"not in the store: {shown(given)}", file=sys.stderr)
            targets += matches
        removed = store.remove(targets)
    for path in removed:
        print(f"removed {shown(path)}")
    return 0 if removed else 1


def cmd_stats(args) -> int:
    with open_store(args) as store:
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
    with open_store(args) as store:
        if store.passage_count(LOCAL.readable) == 0:
            print("the store is empty: ingest some documents first", file=sys.stderr)
            return 1
        embedder = open_embedder(args)
        store.check_embedder(config.embedder_name(args.embedder), embedder.get_embedding_dimension())
        query = embedder.encode(args.query, normalize_embeddings=True)
        # as a chat message pre-selects: its K candidates, of which the first k
        found = preselect(store, query, args.query, max(args.k, ChatSettings().candidates), LOCAL.readable)
        ids, similarities = found.ids[:args.k], found.similarities[:args.k]
        passages = store.passages(ids)
    for rank, (passage_id, similarity) in enumerate(zip(ids, similarities), 1):
        passage = passages[int(passage_id)]
        print(f"{rank:>3}. {similarity:.3f}  {shown(passage.path)}:{passage.start_char}-{passage.end_char}")
        print(f"      {_one_line(passage.text)}")
    return 0


def cmd_chat(args) -> int:
    from .engine import Engine
    from .service import Service

    settings = ChatSettings(method=args.method, mode=args.mode, passages=args.passages, **reading_settings(args),
                            candidates=args.candidates, lam=args.lam, min_reduction=args.min_reduction,
                            alpha=args.alpha, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, seed=args.seed)
    adaptation = AdaptationSettings(learning_rate=args.lr, rank=args.rank, top_layers=args.top_layers,
                                    target_modules=args.targets, epochs=args.epochs, seed=args.seed)
    engine = Engine.load(args.data_dir, embedder=args.embedder, chat_model=args.chat_model,
                         device=args.device, adaptation=adaptation, precision=args.precision)
    print(engine.compute.describe(), file=sys.stderr)
    service = Service(engine, config.data_dir(args.data_dir))
    if args.compare:
        if not args.prompt:
            print("error: --compare needs a prompt", file=sys.stderr)
            return 2
        return _compare(service, args.prompt, settings, adaptation)
    if args.prompt:
        return _answer(service, args.prompt, None, settings, adaptation)[0]
    print("Chat with your documents. Ctrl-D to leave.")
    chat_id = None  # created with its first answer
    while True:
        try:
            prompt = input("\n> ").strip()
        except EOFError:
            print()
            return 0
        if prompt:
            chat_id = _answer(service, prompt, chat_id, settings, adaptation)[1] or chat_id


def _answer(service, prompt: str, chat_id: int | None, settings: ChatSettings,
            adaptation: AdaptationSettings) -> tuple[int, int | None]:
    """Stream one answer with its selection and steps into the CLI's chat `chat_id` (a new one when
    None): (0 when it was answered and recorded, else 130; the chat's id)."""
    try:
        for event in service.chat_turn(service.new_turn(LOCAL.key), prompt, chat_id, LOCAL, settings,
                                       adaptation):
            if _show(event):
                return 0, event.chat_id
    except KeyboardInterrupt:
        print("\ninterrupted: the model is back at base and nothing was recorded", file=sys.stderr)
        return 130, None
    return 0, None


def _show(event) -> bool:
    """Print one event of a turn; True when it was the last (the exchange was stored)."""
    from .events import Notice, Selected, Stage, Step, Token
    from .service import Answered, Stored

    if isinstance(event, Notice):
        print(f"note: {event.message}", file=sys.stderr)
    elif isinstance(event, Selected):
        print(_selection_table(event))
    elif isinstance(event, Step):
        print(f"  fine-tune {event.words}: loss {event.loss:.3f}", file=sys.stderr)
    elif isinstance(event, Stage) and event.name == "generate" and event.state == "started":
        print()
    elif isinstance(event, Token):
        print(event.text, end="", flush=True)
    elif isinstance(event, Answered):
        if event.record.citations and event.panel is not None:
            print(f"\n\ncited: {event.answer}")
            numbered = event.panel.numbered
            for number in event.record.citations:
                pick = numbered[number - 1]
                print(f"  [{number}] {_one_line(shown(pick['path']), 100)}:{pick['start_char']}-{pick['end_char']}")
        timings = " · ".join(f"{name.replace('_', ' ')} {value:.1f} s" for name, value in event.record.seconds.items())
        print(f"\n[{timings}]")
    return isinstance(event, Stored)


def _selection_table(selected, marked: set[int] | None = None) -> str:
    """The picks with their uncertainty reduction; repeats and (in a comparison) shared picks marked."""
    lines = [f"{method_label(selected.method)}: σ² {selected.prior_variance:.3f} → {selected.final_variance:.3f} "
             f"after {len(selected.picks)} picks (stopped: {selected.stop_reason})"]
    for pick in selected.picks:
        flags = (" (repeat)" if pick.repeat else "") + (" *" if marked and pick.passage.id in marked else "")
        lines.append(f"  {pick.step:>2}. −{pick.uncertainty_reduction:.3f} σ² → {pick.posterior_variance:.3f}  "
                     f"sim {pick.similarity:.2f}  {shown(Path(pick.passage.path).name)}:{pick.passage.start_char}"
                     f"{flags}\n      {_one_line(pick.passage.text, 120)}")
    return "\n".join(lines)


def _compare(service, prompt: str, settings: ChatSettings, adaptation: AdaptationSettings) -> int:
    """Both selections (each made once) with the shared picks marked, then both answers."""
    from .events import Selected
    from .service import Answered

    selections: dict[str, Selected] = {}
    try:
        for method, event in service.compare(service.new_turn(LOCAL.key), prompt, settings, adaptation,
                                             caller=LOCAL):
            if isinstance(event, Selected) and method not in selections:
                selections[method] = event
                if len(selections) == 2:
                    ids = {m: {p.passage.id for p in s.picks} for m, s in selections.items()}
                    for selected in selections.values():
                        print(_selection_table(selected, ids["nn"] & ids["sift"]) + "\n")
                    print("(* picked by both)")
                    print(f"\n=== answer after fine-tuning on the {method_label('nn')} picks ===")
            elif isinstance(event, Selected):
                continue  # the answer's own copy of the selection shown above
            else:
                _show(event)
                if isinstance(event, Answered) and method == "nn":
                    print(f"\n=== answer after fine-tuning on the {method_label('sift')} picks ===")
    except KeyboardInterrupt:
        print("\ninterrupted: the model is back at base", file=sys.stderr)
        return 130
    return 0


def cmd_users(args) -> int:
    import getpass
    import os

    users = UsersFile(args.file or os.environ.get("SIFT_CHAT_AUTH") or config.data_dir(args.data_dir) / "users.json")
    if args.action == "list":
        for name, record in sorted(users.users().items()):
            print(f"{name}{'  (admin)' if isinstance(record, dict) and record.get('admin') is True else ''}")
        return 0
    if not args.name:
        print(f"error: users {args.action} needs a name", file=sys.stderr)
        return 2
    if args.action == "rm":
        if not users.remove(args.name):
            print(f"no user {args.name} in {users.path}", file=sys.stderr)
            return 1
        print(f"removed {args.name} from {users.path} (their chats and documents stay in the store)")
        return 0
    if sys.stdin.isatty():  # never from argv: it would be in the shell's history and the process list
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            print("error: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    new = users.add(args.name, password, admin=args.admin)
    print(f"{'added' if new else 'updated'} {args.name}{' (admin)' if args.admin else ''} in {users.path}")
    return 0


def _one_line(text: str, width: int = 160) -> str:
    from .vocabulary import one_line

    return one_line(text, width)


COMMANDS = {"ingest": cmd_ingest, **cli_sync.COMMANDS, "rm": cmd_rm, "stats": cmd_stats, "search": cmd_search,
            "chat": cmd_chat, **cli_eval.COMMANDS, "users": cmd_users}
