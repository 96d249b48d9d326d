"""An invented world: short documents about towns, people and numbers that no model can know, and
the questions they answer, for measuring answers (`sift_chat.answers`).

Every town has the same kinds of fact (who founded it and when, its population, mayor, trade, river
and morning ferry). Each fact is written in one to three of the town's documents, each time in other
words: redundancy, where nearest-neighbour retrieval spends picks on what it already has. Towns come
in pairs whose names share a stem ("Varnholt", "Varnmere"): distractors that embed close to each
other. The same seed writes the same files.

Two question sets: `questions.jsonl`, one question per fact; `two-fact-questions.jsonl`, one per
pair of a town's facts that no document states together ("Who founded Varnholt, and in what year
was it founded?"): no passage holds the whole answer, so a model that reads one passage must have
learned the other fact from the rest of its picks. A question record lists the accepted answers of
each fact (`facts`); an answer counts when it states every fact. `document_copies` writes every
document that many times (identical files under other names): duplication, where nearest neighbours
pick the same text again and SIFT does not.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

STEMS = ("varn", "brel", "cask", "dorm", "elst", "fenn", "gald", "hask", "ilm", "jor", "kest", "lund",
         "mord", "nesk", "orv", "pell", "quill", "rask", "sorn", "tarr", "ulv", "vell", "wick", "yarl",
         "zenn", "ash", "brom", "cull", "drey", "emb", "ferr", "gorm", "holl", "isk", "kell", "lorn",
         "murr", "nold", "ost", "penn")
ENDINGS = ("holt", "mere", "by", "wick", "ford", "stead", "ham", "thorpe", "wold", "haven")
FIRST = ("Ada", "Bram", "Cora", "Dagny", "Edvin", "Freya", "Gunnar", "Hedda", "Ivo", "Jorun", "Kasimir",
         "Liv", "Magnus", "Nele", "Oskar", "Petra", "Quentin", "Runa", "Sigrid", "Tobias", "Ulla", "Viggo",
         "Wenke", "Yrsa")
SURNAME_HEADS = ("Alder", "Birk", "Crane", "Dunst", "Eller", "Falk", "Greer", "Hallor", "Isen", "Jessup",
                 "Kromm", "Lark", "Moss", "Norring", "Odell", "Pryce", "Quarn", "Rook", "Stave", "Thorne",
                 "Umber", "Vasser", "Wren", "Yates")
SURNAME_TAILS = ("", "by", "ley", "wood", "mark", "son", "well", "field")
TRADES = ("amber beads", "salt cod", "blue slate", "felted wool", "copper kettles", "juniper gin",
          "rope and sailcloth", "smoked mackerel", "clay pipes", "linen thread", "oak barrels",
          "honey mead", "tin whistles", "goat cheese", "pine tar", "glass floats", "iron nails",
          "dried seaweed", "wax candles", "leather saddles")
RIVERS = ("Ambel", "Brisk", "Corran", "Dwyle", "Esk", "Farrow", "Glenn", "Hethe", "Iver", "Kalla", "Lenn",
          "Mirel", "Nairn", "Otter", "Pell", "Rhune", "Sallow", "Teme", "Ure", "Wend")

# One fact kind: its question, and ways of stating it (each copy of a fact uses another one).
TEMPLATES = {
    "founder": ("Who founded {town}?", "{town} was founded by {value}.", (
        "{town} was founded by {value}.",
        "It was {value} who founded {town}, according to the parish records.",
        "{value} is remembered as the founder of {town}.")),
    "founded": ("In what year was {town} founded?", "{town} was founded in {value}.", (
        "{town} was founded in {value}.",
        "The town of {town} dates back to {value}.",
        "Records show that {town} was first settled in the year {value}.")),
    "population": ("How many people live in {town}?", "{value} people live in {town}.", (
        "{town} has {value} inhabitants.",
        "The last census counted {value} people living in {town}.",
        "About {value} people call {town} home.")),
    "mayor": ("Who is the mayor of {town}?", "The mayor of {town} is {value}.", (
        "The mayor of {town} is {value}.",
        "{value} was elected mayor of {town} last spring.",
        "{town} is governed by its mayor, {value}.")),
    "trade": ("What is {town} known for producing?", "{town} is known for its {value}.", (
        "{town} is known for its {value}.",
        "The main trade of {town} is {value}.",
        "Merchants travel to {town} to buy {value}.")),
    "river": ("On which river does {town} lie?", "{town} lies on the river {value}.", (
        "{town} lies on the river {value}.",
        "The {value} flows through the middle of {town}.",
        "{town} was built on the banks of the {value}.")),
    "ferry": ("At what time does the morning ferry leave {town}?", "The morning ferry leaves {town} at {value}.", (
        "The first ferry leaves {town} at {value} every morning.",
        "Every morning at {value}, a ferry departs from {town}.",
        "{town}'s morning ferry sails at {value}.")),
}
# The second half of a two-fact question, after "{first question}, and ": the town is named once.
FOLLOW_UPS = {
    "founder": "who founded it", "founded": "in what year was it founded",
    "population": "how many people live there", "mayor": "who is its mayor",
    "trade": "what is it known for producing", "river": "on which river does it lie",
    "ferry": "at what time does its morning ferry leave",
}
DOCUMENT_KINDS = ("notes", "guide", "history")
COPIES = (1, 2, 3)
COPY_WEIGHTS = (0.4, 0.35, 0.25)


@dataclass(frozen=True)
class Fact:
    town: str
    kind: str
    value: str
    answers: tuple[str, ...]  # any of them, case-insensitive, in an answer counts as right


def _people(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """(full name, surname) with distinct surnames, so that a surname names one person."""
    surnames = rng.sample([h + t for h in SURNAME_HEADS for t in SURNAME_TAILS], count)
    return [(f"{rng.choice(FIRST)} {surname}", surname) for surname in surnames]


def _towns(rng: random.Random, count: int) -> list[str]:
    """Town names in pairs that share a stem: each pair is a distractor for the other."""
    stems = rng.sample(STEMS, (count + 1) // 2)
    names = []
    for stem in stems:
        for ending in rng.sample(ENDINGS, 2):
            names.append(stem.capitalize() + ending)
    return names[:count]


def town_facts(rng: random.Random, towns: list[str]) -> list[Fact]:
    people = iter(_people(rng, 2 * len(towns)))
    facts = []
    for town in towns:
        (founder, founder_surname), (mayor, mayor_surname) = next(people), next(people)
        population = rng.randrange(800, 60000)
        hour, minute = rng.randrange(5, 10), rng.choice(range(0, 60, 5))
        facts += [
            Fact(town, "founder", founder, (founder_surname,)),
            Fact(town, "founded", str(year := rng.randrange(1350, 1900)), (str(year),)),
            Fact(town, "population", f"{population:,}", (f"{population:,}", str(population))),
            Fact(town, "mayor", mayor, (mayor_surname,)),
            Fact(town, "trade", trade := rng.choice(TRADES), (trade,)),
            Fact(town, "river", river := rng.choice(RIVERS), (river,)),
            Fact(town, "ferry", time := f"{hour}:{minute:02d}", (time,)),
        ]
    return facts


def two_fact_question(town: str, first: Fact, second: Fact) -> str:
    """"Who founded Varnholt, and in what year was it founded?": the first fact's question, then the
    second's follow-up."""
    return f"{TEMPLATES[first.kind][0].format(town=town)[:-1]}, and {FOLLOW_UPS[second.kind]}?"


def write_world(folder: str | Path, *, towns: int = 80, seed: int = 0, document_copies: int = 1) -> Path:
    """Write the documents under `folder`/documents, the single-fact questions to
    `folder`/questions.jsonl (question, answers, reference, kind, town, copies, documents) and the
    two-fact questions to `folder`/two-fact-questions.jsonl (question, facts: the accepted answers
    of each fact, reference, kind, kinds, town, copies and documents per fact); returns the path of
    the single-fact questions. `document_copies` > 1 writes each document that many times (the
    copies named `<name>-2.txt`, ...); the questions' `copies` count statements, not files."""
    if not isinstance(document_copies, int) or not 1 <= document_copies <= 10:
        raise ValueError(f"document copies must be an integer in [1, 10], got {document_copies!r}")
    rng = random.Random(seed)
    folder = Path(folder)
    documents = folder / "documents"
    documents.mkdir(parents=True, exist_ok=True)
    names = _towns(rng, towns)
    facts = town_facts(rng, names)
    questions, two_fact = [], []

    def files(town: str, kinds) -> list[str]:
        stem = town.lower()
        return [f"{stem}-{kind}{'' if copy == 1 else f'-{copy}'}.txt"
                for kind in sorted(kinds, key=DOCUMENT_KINDS.index) for copy in range(1, document_copies + 1)]

    for town in names:
        sentences: dict[str, list[str]] = {kind: [] for kind in DOCUMENT_KINDS}
        placed: list[tuple[Fact, set[str], int]] = []  # each fact, the documents stating it, how often
        for fact in (f for f in facts if f.town == town):
            question, reference, phrasings = TEMPLATES[fact.kind]
            copies = rng.choices(COPIES, COPY_WEIGHTS)[0]
            kinds = rng.sample(DOCUMENT_KINDS, copies)
            for kind, phrasing in zip(kinds, rng.sample(phrasings, copies)):
                sentences[kind].append(phrasing.format(town=town, value=fact.value))
            placed.append((fact, set(kinds), copies))
            questions.append({"question": question.format(town=town), "answers": list(fact.answers),
                              "reference": reference.format(town=town, value=fact.value),
                              "kind": fact.kind, "town": town, "copies": copies,
                              "documents": files(town, kinds)})
        for (first, first_kinds, first_copies), (second, second_kinds, second_copies) in combinations(placed, 2):
            if first_kinds & second_kinds:
                continue  # one document states both: one passage could answer it
            references = [TEMPLATES[f.kind][1].format(town=town, value=f.value) for f in (first, second)]
            two_fact.append({"question": two_fact_question(town, first, second),
                             "facts": [list(first.answers), list(second.answers)],
                             "reference": " ".join(references), "kind": f"{first.kind}+{second.kind}",
                             "kinds": [first.kind, second.kind], "town": town,
                             "copies": [first_copies, second_copies],
                             "documents": [files(town, first_kinds), files(town, second_kinds)]})
        for kind, lines in sentences.items():
            if lines:
                rng.shuffle(lines)
                title = {"notes": f"Notes on {town}", "guide": f"A traveller's guide to {town}",
                         "history": f"From the history of {town}"}[kind]
                for name in files(town, [kind]):
                    (documents / name).write_text(f"{title}\n\n" + " ".join(lines) + "\n")
    (folder / "two-fact-questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in two_fact))
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path
