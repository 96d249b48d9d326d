"""Answer accuracy: the scorer, the answer bits, the invented world, and `eval-qa` end to end."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from sift_chat import answers as qa
from sift_chat.cli import main
from sift_chat.settings import ChatSettings
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
    assert qa.load_questions(good) == [qa.Question("Who?", (("Vance",),), "Vance did."),
                                       qa.Question("When?", (("1742",),), "1742")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Who?", "answers": ["Vance"]}\n{"question": "When?"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2"):
        qa.load_questions(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no questions"):
        qa.load_questions(tmp_path / "empty.jsonl")
    for unreadable, reason in ((tmp_path / "missing.jsonl", "No such file"), (tmp_path, "Is a directory")):
        with pytest.raises(ValueError, match=f"cannot read the questions .*: {reason}"):
            qa.load_questions(unreadable)


def test_a_two_fact_question_counts_only_with_both_facts(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "Who founded Varnholt, and in what year?", "facts": [["Birk"], ["1523", "MDXXIII"]], '
                    '"reference": "Varnholt was founded by Ada Birk in 1523.", "town": "Varnholt"}\n'
                    '{"question": "Who?", "facts": [["Birk"], []]}\n')
    with pytest.raises(ValueError, match="line 2"):  # a fact nothing answers can never be scored
        qa.load_questions(path)
    path.write_text(path.read_text().splitlines()[0] + "\n")
    [question] = qa.load_questions(path)
    assert question.facts == (("Birk",), ("1523", "MDXXIII")) and question.subject == "Varnholt"
    assert qa.states_every_fact("Ada Birk founded it in MDXXIII.", question.facts)
    assert not qa.states_every_fact("It was founded by Ada Birk.", question.facts)
    assert not qa.states_every_fact("It was founded in 1523.", question.facts)
    assert not qa.states_every_fact("anything", ())


def test_where_the_answer_was_for_each_fact_and_for_the_question():
    year, founder = ("1523",), ("Birk",)
    first = "Varnholt was founded in 1523."
    second = "Ada Birk founded Varnholt."
    other = "The ferry leaves Varnholt at 7:05."
    # context: the first pick read, nothing stepped on
    assert qa.fact_location(year, [first], [], [first, second]) == "read"
    assert qa.fact_location(founder, [first], [], [first, second]) == "picked, unused"
    assert qa.fact_location(founder, [first], [], [first, other]) == "no pick"
    # both: every pick stepped on, the first one read too
    assert qa.fact_location(year, [first], [first, second], [first, second]) == "read and learned"
    assert qa.fact_location(founder, [first], [first, second], [first, second]) == "only learned"
    # fine-tune: nothing read
    assert qa.fact_location(year, [], [other, first], [other, first]) == "only learned"
    # a neighbour's passage with the same answer does not hold this town's fact
    neighbour = "Varnmere was founded in 1523."
    assert qa.fact_location(year, [neighbour], [], [neighbour], subject="Varnholt") == "no pick"
    assert qa.fact_location(year, [neighbour], [], [neighbour]) == "read"
    # a question is where its least available fact was
    assert qa.question_location(["read and learned", "only learned"]) == "only learned"
    assert qa.question_location(["read", "picked, unused"]) == "picked, unused"
    assert qa.question_location(["only learned", "no pick"]) == "no pick"
    assert qa.question_location(["read"]) == "read"


def test_the_report_gives_accuracy_and_bits_by_answer_location():
    def answer(question, configuration, correct, bits, location, facts=1):
        return qa.Answer(question, configuration, "", correct, bits, 5, "end", 1.0, [],
                         [correct] * facts, [location] * facts, location)

    answers = [answer(0, "both sift", True, 4.0, "only learned", 2), answer(0, "context sift", False, 9.0, "picked, unused", 2),
               answer(1, "both sift", False, 6.0, "only learned", 2), answer(1, "context sift", False, 8.0, "picked, unused", 2),
               answer(2, "both sift", True, 3.0, "read and learned"), answer(2, "context sift", True, 3.5, "read")]
    summary = qa.summarise(answers, qa.configurations(["context", "both"], ["sift"]))
    rows = {(r["configuration"], r["location"]): r for r in summary["by_location"]}
    assert rows["both sift", "only learned"]["questions"] == 2
    assert rows["both sift", "only learned"]["accuracy"][0] == pytest.approx(50.0)
    assert rows["both sift", "only learned"]["bits"][0] == pytest.approx(5.0)
    assert rows["context sift", "read"]["share"] == pytest.approx(100 / 3)
    [paired] = [p for p in summary["paired"] if p["first"] == "both sift"]
    by = {part["location"]: part for part in paired["by_location"]}
    assert by["only learned"]["questions"] == 2 and by["only learned"]["better"] == 1
    assert by["only learned"]["bits"][0] == pytest.approx(-3.5)
    # one- and two-fact questions mixed: each set reported on its own too
    assert [part["facts"] for part in summary["sets"]] == [1, 2]
    text = qa.markdown(summary, "t")
    assert "| both sift | only learned | 2 | 67 | 50.0 ± 50.0 | 5.0 ± 1.0 |" in text
    assert "## Questions about 2 facts" in text
    facts = {(r["configuration"], r["location"]): (r["facts"], r["stated"]) for r in summary["facts_by_location"]}
    assert facts["both sift", "only learned"] == (4, 2) and facts["context sift", "picked, unused"] == (4, 0)
    assert "| both sift | only learned | 4 | 2 |" in text


def test_answer_bits_are_the_sum_of_the_reference_tokens_surprisal():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    prompts = [torch.tensor([tokenizer(text)["input_ids"]]) for text in ("The quick brown fox", "A slow red hen")]
    reference = " jumps over the lazy dog."

    def expected(weights) -> float:  # token by token: −log₂ Σ_i w_i p(y_t | prompt i, y_<t)
        ids, total = [prompt[0].tolist() for prompt in prompts], 0.0
        with torch.no_grad():
            for token in tokenizer(reference, add_special_tokens=False)["input_ids"]:
                p = sum(w * torch.softmax(model(input_ids=torch.tensor([row])).logits[0, -1].double(), -1)[token].item()
                        for w, row in zip(weights, ids))
                total -= math.log2(p)
                ids = [row + [token] for row in ids]
        return total

    one = qa.continuation_bits(model, tokenizer, prompts[:1], reference)
    assert one == pytest.approx(expected([1.0, 0.0]), abs=3e-5)
    two = qa.continuation_bits(model, tokenizer, prompts, reference, torch.tensor([0.7, 0.3]))
    assert two == pytest.approx(expected([0.7, 0.3]), abs=3e-5)
    assert abs(two - one) > 3e-4  # the second reading counts (a random tiny model: nearly uniform either way)


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


def test_two_fact_questions_need_two_documents_of_the_same_town(tmp_path):
    write_world(tmp_path / "a", towns=8, seed=5)
    path = tmp_path / "a" / "two-fact-questions.jsonl"
    questions = [json.loads(line) for line in path.read_text().splitlines()]
    documents = {p.name: p.read_text() for p in (tmp_path / "a" / "documents").iterdir()}
    assert len(questions) >= 8 and len({q["town"] for q in questions}) >= 4
    for question in questions:
        town = question["town"]
        assert question["question"].count(town) == 1 and question["question"].endswith("?")
        # (another town may share a trade or a river: a document states a town's fact when it names the town)
        stating = [{name for name, text in documents.items() if town in text and any(a in text for a in accepted)}
                   for accepted in question["facts"]]
        # each fact is stated in its own town's documents, as many times as recorded, and never
        # beside the other one: no single document answers the question
        for names, copies, listed in zip(stating, question["copies"], question["documents"]):
            assert names == set(listed) and len(names) == copies
            assert all(name.startswith(town.lower() + "-") for name in names)
        assert not stating[0] & stating[1]
        assert all(question["facts"][i][0] in question["reference"] for i in range(2))
    # the single-fact questions are still there, one per fact
    assert len((tmp_path / "a" / "questions.jsonl").read_text().splitlines()) == 8 * 7
    # the same seed, the same questions
    write_world(tmp_path / "b", towns=8, seed=5)
    assert (tmp_path / "b" / "two-fact-questions.jsonl").read_text() == path.read_text()
    write_world(tmp_path / "c", towns=8, seed=6)
    assert (tmp_path / "c" / "two-fact-questions.jsonl").read_text() != path.read_text()


def test_the_world_with_every_document_three_times(tmp_path):
    once, thrice = tmp_path / "once", tmp_path / "thrice"
    write_world(once, towns=4, seed=2)
    assert main(["make-world", str(thrice), "--towns", "4", "--seed", "2", "--document-copies", "3"]) == 0
    single = {p.name: p.read_text() for p in (once / "documents").iterdir()}
    tripled = {p.name: p.read_text() for p in (thrice / "documents").iterdir()}
    assert len(tripled) == 3 * len(single)
    for name, text in single.items():
        stem = name.removesuffix(".txt")
        assert tripled[name] == tripled[f"{stem}-2.txt"] == tripled[f"{stem}-3.txt"] == text
    for line_once, line_thrice in zip((once / "questions.jsonl").read_text().splitlines(),
                                      (thrice / "questions.jsonl").read_text().splitlines()):
        a, b = json.loads(line_once), json.loads(line_thrice)
        assert a["question"] == b["question"] and a["copies"] == b["copies"]
        assert len(b["documents"]) == 3 * len(a["documents"]) and set(a["documents"]) <= set(b["documents"])
    assert main(["make-world", str(tmp_path / "x"), "--document-copies", "0"]) == 2


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
    assert all(a["steps"] == 2 for a in result["answers"] if a["configuration"] == "both sift")


def test_eval_qa_stops_selecting_where_a_pick_removes_little(tmp_path):
    """--min-reduction reaches the selection: no step on a pick that removes less than that share
    of σ₀² (a second pick removes far less than 0.3 here), and the report says so."""
    world = tmp_path / "world"
    assert main(["make-world", str(world), "--towns", "2"]) == 0
    out = tmp_path / "out"
    code = main(["--data-dir", str(tmp_path / "home"), "--chat-model", save_tiny_chat_model(tmp_path / "tiny"),
                 "--device", "cpu", "eval-qa", "--corpus", str(world / "documents"),
                 "--questions", str(world / "questions.jsonl"), "--limit", "2", "--modes", "both", "--methods", "sift",
                 "-n", "2", "--min-reduction", "0.3", "--max-new-tokens", "3", "--out", str(out), "--quiet"])
    assert code == 0
    result = json.loads((out / "answers.json").read_text())
    assert result["settings"]["min_reduction"] == 0.3
    assert [a["steps"] for a in result["answers"]] == [1, 1]


@pytest.mark.parametrize("decode", ["fp32", "bf16"])
def test_eval_qa_decodes_at_the_precision_asked_and_records_it(tmp_path, decode):
    """--decode-precision reaches the engine (a question set answered with bf16 decoding is compared
    with fp32's): the record names the steps' and the decoding's precision."""
    world = tmp_path / "world"
    assert main(["make-world", str(world), "--towns", "2"]) == 0
    out = tmp_path / "out"
    assert main(["--data-dir", str(tmp_path / "home"), "--chat-model", save_tiny_chat_model(tmp_path / "tiny"),
                 "--device", "cpu", "eval-qa", "--corpus", str(world / "documents"),
                 "--questions", str(world / "questions.jsonl"), "--limit", "1", "--modes", "context",
                 "--methods", "sift", "--precision", "bf16", "--decode-precision", decode,
                 "--max-new-tokens", "3", "--out", str(out), "--quiet"]) == 0
    compute = json.loads((out / "answers.json").read_text())["compute"]
    assert compute.startswith("compute: bf16, decode" if decode == "bf16" else "compute: bf16 for steps and prefill, decode fp32")


def test_eval_qa_refuses_an_unknown_mode_before_loading_anything(tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text('{"question": "Who?", "answers": ["x"]}\n')
    code = main(["--data-dir", str(tmp_path / "home"), "eval-qa", "--corpus", str(tmp_path),
                 "--questions", str(tmp_path / "q.jsonl"), "--modes", "sideways"])
    assert code == 2 and "mode must be one of" in capsys.readouterr().err


def test_eval_qa_reports_where_the_answer_was_for_mixed_question_sets(tmp_path):
    world = tmp_path / "world"
    assert main(["make-world", str(world), "--towns", "2", "--seed", "1"]) == 0
    single = [json.loads(line) for line in (world / "questions.jsonl").read_text().splitlines()][:2]
    two = [json.loads(line) for line in (world / "two-fact-questions.jsonl").read_text().splitlines()][:2]
    assert len(two) == 2
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(q) + "\n" for q in single + two))
    model = save_tiny_chat_model(tmp_path / "tiny")
    out = tmp_path / "out"
    assert main(["--data-dir", str(tmp_path / "home"), "--chat-model", model, "--device", "cpu",
                 "eval-qa", "--corpus", str(world / "documents"), "--questions", str(mixed),
                 "--modes", "off,context,both", "--methods", "sift", "-n", "3",
                 "--max-new-tokens", "4", "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "answers.json").read_text())
    records = single + two
    for a in result["answers"]:
        facts = records[a["question"]].get("facts") or [records[a["question"]]["answers"]]
        assert len(a["facts_stated"]) == len(facts) and a["correct"] == all(a["facts_stated"])
        if a["configuration"] == "off":
            assert a["location"] == "" and a["picked"] == [] and a["steps"] == 0
            continue
        # every world document is one passage: the location follows from which files were picked,
        # read and stepped on, and the files that state each fact
        files = lambda places: {p.split(":")[0] for p in places}  # noqa: E731
        picked, read = files(a["picked"]), files(a["read"])
        learned = files(a["picked"][: a["steps"]])
        assert 1 <= len(read) <= ChatSettings().read_passages and a["steps"] == (3 if a["configuration"] == "both sift" else 0)
        listed = records[a["question"]]["documents"]
        for location, names in zip(a["fact_locations"], listed if len(facts) > 1 else [listed]):
            names = set(names)
            expected = ("read and learned" if names & read and names & learned else "read" if names & read
                        else "only learned" if names & learned else "picked, unused" if names & picked
                        else "no pick")
            assert location == expected, a
        assert a["location"] == qa.question_location(a["fact_locations"])
    text = (out / "answers.md").read_text()
    assert "| configuration | answer location | questions |" in text
    assert "## Questions about one fact" in text and "## Questions about 2 facts" in text
    assert [part["facts"] for part in result["summary"]["sets"]] == [1, 2]
    located = {(row["configuration"], row["location"]) for row in result["summary"]["by_location"]}
    assert all(location in qa.LOCATIONS and configuration != "off" for configuration, location in located)
    assert sum(row["questions"] for row in result["summary"]["by_location"]
               if row["configuration"] == "both sift") == 4


def test_eval_qa_stops_starting_questions_after_max_minutes(tmp_path, capsys):
    world = tmp_path / "world"
    assert main(["make-world", str(world), "--towns", "2"]) == 0
    model = save_tiny_chat_model(tmp_path / "tiny")
    out = tmp_path / "out"
    # a budget shorter than one answer: the first question is still answered in every configuration, no other
    assert main(["--data-dir", str(tmp_path / "home"), "--chat-model", model, "--device", "cpu",
                 "eval-qa", "--corpus", str(world / "documents"), "--questions", str(world / "questions.jsonl"),
                 "--limit", "3", "--modes", "off,context", "--methods", "sift", "-n", "2",
                 "--max-new-tokens", "3", "--max-minutes", "0.00001", "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "answers.json").read_text())
    assert sorted((a["question"], a["configuration"]) for a in result["answers"]) == [(0, "context sift"), (0, "off")]
    assert result["title"].startswith("documents: 1 questions")
    assert "1 of 3 questions answered" in capsys.readouterr().err
    assert main(["eval-qa", "--corpus", str(world), "--questions", str(world / "questions.jsonl"),
                 "--max-minutes", "0"]) == 2


def test_eval_qa_picks_only_locates_the_facts_among_each_methods_picks_without_a_chat_model(tmp_path):
    world = tmp_path / "world"
    assert main(["make-world", str(world), "--towns", "2", "--seed", "1"]) == 0
    out = tmp_path / "out"
    assert main(["--data-dir", str(tmp_path / "home"), "--chat-model", str(tmp_path / "no-such-model"),
                 "eval-qa", "--corpus", str(world / "documents"), "--picks-only",
                 "--questions", str(world / "two-fact-questions.jsonl"), "--methods", "nn,sift", "-n", "3",
                 "--out", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in (world / "two-fact-questions.jsonl").read_text().splitlines()]
    located = json.loads((out / "picks.json").read_text())["located"]
    assert len(located) == 2 * len(records)
    for row in located:
        picked = [p.split(":")[0] for p in row["picked"]]
        assert len(picked) == 3 and (row["method"] == "sift" or len(set(picked)) == 3)
        read = row["read"].split(":")[0]  # the pre-selection's lead, as chat reads it
        for location, names in zip(row["fact_locations"], records[row["question"]]["documents"]):
            names = set(names)  # as `both` would use them: the lead read, every pick stepped on
            assert location == (("read and learned" if names & set(picked) else "read") if read in names else
                                "only learned" if names & set(picked) else "no pick")
        assert row["location"] in ("only learned", "no pick")  # no passage holds both facts
    assert "| nn | " in (out / "picks.md").read_text() and "| sift | " in (out / "picks.md").read_text()
