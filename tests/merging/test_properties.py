"""Hypothesis properties of the merges: identities, permutation invariance, scaling and linearity, bounds.

Tolerances: float64 inputs of magnitude ≤ 1e3 (and a separate extreme-scale check at 1e±30); sums of a few terms in a
different order agree to a few ulps of the largest term, so comparisons use ``F64`` relative plus an absolute term
scaled by the largest input magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowrank_theory.merging import (
    dare_linear,
    dare_merge,
    dare_ties,
    flatten,
    magnitude_prune,
    merge_state_dicts,
    pcb,
    task_arithmetic,
    ties,
    trim,
    unflatten,
)
from tests.conftest import tol

F64 = tol(torch.float64)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)
weights_st = st.floats(-3, 3, allow_nan=False)
density_st = st.floats(0.01, 1.0)


@st.composite
def task_vectors(draw, min_t=1, max_t=4):
    T = draw(st.integers(min_t, max_t))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=6))
    stack = draw(hnp.arrays(np.float64, (T, *shape), elements=finite))
    return list(stack)


def _close(a, b, scale):
    np.testing.assert_allclose(a, b, rtol=F64["rtol"], atol=F64["atol"] * max(1.0, scale))


def _scale(tvs, ws=None):
    ws = [1.0] * len(tvs) if ws is None else ws
    return float(sum(abs(w) * np.max(np.abs(t)) for t, w in zip(tvs, ws))) if tvs else 1.0


# ----------------------------------------------------------------------------- identities
@given(tvs=task_vectors(max_t=1), w=weights_st)
def test_one_task_vector(tvs, w):
    (t,) = tvs
    np.testing.assert_array_equal(task_arithmetic([t], [1.0]), t)
    np.testing.assert_array_equal(ties([t], [1.0], 1.0), t)  # TIES without trim: the identity
    np.testing.assert_array_equal(magnitude_prune([t], None, 1.0), t)
    np.testing.assert_array_equal(dare_linear([t], None, 1.0, seed=0), t)
    np.testing.assert_array_equal(dare_ties([t], None, 1.0, seed=0), t)
    _close(ties([t], [w], 1.0), w * t, abs(w) * np.max(np.abs(t)))
    _close(task_arithmetic([t], [w]), w * t, abs(w) * np.max(np.abs(t)))


@given(tvs=task_vectors(), rho=density_st)
def test_trim_keeps_the_largest(tvs, rho):
    t = tvs[0]
    out = trim(t, rho)
    k = t.size if rho >= 1 else int(rho * t.size)
    kept = out != 0
    assert np.count_nonzero(out) <= k  # exactly k positions kept; a kept entry may itself be 0
    np.testing.assert_array_equal(out[kept], t[kept])
    if kept.any() and (~kept).any():
        assert np.min(np.abs(t[kept])) >= np.max(np.abs(t[~kept]))


# ----------------------------------------------------------------------------- permutations
@given(tvs=task_vectors(min_t=2), data=st.data())
def test_permutation_invariance(tvs, data):
    T = len(tvs)
    ws = data.draw(st.lists(weights_st, min_size=T, max_size=T))
    rho = data.draw(density_st)
    perm = data.draw(st.permutations(range(T)))
    p_tvs, p_ws = [tvs[i] for i in perm], [ws[i] for i in perm]
    s = _scale(tvs, ws)
    for f in (lambda a, b: task_arithmetic(a, b), lambda a, b: magnitude_prune(a, b, rho),
              lambda a, b: ties(a, b, rho), lambda a, b: ties(a, b, rho, majority_sign_method="frequency")):
        _close(f(p_tvs, p_ws), f(tvs, ws), s)
    # PCB's ratio and sort-based clipping are per task; its sums over tasks are order-free
    _close(pcb(p_tvs, p_ws, rho), pcb(tvs, ws, rho), s)


# ----------------------------------------------------------------------------- scaling, linearity
@given(tvs=task_vectors(), data=st.data())
def test_linear_in_the_weights(tvs, data):
    """Task arithmetic, magnitude prune and TIES (PEFT's weighting: the sign is elected unweighted) are linear in w."""
    T = len(tvs)
    w1 = data.draw(st.lists(weights_st, min_size=T, max_size=T))
    w2 = data.draw(st.lists(weights_st, min_size=T, max_size=T))
    a, b = data.draw(weights_st), data.draw(weights_st)
    rho = data.draw(density_st)
    mix = [a * x + b * y for x, y in zip(w1, w2)]
    s = _scale(tvs, [abs(a * x) + abs(b * y) for x, y in zip(w1, w2)])
    for f in (task_arithmetic, lambda t, w: magnitude_prune(t, w, rho), lambda t, w: ties(t, w, rho)):
        _close(f(tvs, mix), a * f(tvs, w1) + b * f(tvs, w2), s)


@given(tvs=task_vectors(), c=st.floats(1e-3, 1e3), rho=density_st)
def test_ties_is_positively_homogeneous_in_the_task_vectors(tvs, c, rho):
    """Scaling every τ_t by c > 0 keeps the trim ranking and the elected signs: the merge scales by c."""
    _close(ties([c * t for t in tvs], None, rho), c * ties(tvs, None, rho), c * _scale(tvs))


@given(tvs=task_vectors(min_t=2), rho=density_st)
def test_pcb_is_a_per_entry_convex_combination(tvs, rho):
    """With λ = 1, each merged entry is 0 (all coefficients dropped) or lies between the tasks' clipped values."""
    out = pcb(tvs, None, rho, clip_ratio=0.0)
    lo, hi = np.min(tvs, axis=0), np.max(tvs, axis=0)
    slack = 1e-12 * max(1.0, _scale(tvs))
    inside = (out >= lo - slack) & (out <= hi + slack)
    assert np.all(inside | (out == 0))


# ----------------------------------------------------------------------------- DARE
@given(tvs=task_vectors(), p=st.floats(0.0, 0.95), seed=st.integers(0, 2**31))
def test_dare_linear_is_dare_merge_without_the_base(tvs, p, seed):
    base = np.zeros_like(tvs[0])
    ws = [0.5 + i for i in range(len(tvs))]
    _close(dare_linear(tvs, ws, 1.0 - p, seed=seed), dare_merge(base, tvs, ws, p, seed=seed), _scale(tvs, ws) / (1 - p))
    np.testing.assert_array_equal(dare_linear(tvs, ws, 1.0 - p, seed=seed), dare_linear(tvs, ws, 1.0 - p, seed=seed))


# ----------------------------------------------------------------------------- whole models
@given(data=st.data())
def test_flatten_round_trip_and_scopes(data):
    shapes = data.draw(st.lists(hnp.array_shapes(min_dims=1, max_dims=2, max_side=5), min_size=1, max_size=3))
    dicts = [{f"k{i}": data.draw(hnp.arrays(np.float64, s, elements=finite)) for i, s in enumerate(shapes)}
             for _ in range(2)]
    vec, spec = flatten(dicts[0])
    back = unflatten(vec, spec)
    assert list(back) == list(dicts[0])
    for k in back:
        np.testing.assert_array_equal(back[k], dicts[0][k])
    # task arithmetic does not care about the scope
    g = merge_state_dicts(task_arithmetic, dicts, [1.0, -2.0], scope="global")
    p = merge_state_dicts(task_arithmetic, dicts, [1.0, -2.0], scope="per_tensor")
    for k in g:
        np.testing.assert_array_equal(g[k], p[k])


def test_global_scope_ranks_over_the_whole_model():
    """TIES's trim at density 0.5 keeps the globally largest half: the small-magnitude layer loses everything."""
    big, small = np.full((4,), 10.0), np.full((4,), 0.1)
    d = [{"big": big, "small": small}]
    g = merge_state_dicts(ties, d, None, 0.5, scope="global")
    p = merge_state_dicts(ties, d, None, 0.5, scope="per_tensor")
    assert np.count_nonzero(g["small"]) == 0 and np.count_nonzero(g["big"]) == 4
    assert np.count_nonzero(p["small"]) == 2 and np.count_nonzero(p["big"]) == 2


def test_per_tensor_seeds_differ_between_keys():
    t = np.ones((50,))
    out = merge_state_dicts(dare_linear, [{"a": t, "b": t}], None, 0.5, scope="per_tensor", seed=3)
    assert not np.array_equal(out["a"], out["b"])
    again = merge_state_dicts(dare_linear, [{"a": t, "b": t}], None, 0.5, scope="per_tensor", seed=3)
    np.testing.assert_array_equal(out["a"], again["a"])


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_magnitudes_stay_meaningful(scale):
    g = np.random.default_rng(0)
    tvs = [scale * g.standard_normal((6, 5)) for _ in range(3)]
    unit = [t / scale for t in tvs]
    for f in (lambda x: task_arithmetic(x, [0.5, 1.0, 2.0]), lambda x: ties(x, None, 0.4),
              lambda x: magnitude_prune(x, None, 0.4)):
        np.testing.assert_allclose(f(tvs) / scale, f(unit), **F64)
    assert np.all(np.isfinite(pcb(tvs, None, 0.3)))


def test_half_precision_is_summed_in_float32():
    """bf16 task vectors: the merge is the float32 merge rounded once (not a bf16 running sum)."""
    g = torch.Generator().manual_seed(0)
    tvs = [torch.randn(64, 64, generator=g).to(torch.bfloat16) for _ in range(8)]
    out = task_arithmetic(tvs, [0.37] * 8)
    ref = task_arithmetic([t.float() for t in tvs], [0.37] * 8).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    running = tvs[0] * 0.37
    for t in tvs[1:]:
        running = running + t * 0.37  # what a bf16 accumulation would give: further from the float32 sum
    exact = task_arithmetic([t.double() for t in tvs], [0.37] * 8)
    assert (out.double() - exact).abs().sum() < (running.double() - exact).abs().sum()


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "magnitude_prune", "dare_linear", "dare_ties", "pcb"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_merge_computes_half_precision_in_float32(name, dtype):
    """A half-precision merge is the float32 merge of the same (half) values, rounded once to the half dtype."""
    f = {"task_arithmetic": lambda t: task_arithmetic(t, [0.3, 0.7, 1.1]),
         "ties": lambda t: ties(t, [0.3, 0.7, 1.1], 0.3),
         "magnitude_prune": lambda t: magnitude_prune(t, [0.3, 0.7, 1.1], 0.3),
         "dare_linear": lambda t: dare_linear(t, [0.3, 0.7, 1.1], 0.3, seed=4),
         "dare_ties": lambda t: dare_ties(t, [0.3, 0.7, 1.1], 0.3, seed=4),
         "pcb": lambda t: pcb(t, [0.3, 0.7, 1.1], 0.3)}[name]
    g = torch.Generator().manual_seed(1)
    tvs = [torch.randn(16, 12, generator=g).to(dtype) for _ in range(3)]
    out = f(tvs)
    assert out.dtype == dtype
    assert torch.equal(out, f([t.float() for t in tvs]).to(dtype))
