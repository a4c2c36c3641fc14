"""ldu (pivoted) and ldu_nopivot against NumPy float64 determinants and dense reconstructions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_theory import backend as B
from lowrank_theory.linalg import LDUResult, ldu, ldu_nopivot
from tests.conftest import tol

# The ``bk`` fixture only names a backend (no state), so sharing it across hypothesis examples is safe.
with_fixture = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
)
DTYPES = ["float32", "float64"]


def _f64(x) -> np.ndarray:
    return np.asarray(B.to_numpy(x), dtype=np.float64)


def _recon(res: LDUResult) -> np.ndarray:
    P, L, D, U = (_f64(t) for t in res)
    return P @ L @ (D[:, None] * U)


def _check_structure(res: LDUResult, like, m: int, n: int) -> None:
    """Shapes, kind, P a permutation, L/U unit-trapezoidal (exact ones and zeros)."""
    k = min(m, n)
    P, L, D, U = res
    assert tuple(P.shape) == (m, m) and tuple(L.shape) == (m, k)
    assert tuple(D.shape) == (k,) and tuple(U.shape) == (k, n)
    for t in res:
        assert B.backend_name(t) == B.backend_name(like)
        assert str(B.device_of(t)) == str(B.device_of(like))
        assert t.dtype == like.dtype
    Pn, Ln, Un = _f64(P), _f64(L), _f64(U)
    assert set(np.unique(Pn)) <= {0.0, 1.0}
    assert np.all(Pn.sum(axis=0) == 1) and np.all(Pn.sum(axis=1) == 1)
    assert np.all(np.diagonal(Ln) == 1) and np.all(np.triu(Ln, 1) == 0)
    assert np.all(np.diagonal(Un) == 1) and np.all(np.tril(Un, -1) == 0)


def _assert_reconstructs(res: LDUResult, A_np: np.ndarray, dtype) -> None:
    A64 = A_np.astype(np.float64)
    t = tol(dtype)
    # backward error of LU with partial pivoting is O(n eps growth ||A||); tol leaves a wide margin
    assert np.linalg.norm(_recon(res) - A64) <= t["rtol"] * np.linalg.norm(A64) + t["atol"]


def _leading_minors(A: np.ndarray) -> np.ndarray:
    """det(A_{1:i,1:i}) for i = 0 .. min(m, n), in float64 (NumPy's LAPACK, independent of our code)."""
    k = min(A.shape)
    return np.array([1.0] + [np.linalg.det(A[:i, :i]) for i in range(1, k + 1)])


def _column_dominant(m: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Strictly diagonally dominant by columns (leading k×k block): no interchanges, minors far from 0."""
    A = rng.uniform(-1, 1, (m, n))
    k = min(m, n)
    col_abs = np.abs(A[:, :k]).sum(axis=0)
    A[np.arange(k), np.arange(k)] = np.sign(A[np.arange(k), np.arange(k)] + 0.5) * (col_abs + 1.0)
    return A


# ----------------------------------------------------------------------------- ldu (pivoted)
@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(m=st.integers(1, 10), n=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_ldu_structure_and_reconstruction(bk, dtype, m, n, seed):
    A_np = np.random.default_rng(seed).standard_normal((m, n)).astype(dtype)
    A = bk.asarray(A_np)
    res = ldu(A)
    _check_structure(res, A, m, n)
    _assert_reconstructs(res, A_np, dtype)
    Ln = _f64(res.L)
    assert np.all(np.abs(Ln) <= 1)  # partial pivoting: multipliers bounded by one
    if m == n:  # det A = det P · Π D_i, checked against NumPy's determinant
        A64 = A_np.astype(np.float64)
        det_ref = np.linalg.det(A64)
        det_ours = np.linalg.det(_f64(res.P)) * np.prod(_f64(res.D))
        hadamard = np.prod(np.linalg.norm(A64, axis=1))  # |det A| <= Π ||a_i||: the scale of det errors
        assert abs(det_ours - det_ref) <= tol(dtype)["rtol"] * hadamard


@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (6, 6), (1, 5), (5, 1)])
def test_ldu_rectangular(bk, shape):
    m, n = shape
    A_np = np.random.default_rng(1).standard_normal(shape)
    res = ldu(bk.asarray(A_np))
    _check_structure(res, bk.asarray(A_np), m, n)
    _assert_reconstructs(res, A_np, "float64")


def test_ldu_zero_pivot_with_zero_row_gives_zero_d(bk):
    """Rank 2 of 3: elimination ends with an exactly zero Schur complement, D_3 = 0, U row = e_3."""
    A_np = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 1.0, 1.0]])
    res = ldu(bk.asarray(A_np))
    _check_structure(res, bk.asarray(A_np), 3, 3)
    D, U = _f64(res.D), _f64(res.U)
    assert D[2] == 0 and np.all(D[:2] != 0)
    np.testing.assert_array_equal(U[2], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(_recon(res), A_np, atol=1e-15)
    res2 = ldu(bk.asarray(np.array([[1.0, 2.0], [2.0, 4.0]])))
    np.testing.assert_allclose(_f64(res2.D), [2.0, 0.0])
    np.testing.assert_allclose(_recon(res2), [[1.0, 2.0], [2.0, 4.0]], atol=1e-15)


@pytest.mark.parametrize(
    "A_list",
    [
        [[0.0, 1.0], [0.0, 1.0]],  # no LDU with unit U for any row order
        [[0.0, 1.0, 2.0], [0.0, 3.0, 4.0], [0.0, 5.0, 7.0]],  # zero first column
        [[1.0, 2.0, 3.0], [2.0, 4.0, 5.0]],  # wide: second pivot 0, its row (0, 0, -1) is not
    ],
)
def test_ldu_zero_pivot_with_nonzero_row_raises(bk, A_list):
    with pytest.raises(ValueError, match="A has an exactly zero pivot at elimination step"):
        ldu(bk.asarray(np.array(A_list)))


# ----------------------------------------------------------------------------- ldu_nopivot
@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(m=st.integers(1, 8), n=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_ldu_nopivot_pivots_are_ratios_of_leading_minors(bk, dtype, m, n, seed):
    """A = L0 diag(d0) U0 with random unit-trapezoidal L0, U0 and |d0_i| in [1/2, 2]: by uniqueness the
    factors are L0, d0, U0, and independently D_i = det A_i / det A_{i-1} (NumPy float64 determinants)."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    L0 = np.tril(rng.uniform(-1, 1, (m, k)), -1) + np.eye(m, k)
    U0 = np.triu(rng.uniform(-1, 1, (k, n)), 1) + np.eye(k, n)
    d0 = rng.uniform(0.5, 2.0, k) * rng.choice([-1.0, 1.0], k)
    A_np = (L0 @ (d0[:, None] * U0)).astype(dtype)
    A = bk.asarray(A_np)
    res = ldu_nopivot(A)
    _check_structure(res, A, m, n)
    np.testing.assert_array_equal(_f64(res.P), np.eye(m))
    _assert_reconstructs(res, A_np, dtype)
    minors = _leading_minors(A_np.astype(np.float64))
    # pivot i carries ~ i·eps·growth relative error (growth <= 2^k with multipliers in [-1, 1], k <= 8):
    # 10× the named tolerance covers it in float32 and is still 1e-9 in float64
    rtol = 10 * tol(dtype)["rtol"]
    np.testing.assert_allclose(_f64(res.D), minors[1:] / minors[:-1], rtol=rtol)
    np.testing.assert_allclose(_f64(res.D), d0, rtol=rtol)
    np.testing.assert_allclose(_f64(res.L), L0, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(_f64(res.U), U0, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(m=st.integers(1, 8), n=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_ldu_nopivot_agrees_with_ldu_without_interchanges(bk, dtype, m, n, seed):
    """Column diagonal dominance: partial pivoting makes no interchanges (each pivot dominates
    its column; Higham 2002, §9.5), so by
    uniqueness of the no-pivot LDU the two functions must return the same factors."""
    A_np = _column_dominant(m, n, np.random.default_rng(seed)).astype(dtype)
    A = bk.asarray(A_np)
    piv, nop = ldu(A), ldu_nopivot(A)
    np.testing.assert_array_equal(_f64(piv.P), np.eye(m))
    t = tol(dtype)
    for a, b in zip(piv[1:], nop[1:]):
        np.testing.assert_allclose(_f64(b), _f64(a), rtol=t["rtol"], atol=t["atol"] * np.abs(A_np).max())


@with_fixture
@given(n=st.integers(2, 8), frac=st.floats(0, 1), seed=st.integers(0, 2**16), extra_cols=st.integers(0, 3))
def test_ldu_nopivot_singular_leading_minor_raises(bk, n, frac, seed, extra_cols):
    """Make the leading j×j block singular (row j a combination of rows < j within the block);
    earlier minors stay far from zero, so the error must name order j."""
    rng = np.random.default_rng(seed)
    A_np = _column_dominant(n, n + extra_cols, rng)
    j = 1 + int(frac * (n - 2))  # 1 <= j <= n-1: the factorization must divide by pivot j
    c = rng.uniform(-1, 1, j - 1)
    A_np[j - 1, :j] = c @ A_np[: j - 1, :j]
    assert abs(np.linalg.det(A_np[:j, :j])) <= 1e-12 * np.prod(np.linalg.norm(A_np[:j, :j], axis=1))
    with pytest.raises(ValueError, match=f"leading principal minor of order {j} vanishes"):
        ldu_nopivot(bk.asarray(A_np))
    ldu(bk.asarray(A_np))  # the pivoted factorization is fine with it


def test_ldu_nopivot_singular_square_last_minor_is_allowed(bk):
    """det A = 0 with nonsingular leading minors: the last pivot divides nothing, D_n = 0."""
    rng = np.random.default_rng(4)
    M = _column_dominant(4, 4, rng)
    w, v = rng.standard_normal(4), rng.standard_normal(4)
    A_np = np.block([[M, (M @ w)[:, None]], [(v @ M)[None, :], np.array([[v @ M @ w]])]])
    res = ldu_nopivot(bk.asarray(A_np))
    D = _f64(res.D)
    assert abs(D[-1]) <= 1e-12 * np.abs(A_np).max() * 5
    assert np.all(np.abs(D[:-1]) > 1)
    _assert_reconstructs(res, A_np, "float64")
    # the same matrix made tall needs the last pivot as a divisor: refused
    tall = np.vstack([A_np, rng.standard_normal((1, 5))])
    with pytest.raises(ValueError, match="leading principal minor of order 5"):
        ldu_nopivot(bk.asarray(tall))


def test_ldu_nopivot_exact_zero_first_pivot(bk):
    with pytest.raises(ValueError, match="leading principal minor of order 1 vanishes"):
        ldu_nopivot(bk.asarray(np.array([[0.0, 1.0], [1.0, 0.0]])))
    np.testing.assert_allclose(_f64(ldu_nopivot(bk.asarray(np.array([[0.0]]))).D), [0.0])  # 1×1: nothing to divide


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("f", [ldu, ldu_nopivot])
def test_bad_inputs(bk, f):
    good = np.random.default_rng(0).standard_normal((4, 3))
    with pytest.raises(TypeError, match="A must have dtype float32 or float64"):
        f(bk.asarray(np.arange(12).reshape(4, 3)))
    nan = good.copy()
    nan[2, 1] = np.nan
    with pytest.raises(ValueError, match="A contains NaN or Inf"):
        f(bk.asarray(nan))
    with pytest.raises(ValueError, match="A must be 2-dimensional"):
        f(bk.asarray(good[0]))
    with pytest.raises(ValueError, match="A must be 2-dimensional"):
        f(bk.asarray(good[None]))
    with pytest.raises(ValueError, match="zero-sized"):
        f(bk.asarray(np.zeros((3, 0))))
    with pytest.raises(TypeError, match="A must be a NumPy, torch or CuPy array"):
        f(good.tolist())
    if bk.name.startswith("torch"):
        with pytest.raises(TypeError, match="A must have dtype"):
            f(torch.ones(3, 3, dtype=torch.float16))
