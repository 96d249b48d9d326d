r"""Answer accuracy: questions with known answers, each run through the engine exactly as chat runs it.

For every question and every configuration (mode × method) the engine answers a fresh one-message
chat; nothing is stored. Per answer:

- **correct**: the answer (as generated, before citation markers) contains one of the accepted
  answers, case-insensitive, whitespace collapsed;
- **answer bits**: the bits of a reference answer sentence r given what the model reads (the chat
  prompt x, with the passages in the context modes), under the model as adapted for that question::

      bits = Σ_{t=1}^{|r|} −log₂ p(r_t | x, r_<t)

  a continuous, paired measure, far less noisy than right or wrong (greedy answers flip on small
  changes);
- its length in tokens, how it ended (the model stopped, the token limit, a loop), the seconds from
  sending to the whole answer.

The report gives per configuration the accuracy, mean answer bits, median length, answers cut at
the limit, seconds per answer; and paired differences per question (both − context, fine-tune − off,
SIFT − NN) with their standard errors.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .engine import ChatSettings, Done, Engine, Prompted
from .evaluation import mean_and_error

NO_METHOD = "-"  # the "off" mode selects nothing


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]
    reference: str


def load_questions(path: str | Path) -> list[Question]:
    """Questions from a JSONL file: one {"question", "answers": [...], "reference"} per line."""
    questions = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            question = Question(str(item["question"]).strip(), tuple(str(a) for a in item["answers"]),
                                str(item.get("reference") or item["answers"][0]))
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(f"{path}, line {number}: not a question with accepted answers ({error})") from None
        if not question.question or not question.answers:
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


@torch.no_grad()
def continuation_bits(model, tokenizer, input_ids: torch.Tensor, text: str) -> float:
    """Σ −log₂ p(text's tokens | input_ids) under `model` as it is now (input_ids: [1, T])."""
    target = tokenizer(text, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    ids = torch.cat([input_ids[0], torch.tensor(target)]).to(device)[None]
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(target) + 1).logits[0, :-1].float()
    nats = F.cross_entropy(logits, torch.tensor(target, device=device), reduction="sum")
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
    correct: bool
    bits: float
    tokens: int
    ended: str
    seconds: float
    citations: list[int]


def answer_question(engine: Engine, index: int, question: Question, configuration: Configuration,
                    settings: ChatSettings) -> Answer:
    """One question through `engine.respond`, as chat sends it; the reference's bits are measured
    when the model is about to answer (adapted, reading what it reads)."""
    method = settings.method if configuration.method == NO_METHOD else configuration.method
    settings = replace(settings, mode=configuration.mode, method=method)
    started = time.perf_counter()
    bits, done = float("nan"), None
    for event in engine.respond(question.question, [], settings):
        if isinstance(event, Prompted):
            paused = time.perf_counter()
            bits = continuation_bits(engine.model, engine.tokenizer, event.input_ids, question.reference)
            started += time.perf_counter() - paused  # measuring is not answering
        elif isinstance(event, Done):
            done = event
    seconds = time.perf_counter() - started
    tokens = len(engine.tokenizer(done.raw_answer, add_special_tokens=False)["input_ids"])
    return Answer(index, configuration.label, done.answer, is_correct(done.raw_answer, question.answers),
                  bits, tokens, done.ended, seconds, list(done.citations))


def run(engine: Engine, questions: Sequence[Question], configs: Sequence[Configuration],
        settings: ChatSettings, progress: bool = True) -> list[Answer]:
    from tqdm import tqdm

    answers = []
    with tqdm(total=len(questions) * len(configs), disable=not progress, unit="answer") as bar:
        for index, question in enumerate(questions):
            for configuration in configs:
                answers.append(answer_question(engine, index, question, configuration, settings))
                bar.update()
    return answers


# -- the report ---------------------------------------------------------------------------


def _paired(answers: list[Answer], first: str, second: str) -> dict | None:
    """first − second per question: accuracy (points) and answer bits, with standard errors."""
    by = {(a.configuration, a.question): a for a in answers}
    pairs = [(by[first, q], by[second, q]) for (c, q) in by if c == first and (second, q) in by]
    if not pairs:
        return None
    accuracy = mean_and_error(100 * (a.correct - b.correct) for a, b in pairs)
    bits = mean_and_error(a.bits - b.bits for a, b in pairs)
    return {"first": first, "second": second, "questions": len(pairs),
            "accuracy_points": accuracy, "bits": bits,
            "better": sum(a.correct > b.correct for a, b in pairs),
            "worse": sum(a.correct < b.correct for a, b in pairs),
            "fewer_bits": sum(a.bits < b.bits for a, b in pairs)}


def summarise(answers: list[Answer], configs: Sequence[Configuration]) -> dict:
    rows = []
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
    return {"rows": rows, "paired": paired}


def markdown(summary: dict, title: str) -> str:
    def pm(value: tuple[float, float], digits: int = 1) -> str:
        return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"

    lines = [f"# {title}", "",
             "| configuration | questions | accuracy (%) | answer bits | median tokens | cut at limit | "
             "stopped looping | median s / answer | mean s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(f"| {row['configuration']} | {row['questions']} | {pm(row['accuracy'])} | {pm(row['bits'])} | "
                     f"{row['median_tokens']:g} | {row['cut_at_limit']} | {row['stopped_looping']} | "
                     f"{row['median_seconds']:.2f} | {row['mean_seconds']:.2f} |")
    if summary["paired"]:
        lines += ["", "Paired per question (first − second; accuracy in points, negative bits: the first "
                  "finds the reference answer likelier):", "",
                  "| first − second | questions | accuracy (points) | better / worse | answer bits | fewer bits |",
                  "|---|---|---|---|---|---|"]
        for p in summary["paired"]:
            lines.append(f"| {p['first']} − {p['second']} | {p['questions']} | {pm(p['accuracy_points'])} | "
                         f"{p['better']} / {p['worse']} | {pm(p['bits'], 2)} | {p['fewer_bits']} |")
    return "\n".join(lines) + "\n"


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
