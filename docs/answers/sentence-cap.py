"""What stopping an answer after its first k sentences would do, from stored answers (no model runs:
greedy decoding is causal, so an answer stopped after sentence k is the stored answer's first k
sentences). Per run and k: accuracy (`answers.states_every_fact`, as eval-qa scores it), paired
against the whole answer, and the answer tokens kept.

    python docs/answers/sentence-cap.py QUESTIONS.jsonl RUN/answers.json [RUN/answers.json ...]
"""
import json
import statistics
import sys

from sift_chat.answers import load_questions, states_every_fact
from sift_chat.evaluation import mean_and_error
from sift_chat.generation import CITATION, SENTENCE_END
from sift_chat.models import load_chat_model

_, tokenizer = load_chat_model()
questions = {q.question: q for q in load_questions(sys.argv[1])}


def first_sentences(answer: str, k: int | None) -> str:
    sentences = SENTENCE_END.split(CITATION.sub("", answer).strip())
    return " ".join(sentences if k is None else sentences[:k])


for path in sys.argv[2:]:
    data = json.load(open(path))
    rows = [a for a in data["answers"] if "question_text" in a]
    for configuration in sorted({a["configuration"] for a in rows}):
        chosen = [a for a in rows if a["configuration"] == configuration]
        whole = [states_every_fact(first_sentences(a["answer"], None), questions[a["question_text"]].facts)
                 for a in chosen]
        print(f"\n{path} — {configuration}, {len(chosen)} answers; stored accuracy "
              f"{100 * statistics.mean(a['correct'] for a in chosen):.1f}%, rescored {100 * statistics.mean(whole):.1f}%")
        print("| stop after | accuracy | − whole, paired | lost / gained | answer tokens, median | mean |")
        print("|---|---|---|---|---|---|")
        for k in (1, 2, 3, None):
            capped = [first_sentences(a["answer"], k) for a in chosen]
            ok = [states_every_fact(text, questions[a["question_text"]].facts) for text, a in zip(capped, chosen)]
            diff = mean_and_error([100.0 * (o - w) for o, w in zip(ok, whole)])
            tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in capped]
            print(f"| {k or 'the end'} sentences | {100 * statistics.mean(ok):.1f}% | {diff[0]:+.1f} ± {diff[1]:.1f} | "
                  f"{sum(w and not o for o, w in zip(ok, whole))} / {sum(o and not w for o, w in zip(ok, whole))} | "
                  f"{statistics.median(tokens):g} | {statistics.mean(tokens):.1f} |")
