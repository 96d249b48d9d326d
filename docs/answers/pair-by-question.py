"""Pair an eval-qa run with reference runs by question text (a configuration, "both sift" unless
given): accuracy, answer bits, steps.

    .venv/bin/python docs/answers/pair-by-question.py docs/answers/mr02-w1/answers.json \\
        docs/answers/g08-w1/answers.json,docs/answers/g08-w1-rest/answers.json ["context sift"]
"""
import json, sys, math, statistics
def load(paths, config):
    out = {}
    for p in paths:
        d = json.load(open(p))
        for a in d["answers"]:
            if a["configuration"] == config:
                out[a["question_text"]] = a
    return out
config = sys.argv[3] if len(sys.argv) > 3 else "both sift"
new = load([sys.argv[1]], config)
ref = load(sys.argv[2].split(","), config)
common = [q for q in new if q in ref]
diff = [int(new[q]["correct"]) - int(ref[q]["correct"]) for q in common]
n = len(common)
mean = sum(diff) / n; sd = statistics.pstdev(diff)
print(f"paired {n}: new {100*sum(new[q]['correct'] for q in common)/n:.1f}% ref {100*sum(ref[q]['correct'] for q in common)/n:.1f}% "
      f"diff {100*mean:+.1f} ± {100*sd/math.sqrt(n):.1f} (better {diff.count(1)}, worse {diff.count(-1)})")
bits = [new[q]["bits"] - ref[q]["bits"] for q in common]
print(f"bits new - ref {statistics.mean(bits):+.3f} ± {statistics.pstdev(bits)/math.sqrt(n):.3f}")
fewer = [q for q in common if new[q]["steps"] < ref[q]["steps"]]
same = [q for q in common if new[q]["steps"] == ref[q]["steps"]]
print(f"steps new {statistics.mean(new[q]['steps'] for q in common):.2f} ref {statistics.mean(ref[q]['steps'] for q in common):.2f}; fewer steps on {len(fewer)}")
print(f"same steps: answers identical {sum(new[q]['answer'] == ref[q]['answer'] for q in same)} of {len(same)}")
d2 = [int(new[q]["correct"]) - int(ref[q]["correct"]) for q in fewer]
if fewer:
    print(f"fewer steps: new {100*sum(new[q]['correct'] for q in fewer)/len(fewer):.1f}% ref {100*sum(ref[q]['correct'] for q in fewer)/len(fewer):.1f}% better {d2.count(1)} worse {d2.count(-1)}")
    b2 = [new[q]["bits"] - ref[q]["bits"] for q in fewer]
    print(f"fewer steps bits {statistics.mean(b2):+.3f} ± {statistics.pstdev(b2)/math.sqrt(len(b2)):.3f}")
sec = lambda run: statistics.median(run[q]["seconds"] for q in common)
print(f"median seconds new {sec(new):.2f} ref {sec(ref):.2f}")
