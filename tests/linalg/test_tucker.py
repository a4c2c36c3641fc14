"""unfold/fold, mode products, HOSVD and HOOI against TensorLy and NumPy float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorly as tl
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tensorly.decomposition import tucker as tl_tucker

from lowrank_theory import backend as B
from lowrank_theory.linalg import (
    HOOIResult,
    TuckerResult,
    fold,
    hooi,
    hosvd,
    mode_product,
    tucker,
    tucker_to_tensor,
    unfold,
)
from tests.conftest import tol

# The ``bk`` fixture only names a backend (no state), so sharing it across hypothesis examples is safe.
with_fixture = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
)
DTYPES = ["float32", "float64"]
tl.set_backend("numpy")  # TensorLy's default; the references below run on host float64 arrays


def _f64(x) -> np.ndarray:
    return np.asarray(B.to_numpy(x), dtype=np.float64)


def _same_kind(out, like) -> None:
    assert B.backend_name(out) == B.backend_name(like)
    assert str(B.device_of(out)) == str(B.device_of(like))
    assert out.dtype == like.dtype


def _dense(res: TuckerResult) -> np.ndarray:
    """Reconstruction in float64 on the host, by TensorLy (independent of our tucker_to_tensor)."""
    return tl.tucker_to_tensor((_f64(res.core), [_f64(U) for U in res.factors]))


def _err2(T: np.ndarray, res: TuckerResult) -> float:
    return float(np.sum((T - _dense(res)) ** 2))


def _discarded(T: np.ndarray, ranks) -> float:
    """sum_n sum_{i > r_n} sigma_i(T_(n))^2, from NumPy SVDs of TensorLy's unfoldings."""
    total = 0.0
    for n, r in enumerate(ranks):
        s = np.linalg.svd(tl.base.unfold(T, n), compute_uv=False)
        total += float(np.sum(s[r:] ** 2))
    return total


def _exact_rank_tensor(shape, ranks, rng) -> np.ndarray:
    core = rng.standard_normal(ranks)
    factors = [rng.standard_normal((i, r)) for i, r in zip(shape, ranks)]
    return tl.tucker_to_tensor((core, factors))


@st.composite
def shapes_and_ranks(draw, max_ndim=3, max_size=6):
    ndim = draw(st.integers(2, max_ndim))
    shape = tuple(draw(st.integers(1, max_size)) for _ in range(ndim))
    ranks = tuple(draw(st.integers(1, s)) for s in shape)
    # a multilinear rank satisfies r_n <= prod_{k != n} r_k
    assume(all(r <= math.prod(ranks) // r for r in ranks))
    return shape, ranks


# ----------------------------------------------------------------------------- unfold / fold
@with_fixture
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data())
def test_unfold_matches_tensorly_and_fold_inverts(bk, shape, data):
    T_np = np.random.default_rng(len(shape)).standard_normal(shape)
    mode = data.draw(st.integers(-len(shape), len(shape) - 1))
    T = bk.asarray(T_np)
    M = unfold(T, mode)
    _same_kind(M, T)
    np.testing.assert_array_equal(_f64(M), tl.base.unfold(T_np, mode % len(shape)))
    back = fold(M, mode, tuple(shape))
    _same_kind(back, T)
    np.testing.assert_array_equal(_f64(back), T_np)


def test_fold_matches_tensorly(bk):
    shape = (3, 4, 2, 5)
    M_np = np.random.default_rng(0).standard_normal((2, 60))
    np.testing.assert_array_equal(_f64(fold(bk.asarray(M_np), 2, shape)), tl.base.fold(M_np, 2, shape))


# ----------------------------------------------------------------------------- mode products
@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), J=st.integers(1, 5), data=st.data())
def test_mode_product_matches_einsum(bk, dtype, shape, J, data):
    rng = np.random.default_rng(J)
    mode = data.draw(st.integers(0, len(shape) - 1))
    T_np = rng.standard_normal(shape).astype(dtype)
    M_np = rng.standard_normal((J, shape[mode])).astype(dtype)
    letters = "abcd"[: len(shape)]
    out_letters = letters[:mode] + "z" + letters[mode + 1 :]
    ref = np.einsum(f"z{letters[mode]},{letters}->{out_letters}", M_np.astype(np.float64), T_np.astype(np.float64))
    T = bk.asarray(T_np)
    out = mode_product(T, bk.asarray(M_np), mode)
    _same_kind(out, T)
    np.testing.assert_allclose(_f64(out), ref, **tol(dtype))
    # unfold(T x_n M, n) = M unfold(T, n)
    ref_unfolded = M_np.astype(np.float64) @ tl.base.unfold(T_np.astype(np.float64), mode)
    np.testing.assert_allclose(_f64(unfold(out, mode)), ref_unfolded, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(sr=shapes_and_ranks(max_ndim=4, max_size=5))
def test_tucker_to_tensor_matches_tensorly(bk, dtype, sr):
    shape, ranks = sr
    rng = np.random.default_rng(sum(shape))
    core = rng.standard_normal(ranks).astype(dtype)
    factors = [rng.standard_normal((i, r)).astype(dtype) for i, r in zip(shape, ranks)]
    ref = tl.tucker_to_tensor((core.astype(np.float64), [U.astype(np.float64) for U in factors]))
    out = tucker_to_tensor(bk.asarray(core), [bk.asarray(U) for U in factors])
    _same_kind(out, bk.asarray(core))
    assert tuple(out.shape) == tuple(shape)
    np.testing.assert_allclose(_f64(out), ref, **tol(dtype))


def test_tucker_to_tensor_torch_gradients_match_dense():
    """d<Gr, core x_n U_n>/d core = Gr x_n U_n^T and d/dU_0 = unfold(Gr, 0) unfold(core x_{n>0} U_n, 0)^T."""
    rng = np.random.default_rng(4)
    shape, ranks = (5, 4, 3), (2, 3, 2)
    core_np = rng.standard_normal(ranks)
    U_np = [rng.standard_normal((i, r)) for i, r in zip(shape, ranks)]
    Gr = rng.standard_normal(shape)
    core = torch.from_numpy(core_np).requires_grad_(True)
    Us = [torch.from_numpy(U).requires_grad_(True) for U in U_np]
    loss = torch.sum(tucker_to_tensor(core, Us) * torch.from_numpy(Gr))
    g_core, g_U0 = torch.autograd.grad(loss, [core, Us[0]])
    ref_core = np.einsum("abc,ai,bj,ck->ijk", Gr, *U_np)
    rest = np.einsum("ijk,bj,ck->ibc", core_np, U_np[1], U_np[2])
    ref_U0 = tl.base.unfold(Gr, 0) @ tl.base.unfold(rest, 0).T
    np.testing.assert_allclose(g_core.numpy(), ref_core, **tol("float64"))
    np.testing.assert_allclose(g_U0.numpy(), ref_U0, **tol("float64"))


# ----------------------------------------------------------------------------- HOSVD / HOOI bounds
@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(sr=shapes_and_ranks(), seed=st.integers(0, 2**16))
def test_hosvd_and_hooi_error_bounds(bk, dtype, sr, seed):
    shape, ranks = sr
    T_np = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    T64 = T_np.astype(np.float64)
    T = bk.asarray(T_np)
    h = hosvd(T, ranks)
    o = hooi(T, ranks)
    t = tol(dtype)
    for res in (h, o):
        assert tuple(res.core.shape) == ranks
        _same_kind(res.core, T)
        for n, U in enumerate(res.factors):
            _same_kind(U, T)
            assert tuple(U.shape) == (shape[n], ranks[n])
            np.testing.assert_allclose(_f64(U).T @ _f64(U), np.eye(ranks[n]), atol=10 * t["atol"])
        # the core is the optimal one for the factors: G = T x_n U_n^T
        G_ref = T64
        for n, U in enumerate(res.factors):
            G_ref = np.moveaxis(np.tensordot(_f64(U).T, G_ref, axes=([1], [n])), 0, n)
        np.testing.assert_allclose(_f64(res.core), G_ref, rtol=t["rtol"], atol=10 * t["atol"])
    norm2 = float(np.sum(T64**2))
    slack = 10 * t["rtol"] * norm2  # round-off of the reconstruction, relative to ||T||^2
    e_h, e_o = _err2(T64, h), _err2(T64, o)
    N = len(shape)
    assert e_h <= _discarded(T64, ranks) + slack  # De Lathauwer et al. 2000, Property 10
    assert e_h <= N * e_o + slack  # quasi-optimality (sqrt(N) in norm), since e_o >= best error
    assert e_o <= e_h + slack  # HOOI starts at the HOSVD and never lowers the fit


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_multilinear_rank_is_recovered(bk, dtype):
    rng = np.random.default_rng(7)
    shape, ranks = (6, 5, 4, 3), (3, 2, 4, 2)
    T_np = _exact_rank_tensor(shape, ranks, rng)
    T_np /= np.linalg.norm(T_np)
    T = bk.asarray(T_np.astype(dtype))
    for res in (hosvd(T, ranks), hooi(T, ranks), tucker(T, ranks, method="hosvd")):
        recon = tucker_to_tensor(*res)
        _same_kind(recon, T)
        np.testing.assert_allclose(_f64(recon), T_np, rtol=0, atol=10 * tol(dtype)["atol"])


def test_hooi_agrees_with_tensorly():
    """Same HOSVD start and the same Gauss–Seidel sweeps: both reach the same stationary point here.

    Both are local methods, so in general they could stop at different points; on these tensors the
    two runs coincide, and 1e-7 relative is far above the ~1e-12 their stopping rules leave.
    """
    for seed, shape, ranks in [(0, (8, 7, 6), (3, 3, 2)), (1, (5, 6, 7, 4), (2, 3, 3, 2)), (2, (10, 9, 3), (4, 5, 2))]:
        rng = np.random.default_rng(seed)
        # a decaying multilinear spectrum plus noise: a realistic, well-separated problem
        T_np = _exact_rank_tensor(shape, tuple(min(s, r + 2) for s, r in zip(shape, ranks)), rng)
        T_np = T_np / np.linalg.norm(T_np) + 0.05 * rng.standard_normal(shape) / math.sqrt(np.prod(shape))
        core, factors = tl_tucker(tl.tensor(T_np), rank=list(ranks), init="svd", n_iter_max=1000, tol=1e-14)
        ref = np.linalg.norm(T_np - tl.tucker_to_tensor((core, factors)))
        for backend in ("numpy", "torch"):
            T = T_np if backend == "numpy" else torch.from_numpy(T_np)
            res = hooi(T, ranks, n_iter=1000, tol=1e-14)
            assert res.converged
            ours = math.sqrt(_err2(T_np, res))
            assert ours == pytest.approx(ref, rel=1e-7)


def test_hooi_result_fields_and_history(bk):
    rng = np.random.default_rng(3)
    T_np = rng.standard_normal((6, 5, 4))
    T = bk.asarray(T_np)
    ranks = (2, 2, 2)
    res = hooi(T, ranks, n_iter=200, tol=1e-13)
    assert isinstance(res, HOOIResult) and isinstance(res, TuckerResult)
    core, factors = res  # unpacks as a plain TuckerResult
    assert core is res.core and factors is res.factors
    assert res.converged and 1 <= res.n_iter < 200
    assert len(res.errors) == res.n_iter + 1
    # the fit never decreases: errors are non-increasing up to round-off
    assert np.all(np.diff(res.errors) <= 1e-12)
    # errors[0] is the HOSVD error and errors[-1] the true final error (relative), both ~0.5 here
    nT = np.linalg.norm(T_np)
    assert res.errors[0] == pytest.approx(math.sqrt(_err2(T_np, hosvd(T, ranks))) / nT, abs=1e-7)
    assert res.errors[-1] == pytest.approx(math.sqrt(_err2(T_np, res)) / nT, abs=1e-7)
    # n_iter=0 returns the HOSVD itself
    zero = hooi(T, ranks, n_iter=0)
    assert zero.n_iter == 0 and not zero.converged
    for a, b in zip(zero.factors, hosvd(T, ranks).factors):
        np.testing.assert_allclose(_f64(a), _f64(b), **tol("float64"))
    # a capped run reports that it did not converge
    capped = hooi(T, ranks, n_iter=1, tol=0.0)
    assert capped.n_iter == 1 and not capped.converged


def test_hooi_random_and_given_init():
    rng = np.random.default_rng(11)
    T = rng.standard_normal((7, 6, 5))
    ranks = (3, 2, 2)
    a = hooi(T, ranks, init="random", seed=5, n_iter=0)
    b = hooi(T, ranks, init="random", seed=5, n_iter=0)
    for Ua, Ub in zip(a.factors, b.factors):
        np.testing.assert_array_equal(Ua, Ub)  # one seed, one start
    # a converged run from a random start is a stationary point no worse than its own start
    r = hooi(T, ranks, init="random", seed=5, n_iter=500, tol=1e-13)
    assert r.converged and r.errors[-1] <= r.errors[0] + 1e-12
    # given (non-orthonormal) factors are orthonormalized and iterate from there
    given_init = [rng.standard_normal((s, k)) for s, k in zip(T.shape, ranks)]
    g = hooi(T, ranks, init=given_init, n_iter=0)
    for U0, U in zip(given_init, g.factors):
        np.testing.assert_allclose(U.T @ U, np.eye(U.shape[1]), atol=1e-12)
        # same column space as the given matrix
        np.testing.assert_allclose(U @ (U.T @ U0), U0, atol=1e-10)


def test_hosvd_same_on_numpy_and_torch():
    """One input gives one decomposition on every backend (signs fixed as in truncated_svd)."""
    T_np = np.random.default_rng(5).standard_normal((5, 4, 6))
    a, b = hosvd(T_np, (3, 2, 3)), hosvd(torch.from_numpy(T_np), (3, 2, 3))
    np.testing.assert_allclose(_f64(b.core), a.core, **tol("float64"))
    for Ua, Ub in zip(a.factors, b.factors):
        np.testing.assert_allclose(_f64(Ub), Ua, **tol("float64"))


def test_tucker_dispatch():
    T = np.random.default_rng(2).standard_normal((4, 5, 3))
    h = tucker(T, 2, method="hosvd")  # an int rank applies to every mode
    ref = hosvd(T, (2, 2, 2))
    np.testing.assert_array_equal(h.core, ref.core)
    o = tucker(T, (2, 2, 2), n_iter=3, tol=0.0)
    assert isinstance(o, HOOIResult) and o.n_iter == 3
    with pytest.raises(ValueError, match="method"):
        tucker(T, 2, method="cp")
    with pytest.raises(TypeError, match="hosvd"):
        tucker(T, 2, method="hosvd", n_iter=3)


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    T = np.random.default_rng(0).standard_normal((4, 3, 2))
    with pytest.raises(TypeError, match="T must have dtype"):
        hosvd(np.ones((3, 3, 3), dtype=np.int64), 2)
    with pytest.raises(TypeError, match="T must have dtype"):
        unfold(torch.ones((3, 3), dtype=torch.int32), 0)
    bad = T.copy()
    bad[1, 2, 0] = np.nan
    for f in (hosvd, hooi, tucker):
        with pytest.raises(ValueError, match="NaN"):
            f(bad, 2)
    with pytest.raises(ValueError, match="NaN"):
        mode_product(T, np.full((2, 4), np.inf), 0)
    with pytest.raises(ValueError, match="NaN"):
        tucker_to_tensor(bad, [np.eye(4), np.eye(3), np.eye(2)])
    for ranks in [(2, 2), (2, 2, 2, 2), (0, 2, 2), (5, 2, 2), (2, 3, 3), (4, 1, 2)]:
        # wrong length (twice), r < 1, r > I_n (twice), r_0 = 4 > r_1 r_2 = 2
        with pytest.raises(ValueError, match="ranks"):
            hosvd(T, ranks)
        with pytest.raises(ValueError, match="ranks"):
            hooi(T, ranks)
    with pytest.raises(TypeError, match="ranks"):
        hosvd(T, (2.0, 2, 2))
    with pytest.raises(ValueError, match="mode"):
        unfold(T, 3)
    with pytest.raises(ValueError, match="M must have shape"):
        fold(np.ones((4, 5)), 0, (4, 3, 2))
    with pytest.raises(ValueError, match="M must have shape"):
        mode_product(T, np.ones((2, 3)), 0)
    with pytest.raises(TypeError, match="dtype"):
        mode_product(T, np.ones((2, 4), dtype=np.float32), 0)
    with pytest.raises(ValueError, match=r"factors\[1\]"):
        tucker_to_tensor(np.ones((2, 2)), [np.ones((3, 2)), np.ones((3, 3))])
    with pytest.raises(ValueError, match="n_iter"):
        hooi(T, 2, n_iter=-1)
    with pytest.raises(ValueError, match="init"):
        hooi(T, 2, init="svd")
    with pytest.raises(ValueError, match=r"init\[0\]"):
        hooi(T, 2, init=[np.ones((4, 3)), np.ones((3, 2)), np.ones((2, 2))])
