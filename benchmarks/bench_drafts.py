"""Answer tokens per decoding forward with drafts guessed from what the answer reads, on stored answers.

    .venv/bin/python benchmarks/bench_drafts.py ANSWERS_JSON CORPUS [--configuration "both sift"] [--lengths 1,2,3,4]

Drafts change no answer (the engine keeps a guess only where it would have chosen that token:
`tests/test_decoding.py`), so the forwards an answer would take with drafts of k tokens follow from
the answer alone: each forward checks the k tokens `generation.PromptLookup` guesses after the
conversation read so far (the chat template around the question and the passage read, then the
answer), and yields the guesses up to the first wrong one and the model's own next token. Reads
an `eval-qa` answers.json and the folder it was run on (each passage read is a whole document, as
in the generated world); prints the tokens per forward for each k (the probe's TOKENS_PER_FORWARD
came from the world's 200 answers this way). No model runs: seconds.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from transformers import AutoTokenizer

from sift_chat import config
from sift_chat.generation import PromptLookup, conversation
from sift_chat.models import chat_model_source
from sift_chat.prompting import ChatTemplate


def forwards(read: list[int], answer: list[int], length: int) -> int:
    """Forwards to write `answer` (and its end of turn) after `read` with drafts of `length` tokens."""
    lookup, written, count = PromptLookup(read), 0, 0
    while written <= len(answer):  # the last forward chooses the end of turn
        draft = lookup.draft(min(length, len(answer) - written))
        kept = next((i for i, token in enumerate(draft) if written + i >= len(answer) or token != answer[written + i]),
                    len(draft))
        chosen = answer[written:written + kept + 1]
        lookup.extend(chosen)
        written += kept + 1
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("answers", help="an eval-qa answers.json")
    parser.add_argument("corpus", help="the folder its questions are about")
    parser.add_argument("--configuration", default=None, help='e.g. "context sift" (default: every one)')
    parser.add_argument("--lengths", default="1,2,3,4")
    args = parser.parse_args()
    lengths = [int(k) for k in args.lengths.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(chat_model_source(config.chat_model_name(None), config.data_dir() / "models"),
                                              local_files_only=True)
    template, corpus = ChatTemplate(tokenizer), Path(args.corpus)
    answers = json.loads(Path(args.answers).read_text())["answers"]
    configurations = [args.configuration] if args.configuration else list(dict.fromkeys(a["configuration"] for a in answers))
    print("| configuration | answers | answer tokens | " + " | ".join(f"drafts of {k}: tokens per forward" for k in lengths) + " |")
    print("|---|---|---|" + "---|" * len(lengths))
    for configuration in configurations:
        tokens, counts, n = 0, {k: 0 for k in lengths}, 0
        for record in (a for a in answers if a["configuration"] == configuration):
            read = record["read"] if isinstance(record["read"], list) else json.loads(record["read"].replace("'", '"'))
            passages = [(corpus / name.rsplit(":", 1)[0]).read_text() for name in read]
            ids = template.ids(conversation(record["question_text"], [], passages))
            answer = tokenizer(re.sub(r"\s*\[\d+\]", "", record["answer"]), add_special_tokens=False)["input_ids"]
            tokens, n = tokens + len(answer) + 1, n + 1
            for k in lengths:
                counts[k] += forwards(ids, answer, k)
        print(f"| {configuration} | {n} | {tokens} | " + " | ".join(f"{tokens / counts[k]:.2f}" for k in lengths) + " |")


if __name__ == "__main__":
    main()
