"""Both facts among what is read: the first R fused candidates vs the lead + SIFT picks (reading order)."""
import hashlib, sys
from pathlib import Path
import torch
from sift_chat import config
from sift_chat.answers import load_questions, is_correct
from sift_chat.models import load_embedder
from sift_chat.retrieval import preselect
from sift_chat.selection import select
from sift_chat.store import Store

corpus = Path("/tmp/le-world/documents").resolve()
store = Store(config.data_dir(None) / "eval-qa" / f"{corpus.name}-{hashlib.sha1(str(corpus).encode()).hexdigest()[:8]}")
embedder = load_embedder(config.embedder_name(None), "cpu")
for qfile in sys.argv[1:]:
    questions = load_questions(qfile)
    counts = {}
    for q in questions:
        query = embedder.encode(q.question, normalize_embeddings=True, convert_to_tensor=True).float().cpu()
        found = preselect(store, query.numpy(), q.question, 200)
        sift = select(query, torch.from_numpy(found.vectors), "sift", 4, 0.01).indices.tolist()
        ids = [int(i) for i in found.ids[:8]]
        order = [int(found.ids[0])] + [int(found.ids[i]) for i in sift if int(found.ids[i]) != int(found.ids[0])]
        ps = store.passages(list(set(ids + order)))
        held = lambda texts, acc: any(is_correct(t, acc) and is_correct(t, [q.subject]) for t in texts)
        for R in (1, 2, 3, 4):
            for name, seq in (("fused", ids), ("lead+sift", order)):
                texts = [ps[i].text for i in seq[:R]]
                ok = all(held(texts, acc) for acc in q.facts)
                counts[(name, R)] = counts.get((name, R), 0) + ok
    print(qfile, len(questions))
    for k, v in sorted(counts.items()):
        print(f"  {k[0]:10s} R={k[1]}: {v/len(questions):.1%}")
