"""Forwards and decoding seconds with and without drafts, 8 questions, one thread (README: Drafts).

    OMP_NUM_THREADS=1 .venv/bin/python docs/answers/drafts-forwards.py context [CORPUS QUESTIONS]

Uses the eval-qa store of CORPUS (run eval-qa on it once first)."""
import json, time, statistics, sys
from pathlib import Path
import torch
from sift_chat import config, decoding
from sift_chat.engine import Engine
from sift_chat.settings import ChatSettings
from sift_chat.events import Done
from sift_chat.models import load_chat_model, load_embedder
from sift_chat.probe import Compute
from sift_chat.store import Store
import hashlib
torch.set_num_threads(1)
home = config.data_dir()
corpus = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/le-world/documents")
store = Store(home / "eval-qa" / f"{corpus.name}-{hashlib.sha1(str(corpus).encode()).hexdigest()[:8]}")
emb = load_embedder(config.DEFAULT_EMBEDDER, "cpu")
model, tok = load_chat_model(None, "cpu", home / "models")
engine = Engine(store, emb, model, tok, embedder_name=config.DEFAULT_EMBEDDER)
qs = [json.loads(l)["question"] for l in open(sys.argv[3] if len(sys.argv) > 3 else "/tmp/le-world/questions.jsonl")][:8]
calls = []
real = decoding.forward_last
decoding.forward_last = lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw)
mode = sys.argv[1]
for d in (0, 2, 0, 2):
    engine.compute = Compute(draft_tokens=d)
    ts, fw, toks = [], 0, 0
    for q in qs:
        calls.clear()
        t = time.perf_counter()
        done = [e for e in engine.respond(q, settings=ChatSettings(mode=mode, max_new_tokens=64)) if isinstance(e, Done)][0]
        ts.append(done.record.seconds["generate"])
        fw += len(calls); toks += len(tok(done.raw_answer, add_special_tokens=False)["input_ids"])
    print(mode, "drafts", d, "generate s", round(sum(ts), 2), "forwards", fw, "tokens", toks, flush=True)
