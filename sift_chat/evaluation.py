r"""The evaluation: bits per byte of held-out documents after test-time fine-tuning, per method.

This is the experiment of the SIFT paper (Hübotter et al., ICLR 2025, table 1) on a local corpus:

1. Split the corpus *by document* into a pool and held-out test documents. Files whose content
   equals a test document's are left out of the pool too, so no test text is in the pool.
   In the **personal-documents** setting (`setting="personal"`) the test documents stay in the
   pool, as a user's own documents do: the text the target asks for is there to be found, and
   each row counts the picks whose characters overlap the target's.
2. For each test document, tokenised with the chat model's tokenizer: the **prompt** is its
   first P tokens, the **target** the next T tokens. The prompt's embedding is the query.
3. For each method (none, US, NN, NN-F, SIFT): pre-select K candidates from the pool's index,
   select N passages, take one LoRA step per passage exactly as the engine does (fresh adapter,
   fresh optimizer), and measure the target's bits per byte given the prompt; then reset.
   As in the engine's modes, `mode="context"` instead puts the first C distinct picks before the
   prompt (their texts, each followed by a blank line) and takes no step, and `mode="both"` does
   both; "none" is always the base model without context.

Bits per byte of the target, given the prompt::

    bpb = Σ_{t ∈ target} −log₂ p(x_t | x_<t)  /  UTF-8 bytes of the target's text

where x_<t is the tokenizer's special prefix (BOS, when it adds one), the context passages (in
the context modes), the prompt and the target tokens before t, and the target's text is the
document's characters that the T target tokens cover (from the first one's start offset to the
last one's end offset).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .adaptation import AdaptationSettings, Adapter
from .corpus import UnreadableFile, iter_files, read_text
from .selection import select
from .store import Passage
from .vocabulary import EVAL_METHODS as METHODS
from .vocabulary import EVAL_MODES as MODES


# -- the metric ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TestDocument:
    path: str
    group: str  # the subfolder it belongs to, for the per-folder table
    prompt_ids: list[int]  # the special prefix plus the first P tokens
    prefix: int  # how many of prompt_ids are the tokenizer's special prefix
    target_ids: list[int]  # the next T tokens
    prompt_text: str
    target_bytes: int  # UTF-8 bytes of the target's text
    target_chars: tuple[int, int]  # the target's [start, end) characters in the document


def make_test_document(text: str, tokenizer, prompt_tokens: int, target_tokens: int,
                       path: str = "", group: str = "") -> TestDocument | None:
    """Cut a document into prompt and target; None when it has fewer than P + T tokens."""
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    special = 0
    while special < len(ids) and ids[special] in tokenizer.all_special_ids:
        special += 1  # the tokenizer's own prefix (BOS), part of every input
    content = len(ids) - special
    if content < prompt_tokens + target_tokens:
        return None
    cut, end = special + prompt_tokens, special + prompt_tokens + target_tokens
    target_text = text[offsets[cut][0] : offsets[end - 1][1]]
    return TestDocument(path, group, ids[:cut], special, ids[cut:end], text[offsets[special][0] : offsets[cut][0]],
                        len(target_text.encode("utf-8")), (offsets[cut][0], offsets[end - 1][1]))


def covers_target(passage: Passage, document: TestDocument) -> bool:
    """Whether a passage (path and [start_char, end_char)) holds some of the target's text."""
    start, end = document.target_chars
    return passage.path == document.path and passage.start_char < end and passage.end_char > start


@torch.no_grad()
def bits_per_byte(model, document: TestDocument, context_ids: Sequence[int] = ()) -> float:
    """Σ −log₂ p(target token | everything before it) / UTF-8 bytes of the target's text, with
    `context_ids` between the special prefix and the prompt."""
    device = next(model.parameters()).device
    prefix, prompt = document.prompt_ids[: document.prefix], document.prompt_ids[document.prefix :]
    ids = torch.tensor([prefix + list(context_ids) + prompt + document.target_ids], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    start = len(document.prompt_ids) + len(context_ids)
    # logits at position t predict token t + 1
    nats = F.cross_entropy(logits[start - 1 : -1], ids[0, start:], reduction="sum")
    return float(nats) / math.log(2) / document.target_bytes


# -- the split ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    pool: list[Path]
    test: list[Path]


def corpus_files(root: Path, include: Sequence[str], exclude: Sequence[str]) -> list[Path]:
    """The corpus's files matching an `include` glob and no `exclude` glob (relative paths)."""
    files = []
    for path in iter_files([root]):
        relative = path.relative_to(root).as_posix()
        if include and not any(fnmatch.fnmatch(path.name, g) or fnmatch.fnmatch(relative, g) for g in include):
            continue
        if any(fnmatch.fnmatch(relative, g) or any(fnmatch.fnmatch(part, g) for part in relative.split("/"))
               for g in exclude):
            continue
        files.append(path)
    return files


def split_corpus(files: Sequence[Path], eligible: Callable[[Path], bool], test_documents: int,
                 seed: int, tests_in_pool: bool = False) -> Split:
    """Draw `test_documents` eligible files at random (seeded) as tests; the rest is the pool,
    less any file with the same content as a test file. With `tests_in_pool` (the personal-
    documents setting) the pool is every file."""
    order = sorted(files)
    random.Random(seed).shuffle(order)
    test = []
    for path in order:
        if len(test) == test_documents:
            break
        if eligible(path):
            test.append(path)
    if tests_in_pool:
        return Split(pool=sorted(files), test=sorted(test))
    test_hashes = {_content_hash(p) for p in test}
    pool = [p for p in sorted(files) if p not in set(test) and _content_hash(p) not in test_hashes]
    return Split(pool=pool, test=sorted(test))


def _content_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- one run ------------------------------------------------------------------------------


SETTINGS = ("held-out", "personal")


@dataclass
class EvalSettings:
    methods: tuple[str, ...] = METHODS
    setting: str = "held-out"  # or "personal": the test documents stay in the pool
    mode: str = "fine-tune"  # or "context" (picks in the prompt, no steps) or "both"
    context_passages: int = 4  # C: distinct picks put before the prompt, as the engine does
    context_tokens: int = 1024  # at most this many context tokens (the passages' start is kept)
    test_documents: int = 20
    steps: int = 8  # N: passages selected, one step each
    prompt_tokens: int = 128
    target_tokens: int = 256
    candidates: int = 200
    lam: float = 0.01
    duplicate: int = 1  # every pool passage appears this many times among the candidates
    min_reduction: float | None = None  # adaptive stopping, as in the engine (see selection.select)
    alpha: float | None = None
    checkpoints: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # also measure after these many steps (the plot)
    seed: int = 0
    measure_first: int | None = None  # measure only the first M test documents (same split and pool)

    def __post_init__(self):
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(sorted(unknown))}: use {', '.join(METHODS)}")
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}: use {' or '.join(SETTINGS)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: use {', '.join(MODES)}")
        for name in ("test_documents", "steps", "prompt_tokens", "target_tokens", "candidates", "duplicate",
                     "context_passages", "context_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")


@dataclass
class Row:
    """One measurement: a method on a test document after `steps` steps."""

    path: str
    group: str
    method: str
    steps: int
    bpb: float
    final_variance: float | None = None
    passage_ids: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    target_picks: int | None = None  # picks holding some of the target's text (0 when held out)


def evaluate_document(document: TestDocument, query: torch.Tensor, candidate_ids, candidates: torch.Tensor,
                      passages: Mapping[int, Passage], adapter: Adapter, settings: EvalSettings) -> list[Row]:
    """Every method on one test document; the adapter is reset before and after each."""
    rows = []
    for method in settings.methods:
        adapter.reset()
        try:
            if method == "none":
                with adapter.disabled() as model:
                    rows.append(Row(document.path, document.group, "none", 0, bits_per_byte(model, document)))
                continue
            selection = select(query, candidates, method, settings.steps, settings.lam,
                               settings.min_reduction, settings.alpha)
            ids = [int(candidate_ids[i]) for i in selection.indices.tolist()]
            context = context_ids(adapter.tokenizer, [passages[i].text for i in dict.fromkeys(ids)], settings) \
                if settings.mode in ("context", "both") else []
            losses = []
            if settings.mode != "context" and adapter.settings.together:  # one step on all the picks
                losses = adapter.step_together([passages[i].text for i in ids])
            elif settings.mode != "context":
                for step, passage_id in enumerate(ids, 1):
                    losses.append(adapter.step(passages[passage_id].text))
                    if step in settings.checkpoints and step < len(ids):
                        rows.append(Row(document.path, document.group, method, step,
                                        bits_per_byte(adapter.model, document, context)))
            rows.append(Row(document.path, document.group, method, len(losses),
                            bits_per_byte(adapter.model, document, context), selection.final_variance, ids, losses,
                            sum(covers_target(passages[i], document) for i in ids)))
        finally:
            adapter.reset()
    return rows


def context_ids(tokenizer, texts: Sequence[str], settings: EvalSettings) -> list[int]:
    """The first C distinct passages as the model reads them before the prompt: each text and a
    blank line, at most `context_tokens` tokens."""
    text = "".join(t.strip() + "\n\n" for t in texts[: settings.context_passages])
    return tokenizer(text, add_special_tokens=False)["input_ids"][: settings.context_tokens]


# -- the report ---------------------------------------------------------------------------


def mean_and_error(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def summarise(rows: list[Row], methods: Sequence[str]) -> dict:
    """Per method: bpb, change relative to `none` (%, per document, then averaged), final σ²;
    per group the same; and paired differences SIFT − NN (percentage points) per document."""
    final = {}
    for row in rows:  # the last row of each (document, method) is the one after every step
        final[(row.path, row.method)] = row
    documents = sorted({path for path, _ in final})
    none = {path: final[(path, "none")].bpb for path in documents if (path, "none") in final}

    def relative(method, paths):
        return [100 * (final[(p, method)].bpb / none[p] - 1) for p in paths if (p, method) in final and p in none]

    def table(paths):
        out = {}
        for method in methods:
            present = [p for p in paths if (p, method) in final]
            if not present:
                continue
            variances = [final[(p, method)].final_variance for p in present
                         if final[(p, method)].final_variance is not None]
            target_picks = [final[(p, method)].target_picks for p in present
                            if final[(p, method)].target_picks is not None]
            out[method] = {
                "documents": len(present),
                "bpb": mean_and_error(final[(p, method)].bpb for p in present),
                "relative_percent": mean_and_error(relative(method, present)),
                "final_variance": mean_and_error(variances) if variances else None,
                "target_picks": mean_and_error(target_picks) if target_picks else None,
            }
        return out

    groups = sorted({final[(p, m)].group for p, m in final})
    paired = {}
    for a, b in (("sift", "nn"), ("sift", "nnf"), ("sift", "us"), ("nn", "nnf")):
        both = [p for p in documents if (p, a) in final and (p, b) in final and p in none]
        if both:
            differences = [100 * (final[(p, a)].bpb - final[(p, b)].bpb) / none[p] for p in both]
            paired[f"{a}-{b}"] = {"points": mean_and_error(differences),
                                  "wins": sum(d < 0 for d in differences), "documents": len(both)}
    curves = {}
    for method in methods:
        by_steps: dict[int, list[float]] = {}
        for row in rows:
            if row.method == method:
                by_steps.setdefault(row.steps, []).append(row.bpb)
        curves[method] = {steps: mean_and_error(values)[0] for steps, values in sorted(by_steps.items())}
    return {"overall": table(documents), "groups": {g: table([p for p in documents if any(
        final[(p, m)].group == g for m in methods if (p, m) in final)]) for g in groups},
            "paired": paired, "curves": curves}


def markdown(summary: dict, title: str) -> str:
    """The summary as Markdown tables: overall, paired differences, per group."""

    def fmt(pair, digits=3):
        return "—" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    def method_table(table):
        lines = ["| method | documents | bits per byte | vs none (%) | σ² after selection | picks from the target |",
                 "|---|---|---|---|---|---|"]
        for method, entry in table.items():
            lines.append(f"| {method} | {entry['documents']} | {fmt(entry['bpb'])} | "
                         f"{fmt(entry['relative_percent'], 2)} | {fmt(entry['final_variance'], 2)} | "
                         f"{fmt(entry.get('target_picks'), 1)} |")
        return lines

    lines = [f"### {title}", "", *method_table(summary["overall"]), ""]
    if summary["paired"]:
        lines += ["Paired differences (percentage points of the base model's bpb; negative: the first "
                  "method is better):", "", "| pair | mean ± s.e. | first better on |", "|---|---|---|"]
        for pair, entry in summary["paired"].items():
            lines.append(f"| {pair.replace('-', ' − ')} | {fmt(entry['points'], 2)} | "
                         f"{entry['wins']} of {entry['documents']} |")
        lines.append("")
    if len(summary["groups"]) > 1:
        for group, table in summary["groups"].items():
            lines += [f"#### {group or '(top level)'}", "", *method_table(table), ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> bool:
    """bits per byte against the number of steps, one line per method; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(6, 4))
    base = summary["curves"].get("none", {}).get(0)
    for method, curve in summary["curves"].items():
        if method == "none" or not curve:
            continue
        steps = [0, *curve] if base is not None else list(curve)
        values = [base, *curve.values()] if base is not None else list(curve.values())
        axes.plot(steps, values, marker="o", label={"nnf": "NN-F"}.get(method, method.upper()))
    if base is not None:
        axes.axhline(base, color="grey", linestyle="--", label="none")
    axes.set_xlabel("test-time fine-tuning steps")
    axes.set_ylabel("bits per byte (mean over test documents)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(rows: list[Row], settings: EvalSettings, adaptation: AdaptationSettings, out: Path,
                 title: str) -> dict:
    summary = summarise(rows, settings.methods)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"settings": asdict(settings), "adaptation": asdict(adaptation), "summary": summary,
         "rows": [asdict(r) for r in rows]}, indent=1))
    (out / "results.md").write_text(markdown(summary, title) + "\n")
    if settings.mode != "context":  # no steps to plot against
        plot(summary, out / "bpb-by-steps.png")
    return summary


def test_document_for(path: Path, root: Path, tokenizer, settings: EvalSettings) -> TestDocument | None:
    try:
        text = read_text(path)
    except UnreadableFile:
        return None
    relative = path.relative_to(root)
    group = relative.parts[0] if len(relative.parts) > 1 else ""
    return make_test_document(text, tokenizer, settings.prompt_tokens, settings.target_tokens, str(path), group)


def run_evaluation(root: Path, settings: EvalSettings, adaptation: AdaptationSettings, *, embedder,
                   embedder_name: str, model, tokenizer, work_dir: Path, include: Sequence[str] = (),
                   exclude: Sequence[str] = (), passage_tokens: int | None = None,
                   progress: bool = True) -> tuple[list[Row], Split]:
    """Split `root`, ingest the pool (cached under `work_dir`, keyed by the pool's files and the
    passage settings), and evaluate every method on every test document."""
    import numpy as np
    from tqdm.auto import tqdm

    from .corpus import DEFAULT_PASSAGE_TOKENS, ingest
    from .store import Store

    root = Path(root).resolve()
    passage_tokens = passage_tokens or DEFAULT_PASSAGE_TOKENS
    documents: dict[Path, TestDocument | None] = {}

    def eligible(path: Path) -> bool:
        documents[path] = test_document_for(path, root, tokenizer, settings)
        return documents[path] is not None

    split = split_corpus(corpus_files(root, include, exclude), eligible, settings.test_documents, settings.seed,
                         tests_in_pool=settings.setting == "personal")
    if not split.test:
        raise ValueError(f"no document in {root} has the {settings.prompt_tokens} + {settings.target_tokens} "
                         "tokens a test needs")
    key = hashlib.sha256("\n".join([embedder_name, str(passage_tokens), *map(str, split.pool)]).encode())
    torch.manual_seed(settings.seed)
    adapter = Adapter(model, tokenizer, adaptation)
    rows: list[Row] = []
    with Store(Path(work_dir) / f"pool-{key.hexdigest()[:12]}") as store:
        ingest(store, embedder, split.pool, embedder_name=embedder_name, passage_tokens=passage_tokens,
               progress=progress)
        measured = split.test[: settings.measure_first] if settings.measure_first else split.test
        bar = tqdm(total=len(measured) * len(settings.methods), unit="run", desc="eval", disable=not progress)
        for path in measured:
            document = documents[path]
            query = embedder.encode(document.prompt_text, normalize_embeddings=True, convert_to_tensor=True)
            ids, _, vectors = store.nearest(query.float().cpu().numpy(), settings.candidates)
            ids, vectors = np.repeat(ids, settings.duplicate), np.repeat(vectors, settings.duplicate, axis=0)
            rows += evaluate_document(document, query.float().cpu(), ids, torch.from_numpy(vectors),
                                      store.passages(set(ids.tolist())), adapter, settings)
            bar.update(len(settings.methods))
        bar.close()
    return rows, split
