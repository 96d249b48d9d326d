"""Paired differences between configurations of eval-qa answers.json files, matched by question text."""
import json, math, sys

def load(path, configuration):
    d = json.load(open(path))
    return {a["question_text"]: a for a in d["answers"] if a["configuration"] == configuration}

def paired(a, b, label):
    common = sorted(set(a) & set(b))
    n = len(common)
    acc_a = [a[q]["correct"] for q in common]; acc_b = [b[q]["correct"] for q in common]
    d = [int(y) - int(x) for x, y in zip(acc_a, acc_b)]
    mean = sum(d) / n; se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    bits = [b[q]["bits"] - a[q]["bits"] for q in common]
    bm = sum(bits) / n; bse = math.sqrt(sum((x - bm) ** 2 for x in bits) / (n - 1) / n)
    secs_a = sorted(a[q]["seconds"] for q in common); secs_b = sorted(b[q]["seconds"] for q in common)
    print(f"{label}: n={n} A {100*sum(acc_a)/n:.1f}% B {100*sum(acc_b)/n:.1f}% B-A {100*mean:+.1f} ± {100*se:.1f} "
          f"({sum(x > 0 for x in d)} better, {sum(x < 0 for x in d)} worse); bits B-A {bm:+.2f} ± {bse:.2f} "
          f"(lower on {sum(x < 0 for x in bits)}); median s A {secs_a[n//2]:.2f} B {secs_b[n//2]:.2f}")

if __name__ == "__main__":
    pa, ca, pb, cb, label = sys.argv[1:6]
    paired(load(pa, ca), load(pb, cb), label)
