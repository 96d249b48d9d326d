"""Pool eval-qa runs over disjoint question samples into one report (the questions renumbered run
by run): `python docs/answers/pool.py OUT RUN...`, each RUN a folder with answers.json."""

import json
import sys
from pathlib import Path

from sift_chat import answers as qa

out, runs = Path(sys.argv[1]), [Path(run) for run in sys.argv[2:]]
answers, questions, configs, offset = [], [], [], 0
for run in runs:
    data = json.loads((run / "answers.json").read_text())
    texts = {}
    for item in data["answers"]:
        texts[item["question"]] = item.pop("question_text")
        item["question"] += offset
        answers.append(qa.Answer(**item))
        if item["configuration"] not in [c.label for c in configs]:
            mode, _, method = item["configuration"].partition(" ")
            configs.append(qa.Configuration(mode, method or qa.NO_METHOD))
    questions += [qa.Question(texts[i], (), "") for i in sorted(texts)]
    offset += len(texts)
qa.write_report(answers, questions, configs, {"runs": [str(run) for run in runs]}, out,
                f"{len(questions)} questions pooled from {', '.join(run.name for run in runs)}")
print((out / "answers.md").read_text())
