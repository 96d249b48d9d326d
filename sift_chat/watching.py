"""When a synced folder's passes (`sync.FolderSync`) run.

    FolderWatcher  a thread running a folder's passes: at start (what changed while nothing
                   watched), after watchdog's events (inotify; its polling observer where that is
                   not available), when a pending file may have settled, and every
                   `rescan_seconds` (what events missed).
    Syncing        the app's watchers, one per synced folder, started and stopped with the server.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from .store import Store
from .sync import FolderSync, SyncOptions, SyncReport, inside

log = logging.getLogger(__name__)

QUIET_SECONDS = 0.2  # events are gathered this long before a pass: one save is several events
RESCAN_SECONDS = 600.0  # a full stat-only rescan this often, for what events missed
POLL_SECONDS = 2.0  # the polling observer's interval, where inotify is not available


class _Changes:
    """watchdog's event handler: any change of a file that is not hidden, nor in an `ignored`
    folder (the store: its own writes would wake the watcher for ever), wakes the watcher."""

    def __init__(self, wake: threading.Event, root: Path, ignored=()):
        self.wake, self.root = wake, str(root)
        self.ignored = [str(Path(folder).resolve()) for folder in ignored]

    def dispatch(self, event) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reading is no change (the pass's own reads come back as these)
        paths = [os.fsdecode(p) for p in (event.src_path, getattr(event, "dest_path", "")) if p]
        if all(self._hidden(path) for path in paths):
            return  # an editor's swap file, a download's partial file
        self.wake.set()

    def _hidden(self, path: str) -> bool:
        if any(path == folder or inside(path, folder) for folder in self.ignored):
            return True
        relative = os.path.relpath(path, self.root)
        return any(part.startswith(".") for part in Path(relative).parts if part != "..")


def start_observer(root: Path, handler, polling: bool = False, poll_seconds: float = POLL_SECONDS):
    """watchdog's native observer on `root` (inotify on Linux), else its polling one: (observer,
    its kind), or (None, why) when neither could start (the watcher's rescans still run)."""
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver

    kinds = [("polling", lambda: PollingObserver(timeout=poll_seconds))]
    if not polling:
        kinds.insert(0, ("events", Observer))
    problem = ""
    for kind, make in kinds:
        observer = make()
        try:
            observer.schedule(handler, str(root), recursive=True)
            observer.start()
            return observer, kind
        except OSError as error:  # inotify's watch limit reached, the folder gone meanwhile
            problem = f"cannot watch {root} ({error.strerror or error}): rescanned every few minutes instead"
            if observer.is_alive():
                observer.stop()
    return None, problem


class FolderWatcher:
    """Runs a `FolderSync`'s passes in a thread: at once, then after watchdog's events (gathered
    for `quiet` s), when a pending file may have settled, every `rescan_seconds` in any case."""

    def __init__(self, sync: FolderSync, *, polling: bool = False, rescan_seconds: float = RESCAN_SECONDS,
                 quiet: float = QUIET_SECONDS, poll_seconds: float = POLL_SECONDS,
                 on_pass: Callable[[SyncReport], None] | None = None):
        self.sync, self.polling = sync, polling
        self.rescan_seconds, self.quiet, self.poll_seconds = rescan_seconds, quiet, poll_seconds
        self.on_pass = on_pass
        self.wake = threading.Event()
        self.last: SyncReport | None = None
        self.passes = 0
        self.watching = ""  # "events", "polling", or why neither
        self._observer = None
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        return self.sync.stop.is_set()

    def start(self) -> "FolderWatcher":
        self._thread = threading.Thread(target=self._loop, name=f"sync {self.sync.root}", daemon=True)
        self._thread.start()
        return self

    def sync_now(self) -> None:
        self.wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop watching: a running pass ends before its next file (what it read is written)."""
        self.sync.stop.set()
        self.wake.set()
        self._unwatch()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _watch(self) -> None:
        if self._observer is not None and self._observer.is_alive():
            return
        if not self.sync.root.is_dir():
            return  # gone: the passes say so, and it is watched again once it is back
        changes = _Changes(self.wake, self.sync.root, [self.sync.store.folder, *self.sync.options.forbidden])
        self._observer, self.watching = start_observer(self.sync.root, changes, self.polling, self.poll_seconds)
        if self._observer is None:
            log.warning(self.watching)

    def _unwatch(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            if observer is not threading.current_thread():
                observer.join(5)

    def _loop(self) -> None:
        due = 0.0  # when the next pass is due without an event (monotonic)
        while not self.stopping:
            self._watch()
            if self.wake.wait(max(due - time.monotonic(), 0)):
                gathered_until = time.monotonic() + 10 * self.quiet
                while self.wake.is_set() and time.monotonic() < gathered_until and not self.stopping:
                    self.wake.clear()  # a burst of events (a save, a copy of many files) makes one pass
                    self.wake.wait(self.quiet)
                self.wake.clear()
            if self.stopping:
                break
            try:
                report = self.sync.run()
            except Exception as error:  # the store refused even the pass's record: try again later
                report = SyncReport(str(self.sync.root), error=" ".join(f"the pass failed: {error}".split()))
            self.last, self.passes = report, self.passes + 1
            if report.missing:
                self._unwatch()  # its watch is on what was unmounted; a new one once it is back
            due = time.monotonic() + (max(report.settles_in, 0.05) if report.pending else self.rescan_seconds)
            if self.on_pass is not None:
                self.on_pass(report)
        self._unwatch()


class Syncing:
    """The app's synced folders: one `FolderWatcher` each, whoever added it (the CLI's too), all
    passing through `lock` (the ingests' line). Started with the server, stopped at shutdown."""

    def __init__(self, store: Store, embedder, options: SyncOptions, lock: threading.Lock | None = None,
                 polling: bool = False, rescan_seconds: float = RESCAN_SECONDS):
        self.store, self.embedder, self.options = store, embedder, options
        self.lock = lock or threading.Lock()
        self.polling, self.rescan_seconds = polling, rescan_seconds
        self.watchers: dict[int, FolderWatcher] = {}
        self._guard = threading.Lock()
        self.closed = False

    def refresh(self) -> None:
        """A watcher for every synced folder (also those added by another process), none for a
        folder no longer synced."""
        with self._guard:
            if self.closed or self.store.read_only:
                return
            folders = {folder["id"]: folder for folder in self.store.synced_folders()}
            for folder_id in [i for i in self.watchers if i not in folders]:
                self.watchers.pop(folder_id).stop()
            for folder_id, folder in folders.items():
                if folder_id not in self.watchers:
                    sync = FolderSync(self.store, self.embedder, folder, self.options, self.lock)
                    self.watchers[folder_id] = FolderWatcher(sync, polling=self.polling,
                                                             rescan_seconds=self.rescan_seconds).start()

    def watcher(self, folder_id: int) -> FolderWatcher | None:
        return self.watchers.get(folder_id)

    def forget(self, folder_id: int) -> None:
        """Stop the folder's watcher (waiting for its pass to end)."""
        with self._guard:
            watcher = self.watchers.pop(folder_id, None)
        if watcher is not None:
            watcher.stop()

    def close(self) -> None:
        with self._guard:
            self.closed = True
            watchers, self.watchers = list(self.watchers.values()), {}
        for watcher in watchers:
            watcher.sync.stop.set()  # every pass stops at its next file, then each is joined
        for watcher in watchers:
            watcher.stop()
