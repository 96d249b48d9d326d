"""What one message does: `ChatSettings`, checked when made (a request's settings are parsed
into one by `panel.parse_settings`; the app's sliders and the API show the same bounds)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .vocabulary import CONTRAST_TARGETS, METHODS, MODES, SettingError, quoted

# Bounds of the settings a request may carry (the app's sliders and the API check the same ones)
SEED_MAX = 2**63 - 1  # seed in [0, SEED_MAX]: what torch's generators take
READ_PASSAGES_MAX = 8  # each passage read is a row of every decoding forward
MIN_REDUCTION_MAX = 1.0  # min_reduction in [0, 1]: a share of the prompt's prior uncertainty σ₀² = 1


@dataclass(frozen=True)
class ChatSettings:
    """What one message does: read the lead and learn from 4 SIFT picks at λ = 0.01, the answer
    decoded against the base model: the configuration that answered best (README: Answers)."""

    method: str = "sift"  # sift, nn, nnf, us
    # "both": the lead read, a step on each pick; it answered the world's questions better than
    # "context" (reading alone) and lowered the reference answer's bits on nearly every question
    mode: str = "both"  # fine-tune, context, both, off
    passages: int = 4  # N: at most this many picks (one step each per pass); 8 cost 1.5x reading's time
    candidates: int = 200  # K: pre-selected by the index
    lam: float = 0.01  # λ, SIFT's noise: small favours diversity, large relevance
    min_reduction: float | None = None  # stop when a pick removes less than this fraction of σ₀²
    alpha: float | None = None  # or activeft's rule: keep pick n while α·n·σ_n ≤ 1
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    repetition_penalty: float = 1.0  # on the answer's own tokens (1: off)
    no_repeat_ngram: int = 0  # no n-gram twice in an answer (0: off)
    loop_tokens: int = 12  # stop when the answer's last this many tokens repeat earlier ones (0: never)
    max_context_tokens: int = 2048  # prompt + history + passages in context
    # the best R candidates read in "context"/"both", each in a row of its own, the answer's tokens
    # drawn from their mixture (`generation.mixture`); the first weighs lead_weight, the others share the rest.
    # Those after the first are read only when their fused score is at least read_min_match of the
    # first's (`retrieval.read_count`): a prompt with one clear best passage reads that one alone
    read_passages: int = 3  # R at most (README: Reading several passages, and when)
    read_min_match: float = 0.8  # 0: always R
    lead_weight: float | None = None  # None: every passage read weighs 1/R (answered two-fact questions best)
    context_contrast: float = 1.0  # α of context-aware decoding (0: off): α = 1 answered best of 0, 0.5, 1 (README)
    # the conversation without the passages under the adapted or the base model: contrasting the
    # adapted model with itself cancels what the steps taught (README: Answers)
    contrast_against: str = "base"
    seed: int = 0

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise SettingError(message.split()[0], f"invalid chat setting: {message}")

        check(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {quoted(self.method)}")
        check(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {quoted(self.mode)}")
        check(isinstance(self.passages, int) and 0 <= self.passages <= 1000,
              f"passages must be an integer in [0, 1000], got {quoted(self.passages)}")
        check(isinstance(self.candidates, int) and self.candidates >= 1,
              f"candidates must be an integer >= 1, got {quoted(self.candidates)}")
        check(isinstance(self.lam, (int, float)) and 0 < self.lam < float("inf"),
              f"lam must be a number > 0, got {quoted(self.lam)}")
        check(isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= 8192,
              f"max_new_tokens must be an integer in [1, 8192], got {quoted(self.max_new_tokens)}")
        check(isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 5,
              f"temperature must be in [0, 5], got {quoted(self.temperature)}")
        check(isinstance(self.max_context_tokens, int) and self.max_context_tokens >= 64,
              f"max_context_tokens must be an integer >= 64, got {quoted(self.max_context_tokens)}")
        check(isinstance(self.repetition_penalty, (int, float)) and 1 <= self.repetition_penalty <= 3,
              f"repetition_penalty must be in [1, 3], got {quoted(self.repetition_penalty)}")
        check(isinstance(self.no_repeat_ngram, int) and 0 <= self.no_repeat_ngram <= 64,
              f"no_repeat_ngram must be an integer in [0, 64], got {quoted(self.no_repeat_ngram)}")
        check(isinstance(self.loop_tokens, int) and 0 <= self.loop_tokens <= 256,
              f"loop_tokens must be an integer in [0, 256], got {quoted(self.loop_tokens)}")
        check(isinstance(self.context_contrast, (int, float)) and 0 <= self.context_contrast <= 3,
              f"context_contrast must be in [0, 3], got {quoted(self.context_contrast)}")
        check(_integer(self.read_passages) and 1 <= self.read_passages <= READ_PASSAGES_MAX,
              f"read_passages must be an integer in [1, {READ_PASSAGES_MAX}], got {quoted(self.read_passages)}")
        check(_real(self.read_min_match) and 0 <= self.read_min_match <= 1,
              f"read_min_match must be a number in [0, 1], got {quoted(self.read_min_match)}")
        check(self.lead_weight is None or (_real(self.lead_weight) and 0 < self.lead_weight <= 1),
              f"lead_weight must be a number in (0, 1], got {quoted(self.lead_weight)}")
        check(self.contrast_against in CONTRAST_TARGETS,
              f"contrast_against must be one of {', '.join(CONTRAST_TARGETS)}, got {quoted(self.contrast_against)}")
        check(self.min_reduction is None or (_real(self.min_reduction) and 0 <= self.min_reduction <= MIN_REDUCTION_MAX),
              f"min_reduction must be a number in [0, {MIN_REDUCTION_MAX:g}] (a share of σ₀²), "
              f"got {quoted(self.min_reduction)}")
        check(self.alpha is None or (_real(self.alpha) and 0 < self.alpha < float("inf")),
              f"alpha must be a number > 0, got {quoted(self.alpha)}")
        check(_integer(self.seed) and 0 <= self.seed <= SEED_MAX,
              f"seed must be an integer in [0, 2**63 - 1], got {quoted(self.seed)}")

    @property
    def fine_tunes(self) -> bool:
        return self.mode in ("fine-tune", "both")

    @property
    def uses_context(self) -> bool:
        return self.mode in ("context", "both")


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
