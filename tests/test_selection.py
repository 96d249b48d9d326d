"""Tests for sift_chat.selection: every σ² trace against the closed form, SIFT's greedy
rule against brute force, the duplicate property, adaptive stopping, activeft parity."""

import json
import math

import pytest
import torch

from sift_chat.selection import METHODS, STOP_REASONS, Selection, select

torch.set_num_threads(1)


# ---------------------------------------------------------------- helpers


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def random_problem(seed: int, K: int = 40, d: int = 16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    query = unit(torch.randn(d, generator=g, dtype=torch.float64)).to(dtype)
    candidates = unit(torch.randn(K, d, generator=g, dtype=torch.float64)).to(dtype)
    return query, candidates


def closed_form_variance(query, picked, lam) -> float:
    """σ²_X(x*) = k(x*,x*) − k_X(x*)ᵀ (K_XX + λI)⁻¹ k_X(x*), in float64, for the multiset X."""
    q, X = query.double(), picked.double().reshape(-1, query.numel())
    if X.shape[0] == 0:
        return float(q @ q)
    k = X @ q
    A = X @ X.T + lam * torch.eye(X.shape[0], dtype=torch.float64)
    return float(q @ q - k @ torch.linalg.solve(A, k))


def brute_force_next_variances(query, candidates, picked_idx, lam) -> torch.Tensor:
    """For every candidate x: the closed-form σ²_{X ∪ {x}}(x*) (float64, shape (K,))."""
    q, C = query.double(), candidates.double()
    K = C.shape[0]
    X = C[picked_idx]  # (m, d)
    Xs = torch.cat([X.expand(K, *X.shape), C[:, None, :]], dim=1)  # (K, m+1, d)
    A = Xs @ Xs.transpose(1, 2) + lam * torch.eye(Xs.shape[1], dtype=torch.float64)
    k = Xs @ q  # (K, m+1)
    return q @ q - (k * torch.linalg.solve(A, k)).sum(dim=1)


def brute_force_candidate_variances(candidates, picked_idx, lam) -> torch.Tensor:
    """k_X(x,x) = k(x,x) − k_X(x)ᵀ (K_XX + λI)⁻¹ k_X(x) for every candidate x (float64, (K,))."""
    C = candidates.double()
    X = C[picked_idx]
    A = X @ X.T + lam * torch.eye(X.shape[0], dtype=torch.float64)
    KX = X @ C.T  # (m, K)
    return (C * C).sum(1) - (KX * torch.linalg.solve(A, KX)).sum(0)


def scenario(name: str, dtype=torch.float32):
    """(query, candidates, n) for the adversarial cases the closed-form test runs over."""
    q, C = random_problem(7, K=30, d=12, dtype=torch.float64)
    if name == "random":
        pass
    elif name == "exact_duplicates":  # every candidate twice, plus a third copy of the best
        best = int(torch.argmax(C @ q))
        C = torch.cat([C, C, C[best : best + 1]])
    elif name == "near_duplicates":
        g = torch.Generator().manual_seed(1)
        C = torch.cat([C, unit(C + 1e-6 * torch.randn(C.shape, generator=g, dtype=torch.float64))])
    elif name == "zero_vector":
        C = torch.cat([C[:10], torch.zeros(1, C.shape[1], dtype=torch.float64), C[10:]])
    elif name == "few_candidates":  # K < n
        C = C[:3]
    elif name == "orthogonal_query":  # nothing in the corpus is related to the prompt
        q = torch.zeros_like(q)
        q[0] = 1.0
        C = C.clone()
        C[:, 0] = 0.0
    else:
        raise KeyError(name)
    return q.to(dtype), C.to(dtype), 12


SCENARIOS = ["random", "exact_duplicates", "near_duplicates", "zero_vector", "few_candidates", "orthogonal_query"]
LAMBDAS = [0.01, 1.0, 1e-8, 1e8]


# ---------------------------------------------------------------- σ² trace = closed form


@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("method", METHODS)
def test_trace_matches_closed_form(method, name, lam):
    query, candidates, n = scenario(name)
    sel = select(query, candidates, method=method, n=n, lam=lam)
    K = candidates.shape[0]
    assert len(sel) == (min(n, K) if method == "nn" else n)
    assert sel.indices.dtype == torch.int64
    assert ((sel.indices >= 0) & (sel.indices < K)).all()
    assert sel.prior_variance == pytest.approx(closed_form_variance(query, candidates[:0], lam), abs=1e-12)
    expected = [closed_form_variance(query, candidates[sel.indices[: i + 1]], lam) for i in range(len(sel))]
    torch.testing.assert_close(sel.posterior_variance, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)
    previous = torch.cat([torch.tensor([sel.prior_variance], dtype=torch.float64), sel.posterior_variance[:-1]])
    torch.testing.assert_close(sel.uncertainty_reduction, previous - sel.posterior_variance, atol=1e-12, rtol=0)
    assert (sel.uncertainty_reduction >= 0).all()
    torch.testing.assert_close(sel.similarity, candidates[sel.indices].double() @ query.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_empty_cases(method):
    query, candidates = random_problem(0)
    sel = select(query, candidates, method=method, n=0)
    assert len(sel) == 0 and sel.stop_reason == "max_steps"
    assert sel.final_variance == sel.prior_variance == pytest.approx(float(query.double() @ query.double()))
    sel = select(query, candidates[:0], method=method, n=5)
    assert len(sel) == 0 and sel.stop_reason == "no_candidates"
    assert sel.posterior_variance.shape == sel.uncertainty_reduction.shape == sel.similarity.shape == (0,)


# ---------------------------------------------------------------- the methods' rules


@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_sift_pick_is_greedy_argmin_of_brute_force(dtype, tol, name, lam):
    """Each pick minimises the closed-form σ² over all candidates (float32 scoring: up to ~1e-7)."""
    query, candidates, n = scenario(name, dtype)
    sel = select(query, candidates, "sift", n=n, lam=lam)
    for i in range(len(sel)):
        variances = brute_force_next_variances(query, candidates, sel.indices[:i], lam)
        picked = variances[sel.indices[i]]
        assert picked <= variances.min() + tol, f"step {i}: picked σ²={picked:.3e}, best {variances.min():.3e}"


def test_us_pick_is_argmax_of_brute_force_posterior_variance():
    query, candidates = random_problem(3, K=25, d=10, dtype=torch.float64)
    candidates = candidates * torch.linspace(0.5, 1.5, 25, dtype=torch.float64)[:, None]  # varied norms
    sel = select(query, candidates, "us", n=15, lam=0.1)
    assert int(sel.indices[0]) == int(torch.argmax((candidates * candidates).sum(1)))
    for i in range(1, len(sel)):
        variances = brute_force_candidate_variances(candidates, sel.indices[:i], 0.1)
        assert variances[sel.indices[i]] >= variances.max() - 1e-10


def test_nn_and_nnf_rules():
    query, candidates = random_problem(4, K=30)
    similarity = candidates.double() @ query.double()
    nn = select(query, candidates, "nn", n=10)
    assert nn.indices.tolist() == torch.argsort(similarity, descending=True)[:10].tolist()
    assert len(set(nn.indices.tolist())) == 10
    assert (nn.similarity[:-1] >= nn.similarity[1:]).all()
    nnf = select(query, candidates, "nnf", n=10)
    assert nnf.indices.tolist() == [int(torch.argmax(similarity))] * 10
    few = select(query, candidates[:4], "nn", n=10)
    assert sorted(few.indices.tolist()) == [0, 1, 2, 3] and few.stop_reason == "no_candidates"


# ---------------------------------------------------------------- duplicates (the poster's example)


def jordan_corpus(exact: bool):
    """Prompt "What is Michael Jordan known for, on and off the court?" in a toy 8-d space.

    e0: basketball career, e1: his business career, e2: phrasing noise, e3..: unrelated topics.
    Passage 0 and 1 state the same basketball fact (1 is an exact or a near copy of 0);
    passage 2 is the distinct business fact, less similar to the prompt than either copy.
    """
    e = torch.eye(8, dtype=torch.float64)
    query = unit(0.8 * e[0] + 0.6 * e[1])
    fact = e[0]
    copy = fact.clone() if exact else unit(e[0] + 0.05 * e[2])
    other = unit(e[1] + 0.1 * e[3])
    g = torch.Generator().manual_seed(0)
    distractors = unit(torch.randn(5, 8, generator=g, dtype=torch.float64) * (torch.arange(8) >= 3))
    return query, torch.cat([torch.stack([fact, copy, other]), distractors]).float()


@pytest.mark.parametrize("exact", [True, False])
def test_sift_skips_the_duplicate_that_nn_picks(exact):
    query, candidates = jordan_corpus(exact)
    nn = select(query, candidates, "nn", n=2)
    assert sorted(nn.indices.tolist()) == [0, 1]  # NN: both copies of the same fact
    sift = select(query, candidates, "sift", n=2)
    assert sift.indices[0] in (0, 1) and sift.indices[1] == 2  # SIFT: the fact, then the other fact
    assert sift.final_variance < nn.final_variance


def test_exact_duplicate_is_worth_about_c2_lambda_over_2():
    query, candidates = jordan_corpus(exact=True)
    lam = 0.01
    c = float(candidates[0].double() @ query.double())
    nnf = select(query, candidates, "nnf", n=2, lam=lam)  # picks passage 0, then 0 again
    expected = c * c * lam / ((1 + lam) * (2 + lam))  # ≈ c²λ/2
    assert nnf.uncertainty_reduction[1].item() == pytest.approx(expected, rel=1e-5)
    nn = select(query, candidates, "nn", n=2, lam=lam)  # picks passage 0, then its copy
    assert nn.uncertainty_reduction[1].item() == pytest.approx(expected, rel=1e-5)


def test_huge_lambda_is_relevance_only():
    """λ → ∞: the gain k(x*,x)²/(k(x,x)+λ) ranks candidates by |similarity|, and because a
    pick observed with huge noise is still almost as informative a second time, sampling
    with replacement repeats the nearest neighbour: SIFT(λ→∞) = NN-F, and its first pick = NN's."""
    query, candidates = random_problem(5, K=50)
    candidates = candidates * torch.sign(candidates @ query)[:, None]  # all similarities ≥ 0
    sift = select(query, candidates, "sift", n=6, lam=1e8)
    assert sift.indices.tolist() == select(query, candidates, "nnf", n=6).indices.tolist()
    assert sift.indices[0] == select(query, candidates, "nn", n=1).indices[0]
    small = select(query, candidates, "sift", n=6, lam=0.01)
    assert len(set(small.indices.tolist())) == 6  # small λ: diverse


# ---------------------------------------------------------------- adaptive stopping


def orthonormal_problem(m: int = 8, extra: int = 4):
    """m orthonormal passages, prompt = their normalised sum: every fresh pick removes
    1/(m(1+λ)) of σ², so σ²_i = 1 − i/(m(1+λ)) for i ≤ m."""
    candidates = torch.eye(m + extra)  # the last `extra` passages are unrelated to the prompt
    query = unit(torch.cat([torch.ones(m), torch.zeros(extra)]))
    return query, candidates


def test_sift_on_orthonormal_passages_matches_formula():
    query, candidates = orthonormal_problem()
    m, lam = 8, 0.01
    sel = select(query, candidates, "sift", n=m, lam=lam)
    assert sorted(sel.indices.tolist()) == list(range(m))
    expected = torch.tensor([1 - i / (m * (1 + lam)) for i in range(1, m + 1)], dtype=torch.float64)
    torch.testing.assert_close(sel.posterior_variance, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_runs_to_n_without_stopping_rules(method):
    query, candidates = orthonormal_problem()
    sel = select(query, candidates, method, n=10)
    assert len(sel) == 10 and sel.stop_reason == "max_steps"


def test_min_reduction_stops_when_the_fresh_passages_run_out():
    query, candidates = orthonormal_problem()
    m, lam = 8, 0.01
    fresh_gain = 1 / (m * (1 + lam))
    full = select(query, candidates, "sift", n=m + 3, lam=lam)
    assert full.uncertainty_reduction[m] < fresh_gain / 2  # a repeat is worth far less
    sel = select(query, candidates, "sift", n=m + 3, lam=lam, min_reduction=fresh_gain / 2)
    assert len(sel) == m and sel.stop_reason == "min_reduction"
    assert sel.indices.tolist() == full.indices[:m].tolist()
    too_high = select(query, candidates, "sift", n=5, lam=lam, min_reduction=1.5 * fresh_gain)
    assert len(too_high) == 0 and too_high.stop_reason == "min_reduction"


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_min_reduction_is_relative_to_prior_variance(scale):
    query, candidates = orthonormal_problem()
    fresh_fraction = 1 / (8 * 1.01)  # each fresh pick removes this fraction of σ₀²
    query = scale * query  # σ₀² = scale²
    sel = select(query, candidates, "sift", n=11, min_reduction=fresh_fraction / 2)
    assert len(sel) == 8 and sel.stop_reason == "min_reduction"
    assert len(select(query, candidates, "sift", n=11, min_reduction=fresh_fraction * 1.01)) == 0


def test_alpha_keeps_pick_i_while_alpha_i_sigma_i_at_most_1():
    query, candidates = orthonormal_problem()
    m, lam, alpha = 8, 0.01, 0.5
    sigma = [math.sqrt(1 - i / (m * (1 + lam))) for i in range(1, m + 1)]
    kept = next(i for i in range(m) if alpha * (i + 1) * sigma[i] > 1)  # α·i·σ_i: 0.47, 0.87, 1.19
    assert kept == 2
    sel = select(query, candidates, "sift", n=m, lam=lam, alpha=alpha)
    assert len(sel) == kept and sel.stop_reason == "alpha"
    assert all(alpha * (i + 1) * math.sqrt(v) <= 1 for i, v in enumerate(sel.posterior_variance.tolist()))
    assert len(select(query, candidates, "sift", n=m, lam=lam, alpha=1 / (0.99 * sigma[0]))) == 0
    assert len(select(query, candidates, "sift", n=m, lam=lam, alpha=1e-3)) == m


def test_stopping_on_random_data_is_a_prefix():
    query, candidates = random_problem(11, K=200, d=32)
    full = select(query, candidates, "sift", n=30)
    threshold = float(full.uncertainty_reduction[10])
    sel = select(query, candidates, "sift", n=30, min_reduction=threshold * 1.000001)
    first_small = next(i for i, r in enumerate(full.uncertainty_reduction.tolist()) if r < threshold * 1.000001)
    assert 0 < len(sel) == first_small <= 10
    assert sel.indices.tolist() == full.indices[: len(sel)].tolist()


# ---------------------------------------------------------------- activeft parity


def activeft_vtl(query, candidates, n, lam, lazy=False):
    """activeft 0.1.1's VTL (or LazyVTL) over all candidates in one mini-batch."""
    pytest.importorskip("activeft")
    from activeft import ActiveDataLoader
    from activeft.acquisition_functions.lazy_vtl import LazyVTL
    from activeft.acquisition_functions.vtl import VTL
    from activeft.sift import Dataset

    K = candidates.shape[0]
    cls = LazyVTL if lazy else VTL
    acquisition = cls(target=query[None].float(), noise_std=math.sqrt(lam), mini_batch_size=max(K, n) + 1,
                      num_workers=0, subsample=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # its DataLoader shuffles
        indices, values = ActiveDataLoader(Dataset(candidates.float()), batch_size=n,
                                           acquisition_function=acquisition).next()
    return indices, values


@pytest.mark.parametrize("seed, lam", [(0, 0.01), (1, 0.01), (2, 0.1), (3, 1.0)])
def test_same_picks_as_activeft_vtl(seed, lam):
    query, candidates = random_problem(seed, K=150, d=24)
    theirs, values = activeft_vtl(query, candidates, 20, lam)
    ours = select(query, candidates, "sift", n=20, lam=lam)
    assert ours.indices.tolist() == theirs.tolist()
    torch.testing.assert_close(ours.posterior_variance, -values.double(), atol=1e-5, rtol=0)


def test_same_trace_as_activeft_vtl_with_exact_copies():
    query, candidates = random_problem(8, K=40, d=16)
    candidates = torch.cat([candidates, candidates[:20]])  # copies: their gains tie
    lam = 0.01
    theirs, values = activeft_vtl(query, candidates, 25, lam)
    ours = select(query, candidates, "sift", n=25, lam=lam)
    torch.testing.assert_close(ours.posterior_variance, -values.double(), atol=1e-5, rtol=0)
    theirs_trace = [closed_form_variance(query, candidates[theirs[: i + 1]], lam) for i in range(25)]
    torch.testing.assert_close(ours.posterior_variance, torch.tensor(theirs_trace, dtype=torch.float64),
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------- dtypes, devices, serialisation


def assert_same_selection(a, b, atol):
    """The same picks, in order, and σ² traces equal to `atol`."""
    assert a.indices.tolist() == b.indices.tolist()
    torch.testing.assert_close(a.posterior_variance, b.posterior_variance, atol=atol, rtol=0)


def test_float32_and_float64_agree():
    q32, c32 = random_problem(12, K=300, d=32)
    s32 = select(q32, c32, "sift", n=25)
    s64 = select(q32.double(), c32.double(), "sift", n=25)
    assert_same_selection(s32, s64, atol=1e-9)
    for s in (s32, s64):
        assert s.indices.dtype == torch.int64 and s.posterior_variance.dtype == torch.float64
        assert s.indices.device.type == "cpu"


def test_other_input_dtypes_are_accepted():
    query, candidates = random_problem(13, K=50, d=16)
    ref = select(query, candidates, "sift", n=5)
    half = select(query.half(), candidates.half(), "sift", n=5)
    assert len(half) == 5 and half.posterior_variance.dtype == torch.float64
    ints = select(torch.tensor([1, 0, 0]), torch.tensor([[1, 0, 0], [0, 1, 0], [2, 1, 0]]), "nn", n=2)
    assert ints.indices.tolist() == [2, 0]
    assert len(ref) == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    query, candidates = random_problem(14, K=500, d=32)
    cpu = select(query, candidates, "sift", n=20)
    gpu = select(query.cuda(), candidates.cuda(), "sift", n=20)
    assert_same_selection(gpu, cpu, atol=1e-6)


def test_to_dict_is_plain_json_and_round_trips():
    query, candidates = random_problem(15)
    sel = select(query, candidates, "sift", n=6, min_reduction=0.0)
    d = json.loads(json.dumps(sel.to_dict()))
    assert d["indices"] == sel.indices.tolist() and d["stop_reason"] == "max_steps"
    assert d["final_variance"] == pytest.approx(sel.final_variance)
    back = Selection.from_dict(d)
    assert back.indices.tolist() == sel.indices.tolist()
    torch.testing.assert_close(back.posterior_variance, sel.posterior_variance)
    assert back.stop_reason in STOP_REASONS


# ---------------------------------------------------------------- invalid arguments


Q, C = random_problem(16, K=10, d=8)
NAN_Q = Q.clone()
NAN_Q[0] = float("nan")
INF_C = C.clone()
INF_C[3, 2] = float("inf")
NAN_C = C.clone()
NAN_C[5, 1] = float("nan")


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((Q, C[:, :4]), {}, "dimension mismatch"),
        ((Q, C), {"lam": 0.0}, "lam"),
        ((Q, C), {"lam": -1.0}, "lam"),
        ((Q, C), {"lam": float("nan")}, "lam"),
        ((Q, C), {"lam": float("inf")}, "lam"),
        ((NAN_Q, C), {}, "query contains NaN"),
        ((Q, INF_C), {}, "candidates contain NaN or inf"),
        ((Q, NAN_C), {"n": 0}, "candidates contain NaN or inf"),
        ((Q, C), {"method": "bm25"}, "unknown method"),
        ((Q, C), {"n": -1}, "n must be"),
        ((Q, C), {"n": 2.5}, "n must be"),
        ((Q[None], C), {}, "query must have 1 dimension"),
        ((Q, C[0]), {}, "candidates must have 2 dimension"),
        ((Q.tolist(), C), {}, "torch.Tensor"),
        ((Q, C), {"alpha": 0.0}, "alpha"),
        ((Q, C), {"min_reduction": float("nan")}, "min_reduction"),
    ],
)
def test_invalid_arguments_raise_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        select(*args, **kwargs)
    assert "\n" not in str(info.value)
