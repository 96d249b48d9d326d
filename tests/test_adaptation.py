"""The adaptation stage: a fresh LoRA adapter per message, one step per passage, the base model after.

Most tests use a tiny random Llama and a byte-level BPE tokenizer trained in memory (no download);
one runs the real default chat model end to end.
"""

import sys
import threading

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sift_chat import adaptation
from sift_chat.adaptation import AdaptationSettings, Adapter, next_token_loss, next_token_losses, passage_ids


TEXT = (
    "The quick brown fox jumps over the lazy dog. Test-time fine-tuning takes one gradient step per "
    "selected passage, answers with the adapted model, and then returns to the base model. "
)
PASSAGES = [
    "SIFT selects passages that reduce the uncertainty about the answer.",
    "Nearest neighbours retrieve the most similar passages, duplicates included.",
    "A LoRA adapter adds a low-rank update B A to each targeted weight matrix.",
    "The quick brown fox jumps over the lazy dog, again and again.",
]
LAYERS = 4


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT, *PASSAGES] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_model(tokenizer, layers=LAYERS):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.fixture
def setup(tokenizer):
    """(model, adapter factory, fixed input, the base model's logits on it, before any wrapping)."""
    model = tiny_model(tokenizer)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:48]])
    base = logits(model, ids)

    def make(**settings):
        settings.setdefault("learning_rate", 1e-2)
        return Adapter(model, tokenizer, AdaptationSettings(**settings))

    return model, make, ids, base


# -- isolation ----------------------------------------------------------------------------------


def test_fresh_adapter_equals_base(setup):
    model, make, ids, base = setup
    adapter = make()
    assert torch.equal(logits(adapter.model, ids), base)
    assert adapter.model is model and torch.equal(logits(model, ids), base)  # LoRA layers go into the model given
    assert all(torch.count_nonzero(m.lora_B) == 0 for m in adapter.lora_modules.values())


def test_adapted_changes_the_model_and_exit_restores_base(setup):
    _, make, ids, base = setup
    adapter = make()
    with adapter.adapted(PASSAGES) as losses:
        assert len(losses) == len(PASSAGES) and all(loss > 0 for loss in losses)
        assert not torch.equal(logits(adapter.model, ids), base)
        with adapter.disabled() as plain:
            assert torch.equal(logits(plain, ids), base)
        assert not torch.equal(logits(adapter.model, ids), base)  # disabled() is temporary
    assert torch.equal(logits(adapter.model, ids), base)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_adaptation_restores_base(setup, error):
    _, make, ids, base = setup
    adapter = make()
    seen = []

    def on_step(i, n, loss):
        seen.append((i, n))
        if i == 2:
            raise error("stop")

    with pytest.raises(error):
        with adapter.adapted(PASSAGES, on_step=on_step):
            pytest.fail("the block must not run when the adaptation raised")
    assert seen == [(1, 4), (2, 4)]
    assert adapter.steps == 0 and not adapter.model.training
    assert torch.equal(logits(adapter.model, ids), base)


def test_error_inside_the_block_restores_base(setup):
    _, make, ids, base = setup
    adapter = make()
    with pytest.raises(KeyboardInterrupt):
        with adapter.adapted(PASSAGES[:2]):
            raise KeyboardInterrupt  # e.g. the user stops the generation
    assert torch.equal(logits(adapter.model, ids), base)


def test_empty_passage_list_takes_no_step(setup):
    _, make, ids, base = setup
    adapter = make()
    calls = []
    with adapter.adapted([], on_step=lambda *a: calls.append(a)) as losses:
        assert losses == [] and calls == [] and adapter.steps == 0
        assert torch.equal(logits(adapter.model, ids), base)
    assert torch.equal(logits(adapter.model, ids), base)


# -- learning -----------------------------------------------------------------------------------


def test_repeated_steps_lower_the_loss(setup):
    _, make, _, _ = setup
    adapter = make()
    losses = adapter.adapt([PASSAGES[0]] * 6)
    assert losses[-1] < losses[0] - 0.05, losses
    assert losses[1] < losses[0], losses  # the very first step already helps


def test_step_returns_the_loss_before_the_step(setup, tokenizer):
    _, make, _, _ = setup
    adapter = make()
    ids = adapter.tokens(PASSAGES[1])
    with torch.no_grad():
        before = next_token_loss(adapter.model, ids).item()
    assert adapter.step(PASSAGES[1]) == pytest.approx(before, rel=1e-6)
    with torch.no_grad():
        assert next_token_loss(adapter.model, ids).item() < before


def plain_loss(model, ids):
    """The textbook loss from the model's full logits, F.cross_entropy."""
    return torch.nn.functional.cross_entropy(model(input_ids=ids, use_cache=False).logits[0, :-1], ids[0, 1:])


@pytest.mark.parametrize("chunk_elements", [1 << 23, 1000])  # one chunk; many uneven ones
def test_next_token_loss_equals_cross_entropy_of_the_logits(setup, monkeypatch, chunk_elements):
    model, make, ids, _ = setup
    monkeypatch.setattr(adaptation, "HEAD_CHUNK_ELEMENTS", chunk_elements)
    adapter = make()
    with adapter.adapted(PASSAGES[:2]):  # B != 0, so the LoRA gradients are all non-trivial
        with torch.no_grad():
            logp = torch.log_softmax(logits(model, ids)[0], dim=-1)
            by_hand = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].mean()
            assert next_token_loss(adapter.model, ids).item() == pytest.approx(by_hand.item(), rel=1e-5)
            assert next_token_loss(adapter.model, ids[0]).item() == pytest.approx(by_hand.item(), rel=1e-5)
        grads = []
        for loss_fn in (next_token_loss, plain_loss):
            loss_fn(adapter.model, ids).backward()
            grads.append([p.grad.clone() for p in adapter.trainable])
            adapter.optimizer.zero_grad(set_to_none=True)
    for fused, plain in zip(*grads):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("chunk_elements", [1 << 23, 1000])
def test_the_head_loss_in_bf16_is_the_cross_entropy_of_bf16_logits(monkeypatch, chunk_elements):
    """Under `base_matmuls(bf16)` the loss's logits are hidden · Wᵀ on the head's kept bf16 copy;
    the loss and the gradient with respect to the hidden states are those of the textbook loss
    over those logits, and the gradient is fp32."""
    monkeypatch.setattr(adaptation, "HEAD_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (9,))
    ours = adaptation.head_loss(hidden, weight, targets, torch.bfloat16)
    (grad,) = torch.autograd.grad(ours, hidden)
    low = weight.to(torch.bfloat16)
    reference = torch.nn.functional.cross_entropy(
        _BF16Logits.apply(hidden, low), targets)
    (expected,) = torch.autograd.grad(reference, hidden)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    assert grad.dtype == torch.float32
    # (softmax − onehot) rounded to bf16 before the 1/n, where the reference rounds it after: 1% of the largest
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-2 * expected.abs().max().item())
    fp32 = adaptation.head_loss(hidden, weight, targets)
    assert ours.item() != fp32.item() and ours.item() == pytest.approx(fp32.item(), rel=2e-2)


class _BF16Logits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, low):
        ctx.save_for_backward(low)
        return (hidden.to(low.dtype) @ low.T).float()

    @staticmethod
    def backward(ctx, grad):
        (low,) = ctx.saved_tensors
        return (grad.to(low.dtype) @ low).float(), None


def test_other_heads_use_the_model_logits(setup, monkeypatch):
    _, make, ids, _ = setup
    adapter = make()
    with torch.no_grad():
        fused = next_token_loss(adapter.model, ids).item()
        monkeypatch.setattr(adaptation, "PLAIN_HEAD_MODELS", set())
        assert next_token_loss(adapter.model, ids).item() == pytest.approx(fused, rel=1e-5)


def test_modes_train_during_steps_eval_otherwise(setup):
    _, make, _, _ = setup
    adapter = make()
    modes = []
    layer = adapter.model.model.layers[-1]
    hook = layer.register_forward_hook(lambda m, i, o: modes.append(m.training))
    try:
        assert not adapter.model.training
        with adapter.adapted(PASSAGES[:2], on_step=lambda *a: modes.append(adapter.model.training)):
            assert not adapter.model.training
            adapter.model(input_ids=adapter.tokens(TEXT))
    finally:
        hook.remove()
    assert modes == [True, False, True, False, False]  # step, callback, step, callback, generation


def test_generate_inside_and_outside(setup, tokenizer):
    model, make, ids, _ = setup
    prompt = ids[:, :8]
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    base_out = model.generate(prompt, **greedy)
    adapter = make(learning_rate=5e-2)
    with adapter.adapted([TEXT] * 3):
        adapted_out = adapter.model.generate(input_ids=prompt, **greedy)
        with adapter.disabled() as plain:
            assert torch.equal(plain.generate(input_ids=prompt, **greedy), base_out)
    assert adapted_out.shape == base_out.shape
    assert torch.equal(adapter.model.generate(input_ids=prompt, **greedy), base_out)


# -- reset --------------------------------------------------------------------------------------


def test_reset_is_deterministic(setup):
    _, make, _, _ = setup
    adapter = make(optimizer="adam")
    a_fresh = [m.lora_A.clone() for m in adapter.lora_modules.values()]
    with adapter.adapted(PASSAGES) as first:
        pass
    with adapter.adapted(PASSAGES) as second:
        pass
    assert first == second
    with adapter.adapted(PASSAGES[::-1]) as reordered:
        pass
    assert reordered != first[::-1]  # a second passage is taken from an adapted model
    adapter.reset()
    assert all(torch.equal(m.lora_A, w) for m, w in zip(adapter.lora_modules.values(), a_fresh))


def test_seed_changes_the_lora_a_draw(setup, tokenizer):
    _, make, _, _ = setup
    first = [m.lora_A.clone() for m in make(seed=0).lora_modules.values()]
    other = Adapter(tiny_model(tokenizer), tokenizer, AdaptationSettings(seed=1))
    assert not torch.equal(first[0], next(iter(other.lora_modules.values())).lora_A)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_every_optimizer_steps(setup, optimizer):
    _, make, ids, base = setup
    adapter = make(optimizer=optimizer, learning_rate=0.5 if optimizer == "sgd" else 1e-2)
    with adapter.adapted(PASSAGES[:2]):
        assert not torch.equal(logits(adapter.model, ids), base)
    assert torch.equal(logits(adapter.model, ids), base)


# -- which layers, and where the backward stops ---------------------------------------------------


def lora_layer_indices(adapter):
    return adapter.adapted_layers


def test_top_layers_only_get_lora_and_backward_stops_there(setup):
    model, make, _, _ = setup
    adapter = make(top_layers=2, target_modules="attention")
    assert lora_layer_indices(adapter) == [2, 3]
    assert {name.rsplit(".", 1)[-1] for name in adapter.lora_modules} == {"q_proj", "k_proj", "v_proj", "o_proj"}

    needs_grad = {}
    hooks = [
        layer.register_forward_hook(lambda m, i, o, k=k: needs_grad.__setitem__(k, (o[0] if isinstance(o, tuple) else o).requires_grad))
        for k, layer in enumerate(model.model.layers)
    ]
    try:
        adapter.model.train()
        loss = next_token_loss(adapter.model, adapter.tokens(PASSAGES[0]))
        loss.backward()
    finally:
        adapter.model.eval()
        for hook in hooks:
            hook.remove()
    # Nothing below layer 2 is recorded by autograd, so the backward pass cannot go there.
    assert needs_grad == {0: False, 1: False, 2: True, 3: True}
    with_grad = {n for n, p in adapter.model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n and (".layers.2." in n or ".layers.3." in n) for n in with_grad)
    assert model.model.embed_tokens.weight.grad is None and not model.lm_head.weight.requires_grad
    adapter.reset()


def test_top_layers_full_depth_and_too_many(setup, tokenizer):
    _, make, _, _ = setup
    assert lora_layer_indices(make(top_layers=LAYERS)) == list(range(LAYERS))
    with pytest.raises(ValueError, match="top_layers"):
        Adapter(tiny_model(tokenizer), tokenizer, AdaptationSettings(top_layers=LAYERS + 1))


def test_all_linear_targets_the_mlp_too_not_the_head(setup):
    model, make, ids, base = setup
    adapter = make(target_modules="all-linear", top_layers=1)
    names = {name.rsplit(".", 1)[-1] for name in adapter.lora_modules}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert lora_layer_indices(adapter) == [LAYERS - 1]
    assert torch.equal(logits(adapter.model, ids), base)


# -- passages -----------------------------------------------------------------------------------


def test_passages_are_truncated_with_bos(setup, tokenizer):
    _, make, _, _ = setup
    adapter = make(max_passage_tokens=16)
    ids = adapter.tokens(TEXT * 3)
    assert ids.shape == (1, 16) and ids[0, 0].item() == tokenizer.bos_token_id
    assert passage_ids(tokenizer, TEXT, 16) == tokenizer(TEXT)["input_ids"][:16]
    short = adapter.tokens("fox")
    assert short.shape[1] < 16 and short[0, 0].item() == tokenizer.bos_token_id


def test_passages_cut_in_one_thread_leave_other_threads_tokenising_uncut(tokenizer):
    """Several messages tokenise on one tokenizer at once: a passage cut to 16 tokens in one thread
    never comes out whole, and another thread's plain call never comes out cut (a fast tokenizer's
    own truncation is state shared by every thread: with it, both happened tens of times here)."""
    text = TEXT * 8
    whole = tokenizer(text)["input_ids"]
    assert len(whole) > 16
    wrong = {"cut": 0, "whole": 0}

    def cut():
        for _ in range(1500):
            wrong["cut"] += passage_ids(tokenizer, text, 16) != whole[:16]

    def plain():
        for _ in range(1500):
            wrong["whole"] += tokenizer(text)["input_ids"] != whole

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can
    try:
        threads = [threading.Thread(target=cut), threading.Thread(target=plain)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert wrong == {"cut": 0, "whole": 0}


def test_passage_with_nothing_to_predict_takes_no_step(setup):
    _, make, ids, base = setup
    adapter = make()
    assert adapter.tokens("").shape == (1, 1)  # BOS only
    with adapter.adapted(["", PASSAGES[0]]) as losses:
        assert losses[0] != losses[0] and losses[1] > 0  # nan, then a real step
        assert adapter.steps == 1


@pytest.mark.parametrize(
    "bad",
    [
        dict(rank=0),
        dict(rank=2.5),
        dict(alpha=0),
        dict(dropout=1.0),
        dict(dropout=-0.1),
        dict(learning_rate=0),
        dict(learning_rate=float("nan")),
        dict(optimizer="lion"),
        dict(max_passage_tokens=1),
        dict(top_layers=0),
        dict(top_layers=True),
        dict(target_modules="mlp"),
        dict(target_modules=()),
        dict(seed="0"),
    ],
)
def test_invalid_settings(bad):
    with pytest.raises(ValueError, match="invalid adaptation setting") as raised:
        AdaptationSettings(**bad)
    assert "\n" not in str(raised.value)


def test_settings_defaults_and_list_targets():
    s = AdaptationSettings()
    assert (s.rank, s.alpha, s.dropout, s.target_modules, s.optimizer, s.max_passage_tokens, s.top_layers) == (
        8, 16.0, 0.0, "all-linear", "adam", 256, None,
    )
    assert AdaptationSettings(target_modules=["q_proj", "v_proj"]).target_modules == ("q_proj", "v_proj")


# -- the real default model ---------------------------------------------------------------------


def test_default_model_end_to_end(chat_model):  # conftest: the packaged model, converted once per session
    model, tokenizer = chat_model
    passages = [
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
        "Test-time fine-tuning adapts a language model to each prompt on passages selected from a corpus.",
    ]
    probe = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"]])
    base = logits(model, probe)
    adapter = Adapter(model, tokenizer, AdaptationSettings(max_passage_tokens=64))
    steps = []
    try:
        with torch.no_grad():
            before = [next_token_loss(adapter.model, adapter.tokens(p)).item() for p in passages]
        with adapter.adapted(passages, on_step=lambda i, n, loss: steps.append((i, n))) as losses:
            with torch.no_grad():
                after = [next_token_loss(adapter.model, adapter.tokens(p)).item() for p in passages]
            out = adapter.model.generate(input_ids=probe, max_new_tokens=2, do_sample=False)
        assert steps == [(1, 2), (2, 2)] and losses[0] == pytest.approx(before[0], rel=1e-5)
        assert all(a < b for a, b in zip(after, before)), (before, after)
        assert out.shape == (1, probe.shape[1] + 2)
        assert torch.equal(logits(adapter.model, probe), base)
    finally:
        adapter.remove()  # the session's model is shared: give it back without LoRA layers
    assert not any("lora_" in name for name, _ in model.named_modules())
    assert torch.equal(logits(model, probe), base)


# -- one step on the passages together (AdaptationSettings.together)


def test_losses_of_a_padded_batch_equal_each_sequence_alone(setup):
    """Right padding changes no sequence's loss: a causal position reads only the positions before it."""
    _, make, _, _ = setup
    adapter = make()
    with adapter.adapted(PASSAGES[:1]):  # B != 0
        batch = [adapter.tokens(p)[0] for p in PASSAGES[:3]]
        assert len({len(ids) for ids in batch}) > 1  # the padding is exercised
        with torch.no_grad():
            together = next_token_losses(adapter.model, batch, [1, 2, 1])
            alone = [next_token_loss(adapter.model, ids, first) for ids, first in zip(batch, [1, 2, 1])]
    torch.testing.assert_close(together, torch.stack(alone), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="a token to predict"):
        next_token_losses(adapter.model, [batch[0][:1]], [1])


def test_a_step_together_is_one_step_on_the_mean_of_the_losses(setup):
    """step_together on one passage is step; on three it returns each loss before the step and
    moves the adapter as one step on their mean at 3 × the learning rate does."""
    _, make, _, _ = setup
    adapter = make()

    def after(run):
        adapter.reset()
        out = run()
        return out, [p.detach().clone() for p in adapter.trainable]

    (together_one, moved_together), (alone, moved_alone) = (after(lambda: adapter.step_together([PASSAGES[0]])),
                                                            after(lambda: adapter.step(PASSAGES[0])))
    assert together_one == [pytest.approx(alone, rel=1e-6)]
    for a, b in zip(moved_together, moved_alone):  # Adam's first step is ±lr where a gradient is float noise
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    def by_hand():
        for group in adapter.optimizer.param_groups:  # a step on 3 passages at 3 × their rate
            group["lr"] = 3 * adapter.settings.learning_rate
        adapter.model.train()
        mean = torch.stack([next_token_loss(adapter.model, adapter.tokens(p)) for p in PASSAGES[:3]]).mean()
        mean.backward()
        adapter.optimizer.step()
        adapter.optimizer.zero_grad(set_to_none=True)
        adapter.model.eval()
        return mean.item()

    (losses, moved_together), (mean, moved_by_hand) = after(lambda: adapter.step_together(PASSAGES[:3])), after(by_hand)
    assert len(losses) == 3 and sum(losses) / 3 == pytest.approx(mean, rel=1e-5)
    for a, b in zip(moved_together, moved_by_hand):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(p.abs().sum() > 0 for p in moved_together[1::2])  # B moved
