"""Diagnostic (issue 18; README, Answers: "What it takes for a step to put a fact into an answer"): which step recipe puts a fact that was only learned (not read) into the answer?

For two-fact questions: select (SIFT or NN defaults), the lead is read; per recipe take steps, then
measure bits of each fact's span given the reference prefix (what the model would need to say), and
optionally generate the answer (CAD α=1 against base or adapted) and check the facts.

A recipe is KIND:LR:PASSES:WHICH — KIND passage | answer | readanswer | chat | sentence | readsentence (the pick's --sentences
sentences most like the question, each as the answer after the question, without or with the lead read) (what a step's loss is
on), PASSES over the picks, WHICH all | notlead | notleadK (the first K picks not read). E.g.

    sift-chat --data-dir /tmp/w ingest /tmp/world/documents
    python docs/answers/fact-steps/facts.py --data-dir /tmp/w --questions /tmp/world/two-fact-questions.jsonl \
        --only-learned --sample 4 --recipes base,passage:3e-3:4:notlead,passage:3e-3:8:notlead --generate 40
"""
import argparse, json, math, random, sys, time
from dataclasses import replace
import torch
import torch.nn.functional as F

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from sift_chat.engine import Engine
from sift_chat.settings import ChatSettings
from sift_chat.answers import is_correct, continuation_bits
from sift_chat.generation import conversation


def span_start(reference, accepted):
    """Where the fact's words begin in the reference: the accepted answer, with a first name
    before it ("by Viggo Hallor": the span is "Viggo Hallor")."""
    low = reference.lower()
    for a in accepted:
        i = low.find(a.lower())
        if i >= 0:
            words = reference[:i].split()
            if len(words) >= 2 and words[-1][:1].isupper() and words[-2] in ("is", "by", "was"):
                j = i - len(words[-1]) - 1
                return j, reference[j:i] + a
            return i, a
    return None, None


@torch.no_grad()
def span_bits(engine, input_ids, prefix, span):
    tok = engine.tokenizer
    if prefix.endswith(" "):
        prefix, span = prefix[:-1], " " + span
    pre = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    target = tok(span, add_special_tokens=False)["input_ids"]
    full = pre + target
    n = len(target)
    ids = torch.cat([input_ids[0], torch.tensor(full)])[None]
    logits = engine.model(input_ids=ids, use_cache=False, logits_to_keep=n + 1).logits[0, :-1].float()
    nats = F.cross_entropy(logits, torch.tensor(full[-n:]), reduction="sum")
    return float(nats) / math.log(2)


SENTENCES_PER_PICK = 1


def best_sentences(engine, prompt, text, k):
    import re
    sentences = [x.strip() for x in re.split(r"(?<=[.!?])\s+", text) if len(x.split()) >= 3]
    if len(sentences) <= k:
        return sentences
    q = engine.embed(prompt)
    scores = [float(engine.embed(x) @ q) for x in sentences]
    order = sorted(range(len(sentences)), key=lambda i: -scores[i])[:k]
    return [sentences[i] for i in sorted(order)]


def set_lr(adapter, lr):
    for g in adapter.optimizer.param_groups:
        g["lr"] = lr


def recipe_steps(engine, name, prompt, picks, lead, settings):
    a = engine.adapter
    a.reset()
    texts = [p.passage.text for p in picks]
    render = engine.template.render
    if name == "base":
        return
    kind, lr, epochs, which = name.split(":")
    lr, epochs = float(lr), int(epochs)
    set_lr(a, lr)
    if which.startswith("notlead"):
        texts = [t for p, t in zip(picks, texts) if p.passage.id != lead.id]
        if which != "notlead":
            texts = texts[:int(which[len("notlead"):])]
    for _ in range(epochs):
        for t in texts:
            flat = " ".join(t.split())
            if kind == "passage":
                a.step(t)
            elif kind == "answer":
                a.step(flat, render(conversation(prompt, [], []), True))
            elif kind == "readanswer":
                a.step(flat, render(conversation(prompt, [], [" ".join(lead.text.split())]), True))
            elif kind in ("sentence", "readsentence"):
                # the pick's sentences most like the question, each as the answer to it (loss on it only)
                prefix = render(conversation(prompt, [], [] if kind == "sentence" else [" ".join(lead.text.split())]), True)
                for sentence in best_sentences(engine, prompt, flat, SENTENCES_PER_PICK):
                    a.step(sentence, prefix)
            elif kind == "chat":
                from sift_chat.generation import training_text
                pre, tx = training_text(prompt, t, "chat", render)
                a.step(tx, pre)
            else:
                raise ValueError(kind)


def main():
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", default="/tmp/le-world/two-fact-questions.jsonl")
    ap.add_argument("--sample", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="sift")
    ap.add_argument("--recipes", default="base,passage:1e-3:1:all")
    ap.add_argument("--generate", type=int, default=0)
    ap.add_argument("--sentences", type=int, default=1, help="sentence recipes: sentences per pick")
    ap.add_argument("--against", default="base")
    ap.add_argument("--only-learned", action="store_true", help="keep questions whose missing fact is in a non-lead pick")
    ap.add_argument("--out", default=None)
    ap.add_argument("--data-dir", required=True, help="a store holding the world's documents (sift-chat ingest)")
    args = ap.parse_args()
    global SENTENCES_PER_PICK
    SENTENCES_PER_PICK = args.sentences
    engine = Engine.load(args.data_dir)
    qs = [json.loads(l) for l in open(args.questions)]
    random.Random(args.seed).shuffle(qs)
    settings = ChatSettings(method=args.method, mode="both", max_new_tokens=args.generate or 64,
                            contrast_against=args.against)
    recipes = args.recipes.split(",")
    rows = []
    for q in qs:
        if len(rows) >= args.sample:
            break
        facts = q.get("facts") or [q["answers"]]
        prompt = q["question"]
        query = engine.embed(prompt)
        sel = engine.select(query, settings, prompt=prompt)
        lead = sel.lead
        town = q["town"]
        def holds(text, acc):
            return is_correct(text, acc) and is_correct(text, [town])
        where = []
        for acc in facts:
            if holds(lead.text, acc):
                where.append("read")
            elif any(holds(p.passage.text, acc) for p in sel.picks):
                where.append("learned")
            else:
                where.append("none")
        if args.only_learned and "learned" not in where:
            continue
        input_ids = engine.chat_input(prompt, [], [lead], settings)[0]
        unread = engine.chat_input(prompt, [], [], settings)[0]
        row = {"question": prompt, "where": where, "recipes": {}}
        for r in recipes:
            t0 = time.perf_counter()
            recipe_steps(engine, r, prompt, sel.picks, lead, settings)
            steps_s = time.perf_counter() - t0
            bits = []
            for acc in facts:
                i, a = span_start(q["reference"], acc)
                bits.append(span_bits(engine, input_ids, q["reference"][:i], a) if i is not None else float("nan"))
            ref_bits = continuation_bits(engine.model, engine.tokenizer, input_ids, q["reference"])
            out = {"fact_bits": bits, "ref_bits": ref_bits, "steps_s": steps_s}
            if args.generate:
                s2 = settings if r != "base" else replace(settings, contrast_against="adapted")
                gen = engine.generate(input_ids, s2, unread)
                pieces = []
                while True:
                    try:
                        pieces.append(next(gen))
                    except StopIteration as end:
                        raw = end.value[1]
                        break
                out["answer"] = raw
                out["stated"] = [is_correct(raw, acc) for acc in facts]
            engine.adapter.reset()
            row["recipes"][r] = out
            print(r, round(steps_s, 1), [round(b, 1) for b in bits], file=sys.stderr, flush=True)
        rows.append(row)
        print(json.dumps({"q": prompt, "where": where, **{r: [round(b, 1) for b in v["fact_bits"]] + ([v["stated"], v["answer"][:90]] if "answer" in v else []) for r, v in row["recipes"].items()}}), flush=True)
    if args.out:
        json.dump(rows, open(args.out, "w"), indent=1)
    # summary: mean fact bits of facts by where, per recipe; delta vs base
    print("\nrecipe | where | n | mean bits | Δ vs base (±se) | stated")
    for r in recipes:
        for w in ("read", "learned", "none"):
            vals, deltas, stated = [], [], []
            for row in rows:
                for k, wk in enumerate(row["where"]):
                    if wk != w:
                        continue
                    vals.append(row["recipes"][r]["fact_bits"][k])
                    if "base" in row["recipes"]:
                        deltas.append(row["recipes"][r]["fact_bits"][k] - row["recipes"]["base"]["fact_bits"][k])
                    if "stated" in row["recipes"][r]:
                        stated.append(row["recipes"][r]["stated"][k])
            if not vals:
                continue
            n = len(vals)
            m = sum(vals) / n
            if deltas:
                dm = sum(deltas) / n
                se = (sum((d - dm) ** 2 for d in deltas) / max(n - 1, 1) / n) ** 0.5
                dstr = f"{dm:+.2f} ± {se:.2f}"
            else:
                dstr = ""
            st = f"{sum(stated)}/{len(stated)}" if stated else ""
            print(f"{r} | {w} | {n} | {m:.2f} | {dstr} | {st}")
        acc = [all(row["recipes"][r].get("stated", [False])) for row in rows if "stated" in row["recipes"][r]]
        if acc:
            print(f"{r}: all facts stated {sum(acc)}/{len(acc)}")


main()
