"""The commands that keep a folder in step: `sync` (one pass now; --status, --stop) and `watch`
(passes until Ctrl-C or SIGTERM). A thin shell over `sync` and `watching`; the folder is synced
into a collection (--collection: the shared library, or a user's own documents)."""

from __future__ import annotations

import sys
from pathlib import Path

from . import config
from .access import LOCAL
from .cli_common import open_embedder, open_store
from .corpus import shown
from .sync import SETTLE_SECONDS
from .watching import RESCAN_SECONDS


def add_parsers(commands) -> None:
    """The sync and watch commands, on the CLI's subparsers."""
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
    return FolderSync(store, open_embedder(args), folder, options)


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
    with open_store(args) as store:
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
    with open_store(args) as store:
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
    with open_store(args) as store:
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


COMMANDS = {"sync": cmd_sync, "watch": cmd_watch}
