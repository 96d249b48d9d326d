"""Message latency by stage with the default settings, on the sample corpus and the default models.

    .venv/bin/python benchmarks/bench_message.py [--corpus stdlib] [--mode both] [--prompts N] [--json PATH]

On the sample corpus the passages are short (about 50 tokens); `--corpus stdlib` uses 60 files of
the Python standard library instead, whose passages are full length (192 embedder tokens).
Prints the median seconds of each stage (embed, select, fine-tune, first token from sending,
whole generation) over a few prompts, after one warm-up message. Target on 2 CPU cores: the
first answer token within 15 s of sending.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from sift_chat import config  # noqa: E402
from sift_chat.corpus import ingest  # noqa: E402
from sift_chat.engine import ChatSettings, Done, Engine  # noqa: E402
from sift_chat.models import load_chat_model, load_embedder  # noqa: E402
from sift_chat.store import Store  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=("sample", "stdlib"), default="sample")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--device", default=None)
    parser.add_argument("--mode", default=ChatSettings.mode, help="chat mode (default: %(default)s)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    settings = ChatSettings(mode=args.mode)
    embedder = load_embedder(config.DEFAULT_EMBEDDER, args.device)
    model, tokenizer = load_chat_model(config.DEFAULT_CHAT_MODEL, args.device, config.data_dir() / "models")
    with tempfile.TemporaryDirectory() as folder, Store(folder) as store:
        if args.corpus == "stdlib":
            stdlib = Path(sysconfig.get_paths()["stdlib"])
            paths, prompts = sorted(stdlib.glob("*.py"))[:60], CODE_PROMPTS
            paths += [stdlib / name for name in ("json/encoder.py", "textwrap.py", "bisect.py", "shlex.py",
                                                 "functools.py") if (stdlib / name) not in paths]
        else:
            paths, prompts = [ROOT / "corpora" / "brindlemoor"], PROMPTS
        ingest(store, embedder, paths, embedder_name=config.DEFAULT_EMBEDDER, progress=False)
        engine = Engine(store, embedder, model, tokenizer, embedder_name=config.DEFAULT_EMBEDDER)
        runs = []
        for prompt in [prompts[0], *prompts[: args.prompts]]:  # the first one warms up
            done = [e for e in engine.respond(prompt, settings=settings) if isinstance(e, Done)][0]
            runs.append(done.record.seconds | {"steps": len(done.record.losses)})
        runs = runs[1:]
        store_size = store.passage_count()
    stages = ["embed", "select", "fine-tune", "first_token", "generate"]
    medians = {stage: statistics.median(run.get(stage, 0.0) for run in runs) for stage in stages}
    adaptation = engine.adapter.settings
    print(f"corpus {args.corpus} ({store_size} passages); mode {settings.mode}, {settings.passages} passages ({settings.method}), LoRA rank {adaptation.rank} on "
          f"{adaptation.top_layers or 'all'} layers, {adaptation.max_passage_tokens} tokens/passage, "
          f"{settings.max_new_tokens} new tokens max; median of {len(runs)} prompts, device "
          f"{engine.adapter.device}")
    print("| stage | seconds |")
    print("|---|---|")
    for stage in stages:
        label = "first token (from sending)" if stage == "first_token" else stage
        print(f"| {label} | {medians[stage]:.2f} |")
    print(f"\ntarget: first token <= 15 s: {'met' if medians['first_token'] <= 15 else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"median": medians, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
