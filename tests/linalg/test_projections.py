"""Uni-LoRA's isometric projection and Comp-LoRA's complement projector against dense references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_theory import backend as B
from lowrank_theory.linalg import (
    ComplementProjector,
    IsometricProjection,
    complement_projector,
    isometric_projection,
)
from tests.conftest import tol

with_fixture = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DTYPES = ["float32", "float64"]


def _f64(x) -> np.ndarray:
    return np.asarray(B.to_numpy(x), dtype=np.float64)


@st.composite
def sizes(draw):
    d = draw(st.integers(1, 12))
    D = draw(st.integers(d, 4 * d + 5))
    return D, d, draw(st.integers(0, 2**32))


# ============================================================================= isometric projection
@given(sizes())
def test_structure_and_isometry_dense(args):
    """One non-zero per row, 1/sqrt(n_j), every column hit, P^T P = I_d (dense float64 reference)."""
    D, d, seed = args
    P = isometric_projection(D, d, seed)
    Pd = P.to_dense()
    assert Pd.shape == (D, d) == P.shape
    assert np.all(np.count_nonzero(Pd, axis=1) == 1)
    counts = np.count_nonzero(Pd, axis=0)
    assert np.all(counts >= 1) and counts.sum() == D
    np.testing.assert_array_equal(P.counts, counts)
    np.testing.assert_array_equal(Pd[np.arange(D), P.indices], P.values)
    np.testing.assert_allclose(P.values, 1 / np.sqrt(counts[P.indices]), rtol=1e-15)
    np.testing.assert_allclose(Pd.T @ Pd, np.eye(d), atol=1e-14)


def test_same_seed_same_projection_and_square_case_is_permutation():
    a, b = isometric_projection(50, 7, 3), isometric_projection(50, 7, 3)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, isometric_projection(50, 7, 4).indices)
    P = isometric_projection(9, 9, 0).to_dense()
    np.testing.assert_array_equal(np.sort(P, axis=1)[:, -1], np.ones(9))
    np.testing.assert_array_equal(P.sum(axis=0), np.ones(9))


def test_groups_are_uniform_beyond_coverage():
    """n_j - 1 is Multinomial(D - d, uniform): mean (D-d)/d, variance (D-d)(1/d)(1-1/d).

    With D - d = 20000 rows over d = 20 groups the mean count is 1000 and the sd 30.8; a skewed
    assignment (e.g. all extra rows to one column) would fail by orders of magnitude.
    Tolerance: every group within 6 sd of its mean.
    """
    D, d = 20020, 20
    P = isometric_projection(D, d, 1)
    extra = P.counts - 1
    mean, sd = (D - d) / d, np.sqrt((D - d) * (1 / d) * (1 - 1 / d))
    assert np.all(np.abs(extra - mean) < 6 * sd)


@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(args=sizes(), batch=st.sampled_from([(), (3,)]))
def test_apply_adjoint_match_dense_and_preserve_norms(bk, dtype, args, batch):
    """apply = P θ, adjoint = Pᵀ φ, ‖Pθ‖ = ‖θ‖, ⟨Pθ, φ⟩ = ⟨θ, Pᵀφ⟩, PᵀPθ = θ; output on the input's backend."""
    D, d, seed = args
    P = isometric_projection(D, d, seed)
    Pd = P.to_dense()
    rng = np.random.default_rng(seed)
    theta_np = rng.standard_normal((d, *batch)).astype(dtype)
    phi_np = rng.standard_normal((D, *batch)).astype(dtype)
    theta, phi = bk.asarray(theta_np), bk.asarray(phi_np)
    up, down = P.apply(theta), P.adjoint(phi)
    for out, like, shape in ((up, theta, (D, *batch)), (down, phi, (d, *batch))):
        assert B.backend_name(out) == B.backend_name(like) and out.dtype == like.dtype
        assert str(B.device_of(out)) == str(B.device_of(like)) and tuple(out.shape) == shape
    t = tol(dtype)
    np.testing.assert_allclose(_f64(up), Pd @ theta_np.astype(np.float64), **t)
    np.testing.assert_allclose(_f64(down), Pd.T @ phi_np.astype(np.float64), **t)
    np.testing.assert_allclose(
        np.linalg.norm(_f64(up), axis=0), np.linalg.norm(theta_np.astype(np.float64), axis=0), **t
    )
    lhs = np.sum(_f64(up) * phi_np.astype(np.float64), axis=0)
    rhs = np.sum(theta_np.astype(np.float64) * _f64(down), axis=0)
    np.testing.assert_allclose(lhs, rhs, rtol=t["rtol"], atol=t["atol"] * D)
    np.testing.assert_allclose(_f64(P.adjoint(up)), theta_np.astype(np.float64), **t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_in_theta_d_is_adjoint_of_gradient_in_theta_D(dtype):
    """Chain rule through θ_D = P θ_d: ∇_{θ_d} f(Pθ_d) = Pᵀ ∇_{θ_D} f, for a non-linear loss f."""
    D, d = 40, 9
    P = isometric_projection(D, d, 5)
    g = torch.Generator().manual_seed(0)
    theta_d = torch.randn(d, dtype=dtype, generator=g, requires_grad=True)
    target = torch.randn(D, dtype=dtype, generator=g)

    def f(theta_D):
        return torch.sum(torch.tanh(theta_D) * target) + torch.sum(theta_D**4)

    f(P.apply(theta_d)).backward()
    theta_D = P.apply(theta_d.detach()).requires_grad_(True)
    f(theta_D).backward()
    expected = torch.from_numpy(P.to_dense()).to(dtype).T @ theta_D.grad
    torch.testing.assert_close(theta_d.grad, expected, **tol(dtype))
    torch.testing.assert_close(theta_d.grad, P.adjoint(theta_D.grad), **tol(dtype))
    # and adjoint itself is differentiable (its gradient is P)
    phi = torch.randn(D, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(d, dtype=dtype, generator=g)
    torch.sum(P.adjoint(phi) * w).backward()
    torch.testing.assert_close(phi.grad, P.apply(w), **tol(dtype))


def test_index_cache_is_per_dtype():
    P = isometric_projection(10, 4, 0)
    a = P.apply(torch.ones(4, dtype=torch.float32))
    b = P.apply(torch.ones(4, dtype=torch.float64))
    c = P.apply(np.ones(4))
    assert a.dtype == torch.float32 and b.dtype == torch.float64 and c.dtype == np.float64
    np.testing.assert_allclose(a.numpy(), c, rtol=1e-6)
    assert len(P._cache) == 3


def test_isometric_projection_bad_inputs():
    with pytest.raises(ValueError, match="D must be >= d"):
        isometric_projection(3, 5, 0)
    with pytest.raises(ValueError, match="d must be a positive int"):
        isometric_projection(3, 0, 0)
    with pytest.raises(TypeError, match="D must be a positive int"):
        isometric_projection(3.0, 2, 0)
    with pytest.raises(TypeError, match="seed"):
        isometric_projection(5, 2, None)
    P = isometric_projection(6, 3, 0)
    with pytest.raises(ValueError, match=r"theta_d must have shape \(3, \.\.\.\)"):
        P.apply(np.ones(4))
    with pytest.raises(ValueError, match=r"theta_D must have shape \(6, \.\.\.\)"):
        P.adjoint(np.ones(3))
    with pytest.raises(TypeError, match="theta_d must have dtype float32 or float64"):
        P.apply(np.ones(3, dtype=np.int64))
    with pytest.raises(ValueError, match="theta_d contains NaN"):
        P.apply(np.array([1.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match="theta_D contains NaN or Inf"):
        P.adjoint(torch.tensor([1.0, np.inf, 0, 0, 0, 0]))
    # with the check switched off, NaN propagates like a matmul would
    assert np.isnan(P.apply(np.array([np.nan, 0.0, 0.0]), check_finite=False)).any()
    with pytest.raises(ValueError, match="every column must be hit"):
        IsometricProjection(np.array([0, 0, 2]), 3)
    with pytest.raises(ValueError, match="indices must lie in"):
        IsometricProjection(np.array([0, 1, 3]), 3)


# ============================================================================= complement projector
def _orthonormal(m: int, k: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((m, k)))[0]


@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(m=st.integers(1, 10), frac=st.floats(0, 1), n=st.integers(1, 5), seed=st.integers(0, 2**32))
def test_complement_projector_properties(bk, dtype, m, frac, n, seed):
    """Π = I − UUᵀ: idempotent, symmetric, kills U, matches the dense formula; rank m − k."""
    k = max(1, round(frac * m))
    U_np = _orthonormal(m, k, seed).astype(dtype)
    U = bk.asarray(U_np)
    Pi = complement_projector(U)
    assert isinstance(Pi, ComplementProjector) and Pi.rank == m - k and Pi.shape == (m, m)
    X_np = np.random.default_rng(seed + 1).standard_normal((m, n)).astype(dtype)
    X = bk.asarray(X_np)
    Y = Pi.apply(X)
    assert B.backend_name(Y) == B.backend_name(X) and Y.dtype == X.dtype and tuple(Y.shape) == (m, n)
    t = tol(dtype)
    U64 = U_np.astype(np.float64)
    dense = np.eye(m) - U64 @ U64.T
    np.testing.assert_allclose(_f64(Y), dense @ X_np.astype(np.float64), **t)
    np.testing.assert_allclose(_f64(Pi.apply(Y)), _f64(Y), **t)  # idempotent
    np.testing.assert_allclose(_f64(Pi.apply(U)), 0.0, atol=10 * t["atol"])  # kills U
    D = _f64(Pi.to_dense())
    np.testing.assert_allclose(D, D.T, **t)  # symmetric
    np.testing.assert_allclose(D, dense, **t)
    assert np.linalg.matrix_rank(D, tol=1e-3) == m - k
    v = Pi.apply(X[:, 0])  # 1-D input
    np.testing.assert_allclose(_f64(v), dense @ X_np[:, 0].astype(np.float64), **t)


def test_complement_projector_autograd():
    U = torch.from_numpy(_orthonormal(6, 2, 0))
    Pi = complement_projector(U)
    X = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    G = torch.randn(6, 3, dtype=torch.float64)
    torch.sum(Pi.apply(X) * G).backward()
    torch.testing.assert_close(X.grad, Pi.apply(G))  # Π is symmetric, so its gradient is Π G


def test_complement_projector_bad_inputs():
    U = _orthonormal(5, 2, 0)
    with pytest.raises(ValueError, match="orthonormal columns"):
        complement_projector(U * 1.01)
    with pytest.raises(ValueError, match="at most as many columns"):
        complement_projector(np.ones((2, 3)))
    with pytest.raises(ValueError, match="U must be 2-dimensional"):
        complement_projector(np.ones(3))
    with pytest.raises(ValueError, match="U contains NaN"):
        complement_projector(np.full((3, 1), np.nan))
    with pytest.raises(TypeError, match="U must have dtype"):
        complement_projector(np.eye(3, dtype=np.int64))
    complement_projector(U * (1 + 1e-9))  # within the float64 tolerance 10 sqrt(eps)
    Pi = complement_projector(U)
    with pytest.raises(ValueError, match=r"X must have shape \(5,\) or \(5, n\)"):
        Pi.apply(np.ones((4, 2)))
    with pytest.raises(TypeError, match="X must have dtype float64"):
        Pi.apply(np.ones((5, 2), dtype=np.float32))
    with pytest.raises(TypeError, match="X must be on U's backend"):
        Pi.apply(torch.ones(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="X contains NaN"):
        Pi.apply(np.full((5, 1), np.inf))
