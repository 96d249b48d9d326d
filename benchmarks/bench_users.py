"""Several users at once: answers per minute and each answer's time, one message at a time against decoding together.

    .venv/bin/python benchmarks/bench_users.py [--users 1,2,4,8] [--messages 2] [--precision auto]
                                               [--gather 0.01] [--torch-thread on|off] [--drafts auto|0,2]
                                               [--learning each,together] [--modes both:1,context:0]
                                               [--lines one-at-a-time,together] [--decode-precision fp32,bf16]
                                               [--json PATH]

On the sample corpus with the default models and chat settings, U users each send `--messages`
questions one after the other (the next when its answer is done), all U at once, through the
service's line as the app's handlers do (`Service.run`). Two lines, measured in one run, U after
U, alternating which goes first:

    one at a time   today's line: a message holds the model from its first step to its last token
    together        `Engine.decode_together`: a message decodes as rows of one batch with the
                    others (`batching`); it learns its own adapter, its steps in rounds with the
                    other messages' steps (`learning`), or with `--learning each` holds the
                    model's adapter for its steps while the next message waits

`--drafts 0,2` runs the together line once per draft length (guessed tokens checked in each
forward, `Compute.draft_tokens`; auto: the probe's choice), one at a time always without drafts;
`--learning each,together` runs it with each way of taking the steps. For each: answers per minute (all answers over the wall time), the median and worst whole answer
(from sending, waiting in the line included), the batch's mean rows per forward, the learners' mean steps per round, and whether every
answer is the one the same question gets alone (isolation). Target (issue 19): with 4 users,
answers per minute >= 2.5x one at a time, and no answer differs.

`--modes` runs every line with each chat mode (`mode` or `mode:α`, α the context-aware decoding's
weight; default: the chat defaults), the modes interleaved; with more than one, each line's median
whole answer is also printed against the last mode's in the same line and user count. One user,
`--modes both:1,context:0 --lines together` is issue 19's bar for one message as `app.py` answers
it: the default within 1.3x of reading with plain greedy decoding, and within 3 s.
`--decode-precision fp32,bf16` runs every line with the decoding's base products in each (the
steps and prefill as the probe chose); each answer is then compared with its question's answer
alone at the same precision.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent

from sift_chat import config, torch_thread  # noqa: E402
from sift_chat.access import Caller  # noqa: E402
from sift_chat.corpus import ingest  # noqa: E402
from sift_chat.engine import Engine  # noqa: E402
from sift_chat.settings import ChatSettings
from sift_chat.models import load_chat_model, load_embedder  # noqa: E402
from sift_chat.probe import probe  # noqa: E402
from sift_chat.service import Answered, Service  # noqa: E402
from sift_chat.store import Store  # noqa: E402

from bench_message import PROMPTS as MESSAGE_PROMPTS  # noqa: E402  (this folder is on the path when run)

PROMPTS = [
    *MESSAGE_PROMPTS,
    "Which river runs through Brindlemoor?",
    "What does the lighthouse keeper do in winter?",
    "What is the glassworks known for?",
]


def ask(service: Service, user: int, prompt: str, settings: ChatSettings) -> dict:
    caller = Caller(f"user:bench{user}", f"bench{user}")
    started = time.perf_counter()
    answered = None
    for event in service.run(service.new_turn(caller.owner), prompt, [], settings, caller=caller):
        if isinstance(event, Answered):
            answered = event
    return {"prompt": prompt, "answer": answered.raw_answer, "whole": time.perf_counter() - started,
            "steps": len(answered.record.losses)}


class Line(NamedTuple):
    """One way of serving the users: the line, drafts, how steps are taken, the mode (index into
    the modes) and the decoding's precision."""

    kind: str  # "one at a time" or "together"
    drafts: int
    learning: str  # "each" or "together"
    mode: int
    decode: str


def mode_settings(spec: str, base: ChatSettings) -> ChatSettings:
    """"both:1" → the chat defaults in mode both at α = 1; "default" → the defaults."""
    if spec == "default":
        return base
    mode, _, alpha = spec.partition(":")
    return replace(base, mode=mode, **({"context_contrast": float(alpha)} if alpha else {}))


def mode_label(settings: ChatSettings) -> str:
    return f"{settings.mode} α={settings.context_contrast:g}"


def run_line(service: Service, users: int, messages: int, settings: ChatSettings) -> dict:
    """U users at once, each asking `messages` questions in turn; every answer and the wall time."""
    results: list[dict] = []
    failures: list[BaseException] = []

    def user(index: int) -> None:
        try:
            for m in range(messages):
                results.append(ask(service, index, PROMPTS[(index + m * users) % len(PROMPTS)], settings))
        except BaseException as error:  # reported after the run
            failures.append(error)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise failures[0]
    return {"wall": wall, "answers": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", default="1,2,4,8")
    parser.add_argument("--messages", type=int, default=2, help="questions each user sends, one after the other")
    parser.add_argument("--precision", default="auto", help="auto (the probe's choice), fp32 or bf16")
    parser.add_argument("--gather", type=float, default=0.01, help="seconds a batch's forward waits for stragglers")
    parser.add_argument("--max-new-tokens", type=int, default=ChatSettings.max_new_tokens)
    parser.add_argument("--torch-thread", choices=("on", "off"), default="on",
                        help="on: every forward on the models' one thread, as app.py runs (torch_thread); "
                             "off: on each user's own thread (default: %(default)s)")
    parser.add_argument("--drafts", default="auto",
                        help="comma-separated draft lengths for the together line, or auto: the probe's (default: %(default)s)")
    parser.add_argument("--learning", default="together",
                        help="comma-separated: together (the steps of several messages in one round), each "
                             "(a message's steps on the model's adapter), for the together line (default: %(default)s)")
    parser.add_argument("--modes", default="default",
                        help="comma-separated chat modes, each mode or mode:α (default: the chat defaults)")
    parser.add_argument("--decode-precision", default="auto",
                        help="comma-separated: fp32, bf16 (each line run at each), or auto: the probe's (default: %(default)s)")
    parser.add_argument("--lines", default="one-at-a-time,together",
                        help="comma-separated: one-at-a-time, together (default: %(default)s)")
    parser.add_argument("--json", help="also write every answer here")
    args = parser.parse_args()
    counts = [int(u) for u in args.users.split(",") if u.strip()]
    base = ChatSettings(max_new_tokens=args.max_new_tokens)
    modes = [mode_settings(spec.strip(), base) for spec in args.modes.split(",") if spec.strip()]
    line_kinds = {w.strip() for w in args.lines.split(",") if w.strip()}
    if not line_kinds or line_kinds - {"one-at-a-time", "together"}:
        parser.error(f"--lines: one-at-a-time and/or together, got {args.lines!r}")

    if args.torch_thread == "on":
        torch_thread.enable()
    embedder = torch_thread.run(load_embedder, config.DEFAULT_EMBEDDER, None)
    model, tokenizer = torch_thread.run(load_chat_model, config.DEFAULT_CHAT_MODEL, None, config.data_dir() / "models")
    with tempfile.TemporaryDirectory() as folder, Store(Path(folder) / "store") as store:
        torch_thread.run(ingest, store, embedder, [ROOT / "corpora" / "brindlemoor"],
                         embedder_name=config.DEFAULT_EMBEDDER, progress=False)
        engine = Engine(store, embedder, model, tokenizer, embedder_name=config.DEFAULT_EMBEDDER)
        engine.compute = torch_thread.run(probe, engine.model, config.data_dir(),
                                          None if args.precision == "auto" else args.precision)
        print(engine.compute.describe())
        probed = engine.compute
        drafts = ([probed.draft_tokens] if args.drafts == "auto" else
                  [int(d) for d in args.drafts.split(",") if d.strip()])
        learning = [w.strip() for w in args.learning.split(",") if w.strip()]
        if not learning or set(learning) - {"each", "together"}:
            parser.error(f"--learning: each and/or together, got {args.learning!r}")
        decodes = ([probed.decode_precision] if args.decode_precision == "auto" else
                   [p.strip() for p in args.decode_precision.split(",") if p.strip()])
        if set(decodes) - {"fp32", "bf16"}:
            parser.error(f"--decode-precision: fp32 and/or bf16, or auto, got {args.decode_precision!r}")
        lines = [*((Line("one at a time", 0, "each", m, p) for m in range(len(modes)) for p in decodes)
                   if "one-at-a-time" in line_kinds else ()),
                 *(Line("together", d, w, m, p) for d in drafts for w in learning for m in range(len(modes))
                   for p in decodes if "together" in line_kinds)]
        service = Service(engine, Path(folder), max_waiting=64)
        alone = {}
        for p in decodes:  # warm-up, and each question's answer alone (one at a time, the probe's drafts)
            engine.compute = replace(probed, decode_precision=p)
            for m, settings in enumerate(modes):
                for prompt in PROMPTS:
                    alone[m, p, prompt] = ask(service, 0, prompt, settings)["answer"]
        rows = []
        for index, users in enumerate(counts):
            measured = {}
            for line in (lines if index % 2 == 0 else lines[::-1]):
                engine.batch = engine.learning = None
                engine.compute = replace(probed, draft_tokens=line.drafts, decode_precision=line.decode)
                if line.kind == "together":
                    engine.decode_together(gather_seconds=args.gather, learn_together=line.learning == "together")
                run = run_line(service, users, args.messages, modes[line.mode])
                if engine.batch is not None:
                    run["rows_per_forward"] = engine.batch.rows_forwarded / max(engine.batch.forwards, 1)
                if engine.learning is not None:
                    run["steps_per_round"] = engine.learning.steps / max(engine.learning.rounds, 1)
                measured[line] = run
            for line in lines:
                run = measured[line]
                answers = run["answers"]
                wholes = [a["whole"] for a in answers]
                label = line.kind + (f", drafts of {line.drafts}" if line.drafts else "")
                if line.kind == "together" and len(learning) > 1:
                    label += ", steps " + ("in rounds" if line.learning == "together" else "one message at a time")
                if len(decodes) > 1:
                    label += f", decode {line.decode}"
                rows.append({"users": users, "count": index, "kind": line.kind, "line": label,
                             "mode": mode_label(modes[line.mode]), "decode": line.decode,
                             "wall": run["wall"],
                             "per_minute": 60 * len(answers) / run["wall"],
                             "median": statistics.median(wholes), "worst": max(wholes),
                             "rows_per_forward": run.get("rows_per_forward"),
                             "steps_per_round": run.get("steps_per_round"),
                             "differ": sum(a["answer"] != alone[line.mode, line.decode, a["prompt"]] for a in answers),
                             "answers": answers})
    one = {(r["count"], r["mode"], r["decode"]): r["per_minute"] for r in rows if r["kind"] == "one at a time"}
    reference = {(r["count"], r["line"]): r["median"] for r in rows if r["mode"] == mode_label(modes[-1])}
    print(f"\nsample corpus; default settings ({base.mode}, {base.passages} passages, "
          f"α={base.context_contrast:g} against the {base.contrast_against} model); "
          f"{args.messages} messages per user; gather {args.gather * 1000:g} ms; the models' thread {args.torch_thread}")
    print(f"| users | line | mode | answers per minute | vs one at a time | whole answer, median | vs {mode_label(modes[-1])} | worst | "
          "rows per forward | steps per round | answers not as alone |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rpf = f"{r['rows_per_forward']:.1f}" if r["rows_per_forward"] is not None else "-"
        spr = f"{r['steps_per_round']:.1f}" if r["steps_per_round"] is not None else "-"
        versus = one.get((r["count"], r["mode"], r["decode"]))
        throughput = f"{r['per_minute'] / versus:.2f}x" if versus else "-"
        print(f"| {r['users']} | {r['line']} | {r['mode']} | {r['per_minute']:.1f} | {throughput} | "
              f"{r['median']:.2f} s | {r['median'] / reference[r['count'], r['line']]:.2f}x | {r['worst']:.2f} s | "
              f"{rpf} | {spr} | {r['differ']} of {len(r['answers'])} |")
    if args.json:
        alone_by_mode = {f"{mode_label(settings)}, decode {p}": {prompt: alone[m, p, prompt] for prompt in PROMPTS}
                         for m, settings in enumerate(modes) for p in decodes}
        Path(args.json).write_text(json.dumps({"alone": alone_by_mode, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
