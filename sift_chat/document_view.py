"""The document view: a document's stored text around a passage (the one a citation [n] or a pick
names), with the passage's characters marked, for the app's document pane.

Only the caller's own documents and the shared library are read (`access.Caller.readable`, the
same rule as every search and pick); another user's passage or document is refused with the same
line as one that does not exist, so a refusal says nothing of what others keep.

The store keeps a document as its passages with their character offsets (`corpus.iter_passages`:
``text[start_char:end_char] == passage.text``), overlapping by a few tokens, so the text shown is
the passages joined at their offsets; a character no passage holds (whitespace the splitter passed
over) is shown as a space, so offsets stay the document's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .store import Store

VIEW_CHARACTERS = 40_000  # the stretch of a document one view shows (a file may hold 32 MiB of text)
NOT_READABLE_PASSAGE = ("That passage is not in your documents or the shared library (or its document was "
                        "removed).")
NOT_READABLE_DOCUMENT = "That document is not in your documents or the shared library (or it was removed)."


class NotReadable(ValueError):
    """The view cannot be shown; the message (one line) says why."""


@dataclass(frozen=True)
class DocumentView:
    document_id: int
    name: str  # as the user named it, never the server's path
    owner: str  # whose document ('': the shared library)
    length: int  # the document's characters, as stored (to its last passage's end)
    start: int  # the document's character where `text` begins
    text: str  # the stored text of characters [start, start + len(text))
    passage_id: int | None = None
    passage_start: int | None = None  # the passage's characters in the document, [passage_start, passage_end)
    passage_end: int | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.text)

    def parts(self) -> tuple[str, str, str]:
        """(the text before the passage, the passage's characters shown, the text after it); all of
        it before when no passage is marked."""
        if self.passage_start is None:
            return self.text, "", ""
        a = min(max(self.passage_start - self.start, 0), len(self.text))
        b = min(max(self.passage_end - self.start, a), len(self.text))
        return self.text[:a], self.text[a:b], self.text[b:]


def joined_text(pieces: Iterable[tuple[int, int, str]], start: int, end: int) -> str:
    """Characters [start, end) of a document from its passages' (start_char, end_char, text):
    overlapping passages hold the same characters, so each character is taken from the first
    passage that holds it; one that none holds is a space."""
    chars = [" "] * max(end - start, 0)
    filled = start  # characters before this are written
    for a, b, text in pieces:
        lo, hi = max(a, filled), min(b, end)
        if hi > lo:
            chars[lo - start:hi - start] = text[lo - a:hi - a]
            filled = hi
    return "".join(chars)


def window(length: int, passage_start: int, passage_end: int, size: int = VIEW_CHARACTERS) -> tuple[int, int]:
    """The stretch [start, end) of at most `size` characters of a `length`-character document
    that shows the passage [passage_start, passage_end) in its middle (its first `size`
    characters when it is longer), moved to fit inside the document."""
    if passage_end - passage_start >= size:
        return passage_start, min(passage_start + size, length)
    start = max(0, passage_start - (size - (passage_end - passage_start)) // 2)
    end = min(length, start + size)
    return max(0, end - size), end


def whole_number(value, what: str) -> int:
    """`value` as an id (a whole number ≥ 1, as JSON sends it or as digits), else NotReadable."""
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 18:
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        shown = repr(value) if isinstance(value, (int, float, str, type(None))) else type(value).__name__
        raise NotReadable(f"A {what} id is a whole number (1 or more), not {shown[:40]}.")
    return value


def read_document(store: Store, readable: tuple[str, ...], passage_id=None, document_id=None,
                  size: int = VIEW_CHARACTERS) -> DocumentView:
    """The view of the passage's document around the passage, marked (`passage_id`), or of a
    document from its beginning (`document_id`), for a caller who reads the documents of the
    owners `readable`. NotReadable (one line) for a missing or malformed id, or a passage or
    document that is not the caller's or the shared library's."""
    if passage_id is not None:
        passage = store.passages([whole_number(passage_id, "passage")]).get(int(passage_id))
        document = store.document_by_id(passage.document_id) if passage else None
        if document is None or document["owner"] not in readable:
            raise NotReadable(NOT_READABLE_PASSAGE)
        marked = (passage.start_char, passage.end_char)
    elif document_id is not None:
        document = store.document_by_id(whole_number(document_id, "document"))
        if document is None or document["owner"] not in readable:
            raise NotReadable(NOT_READABLE_DOCUMENT)
        passage, marked = None, (0, 0)
    else:
        raise NotReadable("Say which passage or document to open.")
    length, _ = store.document_passages(document["id"], 0, 0)
    start, end = window(length, *marked, size=size)
    _, pieces = store.document_passages(document["id"], start, end)
    return DocumentView(document["id"], document.get("name") or Path(document["path"]).name, document["owner"],
                        length, start, joined_text(pieces, start, end),
                        passage.id if passage else None, *(marked if passage else (None, None)))
