"""The evaluation commands: `eval` (bits per byte after test-time fine-tuning, `evaluation`),
`eval-qa` (answer accuracy per mode and method, `answers`; --picks-only: where the facts are among
each method's picks) and `make-world` (the invented world they can run on, `world`)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from . import config
from .adaptation import TRAINING_FORMATS, AdaptationSettings
from .cli_common import add_reading_options, open_embedder, reading_settings
from .corpus import DEFAULT_PASSAGE_TOKENS
from .evaluation import SETTINGS as EVAL_SETTINGS
from .settings import ChatSettings
from .vocabulary import CONTRAST_TARGETS, EVAL_METHODS, EVAL_MODES


def add_eval_parsers(commands) -> None:
    """The eval and eval-qa commands, on the CLI's subparsers."""
    evaluate = commands.add_parser("eval", help="bits per byte of held-out documents after test-time fine-tuning")
    evaluate.add_argument("--corpus", required=True, help="a folder: split by document into pool and tests")
    evaluate.add_argument("--include", action="append", default=[], metavar="GLOB",
                          help="only files matching (e.g. '*.py'); repeatable")
    evaluate.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                          help="leave out files or folders matching (e.g. 'test*'); repeatable")
    evaluate.add_argument("--methods", default=",".join(EVAL_METHODS),
                          help="comma-separated, from %(default)s")
    evaluate.add_argument("--mode", choices=EVAL_MODES, default="fine-tune",
                          help="fine-tune on the picks, put them in context before the prompt, or both "
                               "(default: %(default)s)")
    evaluate.add_argument("--context-passages", type=int, default=4,
                          help="distinct picks put in context in the context modes (default: %(default)s)")
    evaluate.add_argument("--test-docs", type=int, default=20, help="test documents (default: %(default)s)")
    evaluate.add_argument("--setting", choices=EVAL_SETTINGS, default="held-out",
                          help="held-out: no test text in the pool (the paper's setting); personal: the test "
                               "documents stay in the pool, as a user's own documents do (default: %(default)s)")
    evaluate.add_argument("--measure-first", type=int,
                          help="measure only the first M test documents (same split and pool: for sweeps)")
    evaluate.add_argument("--steps", type=int, default=8, help="passages selected, one step each (default: %(default)s)")
    evaluate.add_argument("--prompt-tokens", type=int, default=128)
    evaluate.add_argument("--target-tokens", type=int, default=256)
    evaluate.add_argument("--candidates", type=int, default=200)
    evaluate.add_argument("--lam", type=float, default=0.01)
    evaluate.add_argument("--duplicate", type=int, default=1, help="repeat every pool passage K times")
    evaluate.add_argument("--min-reduction", type=float, help="adaptive stopping, as in chat")
    evaluate.add_argument("--alpha", type=float, help="adaptive stopping by activeft's rule, as in chat")
    evaluate.add_argument("--lr", type=float, default=AdaptationSettings.learning_rate)
    evaluate.add_argument("--rank", type=int, default=AdaptationSettings.rank)
    evaluate.add_argument("--top-layers", type=int, default=AdaptationSettings.top_layers)
    evaluate.add_argument("--targets", default=AdaptationSettings.target_modules,
                          help="LoRA targets: all-linear or attention (default: %(default)s)")
    evaluate.add_argument("--max-passage-tokens", type=int, default=AdaptationSettings.max_passage_tokens)
    evaluate.add_argument("--passage-tokens", type=int, default=DEFAULT_PASSAGE_TOKENS,
                          help="embedder tokens per pool passage")
    evaluate.add_argument("--together", action="store_true",
                          help="one step on all the picks together (their mean loss) instead of one per pick")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", default="eval-results", help="folder for results.md/.json and the plot")
    evaluate.add_argument("--quiet", action="store_true")

    qa = commands.add_parser("eval-qa", help="answer accuracy on questions with known answers, per mode and method")
    qa.add_argument("--corpus", required=True, help="the documents the questions are about (a folder)")
    qa.add_argument("--questions", required=True, help="JSONL: question, answers (accepted) or facts (the "
                    "accepted answers of each fact the answer must state), reference")
    qa.add_argument("--modes", default="off,fine-tune,context,both", help="comma-separated (default: %(default)s)")
    qa.add_argument("--methods", default="nn,sift", help="comma-separated (default: %(default)s)")
    qa.add_argument("--limit", type=int, help="only the first N questions (after --sample)")
    qa.add_argument("--sample", type=int, help="a seeded random sample of N questions")
    qa.add_argument("--picks-only", action="store_true",
                    help="no answers: where each question's facts are among each method's picks (fast, "
                         "no chat model); picks.md and picks.json")
    qa.add_argument("--max-minutes", type=float,
                    help="start no question after this long (the first always runs): report those answered by then")
    qa.add_argument("-n", "--passages", type=int, default=ChatSettings.passages)
    add_reading_options(qa, "--read-passages", "--context-passages")
    qa.add_argument("--lam", type=float, default=ChatSettings.lam)
    qa.add_argument("--min-reduction", type=float, default=ChatSettings.min_reduction,
                    help="stop selecting when a pick would remove less than this share of σ₀² (default: %(default)s)")
    qa.add_argument("--max-new-tokens", type=int, default=ChatSettings.max_new_tokens)
    qa.add_argument("--repetition-penalty", type=float, default=ChatSettings.repetition_penalty)
    qa.add_argument("--no-repeat-ngram", type=int, default=ChatSettings.no_repeat_ngram)
    qa.add_argument("--context-contrast", type=float, default=ChatSettings.context_contrast,
                    help="α of context-aware decoding (0: off; default %(default)s)")
    qa.add_argument("--contrast-against", choices=CONTRAST_TARGETS, default=ChatSettings.contrast_against,
                    help="the conversation without the passages under the adapted or the base model "
                         "(default: %(default)s)")
    qa.add_argument("--lr", type=float, default=AdaptationSettings.learning_rate)
    qa.add_argument("--top-layers", type=int, default=AdaptationSettings.top_layers)
    qa.add_argument("--targets", default=AdaptationSettings.target_modules)
    qa.add_argument("--epochs", type=int, default=AdaptationSettings.epochs,
                    help="passes over the selected passages (default: %(default)s)")
    qa.add_argument("--training", choices=TRAINING_FORMATS, default=AdaptationSettings.training,
                    help="what a step's loss is on (default: %(default)s)")
    qa.add_argument("--together", action="store_true",
                    help="one step per pass on its passages as one batch (their mean loss), not one per passage")
    qa.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                    help="the base matmuls of steps and prefill: fp32, bf16 (decoding in fp32), or auto: what the "
                         "app's start-up probe chooses on this machine (default: %(default)s)")
    qa.add_argument("--decode-precision", choices=("fp32", "bf16"), default="fp32",
                    help="the base matmuls of each decoding step (not with --precision auto; default: %(default)s)")
    qa.add_argument("--drafts", type=int, default=0, choices=range(0, 9), metavar="K",
                    help="each decoding forward also checks K tokens guessed from what the answer reads: the same "
                         "answers in fewer forwards (default: %(default)s; with --precision auto the probe's choice)")
    qa.add_argument("--seed", type=int, default=0)
    qa.add_argument("--out", default="eval-results/answers", help="folder for answers.md and answers.json")
    qa.add_argument("--quiet", action="store_true")


def add_world_parser(commands) -> None:
    """The make-world command, on the CLI's subparsers."""
    world = commands.add_parser("make-world", help="write the invented world: documents and questions")
    world.add_argument("out", help="folder: documents/, questions.jsonl (one fact each) and "
                       "two-fact-questions.jsonl are written there")
    world.add_argument("--towns", type=int, default=80)
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--document-copies", type=int, default=1,
                       help="write every document this many times, under other names (default: %(default)s)")


def cmd_eval(args) -> int:
    from .evaluation import EvalSettings, markdown, run_evaluation, write_report
    from .models import load_chat_model

    settings = EvalSettings(methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), setting=args.setting,
                            mode=args.mode, context_passages=args.context_passages,
                            test_documents=args.test_docs, steps=args.steps, prompt_tokens=args.prompt_tokens,
                            target_tokens=args.target_tokens, candidates=args.candidates, lam=args.lam,
                            duplicate=args.duplicate, min_reduction=args.min_reduction, alpha=args.alpha,
                            seed=args.seed, measure_first=args.measure_first)
    adaptation = AdaptationSettings(learning_rate=args.lr, rank=args.rank, top_layers=args.top_layers,
                                    target_modules=args.targets, max_passage_tokens=args.max_passage_tokens,
                                    together=args.together, seed=args.seed)
    home = config.data_dir(args.data_dir)
    name = config.embedder_name(args.embedder)
    model, tokenizer = load_chat_model(args.chat_model, args.device, home / "models")
    rows, split = run_evaluation(Path(args.corpus), settings, adaptation, embedder=open_embedder(args),
                                 embedder_name=name, model=model, tokenizer=tokenizer,
                                 work_dir=home / "eval", include=args.include, exclude=args.exclude,
                                 passage_tokens=args.passage_tokens, progress=not args.quiet)
    measured = len({row.path for row in rows})
    title = (f"{Path(args.corpus).name}: {measured} test documents, pool of {len(split.pool)}, "
             f"{settings.steps} {'picks' if settings.mode == 'context' else 'steps'}"
             + (" taken together" if adaptation.together and settings.mode != "context" else "")
             + f", lr {adaptation.learning_rate}, "
             f"λ {settings.lam}"
             + (f", every passage ×{settings.duplicate}" if settings.duplicate > 1 else "")
             + (", personal documents (test documents in the pool)" if settings.setting == "personal" else "")
             + (f", mode {settings.mode} ({settings.context_passages} passages in context)"
                if settings.mode != "fine-tune" else ""))
    summary = write_report(rows, settings, adaptation, Path(args.out), title)
    print(markdown(summary, title))
    plotted = " and bpb-by-steps.png" if settings.mode != "context" else ""
    print(f"\nwritten to {args.out}/results.md, results.json{plotted}")
    return 0


def cmd_eval_qa(args) -> int:
    import hashlib
    import random

    from . import answers as qa
    from .corpus import ingest
    from .engine import Engine
    from .models import load_chat_model
    from .probe import Compute, probe
    from .store import Store

    questions = qa.load_questions(args.questions)
    if args.sample:
        questions = random.Random(args.seed).sample(questions, min(args.sample, len(questions)))
    questions = questions[: args.limit] if args.limit else questions
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes:g}")
    configs = qa.configurations(_names(args.modes), _names(args.methods))
    settings = ChatSettings(passages=args.passages, **reading_settings(args), lam=args.lam,
                            min_reduction=args.min_reduction,
                            max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                            no_repeat_ngram=args.no_repeat_ngram, context_contrast=args.context_contrast,
                            contrast_against=args.contrast_against, seed=args.seed)
    for configuration in configs:  # every mode and method checked before anything loads
        ChatSettings(mode=configuration.mode,
                     method=settings.method if configuration.method == qa.NO_METHOD else configuration.method)
    adaptation = AdaptationSettings(learning_rate=args.lr, top_layers=args.top_layers, target_modules=args.targets,
                                    training=args.training, epochs=args.epochs, together=args.together,
                                    seed=args.seed)
    home = config.data_dir(args.data_dir)
    corpus = Path(args.corpus).expanduser().resolve()
    if not corpus.is_dir():
        raise ValueError(f"--corpus must be a folder, got {args.corpus}")
    name = config.embedder_name(args.embedder)
    embedder = open_embedder(args)
    store = Store(home / "eval-qa" / f"{corpus.name}-{hashlib.sha1(str(corpus).encode()).hexdigest()[:8]}")
    ingest(store, embedder, [corpus], embedder_name=name, progress=not args.quiet)
    if args.picks_only:
        return _pick_locations(args, store, embedder, questions, settings, corpus)
    model, tokenizer = load_chat_model(args.chat_model, args.device, home / "models")
    engine = Engine(store, embedder, model, tokenizer, embedder_name=name, adaptation=adaptation)
    if args.precision == "auto":
        engine.compute = probe(engine.model, home)
        print(f"sift-chat: {engine.compute.describe()}", file=sys.stderr)
    else:
        engine.compute = Compute(args.precision, args.decode_precision, 1, draft_tokens=args.drafts, source="forced")
    engine.compute.keep_copies(engine.model)  # not in the first question's time
    answers = qa.run(engine, questions, configs, settings, progress=not args.quiet,
                     max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    answered = len({a.question for a in answers})
    if answered < len(questions):
        print(f"stopped after {args.max_minutes:g} minutes: {answered} of {len(questions)} questions answered",
              file=sys.stderr)
    title = (f"{corpus.name}: {answered} questions, {settings.passages} passages "
             f"({settings.read_passages} read at most, those matching ≥ {settings.read_min_match:g} of the best; "
             f"the first weighing {settings.lead_weight or 1 / settings.read_passages:.2g}), "
             f"lr {adaptation.learning_rate}, "
             f"{adaptation.epochs} pass{'es' * (adaptation.epochs > 1)} over them, "
             f"training on {adaptation.training}; context-aware decoding α = {settings.context_contrast:g} "
             f"against the {settings.contrast_against} model")
    meta = {"settings": asdict(settings), "adaptation": asdict(adaptation), "corpus": str(corpus),
            "questions_file": str(args.questions), "sample": args.sample, "limit": args.limit,
            "max_minutes": args.max_minutes, "compute": engine.compute.describe()}
    summary = qa.write_report(answers, questions, configs, meta, Path(args.out), title)
    print(qa.markdown(summary, title))
    print(f"written to {args.out}/answers.md and answers.json")
    return 0


def _pick_locations(args, store, embedder, questions, settings, corpus: Path) -> int:
    """eval-qa --picks-only: each method's selection for every question, as chat selects, without
    the chat model."""
    import json

    import torch

    from . import answers as qa
    from .retrieval import preselect
    from .selection import select

    def picks(text: str, method: str):
        """(the lead, the picks): what chat reads first and what it selects, as `Engine.select` does."""
        query = embedder.encode(text, normalize_embeddings=True, convert_to_tensor=True).float().cpu()
        found = preselect(store, query.numpy(), text, settings.candidates)
        chosen = select(query, torch.from_numpy(found.vectors), method, settings.passages, settings.lam).indices.tolist()
        ids = [int(found.ids[i]) for i in chosen]
        passages = store.passages([*ids, int(found.ids[0])])
        return passages[int(found.ids[0])], [passages[i] for i in ids]

    located = qa.pick_locations(picks, questions, _names(args.methods))
    title = f"{corpus.name}: {len(questions)} questions, {settings.passages} picks, λ {settings.lam}"
    table = f"# {title}\n\n" + qa.pick_table(located)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "picks.md").write_text(table)
    (out / "picks.json").write_text(json.dumps({"title": title, "questions_file": str(args.questions),
                                                "located": located}, indent=1))
    print(table)
    print(f"written to {args.out}/picks.md and picks.json")
    return 0


def cmd_make_world(args) -> int:
    from .world import write_world

    path = write_world(args.out, towns=args.towns, seed=args.seed, document_copies=args.document_copies)
    two_fact = path.with_name("two-fact-questions.jsonl")
    print(f"wrote {sum(1 for _ in (Path(args.out) / 'documents').iterdir())} documents, "
          f"{sum(1 for _ in path.open())} questions and {sum(1 for _ in two_fact.open())} two-fact questions "
          f"to {args.out}")
    return 0


def _names(text: str) -> list[str]:
    """A comma-separated list of names, blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


COMMANDS = {"eval": cmd_eval, "eval-qa": cmd_eval_qa, "make-world": cmd_make_world}
