import json, math, sys
def load(paths, conf):
    out = {}
    for p in paths:
        for a in json.load(open(p))["answers"]:
            if a["configuration"] == conf: out[a["question_text"]] = a
    return out
def paired(a, b, label):
    common = sorted(set(a) & set(b)); n = len(common)
    d = [int(b[q]["correct"]) - int(a[q]["correct"]) for q in common]
    m = sum(d)/n; se = math.sqrt(sum((x-m)**2 for x in d)/(n-1)/n)
    pa = sum(a[q]["correct"] for q in common)/n; pb = sum(b[q]["correct"] for q in common)/n
    print(f"{label}: n={n} A {100*pa:.1f}% B {100*pb:.1f}% B-A {100*m:+.1f} ± {100*se:.1f} ({sum(x>0 for x in d)} better, {sum(x<0 for x in d)} worse)")
args = sys.argv[1:]
A = args[0].split(","); ca = args[1]; B = args[2].split(","); cb = args[3]
paired(load(A, ca), load(B, cb), args[4])
