"""UPR: re-rank the fused top candidates by the chat model's log p(question | passage).

    .venv/bin/python docs/answers/upr/upr.py [TOP]      # prints recall@1 every 50 questions (top3.log: the first 250)
"""
import json, sys, tempfile, time
from pathlib import Path
import torch
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
torch.set_num_threads(1)
from bench_retrieval import holds, question_sets, EMBEDDER
from sift_chat import config
from sift_chat.corpus import ingest
from sift_chat.models import load_embedder, load_chat_model
from sift_chat.retrieval import preselect
from sift_chat.store import Store
TOP = int(sys.argv[1]) if len(sys.argv) > 1 else 3
emb = load_embedder(EMBEDDER, None)
model, tok = load_chat_model(config.DEFAULT_CHAT_MODEL, None, config.data_dir() / "models")
model.eval()
folder = Path(tempfile.mkdtemp())
sets = question_sets(["world"], folder)
paths, questions = sets["world, single-fact"]
store = Store(folder / "store"); ingest(store, emb, paths, embedder_name=EMBEDDER, progress=False)
@torch.no_grad()
def qlogp(passage, question, style):
    if style == "raw":
        prefix = f"Passage: {' '.join(passage.split())}\nQuestion:"
    else:
        prefix = tok.apply_chat_template([{"role": "user", "content": "Write a question that this text answers:\n\n" + " ".join(passage.split())}], add_generation_prompt=True, tokenize=False)
    p = tok(prefix, add_special_tokens=False).input_ids; q = tok(" " + question if style == "raw" else question, add_special_tokens=False).input_ids
    ids = torch.tensor([p + q]); logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float().log_softmax(-1)
    return float(logits.gather(1, torch.tensor(q)[:, None]).sum())
res = {"fused": 0, "raw": 0, "chat": 0, "oracle": 0}
t = time.time()
vectors = emb.encode([q["question"] for q in questions], normalize_embeddings=True, convert_to_numpy=True)
for n, (q, v) in enumerate(zip(questions, vectors)):
    c = preselect(store, v, q["question"], 200)
    ids = [int(i) for i in c.ids[:TOP]]
    texts = {p: t.text for p, t in store.passages(ids).items()}
    ok = [holds(texts[i], q) for i in ids]
    res["fused"] += ok[0]; res["oracle"] += any(ok)
    for style in ("raw", "chat"):
        scores = [qlogp(texts[i], q["question"], style) for i in ids]
        res[style] += ok[max(range(len(ids)), key=lambda j: scores[j])]
    if n % 50 == 49: print(n + 1, {k: f"{v / (n + 1):.3f}" for k, v in res.items()}, f"{time.time() - t:.0f}s", flush=True)
print("final", len(questions), {k: f"{v / len(questions):.3f}" for k, v in res.items()})
