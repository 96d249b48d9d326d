"""LoRA layers for test-time training: put into a model's linear layers, reset in place, fast on a CPU.

A LoRA layer wraps a frozen linear layer (weight W [out, in], bias b) with two small matrices,
A [r, in] and B [out, r], and the scaling s = alpha / r:

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ

Its backward is written out, so that a layer is one autograd node that saves x and h = x Aᵀ
and makes no scaled copy of the [T, out] activations (peft's composite layer records six nodes
and two of those copies; a 256-token step is about 1.08× faster this way, README: Benchmarks):

    ∂L/∂B = s · (∂L/∂y)ᵀ h          [out, r]
    ∂L/∂h = s · (∂L/∂y) B           [T, r]
    ∂L/∂A = (∂L/∂h)ᵀ x              [r, in]
    ∂L/∂x = (∂L/∂y) W + (∂L/∂h) A   [T, in]    (only where x needs a gradient)

With B = 0 the layer computes exactly what the base layer computes (the LoRA term adds zeros).
With dropout p > 0 the LoRA branch reads dropout(x), through plain autograd.

In generation (no autograd) a batch's rows can each weigh the adapter, m [batch] (`row_scales`):

    y_i = x_i Wᵀ + b + m_i · s · (x_i Aᵀ) Bᵀ

so one forward serves the adapted model (m_i = 1) and the base model (m_i = 0, bit for bit the
base layer: the term adds exact zeros) side by side. Where every row's m is 0 the term is not
computed at all (the same output without the term's small ops). Rows of several messages, each
adapted on its own, carry their own matrices instead (`row_weights`): with the U adapters in use
side by side, A = [A_1; …; A_U] [U·r, in] and B = [B_1 … B_U] [out, U·r], and a mask M [batch, U·r]
that is m_i over row i's own adapter's r columns and 0 elsewhere,

    y_i = x_i Wᵀ + b + s · ((x_i Aᵀ) ⊙ M_i) Bᵀ = x_i Wᵀ + b + m_i · s · (x_i A_uᵢᵀ) B_uᵢᵀ

two plain matmuls that read each adapter once, however many rows use it. The same with gradients
(a step of several messages at once, `learning`): A and B are the concatenation of each message's
own matrices, so the backward above, with h and ∂L/∂h masked by M, gives each message's matrices
the gradient of its own rows' loss alone.

The scales and weights belong to the thread that set them, so two threads may decode on one
model at once, each with its own rows (`decoding.Rows`).

Inside `base_matmuls(torch.bfloat16)` the base term x Wᵀ (and, in the backward, (∂L/∂y) W) runs
on a bf16 copy of W kept beside it (`low_precision_product`), x cast to bf16 and the product back
to x's dtype; the bias, the LoRA term, its gradients and Adam's state stay fp32, and so does
everything outside the linear layers. Where a CPU multiplies bf16 in hardware (AMX) this is several
times fp32's speed on a step's or a prefill's many rows, without the cast of every weight on every
call that bf16 autocast makes (README: Precision). On a CPU the kept copy is packed once in oneDNN's
own layout (W, and Wᵀ for the backward): a plain bf16 matmul reorders the weight on every call,
which on these narrow layers cost as much as the product (the same bf16 results, at 1.5-2.4x the
speed). Which stages run so is the engine's choice (`probe`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn


_row_scales = threading.local()  # .by_layer: id(LoRALinear) -> scales [batch], BASE or RowWeights, this thread's forwards only
BASE = "base"  # every row's scale 0: the base layer
_matmuls = threading.local()  # .dtype: what this thread's base matmuls run in (None: the weights' own)


@contextmanager
def base_matmuls(dtype: torch.dtype | None) -> Iterator[None]:
    """This thread's LoRA layers multiply by their base weights in `dtype` (None: as stored), and
    `head_loss` by the head's, inside; as before on exit, whatever happens."""
    previous = getattr(_matmuls, "dtype", None)
    _matmuls.dtype = dtype
    try:
        yield
    finally:
        _matmuls.dtype = previous


def matmul_dtype() -> torch.dtype | None:
    """The dtype `base_matmuls` set for this thread's base matmuls, or None."""
    return getattr(_matmuls, "dtype", None)


def _kept(weight: torch.Tensor, key, make) -> torch.Tensor:
    """make(), once per `key`, kept with the weight (made again once the weight is changed in place)."""
    stamp = (weight._version, weight.data_ptr())
    kept = getattr(weight, "_sift_kept", None)
    if kept is None or kept[0] != stamp:
        kept = (stamp, {})
        weight._sift_kept = kept
    copies = kept[1]
    if key not in copies:
        copies[key] = make()
    return copies[key]


def low_precision(weight: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`weight` in `dtype`: a copy made once and kept with the weight (made again if the weight is
    changed in place); the weight itself where it already is `dtype` or none is asked for."""
    if dtype is None or weight.dtype == dtype:
        return weight
    return _kept(weight, dtype, lambda: weight.detach().to(dtype))


PACK_ROWS = 64  # the row count oneDNN lays the packed weight out for: its products equal F.linear's at 3-256 rows
_packing: bool | None = None  # whether this CPU's oneDNN multiplies bf16 packed weights (tried once)


def packs(weight: torch.Tensor, dtype: torch.dtype | None) -> bool:
    """Whether products with `weight` in `dtype` run on a oneDNN-packed copy: bf16 on a CPU whose
    oneDNN takes it (tried on first use; where it fails, the plain kept copy)."""
    global _packing
    if dtype != torch.bfloat16 or weight.device.type != "cpu":
        return False
    if _packing is None:
        try:
            w, x = torch.ones(8, 8, dtype=dtype), torch.ones(2, 8, dtype=dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
            _packing = torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), F.linear(x, w))
        except Exception:  # no mkldnn build, no bf16 in this CPU's oneDNN, or an op that changed: the plain copy
            _packing = False
    return _packing


def kept_copy(weight: torch.Tensor, dtype: torch.dtype, transposed: bool = False) -> torch.Tensor:
    """The copy of W in `dtype` that `low_precision_product` multiplies by, made once and kept with
    W: packed for oneDNN (W, or Wᵀ with `transposed`) where `packs`, else W's plain copy."""
    if packs(weight, dtype):
        return _kept(weight, (dtype, "packed", transposed), lambda: torch.ops.mkldnn._reorder_linear_weight(
            (weight.detach().T if transposed else weight.detach()).to(dtype).contiguous(), PACK_ROWS))
    return low_precision(weight, dtype)


def low_precision_product(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype,
                          transposed: bool = False) -> torch.Tensor:
    """x Wᵀ (x W with `transposed`) for x already in `dtype`, on W's copy in `dtype` (`kept_copy`).
    The product is in `dtype`."""
    copy = kept_copy(weight, dtype, transposed)
    if copy.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, copy, None, "none", [], "")
    return x @ copy if transposed else F.linear(x, copy)


def drop_copies(model: nn.Module) -> None:
    """Free every copy kept with the model's weights (the probe's bf16 timings leave some where fp32 is chosen)."""
    for parameter in model.parameters():
        if hasattr(parameter, "_sift_kept"):
            del parameter._sift_kept


def keep_copies(model: nn.Module, dtype: torch.dtype) -> None:
    """Make every copy that a step and a prefill in `dtype` multiply by: each LoRA layer's base
    weight and the output head's, both ways (`kept_copy`)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weights = [m.base.weight for m in model.modules() if isinstance(m, LoRALinear)]
    for weight in weights + ([head.weight] if isinstance(head, nn.Linear) else []):
        for transposed in (False, True):
            kept_copy(weight, dtype, transposed)


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """x Wᵀ + b, the product in `dtype` on the kept copy of W (`low_precision_product`), in x's
    dtype; F.linear itself where no other dtype is asked for (the base layer's output bit for bit)."""
    if dtype is None or dtype == weight.dtype:
        return F.linear(x, weight, bias)
    y = low_precision_product(x.to(dtype), weight, dtype).to(x.dtype)
    return y if bias is None else y.add_(bias)


class LoRALinear(nn.Module):
    """A frozen nn.Linear (`base`) plus the trainable low-rank term s · B A. `enabled = False`
    makes it the base layer (for the base model while an adapter is held); `row_scale` [batch],
    set by `row_scales` for generation in the calling thread, weighs the adapter per row of the batch."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        weight = base.weight
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=weight.dtype, device=weight.device))
        self.scaling = alpha / rank
        self.dropout = dropout
        self.enabled = True

    @property
    def row_scale(self) -> torch.Tensor | str | None:
        """The per-row adapter scales this thread's forwards use (None: every row adapted; BASE:
        none)."""
        return getattr(_row_scales, "by_layer", {}).get(id(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        row_scale = self.row_scale
        if row_scale is not None and not isinstance(row_scale, RowWeights) and torch.is_grad_enabled():
            raise RuntimeError("per-row adapter scales are for generation: run under torch.no_grad()")
        dtype = matmul_dtype()
        if not self.enabled or row_scale is BASE:
            return base_linear(x, self.base.weight, self.base.bias, dtype)
        if isinstance(row_scale, RowWeights) and torch.is_grad_enabled():  # steps of several adapters at once
            return _LoRALinearFunction.apply(x, self.base.weight, self.base.bias, row_scale.a, row_scale.b,
                                             self.scaling, dtype, row_scale.mask)
        if isinstance(row_scale, RowWeights):
            return _per_row_lora_linear(x, self.base.weight, self.base.bias, row_scale, self.scaling, dtype)
        if row_scale is not None:
            return _lora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling,
                                row_scale, dtype)[0]
        if self.dropout > 0 and self.training:
            lora = F.linear(F.linear(F.dropout(x, self.dropout), self.lora_A), self.lora_B)
            return base_linear(x, self.base.weight, self.base.bias, dtype) + self.scaling * lora
        if not torch.is_grad_enabled():  # generation: the same ops without autograd's bookkeeping
            return _lora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling,
                                dtype=dtype)[0]
        return _LoRALinearFunction.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling,
                                         dtype)

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scaling={self.scaling:g}, enabled={self.enabled}"


def _lora_linear(x, weight, bias, lora_a, lora_b, scaling, row_scale=None, dtype=None, mask=None):
    """(y, rows, h): y = x Wᵀ + b + s (x Aᵀ) Bᵀ, and x as rows and h = x Aᵀ for the backward;
    with `row_scale` m [batch] (x: [batch, …, in]), row i's h is m_i (x_i Aᵀ); with `mask` M
    [batch, U·r], (x_i Aᵀ) ⊙ M_i (`RowWeights`); x Wᵀ in `dtype`."""
    rows = x.reshape(-1, x.shape[-1])
    y = base_linear(x, weight, bias, dtype)  # the base layer's own op, so that B = 0 gives its output bit for bit
    h = rows @ lora_a.T
    if row_scale is not None:
        h = (h.view(row_scale.shape[0], -1, h.shape[-1]) * row_scale.view(-1, 1, 1).to(h.dtype)).view_as(h)
    if mask is not None:
        h = _masked(h, mask)
    y.view(-1, y.shape[-1]).addmm_(h, lora_b.T.to(h.dtype), alpha=scaling)  # under bf16 autocast y and h are bf16
    return y, rows, h


class RowWeights(NamedTuple):
    """One layer's LoRA matrices for the rows of a batch (module docstring): the adapters in use
    side by side, A [U·r, in] and B [out, U·r], and which of their columns each row uses, M
    [batch, U·r] (the row's scale there, 0 elsewhere; a row of zeros is the base layer). With
    gradients (steps), M may be None: one adapter for every row."""

    a: torch.Tensor
    b: torch.Tensor
    mask: torch.Tensor | None


def _masked(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h [batch·T, U·r] with row i's positions multiplied by mask[i] [U·r]."""
    return (h.view(mask.shape[0], -1, h.shape[-1]) * mask[:, None, :].to(h.dtype)).view_as(h)


def _per_row_lora_linear(x, weight, bias, rows: RowWeights, scaling, dtype=None):
    """y_i = x_i Wᵀ + b + s ((x_i Aᵀ) ⊙ M_i) Bᵀ for x [batch, T, in], x Wᵀ in `dtype`."""
    y = base_linear(x, weight, bias, dtype)
    h = (x @ rows.a.T) * rows.mask.view(rows.mask.shape[0], *[1] * (x.dim() - 2), -1)
    y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), rows.b.T, alpha=scaling)
    return y


class _LoRALinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s (x Aᵀ) Bᵀ with the backward of the module docstring (W and b get none);
    with `mask` [batch, U·r], h and ∂L/∂h masked per row (`RowWeights`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dtype=None, mask=None):
        y, rows, h = _lora_linear(x, weight, bias, lora_a, lora_b, scaling, dtype=dtype, mask=mask)
        ctx.save_for_backward(rows, h, weight, lora_a, lora_b, mask)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        ctx.matmul_dtype = dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        rows, h, weight, lora_a, lora_b, mask = ctx.saved_tensors
        s = ctx.scaling
        grad_rows = grad_y.reshape(-1, grad_y.shape[-1])
        dtype = grad_rows.dtype  # bf16 when the forward ran under bf16 autocast (autograd casts the grads back)
        grad_h = grad_rows @ (lora_b * s).to(dtype)
        if mask is not None:
            grad_h = _masked(grad_h, mask)
        grad_b = grad_rows.T @ (h * s).to(dtype)
        grad_a = grad_h.T @ rows.to(dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            low = ctx.matmul_dtype
            through_weight = (grad_rows @ weight.to(dtype) if low is None or low == weight.dtype else
                              low_precision_product(grad_rows.to(low), weight, low, transposed=True).to(dtype))
            grad_x = through_weight.addmm_(grad_h, lora_a.to(dtype)).view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


@contextmanager
def row_scales(model: nn.Module, scales: Sequence[float] | torch.Tensor | None) -> Iterator[nn.Module]:
    """The model with each LoRA layer weighing its adapter by scales[i] in row i of the batch (1: the
    adapted model, 0: the base model), for forwards under torch.no_grad() in this thread; None
    leaves every row adapted. Back to None on exit, whatever happens."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if scales is None or not layers:
        yield model
        return
    scales = torch.as_tensor(scales, dtype=layers[0].lora_A.dtype, device=layers[0].lora_A.device)
    if not scales.any():
        scales = BASE
    if not hasattr(_row_scales, "by_layer"):
        _row_scales.by_layer = {}
    by_layer = _row_scales.by_layer
    for layer in layers:
        by_layer[id(layer)] = scales
    try:
        yield model
    finally:
        for layer in layers:
            by_layer.pop(id(layer), None)


LayerWeights = list[tuple[torch.Tensor, torch.Tensor]]  # each LoRA layer's (A, B), in module order


def lora_weights(model: nn.Module) -> LayerWeights:
    """A copy of every LoRA layer's (A, B), in module order: an adapter kept apart from the
    model, to decode with (`stack_row_weights`) while the model's own adapter learns the next message."""
    return [(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in model.modules()
            if isinstance(m, LoRALinear)]


def stack_row_weights(model: nn.Module, rows: Sequence[tuple[LayerWeights | None, float]]) -> dict[int, RowWeights | str]:
    """For each LoRA layer of `model`, its `RowWeights` for a batch whose row i decodes with
    rows[i] = (weights from `lora_weights`, or None for the base model; the scale m_i), as
    `row_weights` takes them: each adapter once (rows holding the same weights object share it),
    BASE where no row is adapted. Every row's weights must come from this model's current layers;
    weights that require gradients (a `learning.Learner`'s) get them through the concatenation."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    adapters: dict[int, LayerWeights] = {}
    for weights, scale in rows:
        if weights is None or scale == 0:
            continue
        if len(weights) != len(layers) or any(a.shape != layer.lora_A.shape or b.shape != layer.lora_B.shape
                                              for (a, b), layer in zip(weights, layers)):
            raise ValueError("these LoRA weights were kept from other LoRA layers than the model has now")
        adapters.setdefault(id(weights), weights)
    if not adapters:  # every row at base: the base layers alone
        return {id(layer): BASE for layer in layers}
    order = {key: u for u, key in enumerate(adapters)}
    masks: dict[int, torch.Tensor] = {}  # by rank: the same for every layer of that rank
    stacked = {}
    for index, layer in enumerate(layers):
        rank = layer.lora_A.shape[0]
        if rank not in masks:
            masks[rank] = mask = layer.lora_A.new_zeros(len(rows), len(adapters) * rank)
            for row, (weights, scale) in enumerate(rows):
                if weights is not None and scale != 0:
                    u = order[id(weights)]
                    mask[row, u * rank:(u + 1) * rank] = scale
        stacked[id(layer)] = RowWeights(torch.cat([weights[index][0] for weights in adapters.values()]),
                                        torch.cat([weights[index][1] for weights in adapters.values()], 1), masks[rank])
    return stacked


@contextmanager
def row_weights(model: nn.Module, stacked: dict[int, RowWeights | str]) -> Iterator[nn.Module]:
    """The model with each LoRA layer computing row i with its own A_i, B_i (`stack_row_weights`),
    for forwards under torch.no_grad() in this thread; back to the adapter's own on exit."""
    if not hasattr(_row_scales, "by_layer"):
        _row_scales.by_layer = {}
    by_layer = _row_scales.by_layer
    by_layer.update(stacked)
    try:
        yield model
    finally:
        for key in stacked:
            by_layer.pop(key, None)


def layer_index(name: str, layers_name: str) -> int | None:
    """The decoder layer a module belongs to, from its name ("model.layers.3.mlp.up_proj" → 3)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == layers_name and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def add_lora(
    model: nn.Module,
    target_names: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    layers: tuple[str, set[int]] | None = None,
) -> dict[str, LoRALinear]:
    """Freeze every parameter of `model` and replace each nn.Linear whose last name component is
    in `target_names` (and, with layers = (list name, indices), that sits in one of those decoder
    layers) by a LoRALinear around it, in place. Returns name → LoRA layer, in module order.
    A and B start at zero: the caller initialises A (see Adapter.reset)."""
    targets = set(target_names)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers: remove them first (Adapter.remove)")
    model.requires_grad_(False)
    chosen = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] in targets
        and (layers is None or layer_index(name, layers[0]) in layers[1])
    ]
    if not chosen:
        raise ValueError(f"no linear layer of the model matches the LoRA targets {sorted(targets)}")
    added = {}
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        added[name] = LoRALinear(getattr(parent, child), rank, alpha, dropout)
        setattr(parent, child, added[name])
    return added


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the base linear layers back where LoRA layers are; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base)
    return model
