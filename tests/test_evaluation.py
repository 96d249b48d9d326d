"""The evaluation: the bits-per-byte metric, a split without leakage, and the command end to end."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sift_chat.cli import main
from sift_chat.evaluation import (EvalSettings, Row, bits_per_byte, covers_target, make_test_document,
                                  mean_and_error, split_corpus, summarise)
from sift_chat.store import Passage

from .tiny import save_tiny_chat_model, tiny_model, tiny_tokenizer

SAMPLE = Path(__file__).resolve().parent.parent / "corpora" / "brindlemoor"
TEXT = "The quick brown fox jumps over the lazy dog. Test-time fine-tuning takes one gradient step per passage."


def test_bits_per_byte_matches_a_hand_computed_value():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    document = make_test_document(TEXT, tokenizer, prompt_tokens=6, target_tokens=10)
    assert len(document.target_ids) == 10 and document.prompt_ids[0] == tokenizer.bos_token_id
    assert len(document.prompt_ids) == 1 + 6  # BOS, then the prompt

    ids = document.prompt_ids + document.target_ids
    bits = 0.0
    for position in range(len(document.prompt_ids), len(ids)):  # one forward pass per token
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[:position]])).logits[0, -1]
        bits -= torch.log_softmax(logits.double(), -1)[ids[position]].item() / math.log(2)
    target_text = tokenizer.decode(document.target_ids)
    assert document.target_bytes == len(target_text.encode("utf-8"))
    assert document.prompt_text + target_text == TEXT[: len(document.prompt_text) + len(target_text)]
    assert bits_per_byte(model, document) == pytest.approx(bits / document.target_bytes, rel=1e-5)


def test_context_goes_between_the_special_prefix_and_the_prompt():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    document = make_test_document(TEXT, tokenizer, prompt_tokens=6, target_tokens=10)
    context = tokenizer("Nearest neighbours retrieve passages.\n\n", add_special_tokens=False)["input_ids"]
    assert document.prefix == 1 and bits_per_byte(model, document, []) == bits_per_byte(model, document)
    with_context = replace(document, prompt_ids=document.prompt_ids[:1] + context + document.prompt_ids[1:])
    assert bits_per_byte(model, document, context) == pytest.approx(bits_per_byte(model, with_context), rel=1e-6)
    assert bits_per_byte(model, document, context) != bits_per_byte(model, document)  # the context is read


def test_a_document_too_short_for_prompt_and_target_is_not_a_test():
    assert make_test_document("short", tiny_tokenizer(), prompt_tokens=6, target_tokens=10) is None


def test_the_split_leaks_no_test_text_into_the_pool(tmp_path):
    for i in range(12):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * (i + 1))
    (tmp_path / "copy-of-doc11.txt").write_text((tmp_path / "doc11.txt").read_text())
    files = sorted(tmp_path.iterdir())
    eligible = lambda path: len(path.read_text()) > 40  # noqa: E731
    split = split_corpus(files, eligible, test_documents=4, seed=1)
    assert len(split.test) == 4 and all(eligible(p) for p in split.test)
    assert not set(split.test) & set(split.pool)
    test_texts = {p.read_text() for p in split.test}
    assert not any(p.read_text() in test_texts for p in split.pool)  # identical copies stay out too
    assert split == split_corpus(files, eligible, test_documents=4, seed=1)
    assert split != split_corpus(files, eligible, test_documents=4, seed=2)

    personal = split_corpus(files, eligible, test_documents=4, seed=1, tests_in_pool=True)
    assert personal.test == split.test and personal.pool == files  # a user's own documents: all of them


def test_target_characters_and_which_passages_cover_them():
    document = make_test_document(TEXT, tiny_tokenizer(), prompt_tokens=6, target_tokens=10, path="/a.txt")
    start, end = document.target_chars
    assert len(TEXT[start:end].encode("utf-8")) == document.target_bytes
    assert TEXT[:start].startswith(document.prompt_text.strip())
    passage = lambda path, s, e: Passage(0, 0, path, 0, s, e, TEXT[s:e])  # noqa: E731
    assert covers_target(passage("/a.txt", 0, start + 1), document)
    assert covers_target(passage("/a.txt", end - 1, len(TEXT)), document)
    assert not covers_target(passage("/a.txt", 0, start), document)  # the prompt only
    assert not covers_target(passage("/a.txt", end, len(TEXT)), document)  # after the target
    assert not covers_target(passage("/b.txt", 0, len(TEXT)), document)  # another document


def test_summary_is_relative_to_none_and_paired_per_document():
    rows = [Row("a", "", "none", 0, 1.0), Row("a", "", "nn", 2, 0.9, 0.5), Row("a", "", "sift", 2, 0.8, 0.4),
            Row("b", "", "none", 0, 2.0), Row("b", "", "nn", 2, 2.0, 0.6), Row("b", "", "sift", 2, 1.9, 0.3)]
    summary = summarise(rows, ("none", "nn", "sift"))
    assert summary["overall"]["nn"]["relative_percent"] == pytest.approx(mean_and_error([-10.0, 0.0]))
    assert summary["overall"]["sift"]["relative_percent"] == pytest.approx(mean_and_error([-20.0, -5.0]))
    assert summary["paired"]["sift-nn"]["points"] == pytest.approx(mean_and_error([-10.0, -5.0]))
    assert summary["paired"]["sift-nn"]["wins"] == 2


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="unknown method"):
        EvalSettings(methods=("sift", "random"))
    with pytest.raises(ValueError, match="duplicate must be"):
        EvalSettings(duplicate=0)
    with pytest.raises(ValueError, match="unknown setting"):
        EvalSettings(setting="private")
    with pytest.raises(ValueError, match="unknown mode"):
        EvalSettings(mode="rag")


def run_eval(tmp_path, out, *extra):
    model = tmp_path / "tiny-model"
    if not model.exists():
        save_tiny_chat_model(model)
    code = main(["--data-dir", str(tmp_path / "home"), "--chat-model", str(model), "eval",
                 "--corpus", str(SAMPLE), "--test-docs", "3", "--steps", "3", "--prompt-tokens", "12",
                 "--target-tokens", "20", "--lr", "0.01", "--out", str(out), "--quiet", *extra])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def test_eval_runs_end_to_end_and_the_same_seed_gives_the_same_result(tmp_path, capsys):
    first = run_eval(tmp_path, tmp_path / "first")
    rows = first["rows"]
    assert {r["method"] for r in rows} == {"none", "us", "nn", "nnf", "sift"}
    assert len({r["path"] for r in rows}) == 3
    finals = [r for r in rows if r["method"] != "none" and r["steps"] == 3]
    assert len(finals) == 12 and all(len(r["losses"]) == 3 for r in finals)
    nnf = [r for r in finals if r["method"] == "nnf"]
    assert all(len(set(r["passage_ids"])) == 1 for r in nnf)  # the nearest passage, three times
    table = (tmp_path / "first" / "results.md").read_text()
    assert "| sift | 3 |" in table and "sift − nn" in table
    assert (tmp_path / "first" / "bpb-by-steps.png").stat().st_size > 1000
    assert "bits per byte" in capsys.readouterr().out

    second = run_eval(tmp_path, tmp_path / "second")
    assert second["rows"] == rows  # same seed, same numbers

    first_only = run_eval(tmp_path, tmp_path / "one", "--measure-first", "1", "--methods", "none,sift")
    assert first_only["rows"] == [r for r in rows if r["path"] == rows[0]["path"] and r["method"] in ("none", "sift")]

    adaptive = run_eval(tmp_path, tmp_path / "adaptive", "--methods", "sift", "--min-reduction", "0.5")
    assert all(r["steps"] < 3 for r in adaptive["rows"])  # no pick removes half of σ₀²: stops early

    assert all(r["target_picks"] == 0 for r in finals)  # held out: no pick holds the target's text
    personal = run_eval(tmp_path, tmp_path / "personal", "--setting", "personal", "--methods", "none,nn,sift")
    assert {r["path"] for r in personal["rows"]} == {r["path"] for r in rows}  # the same test documents
    nn_picks = [r["target_picks"] for r in personal["rows"] if r["method"] == "nn" and r["steps"] == 3]
    assert len(nn_picks) == 3 and sum(nn_picks) > 0  # their own text is in the pool now, and found
    assert "picks from the target" in (tmp_path / "personal" / "results.md").read_text()

    def finals_of(result, method="sift"):
        return {r["path"]: r for r in result["rows"] if r["method"] == method and r["steps"] == len(r["losses"])
                and (r["losses"] or r["passage_ids"])}

    fine_tuned = finals_of(first)
    in_context = run_eval(tmp_path, tmp_path / "context", "--mode", "context", "--methods", "none,sift")
    context_rows = finals_of(in_context)
    assert context_rows.keys() == fine_tuned.keys()
    for path, row in context_rows.items():  # the same picks, no step, another loss
        assert row["losses"] == [] and row["passage_ids"] == fine_tuned[path]["passage_ids"]
        assert row["bpb"] != fine_tuned[path]["bpb"]
    assert not (tmp_path / "context" / "bpb-by-steps.png").exists()
    together = run_eval(tmp_path, tmp_path / "together", "--together", "--methods", "none,sift")
    assert {r["steps"] for r in together["rows"] if r["method"] == "sift"} == {3}  # one step: no checkpoints
    for path, row in finals_of(together).items():  # the same picks, one step on all of them: another loss
        assert row["passage_ids"] == fine_tuned[path]["passage_ids"] and len(row["losses"]) == 3
        assert row["losses"][0] == pytest.approx(fine_tuned[path]["losses"][0], rel=1e-4)  # before any step
        assert row["bpb"] != fine_tuned[path]["bpb"]
    assert "taken together" in (tmp_path / "together" / "results.md").read_text()
    both = finals_of(run_eval(tmp_path, tmp_path / "both", "--mode", "both", "--methods", "none,sift"))
    for path, row in both.items():  # the same steps, measured with the passages in context
        assert row["losses"] == fine_tuned[path]["losses"] and row["bpb"] not in (fine_tuned[path]["bpb"],
                                                                                    context_rows[path]["bpb"])

    duplicated = run_eval(tmp_path, tmp_path / "dup", "--duplicate", "2", "--methods", "nn,sift")
    nn = [r for r in duplicated["rows"] if r["method"] == "nn" and r["steps"] == 3]
    assert any(len(set(r["passage_ids"])) < 3 for r in nn)  # NN now picks copies
