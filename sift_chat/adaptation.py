"""Test-time fine-tuning: a fresh LoRA adapter, one optimizer step per selected passage.

For every message the engine does

    with adapter.adapted(passages, on_step=report) as losses:
        answer = adapter.model.generate(...)      # the adapted model
    # here the model equals the base model again, whatever happened inside

LoRA layers (`sift_chat.lora`) are put into the causal LM once, and re-initialised before and after
every message: LoRA B = 0, so the model computes exactly what the base model computes, and A is
re-drawn from the seed, so two messages on the same passages take the same steps. The optimizer
is new for every message.

With ``top_layers = L`` only the top L decoder layers get LoRA modules. The base weights are
frozen and the embeddings do not require grad, so autograd records nothing below the lowest LoRA
layer: the backward pass stops there and a step costs the forward plus the backward of L layers
and the head.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .lora import add_lora, layer_index, low_precision_product, matmul_dtype, remove_lora
from .vocabulary import SettingError

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
OPTIMIZERS = ("adam", "adamw", "sgd")
# What a step's loss is on: the passage alone; the passage as the answer to the question (in the chat
# template, after the question); the passage inside the chat template as the model later reads it.
TRAINING_FORMATS = ("passage", "answer", "chat")
# learning_rate in (0, LEARNING_RATE_MAX]: the evaluation's best is 1e-3; a step of 1 already
# overwrites what the model knew (the app's field and the API check this same bound)
LEARNING_RATE_MAX = 1.0
MAX_EPOCHS = 16  # passes over a message's passages: each costs what the first did

StepCallback = Callable[[int, int, float], None]  # on_step(i, n, loss): step i of n (1-based) took `loss`


@dataclass(frozen=True)
class AdaptationSettings:
    """How a message adapts the model: the best of the evaluation's sweep (README: Evaluation) —
    learning rate 1e-3 (of 1e-3, 3e-3, 1e-2), every layer (top 8 learned far less), LoRA on the
    MLP too; rank 8 (32 did the same); a step per passage (`together`: one on all of them answered
    the same, README: Answers)."""

    rank: int = 8
    alpha: float = 16.0  # LoRA scaling is alpha / rank
    dropout: float = 0.0
    # "all-linear" (attention and MLP, not the head), "attention" (q/k/v/o), or module names;
    # all-linear learned 1.0 +- 0.5 points more than attention in the evaluation (README)
    target_modules: str | tuple[str, ...] = "all-linear"
    learning_rate: float = 1e-3
    optimizer: str = "adam"  # "adam", "adamw" or "sgd"
    max_passage_tokens: int = 256
    top_layers: int | None = None  # None: every decoder layer; L: only the top L layers
    training: str = "passage"  # one of TRAINING_FORMATS
    # passes over the selected passages: a message takes epochs × N steps, all of the first pass
    # first (README, Answers: a fact only learned is said after about 4 passes, not after one)
    epochs: int = 1
    # one optimizer step on a pass's passages together (the mean of their losses, one forward and
    # backward over them as one right-padded batch, at learning_rate × their number: Adam's first
    # step moves each weight by about its rate, so the n steps it replaces could move it n times
    # as far) instead of one step per passage in turn
    together: bool = False
    seed: int = 0

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise SettingError(message.split()[0], f"invalid adaptation setting: {message}")

        check(_is_int(self.rank) and self.rank >= 1, f"rank must be an integer >= 1, got {self.rank!r}")
        check(_is_real(self.alpha) and self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}")
        check(_is_real(self.dropout) and 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout!r}")
        check(
            _is_real(self.learning_rate) and math.isfinite(self.learning_rate)
            and 0 < self.learning_rate <= LEARNING_RATE_MAX,
            f"learning_rate must be a finite number > 0 and <= {LEARNING_RATE_MAX:g}, got {self.learning_rate!r}",
        )
        check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        check(
            _is_int(self.max_passage_tokens) and self.max_passage_tokens >= 2,
            f"max_passage_tokens must be an integer >= 2, got {self.max_passage_tokens!r}",
        )
        check(
            self.top_layers is None or (_is_int(self.top_layers) and self.top_layers >= 1),
            f"top_layers must be None (all layers) or an integer >= 1, got {self.top_layers!r}",
        )
        check(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        check(_is_int(self.epochs) and 1 <= self.epochs <= MAX_EPOCHS,
              f"epochs must be an integer in [1, {MAX_EPOCHS}], got {self.epochs!r}")
        check(isinstance(self.together, bool), f"together must be true or false, got {self.together!r}")
        check(self.training in TRAINING_FORMATS,
              f"training must be one of {', '.join(TRAINING_FORMATS)}, got {self.training!r}")
        targets = self.target_modules
        if isinstance(targets, list):
            object.__setattr__(self, "target_modules", targets := tuple(targets))
        check(
            targets in ("attention", "all-linear")
            or (isinstance(targets, tuple) and targets and all(isinstance(t, str) and t for t in targets)),
            f"target_modules must be 'attention', 'all-linear' or a non-empty list of module names, got {targets!r}",
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------
# pure functions


# Models whose logits are exactly lm_head(last hidden state): no soft-capping or scaling after the head.
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3"}
HEAD_CHUNK_ELEMENTS = 1 << 23  # logits computed about this many at a time (32 MiB in fp32)


def next_token_loss(model: nn.Module, input_ids: torch.Tensor, first_target: int = 1) -> torch.Tensor:
    """Mean next-token negative log-likelihood of `input_ids` (shape [T] or [1, T], T >= 2) from
    position s = `first_target` on (the tokens before s are read, not learned):

        loss = -1/(T-s) · Σ_{t=s}^{T-1} log p_model(x_t | x_0 .. x_{t-1})     (in nats)

    Where the head is a plain frozen linear layer (the default model), the loss comes from the
    last hidden states through `head_loss`, so the [T, vocab] logits are never held whole;
    otherwise from the model's own logits.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if not 1 <= first_target < input_ids.shape[1]:
        raise ValueError(f"first_target must be in [1, {input_ids.shape[1] - 1}], got {first_target}")
    return next_token_losses(model, [input_ids[0]], [first_target])[0]


def next_token_losses(model: nn.Module, sequences: Sequence[torch.Tensor], first_targets: Sequence[int]) -> torch.Tensor:
    """`next_token_loss` of each sequence [T_b] (from position s_b = first_targets[b] on), by one
    forward over them as a batch, right-padded to the longest: a causal model's position t reads
    positions ≤ t only, so no token of a sequence reads the padding after it, and the padding's own
    positions are in no loss. Returns the losses [B] (nats)."""
    if not sequences or any(not 1 <= s < len(ids) for ids, s in zip(sequences, first_targets)):
        raise ValueError("every sequence needs a token to predict after its first target")
    longest = max(len(ids) for ids in sequences)
    batch = torch.stack([F.pad(ids, (0, longest - len(ids)), value=int(ids[-1])) for ids in sequences])
    head = model.get_output_embeddings()
    if (
        getattr(model.config, "model_type", None) in PLAIN_HEAD_MODELS
        and isinstance(head, nn.Linear)
        and head.bias is None
        and not head.weight.requires_grad
    ):
        hidden = model.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state
        # the head's products in the dtype the engine chose for base matmuls (`lora.base_matmuls`)
        weight, dtype = head.weight, matmul_dtype()
        return torch.stack([head_loss(hidden[b, s - 1:len(ids) - 1], weight, ids[s:], dtype)
                            for b, (ids, s) in enumerate(zip(sequences, first_targets))])
    logits = model(input_ids=batch, use_cache=False).logits
    return torch.stack([F.cross_entropy(logits[b, s - 1:len(ids) - 1].float(), ids[s:])
                        for b, (ids, s) in enumerate(zip(sequences, first_targets))])


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits z_t = W h_t against the targets y_t (hidden: [n, d],
    weight: [V, d], frozen), equal to F.cross_entropy(hidden @ weight.T, targets), the products
    in `dtype` where given (on W's kept copy, `lora.low_precision_product`), else in W's:

        loss = 1/n · Σ_t [logsumexp(z_t) − z_t[y_t]]        ∂loss/∂h_t = (softmax(z_t) − onehot(y_t)) W / n

    computed over chunks of rows, the gradient in the same pass: the logits are never held whole
    nor kept for the backward (a 256-token passage over a 49k vocabulary would keep 50 MB)."""
    if dtype == weight.dtype:
        dtype = None
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _HeadLoss.apply(hidden, weight, targets, dtype)
    return _chunked_head_loss(hidden, weight, targets, with_grad=False, dtype=dtype)[0] / hidden.shape[0]


def _chunked_head_loss(hidden, weight, targets, with_grad: bool, dtype=None):
    """(Σ_t loss_t, Σ-gradient with respect to hidden or None), chunk by chunk."""
    n = hidden.shape[0]
    chunks = max(1, math.ceil(n * weight.shape[0] / HEAD_CHUNK_ELEMENTS))
    bounds = [n * i // chunks for i in range(chunks + 1)]
    total = hidden.new_zeros((), dtype=torch.float32)
    grad = torch.empty_like(hidden) if with_grad else None
    for start, end in zip(bounds, bounds[1:]):
        logits = (hidden[start:end] @ weight.T if dtype is None else
                  low_precision_product(hidden[start:end].to(dtype), weight, dtype)).float()
        y = targets[start:end, None]
        target_logits = logits.gather(1, y)
        top = logits.amax(-1, keepdim=True)
        exp = logits.sub_(top).exp_()  # in place: the chunk's logits are not needed any more
        norm = exp.sum(-1, keepdim=True)
        total += (top + norm.log() - target_logits).sum()  # logsumexp(z) − z[y]
        if with_grad:
            probs = exp.div_(norm)
            probs.scatter_add_(1, y, probs.new_full(y.shape, -1.0))
            if dtype is None:
                torch.mm(probs, weight, out=grad[start:end])
            else:  # on the head's kept bf16 copy: the product cast back
                grad[start:end] = low_precision_product(probs.to(dtype), weight, dtype, transposed=True)
    return total, grad


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype=None):
        total, grad = _chunked_head_loss(hidden, weight, targets, with_grad=True, dtype=dtype)
        ctx.save_for_backward(grad)
        return total / hidden.shape[0]

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * (grad_loss / grad.shape[0]).to(grad.dtype), None, None, None


def passage_ids(tokenizer, text: str, max_tokens: int) -> list[int]:
    """The token ids of a passage as the model reads it: the tokenizer's own special tokens
    (a BOS where the tokenizer adds one), the text cut at its end to `max_tokens` in all.

    Cut here, not by the tokenizer's `truncation=True`: a fast tokenizer keeps truncation as state
    of its one Rust tokenizer, shared by every thread, so with several messages at once a passage
    came out whole and another thread's prompt came out cut."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) <= max_tokens:
        return ids
    words = tokenizer(text, add_special_tokens=False)["input_ids"]
    specials = len(ids) - len(words)
    before = next((b for b in range(specials + 1) if ids[b:b + len(words)] == words), specials)
    return ids[:before] + words[:max(max_tokens - specials, 0)] + ids[before + len(words):]


def training_tokens(tokenizer, text: str, prefix: str, max_tokens: int,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """The passage as a [1, T] tensor, after the `prefix` it is read in (formatted text such as a
    chat template's, tokenised as it is; none: the passage alone, `passage_ids`), and the position
    of the passage's first token: where its loss starts."""
    if not prefix:
        return torch.tensor([passage_ids(tokenizer, text, max_tokens)], dtype=torch.long, device=device), 1
    before = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = before + tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return torch.tensor([ids], dtype=torch.long, device=device), max(len(before), 1)


def initial_lora_a(layers: Iterable[nn.Module], seed: int) -> list[torch.Tensor]:
    """Each LoRA layer's A as a fresh adapter starts (B = 0): drawn from `seed` as peft draws it
    (Kaiming-uniform, a = √5), layer after layer in the given order, on the CPU so that the draw
    is the same on every device."""
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    for layer in layers:
        a = torch.empty(layer.lora_A.shape, dtype=layer.lora_A.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        drawn.append(a.to(layer.lora_A.device))
    return drawn


def new_optimizer(parameters: Sequence[torch.Tensor], settings: AdaptationSettings) -> torch.optim.Optimizer:
    """A fresh optimizer of the settings' kind and learning rate over `parameters`."""
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    return kinds[settings.optimizer](parameters, lr=settings.learning_rate, fused=True)


def lora_target_names(model: nn.Module, target_modules: str | tuple[str, ...]) -> list[str]:
    """The module names (last component) that get LoRA: q/k/v/o for "attention"; for "all-linear"
    every nn.Linear of the model except the output head (the MLP projections too)."""
    if target_modules == "attention":
        return list(ATTENTION_MODULES)
    if target_modules == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
        )
    return list(target_modules)


def decoder_layers(model: nn.Module) -> tuple[str, int]:
    """(attribute name, count) of the model's stack of decoder layers: the longest nn.ModuleList."""
    lists = [(len(m), name.rsplit(".", 1)[-1]) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError("top_layers needs a model with a list of decoder layers; this one has none")
    count, name = max(lists)
    return name, count


# ----------------------------------------------------------------------------------------------
# the adapter


class Adapter:
    """A causal LM with LoRA layers in it, for one optimizer step per passage.

    `model` is the model it was given, now carrying the LoRA layers: use it for generation (inside
    `adapted`, it is the adapted model); `remove()` takes the layers out again. The model is in
    eval mode except during a step. One message at a time: the engine serialises messages on an
    adapter. The device is the model's; on the CPU a step uses torch's threads.
    """

    def __init__(self, model: nn.Module, tokenizer, settings: AdaptationSettings | None = None):
        self.settings = settings = settings or AdaptationSettings()
        self.tokenizer = tokenizer
        layers = None
        if settings.top_layers is not None:
            layers_name, count = decoder_layers(model)
            if settings.top_layers > count:
                raise ValueError(f"invalid adaptation setting: top_layers={settings.top_layers} but the model has {count} layers")
            layers = (layers_name, set(range(count - settings.top_layers, count)))
        self.model = model
        self.lora_modules = add_lora(  # name -> LoRA layer, in a fixed order for the seeded init
            model,
            lora_target_names(model, settings.target_modules),
            rank=settings.rank,
            alpha=settings.alpha,
            dropout=settings.dropout,
            layers=layers,
        )
        self.trainable = [p for m in self.lora_modules.values() for p in (m.lora_A, m.lora_B)]
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        self.reset()

    def remove(self) -> nn.Module:
        """Take the LoRA layers out of the model and return it, as it was given."""
        return remove_lora(self.model)

    @property
    def adapted_layers(self) -> list[int]:
        """The indices of the decoder layers that carry LoRA layers, in order."""
        layers_name, _ = decoder_layers(self.model)
        return sorted({layer_index(name, layers_name) for name in self.lora_modules})

    @property
    def device(self) -> torch.device:
        return self.trainable[0].device

    # -- state -------------------------------------------------------------------------------

    @torch.no_grad()
    def reset(self) -> None:
        """A fresh adapter: B = 0 (the model equals the base), A drawn from the seed
        (`initial_lora_a`); a new optimizer; eval mode."""
        for layer, a in zip(self.lora_modules.values(), initial_lora_a(self.lora_modules.values(), self.settings.seed)):
            layer.lora_A.copy_(a)
            layer.lora_B.zero_()
        for p in self.trainable:
            p.grad = None
        self.optimizer = new_optimizer(self.trainable, self.settings)
        self.steps = 0
        self.model.eval()

    # -- steps -------------------------------------------------------------------------------

    def tokens(self, text: str) -> torch.Tensor:
        """The passage as a [1, T] tensor on the model's device (T <= max_passage_tokens)."""
        ids = passage_ids(self.tokenizer, text, self.settings.max_passage_tokens)
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def training_tokens(self, text: str, prefix: str = "") -> tuple[torch.Tensor, int]:
        """`training_tokens` with this adapter's tokenizer, passage length and device."""
        return training_tokens(self.tokenizer, text, prefix, self.settings.max_passage_tokens, self.device)

    def step(self, text: str, prefix: str = "") -> float:
        """One optimizer step on the next-token loss of `text` (read after `prefix`, which is not
        learned); returns the loss before the step. A passage with nothing to predict takes no
        step, and the loss is nan."""
        input_ids, first = self.training_tokens(text, prefix)
        if input_ids.shape[1] <= first:
            return float("nan")
        self.model.train()
        try:
            loss = next_token_loss(self.model, input_ids, first)
            loss.backward()
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.eval()
        self.steps += 1
        return loss.item()

    def step_together(self, texts: Sequence[str], prefixes: Sequence[str] | None = None) -> list[float]:
        """One optimizer step on the mean of the passages' next-token losses (each read after its
        prefix), computed in one forward and backward over them as a batch (`next_token_losses`),
        at the learning rate × the number of passages in it (`AdaptationSettings.together`);
        returns each passage's loss before the step (nan for one with nothing to predict, which is
        left out). No step when no passage has anything to predict."""
        prefixes = list(prefixes) if prefixes is not None else [""] * len(texts)
        tokenised = [self.training_tokens(text, prefix) for text, prefix in zip(texts, prefixes)]
        learnable = [i for i, (ids, first) in enumerate(tokenised) if ids.shape[1] > first]
        losses = [float("nan")] * len(texts)
        if not learnable:
            return losses
        sequences = [tokenised[i][0][0] for i in learnable]  # each [1, T] as [T]
        self.model.train()
        try:
            each = next_token_losses(self.model, sequences, [tokenised[i][1] for i in learnable])
            each.mean().backward()
            for group in self.optimizer.param_groups:
                group["lr"] = self.settings.learning_rate * len(learnable)
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.eval()
        self.steps += 1
        for i, loss in zip(learnable, each.tolist()):
            losses[i] = loss
        return losses

    def adapt(self, texts: Sequence[str], on_step: StepCallback | None = None) -> list[float]:
        """One step per passage, in order, on the current adapter; `on_step(i, n, loss)` after each
        (i from 1). Returns the losses. An exception (from a step or the callback) propagates and
        leaves the adapter part-way: use `adapted` to get the base model back whatever happens."""
        texts = list(texts)
        losses = []
        for i, text in enumerate(texts, 1):
            losses.append(self.step(text))
            if on_step is not None:
                on_step(i, len(texts), losses[-1])
        return losses

    @contextmanager
    def adapted(self, texts: Iterable[str], on_step: StepCallback | None = None) -> Iterator[list[float]]:
        """Reset, adapt on `texts` (one step each) and yield the losses; on exit — normal, by an
        exception or by KeyboardInterrupt, during the steps or inside the block — reset, so the
        model equals the base model again."""
        self.reset()
        try:
            yield self.adapt(list(texts), on_step)
        finally:
            self.reset()

    @contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """The base model, whatever the adapter holds (for the "off" and "context" modes)."""
        for layer in self.lora_modules.values():
            layer.enabled = False
        try:
            yield self.model
        finally:
            for layer in self.lora_modules.values():
                layer.enabled = True
