"""The LoRA layer: its written-out backward against autograd, peft's LoRA, and putting layers in and out."""

import threading

import pytest
import torch
from torch import nn

from sift_chat import lora
from sift_chat.lora import (LoRALinear, _LoRALinearFunction, add_lora, base_matmuls, layer_index, low_precision,
                            low_precision_product, matmul_dtype, packs, remove_lora, row_scales)
from tests.tiny import logits, tiny_model, tiny_tokenizer


def random_layer(inputs=12, outputs=20, rank=4, bias=True, dtype=torch.float64, seed=0) -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(inputs, outputs, bias=bias, dtype=dtype), rank=rank, alpha=8.0)
    layer.base.requires_grad_(False)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()  # non-zero, so every term of the backward is exercised
    return layer


def outputs_and_grads(layer: LoRALinear, x: torch.Tensor, upstream: torch.Tensor, forward):
    """forward(x), and the gradients of Σ forward(x) · upstream with respect to x, A and B."""
    layer.zero_grad()
    x.grad = None
    y = forward(x)
    (y * upstream).sum().backward()
    return y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


def composite(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The layer by the formula, through plain autograd: x Wᵀ + b + s (x Aᵀ) Bᵀ."""
    return layer.base(x) + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12)])
def test_backward_equals_autograd_of_the_formula(bias, shape):
    layer = random_layer(bias=bias)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(*shape[:-1], 20, dtype=torch.float64)

    def grads(forward):
        return outputs_and_grads(layer, x, upstream, forward)

    ours, reference = grads(layer), grads(lambda v: composite(layer, v))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert layer.base.weight.grad is None and (layer.base.bias is None or layer.base.bias.grad is None)


def test_gradcheck():
    layer = random_layer(inputs=5, outputs=6, rank=3)
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = layer.base.weight, layer.base.bias
    assert torch.autograd.gradcheck(
        lambda x, a, b: _LoRALinearFunction.apply(x, weight, bias, a, b, layer.scaling), (x, layer.lora_A, layer.lora_B)
    )


def test_no_input_gradient_when_the_input_needs_none():
    layer = random_layer()
    x = torch.randn(3, 12, dtype=torch.float64)  # e.g. the embeddings below the lowest adapted layer
    layer(x).sum().backward()
    assert x.grad is None and layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_zero_b_is_the_base_layer_bit_for_bit():
    layer = random_layer(dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.zero_()
    x = torch.randn(3, 9, 12)
    assert torch.equal(layer(x), layer.base(x))
    layer.enabled = False
    with torch.no_grad():
        layer.lora_B.normal_()
    assert torch.equal(layer(x), layer.base(x))


def test_row_scales_give_base_rows_bit_for_bit_beside_adapted_rows():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    layers = add_lora(model, ["q_proj", "v_proj", "up_proj", "down_proj"], rank=2, alpha=4.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():  # a non-zero B: the adapted model differs from the base model
            layer.lora_A.normal_()
            layer.lora_B.normal_(std=0.5)
    ids = torch.tensor([tokenizer(text)["input_ids"][:5] for text in
                        ["The quick brown fox jumps.", "SIFT selects passages that", "Nearest neighbours retrieve the"]])
    adapted = logits(model, ids)
    for layer in layers.values():
        layer.enabled = False
    base = logits(model, ids)
    for layer in layers.values():
        layer.enabled = True
    assert not torch.allclose(adapted, base, atol=1e-3)
    with row_scales(model, [1.0, 0.0, 1.0]):  # one forward: rows 0 and 2 adapted, row 1 the base model
        mixed = logits(model, ids)
        with pytest.raises(RuntimeError, match="generation"):  # a step would learn through a masked row
            model(input_ids=ids, use_cache=False)
    assert torch.equal(mixed[1], base[1])
    assert torch.equal(mixed[[0, 2]], adapted[[0, 2]])
    assert all(layer.row_scale is None for layer in layers.values())  # back to every row adapted
    assert torch.equal(logits(model, ids), adapted)


def test_rows_all_at_scale_zero_never_read_the_adapter():
    layer = random_layer(dtype=torch.float32)
    x = torch.randn(2, 3, 12)
    with torch.no_grad():
        layer.lora_A.fill_(float("nan"))  # were the term computed, 0 · NaN would show
        with row_scales(layer, [0.0, 0.0]):
            assert torch.equal(layer(x), layer.base(x))
        with row_scales(layer, [1.0, 0.0]):  # an adapted row: the term is computed
            assert layer(x)[0].isnan().all()


def test_row_scales_belong_to_the_thread_that_set_them():
    """Two conversations decode side by side on one model: the base row's scales, set in one
    thread, leave the other thread's forward adapted."""
    import threading

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    layers = add_lora(model, ["q_proj", "v_proj", "up_proj", "down_proj"], rank=2, alpha=4.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.normal_()
            layer.lora_B.normal_(std=0.5)
    ids = torch.tensor([tokenizer("The quick brown fox jumps.")["input_ids"][:5]])
    adapted = logits(model, ids)
    inside, done, base = threading.Event(), threading.Event(), []

    def base_row():
        with row_scales(model, [0.0]):
            inside.set()
            base.append(logits(model, ids))
            done.wait(10)

    other = threading.Thread(target=base_row)
    other.start()
    assert inside.wait(10)
    try:
        assert torch.equal(logits(model, ids), adapted)  # while the other thread holds the base scales
        assert all(layer.row_scale is None for layer in layers.values())
    finally:
        done.set()
        other.join()
    assert not torch.allclose(base[0], adapted, atol=1e-3)


def test_dropout_applies_to_the_lora_branch_in_training_only():
    layer = random_layer(dtype=torch.float32)
    layer.dropout = 0.5
    x = torch.randn(4, 12)
    layer.eval()
    torch.testing.assert_close(layer(x), composite(layer, x))
    layer.train()
    torch.manual_seed(1)
    dropped = layer(x)
    assert not torch.allclose(dropped, composite(layer, x))
    dropped.sum().backward()
    assert layer.lora_A.grad is not None


def test_same_outputs_and_gradients_as_peft():
    peft = pytest.importorskip("peft")
    tokenizer = tiny_tokenizer()
    ours, theirs = tiny_model(tokenizer), tiny_model(tokenizer)
    targets = ["q_proj", "v_proj", "down_proj"]
    layers = add_lora(ours, targets, rank=4, alpha=8.0)
    wrapped = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(3)
    for name, layer in layers.items():
        peft_layer = wrapped.get_submodule("base_model.model." + name)
        with torch.no_grad():
            layer.lora_A.normal_(std=0.1)
            layer.lora_B.normal_(std=0.1)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    loss_ours = ours(input_ids=ids, labels=ids).loss
    loss_theirs = wrapped(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-6, atol=1e-6)
    loss_ours.backward()
    loss_theirs.backward()
    for name, layer in layers.items():
        peft_layer = wrapped.get_submodule("base_model.model." + name)
        torch.testing.assert_close(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-7)


def test_add_and_remove_layers():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    ids = torch.tensor([tokenizer("The quick brown fox.")["input_ids"]])
    base = logits(model, ids)
    q_proj = model.model.layers[2].self_attn.q_proj
    layers = add_lora(model, ["q_proj", "up_proj"], rank=2, alpha=4.0, layers=("layers", {2, 3}))
    assert sorted(layers) == [f"model.layers.{i}.{m}" for i in (2, 3) for m in ("mlp.up_proj", "self_attn.q_proj")]
    assert model.model.layers[2].self_attn.q_proj.base is q_proj
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{m}" for n in layers for m in "AB"}
    assert torch.equal(logits(model, ids), base)  # A and B start at zero
    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(model, ["k_proj"], rank=2, alpha=4.0)
    assert remove_lora(model) is model
    assert model.model.layers[2].self_attn.q_proj is q_proj
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with pytest.raises(ValueError, match="no linear layer"):
        add_lora(model, ["no_such_proj"], rank=2, alpha=4.0)


def test_layer_index():
    assert layer_index("model.layers.12.mlp.up_proj", "layers") == 12
    assert layer_index("lm_head", "layers") is None
    assert layer_index("model.h.3.attn.c_attn", "h") == 3


def test_generation_path_computes_what_the_training_path_computes():
    layer = random_layer(dtype=torch.float32)
    x = torch.randn(2, 7, 12)
    with torch.no_grad():
        generating = layer(x)  # no autograd node: the path generation takes
    training = layer(x)
    assert training.grad_fn is not None and generating.grad_fn is None
    assert torch.equal(generating, training.detach())


# -- the base matmuls in bf16 (`base_matmuls`): what the engine runs where the probe measured bf16 faster


def test_bf16_base_matmuls_take_the_base_product_in_bf16_and_keep_the_rest_fp32():
    """Forward and backward under base_matmuls(bf16) equal the formula with x Wᵀ and (∂L/∂y) W
    computed in bf16 (x and W rounded, the product rounded back), the LoRA term and its gradients in
    fp32; outside, the layer is fp32 again, bit for bit."""
    layer = random_layer(dtype=torch.float32)
    x = torch.randn(2, 5, 12, requires_grad=True)
    upstream = torch.randn(2, 5, 20)
    weight, bias = layer.base.weight, layer.base.bias
    low = weight.to(torch.bfloat16)

    def reference(v):  # the base product through bf16, by plain autograd
        base = _BF16Product.apply(v, weight) + bias
        return base + layer.scaling * (v @ layer.lora_A.T) @ layer.lora_B.T

    def grads(forward):
        return outputs_and_grads(layer, x, upstream, forward)

    with base_matmuls(torch.bfloat16):
        ours = grads(layer)
    expected = grads(reference)
    for a, b in zip(ours, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    fp32 = grads(lambda v: composite(layer, v))
    assert not torch.allclose(ours[0], fp32[0], atol=1e-4)  # the bf16 product did run
    assert torch.equal(grads(layer)[0], fp32[0])  # outside the block: fp32 again
    # the bf16 copy is made once and kept, and made again when the weight changes in place
    assert low_precision(weight, torch.bfloat16) is low_precision(weight, torch.bfloat16)
    assert torch.equal(low_precision(weight, torch.bfloat16), low)
    with torch.no_grad():
        weight.mul_(2)
    assert torch.equal(low_precision(weight, torch.bfloat16), weight.to(torch.bfloat16))
    assert low_precision(weight, None) is weight and low_precision(weight, torch.float32) is weight


@pytest.mark.parametrize("rows", [1, 3, 47, 130])
def test_bf16_products_on_packed_copies_are_the_plain_bf16_products(rows):
    """The kept bf16 copy packed for oneDNN (where this CPU's oneDNN takes bf16) gives the plain
    bf16 matmul's product on the default model's shapes: x Wᵀ bit for bit, x W (the backward's)
    to bf16 rounding; the packed copies are made once, and again once the weight changes in place."""
    torch.manual_seed(rows)
    weight = torch.randn(1536, 576)
    x, g = torch.randn(rows, 576).to(torch.bfloat16), torch.randn(rows, 1536).to(torch.bfloat16)
    plain = weight.to(torch.bfloat16)
    forward = low_precision_product(x, weight, torch.bfloat16)
    backward = low_precision_product(g, weight, torch.bfloat16, transposed=True)
    assert forward.dtype == backward.dtype == torch.bfloat16
    assert torch.equal(forward, torch.nn.functional.linear(x, plain))
    torch.testing.assert_close(backward.float(), (g @ plain).float(), rtol=1e-2, atol=1e-1)
    if packs(weight, torch.bfloat16):
        kept = weight._sift_kept[1]
        assert {key[1:] for key in kept if isinstance(key, tuple)} == {("packed", False), ("packed", True)}
        before = dict(kept)
        low_precision_product(x, weight, torch.bfloat16)
        assert all(weight._sift_kept[1][key] is before[key] for key in before)
    with torch.no_grad():
        weight.mul_(-1)  # in place: the kept copies are stale
    assert torch.equal(low_precision_product(x, weight, torch.bfloat16), -forward)


def test_bf16_products_fall_back_to_the_plain_copy_where_onednn_refuses_bf16(monkeypatch):
    """A CPU whose oneDNN has no bf16 (an AVX2-only machine) multiplies on the plain bf16 copy: the
    same product, no error."""
    def refuse(*args):
        raise RuntimeError("mkldnn_linear: bf16 path needs the cpu support avx512bw, avx512vl and avx512dq")

    monkeypatch.setattr(lora, "_packing", None)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    weight, x = torch.randn(20, 12), torch.randn(3, 12).to(torch.bfloat16)
    assert not packs(weight, torch.bfloat16)
    assert torch.equal(low_precision_product(x, weight, torch.bfloat16),
                       torch.nn.functional.linear(x, weight.to(torch.bfloat16)))
    assert not packs(weight, None) and not packs(weight, torch.float32)


class _BF16Product(torch.autograd.Function):
    """x Wᵀ through bf16, and ∂L/∂x = (∂L/∂y) W through bf16: the reference for base_matmuls."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return (x.to(torch.bfloat16) @ weight.to(torch.bfloat16).T).float()

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        return (grad_y.to(torch.bfloat16) @ weight.to(torch.bfloat16)).float(), None


def test_bf16_base_matmuls_keep_base_rows_equal_to_the_disabled_layer():
    """With base_matmuls(bf16), a row at adapter scale 0 gives what the disabled layer gives, bit for
    bit (the contrast against the base model compares like with like), and B = 0 gives it too."""
    layer = random_layer(dtype=torch.float32)
    x = torch.randn(2, 3, 12)
    with torch.no_grad(), base_matmuls(torch.bfloat16):
        with row_scales(layer, [1.0, 0.0]):
            mixed = layer(x)
        layer.enabled = False
        disabled = layer(x)
        layer.enabled = True
        with row_scales(layer, [0.0, 0.0]):
            base_rows = layer(x)
        torch.nn.init.zeros_(layer.lora_B)
        zero_b = layer(x)
    assert torch.equal(mixed[1], disabled[1]) and torch.equal(base_rows, disabled) and torch.equal(zero_b, disabled)
    assert not torch.equal(mixed[0], disabled[0])


def test_base_matmuls_belong_to_the_thread_and_end_with_the_block():
    seen = {}
    with base_matmuls(torch.bfloat16):
        thread = threading.Thread(target=lambda: seen.setdefault("other", matmul_dtype()))
        thread.start()
        thread.join()
        seen["inside"] = matmul_dtype()
        with pytest.raises(KeyError):
            with base_matmuls(None):
                seen["nested"] = matmul_dtype()
                raise KeyError
        seen["after nested"] = matmul_dtype()
    assert seen == {"other": None, "inside": torch.bfloat16, "nested": None, "after nested": torch.bfloat16}
    assert matmul_dtype() is None
