r"""Answer accuracy: questions with known answers, each run through the engine exactly as chat runs it.

For every question and every configuration (mode × method) the engine answers a fresh one-message
chat; nothing is stored. Per answer:

- **correct**: the answer (as generated, before citation markers) contains one of the accepted
  answers of every fact the question asks for (case-insensitive, whitespace collapsed): a
  two-fact question counts only with both;
- **answer bits**: the bits of a reference answer sentence r given what the model reads (the chat
  prompt x, with the passages in the context modes), under the model as adapted for that question::

      bits = Σ_{t=1}^{|r|} −log₂ p(r_t | x, r_<t)

  a continuous, paired measure, far less noisy than right or wrong (greedy answers flip on small
  changes);
- its length in tokens, how it ended (the model stopped, the token limit, a loop), the seconds from
  sending to the whole answer;
- **where the answer was** (`fact_location`, `question_location`): whether the passages read, the
  passages learned from, or only picks that were neither held each fact (a passage holds a fact
  when it contains one of the fact's accepted answers, as the scorer reads an answer, and names
  the question's subject when it has one).

The report gives per configuration the accuracy, mean answer bits, median length, answers cut at
the limit, seconds per answer; the same by answer location; and paired differences per question
(both − context, fine-tune − off, SIFT − NN) with their standard errors, also by the first
configuration's answer location. A set mixing one- and two-fact questions is also reported per
number of facts.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .engine import Engine
from .evaluation import mean_and_error
from .events import Done, Prompted, Selected, Step
from .settings import ChatSettings

NO_METHOD = "-"  # the "off" mode selects nothing


@dataclass(frozen=True)
class Question:
    question: str
    facts: tuple[tuple[str, ...], ...]  # per fact the answer must state: its accepted answers
    reference: str
    subject: str = ""  # what the question is about (the world's town): a passage holding a fact names it


def load_questions(path: str | Path) -> list[Question]:
    """Questions from a JSONL file, one per line: {"question", "answers": [...], "reference"} for a
    question about one fact, {"question", "facts": [[...], [...]], "reference"} for one that needs
    several (the accepted answers of each fact); "subject" (or the world's "town"), optional, what the
    question is about."""
    questions = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the questions {path}: {getattr(error, 'strerror', None) or error}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            facts = item["facts"] if "facts" in item else [item["answers"]]
            if not isinstance(facts, list) or not all(isinstance(fact, list) for fact in facts):
                raise TypeError("answers must be a list, facts a list of lists")
            facts = tuple(tuple(str(a) for a in fact if str(a).strip()) for fact in facts)
            question = Question(str(item["question"]).strip(), facts,
                                str(item.get("reference") or " ".join(fact[0] for fact in facts if fact)),
                                str(item.get("subject") or item.get("town") or "").strip())
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(f"{path}, line {number}: not a question with accepted answers ({error})") from None
        if not question.question or not facts or not all(facts):
            raise ValueError(f"{path}, line {number}: the question or its answers are empty")
        questions.append(question)
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def is_correct(answer: str, accepted: Sequence[str]) -> bool:
    """The answer contains one of the accepted answers (case-insensitive, whitespace collapsed)."""
    answer = _normalised(answer)
    return any(_normalised(a) in answer for a in accepted if a.strip())


def states_every_fact(answer: str, facts: Sequence[Sequence[str]]) -> bool:
    """The answer states each fact: one accepted answer of every fact is in it."""
    return bool(facts) and all(is_correct(answer, accepted) for accepted in facts)


# -- where the answer was -----------------------------------------------------------------

# From most to least at hand. "read": in the prompt and not stepped on (context); "read and
# learned": in the prompt and stepped on (both); "only learned": stepped on, not read; "picked,
# unused": selected but neither read nor stepped on (context's picks after the first); "no pick".
LOCATIONS = ("read and learned", "read", "only learned", "picked, unused", "no pick")


def fact_location(accepted: Sequence[str], read: Sequence[str], learned: Sequence[str],
                  picked: Sequence[str], subject: str = "") -> str:
    """Where one fact was for an answer: `read`, `learned` and `picked` are the texts of the passages
    in the prompt, stepped on, and selected; a passage holds the fact when it contains one of its
    accepted answers (`is_correct`) and, given a `subject`, names it too (the world's towns share
    trades and rivers: a neighbour's "known for its salt cod" is not this town's fact)."""
    def held(texts: Sequence[str]) -> bool:
        return any(is_correct(text, accepted) and (not subject or is_correct(text, [subject])) for text in texts)

    in_read, in_learned = held(read), held(learned)
    if in_read:
        return "read and learned" if in_learned else "read"
    if in_learned:
        return "only learned"
    return "picked, unused" if held(picked) else "no pick"


def question_location(locations: Sequence[str]) -> str:
    """A question's location is its least available fact's: an answer needing a fact that was only
    learned, beside one that was read, was answered from what was only learned."""
    return max(locations, key=LOCATIONS.index)


@torch.no_grad()
def continuation_bits(model, tokenizer, readings: Sequence[torch.Tensor], text: str,
                      weights: torch.Tensor | None = None) -> float:
    """Σ −log₂ p(text's tokens | what is read) under `model` as it is now: one conversation
    (readings [[1, T]]), or one per passage read with the answer's tokens drawn from their
    mixture, p(y_t) = Σᵢ wᵢ p(y_t | reading i, y_<t) (`generation.mixture`)."""
    target = tokenizer(text, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    targets = torch.tensor(target, device=device)
    log_probs = []
    for input_ids in readings:
        ids = torch.cat([input_ids[0].to(device), targets])[None]
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(target) + 1).logits[0, :-1].float()
        log_probs.append(-F.cross_entropy(logits, targets, reduction="none"))
    weights = torch.ones(1) if weights is None else weights
    nats = -torch.logsumexp(torch.stack(log_probs) + weights.to(device).log()[:, None], 0).sum()
    return float(nats) / math.log(2)


@dataclass(frozen=True)
class Configuration:
    mode: str
    method: str

    @property
    def label(self) -> str:
        return self.mode if self.method == NO_METHOD else f"{self.mode} {self.method}"


def configurations(modes: Iterable[str], methods: Iterable[str]) -> list[Configuration]:
    """Every mode with every method; "off" once, with no method."""
    methods = list(methods)
    return [Configuration(mode, NO_METHOD) if mode == "off" else Configuration(mode, method)
            for mode in modes for method in (methods if mode != "off" else [NO_METHOD])]


@dataclass
class Answer:
    question: int  # index in the question file
    configuration: str
    answer: str
    correct: bool  # every fact stated
    bits: float
    tokens: int
    ended: str
    seconds: float
    citations: list[int]
    facts_stated: list[bool] = field(default_factory=list)  # per fact
    fact_locations: list[str] = field(default_factory=list)  # per fact, one of LOCATIONS
    location: str = ""  # the question's (`question_location`); "" when nothing was selected (off)
    picked: list[str] = field(default_factory=list)  # "file:first character" of each pick, in order
    read: list[str] = field(default_factory=list)  # of the passages in the prompt
    steps: int = 0  # the first `steps` picks were stepped on

    @property
    def facts(self) -> int:
        return max(len(self.facts_stated), 1)


def answer_question(engine: Engine, index: int, question: Question, configuration: Configuration,
                    settings: ChatSettings) -> Answer:
    """One question through `engine.respond`, as chat sends it; the reference's bits are measured
    when the model is about to answer (adapted, reading what it reads)."""
    method = settings.method if configuration.method == NO_METHOD else configuration.method
    settings = replace(settings, mode=configuration.mode, method=method)
    started = time.perf_counter()
    bits, done, picks, read, steps = float("nan"), None, None, [], 0
    for event in engine.respond(question.question, [], settings):
        if isinstance(event, Selected):
            picks = [pick.passage for pick in event.picks]
        elif isinstance(event, Step):
            steps += 1  # one per pick, in the order picked
        elif isinstance(event, Prompted):
            read = list(event.passages)
            paused = time.perf_counter()
            bits = continuation_bits(engine.model, engine.tokenizer, event.readings, question.reference, event.weights)
            started += time.perf_counter() - paused  # measuring is not answering
        elif isinstance(event, Done):
            done = event
    seconds = time.perf_counter() - started
    tokens = len(engine.tokenizer(done.raw_answer, add_special_tokens=False)["input_ids"])
    stated = [is_correct(done.raw_answer, accepted) for accepted in question.facts]
    texts = [p.text for p in picks or []]
    locations = [] if picks is None else [fact_location(accepted, [p.text for p in read], texts[:steps], texts,
                                                        question.subject) for accepted in question.facts]
    return Answer(index, configuration.label, done.answer, states_every_fact(done.raw_answer, question.facts),
                  bits, tokens, done.ended, seconds,
                  list(done.citations), stated, locations, question_location(locations) if locations else "",
                  [_where(p) for p in picks or []], [_where(p) for p in read], steps)


def _where(passage) -> str:
    return f"{Path(passage.path).name}:{passage.start_char}"


def run(engine: Engine, questions: Sequence[Question], configs: Sequence[Configuration],
        settings: ChatSettings, progress: bool = True, max_seconds: float | None = None) -> list[Answer]:
    """Every question in every configuration. With `max_seconds`, no question after the first is
    started after that long: the questions answered so far, each in every configuration (still
    paired)."""
    from tqdm import tqdm

    answers = []
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    with tqdm(total=len(questions) * len(configs), disable=not progress, unit="answer") as bar:
        for index, question in enumerate(questions):
            if index and deadline is not None and time.monotonic() >= deadline:
                break
            for configuration in configs:
                answers.append(answer_question(engine, index, question, configuration, settings))
                bar.update()
    return answers


def pick_locations(picks, questions: Sequence[Question], methods: Sequence[str]) -> list[dict]:
    """Where each question's facts are among the picks of each method, without the chat model: as
    `both` would use them (the lead read, every pick stepped on). `picks(question, method)` is
    (the lead: the pre-selection's best candidate, the passages selected in the order picked)."""
    located = []
    for index, question in enumerate(questions):
        for method in methods:
            lead, passages = picks(question.question, method)
            texts = [p.text for p in passages]
            locations = [fact_location(accepted, [lead.text], texts, texts, question.subject)
                         for accepted in question.facts]
            located.append({"question": index, "method": method, "fact_locations": locations,
                            "location": question_location(locations), "read": _where(lead),
                            "picked": [_where(p) for p in passages]})
    return located


def pick_table(located: list[dict]) -> str:
    """Per method and location: how many questions, and their share."""
    lines = ["| method | answer location (as `both` uses the picks) | questions | share (%) |", "|---|---|---|---|"]
    for method in dict.fromkeys(row["method"] for row in located):
        mine = [row for row in located if row["method"] == method]
        for location in LOCATIONS:
            count = sum(row["location"] == location for row in mine)
            if count:
                lines.append(f"| {method} | {location} | {count} | {100 * count / len(mine):.0f} |")
    return "\n".join(lines) + "\n"


# -- the report ---------------------------------------------------------------------------


def _paired(answers: list[Answer], first: str, second: str) -> dict | None:
    """first − second per question: accuracy (points) and answer bits, with standard errors; and
    the same per answer location of the first (where `first` had the answer: does learning help
    where the fact was only learned?)."""
    by = {(a.configuration, a.question): a for a in answers}
    pairs = [(by[first, q], by[second, q]) for (c, q) in by if c == first and (second, q) in by]
    if not pairs:
        return None
    paired = _difference(pairs)
    paired = {"first": first, "second": second, **paired, "by_location": []}
    for location in LOCATIONS:
        mine = [(a, b) for a, b in pairs if a.location == location]
        if mine:
            paired["by_location"].append({"location": location, **_difference(mine)})
    return paired


def _difference(pairs: list[tuple[Answer, Answer]]) -> dict:
    return {"questions": len(pairs),
            "accuracy_points": mean_and_error(100 * (a.correct - b.correct) for a, b in pairs),
            "bits": mean_and_error(a.bits - b.bits for a, b in pairs),
            "better": sum(a.correct > b.correct for a, b in pairs),
            "worse": sum(a.correct < b.correct for a, b in pairs),
            "fewer_bits": sum(a.bits < b.bits for a, b in pairs)}


def summarise(answers: list[Answer], configs: Sequence[Configuration]) -> dict:
    """The rows, the rows by answer location, the paired differences; with questions of one and of
    several facts mixed, the same per number of facts under "sets"."""
    summary = _summarise(answers, configs)
    counts = sorted({a.facts for a in answers})
    if len(counts) > 1:
        summary["sets"] = [{"facts": count, **_summarise([a for a in answers if a.facts == count], configs)}
                           for count in counts]
    return summary


def _summarise(answers: list[Answer], configs: Sequence[Configuration]) -> dict:
    rows, by_location, facts_by_location = [], [], []
    for config in configs:
        mine = [a for a in answers if a.configuration == config.label]
        if not mine:
            continue
        seconds = [a.seconds for a in mine]
        rows.append({"configuration": config.label, "questions": len(mine),
                     "accuracy": mean_and_error(100.0 * a.correct for a in mine),
                     "bits": mean_and_error(a.bits for a in mine),
                     "median_tokens": statistics.median(a.tokens for a in mine),
                     "cut_at_limit": sum(a.ended == "limit" for a in mine),
                     "stopped_looping": sum(a.ended == "repeat" for a in mine),
                     "median_seconds": statistics.median(seconds), "mean_seconds": statistics.fmean(seconds),
                     "cited": sum(bool(a.citations) for a in mine)})
        for location in LOCATIONS:  # per fact: was a fact that sat here stated?
            stated = [said for a in mine for where, said in zip(a.fact_locations, a.facts_stated) if where == location]
            if stated and any(a.facts > 1 for a in mine):
                facts_by_location.append({"configuration": config.label, "location": location,
                                          "facts": len(stated), "stated": sum(stated)})
        for location in LOCATIONS:
            here = [a for a in mine if a.location == location]
            if here:
                by_location.append({"configuration": config.label, "location": location, "questions": len(here),
                                    "share": 100.0 * len(here) / len(mine),
                                    "accuracy": mean_and_error(100.0 * a.correct for a in here),
                                    "bits": mean_and_error(a.bits for a in here)})
    labels = {c.label for c in configs}
    pairs = []
    methods = sorted({c.method for c in configs} - {NO_METHOD})
    for method in methods:
        pairs += [(f"both {method}", f"context {method}"), (f"fine-tune {method}", "off"),
                  (f"context {method}", "off")]
    for mode in ("fine-tune", "context", "both"):
        pairs.append((f"{mode} sift", f"{mode} nn"))
    paired = [p for first, second in pairs if first in labels and second in labels
              if (p := _paired(answers, first, second))]
    return {"rows": rows, "by_location": by_location, "facts_by_location": facts_by_location, "paired": paired}


def markdown(summary: dict, title: str) -> str:
    lines = [f"# {title}", ""] + _tables(summary)
    for part in summary.get("sets", []):
        facts = "one fact" if part["facts"] == 1 else f"{part['facts']} facts"
        lines += ["", f"## Questions about {facts}", ""] + _tables(part)
    return "\n".join(lines) + "\n"


def _tables(summary: dict) -> list[str]:
    def pm(value: tuple[float, float], digits: int = 1) -> str:
        return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"

    lines = ["| configuration | questions | accuracy (%) | answer bits | median tokens | cut at limit | "
             "stopped looping | median s / answer | mean s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(f"| {row['configuration']} | {row['questions']} | {pm(row['accuracy'])} | {pm(row['bits'])} | "
                     f"{row['median_tokens']:g} | {row['cut_at_limit']} | {row['stopped_looping']} | "
                     f"{row['median_seconds']:.2f} | {row['mean_seconds']:.2f} |")
    if summary["by_location"]:
        lines += ["", "By where the answer was (a question with several facts: where its least available fact "
                  "was; \"only learned\": in passages stepped on, not in the one read):", "",
                  "| configuration | answer location | questions | share (%) | accuracy (%) | answer bits |",
                  "|---|---|---|---|---|---|"]
        for row in summary["by_location"]:
            lines.append(f"| {row['configuration']} | {row['location']} | {row['questions']} | {row['share']:.0f} | "
                         f"{pm(row['accuracy'])} | {pm(row['bits'])} |")
    if summary.get("facts_by_location"):
        lines += ["", "Each fact of the questions with several facts, by where it was: how many the answer stated:", "",
                  "| configuration | fact location | facts | stated |", "|---|---|---|---|"]
        for row in summary["facts_by_location"]:
            lines.append(f"| {row['configuration']} | {row['location']} | {row['facts']} | {row['stated']} |")
    if summary["paired"]:
        lines += ["", "Paired per question (first − second; accuracy in points, negative bits: the first "
                  "finds the reference answer likelier), all questions and by where the first had the answer:", "",
                  "| first − second | answer location (first) | questions | accuracy (points) | better / worse | "
                  "answer bits | fewer bits |",
                  "|---|---|---|---|---|---|---|"]
        for p in summary["paired"]:
            for part in [{"location": "all", **p}] + p["by_location"]:
                lines.append(f"| {p['first']} − {p['second']} | {part['location']} | {part['questions']} | "
                             f"{pm(part['accuracy_points'])} | {part['better']} / {part['worse']} | "
                             f"{pm(part['bits'], 2)} | {part['fewer_bits']} |")
    return lines


def write_report(answers: list[Answer], questions: Sequence[Question], configs: Sequence[Configuration],
                 meta: dict, out: Path, title: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(answers, configs)
    (out / "answers.md").write_text(markdown(summary, title))
    (out / "answers.json").write_text(json.dumps(
        {"title": title, **meta, "summary": summary,
         "answers": [{**asdict(a), "question_text": questions[a.question].question} for a in answers]},
        indent=1))
    return summary
