"""How well the 2nd and 3rd fused candidates match against the 1st, and what a gate on that ratio
reads: passages read beyond the lead, and the questions whose facts all sit in what is read.
No chat model; the stores eval-qa built. Usage: read-gate.py [WORLD_DIR] (default /tmp/le-world)."""
import hashlib, random, sys
from pathlib import Path
import numpy as np
from sift_chat import config
from sift_chat.answers import is_correct, load_questions
from sift_chat.models import load_embedder
from sift_chat.retrieval import preselect, read_count
from sift_chat.store import Store

world = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/le-world")
sample = Path(__file__).resolve().parents[2] / "corpora"
sets = [("sample corpus, 22", sample / "brindlemoor", sample / "questions/brindlemoor.jsonl", None),
        ("single-fact, 200", world / "documents", world / "questions.jsonl", 200),
        ("two-fact, 200", world / "documents", world / "two-fact-questions.jsonl", 200)]
embedder = load_embedder(config.embedder_name(None), "cpu")
rows = {}
for name, corpus, questions_file, size in sets:
    corpus = corpus.resolve()
    store = Store(config.data_dir(None) / "eval-qa" / f"{corpus.name}-{hashlib.sha1(str(corpus).encode()).hexdigest()[:8]}")
    questions = load_questions(questions_file)
    if size:
        questions = random.Random(0).sample(questions, size)
    rows[name] = []
    for q in questions:
        query = embedder.encode(q.question, normalize_embeddings=True).astype(np.float32)
        found = preselect(store, query, q.question, 200)
        ordered = store.passages([int(i) for i in found.ids[:3]])
        texts = [ordered[int(i)].text for i in found.ids[:3]]
        holds = np.array([[is_correct(t, accepted) and (not q.subject or is_correct(t, [q.subject]))
                           for accepted in q.facts] for t in texts])
        rows[name].append((found.match[:3] / found.match[0], holds))
    ratios = np.array([r for r, _ in rows[name]])
    print(f"{name}: 2nd/1st match, 10/50/90th percentile {np.percentile(ratios[:, 1], [10, 50, 90]).round(3)}, "
          f"highest {ratios[:, 1].max():.3f}")
print("\n| read_min_match | " + " | ".join(f"{n}: read beyond the lead / all facts read" for n in rows) + " |")
print("|---" * (len(rows) + 1) + "|")
for gate in (0.0, 0.7, 0.75, 0.8, 0.85, 0.9):
    cells = []
    for name, items in rows.items():
        counts = [read_count(ratio, 3, gate) for ratio, _ in items]
        covered = [holds[:count].any(0).all() for (_, holds), count in zip(items, counts)]
        cells.append(f"{np.mean(counts) - 1:.2f} / {np.mean(covered):.1%}")
    print(f"| {gate:g} | " + " | ".join(cells) + " |")
