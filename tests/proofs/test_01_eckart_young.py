"""Check of proofs/01-eckart-young-mirsky.md: the truncated SVD is the best rank-k approximation.

The library objects under test are ``truncated_svd`` and ``recompress_factors`` (the factored
LoRA case).  The reference is NumPy's float64 SVD, called independently here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory.linalg import recompress_factors, truncated_svd
from tests.conftest import tol

TOL = tol("float64")


def _matrix(m: int, n: int, seed: int, decay: float) -> np.ndarray:
    """A random m×n matrix with singular values 1, 2^-decay, 3^-decay, ... (distinct a.s.)."""
    rng = np.random.default_rng(seed)
    q = min(m, n)
    U = np.linalg.qr(rng.standard_normal((m, q)))[0]
    V = np.linalg.qr(rng.standard_normal((n, q)))[0]
    s = np.arange(1, q + 1, dtype=np.float64) ** (-decay)
    return (U * s) @ V.T


def _dense(res) -> np.ndarray:
    U, S, Vh = (np.asarray(t) for t in res)
    return (U * S) @ Vh


shapes = st.tuples(st.integers(2, 9), st.integers(2, 9))


@given(shape=shapes, data=st.data(), seed=st.integers(0, 2**31 - 1), decay=st.floats(0.2, 2.0))
def test_truncated_svd_attains_the_lower_bound(shape, data, seed, decay):
    """‖A − A_k‖_F² = Σ_{i>k} σ_i², ‖A − A_k‖_2 = σ_{k+1}, and no rank-≤k competitor does better."""
    m, n = shape
    k = data.draw(st.integers(1, min(m, n) - 1))
    A = _matrix(m, n, seed, decay)
    sigma = np.linalg.svd(A, compute_uv=False)  # independent reference
    Ak = _dense(truncated_svd(A, k))
    assert np.linalg.matrix_rank(Ak) == k
    E = A - Ak
    assert np.linalg.norm(E) ** 2 == pytest.approx(np.sum(sigma[k:] ** 2), rel=1e-10, abs=1e-12)
    assert np.linalg.norm(E, 2) == pytest.approx(sigma[k], rel=1e-10, abs=1e-12)

    # competitors of rank <= k: random factors, and small perturbations of the optimum's factors
    rng = np.random.default_rng(seed + 1)
    U, S, Vh = truncated_svd(A, k)
    for _ in range(5):
        X = rng.standard_normal((m, k)) @ rng.standard_normal((k, n))
        assert np.linalg.norm(A - X) ** 2 >= np.sum(sigma[k:] ** 2) * (1 - 1e-12)
        assert np.linalg.norm(A - X, 2) >= sigma[k] * (1 - 1e-12)
        Up = U + 1e-3 * rng.standard_normal(U.shape)
        Vp = Vh + 1e-3 * rng.standard_normal(Vh.shape)
        Xp = (Up * S) @ Vp
        assert np.linalg.norm(A - Xp) ** 2 >= np.sum(sigma[k:] ** 2) * (1 - 1e-12)


def test_negative_control_rotated_singular_vector_is_worse():
    """Perturb the claimed optimum: rotate u_k toward u_{k+1}; the error rises by a visible amount."""
    A = _matrix(8, 6, seed=3, decay=1.0)
    k = 2
    U, S, Vh = truncated_svd(A, k)
    Ufull, sig, _ = np.linalg.svd(A)
    theta = 0.1
    U2 = U.copy()
    U2[:, k - 1] = np.cos(theta) * U[:, k - 1] + np.sin(theta) * Ufull[:, k]
    opt = np.linalg.norm(A - (U * S) @ Vh) ** 2
    rotated = np.linalg.norm(A - (U2 * S) @ Vh) ** 2
    # exact increase for this rotation: (1 - cos θ)²σ_k² + sin²θ σ_k² - ... ; assert a clear gap
    assert rotated > opt + 1e-3 * sig[k - 1] ** 2


def test_negative_control_rank_assumption_matters():
    """Weaken 'rank ≤ k' to rank k+1: the bound Σ_{i>k}σ_i² is then beaten, so it is not a law for all X."""
    A = _matrix(7, 5, seed=4, decay=0.5)
    k = 2
    sigma = np.linalg.svd(A, compute_uv=False)
    Ak1 = _dense(truncated_svd(A, k + 1))
    assert np.linalg.norm(A - Ak1) ** 2 < np.sum(sigma[k:] ** 2) - 0.5 * sigma[k] ** 2


def test_negative_control_bottom_singular_triplets_fail():
    """A wrong implementation that kept the *smallest* k triplets would violate the equality."""
    A = _matrix(6, 6, seed=5, decay=1.0)
    k = 2
    Uf, s, Vhf = np.linalg.svd(A)
    wrong = (Uf[:, -k:] * s[-k:]) @ Vhf[-k:]
    assert np.linalg.norm(A - wrong) ** 2 > np.sum(s[k:] ** 2) * 1.5


@given(seed=st.integers(0, 2**31 - 1), r=st.integers(2, 6), data=st.data())
def test_recompress_factors_is_eym_on_the_product(seed, r, data):
    """The factored route (never forming BA) returns the same best rank-k approximation of BA."""
    k = data.draw(st.integers(1, r - 1))
    rng = np.random.default_rng(seed)
    B, A = rng.standard_normal((9, r)), rng.standard_normal((r, 7))
    M = B @ A
    sigma = np.linalg.svd(M, compute_uv=False)
    Mk = _dense(recompress_factors(B, A, k))
    assert np.linalg.norm(M - Mk) ** 2 == pytest.approx(np.sum(sigma[k:] ** 2), rel=1e-9, abs=1e-10)
    np.testing.assert_allclose(Mk, _dense(truncated_svd(M, k)), **TOL)


def test_torch_backend_gives_the_same_optimum():
    """The theorem is backend-independent; the torch path must agree with NumPy to float64 tolerance."""
    A = _matrix(9, 6, seed=6, decay=0.7)
    U, S, Vh = truncated_svd(torch.from_numpy(A), 3)
    Ak = ((U * S) @ Vh).numpy()
    np.testing.assert_allclose(Ak, _dense(truncated_svd(A, 3)), **TOL)
