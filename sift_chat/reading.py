"""Finding and reading a user's files: only regular files are opened, hostile ones are refused
with a one-line reason.

Plain text, Markdown, source code (anything that decodes as UTF-8, or UTF-16/32 with a byte-order
mark), HTML (its visible text) and PDF (its text layer, through pypdf) are read. FIFOs, devices and
sockets are skipped before any `open()`, so none can block or stream forever; the size cap holds on
the bytes read.
"""

from __future__ import annotations

import codecs
import errno
import io
import os
import stat as stat_module
import unicodedata
from pathlib import Path
from typing import Callable, Iterable, Iterator

DEFAULT_MAX_FILE_BYTES = 32 * 1024 * 1024
SKIPPED_FOLDERS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", ".tox"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
# Longest byte-order marks first: UTF-32-LE's starts with UTF-16-LE's.
BYTE_ORDER_MARKS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                    (codecs.BOM_UTF16_BE, "utf-16")]


class UnreadableFile(Exception):
    """A file that is skipped; str(error) is the one-line reason."""


def shown(path: str | os.PathLike) -> str:
    """A path as one printable line: undecodable bytes and control characters (a newline in a
    name) escaped, so a report line names exactly one file."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


# -- finding files ------------------------------------------------------------------------


def iter_files(paths: Iterable[str | os.PathLike],
               skipped: list[tuple[str, str]] | None = None, *, forbidden: Iterable[str | os.PathLike] = (),
               trusted: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Every file under `paths` (files as given, folders recursively, hidden and tool folders
    skipped), each once, in sorted order. Inside a folder, links are followed only to files in
    that folder. What is passed over for a reason a user should hear (a name that is not UTF-8, a
    folder that cannot be listed, a link leading out or nowhere) is appended to `skipped`.

    Hidden files and folders (a name starting with ".") and everything in a `forbidden` folder
    (sift-chat's own data) are never read, also when named directly; a path in a `trusted` folder
    (the app's own copies of uploads) is read as given."""
    seen: set[Path] = set()
    forbidden = [Path(folder).expanduser().resolve() for folder in forbidden]
    trusted = [Path(folder).expanduser().resolve() for folder in trusted]

    def skip(path, reason: str) -> None:
        if skipped is not None:
            skipped.append((str(path), reason))

    def within(path: Path, folders: list[Path]) -> bool:
        return any(path == folder or folder in path.parents for folder in folders)

    for given in paths:
        root = Path(given).expanduser().resolve()
        if not within(root, trusted):
            as_given = Path(os.path.abspath(Path(given).expanduser()))  # a link's own name counts too
            if any(part.startswith(".") for part in (*as_given.parts, *root.parts)):
                skip(root, "a hidden file or folder (its name, or a folder's above it, starts with '.'): not read")
                continue
            if within(root, forbidden):
                skip(root, "sift-chat's own data folder: not read")
                continue
        if not root.is_dir():
            reason = _unfit_name(root)
            if reason:
                skip(root, reason)
            candidates = [] if reason else [root]  # a missing or special file is reported when read
        else:
            candidates = []
            for folder, folders, names in os.walk(root, onerror=lambda error: skip(
                    error.filename, f"cannot open the folder: {error.strerror or error}")):
                for name in [f for f in folders if os.path.islink(os.path.join(folder, f))]:
                    skip(os.path.join(folder, name), "a link to a folder (not followed)")
                folders[:] = sorted(f for f in folders if f not in SKIPPED_FOLDERS and not f.startswith(".")
                                    and not os.path.islink(os.path.join(folder, f))
                                    and Path(folder, f).resolve() not in forbidden)
                for name in names:
                    if name.startswith("."):
                        continue
                    path = Path(folder) / name
                    reason = _unfit_name(path) or _unfit_link(path, root)
                    if reason:
                        skip(path, reason)
                    else:
                        candidates.append(path)
            candidates.sort()
        for path in candidates:
            if path not in seen:
                seen.add(path)
                yield path


def _unfit_name(path: Path) -> str | None:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # os.walk keeps undecodable bytes as surrogates
        return "the file name is not valid UTF-8 (rename the file)"
    return None


def _unfit_link(path: Path, root: Path) -> str | None:
    if not path.is_symlink():
        return None
    try:
        target = path.resolve(strict=True)
        mode = target.stat().st_mode
    except FileNotFoundError:
        return "a link to nothing"
    except (OSError, RuntimeError) as error:  # RuntimeError: a loop, on Python 3.11
        looped = isinstance(error, RuntimeError) or getattr(error, "errno", None) == errno.ELOOP
        return "a link loop" if looped else f"cannot follow the link: {error.strerror or error}"
    if not stat_module.S_ISREG(mode):
        return f"not a regular file ({_file_kind(mode)})"
    if root not in target.parents:
        return "a link to outside the folder (ingest its target itself)"
    return None


# -- reading ------------------------------------------------------------------------------


def regular_file_stat(path: Path) -> os.stat_result:
    """The status of a regular file (links followed), or UnreadableFile: nothing else is opened."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise UnreadableFile("no such file") from None
    except OSError as error:
        raise UnreadableFile(f"cannot read: {error.strerror or error}") from None
    if not stat_module.S_ISREG(info.st_mode):
        raise UnreadableFile(f"not a regular file ({_file_kind(info.st_mode)})")
    return info


def _file_kind(mode: int) -> str:
    kinds = [(stat_module.S_ISFIFO, "a FIFO"), (stat_module.S_ISCHR, "a character device"),
             (stat_module.S_ISBLK, "a block device"), (stat_module.S_ISSOCK, "a socket"),
             (stat_module.S_ISDIR, "a folder")]
    return next((name for test, name in kinds if test(mode)), "a special file")


def read_bytes(path: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """At most `max_bytes` of a regular file, or UnreadableFile with the reason.

    The cap holds on the bytes read, not on the reported size (a /proc file says 0), and the
    file is opened without blocking and checked again once open (it may have been swapped for a
    FIFO after the first look)."""
    size = regular_file_stat(path).st_size
    if size > max_bytes:
        raise UnreadableFile(_too_large(size, max_bytes))
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise UnreadableFile(f"cannot read: {error.strerror or error}") from None
    with open(descriptor, "rb", buffering=0) as file:
        mode = os.fstat(descriptor).st_mode
        if not stat_module.S_ISREG(mode):
            raise UnreadableFile(f"not a regular file ({_file_kind(mode)})")
        try:
            data = file.read(max_bytes + 1)
        except OSError as error:
            raise UnreadableFile(f"cannot read: {error.strerror or error}") from None
    if len(data) > max_bytes:
        raise UnreadableFile(_too_large(len(data), max_bytes, at_least=True))
    return data


def _too_large(size: int, max_bytes: int, at_least: bool = False) -> str:
    return (f"too large ({'over ' if at_least else ''}{size / 2**20:.1f} MiB > "
            f"{max_bytes / 2**20:.0f} MiB)")


def read_text(path: Path, data: bytes | None = None, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
              parse: Callable[[str, str | bytes], str] | None = None) -> str:
    """The text of a file, or UnreadableFile with the reason.

    A file is read as PDF when it is named .pdf, or starts with %PDF- and is not text (a note
    that begins with those five characters stays a note). HTML and PDF go through `parse`
    (default `parse_here`; the ingest's is `parsing.ParseWorker`, bounded in time)."""
    parse = parse or parse_here
    if data is None:
        data = read_bytes(path, max_bytes)
    if path.suffix.lower() == ".pdf":
        text = parse("pdf", data)
    else:
        try:
            text = decode_text(data)
        except UnreadableFile:
            if not data.startswith(b"%PDF-"):
                raise
            text = parse("pdf", data)
        else:
            if path.suffix.lower() in HTML_SUFFIXES:
                text = parse("html", text)
    if not text.strip():
        raise UnreadableFile("no text")
    return text


def decode_text(data: bytes) -> str:
    """UTF-8, or UTF-16/32 by their byte-order mark, or UTF-16 without one when every other byte
    is NUL (Latin text written by Windows tools); else UnreadableFile. A UTF-16/32 reading counts
    only when it looks like text: bytes that merely start like a byte-order mark are not."""
    for mark, encoding in BYTE_ORDER_MARKS:
        if data.startswith(mark):
            text = _plausible(data, encoding)
            if text is not None:
                return text
            break
    head = data[:8192]
    if b"\x00" in head:
        encoding = _bomless_utf16(head)
        text = _plausible(data, encoding) if encoding else None
        if text is None:
            raise UnreadableFile("binary file")
        return text
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UnreadableFile(f"not UTF-8 text (byte {error.start})") from None


def _plausible(data: bytes, encoding: str) -> str | None:
    """`data` decoded, if it decodes and at most 1% of its characters are unassigned, private or
    control characters (other than whitespace)."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        return None
    if encoding == "utf-8-sig":
        return text
    odd = sum(1 for c in text[:8192] if unicodedata.category(c) in ("Cn", "Co", "Cs", "Cc") and not c.isspace())
    return text if odd <= 0.01 * min(len(text), 8192) else None


def _bomless_utf16(head: bytes) -> str | None:
    """utf-16-le/-be when the NULs sit on one side of (nearly) every byte pair, else None."""
    pairs = len(head) // 2
    if pairs < 2:
        return None
    even_nuls, odd_nuls = head[0 : 2 * pairs : 2].count(0), head[1 : 2 * pairs : 2].count(0)
    if odd_nuls >= 0.9 * pairs and even_nuls == 0:
        return "utf-16-le"
    if even_nuls >= 0.9 * pairs and odd_nuls == 0:
        return "utf-16-be"
    return None


def parse_here(kind: str, payload: str | bytes) -> str:
    """The text of an HTML document ("html": its decoded text) or a PDF ("pdf": its bytes), parsed
    in this process; UnreadableFile when there is none to be had."""
    return _html_text(payload) if kind == "html" else _pdf_text(payload)


def _pdf_text(data: bytes) -> str:
    import logging

    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # malformed PDFs are reported once, below
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableFile("encrypted PDF (no text without its password)")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except FileNotDecryptedError:
        raise UnreadableFile("encrypted PDF (no text without its password)") from None
    except UnreadableFile:
        raise
    except Exception as error:  # a parser on hostile bytes can fail in any way; the file is skipped
        raise UnreadableFile(f"malformed PDF ({type(error).__name__})") from None


def _html_text(html: str) -> str:
    from bs4 import BeautifulSoup

    try:
        soup = BeautifulSoup(html, "html.parser")
        for hidden in soup(["script", "style", "noscript", "template"]):
            hidden.decompose()
        text = soup.get_text("\n")
    except RecursionError:
        raise UnreadableFile("HTML nested too deeply to parse") from None
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)
