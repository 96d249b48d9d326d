"""SIFT's uncertainty reduction of each of 4 picks (λ = 0.01, 200 candidates) on eval-qa's seeded sample
of 200 questions, and how many steps `--min-reduction` thresholds would leave; the corpus must have been
ingested by eval-qa before (its store is reused).

    .venv/bin/python docs/answers/pick-reductions.py /tmp/le-world/documents /tmp/le-world/questions.jsonl
    .venv/bin/python docs/answers/pick-reductions.py corpora/brindlemoor corpora/questions/brindlemoor.jsonl
"""
import sys, random, hashlib, statistics
from pathlib import Path
sys.path.insert(0, "/work/main")
import torch
from sift_chat import config
from sift_chat.answers import load_questions
from sift_chat.models import load_embedder
from sift_chat.retrieval import preselect
from sift_chat.selection import select
from sift_chat.store import Store
corpus = Path(sys.argv[1]).resolve(); qfile = sys.argv[2]
home = config.data_dir(None)
store = Store(home / "eval-qa" / f"{corpus.name}-{hashlib.sha1(str(corpus).encode()).hexdigest()[:8]}")
emb = load_embedder()
qs = load_questions(qfile)
qs = random.Random(0).sample(qs, min(200, len(qs)))
rows = []
for q in qs:
    text = q.question if hasattr(q, "question") else q.text
    query = emb.encode(text, normalize_embeddings=True, convert_to_tensor=True).float().cpu()
    found = preselect(store, query.numpy(), text, 200)
    s = select(query, torch.from_numpy(found.vectors), "sift", 4, 0.01)
    rows.append(s.uncertainty_reduction.tolist())
for i in range(4):
    v = [r[i] for r in rows if len(r) > i]
    print(f"pick {i+1}: median {statistics.median(v):.4f}  quartiles {statistics.quantiles(v, n=4)}")
for thr in [0.005, 0.01, 0.02, 0.03, 0.05]:
    steps = [next((i for i, x in enumerate(r) if x < thr), len(r)) for r in rows]
    print(f"min_reduction {thr}: mean steps {statistics.mean(steps):.2f}, distribution {[steps.count(k) for k in range(5)]}")
