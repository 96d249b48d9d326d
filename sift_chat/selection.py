r"""Data selection for test-time fine-tuning: SIFT and the baselines it is compared with.

Everything here is a pure function of a prompt embedding ``x*`` (the *query*), ``K``
candidate passage embeddings and a noise level ``λ``. The kernel is the plain inner
product ``k(a, b) = aᵀb`` (the cosine for unit-normalised embeddings, so ``σ₀² = 1``).

After selecting the multiset ``X = x₁..xₙ`` the posterior variance of the prompt is::

    σ²_X(x*) = k(x*,x*) − k_X(x*)ᵀ (K_XX + λI)⁻¹ k_X(x*)

Picks are made one at a time. With ``k_n`` the posterior kernel after ``n`` picks,
picking candidate ``j`` updates it by a rank-one correction::

    k_{n+1}(a,b) = k_n(a,b) − k_n(a,j) k_n(j,b) / (k_n(j,j) + λ)
    σ²_{n+1}     = σ²_n − k_n(x*,j)² / (k_n(j,j) + λ)     # uncertainty reduction of pick n+1

Methods (all pick from the same candidates; repeats allowed unless said otherwise):

- ``"sift"``: ``argmax_x k_n(x*,x)² / (k_n(x,x) + λ)``, i.e. the pick that minimises
  ``σ²_{n+1}``. A picked passage may be picked again when it is still the best one;
  an exact copy of a picked passage gains only ``c²λ/((1+λ)(2+λ)) ≈ c²λ/2``
  (c = its similarity), so copies are skipped while a new relevant direction remains.
  Large λ trusts each observation less: as λ → ∞ the gain ranks by ``k(x*,x)²`` alone
  and a second look at the best passage is worth almost as much as the first, so
  SIFT(λ→∞) repeats the candidate with the largest ``|k(x*,x)|`` (NN-F, not NN).
- ``"nn"``:   the ``n`` most similar *distinct* candidates, by ``k(x*,x)`` (cosine order);
  fewer when K < n (stop_reason "no_candidates").
- ``"nnf"``:  the single most similar candidate, repeated ``n`` times.
- ``"us"``:   uncertainty sampling, ``argmax_x k_n(x,x)`` (diversity without relevance).

Every method reports the prompt's σ² after each of its picks, computed with the same
update, so the curves can be plotted side by side.

How it is computed. For the linear kernel ``k_n(a,b) = aᵀ Σ_n b`` with the d×d matrix
``Σ_n = I − Σ_{t≤n} v_t v_tᵀ``, where ``v_{t} = Σ_{t-1} x_{j_t} / √(k_{t-1}(j_t,j_t) + λ)``
are the "conditional embeddings" of the picks. The ``n × d`` matrix ``V`` is kept in
float64 (it is tiny), so σ² and the reductions are exact to float64 rounding even for
λ = 1e-8 and exact duplicates. For scoring, two K-vectors are kept,
``k_n(x*,x)`` and ``k_n(x,x)``, and each pick updates them with one matrix-vector
product ``u = C v`` over the candidates (float32, or float64 for float64 input)::

    k_{n+1}(x*,x) = k_n(x*,x) − u(x*) u(x)        k_{n+1}(x,x) = k_n(x,x) − u(x)²

so a step costs O(K·d + K) with no K×K matrix and no matrix inverse. (Scoring in float32
means two candidates whose gains differ by less than ~1e-6 σ₀² may be picked in either
order; the reported σ² is exact for the picks actually made.)

Adaptive stopping (any method; checked before each pick ``i = 1, 2, …``):

- ``min_reduction``: stop before pick i if ``σ²_{i-1} − σ²_i < min_reduction · σ₀²``.
- ``alpha``: keep pick i only while ``α · i · σ_i ≤ 1``, with ``σ_i = √σ²_i`` the
  posterior *standard deviation* of the prompt after pick i. This is activeft's
  "Adaptive SIFT" rule (``Retriever(alpha=…)``, activeft on GitHub, commit
  "Adaptive SIFT (#93)"; not in the 0.1.1 release): there
  ``uncertainty = sqrt(-values)`` with ``values[i]`` VTL's acquisition value of pick i,
  which is minus the prompt's posterior variance after that pick. Two differences:
  activeft drops *every* pick that breaks the rule and keeps later ones that pass,
  while this stops at the first one (a prefix of the greedy order); and activeft sums
  the variance over the prompt's m token embeddings, here the prompt is one vector.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .vocabulary import METHODS

STOP_REASONS = ("max_steps", "min_reduction", "alpha", "no_candidates")


@dataclass(frozen=True, eq=False)  # tensors have no single truth value, so no __eq__
class Selection:
    """The picks of one method for one prompt, with the prompt's σ² after each pick.

    All tensors live on the CPU and have one entry per pick (in pick order).
    """

    method: str
    indices: torch.Tensor  # int64, positions into `candidates`; repeats possible for sift/nnf/us
    posterior_variance: torch.Tensor  # float64, σ²_i of the prompt after pick i
    uncertainty_reduction: torch.Tensor  # float64, σ²_{i-1} − σ²_i
    similarity: torch.Tensor  # float64, k(x*, x_i): cosine of pick i to the prompt
    prior_variance: float  # σ₀² = k(x*, x*)
    stop_reason: str  # one of STOP_REASONS

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def final_variance(self) -> float:
        """σ² of the prompt after the last pick (σ₀² when nothing was picked)."""
        if len(self) == 0:
            return self.prior_variance
        return float(self.posterior_variance[-1])

    def to_dict(self) -> dict:
        """Plain Python values (lists, floats, str), ready for JSON or SQLite."""
        return {
            "method": self.method,
            "indices": self.indices.tolist(),
            "posterior_variance": self.posterior_variance.tolist(),
            "uncertainty_reduction": self.uncertainty_reduction.tolist(),
            "similarity": self.similarity.tolist(),
            "prior_variance": self.prior_variance,
            "final_variance": self.final_variance,
            "stop_reason": self.stop_reason,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Selection":
        """Inverse of `to_dict` (ignores the derived `final_variance`)."""
        f64 = torch.float64
        return cls(
            method=d["method"],
            indices=torch.tensor(d["indices"], dtype=torch.int64),
            posterior_variance=torch.tensor(d["posterior_variance"], dtype=f64),
            uncertainty_reduction=torch.tensor(d["uncertainty_reduction"], dtype=f64),
            similarity=torch.tensor(d["similarity"], dtype=f64),
            prior_variance=float(d["prior_variance"]),
            stop_reason=d["stop_reason"],
        )


@torch.no_grad()
def select(
    query: torch.Tensor,
    candidates: torch.Tensor,
    method: str = "sift",
    n: int = 10,
    lam: float = 0.01,
    min_reduction: float | None = None,
    alpha: float | None = None,
) -> Selection:
    r"""Select up to `n` of `candidates` (shape (K, d)) for the prompt `query` (shape (d,)).

    Inputs may live on any device and have any real dtype; work happens on the candidates'
    device, in float64 for float64 candidates and float32 otherwise (the query is cast to
    that dtype first). Unit-normalised inputs are assumed by the method, not required.
    The returned tensors are on the CPU.

    :param method: one of `METHODS` (see the module docstring for each rule).
    :param n: maximum number of picks (n = 0 gives an empty selection).
    :param lam: observation noise λ > 0. Small λ favours diversity, large λ relevance.
    :param min_reduction: stop before a pick whose uncertainty reduction is below
        `min_reduction · σ₀²` (stop_reason "min_reduction").
    :param alpha: stop before pick i if `alpha · i · σ_i > 1` (stop_reason "alpha").
    :return: a `Selection`; stop_reason is "max_steps" when n picks were made and
        "no_candidates" when K = 0 or NN ran out of distinct candidates.
    """
    _check_args(query, candidates, method, n, lam, min_reduction, alpha)
    device = candidates.device
    # Scoring runs in float32 (float64 if that is what came in); the posterior in float64.
    compute_dtype = torch.float64 if candidates.dtype == torch.float64 else torch.float32
    C = candidates.to(compute_dtype)
    q = query.to(device=device, dtype=compute_dtype)
    q64 = q.double()
    K, d = C.shape
    prior_variance = float(q64 @ q64)

    def result(picks: list[int], variances: list[float], reductions: list[float], reason: str):
        indices = torch.tensor(picks, dtype=torch.int64)
        similarity = C[indices.to(device)].double() @ q64 if picks else torch.zeros(0)
        return Selection(
            method=method,
            indices=indices,
            posterior_variance=torch.tensor(variances, dtype=torch.float64),
            uncertainty_reduction=torch.tensor(reductions, dtype=torch.float64),
            similarity=similarity.to(dtype=torch.float64, device="cpu"),
            prior_variance=prior_variance,
            stop_reason=reason,
        )

    sq_norms = torch.linalg.vector_norm(C, dim=1).square()  # k(x, x), (K,)
    if not bool(torch.isfinite(sq_norms).all()):  # one pass instead of isfinite(C): NaN/inf propagate
        raise ValueError("candidates contain NaN or inf (or entries whose squares overflow)")
    if n == 0:
        return result([], [], [], "max_steps")
    if K == 0:
        return result([], [], [], "no_candidates")

    similarity = C @ q  # k(x*, x), (K,)
    steps = n
    order = None
    if method == "nn":  # the most similar distinct candidates; ties go to the lower index
        steps = min(n, K)
        order = torch.sort(similarity, descending=True, stable=True).indices[:steps].tolist()
    elif method == "nnf":
        order = [int(torch.argmax(similarity))] * n

    scored = method in ("sift", "us")
    if scored:
        cov = similarity.clone()  # k_n(x*, x)
        var_lam = sq_norms + lam  # k_n(x, x) + λ

    # Conditional embeddings v_t as rows of V; rows not yet filled are zero and add nothing.
    V = torch.zeros(steps, d, dtype=torch.float64, device=device)
    Vt = V.T
    xq = torch.stack((q64, q64))  # row 0: the pick x_j (float64), row 1: the prompt x*
    x = xq[0]
    v = torch.empty(d, dtype=compute_dtype, device=device)
    u = torch.empty(K, dtype=compute_dtype, device=device)
    sigma2 = prior_variance
    picks: list[int] = []
    variances: list[float] = []
    reductions: list[float] = []
    for i in range(steps):
        if method == "sift":
            j = int(torch.argmax(cov * cov / var_lam))
        elif method == "us":
            j = int(torch.argmax(var_lam))
        else:
            j = order[i]

        # Condition on x_j in d-space, exactly in float64: Σ_n x_j = x_j − Vᵀ(V x_j).
        x.copy_(C[j])
        sigma_x = torch.addmv(x, Vt, V @ x, alpha=-1)
        k_jj, k_qj = (xq @ sigma_x).tolist()  # k_n(j, j), k_n(x*, j)
        k_jj = max(k_jj, 0.0)
        reduction = k_qj * k_qj / (k_jj + lam)
        new_sigma2 = max(sigma2 - reduction, 0.0)

        if min_reduction is not None and reduction < min_reduction * prior_variance:
            return result(picks, variances, reductions, "min_reduction")
        if alpha is not None and alpha * (i + 1) * math.sqrt(new_sigma2) > 1:
            return result(picks, variances, reductions, "alpha")

        picks.append(j)
        variances.append(new_sigma2)
        reductions.append(reduction)
        sigma2 = new_sigma2
        scale = math.sqrt(k_jj + lam)
        v_i = V[i]
        torch.div(sigma_x, scale, out=v_i)  # v_{n+1} = Σ_n x_j / √(k_n(j,j) + λ)
        if scored and i + 1 < steps:
            v.copy_(v_i)
            torch.mv(C, v, out=u)  # u(x) = k_n(x, j) / √(k_n(j,j) + λ): the one O(K·d) op
            cov.sub_(u, alpha=k_qj / scale)  # k_{n+1}(x*, x) = k_n(x*, x) − u(x*) u(x)
            var_lam.addcmul_(u, u, value=-1).clamp_(min=lam)  # k_{n+1}(x, x) = k_n(x, x) − u(x)², ≥ 0

    return result(picks, variances, reductions, "max_steps" if steps == n else "no_candidates")


def _check_args(query, candidates, method, n, lam, min_reduction, alpha) -> None:
    """Raise ValueError with a one-line message for anything `select` cannot work with."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not _finite_number(lam) or lam <= 0:
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
    if min_reduction is not None and (not _finite_number(min_reduction) or min_reduction < 0):
        raise ValueError(f"min_reduction must be a finite number >= 0 or None, got {min_reduction!r}")
    if alpha is not None and (not _finite_number(alpha) or alpha <= 0):
        raise ValueError(f"alpha must be a finite number > 0 or None, got {alpha!r}")
    for name, t, ndim in (("query", query, 1), ("candidates", candidates, 2)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    if query.is_floating_point() and not bool(torch.isfinite(query).all()):
        raise ValueError("query contains NaN or inf")  # candidates are checked in `select`
    if candidates.shape[1] != query.shape[0]:
        raise ValueError(
            f"dimension mismatch: query has d={query.shape[0]}, candidates have d={candidates.shape[1]}"
        )


def _finite_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
