"""The command line: `python -m sift_chat ingest|sync|watch|rm|stats|search|chat|eval|eval-qa|make-world|users|serve ...`.
A thin shell over the stages and the application layer (`sift_chat.service`). It acts as the local
owner: its documents are the shared library, its chats the local owner's."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from . import config
from .access import LOCAL, UsersFile
from .adaptation import TRAINING_FORMATS, AdaptationSettings
from .corpus import DEFAULT_OVERLAP_TOKENS, DEFAULT_PASSAGE_TOKENS, shown
from .engine import ChatSettings
from .evaluation import SETTINGS as EVAL_SETTINGS
from .retrieval import preselect
from .sync import SETTLE_SECONDS
from .watching import RESCAN_SECONDS
from .vocabulary import CONTRAST_TARGETS, EVAL_METHODS, EVAL_MODES, METHODS, MODES, method_label



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

    sync = commands.add_parser("sync", help="sync a folder now (kept in step from then on, also by the app); "
                               "--status: the synced folders")
    sync.add_argument("folder", nargs="?", metavar="DIR")
    sync.add_argument("--status", action="store_true", help="the synced folders, their files' states and errors")
    sync.add_argument("--stop", action="store_true", help="stop syncing DIR (its documents stay, unless --remove)")
    sync.add_argument("--remove", action="store_true", help="with --stop: remove the folder's documents too")
    watch = commands.add_parser("watch", help="sync a folder, then keep it in step until Ctrl-C")
    watch.add_argument("folder", metavar="DIR")
    watch.add_argument("--polling", action="store_true", help="poll the folder instead of inotify's events")
    watch.add_argument("--rescan-seconds", type=float, default=RESCAN_SECONDS,
                       help="a full stat-only rescan this often (default: %(default)s)")
    for command in (sync, watch):
        command.add_argument("--collection", default="shared",
                             help="shared (the local owner's documents: the default) or a user's name (their own)")
        command.add_argument("--settle", type=float, default=SETTLE_SECONDS,
                             help="take a file once unchanged this long, in s (default: %(default)s)")
        command.add_argument("--parse-seconds", type=float, help="as for ingest")
        command.add_argument("--quiet", action="store_true", help="no progress bar")

    remove = commands.add_parser("rm", help="remove documents (files or whole folders) from the store")
    remove.add_argument("paths", nargs="+", metavar="PATH")

    commands.add_parser("stats", help="documents, passages, index and models")

    search = commands.add_parser("search", help="the passages a chat message would pre-select (meaning and rare words)")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=10, help="how many passages (default: %(default)s)")

    commands.add_parser("serve", help="the app and the OpenAI-compatible API on one port (see serve --help)",
                        add_help=False)

    chat = commands.add_parser("chat", help="ask a question (or, without one, chat interactively)")
    chat.add_argument("prompt", nargs="?", help="the question; omit it for an interactive chat")
    chat.add_argument("--method", default="sift", choices=METHODS, help="selection (default: %(default)s)")
    chat.add_argument("--mode", default=ChatSettings.mode, choices=MODES,
                      help="read the first passage in the prompt (context), learn from the passages (fine-tune), "
                           "both (not more accurate on our question sets, 1.4x slower), or neither (default: %(default)s)")
    chat.add_argument("-n", "--passages", type=int, default=ChatSettings.passages,
                      help="at most this many passages, one LoRA step each (default: %(default)s)")
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

    evaluate = commands.add_parser("eval", help="bits per byte of held-out documents after test-time fine-tuning")
    evaluate.add_argument("--corpus", required=True, help="a folder: split by document into pool and tests")
    evaluate.add_argument("--include", action="append", default=[], metavar="GLOB",
                          help="only files matching (e.g. '*.py'); repeatable")
    evaluate.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                          help="leave out files or folders matching (e.g. 'test*'); repeatable")
    evaluate.add_argument("--methods", default=",".join(EVAL_METHODS),
                          help="comma-separated, from %(default)s")
    evaluate.add_argument("--mode", choices=EVAL_MODES, default="fine-tune",
                          help="fine-tune on the picks, put them in context before the prompt, or both "
                               "(default: %(default)s)")
    evaluate.add_argument("--context-passages", type=int, default=4,
                          help="distinct picks put in context in the context modes (default: %(default)s)")
    evaluate.add_argument("--test-docs", type=int, default=20, help="test documents (default: %(default)s)")
    evaluate.add_argument("--setting", choices=EVAL_SETTINGS, default="held-out",
                          help="held-out: no test text in the pool (the paper's setting); personal: the test "
                               "documents stay in the pool, as a user's own documents do (default: %(default)s)")
    evaluate.add_argument("--measure-first", type=int,
                          help="measure only the first M test documents (same split and pool: for sweeps)")
    evaluate.add_argument("--steps", type=int, default=8, help="passages selected, one step each (default: %(default)s)")
    evaluate.add_argument("--prompt-tokens", type=int, default=128)
    evaluate.add_argument("--target-tokens", type=int, default=256)
    evaluate.add_argument("--candidates", type=int, default=200)
    evaluate.add_argument("--lam", type=float, default=0.01)
    evaluate.add_argument("--duplicate", type=int, default=1, help="repeat every pool passage K times")
    evaluate.add_argument("--min-reduction", type=float, help="adaptive stopping, as in chat")
    evaluate.add_argument("--alpha", type=float, help="adaptive stopping by activeft's rule, as in chat")
    evaluate.add_argument("--lr", type=float, default=AdaptationSettings.learning_rate)
    evaluate.add_argument("--rank", type=int, default=AdaptationSettings.rank)
    evaluate.add_argument("--top-layers", type=int, default=AdaptationSettings.top_layers)
    evaluate.add_argument("--targets", default=AdaptationSettings.target_modules,
                          help="LoRA targets: all-linear or attention (default: %(default)s)")
    evaluate.add_argument("--max-passage-tokens", type=int, default=AdaptationSettings.max_passage_tokens)
    evaluate.add_argument("--passage-tokens", type=int, default=DEFAULT_PASSAGE_TOKENS,
                          help="embedder tokens per pool passage")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", default="eval-results", help="folder for results.md/.json and the plot")
    evaluate.add_argument("--quiet", action="store_true")

    qa = commands.add_parser("eval-qa", help="answer accuracy on questions with known answers, per mode and method")
    qa.add_argument("--corpus", required=True, help="the documents the questions are about (a folder)")
    qa.add_argument("--questions", required=True, help="JSONL: question, answers (accepted) or facts (the "
                    "accepted answers of each fact the answer must state), reference")
    qa.add_argument("--modes", default="off,fine-tune,context,both", help="comma-separated (default: %(default)s)")
    qa.add_argument("--methods", default="nn,sift", help="comma-separated (default: %(default)s)")
    qa.add_argument("--limit", type=int, help="only the first N questions (after --sample)")
    qa.add_argument("--sample", type=int, help="a seeded random sample of N questions")
    qa.add_argument("--picks-only", action="store_true",
                    help="no answers: where each question's facts are among each method's picks (fast, "
                         "no chat model); picks.md and picks.json")
    qa.add_argument("--max-minutes", type=float,
                    help="start no question after this long (the first always runs): report those answered by then")
    qa.add_argument("-n", "--passages", type=int, default=ChatSettings.passages)
    qa.add_argument("--context-passages", type=int, default=ChatSettings.context_passages)
    qa.add_argument("--lam", type=float, default=ChatSettings.lam)
    qa.add_argument("--max-new-tokens", type=int, default=ChatSettings.max_new_tokens)
    qa.add_argument("--repetition-penalty", type=float, default=ChatSettings.repetition_penalty)
    qa.add_argument("--no-repeat-ngram", type=int, default=ChatSettings.no_repeat_ngram)
    qa.add_argument("--context-contrast", type=float, default=ChatSettings.context_contrast,
                    help="α of context-aware decoding (0: off; default %(default)s)")
    qa.add_argument("--contrast-against", choices=CONTRAST_TARGETS, default=ChatSettings.contrast_against,
                    help="the conversation without the passages under the adapted or the base model "
                         "(default: %(default)s)")
    qa.add_argument("--lr", type=float, default=AdaptationSettings.learning_rate)
    qa.add_argument("--top-layers", type=int, default=AdaptationSettings.top_layers)
    qa.add_argument("--targets", default=AdaptationSettings.target_modules)
    qa.add_argument("--epochs", type=int, default=AdaptationSettings.epochs,
                    help="passes over the selected passages (default: %(default)s)")
    qa.add_argument("--training", choices=TRAINING_FORMATS, default=AdaptationSettings.training,
                    help="what a step's loss is on (default: %(default)s)")
    qa.add_argument("--seed", type=int, default=0)
    qa.add_argument("--out", default="eval-results/answers", help="folder for answers.md and answers.json")
    qa.add_argument("--quiet", action="store_true")

    users = commands.add_parser("users", help="the users file of `serve --auth FILE`: add, rm, list")
    users.add_argument("action", choices=["add", "rm", "list"])
    users.add_argument("name", nargs="?", help="the user's name (add, rm)")
    users.add_argument("--admin", action="store_true", help="add: the user may change the shared library "
                       "(and, on a server that allows it, ingest its folders)")
    users.add_argument("--file", default=None, help="the users file (default: $SIFT_CHAT_AUTH or "
                       "<data-dir>/users.json)")

    world = commands.add_parser("make-world", help="write the invented world: documents and questions")
    world.add_argument("out", help="folder: documents/, questions.jsonl (one fact each) and "
                       "two-fact-questions.jsonl are written there")
    world.add_argument("--towns", type=int, default=80)
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--document-copies", type=int, default=1,
                       help="write every document this many times, under other names (default: %(default)s)")
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
    parse_seconds = config.parse_seconds(args.parse_seconds)
    with _store(args) as store:
        embedder = _embedder(args)
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


def _collection_owner(name: str) -> str:
    """The owner a --collection names: the shared library, or a user's own documents."""
    from .access import SHARED, USER_NAME

    if name == "shared":
        return SHARED
    if not USER_NAME.fullmatch(name):
        raise ValueError(f"--collection is 'shared' or a user's name, not {name!r}")
    return f"user:{name}"


def _folder_sync(args, store, folder: dict):
    from .sync import FolderSync, SyncOptions

    options = SyncOptions(config.embedder_name(args.embedder), forbidden=(config.data_dir(args.data_dir),),
                          parse_seconds=config.parse_seconds(args.parse_seconds), settle=args.settle,
                          progress=not args.quiet)
    return FolderSync(store, _embedder(args), folder, options)


def _synced(store, args) -> dict:
    """The folder of `args` synced into its collection (added now if it was not)."""
    from .sync import folder_refusal

    owner = _collection_owner(args.collection)
    problem = folder_refusal(args.folder, store, owner, [config.data_dir(args.data_dir)])
    if problem:
        raise ValueError(problem)
    return store.add_synced_folder(str(Path(args.folder).expanduser().resolve()), owner, LOCAL.owner)


def _print_pass(report) -> None:
    for old, new in report.renamed:
        print(f"renamed {shown(old)} -> {shown(new)}")
    for path in report.removed:
        print(f"removed {shown(path)}")
    for path, reason in report.skipped:
        print(f"skipped {shown(path)}: {reason}", file=sys.stderr)
    for path in report.pending:
        print(f"pending {shown(path)}: still changing", file=sys.stderr)
    print(f"{shown(report.folder)}: {report.summary()}")


def cmd_sync(args) -> int:
    import time

    from .sync import stop_syncing

    if args.status:
        return _sync_status(args)
    if not args.folder:
        print("error: give a folder to sync (or --status)", file=sys.stderr)
        return 2
    with _store(args) as store:
        if args.stop:
            path = str(Path(args.folder).expanduser().resolve())
            owner = _collection_owner(args.collection)
            folder = next((f for f in store.synced_folders() if f["path"] == path and f["owner"] == owner), None)
            if folder is None:
                print(f"not synced: {shown(args.folder)}", file=sys.stderr)
                return 1
            removed = stop_syncing(store, folder, args.remove)
            print(f"stopped syncing {shown(path)}; " + (f"{len(removed)} documents removed" if args.remove
                                                        else "its documents stay in the corpus"))
            return 0
        sync = _folder_sync(args, store, _synced(store, args))
        report = sync.run()
        deadline = time.monotonic() + max(30.0, 10 * args.settle)
        while report.pending and not report.error and time.monotonic() < deadline:
            time.sleep(args.settle)  # files still being written: taken once they settle
            report = sync.run()
    _print_pass(report)
    return 1 if report.error else 0


def cmd_watch(args) -> int:
    import signal
    import threading

    from .watching import FolderWatcher

    stop = threading.Event()
    # SIGTERM too (a service manager's stop; and a shell's background job ignores Ctrl-C's SIGINT)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with _store(args) as store:
        watcher = FolderWatcher(_folder_sync(args, store, _synced(store, args)), polling=args.polling,
                                rescan_seconds=args.rescan_seconds, on_pass=_print_pass_if_any)
        watcher.start()
        print(f"watching {shown(watcher.sync.root)} (Ctrl-C or SIGTERM to stop)", file=sys.stderr)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            watcher.stop()
    print("stopped watching: every document written is whole", file=sys.stderr)
    return 0


def _print_pass_if_any(report) -> None:
    if report.added or report.updated or report.renamed or report.removed or report.error or report.skipped \
            or report.pending or report.missing:
        _print_pass(report)
        sys.stdout.flush()


def _sync_status(args) -> int:
    with _store(args) as store:
        folders = store.synced_folders()
        if not folders:
            print("no synced folders: add one with `sync DIR`")
            return 0
        for folder in folders:
            collection = "shared library" if folder["owner"] == "" else folder["owner"]
            print(f"{shown(folder['path'])}  ({collection}; last sync {folder['synced_at'] or 'never'})")
            print(f"  {folder['in_step']} in step, {folder['pending']} pending, {folder['skipped']} skipped"
                  + (f"; missing since {folder['missing_since']}" if folder["missing_since"] else ""))
            if folder["error"]:
                print(f"  error: {folder['error']}")
            for row in store.synced_files(folder["id"], "skipped"):
                print(f"  skipped {shown(row['path'])}: {row['reason']}")
    return 0


def cmd_rm(args) -> int:
    with _store(args) as store:
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
        if store.passage_count(LOCAL.readable) == 0:
            print("the store is empty: ingest some documents first", file=sys.stderr)
            return 1
        embedder = _embedder(args)
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

    settings = ChatSettings(method=args.method, mode=args.mode, passages=args.passages,
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
    from .engine import Notice, Selected, Stage, Step, Token
    from .service import Answered, Stored

    if isinstance(event, Notice):
        print(f"note: {event.message}", file=sys.stderr)
    elif isinstance(event, Selected):
        print(_selection_table(event))
    elif isinstance(event, Step):
        print(f"  fine-tune step {event.index}/{event.total}: loss {event.loss:.3f}", file=sys.stderr)
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
    from .engine import Selected
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


def cmd_eval(args) -> int:
    from .evaluation import EvalSettings, markdown, run_evaluation, write_report
    from .models import load_chat_model

    settings = EvalSettings(methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), setting=args.setting,
                            mode=args.mode, context_passages=args.context_passages,
                            test_documents=args.test_docs, steps=args.steps, prompt_tokens=args.prompt_tokens,
                            target_tokens=args.target_tokens, candidates=args.candidates, lam=args.lam,
                            duplicate=args.duplicate, min_reduction=args.min_reduction, alpha=args.alpha,
                            seed=args.seed, measure_first=args.measure_first)
    adaptation = AdaptationSettings(learning_rate=args.lr, rank=args.rank, top_layers=args.top_layers,
                                    target_modules=args.targets, max_passage_tokens=args.max_passage_tokens,
                                    seed=args.seed)
    home = config.data_dir(args.data_dir)
    name = config.embedder_name(args.embedder)
    model, tokenizer = load_chat_model(args.chat_model, args.device, home / "models")
    rows, split = run_evaluation(Path(args.corpus), settings, adaptation, embedder=_embedder(args),
                                 embedder_name=name, model=model, tokenizer=tokenizer,
                                 work_dir=home / "eval", include=args.include, exclude=args.exclude,
                                 passage_tokens=args.passage_tokens, progress=not args.quiet)
    measured = len({row.path for row in rows})
    title = (f"{Path(args.corpus).name}: {measured} test documents, pool of {len(split.pool)}, "
             f"{settings.steps} {'picks' if settings.mode == 'context' else 'steps'}, lr {adaptation.learning_rate}, "
             f"λ {settings.lam}"
             + (f", every passage ×{settings.duplicate}" if settings.duplicate > 1 else "")
             + (", personal documents (test documents in the pool)" if settings.setting == "personal" else "")
             + (f", mode {settings.mode} ({settings.context_passages} passages in context)"
                if settings.mode != "fine-tune" else ""))
    summary = write_report(rows, settings, adaptation, Path(args.out), title)
    print(markdown(summary, title))
    plotted = " and bpb-by-steps.png" if settings.mode != "context" else ""
    print(f"\nwritten to {args.out}/results.md, results.json{plotted}")
    return 0


def cmd_eval_qa(args) -> int:
    import hashlib
    import random

    from . import answers as qa
    from .corpus import ingest
    from .engine import Engine
    from .models import load_chat_model
    from .store import Store

    questions = qa.load_questions(args.questions)
    if args.sample:
        questions = random.Random(args.seed).sample(questions, min(args.sample, len(questions)))
    questions = questions[: args.limit] if args.limit else questions
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes:g}")
    configs = qa.configurations(_names(args.modes), _names(args.methods))
    settings = ChatSettings(passages=args.passages, context_passages=args.context_passages, lam=args.lam,
                            max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                            no_repeat_ngram=args.no_repeat_ngram, context_contrast=args.context_contrast,
                            contrast_against=args.contrast_against, seed=args.seed)
    for configuration in configs:  # every mode and method checked before anything loads
        ChatSettings(mode=configuration.mode,
                     method=settings.method if configuration.method == qa.NO_METHOD else configuration.method)
    adaptation = AdaptationSettings(learning_rate=args.lr, top_layers=args.top_layers, target_modules=args.targets,
                                    training=args.training, epochs=args.epochs, seed=args.seed)
    home = config.data_dir(args.data_dir)
    corpus = Path(args.corpus).expanduser().resolve()
    if not corpus.is_dir():
        raise ValueError(f"--corpus must be a folder, got {args.corpus}")
    name = config.embedder_name(args.embedder)
    embedder = _embedder(args)
    store = Store(home / "eval-qa" / f"{corpus.name}-{hashlib.sha1(str(corpus).encode()).hexdigest()[:8]}")
    ingest(store, embedder, [corpus], embedder_name=name, progress=not args.quiet)
    if args.picks_only:
        return _pick_locations(args, store, embedder, questions, settings, corpus)
    model, tokenizer = load_chat_model(args.chat_model, args.device, home / "models")
    engine = Engine(store, embedder, model, tokenizer, embedder_name=name, adaptation=adaptation)
    answers = qa.run(engine, questions, configs, settings, progress=not args.quiet,
                     max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    answered = len({a.question for a in answers})
    if answered < len(questions):
        print(f"stopped after {args.max_minutes:g} minutes: {answered} of {len(questions)} questions answered",
              file=sys.stderr)
    title = (f"{corpus.name}: {answered} questions, {settings.passages} passages "
             f"({settings.context_passages} in context), lr {adaptation.learning_rate}, "
             f"{adaptation.epochs} pass{'es' * (adaptation.epochs > 1)} over them, "
             f"training on {adaptation.training}; context-aware decoding α = {settings.context_contrast:g} "
             f"against the {settings.contrast_against} model")
    meta = {"settings": asdict(settings), "adaptation": asdict(adaptation), "corpus": str(corpus),
            "questions_file": str(args.questions), "sample": args.sample, "limit": args.limit,
            "max_minutes": args.max_minutes}
    summary = qa.write_report(answers, questions, configs, meta, Path(args.out), title)
    print(qa.markdown(summary, title))
    print(f"written to {args.out}/answers.md and answers.json")
    return 0


def _pick_locations(args, store, embedder, questions, settings, corpus: Path) -> int:
    """eval-qa --picks-only: each method's selection for every question, as chat selects, without
    the chat model."""
    import json

    import torch

    from . import answers as qa
    from .retrieval import preselect
    from .selection import select

    def picks(text: str, method: str):
        """(the lead, the picks): what chat reads first and what it selects, as `Engine.select` does."""
        query = embedder.encode(text, normalize_embeddings=True, convert_to_tensor=True).float().cpu()
        found = preselect(store, query.numpy(), text, settings.candidates)
        chosen = select(query, torch.from_numpy(found.vectors), method, settings.passages, settings.lam).indices.tolist()
        ids = [int(found.ids[i]) for i in chosen]
        passages = store.passages([*ids, int(found.ids[0])])
        return passages[int(found.ids[0])], [passages[i] for i in ids]

    located = qa.pick_locations(picks, questions, _names(args.methods))
    title = f"{corpus.name}: {len(questions)} questions, {settings.passages} picks, λ {settings.lam}"
    table = f"# {title}\n\n" + qa.pick_table(located)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "picks.md").write_text(table)
    (out / "picks.json").write_text(json.dumps({"title": title, "questions_file": str(args.questions),
                                                "located": located}, indent=1))
    print(table)
    print(f"written to {args.out}/picks.md and picks.json")
    return 0


def cmd_make_world(args) -> int:
    from .world import write_world

    path = write_world(args.out, towns=args.towns, seed=args.seed, document_copies=args.document_copies)
    two_fact = path.with_name("two-fact-questions.jsonl")
    print(f"wrote {sum(1 for _ in (Path(args.out) / 'documents').iterdir())} documents, "
          f"{sum(1 for _ in path.open())} questions and {sum(1 for _ in two_fact.open())} two-fact questions "
          f"to {args.out}")
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


def _names(text: str) -> list[str]:
    """A comma-separated list of names, blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _one_line(text: str, width: int = 160) -> str:
    from .service import one_line

    return one_line(text, width)


COMMANDS = {"ingest": cmd_ingest, "sync": cmd_sync, "watch": cmd_watch, "rm": cmd_rm, "stats": cmd_stats, "search": cmd_search, "chat": cmd_chat,
            "eval": cmd_eval, "eval-qa": cmd_eval_qa, "make-world": cmd_make_world,
            "users": cmd_users}
