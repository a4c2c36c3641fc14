"""lowrank_theory.backend: namespaces, dtype policy, conversions (incl. zero-copy), LU and DCT dispatch."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_theory import backend as B
from tests.conftest import tol

with_fixture = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ----------------------------------------------------------------------------- namespaces
def test_namespace_and_backend_name(bk):
    x = bk.asarray(np.ones((2, 3)))
    xp = B.namespace(x)
    expected = {"numpy": "numpy", "torch": "torch", "torch-cuda": "torch", "cupy": "cupy"}[bk.name]
    assert B.backend_name(x) == expected
    assert xp is array_api_compat.array_namespace(x)
    assert xp.__name__.endswith(expected)
    assert B.namespace(x, x) is xp


def test_namespace_refuses_mixed_and_non_arrays():
    with pytest.raises(TypeError, match="one backend"):
        B.namespace(np.ones(2), torch.ones(2))
    with pytest.raises(TypeError, match=r"NumPy, torch or CuPy array, got builtins\.list"):
        B.backend_name([1.0, 2.0])


def test_device_of():
    assert B.device_of(np.ones(2)) == "cpu"
    assert B.device_of(torch.ones(2)) == torch.device("cpu")


# ----------------------------------------------------------------------------- dtype policy
@pytest.mark.parametrize(
    "x",
    [
        np.ones(2, dtype=np.int64),
        np.ones(2, dtype=bool),
        np.ones(2, dtype=np.float16),
        torch.ones(2, dtype=torch.bfloat16),
        torch.ones(2, dtype=torch.int32),
        torch.ones(2, dtype=torch.float16),
    ],
    ids=["np-int64", "np-bool", "np-float16", "torch-bf16", "torch-int32", "torch-float16"],
)
def test_check_float_array_refuses_non_float32_64(x):
    with pytest.raises(TypeError, match=r"W must have dtype float32 or float64, got \w+; cast it first"):
        B.check_float_array(x, "W")


def test_check_float_array_accepts_and_checks_ndim():
    for x in (np.ones((2, 2), dtype=np.float32), torch.ones(2, 2, dtype=torch.float64)):
        assert B.check_float_array(x, "A", ndim=2) is x
    with pytest.raises(ValueError, match=r"A must be 2-dimensional, got shape \(3,\)"):
        B.check_float_array(np.ones(3), "A", ndim=2)
    z = np.ones(2, dtype=np.complex128)
    with pytest.raises(TypeError, match="complex"):
        B.check_float_array(np.ones(2, dtype=np.int8), "z", allow_complex=True)
    assert B.check_float_array(z, "z", allow_complex=True) is z
    with pytest.raises(TypeError, match="z must have dtype float32 or float64"):
        B.check_float_array(z, "z")
    with pytest.raises(TypeError, match="A must be a NumPy, torch or CuPy array, got list"):
        B.check_float_array([1.0], "A")


def test_complex_helpers():
    assert B.is_complex(torch.ones(2, dtype=torch.complex64)) and not B.is_complex(np.ones(2))
    assert B.real_dtype_of(torch.ones(1, dtype=torch.complex64)) == torch.float32
    assert B.real_dtype_of(np.ones(1, dtype=np.complex128)) == np.float64
    assert B.real_dtype_of(np.ones(1, dtype=np.float32)) == np.float32


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite(bk, bad):
    x = np.ones((2, 3))
    assert B.check_finite(bk.asarray(x), "X") is not None
    x[1, 2] = bad
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        B.check_finite(bk.asarray(x), "X")


def test_check_matrix():
    assert B.check_matrix(np.ones((2, 3))) is array_api_compat.numpy
    with pytest.raises(ValueError, match=r"M must have no zero-sized dimension, got shape \(0, 3\)"):
        B.check_matrix(np.ones((0, 3)), "M")
    with pytest.raises(ValueError, match="M contains NaN"):
        B.check_matrix(torch.full((2, 2), float("nan")), "M")


# ----------------------------------------------------------------------------- conversions
def test_numpy_torch_cpu_conversions_share_memory():
    """CPU NumPy <-> CPU torch go through DLPack / from_numpy without a copy: a write to one is seen by the other."""
    a = np.arange(6.0).reshape(2, 3)
    t = B.as_backend(a, backend="torch")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    a[0, 1] = 42.0
    assert t[0, 1].item() == 42.0
    t[1, 2] = -7.0
    assert a[1, 2] == -7.0

    u = torch.arange(4, dtype=torch.float32)
    n = B.to_numpy(u)
    assert isinstance(n, np.ndarray) and n.dtype == np.float32
    u[0] = 9.0
    assert n[0] == 9.0
    n[3] = -1.0
    assert u[3].item() == -1.0
    assert B.to_numpy(n) is n  # NumPy input is returned as is


def test_conversions_round_trip_values_and_dtypes():
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64, np.complex64, np.int64):
        a = (rng.standard_normal((3, 4)) * 10).astype(dtype)
        t = B.as_backend(a, like=torch.zeros(1))
        assert t.dtype == getattr(torch, np.dtype(dtype).name)
        np.testing.assert_array_equal(B.to_numpy(t), a)
        np.testing.assert_array_equal(B.as_backend(t, backend="numpy"), a)
    # non-contiguous NumPy input (negative strides) is copied correctly
    a = np.arange(10.0)[::-2]
    np.testing.assert_array_equal(B.to_numpy(B.as_backend(a, backend="torch")), a)
    # requires_grad, conjugate views and bfloat16 are handled by to_numpy
    g = torch.ones(2, requires_grad=True)
    np.testing.assert_array_equal(B.to_numpy(g * 3), [3.0, 3.0])
    z = torch.tensor([1 + 2j, 3 - 1j])
    np.testing.assert_array_equal(B.to_numpy(z.conj()), [1 - 2j, 3 + 1j])
    bf = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    out = B.to_numpy(bf)
    assert out.dtype == np.float32 and np.array_equal(out, [1.5, -2.0])


def test_to_numpy_resolves_negative_views():
    """``z.conj().imag`` is a lazy negated view in torch; reading it through DLPack must apply the sign."""
    z = torch.tensor([1 + 2j, 3 - 1j])
    im = z.conj().imag
    assert im.is_neg()
    np.testing.assert_array_equal(B.to_numpy(im), [-2.0, 1.0])


def test_zero_dimensional_arrays_keep_their_shape():
    a = np.array(3.0)
    t = B.as_backend(a, backend="torch")
    assert tuple(t.shape) == () and t.item() == 3.0
    assert tuple(B.from_numpy_like(a, torch.zeros(1)).shape) == ()


def test_as_backend_targets_and_errors():
    a = np.ones(3)
    assert B.as_backend(a, like=np.zeros(1)) is a
    t = torch.ones(3)
    assert B.as_backend(t, like=torch.zeros(1)).data_ptr() == t.data_ptr()  # same device: no copy
    with pytest.raises(ValueError, match="as_backend needs either like= or backend="):
        B.as_backend(a)
    with pytest.raises(ValueError, match="backend must be 'numpy', 'torch' or 'cupy', got 'jax'"):
        B.as_backend(a, backend="jax")


@with_fixture
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), seed=st.integers(0, 2**16))
def test_from_numpy_like_matches_like(bk, shape, seed):
    host = np.random.default_rng(seed).standard_normal(shape)
    for dtype in ("float32", "float64"):
        like = bk.asarray(np.zeros(1, dtype=dtype))
        out = B.from_numpy_like(host, like)
        assert B.backend_name(out) == B.backend_name(like) and str(B.device_of(out)) == str(B.device_of(like))
        assert out.dtype == like.dtype and tuple(out.shape) == shape
        np.testing.assert_array_equal(B.to_numpy(out), host.astype(dtype))  # one rounding, same on every backend
    keep = B.from_numpy_like(host, bk.asarray(np.zeros(1, dtype=np.float32)), dtype=None)
    assert str(keep.dtype).endswith("float64")


# ----------------------------------------------------------------------------- LU
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@with_fixture
@given(m=st.integers(1, 8), n=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_lu_dispatch_reconstructs(bk, dtype, m, n, seed):
    """A = P L U with the documented shapes and structure; same factors as scipy.linalg.lu (float64)."""
    A_np = np.random.default_rng(seed).standard_normal((m, n)).astype(dtype)
    A = bk.asarray(A_np)
    P, L, U = B.lu(A)
    k = min(m, n)
    assert tuple(P.shape) == (m, m) and tuple(L.shape) == (m, k) and tuple(U.shape) == (k, n)
    for f in (P, L, U):
        assert B.backend_name(f) == B.backend_name(A) and f.dtype == A.dtype
    Pn, Ln, Un = (np.asarray(B.to_numpy(f), dtype=np.float64) for f in (P, L, U))
    t = tol(dtype)
    np.testing.assert_allclose(Pn @ Ln @ Un, A_np.astype(np.float64), rtol=t["rtol"], atol=10 * t["atol"])
    np.testing.assert_array_equal(np.diag(Ln[:k, :k]), np.ones(k))
    assert np.all(np.triu(Ln, 1) == 0) and np.all(np.tril(Un, -1) == 0)
    np.testing.assert_allclose(Pn @ Pn.T, np.eye(m))  # a permutation
    assert set(np.unique(Pn)) <= {0.0, 1.0}
    assert np.all(np.abs(Ln) <= 1 + 1e-6)  # partial pivoting
    Pr, Lr, Ur = scipy.linalg.lu(A_np.astype(np.float64))
    # with the same row order and non-zero pivots the factors are unique, so they must agree
    if np.array_equal(Pn, Pr) and np.min(np.abs(np.diag(Ur))) > 1e-3:
        np.testing.assert_allclose(Ln, Lr, rtol=100 * t["rtol"], atol=100 * t["atol"])


# ----------------------------------------------------------------------------- DCT
@pytest.mark.parametrize("norm", ["ortho", "backward", None])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple), data=st.data())
def test_torch_dct_idct_match_scipy(norm, dtype, shape, data):
    """The FFT-based torch DCT-II / DCT-III agree with scipy.fft.dct/idct (type 2) for odd and even lengths."""
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(dtype)
    y = B.dct(torch.from_numpy(x), axis=axis, norm=norm)
    ref = scipy.fft.dct(x.astype(np.float64), type=2, axis=axis, norm=norm)
    n = shape[axis]
    t = tol(dtype)
    scale = 1.0 if norm == "ortho" else 2.0 * n  # unnormalized DCT-II grows like 2n
    assert y.dtype == getattr(torch, dtype)
    np.testing.assert_allclose(y.numpy(), ref, rtol=t["rtol"], atol=t["atol"] * scale)
    back = B.idct(torch.from_numpy(ref.astype(dtype)), axis=axis, norm=norm)
    np.testing.assert_allclose(back.numpy(), scipy.fft.idct(ref, type=2, axis=axis, norm=norm), rtol=t["rtol"],
                               atol=t["atol"] * scale)
    np.testing.assert_allclose(back.numpy(), x, rtol=t["rtol"], atol=t["atol"] * scale)


def test_numpy_dct_is_scipy_and_torch_dct_is_differentiable():
    x = np.random.default_rng(0).standard_normal((4, 6))
    np.testing.assert_array_equal(B.dct(x), scipy.fft.dct(x, type=2, norm="ortho"))
    np.testing.assert_array_equal(B.idct(x, axis=0), scipy.fft.idct(x, type=2, axis=0, norm="ortho"))
    # orthonormal DCT: the gradient of <dct(x), g> is idct(g) (the transpose of an orthogonal map is its inverse)
    xt = torch.from_numpy(x).requires_grad_(True)
    g = torch.randn(4, 6, dtype=torch.float64)
    torch.sum(B.dct(xt) * g).backward()
    torch.testing.assert_close(xt.grad, B.idct(g))
    with pytest.raises(ValueError, match="norm must be 'ortho' or 'backward', got 'forward'"):
        B.dct(x, norm="forward")


# ----------------------------------------------------------------------------- info
def test_info_reports_versions():
    info = B.info()
    assert info["numpy"] == np.__version__ and info["torch"] == torch.__version__
    assert info["scipy"] == scipy.__version__ and info["array_api_compat"] == array_api_compat.__version__
    assert info["torch_cuda"] == torch.cuda.is_available() == B.torch_cuda_available()
    assert isinstance(info["cuda_devices"], list) and len(info["cuda_devices"]) == torch.cuda.device_count()
    assert info["cupy_gpu"] == B.cupy_available()
    assert info["python"].count(".") == 2


def test_torch_dct_constants_are_cached_and_safe_for_autograd():
    """The DCT's per-length constants are built once; built under inference mode they still serve a
    later autograd pass (an inference tensor saved for backward would raise)."""
    B._build_dct_constants.cache_clear()
    with torch.inference_mode():
        B.idct(B.dct(torch.randn(3, 10), axis=-1), axis=-1)
    x = torch.randn(3, 10, requires_grad=True)
    B.idct(B.dct(x, axis=-1), axis=-1).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # idct ∘ dct = I, so its gradient is 1
    info = B._build_dct_constants.cache_info()
    assert info.misses == 2 and info.hits == 2  # one build per kind, reused by the second pass
