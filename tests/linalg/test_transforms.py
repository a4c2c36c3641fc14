"""DCT, 2-D DFT and Walsh–Hadamard transforms against SciPy/NumPy and dense float64 matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_theory import backend as B
from lowrank_theory.linalg import (
    dct,
    dct2,
    dct_matrix,
    dft2,
    hadamard_matrix,
    idct,
    idct2,
    idft2,
    wht,
    wht2,
)
from lowrank_theory.linalg import transforms as transforms_module
from tests.conftest import tol

# The ``bk`` fixture only names a backend (no state), so sharing it across hypothesis examples is safe.
with_fixture = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
)
DTYPES = ["float32", "float64"]
small_shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3)


def _f64(x) -> np.ndarray:
    return np.asarray(B.to_numpy(x), dtype=np.float64)


def _c128(x) -> np.ndarray:
    return np.asarray(B.to_numpy(x), dtype=np.complex128)


def _same_kind(out, like) -> None:
    assert B.backend_name(out) == B.backend_name(like)
    assert str(B.device_of(out)) == str(B.device_of(like))
    assert out.dtype == like.dtype


def _apply_along(M: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """Dense reference: multiply every 1-D slice of ``x`` along ``axis`` by ``M``."""
    return np.moveaxis(np.tensordot(M, x, axes=([1], [axis])), 0, axis)


def _butterfly(x: np.ndarray) -> np.ndarray:
    """Textbook radix-2 Sylvester WHT of the last axis (unnormalized): an independent O(n log n) reference."""
    y = x.astype(np.float64).copy()
    n = y.shape[-1]
    h = 1
    while h < n:
        y = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :].copy(), y[..., 1, :].copy()
        y[..., 0, :], y[..., 1, :] = a + b, a - b
        y = y.reshape(*x.shape[:-1], n)
        h *= 2
    return y


# ----------------------------------------------------------------------------- DCT
@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(shape=small_shapes, data=st.data())
def test_dct_matches_scipy_and_dense_matrix(bk, dtype, shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x_np = np.random.default_rng(sum(shape)).standard_normal(shape).astype(dtype)
    x64 = x_np.astype(np.float64)
    x = bk.asarray(x_np)
    y = dct(x, axis=axis)
    _same_kind(y, x)
    ref = scipy.fft.dct(x64, type=2, axis=axis, norm="ortho")
    np.testing.assert_allclose(_f64(y), ref, **tol(dtype))
    np.testing.assert_allclose(ref, _apply_along(dct_matrix(shape[axis]), x64, axis), **tol("float64"))
    # Parseval, and the inverse
    assert np.linalg.norm(_f64(y)) == pytest.approx(np.linalg.norm(x64), rel=tol(dtype)["rtol"], abs=tol(dtype)["atol"])
    z = idct(y, axis=axis)
    _same_kind(z, x)
    np.testing.assert_allclose(_f64(z), x64, **tol(dtype))
    np.testing.assert_allclose(
        _f64(idct(x, axis=axis)), scipy.fft.idct(x64, type=2, axis=axis, norm="ortho"), **tol(dtype)
    )


def test_dct_backward_norm_matches_scipy(bk):
    x_np = np.random.default_rng(1).standard_normal((3, 7))
    x = bk.asarray(x_np)
    np.testing.assert_allclose(_f64(dct(x, norm="backward")), scipy.fft.dct(x_np, norm="backward"), **tol("float64"))
    np.testing.assert_allclose(_f64(idct(dct(x, norm="backward"), norm="backward")), x_np, **tol("float64"))


@pytest.mark.parametrize("n", [1, 2, 3, 8, 17])
def test_dct_matrix_is_orthogonal_and_matches_scipy(n):
    D = dct_matrix(n)
    np.testing.assert_allclose(D @ D.T, np.eye(n), atol=1e-13)
    np.testing.assert_allclose(D, scipy.fft.dct(np.eye(n), axis=0, norm="ortho"), atol=1e-13)
    Dt = dct_matrix(n, like=torch.zeros(1, dtype=torch.float32))
    assert isinstance(Dt, torch.Tensor) and Dt.dtype == torch.float32
    np.testing.assert_allclose(_f64(Dt), D, **tol("float32"))


@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(batch=st.lists(st.integers(1, 3), max_size=2), m=st.integers(1, 9), n=st.integers(1, 9))
def test_dct2_is_DXDt(bk, dtype, batch, m, n):
    X_np = np.random.default_rng(m * 10 + n).standard_normal((*batch, m, n)).astype(dtype)
    X64 = X_np.astype(np.float64)
    X = bk.asarray(X_np)
    Y = dct2(X)
    _same_kind(Y, X)
    np.testing.assert_allclose(_f64(Y), dct_matrix(m) @ X64 @ dct_matrix(n).T, **tol(dtype))
    np.testing.assert_allclose(_f64(Y), scipy.fft.dctn(X64, axes=(-2, -1), norm="ortho"), **tol(dtype))
    Z = idct2(Y)
    _same_kind(Z, X)
    np.testing.assert_allclose(_f64(Z), X64, **tol(dtype))
    np.testing.assert_allclose(_f64(idct2(X)), dct_matrix(m).T @ X64 @ dct_matrix(n), **tol(dtype))


# ----------------------------------------------------------------------------- DFT
@pytest.mark.parametrize("dtype", ["float32", "float64", "complex64", "complex128"])
@with_fixture
@given(batch=st.lists(st.integers(1, 3), max_size=1), m=st.integers(1, 8), n=st.integers(1, 8))
def test_dft2_matches_numpy(bk, dtype, batch, m, n):
    rng = np.random.default_rng(m * 10 + n)
    X_np = rng.standard_normal((*batch, m, n))
    if dtype.startswith("complex"):
        X_np = X_np + 1j * rng.standard_normal((*batch, m, n))
    X_np = X_np.astype(dtype)
    X = bk.asarray(X_np)
    Y = dft2(X)
    expected = "complex64" if dtype in ("float32", "complex64") else "complex128"
    assert str(Y.dtype).rsplit(".", 1)[-1] == expected
    assert B.backend_name(Y) == B.backend_name(X) and str(B.device_of(Y)) == str(B.device_of(X))
    t = tol("float32" if expected == "complex64" else "float64")
    np.testing.assert_allclose(_c128(Y), np.fft.fft2(X_np.astype(np.complex128), norm="ortho"), **t)
    np.testing.assert_allclose(_c128(idft2(Y)), X_np.astype(np.complex128), **t)
    np.testing.assert_allclose(_c128(idft2(X)), np.fft.ifft2(X_np.astype(np.complex128), norm="ortho"), **t)
    # backward normalization (PEFT FourierFT's) as numpy's default
    np.testing.assert_allclose(_c128(idft2(X, norm="backward")), np.fft.ifft2(X_np.astype(np.complex128)), **t)


# ----------------------------------------------------------------------------- WHT
@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 6, 7, 10])
def test_hadamard_matrix_matches_scipy(k):
    n = 2**k
    H = hadamard_matrix(n)
    np.testing.assert_array_equal(hadamard_matrix(n, normalized=False), scipy.linalg.hadamard(n))
    np.testing.assert_allclose(H, scipy.linalg.hadamard(n) / math.sqrt(n), atol=1e-15)
    np.testing.assert_allclose(H @ H, np.eye(n), atol=1e-12)  # symmetric orthogonal involution


@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(k=st.integers(0, 9), batch=st.lists(st.integers(1, 3), max_size=2), data=st.data())
def test_wht_matches_dense_hadamard(bk, dtype, k, batch, data):
    n = 2**k
    shape = [*batch, n]
    axis = data.draw(st.integers(0, len(shape) - 1))
    shape.insert(axis, shape.pop())  # the power-of-two axis at position ``axis``
    x_np = np.random.default_rng(k).standard_normal(shape).astype(dtype)
    x64 = x_np.astype(np.float64)
    x = bk.asarray(x_np)
    y = wht(x, axis=axis)
    _same_kind(y, x)
    np.testing.assert_allclose(_f64(y), _apply_along(hadamard_matrix(n), x64, axis), **tol(dtype))
    np.testing.assert_allclose(_f64(wht(y, axis=axis)), x64, **tol(dtype))  # its own inverse
    assert np.linalg.norm(_f64(y)) == pytest.approx(np.linalg.norm(x64), rel=tol(dtype)["rtol"])  # Parseval


@pytest.mark.parametrize("k", [12, 13, 14])
def test_wht_long_lengths_match_butterfly(bk, k):
    """Lengths needing 2 or 3 dense blocks (k > 6 bits), against a radix-2 butterfly in float64."""
    x_np = np.random.default_rng(k).standard_normal((2, 2**k))
    y = wht(bk.asarray(x_np))
    # float64 sums of 2^k terms: round-off grows like k·eps relative to ||x||, far below 1e-10
    np.testing.assert_allclose(_f64(y), _butterfly(x_np) / math.sqrt(2**k), **tol("float64"))


@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(batch=st.lists(st.integers(1, 3), max_size=1), km=st.integers(0, 5), kn=st.integers(0, 7))
def test_wht2_is_HXH(bk, dtype, batch, km, kn):
    m, n = 2**km, 2**kn
    X_np = np.random.default_rng(km * 8 + kn).standard_normal((*batch, m, n)).astype(dtype)
    X = bk.asarray(X_np)
    Y = wht2(X)
    _same_kind(Y, X)
    ref = hadamard_matrix(m) @ X_np.astype(np.float64) @ hadamard_matrix(n)
    np.testing.assert_allclose(_f64(Y), ref, **tol(dtype))
    np.testing.assert_allclose(_f64(wht2(Y)), X_np.astype(np.float64), **tol(dtype))


# ----------------------------------------------------------------------------- autograd (torch)
def test_torch_gradients_match_dense():
    """d/dX <G, T(X)> = T^*(G): the dense adjoints D^T G D, H G H, and for Re<G, DFT2(X)> the real part of F^* G."""
    rng = np.random.default_rng(0)
    m, n = 8, 16
    X = torch.from_numpy(rng.standard_normal((2, m, n))).requires_grad_(True)
    G = rng.standard_normal((2, m, n))
    Gt = torch.from_numpy(G)
    Dm, Dn, Hm, Hn = dct_matrix(m), dct_matrix(n), hadamard_matrix(m), hadamard_matrix(n)
    cases = [
        (dct2, Dm.T @ G @ Dn),
        (idct2, Dm @ G @ Dn.T),
        (wht2, Hm @ G @ Hn),
        (lambda Z: wht(Z, axis=-1), G @ Hn),
        (lambda Z: wht(Z, axis=1), Hm @ G),
        (lambda Z: dct(Z, axis=1), Dm.T @ G),
        (lambda Z: idct(Z, axis=-1), G @ Dn.T),
    ]
    for f, expected in cases:
        (grad,) = torch.autograd.grad(torch.sum(f(X) * Gt), X)
        np.testing.assert_allclose(grad.numpy(), expected, **tol("float64"))
    # Re <G, DFT2(X)>: gradient Re(F_m^T G F_n^T) conj-free since X is real; F symmetric unitary
    Fm, Fn = np.fft.fft(np.eye(m), norm="ortho"), np.fft.fft(np.eye(n), norm="ortho")
    (grad,) = torch.autograd.grad(torch.sum(torch.real(dft2(X)) * Gt), X)
    np.testing.assert_allclose(grad.numpy(), np.real(Fm.T @ G @ Fn.T), **tol("float64"))


def test_torch_gradcheck():
    """Finite-difference check of every transform's backward on small float64 inputs."""
    rng = np.random.default_rng(1)
    X = torch.from_numpy(rng.standard_normal((2, 4))).requires_grad_(True)
    for f in (dct, idct, dct2, idct2, wht, wht2, lambda Z: torch.real(dft2(Z)), lambda Z: torch.imag(idft2(Z))):
        assert torch.autograd.gradcheck(f, (X,))


def test_wht_block_cache_survives_inference_mode():
    """A Hadamard block first built under torch.inference_mode must still work in a later backward pass."""
    transforms_module._BLOCKS.clear()
    x = torch.randn(3, 128)
    with torch.inference_mode():
        wht(x)
    xg = x.clone().requires_grad_(True)
    wht(xg).sum().backward()
    np.testing.assert_allclose(xg.grad.numpy(), np.ones((3, 128)) @ hadamard_matrix(128), **tol("float32"))


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    xi = np.arange(8)
    for f in (dct, idct, wht, dft2, dct2, wht2):
        with pytest.raises(TypeError, match="dtype"):
            f(xi.reshape(2, 4))
    with pytest.raises(TypeError, match="dtype"):
        dct(np.ones(4, dtype=np.complex128))  # the DCT is real
    with pytest.raises(TypeError, match="dtype"):
        wht(torch.ones(4, dtype=torch.float16))
    bad = np.ones((2, 4))
    bad[1, 2] = np.nan
    for f in (dct, idct, wht, dft2, idft2, dct2, idct2, wht2):
        with pytest.raises(ValueError, match="NaN"):
            f(bad)
    with pytest.raises(ValueError, match="NaN"):
        dft2(np.array([[1.0, np.inf * 1j]]))
    with pytest.raises(ValueError, match=r"axis=-1 \(x.shape\[1\]\).*got 6"):
        wht(np.ones((4, 6)))
    with pytest.raises(ValueError, match=r"axis=0 \(x.shape\[0\]\).*got 3"):
        wht(np.ones((3, 4)), axis=0)
    with pytest.raises(ValueError, match="axis=-2"):
        wht2(np.ones((3, 4)))
    with pytest.raises(ValueError, match="n must be a power of two"):
        hadamard_matrix(12)
    with pytest.raises(ValueError, match="axis"):
        dct(np.ones((2, 3)), axis=2)
    with pytest.raises(ValueError, match="at least 2 axes"):
        dct2(np.ones(4))
    with pytest.raises(ValueError, match="norm"):
        dct(np.ones(4), norm="forwards")
    with pytest.raises(ValueError, match="norm"):
        dft2(np.ones((2, 2)), norm="unitary")
    with pytest.raises(ValueError, match="zero-sized"):
        dct(np.ones((0, 3)))
    with pytest.raises(ValueError, match="n must be a positive int"):
        dct_matrix(0)
    # the opt-out skips the check (for hot paths whose input is known finite): NaN then propagates
    assert np.isnan(wht(bad, check_finite=False)).any()
