"""Parsing HTML and PDF in a child process, within a time and a memory bound per file.

What beautifulsoup and pypdf cost follows the markup, not the text: 19.5 MiB of empty tags holds
no word and takes minutes and gigabytes to parse (the README has the numbers). A parse running in
a thread cannot be stopped, and it holds the interpreter's lock that the chat needs too; so the
ingest hands each HTML and PDF file to a child process (`ParseWorker`), started when the first
such file comes and kept for the next ones. A file whose parse overruns `seconds` is skipped with
one line, its child is killed and the next file gets a fresh one. The child runs at a lower CPU
priority than the server, and with an address-space limit, so that one file's tree cannot take
the machine's memory.

    python -m sift_chat.parsing     the child: requests on stdin, answers on stdout
"""

from __future__ import annotations

import os
import selectors
import struct
import subprocess
import sys
import time
from pathlib import Path

from .reading import UnreadableFile, parse_here

PARSE_SECONDS = 60.0  # per file; $SIFT_CHAT_PARSE_SECONDS (`config.parse_seconds`)
PARSE_MEMORY_BYTES = 3 * 2**30  # the child's address space: a 32 MiB page of real text parses in under 1 GiB
CHILD_NICENESS = 10
START_SECONDS = 120.0  # for the child to import its parsers, on a loaded machine
HEADER = struct.Struct(">cQ")  # kind or status, then the payload's length in bytes
KINDS = {"html": b"h", "pdf": b"p"}
TEXT, UNREADABLE = b"t", b"u"


class ParseWorker:
    """`worker(kind, payload)`: the text of an HTML document (`payload`: its decoded text) or a
    PDF (its bytes), parsed in a child process in at most `seconds`; else UnreadableFile with the
    reason. One caller at a time; `close()` (or leaving a `with` block) ends the child."""

    def __init__(self, seconds: float = PARSE_SECONDS, memory_bytes: int | None = PARSE_MEMORY_BYTES):
        self.seconds, self.memory_bytes = seconds, memory_bytes
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ParseWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, kind: str, payload: str | bytes) -> str:
        data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
        process = self._process()
        try:
            process.stdin.write(HEADER.pack(KINDS[kind], len(data)) + data)
            process.stdin.flush()
        except OSError:
            self.close()
            raise UnreadableFile(f"cannot parse the {kind.upper()}: the parser stopped") from None
        answer = self._read(process, time.monotonic() + self.seconds)
        if answer is None:
            timed_out = process.poll() is None
            self.close()
            if timed_out:
                raise UnreadableFile(f"parsing the {kind.upper()} took over {self.seconds:g} s: skipped "
                                     "(save it as plain text to add it)")
            raise UnreadableFile(f"cannot parse the {kind.upper()}: the parser stopped "
                                 f"(exit code {process.returncode})")
        status, body = answer
        text = body.decode("utf-8", "surrogatepass")
        if status == UNREADABLE:
            raise UnreadableFile(text)
        return text

    def close(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def _process(self) -> subprocess.Popen:
        if self.process is not None and self.process.poll() is None:
            return self.process
        self.close()
        package_parent = str(Path(__file__).resolve().parent.parent)
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
        if self.memory_bytes:
            environment["SIFT_CHAT_PARSE_MEMORY"] = str(self.memory_bytes)
        self.process = subprocess.Popen([sys.executable, "-m", "sift_chat.parsing"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=environment,
                                        close_fds=True)
        ready = _read_exactly(self.process.stdout.fileno(), 1, time.monotonic() + START_SECONDS)
        if ready != b"r":
            self.close()
            raise UnreadableFile("cannot parse: the parser did not start")
        return self.process

    @staticmethod
    def _read(process: subprocess.Popen, deadline: float) -> tuple[bytes, bytes] | None:
        """(status, body) of the child's answer, or None when it ends or the deadline passes first."""
        descriptor = process.stdout.fileno()
        header = _read_exactly(descriptor, HEADER.size, deadline)
        if header is None:
            return None
        status, length = HEADER.unpack(header)
        body = _read_exactly(descriptor, length, deadline)
        return None if body is None else (status, body)


def _read_exactly(descriptor: int, size: int, deadline: float) -> bytes | None:
    """`size` bytes from a pipe, or None when it closes or the deadline passes first."""
    chunks, missing = [], size
    with selectors.DefaultSelector() as selector:
        selector.register(descriptor, selectors.EVENT_READ)
        while missing:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                return None
            chunk = os.read(descriptor, min(missing, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            missing -= len(chunk)
    return b"".join(chunks)


# -- the child ----------------------------------------------------------------------------


def serve() -> None:
    """Answer parse requests from stdin on stdout until stdin closes."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a parser prints goes elsewhere than the answers
    requests = sys.stdin.buffer
    try:
        os.nice(CHILD_NICENESS)
    except OSError:
        pass
    memory = int(os.environ.get("SIFT_CHAT_PARSE_MEMORY", "0"))
    if memory:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    import bs4  # noqa: F401  (imported before the clock of the first file starts)
    import pypdf  # noqa: F401

    answers.write(b"r")
    answers.flush()
    kinds = {code: kind for kind, code in KINDS.items()}
    while header := requests.read(HEADER.size):
        code, length = HEADER.unpack(header)
        payload = requests.read(length)
        kind = kinds[code]
        try:
            text = parse_here(kind, payload.decode("utf-8", "surrogatepass") if kind == "html" else payload)
            status, body = TEXT, text.encode("utf-8", "surrogatepass")
        except UnreadableFile as reason:
            status, body = UNREADABLE, str(reason).encode("utf-8", "surrogatepass")
        except MemoryError:
            status, body = UNREADABLE, b"too much markup to parse in memory: skipped"
        except Exception as error:  # a parser on hostile bytes can fail in any way; the file is skipped
            status, body = UNREADABLE, f"cannot parse the {kind.upper()} ({type(error).__name__})".encode()
        answers.write(HEADER.pack(status, len(body)) + body)
        answers.flush()


if __name__ == "__main__":
    serve()
