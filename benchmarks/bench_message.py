"""Message latency by stage, per mode, on the sample corpus and the default models.

    .venv/bin/python benchmarks/bench_message.py [--corpus sample|stdlib|world] [--modes default,context] [--contrast 0,1]
                                                 [--on-demand] [--precision fp32,bf16] [--steps each,together]
                                                 [--drafts 0,2] [--read 1,3] [--min-reduction none,0.02]
                                                 [--prompts N] [--json PATH]

On the sample corpus the passages are short (about 50 tokens); `--corpus stdlib` uses 60 files of
the Python standard library instead, whose passages are full length (192 embedder tokens);
`--corpus world` the generated world of the answer evaluations (`make-world`, seed 0), its
two-fact and single-fact questions taken in turn as prompts: there several passages match a
question about as well, so the default reads up to three (`--read 1,3` times reading one against
the default's up to three, `ChatSettings.read_passages`).
For each mode (`default` is the chat default) and context-aware decoding strength α (`--contrast`,
default: the chat default), prints the median seconds of each stage (embed,
select, fine-tune, first token from sending, generation, the whole answer from sending to its
last token), the median answer length in tokens and how answers ended, over a few prompts after
one warm-up message; and each row's whole answer against plain `context` (α = 0), measured in the
same run. The engine decodes as the probe's default does (fp32, one thread, the two conversations
of context-aware decoding in one forward per token); `--on-demand` adds each row with α > 0 again
with the second conversation a forward only where the contrast can change the token
(`Compute.contrast_on_demand`). `--precision fp32,bf16` runs every row at each precision (bf16:
the base matmuls of the steps and the prefill on kept bf16 copies, decoding in fp32, as the probe
chooses where bf16 matmuls measure faster and a bf16 decoding step does not); `--steps
each,together` runs the modes that learn with a step per passage and with one step on the passages
together (`AdaptationSettings.together`); `--drafts 0,2` runs every row without and with drafts of
that many tokens guessed from what the answer reads (`Compute.draft_tokens`, prompt lookup), and
says whether the answers with drafts are those without. Targets on 2 CPU cores: the whole answer within 10 s on the sample corpus with the
defaults, and no default costing more than 2x plain `context`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from sift_chat import config  # noqa: E402
from sift_chat.adaptation import AdaptationSettings  # noqa: E402
from sift_chat.corpus import ingest  # noqa: E402
from sift_chat.engine import Engine  # noqa: E402
from sift_chat.settings import ChatSettings
from sift_chat.events import Done  # noqa: E402
from sift_chat.models import load_chat_model, load_embedder  # noqa: E402
from sift_chat.probe import Compute  # noqa: E402
from sift_chat.store import Store  # noqa: E402
from sift_chat.world import write_world  # noqa: E402

CODE_PROMPTS = [
    "How does json.dumps handle the indent argument?",
    "What does textwrap.dedent do with lines that contain only whitespace?",
    "How does the bisect module insert an item into a sorted list?",
    "How does shlex split a command line with quotes?",
    "What does functools.lru_cache do when maxsize is None?",
]
PROMPTS = [
    "Who founded Brindlemoor and who keeps the lighthouse?",
    "When is the lantern festival and what is eaten there?",
    "How many people live in Brindlemoor, and when does the ferry leave?",
    "What are the bottles of the glassworks coloured with?",
    "Tell me about the history of the town.",
]


def answer(engine, prompt: str, settings: ChatSettings, adaptation: AdaptationSettings | None = None) -> dict:
    started = time.perf_counter()
    done = [e for e in engine.respond(prompt, settings=settings, adaptation=adaptation) if isinstance(e, Done)][0]
    whole = time.perf_counter() - started
    tokens = len(engine.tokenizer(done.raw_answer, add_special_tokens=False)["input_ids"])
    return done.record.seconds | {"whole": whole, "steps": len(done.record.losses), "tokens": tokens,
                                  "read": len(done.record.read),
                                  "ended": done.ended, "answer": done.raw_answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=("sample", "stdlib", "world"), default="sample")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--device", default=None)
    parser.add_argument("--modes", default="default,context",
                        help="comma-separated chat modes; default is the chat default (default: %(default)s)")
    parser.add_argument("--passages", type=int, default=ChatSettings.passages,
                        help="passages selected, one step each in the fine-tuning modes (default: %(default)s)")
    parser.add_argument("--contrast", default=f"0,{ChatSettings.context_contrast:g}",
                        help="comma-separated α of context-aware decoding, each run with every mode "
                             "(default: %(default)s)")
    parser.add_argument("--on-demand", action="store_true",
                        help="also each row with α > 0 with the contrast on demand")
    parser.add_argument("--precision", default="fp32",
                        help="comma-separated: fp32, bf16 (steps and prefill), each run with every row (default: %(default)s)")
    parser.add_argument("--steps", default="each", help="comma-separated: each, together (default: %(default)s)")
    parser.add_argument("--drafts", default="0", help="comma-separated draft lengths, each run with every row (default: %(default)s)")
    parser.add_argument("--read", default=str(ChatSettings.read_passages),
                        help="comma-separated: passages read at most, each run with every row (default: %(default)s)")
    parser.add_argument("--min-reduction", default="default",
                        help="comma-separated: each modes that learn run with every row, stopping the selection when a "
                             "pick would remove less than this share of σ₀² (none: 4 picks always; default: the chat's)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    modes = [ChatSettings.mode if m == "default" else m for m in args.modes.split(",") if m.strip()]
    strengths = [float(a) for a in args.contrast.split(",") if a.strip()]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        parser.error(f"--precision: fp32 and/or bf16, got {args.precision!r}")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if not steps or set(steps) - {"each", "together"}:
        parser.error(f"--steps: each and/or together, got {args.steps!r}")
    drafts = [int(d) for d in args.drafts.split(",") if d.strip()]
    rows = list(dict.fromkeys((mode, strength, False, p, how, 0) for p in precisions for how in steps for mode in modes
                              for strength in strengths if how == "each" or mode in ("both", "fine-tune")))
    rows += [(mode, strength, True, p, how, 0) for mode, strength, _, p, how, _ in rows if args.on_demand and strength > 0]
    reads = [int(r) for r in args.read.split(",") if r.strip()]
    stops = [ChatSettings.min_reduction if m.strip() == "default" else None if m.strip() == "none" else float(m)
             for m in args.min_reduction.split(",") if m.strip()]
    rows = [(*row[:5], d, r, m) for row in rows for d in drafts for r in reads
            for m in (stops if row[0] in ("both", "fine-tune") else [ChatSettings.min_reduction])]
    rows = list(dict.fromkeys(rows))
    reference = ("context", 0.0, False, precisions[0], "each", drafts[0], reads[0], ChatSettings.min_reduction)

    def settings_of(row) -> ChatSettings:
        return ChatSettings(mode=row[0], context_contrast=row[1], passages=args.passages, read_passages=row[6],
                            min_reduction=row[7])

    def label(row) -> str:
        return (f"{row[0]} α={row[1]:g}{', on demand' if row[2] else ''}{', ' + row[3] if len(precisions) > 1 else ''}"
                f"{', steps together' if row[4] == 'together' else ''}{f', drafts of {row[5]}' if row[5] else ''}"
                f"{f', read {row[6]} at most' if len(reads) > 1 else ''}"
                f"{f', min reduction {row[7]}' if len(stops) > 1 and row[0] in ('both', 'fine-tune') else ''}")

    def adaptation_of(row) -> AdaptationSettings:
        return AdaptationSettings(together=row[4] == "together")

    embedder = load_embedder(config.DEFAULT_EMBEDDER, args.device)
    model, tokenizer = load_chat_model(config.DEFAULT_CHAT_MODEL, args.device, config.data_dir() / "models")
    with tempfile.TemporaryDirectory() as folder, Store(Path(folder) / "store") as store:
        if args.corpus == "stdlib":
            stdlib = Path(sysconfig.get_paths()["stdlib"])
            paths, prompts = sorted(stdlib.glob("*.py"))[:60], CODE_PROMPTS
            paths += [stdlib / name for name in ("json/encoder.py", "textwrap.py", "bisect.py", "shlex.py",
                                                 "functools.py") if (stdlib / name) not in paths]
        elif args.corpus == "world":
            questions = write_world(Path(folder) / "world", seed=0)
            two_fact = questions.with_name("two-fact-questions.jsonl")
            pairs = zip(*(p.read_text().splitlines() for p in (two_fact, questions)))
            paths, prompts = [Path(folder) / "world" / "documents"], [json.loads(q)["question"]
                                                                       for pair in pairs for q in pair]
        else:
            paths, prompts = [ROOT / "corpora" / "brindlemoor"], PROMPTS
        ingest(store, embedder, paths, embedder_name=config.DEFAULT_EMBEDDER, progress=False)
        engine = Engine(store, embedder, model, tokenizer, embedder_name=config.DEFAULT_EMBEDDER)
        runs = {row: [] for row in rows}
        answer(engine, prompts[0], settings_of(rows[0]))  # warm-up
        for prompt in prompts[: args.prompts]:  # rows interleaved: all see the same machine load
            for row in rows:
                engine.compute = Compute(row[3], "fp32", 1, contrast_on_demand=row[2], draft_tokens=row[5])
                runs[row].append(answer(engine, prompt, settings_of(row), adaptation_of(row)))
        store_size = store.passage_count()
    stages = ["embed", "select", "fine-tune", "first_token", "generate", "whole", "tokens", "read"]
    medians = {row: {stage: statistics.median(run.get(stage, 0.0) for run in runs[row]) for stage in stages}
               for row in rows}
    settings, adaptation = ChatSettings(passages=args.passages), AdaptationSettings()
    print(f"corpus {args.corpus} ({store_size} passages); {settings.passages} passages ({settings.method}), "
          f"{settings.read_passages} read in context; LoRA rank {adaptation.rank} on "
          f"{adaptation.top_layers or 'all'} layers, training on the {adaptation.training}; "
          f"{settings.max_new_tokens} new tokens max; median of {min(args.prompts, len(prompts))} prompts; default mode "
          f"{settings.mode} (α={settings.context_contrast:g}); device {engine.adapter.device}")
    print("| mode | embed | select | fine-tune | first token | generate | whole answer | vs context α=0 | "
          "answer tokens | passages read, mean | steps, mean | ended | answers as without drafts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        m = medians[row]
        ratio = f"{m['whole'] / medians[reference]['whole']:.2f}x" if reference in medians else "-"
        ended = ", ".join(f"{n} {how}" for how, n in Counter(r["ended"] for r in runs[row]).items())
        undrafted = runs.get((*row[:5], 0, *row[6:]))
        same = (f"{sum(a['answer'] == b['answer'] for a, b in zip(runs[row], undrafted))} of {len(undrafted)}"
                if row[5] and undrafted else "")
        print(f"| {label(row)} | {m['embed']:.2f} | {m['select']:.2f} | {m['fine-tune']:.2f} | {m['first_token']:.2f} | "
              f"{m['generate']:.2f} | {m['whole']:.2f} | {ratio} | {m['tokens']:g} | "
              f"{statistics.mean(r['read'] for r in runs[row]):.2f} | {statistics.mean(r['steps'] for r in runs[row]):.2f} | "
              f"{ended} | {same} |")
    default = medians.get((settings.mode, settings.context_contrast, False, precisions[0], "each", drafts[0],
                           settings.read_passages, settings.min_reduction))
    if default:
        print(f"\ntarget: whole answer with the defaults <= 10 s: {'met' if default['whole'] <= 10 else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps({label(row): {"median": medians[row], "runs": runs[row]}
                                               for row in rows}, indent=2))


if __name__ == "__main__":
    main()
