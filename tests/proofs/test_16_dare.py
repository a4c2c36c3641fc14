"""Check of proofs/16-dare-unbiased.md: DARE's drop-and-rescale is unbiased, with entry variance p/(1−p)·x²
and output variance p/(1−p)·Σ_j Δ_ij² x_j².

Sympy (``sympy.stats``) derives the moments from a Bernoulli mask; the library's ``dare`` is then checked
exactly (its support {0, x/(1−p)}) and by Monte Carlo (means and variances within stated standard errors).
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
import sympy.stats as ss
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory.merging.drop_and_rescale import dare, dare_keep_mask

N_DRAWS = 4000
# Monte-Carlo tolerance: 5 standard errors.  Each test below checks at most a few hundred z-scores; the
# two-sided 5σ false-alarm rate of one is 6e-7, and the seeds are fixed, so a failure means a real bias.
Z_MAX = 5.0

p_, c_, x_ = sp.Symbol("p", positive=True), sp.Symbol("c", positive=True), sp.Symbol("x", real=True)


# ----------------------------------------------------------------------------- sympy
def test_sympy_mean_and_variance_of_one_entry():
    M = ss.Bernoulli("M", 1 - p_)  # kept with probability 1 − p
    X = c_ * M * x_
    mean, var = ss.E(X), ss.variance(X)
    assert sp.simplify(mean - c_ * (1 - p_) * x_) == 0
    assert sp.simplify(var - c_**2 * p_ * (1 - p_) * x_**2) == 0
    # DARE's c = 1/(1 − p): unbiased, variance p/(1 − p) x²
    assert sp.simplify(mean.subs(c_, 1 / (1 - p_)) - x_) == 0
    assert sp.simplify(var.subs(c_, 1 / (1 - p_)) - p_ / (1 - p_) * x_**2) == 0
    # unbiased is not least-squares: the per-entry MSE is minimized at c = 1 (no rescale), a smaller factor
    mse = sp.expand(var + (mean - x_) ** 2)
    assert sp.solve(sp.diff(mse, c_), c_) == [1]
    assert sp.simplify(mse.subs(c_, 1) - p_ * x_**2) == 0


def test_sympy_output_variance_needs_independent_entries():
    """y = Σ_j c M_j Δ_j x_j: independent masks give Σ_j Δ_j² x_j²·p/(1−p); one shared mask (rows dropped
    together: a weakened independence assumption) gives (Σ_j Δ_j x_j)²·p/(1−p) instead."""
    d = sp.symbols("d0:3", real=True)
    xs = sp.symbols("x0:3", real=True)
    c = 1 / (1 - p_)
    Ms = [ss.Bernoulli(f"M{j}", 1 - p_) for j in range(3)]
    y = sum(c * Ms[j] * d[j] * xs[j] for j in range(3))
    assert sp.simplify(ss.E(y) - sum(d[j] * xs[j] for j in range(3))) == 0
    indep = p_ / (1 - p_) * sum(d[j] ** 2 * xs[j] ** 2 for j in range(3))
    assert sp.simplify(ss.variance(y) - indep) == 0
    M = ss.Bernoulli("Mrow", 1 - p_)
    y_shared = sum(c * M * d[j] * xs[j] for j in range(3))
    shared = p_ / (1 - p_) * sum(d[j] * xs[j] for j in range(3)) ** 2
    assert sp.simplify(ss.variance(y_shared) - shared) == 0
    assert sp.simplify(shared - indep) != 0


# ----------------------------------------------------------------------------- library
def _draws(delta: np.ndarray, p: float, seed: int, **kw) -> np.ndarray:
    """N_DRAWS independent DARE draws of ``delta`` from one library call (the mask is i.i.d. per entry)."""
    return dare(np.broadcast_to(delta, (N_DRAWS, *delta.shape)).copy(), p, seed=seed, **kw)


@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0.05, 0.95), shape=st.sampled_from([(3,), (2, 3), (4, 2)]))
def test_library_support_mean_and_variance(seed, p, shape):
    rng = np.random.default_rng(seed)
    delta = rng.standard_normal(shape)
    D = _draws(delta, p, seed)
    c = 1.0 / (1.0 - p)
    kept = D != 0
    np.testing.assert_allclose(np.where(kept, D, 0), np.where(kept, delta * c, 0), rtol=1e-15, atol=0)  # support
    var = p / (1 - p) * delta**2
    se_mean = np.sqrt(var / N_DRAWS)
    assert np.all(np.abs(D.mean(axis=0) - delta) <= Z_MAX * se_mean)  # unbiased
    # sample variance against p/(1−p)x²; its standard error from the exact 4th central moment and the exact
    # variance of an unbiased sample variance, (μ4 − σ⁴ (N−3)/(N−1)) / N (at p = 1/2 the leading term μ4 − σ⁴
    # vanishes -- a symmetric two-point law -- and only the (N−1)-correction is left)
    mu4 = (1 - p) * ((c - 1) * delta) ** 4 + p * delta**4
    se_var = np.sqrt((mu4 - var**2 * (N_DRAWS - 3) / (N_DRAWS - 1)) / N_DRAWS)
    assert np.all(np.abs(D.var(axis=0, ddof=1) - var) <= Z_MAX * se_var + 1e-12)
    # the fraction of kept entries is Binomial(N, 1 − p)
    frac = kept.mean()
    assert abs(frac - (1 - p)) <= Z_MAX * np.sqrt(p * (1 - p) / kept.size)


def test_library_output_variance_matches_the_independent_entry_formula():
    rng = np.random.default_rng(7)
    m, n, p = 3, 6, 0.6
    delta, x = rng.standard_normal((m, n)), rng.standard_normal(n)
    Y = _draws(delta, p, seed=11) @ x  # (N, m)
    indep = p / (1 - p) * (delta**2) @ (x**2)
    shared = p / (1 - p) * (delta @ x) ** 2
    # standard error of a sample variance, from the sample 4th central moment (large N)
    mu4 = np.mean((Y - Y.mean(0)) ** 4, axis=0)
    se = np.sqrt((mu4 - Y.var(0) ** 2) / N_DRAWS)
    assert np.all(np.abs(Y.mean(0) - delta @ x) <= Z_MAX * np.sqrt(indep / N_DRAWS))
    assert np.all(np.abs(Y.var(0, ddof=1) - indep) <= Z_MAX * se)
    # negative control: the row-mask formula is rejected on this very sample (so the check discriminates)
    assert np.any(np.abs(Y.var(0, ddof=1) - shared) > 10 * se)


def test_negative_control_no_rescale_is_biased():
    """Weaken c = 1/(1−p) to c = 1 (drop only): the mean is (1−p)x, many standard errors from x."""
    rng = np.random.default_rng(3)
    delta, p = rng.standard_normal(5) + 2.0, 0.5
    D = _draws(delta, p, seed=5, rescale=1.0)
    se = np.sqrt(p * (1 - p) * delta**2 / N_DRAWS)
    assert np.all(np.abs(D.mean(0) - delta) > 10 * se)
    assert np.all(np.abs(D.mean(0) - (1 - p) * delta) <= Z_MAX * se)


def test_mask_is_backend_independent_and_torch_keeps_autograd():
    delta = np.random.default_rng(0).standard_normal((4, 5))
    t = torch.from_numpy(delta).requires_grad_(True)
    out = dare(t, 0.3, seed=9)
    np.testing.assert_array_equal(out.detach().numpy(), dare(delta, 0.3, seed=9))
    out.sum().backward()
    keep = dare_keep_mask((4, 5), 0.3, seed=9)
    np.testing.assert_allclose(t.grad.numpy(), keep / 0.7, rtol=1e-15)  # d/dΔ of c·m⊙Δ is c·m


def test_library_refuses_p_outside_the_unit_interval():
    with pytest.raises(ValueError, match="p"):
        dare(np.ones(3), 1.0)
    with pytest.raises(ValueError, match="p"):
        dare(np.ones(3), -0.1)
