"""Check of proofs/02-randomized-range-finder.md: the HMT expected-error bound, empirically.

Library object: ``randomized_svd`` with ``n_iter=0`` (the plain Gaussian range finder, truncated to
rank k).  We average its squared Frobenius error over many seeds and compare with
(1 + k/(p−1)) Σ_{j>k} σ_j².
"""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_theory.linalg import randomized_svd

N_TRIALS = 300


def _slow_spectrum_matrix(m: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = min(m, n)
    U = np.linalg.qr(rng.standard_normal((m, q)))[0]
    V = np.linalg.qr(rng.standard_normal((n, q)))[0]
    s = 1.0 / np.sqrt(np.arange(1, q + 1))  # slow decay: the regime where the bound has content
    return (U * s) @ V.T, s


def _sq_errors(A: np.ndarray, k: int, p: int) -> np.ndarray:
    out = np.empty(N_TRIALS)
    for t in range(N_TRIALS):
        U, S, Vh = randomized_svd(A, k, oversample=p, n_iter=0, seed=t)
        out[t] = np.linalg.norm(A - (U * S) @ Vh) ** 2
    return out


@pytest.mark.parametrize(("k", "p"), [(4, 2), (6, 4), (3, 8)])
def test_expected_error_bound_holds(k, p):
    A, s = _slow_spectrum_matrix(60, 40, seed=k + p)
    tail = np.sum(s[k:] ** 2)
    bound = (1 + k / (p - 1)) * tail
    err = _sq_errors(A, k, p)
    # every single draw obeys Eckart–Young (no rank-k matrix beats the tail)
    assert err.min() >= tail * (1 - 1e-10)
    # Monte-Carlo tolerance: the sample mean must sit below the bound even after adding 4 standard
    # errors (a one-sided 4σ test has false-alarm probability ~3e-5; seeds are fixed anyway)
    se = err.std(ddof=1) / np.sqrt(N_TRIALS)
    assert err.mean() + 4 * se <= bound
    # and the randomized method is genuinely not optimal (the bound is not vacuous the other way)
    assert err.mean() > tail * (1 + 1e-3)


def test_negative_control_coordinate_sketch_breaks_the_bound():
    """Weaken 'Ω Gaussian' to 'Ω = k+p random coordinate vectors' (column sampling).

    On a matrix whose dominant right singular vectors are spikes, column sampling misses them with
    high probability and the average error exceeds the Gaussian bound by far.
    """
    rng = np.random.default_rng(0)
    m, n, k, p = 60, 40, 4, 2
    s = 1.0 / np.sqrt(np.arange(1, n + 1))
    s[:k] = 10.0  # dominant part on k coordinate directions
    U = np.linalg.qr(rng.standard_normal((m, n)))[0]
    A = (U * s) @ np.eye(n)  # right singular vectors = coordinate vectors
    tail = np.sum(s[k:] ** 2)
    bound = (1 + k / (p - 1)) * tail
    errs = []
    for t in range(N_TRIALS):
        cols = np.random.default_rng(t).choice(n, size=k + p, replace=False)
        Q = np.linalg.qr(A[:, cols])[0]
        Ub, Sb, Vb = np.linalg.svd(Q.T @ A, full_matrices=False)
        Ak = (Q @ Ub[:, :k] * Sb[:k]) @ Vb[:k]
        errs.append(np.linalg.norm(A - Ak) ** 2)
    assert np.mean(errs) > 5 * bound
    # while the library's Gaussian sketch on the very same matrix respects it
    assert _sq_errors(A, k, p).mean() <= bound


def test_negative_control_bound_with_factor_one_fails():
    """The factor (1 + k/(p−1)) cannot be replaced by 1: the mean error is strictly above the tail."""
    A, s = _slow_spectrum_matrix(60, 40, seed=1)
    k, p = 5, 2
    err = _sq_errors(A, k, p)
    se = err.std(ddof=1) / np.sqrt(N_TRIALS)
    assert err.mean() - 4 * se > np.sum(s[k:] ** 2)
