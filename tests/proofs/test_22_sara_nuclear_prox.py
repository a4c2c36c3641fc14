"""Check of proofs/22-sara-nuclear-prox.md: prox of τ‖·‖_* is singular-value soft-thresholding (SaRA's penalty).

The library's ``nuclear_prox`` and ``SaRA.proximal_step_`` are compared with NumPy's SVD, with the exact optimal value
Σ h_τ(y_i), with random perturbations (the 1-strong-convexity growth bound), and with an independent solver (SciPy BFGS
on a smoothed objective).  Negative controls: hard thresholding, entrywise soft-thresholding, and the projected prox on
a partial support are not optimal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from lowrank_theory.adapters.sara import SaRA, nuclear_prox

ATOL = 1e-10  # objective values of O(10) computed in float64 from a LAPACK SVD: ~1e-13 rounding, 1e-10 is safe


def objective(X: np.ndarray, Y: np.ndarray, tau: float) -> float:
    return 0.5 * float(np.sum((X - Y) ** 2)) + tau * float(np.linalg.svd(X, compute_uv=False).sum())


def h(y: np.ndarray, tau: float) -> float:
    return float(np.where(y <= tau, 0.5 * y**2, tau * y - 0.5 * tau**2).sum())


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 7), n=st.integers(1, 7), tau=st.floats(0.0, 3.0), seed=st.integers(0, 2**31))
def test_library_prox_is_svt_and_beats_every_perturbation(m, n, tau, seed):
    rng = np.random.default_rng(seed)
    Y = rng.standard_normal((m, n)) * 1.5
    X = nuclear_prox(torch.from_numpy(Y), tau).numpy()
    U, S, Vh = np.linalg.svd(Y, full_matrices=False)
    np.testing.assert_allclose(X, (U * np.maximum(S - tau, 0)) @ Vh, rtol=0, atol=1e-12)
    assert np.linalg.matrix_rank(X, tol=1e-9) == int((S > tau + 1e-9).sum())
    f_star = objective(X, Y, tau)
    assert abs(f_star - h(S, tau)) < ATOL
    for eps in (1e-3, 1e-1, 1.0):
        E = rng.standard_normal((m, n))
        assert objective(X + eps * E, Y, tau) - f_star >= 0.5 * eps**2 * float(np.sum(E**2)) - ATOL


def test_library_prox_matches_an_independent_solver():
    rng = np.random.default_rng(7)
    Y, tau, mu = rng.standard_normal((4, 3)) * 2.0, 0.9, 1e-5
    X_lib = nuclear_prox(torch.from_numpy(Y), tau).numpy()

    def smoothed(v):  # tau * tr (X^T X + mu^2 I)^{1/2} >= tau ||X||_*, and within tau * 3 * mu of it
        X = v.reshape(4, 3)
        w = np.linalg.eigvalsh(X.T @ X)
        return 0.5 * float(np.sum((X - Y) ** 2)) + tau * float(np.sqrt(np.maximum(w, 0) + mu**2).sum())

    res = minimize(smoothed, np.zeros(12), method="BFGS", options={"gtol": 1e-9, "maxiter": 5000})
    X_bfgs = res.x.reshape(4, 3)
    gap = objective(X_bfgs, Y, tau) - objective(X_lib, Y, tau)
    assert gap >= -ATOL  # the library's prox is at least as good as what an independent solver finds
    # growth bound: ||X_bfgs - X*||^2 <= 2 gap; the solver gets within ~1e-3 (smoothing + BFGS tolerance)
    assert np.linalg.norm(X_bfgs - X_lib) <= np.sqrt(2 * max(gap, 0.0)) + 1e-9
    assert np.linalg.norm(X_bfgs - X_lib) < 1e-2


def test_sara_proximal_step_with_full_support_is_the_prox_step():
    torch.manual_seed(0)
    m, n, eta, tau = 6, 5, 0.3, 0.4
    ad, _ = SaRA.from_weight(torch.randn(m, n, dtype=torch.float64), fraction=1.0)
    ad = ad.double()
    with torch.no_grad():
        ad.values.copy_(torch.randn(ad.k, dtype=torch.float64))
    T = torch.randn(m, n, dtype=torch.float64)
    D0 = ad.delta_weight().detach().numpy()
    loss = 0.5 * (ad.delta_weight() - T).pow(2).sum()
    loss.backward()
    with torch.no_grad():
        ad.values -= eta * ad.values.grad
    ad.proximal_step_(eta * tau)
    X = ad.delta_weight().detach().numpy()
    grad = D0 - T.numpy()

    def model(Z):  # item 3's subproblem
        return float(np.sum(grad * (Z - D0))) + np.sum((Z - D0) ** 2) / (2 * eta) + tau * np.linalg.norm(Z, "nuc")

    V = D0 - eta * grad
    U, S, Vh = np.linalg.svd(V, full_matrices=False)
    np.testing.assert_allclose(X, (U * np.maximum(S - eta * tau, 0)) @ Vh, atol=1e-12)
    rng = np.random.default_rng(1)
    for _ in range(20):
        assert model(X + 0.05 * rng.standard_normal((m, n))) > model(X)


# ----------------------------------------------------------------------------- negative controls
def test_negative_control_hard_threshold_is_not_the_prox():
    rng = np.random.default_rng(3)
    Y, tau = rng.standard_normal((6, 8)) * 2.0, 0.8
    U, S, Vh = np.linalg.svd(Y, full_matrices=False)
    X = nuclear_prox(torch.from_numpy(Y), tau).numpy()
    hard = (U * np.where(S > tau, S, 0.0)) @ Vh
    n_big = int((S > tau).sum())
    assert n_big > 0
    excess = objective(hard, Y, tau) - objective(X, Y, tau)
    assert abs(excess - 0.5 * tau**2 * n_big) < ATOL and excess > 0.1
    entrywise = np.sign(Y) * np.maximum(np.abs(Y) - tau, 0)  # the l1 prox, not the nuclear one
    assert objective(entrywise, Y, tau) > objective(X, Y, tau) + 1e-3


def test_negative_control_projected_prox_is_not_the_support_constrained_optimum():
    rng = np.random.default_rng(5)
    m, n, tau = 6, 8, 0.5
    ad, _ = SaRA.from_weight(torch.from_numpy(rng.standard_normal((m, n))), fraction=0.5)
    ad = ad.double()
    Y = rng.standard_normal((m, n)) * 2.0
    with torch.no_grad():
        ad.values.copy_(torch.from_numpy(Y.reshape(-1)[ad.flat_indices().numpy()]))  # Delta W = P_Omega(Y)
    # for supp X in Omega, ||X - Y||^2 = ||X - P_Omega Y||^2 + const: the library's projected step from P_Omega(Y)
    # is its candidate for min f over {supp X in Omega}
    ad.proximal_step_(tau)
    X0 = ad.delta_weight().detach().numpy()
    mask = np.zeros(m * n, dtype=bool)
    mask[ad.flat_indices().numpy()] = True
    mask = mask.reshape(m, n)
    f0 = objective(X0, Y, tau)
    U, S, Vh = np.linalg.svd(X0, full_matrices=False)
    assert S.min() > 1e-6  # full rank: f is differentiable at X0, gradient X0 - Y + tau U V^T
    g = np.where(mask, X0 - Y + tau * U @ Vh, 0.0)
    assert np.linalg.norm(g) > 1e-2  # not stationary on the support ...
    assert objective(X0 - 1e-2 * g, Y, tau) < f0 - 1e-5  # ... so a step along the support lowers f


def test_negative_control_library_refuses_a_negative_threshold():
    with pytest.raises(ValueError, match="tau"):
        nuclear_prox(torch.eye(3), -0.1)
