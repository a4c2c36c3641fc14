"""DARE / DAREx: statistics of the drop-and-rescale estimator, merging, and the layer-wise DAREx-q factor.

Statistical tests use fixed seeds (deterministic) and tolerances of 5 standard errors of the
estimator being checked, so a correct implementation passes with probability > 1 - 1e-5 over the
choice of seeds, while a wrong rescale (e.g. 1/p or no rescale) is off by many standard errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from lowrank_theory.linalg import derive_seed
from lowrank_theory.merging.drop_and_rescale import dare, dare_keep_mask, dare_merge, dare_optimal_rescale
from tests.conftest import tol

N_SEEDS = 3000


def _delta(shape=(6, 7), seed=0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return g.choice([-1.0, 1.0], size=shape) * g.uniform(0.5, 2.0, size=shape)  # bounded away from 0


@pytest.fixture(scope="module", params=[0.3, 0.9])
def samples(request):
    p = request.param
    delta = _delta()
    draws = np.stack([dare(delta, p, seed=s) for s in range(N_SEEDS)])
    return p, delta, draws


def test_dare_is_unbiased(samples):
    p, delta, draws = samples
    # per entry: mean of N i.i.d. draws with variance p/(1-p) δ²  -> CLT z-score
    se = np.abs(delta) * np.sqrt(p / (1 - p) / N_SEEDS)
    z = (draws.mean(axis=0) - delta) / se
    assert np.max(np.abs(z)) < 5.0


def test_dare_variance_formula(samples):
    p, delta, draws = samples
    var = draws.var(axis=0, ddof=1)
    target = p / (1 - p) * delta**2
    # relative standard error of a sample variance: sqrt((kurtosis - 1)/N); the draws are
    # c·δ·Bernoulli(q), q = 1-p, whose kurtosis is 3 + (1 - 6q(1-q))/(q(1-q)).
    q = 1 - p
    kurt = 3 + (1 - 6 * q * (1 - q)) / (q * (1 - q))
    rel_se = np.sqrt((kurt - 1) / N_SEEDS)
    assert np.max(np.abs(var / target - 1)) < 5 * rel_se


@pytest.mark.parametrize("p", [0.1, 0.5, 0.99])
def test_dare_zero_fraction_and_survivor_values(p):
    delta = _delta((200, 300), 1)
    out = dare(delta, p, seed=7)
    zero = out == 0
    assert abs(zero.mean() - p) < 5 * np.sqrt(p * (1 - p) / delta.size)  # binomial 5σ
    np.testing.assert_allclose(out[~zero], delta[~zero] / (1 - p), rtol=1e-15)


def test_darex_q_rescale_keeps_the_same_mask():
    delta = _delta((30, 40), 2)
    a = dare(delta, 0.8, seed=3)
    b = dare(delta, 0.8, seed=3, rescale=2.0)
    assert np.array_equal(a != 0, b != 0)
    np.testing.assert_allclose(b[b != 0], 2.0 * delta[b != 0], rtol=1e-15)
    np.testing.assert_array_equal(dare(delta, 0.0, seed=1), delta)  # p = 0 keeps everything


def test_dare_backends_agree_and_torch_grad(bk):
    delta = _delta((9, 11), 3)
    ref = dare(delta, 0.6, seed=5)
    out = bk.to_numpy(dare(bk.asarray(delta), 0.6, seed=5))
    np.testing.assert_array_equal(out, ref)
    t = torch.from_numpy(delta).requires_grad_(True)
    dare(t, 0.6, seed=5).sum().backward()
    keep = dare_keep_mask(delta.shape, 0.6, seed=5)
    np.testing.assert_allclose(t.grad.numpy(), keep / 0.4, rtol=1e-15)
    for dt in (torch.float32, torch.bfloat16):  # checkpoint deltas are often bf16
        low = dare(torch.from_numpy(delta).to(dt), 0.6, seed=5)
        assert low.dtype == dt
        torch.testing.assert_close(low.double(), torch.from_numpy(ref), **tol(dt))


def test_dare_optimal_rescale_matches_scipy_and_beats_dare():
    g = np.random.default_rng(4)
    delta = _delta((12, 20), 4) + 0.8  # a nonzero mean: where DARE's 1/(1-p) is far from optimal
    X = g.standard_normal((64, 20)) + 0.5
    p = 0.95

    def change(c):
        return np.linalg.norm(X @ (dare(delta, p, seed=9, rescale=c) - delta).T) ** 2

    c_star = dare_optimal_rescale(delta, X, p, seed=9)
    ref = scipy.optimize.minimize_scalar(change, bounds=(1e-3, 100.0), method="bounded", options={"xatol": 1e-10})
    assert abs(c_star - ref.x) < 1e-6 * ref.x
    assert change(c_star) <= change(1 / (1 - p)) and abs(c_star - 1 / (1 - p)) > 1.0
    np.testing.assert_allclose(change(c_star), ref.fun, rtol=1e-8)


def test_dare_merge_expectation_and_structure():
    base = _delta((5, 6), 5)
    deltas = [_delta((5, 6), 6), _delta((5, 6), 7)]
    w = [0.7, -0.4]
    # p = 0: plain task arithmetic
    np.testing.assert_allclose(dare_merge(base, deltas, w, p=0.0), base + 0.7 * deltas[0] - 0.4 * deltas[1], rtol=1e-14)
    # one seed -> per-delta child seeds, reproducible
    m1 = dare_merge(base, deltas, w, p=[0.5, 0.8], seed=3)
    d0 = dare(deltas[0], 0.5, seed=derive_seed(3, 0))
    d1 = dare(deltas[1], 0.8, seed=derive_seed(3, 1))
    expect = base + 0.7 * d0 - 0.4 * d1
    np.testing.assert_allclose(m1, expect, rtol=1e-14)
    # unbiased: average over seeds -> base + Σ w δ  (5σ of the mean)
    draws = np.stack([dare_merge(base, deltas, w, p=0.5, seed=s) for s in range(2000)])
    sd = np.sqrt(0.5 / 0.5 * (0.49 * deltas[0] ** 2 + 0.16 * deltas[1] ** 2) / 2000)
    assert np.max(np.abs(draws.mean(0) - (base + 0.7 * deltas[0] - 0.4 * deltas[1])) / sd) < 5


def test_dare_merge_state_dicts():
    base = {"a": torch.zeros(3, 4, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    d1 = {"a": torch.ones(3, 4, dtype=torch.float64)}
    d2 = {"a": torch.ones(3, 4, dtype=torch.float64), "b": torch.full((2,), 2.0, dtype=torch.float64)}
    out = dare_merge(base, [d1, d2], p=0.0)
    torch.testing.assert_close(out["a"], torch.full((3, 4), 2.0, dtype=torch.float64), **tol(torch.float64))
    torch.testing.assert_close(out["b"], torch.full((2,), 3.0, dtype=torch.float64), **tol(torch.float64))
    with pytest.raises(ValueError, match="keys not in base"):
        dare_merge(base, [{"c": torch.ones(1, dtype=torch.float64)}], p=0.5)


def test_dare_bad_inputs():
    d = _delta()
    for bad_p in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match="p must be in"):
            dare(d, bad_p)
    with pytest.raises(TypeError, match="p must be"):
        dare(d, "0.5")
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="rescale"):
            dare(d, 0.5, rescale=bad)
    d_nan = d.copy()
    d_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="delta"):
        dare(d_nan, 0.5)
    with pytest.raises(TypeError, match="delta"):
        dare(np.ones((3, 3), dtype=np.int64), 0.5)
    with pytest.raises(ValueError, match="X"):
        dare_optimal_rescale(d, np.ones((4, 3)), 0.5)
    with pytest.raises(ValueError, match="weights"):
        dare_merge(d, [d, d], [1.0], p=0.5)
    with pytest.raises(ValueError, match=r"deltas\[1\]"):
        dare_merge(d, [d, np.ones((2, 2))], p=0.5)
    with pytest.raises(ValueError, match="deltas"):
        dare_merge(d, [], p=0.5)
