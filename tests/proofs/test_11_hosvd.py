"""Check of proofs/11-hosvd-quasi-optimality.md:
‖T − T̂_HOSVD‖² ≤ Σ_n Σ_{i>r_n} σ_i(T_(n))² ≤ N · ‖T − X‖² for every X of multilinear rank ≤ (r_n).

Library objects: ``hosvd``, ``hooi``, ``unfold``, ``tucker_to_tensor``, ``mode_product``.  The unfolding
singular values are computed here from NumPy (``moveaxis`` + ``reshape``), independently of ``unfold``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory.linalg import hooi, hosvd, mode_product, tucker_to_tensor, unfold


def _tails(T: np.ndarray, ranks) -> list[float]:
    out = []
    for k, r in enumerate(ranks):
        Tk = np.moveaxis(T, k, 0).reshape(T.shape[k], -1)
        s = np.linalg.svd(Tk, compute_uv=False)
        out.append(float(np.sum(s[r:] ** 2)))
    return out


@st.composite
def tensors(draw):
    ndim = draw(st.integers(3, 4))
    shape = tuple(draw(st.integers(2, 5)) for _ in range(ndim))
    ranks = []
    for k in range(ndim):
        others = int(np.prod([shape[j] for j in range(ndim) if j != k]))
        ranks.append(draw(st.integers(1, min(shape[k], others))))
    # HOSVD requires r_n <= prod of the other ranks (a core that size can exist)
    for k in range(ndim):
        ranks[k] = min(ranks[k], int(np.prod([ranks[j] for j in range(ndim) if j != k])))
    seed = draw(st.integers(0, 2**31 - 1))
    return np.random.default_rng(seed).standard_normal(shape), tuple(ranks), seed


@given(tensors())
def test_quasi_optimality_chain(args):
    T, ranks, seed = args
    N = T.ndim
    core, factors = hosvd(T, ranks)
    T_hat = tucker_to_tensor(core, factors)
    err = float(np.sum((T - T_hat) ** 2))
    tails = _tails(T, ranks)
    assert err <= sum(tails) * (1 + 1e-10) + 1e-12
    # the library's unfold has the stated singular values (same matrix up to column order)
    for k, r in enumerate(ranks):
        s_lib = np.linalg.svd(unfold(T, k), compute_uv=False)
        assert float(np.sum(s_lib[r:] ** 2)) == pytest.approx(tails[k], rel=1e-9, abs=1e-12)
    # lower bound: any X of multilinear rank <= ranks has N‖T − X‖² >= Σ tails (HOOI and random Tucker)
    X_hooi = tucker_to_tensor(*hooi(T, ranks, n_iter=20)[:2])
    rng = np.random.default_rng(seed + 1)
    X_rand = rng.standard_normal(ranks)
    for k, r in enumerate(ranks):
        X_rand = mode_product(X_rand, rng.standard_normal((T.shape[k], r)), k)
    for X in (X_hooi, X_rand, T_hat):
        assert N * float(np.sum((T - X) ** 2)) >= sum(tails) * (1 - 1e-10) - 1e-12


def test_orthogonal_telescoping_terms():
    """The proof's key step: T − T̂ = Σ_n T ×_{k<n} P_k ×_n (I − P_n), the N terms mutually orthogonal."""
    rng = np.random.default_rng(0)
    T = rng.standard_normal((4, 5, 3))
    ranks = (2, 3, 2)
    _, U = hosvd(T, ranks)
    P = [u @ u.T for u in U]
    terms = []
    for n in range(3):
        X = T
        for k in range(n):
            X = mode_product(X, P[k], k)
        terms.append(mode_product(X, np.eye(T.shape[n]) - P[n], n))
    T_hat = tucker_to_tensor(*hosvd(T, ranks))
    np.testing.assert_allclose(sum(terms), T - T_hat, rtol=1e-10, atol=1e-12)
    for i in range(3):
        for j in range(i + 1, 3):
            assert abs(np.sum(terms[i] * terms[j])) < 1e-10 * np.sum(T**2)


def test_negative_control_random_factors_violate_the_upper_bound():
    """Perturb the claimed factors: random orthonormal U_n (optimal core kept) exceed Σ tails."""
    rng = np.random.default_rng(1)
    ranks = (2, 2, 2)
    T = rng.standard_normal(ranks)  # multilinear rank (2, 2, 2) plus a little noise: small tails
    for k, s in enumerate((5, 4, 6)):
        T = mode_product(T, rng.standard_normal((s, 2)), k)
    T = T + 0.05 * rng.standard_normal(T.shape)
    U = [np.linalg.qr(rng.standard_normal((s, r)))[0] for s, r in zip(T.shape, ranks)]
    core = T
    for k, u in enumerate(U):
        core = mode_product(core, u.T, k)
    err = float(np.sum((T - tucker_to_tensor(core, U)) ** 2))
    assert err > 10 * sum(_tails(T, ranks))


def test_negative_control_factor_N_is_needed():
    """Drop N from the lower bound: Σ tails exceeds ‖T − X‖² for X = HOOI/HOSVD output on this tensor."""
    rng = np.random.default_rng(2)
    T = rng.standard_normal((5, 5, 5))
    ranks = (2, 2, 2)
    X = tucker_to_tensor(*hooi(T, ranks, n_iter=30)[:2])
    assert sum(_tails(T, ranks)) > 1.5 * float(np.sum((T - X) ** 2))
