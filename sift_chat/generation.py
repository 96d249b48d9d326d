"""Generation: what the model reads, how an answer is kept from looping, and what it cites.

Pure functions over strings and token ids; the engine runs the token loop with them.

    conversation   the chat messages the model reads: an instruction to answer briefly with the
                   passages read for this question, the history, and the question
    answer_processors  transformers' logits processors (repetition penalty, no repeated n-grams),
                   applied to the answer's own tokens only: copying a name from a passage is what
                   reading is for, saying the same thing twice is not
    repeat_start   where an answer started repeating itself (the engine stops there)
    PromptLookup   the tokens an answer will likely write next, guessed from what it reads
    cite           which passages an answer's sentences come from, as [1], [2] … markers
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

INSTRUCTION = "Answer the question in one or two short sentences."
INSTRUCTION_WITH_PASSAGES = ("Answer the question in one or two short sentences, using what the user's "
                             "documents say:")


def instruction(passages: Sequence[str]) -> str:
    """The system message: how to answer, then the passages read for this question (whitespace
    collapsed, one paragraph each). They sit apart from the user's question, with no numbers or
    file names that an answer could recite."""
    if not passages:
        return INSTRUCTION
    return "\n\n".join([INSTRUCTION_WITH_PASSAGES, *(" ".join(text.split()) for text in passages)])


def conversation(prompt: str, history: Sequence[dict], passages: Sequence[str]) -> list[dict]:
    """The messages of one turn: the instruction with the passages (as the system message),
    earlier turns, and the question."""
    return [{"role": "system", "content": instruction(passages)}, *history, {"role": "user", "content": prompt}]


def training_text(prompt: str, passage: str, training: str, render) -> tuple[str, str]:
    """(prefix, text): what a step on `passage` reads and what it learns, for the training format
    (`adaptation.TRAINING_FORMATS`): the passage alone; the passage as the answer to the question,
    after the chat prompt; or the passage where the chat prompt puts it, in the instruction before
    the question. `render(messages, generation_prompt)` is the chat template as text."""
    if training == "passage":
        return "", passage
    passage = " ".join(passage.split())  # as the chat prompt quotes it
    if training == "answer":
        return render(conversation(prompt, [], []), True), passage
    marker = "\x00passage\x00"
    text = render(conversation(prompt, [], [marker]), False)
    prefix = text[: text.index(marker)]
    return (prefix[:-1], " " + passage) if prefix.endswith(" ") else (prefix, passage)


def answer_processors(repetition_penalty: float, no_repeat_ngram: int) -> LogitsProcessorList:
    """The logits processors that keep an answer from looping (1.0 and 0 turn each off).

    Repetition penalty θ: a token already in the answer has its logit z divided by θ when z > 0 and
    multiplied by θ when z < 0. No repeated n-grams: a token that would complete an n-gram already
    in the answer gets probability 0."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if no_repeat_ngram > 0:
        processors.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram))
    return processors


def reading_weights(count: int, lead_weight: float | None = None) -> torch.Tensor:
    """[count]: how much each passage read weighs in `mixture`: the first (the best match) w₁ =
    `lead_weight`, the others share the rest equally, wᵢ = (1 − w₁) / (count − 1); without a
    lead weight all alike, wᵢ = 1 / count; one passage: [1]."""
    if count == 1:
        return torch.ones(1)
    if lead_weight is None:
        return torch.full((count,), 1 / count)
    return torch.tensor([lead_weight] + [(1 - lead_weight) / (count - 1)] * (count - 1))


def mixture(readings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The next token's log-probabilities when R passages are each read in a row of their own:

        log p(y) = log Σᵢ wᵢ · p(y | passage i, question),     i = 1 … R,

    from the rows' logits `readings` [R, V] and `weights` [R] (`reading_weights`), so that a
    token the row that holds a fact is sure of wins where the other rows do not know it; the
    model reads one passage well and several in one prompt badly (README: Answers). One row
    gives its logits unchanged (what the answer's logits processors have always been given)."""
    if readings.shape[0] == 1:
        return readings[0]
    log_probs = torch.log_softmax(readings.float(), -1)
    return torch.logsumexp(log_probs + weights.to(log_probs.device).log()[:, None], 0)


def contrast(with_passages: torch.Tensor, without_passages: torch.Tensor | Callable[[], torch.Tensor],
             strength: float, plausible: float = 0.1) -> torch.Tensor:
    """Context-aware decoding (Shi et al., 2023, "Trusting Your Evidence"): scores that favour what
    the passages make likelier than the question alone does,

        s(y) = (1 + α) · log p(y | passages, question) − α · log p(y | question),

    over the tokens the model finds plausible with the passages, p(y | passages, question) ≥
    β · max p (β = `plausible`), so that a token unlikely either way does not win by the ratio;
    the others get −∞. α = `strength`; α = 0 is ordinary decoding.

    `without_passages` may be a function that computes those logits: it is called only when more
    than one token is plausible, since a lone plausible token is chosen whatever p(y | question)
    says (its score is then log p(y | passages, question): the same choice, greedy or sampled)."""
    reading = torch.log_softmax(with_passages.float(), -1)
    implausible = reading < reading.max() + math.log(plausible)
    if callable(without_passages):
        if int((~implausible).sum()) == 1:
            return reading.masked_fill(implausible, float("-inf"))
        without_passages = without_passages()
    prior = torch.log_softmax(without_passages.float(), -1)
    scores = (1 + strength) * reading - strength * prior
    return scores.masked_fill(implausible, float("-inf"))


def next_token(logits: torch.Tensor, answer_ids: list[int], processors: LogitsProcessorList,
               temperature: float, generator: torch.Generator | None = None) -> int:
    """The next token from the last position's logits [V], after the processors saw the answer so
    far: the most likely at temperature 0, else drawn (from `generator`'s stream where given)."""
    if processors and answer_ids:
        answer = torch.tensor([answer_ids], device=logits.device)
        logits = processors(answer, logits[None])[0]
    if temperature > 0:
        return int(torch.multinomial(torch.softmax(logits / temperature, -1).cpu(), 1, generator=generator))
    return int(logits.argmax())


def repeat_start(ids: Sequence[int], span: int) -> int | None:
    """When the last `span` tokens already occurred earlier in `ids`, the index where their repeat
    began (the answer up to there is what was said once); else None."""
    if span <= 0 or len(ids) < 2 * span:
        return None
    tail = list(ids[-span:])
    for start in range(len(ids) - span - 1, -1, -1):
        if list(ids[start:start + span]) == tail:
            return len(ids) - span
    return None


class PromptLookup:
    """Guesses of the next tokens from the conversation itself (prompt lookup decoding: Saxena,
    2023; Yang et al., 2023, "Inference with Reference"): an answer that quotes the passage it
    reads continues as the passage does. The guess after ids x_1 … x_t is what followed the latest
    earlier occurrence of the longest suffix x_{t-n+1} … x_t (n = `longest` down to 1) that
    occurred before:

        draft(k) = x_{e+1} … x_{e+k},   e the end of that earlier occurrence

    or nothing when no suffix recurs. The engine checks a draft against its own choices in one
    forward and keeps the tokens up to the first one it would not have chosen, so the answer is
    the same with or without drafts. Each n-gram's last two ends are indexed as tokens arrive."""

    def __init__(self, ids: Sequence[int], longest: int = 3):
        self.longest = longest
        self.ids: list[int] = []
        self._ends: dict[tuple[int, ...], tuple[int | None, int]] = {}  # n-gram -> (earlier end, latest end)
        self.extend(ids)

    def extend(self, ids: Sequence[int]) -> None:
        for token in ids:
            self.ids.append(int(token))
            end = len(self.ids)
            for n in range(1, min(self.longest, end) + 1):
                gram = tuple(self.ids[end - n:end])
                latest = self._ends.get(gram)
                self._ends[gram] = (latest[1] if latest else None, end)

    def draft(self, length: int) -> list[int]:
        """Up to `length` tokens guessed to follow (none when no suffix occurred before)."""
        if length <= 0:
            return []
        for n in range(min(self.longest, len(self.ids)), 0, -1):
            earlier = self._ends[tuple(self.ids[-n:])][0]
            if earlier is not None:
                return self.ids[earlier:earlier + length]
        return []


# -- citations ------------------------------------------------------------------------------

STOPWORDS = frozenset("""a an and are as at be been but by can did do does for from had has have he her his
how i in is it its itself of on or our she so than that the their them then there these they this to was
we were what when where which who whom why will with you your also about after all any because before
both each every into more most no not now only other over same some such through under up very yes
one two""".split())
CITATION = re.compile(r"\s*\[(\d+)\]")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def content_words(text: str) -> set[str]:
    """Lower-cased words and numbers that carry content (no stop words, numbers without their commas)."""
    return set(content_word_list(text))


def content_word_list(text: str) -> list[str]:
    """`content_words` in the order the text says them, each once."""
    words = re.findall(r"\d[\d,:.]*\d|\d|[^\W\d_][\w'-]*", text.lower())
    return list(dict.fromkeys(w.replace(",", "") for w in words
                              if w not in STOPWORDS and (len(w) > 2 or w.isdigit())))


def cite(answer: str, passages: Sequence[str], question: str = "") -> tuple[str, list[int]]:
    """The answer with a marker [n] after each sentence that passage n supports, and the numbers cited.

    A sentence is supported by the passage sharing most of its content words (less the question's
    own words, which an answer repeats whatever it says), weighted by rarity among the passages
    (a word in d of them counts 1/d); at least two shared words, or one number, make support.
    Markers the model wrote itself are kept when they name a passage, and dropped otherwise."""
    answer = CITATION.sub(lambda m: m.group(0) if 1 <= int(m.group(1)) <= len(passages) else "", answer)
    words = [content_words(text) for text in passages]
    asked = content_words(question)
    frequency: dict[str, int] = {}
    for passage_words in words:
        for word in passage_words:
            frequency[word] = frequency.get(word, 0) + 1
    sentences, cited = [], []
    for sentence in SENTENCE_END.split(answer.strip()):
        said = content_words(CITATION.sub("", sentence)) - asked
        best, best_score = None, 0.0
        for number, passage_words in enumerate(words, 1):
            shared = said & passage_words
            supported = len(shared) >= 2 or any(w[0].isdigit() for w in shared)
            score = sum(1 / frequency[w] for w in shared)
            if supported and score > best_score:
                best, best_score = number, score
        present = [int(n) for n in CITATION.findall(sentence)]
        if best is not None and best not in present:
            sentence = _mark(sentence, best)
            present.append(best)
        cited += [n for n in present if n not in cited]
        sentences.append(sentence)
    return " ".join(sentences), cited


def only_learned_words(answer: str, learned: Sequence[str], read: Sequence[str], question: str = "") -> list[list[str]]:
    """For each passage learned from, the answer's content words it holds that no passage read
    holds and the question does not ask (in the answer's order): what the answer can only have
    taken from the steps. With W(x) the content words of x (`content_words`):

        only_learned[j] = W(answer) ∩ W(learned[j]) − ∪_i W(read[i]) − W(question)
    """
    known = content_words(question).union(*(content_words(text) for text in read))
    answer_words = [w for w in content_word_list(CITATION.sub("", answer)) if w not in known]
    return [[w for w in answer_words if w in content_words(text)] for text in learned]


def _mark(sentence: str, number: int) -> str:
    """The sentence with [number] before its final punctuation."""
    match = re.search(r"[.!?]+$", sentence)
    if match:
        return f"{sentence[:match.start()]} [{number}]{match.group(0)}"
    return f"{sentence} [{number}]"
