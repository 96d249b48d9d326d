"""Answer accuracy: the scorer, the answer bits, the invented world, and `eval-qa` end to end."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from sift_chat import answers as qa
from sift_chat.cli import main
from sift_chat.world import write_world

from .tiny import save_tiny_chat_model, tiny_model, tiny_tokenizer


def test_an_answer_is_right_when_it_contains_an_accepted_answer():
    accepted = ("Ottilie Vance", "4,312")
    assert qa.is_correct("It was founded by OTTILIE   vance in 1742.", accepted)
    assert qa.is_correct("The census counted 4,312 people.", accepted)
    assert not qa.is_correct("It was founded by Ottilie.", accepted)
    assert not qa.is_correct("4312 people", accepted)  # only what is accepted counts
    assert not qa.is_correct("anything", ("", "  "))


def test_questions_load_from_jsonl_and_bad_lines_say_where(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text('{"question": "Who?", "answers": ["Vance"], "reference": "Vance did."}\n\n'
                    '{"question": "When?", "answers": [1742]}\n')
    assert qa.load_questions(good) == [qa.Question("Who?", ("Vance",), "Vance did."),
                                       qa.Question("When?", ("1742",), "1742")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Who?", "answers": ["Vance"]}\n{"question": "When?"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2"):
        qa.load_questions(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no questions"):
        qa.load_questions(tmp_path / "empty.jsonl")


def test_answer_bits_are_the_sum_of_the_reference_tokens_surprisal():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    prompt = torch.tensor([tokenizer("The quick brown fox")["input_ids"]])
    reference = " jumps over the lazy dog."
    bits = qa.continuation_bits(model, tokenizer, prompt, reference)
    ids = prompt[0].tolist()
    expected = 0.0
    with torch.no_grad():
        for token in tokenizer(reference, add_special_tokens=False)["input_ids"]:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            expected -= torch.log_softmax(logits.double(), -1)[token].item() / math.log(2)
            ids.append(token)
    assert bits == pytest.approx(expected, rel=1e-5)


def test_paired_differences_are_per_question():
    def answer(question, configuration, correct, bits):
        return qa.Answer(question, configuration, "", correct, bits, 5, "end", 1.0, [])

    answers = [answer(0, "both sift", True, 10.0), answer(0, "context sift", False, 12.0),
               answer(1, "both sift", True, 9.0), answer(1, "context sift", True, 8.0)]
    summary = qa.summarise(answers, qa.configurations(["context", "both"], ["sift"]))
    [paired] = [p for p in summary["paired"] if p["first"] == "both sift"]
    assert paired["questions"] == 2 and paired["better"] == 1 and paired["worse"] == 0
    assert paired["accuracy_points"][0] == pytest.approx(50.0)
    assert paired["bits"][0] == pytest.approx(-0.5) and paired["fewer_bits"] == 1
    assert [row["accuracy"][0] for row in summary["rows"]] == [50.0, 100.0]


def test_off_runs_once_without_a_method():
    labels = [c.label for c in qa.configurations(["off", "both"], ["nn", "sift"])]
    assert labels == ["off", "both nn", "both sift"]


def test_the_invented_world_states_each_fact_in_as_many_documents_as_it_says(tmp_path):
    path = write_world(tmp_path / "a", towns=6, seed=3)
    questions = [json.loads(line) for line in path.read_text().splitlines()]
    documents = {p.name: p.read_text() for p in (tmp_path / "a" / "documents").iterdir()}
    assert len(questions) == 6 * 7 and len({q["town"] for q in questions}) == 6
    for question in questions:
        own = [text for name, text in documents.items() if name.startswith(question["town"].lower() + "-")]
        stating = [text for text in own if any(a in text for a in question["answers"])]
        assert len(stating) == question["copies"], question
    # towns come in pairs sharing a stem: each has a confusable neighbour
    stems = [re.match(r"[A-Z][a-z]+?(?=holt|mere|by|wick|ford|stead|ham|thorpe|wold|haven)", q["town"]).group(0)
             for q in questions]
    assert all(stems.count(stem) == 2 * 7 for stem in stems)
    # the same seed writes the same world; another seed another one
    write_world(tmp_path / "b", towns=6, seed=3)
    write_world(tmp_path / "c", towns=6, seed=4)
    assert (tmp_path / "b" / "questions.jsonl").read_text() == path.read_text()
    assert (tmp_path / "c" / "questions.jsonl").read_text() != path.read_text()


def test_eval_qa_end_to_end_on_a_tiny_model(tmp_path, capsys):
    world = tmp_path / "world"
    assert main(["make-world", str(world), "--towns", "2"]) == 0
    model = save_tiny_chat_model(tmp_path / "tiny")
    out = tmp_path / "out"
    code = main(["--data-dir", str(tmp_path / "home"), "--chat-model", model, "--device", "cpu",
                 "eval-qa", "--corpus", str(world / "documents"), "--questions", str(world / "questions.jsonl"),
                 "--limit", "3", "--modes", "off,fine-tune,both", "--methods", "nn,sift", "-n", "2",
                 "--max-new-tokens", "5", "--out", str(out), "--quiet"])
    assert code == 0
    result = json.loads((out / "answers.json").read_text())
    labels = ["off", "fine-tune nn", "fine-tune sift", "both nn", "both sift"]
    assert [row["configuration"] for row in result["summary"]["rows"]] == labels
    assert len(result["answers"]) == 3 * len(labels)
    assert all(math.isfinite(a["bits"]) and a["bits"] > 0 and a["tokens"] <= 5 for a in result["answers"])
    # fine-tuning changes what the model finds likely; "off" is the base model for every question
    by = {(a["configuration"], a["question"]): a["bits"] for a in result["answers"]}
    assert any(by["fine-tune sift", q] != by["off", q] for q in range(3))
    pairs = {(p["first"], p["second"]) for p in result["summary"]["paired"]}
    assert {("both sift", "both nn"), ("fine-tune sift", "fine-tune nn"), ("fine-tune sift", "off")} <= pairs
    assert "| both sift |" in (out / "answers.md").read_text()
    assert "answers.md" in capsys.readouterr().out


def test_eval_qa_refuses_an_unknown_mode_before_loading_anything(tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text('{"question": "Who?", "answers": ["x"]}\n')
    code = main(["--data-dir", str(tmp_path / "home"), "eval-qa", "--corpus", str(tmp_path),
                 "--questions", str(tmp_path / "q.jsonl"), "--modes", "sideways"])
    assert code == 2 and "mode must be one of" in capsys.readouterr().err
