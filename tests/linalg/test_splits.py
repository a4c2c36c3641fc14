"""sparse_plus_lowrank, quantize_uniform, quantize_nf4 and lowrank_plus_quantized against float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_theory import backend as B
from lowrank_theory.linalg import (
    lowrank_plus_quantized,
    nf4_codebook,
    quantize_nf4,
    quantize_uniform,
    sparse_plus_lowrank,
)
from tests.conftest import tol

with_fixture = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DTYPES = ["float32", "float64"]


def _f64(x) -> np.ndarray:
    return np.asarray(B.to_numpy(x), dtype=np.float64)


def _same_kind(out, like) -> None:
    assert B.backend_name(out) == B.backend_name(like)
    assert str(B.device_of(out)) == str(B.device_of(like))
    assert out.dtype == like.dtype


def _svd_r(W: np.ndarray, r: int) -> np.ndarray:
    U, s, Vh = np.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vh[:r]


def _lowrank_plus_sparse(m, n, r, n_sparse, seed):
    """An incoherent rank-r matrix (Gaussian factors) plus n_sparse large entries at random places."""
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    S = np.zeros(m * n)
    support = rng.choice(m * n, n_sparse, replace=False)
    S[support] = rng.choice([-1.0, 1.0], n_sparse) * rng.uniform(3, 6, n_sparse)
    return L, S.reshape(m, n)


# ============================================================================= sparse + low-rank
@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(
    m=st.integers(2, 10),
    n=st.integers(2, 10),
    rfrac=st.floats(0, 1),
    density=st.floats(0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_sparse_plus_lowrank_shapes_sparsity_and_bound(bk, dtype, m, n, rfrac, density, seed):
    """Shapes, backend, ‖S‖₀ ≤ ⌊density·mn⌋, and error ≤ the truncated-SVD error (S = 0 is feasible)."""
    r = max(1, round(rfrac * min(m, n)))
    W_np = np.random.default_rng(seed).standard_normal((m, n)).astype(dtype)
    W = bk.asarray(W_np)
    Bf, A, S = sparse_plus_lowrank(W, r, density, n_iter=5)
    assert tuple(Bf.shape) == (m, r) and tuple(A.shape) == (r, n) and tuple(S.shape) == (m, n)
    for t in (Bf, A, S):
        _same_kind(t, W)
    assert np.count_nonzero(_f64(S)) <= math.floor(density * m * n)
    W64 = W_np.astype(np.float64)
    err = np.linalg.norm(W64 - _f64(Bf) @ _f64(A) - _f64(S))
    svd_err = np.linalg.norm(W64 - _svd_r(W64, r))
    t = tol(dtype)
    assert err <= svd_err * (1 + t["rtol"]) + t["atol"]
    # balanced factors: BᵀB = AAᵀ = diag(σ) (B = U√Σ, A = √Σ Vᵀ)
    np.testing.assert_allclose(_f64(Bf).T @ _f64(Bf), _f64(A) @ _f64(A).T, rtol=t["rtol"], atol=10 * t["atol"])


def test_sparse_plus_lowrank_with_zero_density_is_truncated_svd():
    W = np.random.default_rng(0).standard_normal((9, 7))
    Bf, A, S = sparse_plus_lowrank(W, 3, 0.0)
    assert not S.any()
    np.testing.assert_allclose(Bf @ A, _svd_r(W, 3), **tol("float64"))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_sparse_plus_lowrank_error_is_non_increasing(backend):
    """‖W − L_t − S_t‖ is non-increasing in the number of alternations t (each step is an exact block minimization).

    The function is deterministic, so running it with n_iter = t gives the t-th iterate.  A rounding
    slack of 1e-12 relative is allowed (float64 SVDs of a 30 x 25 matrix agree to ~1e-14).
    """
    rng = np.random.default_rng(1)
    W_np = rng.standard_normal((30, 25)) + 3 * np.outer(rng.standard_normal(30), rng.standard_normal(25))
    W = W_np if backend == "numpy" else torch.from_numpy(W_np)
    errs = []
    for t in range(1, 13):
        Bf, A, S = sparse_plus_lowrank(W, 2, 0.1, n_iter=t, tol=0.0)
        errs.append(np.linalg.norm(W_np - _f64(Bf) @ _f64(A) - _f64(S)))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0]  # and it does move


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("seed_arg", [None, 0])
def test_sparse_plus_lowrank_recovers_lowrank_plus_sparse(backend, seed_arg):
    """Rank-2 Gaussian L* plus 2% outliers of size 3..6: both parts are recovered to ~1e-10.

    The contraction rate observed is about 0.5 per iteration, so 100 iterations reach the float64
    floor; the support of S is recovered exactly.  With ``seed`` the low-rank step is randomized
    (exact here, since W − S is rank 2 once S is right).
    """
    m, n, r, k = 40, 30, 2, 24
    L, S_true = _lowrank_plus_sparse(m, n, r, k, seed=3)
    W_np = L + S_true
    W = W_np if backend == "numpy" else torch.from_numpy(W_np)
    Bf, A, S = sparse_plus_lowrank(W, r, k / (m * n), n_iter=100, seed=seed_arg)
    np.testing.assert_allclose(_f64(Bf) @ _f64(A), L, atol=1e-9 * np.abs(L).max())
    np.testing.assert_allclose(_f64(S), S_true, atol=1e-9 * np.abs(L).max())
    np.testing.assert_array_equal(_f64(S) != 0, S_true != 0)


def test_sparse_plus_lowrank_bad_inputs():
    W = np.ones((4, 3))
    with pytest.raises(ValueError, match="rank must satisfy 1 <= rank <= 3"):
        sparse_plus_lowrank(W, 4, 0.1)
    with pytest.raises(TypeError, match="rank must be an int"):
        sparse_plus_lowrank(W, 1.0, 0.1)
    with pytest.raises(ValueError, match="density must be a float in"):
        sparse_plus_lowrank(W, 1, 1.5)
    with pytest.raises(ValueError, match="n_iter must satisfy"):
        sparse_plus_lowrank(W, 1, 0.1, n_iter=0)
    with pytest.raises(ValueError, match="tol"):
        sparse_plus_lowrank(W, 1, 0.1, tol=-1)
    with pytest.raises(ValueError, match="W contains NaN"):
        sparse_plus_lowrank(np.full((3, 3), np.nan), 1, 0.1)
    with pytest.raises(ValueError, match="W must be 2-dimensional"):
        sparse_plus_lowrank(np.ones(3), 1, 0.1)
    with pytest.raises(TypeError, match="W must have dtype"):
        sparse_plus_lowrank(np.ones((3, 3), dtype=np.int32), 1, 0.1)
    with pytest.raises(TypeError, match="seed"):
        sparse_plus_lowrank(W, 1, 0.1, seed=0.5)


# ============================================================================= quantizers
def _blocks_ref(W: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference blocking: row-major flatten, zero padding, per-block absmax (float64)."""
    flat = W.astype(np.float64).ravel()
    flat = np.concatenate([flat, np.zeros((-flat.size) % bs)])
    blocks = flat.reshape(-1, bs)
    return blocks, np.abs(blocks).max(axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    bits=st.integers(2, 8),
    bs=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_quantize_uniform_grid_and_half_step_error(bk, dtype, shape, bits, bs, seed):
    """Each block's values are k·a/q with integer |k| ≤ q = 2^{b−1} − 1, and |w − ŵ| ≤ a/(2q)."""
    W_np = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    W = bk.asarray(W_np)
    out = quantize_uniform(W, bits, block_size=bs)
    _same_kind(out, W)
    assert tuple(out.shape) == shape
    q = 2 ** (bits - 1) - 1
    blocks, absmax = _blocks_ref(W_np, bs)
    deq, _ = _blocks_ref(_f64(out), bs)
    step = absmax / q
    t = tol(dtype)
    k = deq / np.where(step > 0, step, 1)
    np.testing.assert_allclose(k, np.round(k), atol=1e-3 if dtype == "float32" else 1e-9)
    assert np.all(np.abs(np.round(k)) <= q)
    # half a step, plus the dtype's rounding of the product (float32: ~1e-7 relative)
    assert np.all(np.abs(blocks - deq) <= step / 2 + t["rtol"] * absmax + 1e-300)
    # and it is the nearest grid point: a float64 reference rounding gives the same levels
    ref = np.round(blocks / np.where(step > 0, step, 1)) * step
    np.testing.assert_allclose(deq, ref, rtol=t["rtol"], atol=step.max() * (1e-3 if dtype == "float32" else 1e-9))


def test_quantize_uniform_exact_cases():
    W = np.zeros((2, 8))
    W[0, :4] = [0.6, -1.0, 0.4, 0.0]
    out = quantize_uniform(W, 2, block_size=4)  # 2 bits: 3 levels {-1, 0, 1}·absmax, absmax = 1
    np.testing.assert_array_equal(out[0, :4], [1.0, -1.0, 0.0, 0.0])
    np.testing.assert_array_equal(out[0, 4:], 0.0)
    assert not out[1].any()  # all-zero blocks stay zero


def test_nf4_codebook_construction():
    """16 ascending levels, −1, 0 and +1 among them, 7 negative and 8 positive (QLoRA's asymmetric type).

    Also compared with the table hard-coded in bitsandbytes' NF4 dequantization kernel (the levels
    of QLoRA, arXiv:2305.14314, Appendix E).  bitsandbytes evaluates the quantile positions with a
    float32 ``torch.linspace``, so its table differs from our float64 construction by up to ~7e-8:
    tolerance 2e-7 absolute.
    """
    c = nf4_codebook()
    assert c.shape == (16,) and np.all(np.diff(c) > 0)
    assert c[0] == -1.0 and c[-1] == 1.0 and 0.0 in c
    assert np.sum(c < 0) == 7 and np.sum(c > 0) == 8
    bitsandbytes_table = [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ]  # fmt: skip
    np.testing.assert_allclose(c, bitsandbytes_table, rtol=0, atol=2e-7)
    t = nf4_codebook(like=torch.zeros(1, dtype=torch.float32))
    assert t.dtype == torch.float32 and np.allclose(t.numpy(), c, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    bs=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_quantize_nf4_values_are_nearest_codebook_levels(bk, dtype, shape, bs, seed):
    """Every output is a·c_j for the block's absmax a and the level c_j nearest to w/a (brute-force reference)."""
    W_np = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    W = bk.asarray(W_np)
    out = quantize_nf4(W, block_size=bs)
    _same_kind(out, W)
    assert tuple(out.shape) == shape
    c = nf4_codebook()
    blocks, absmax = _blocks_ref(W_np, bs)
    deq, _ = _blocks_ref(_f64(out), bs)
    safe = np.where(absmax > 0, absmax, 1)
    x = blocks / safe
    dist = np.abs(x[..., None] - c)  # (blocks, bs, 16)
    best = dist.min(axis=-1)
    got = np.abs(x - deq / safe)
    eps = 1e-6 if dtype == "float32" else 1e-12
    assert np.all(got <= best + eps)  # nearest level (up to ties)
    on_code = np.min(np.abs((deq / safe)[..., None] - c), axis=-1)
    assert np.all(on_code <= eps)


def test_nf4_beats_uniform_4bit_on_gaussian_weights():
    """NF4's levels are N(0,1) quantiles, so on Gaussian data its error is below 4-bit absmax int (QLoRA, Sec. 3).

    Measured on 256 x 256 N(0,1) entries: 23.6 vs 27.7 (Frobenius); the margin is ~15%.
    """
    W = np.random.default_rng(0).standard_normal((256, 256))
    assert np.linalg.norm(W - quantize_nf4(W)) < 0.95 * np.linalg.norm(W - quantize_uniform(W, 4))


def test_quantizers_bad_inputs():
    W = np.ones((4, 4))
    for bad_bits, exc in [(1, ValueError), (9, ValueError), (4.0, TypeError)]:
        with pytest.raises(exc, match="bits"):
            quantize_uniform(W, bad_bits)
    for f in (lambda X, **k: quantize_uniform(X, 4, **k), quantize_nf4):
        with pytest.raises(ValueError, match="block_size must satisfy"):
            f(W, block_size=0)
        with pytest.raises(ValueError, match="W contains NaN"):
            f(np.array([1.0, np.inf]))
        with pytest.raises(TypeError, match="W must have dtype"):
            f(np.ones(3, dtype=np.int64))
        with pytest.raises(ValueError, match="W must be a non-empty array"):
            f(np.ones((0, 3)))


# ============================================================================= low-rank + quantized
def _weight_like(m: int, n: int, seed: int) -> np.ndarray:
    """Gaussian bulk plus a strong rank-2 part with outlying directions (as in LLM weights)."""
    rng = np.random.default_rng(seed)
    spike = rng.standard_normal((m, 2)) @ rng.standard_normal((2, n))
    return 0.1 * rng.standard_normal((m, n)) + 0.5 * spike


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize(("quantizer", "bits"), [("uniform", 2), ("uniform", 3), ("uniform", 4), ("nf4", 4)])
def test_lowrank_plus_quantized(backend, quantizer, bits):
    """Errors non-increasing, last error is the returned split's, Q is quantized, beats quantize(W) alone."""
    m, n, r = 48, 40, 4
    W_np = _weight_like(m, n, seed=bits)
    W = W_np if backend == "numpy" else torch.from_numpy(W_np)
    res = lowrank_plus_quantized(W, r, bits, 8, quantizer=quantizer, block_size=32)
    Q, Bf, A, errors = res
    for t in (Q, Bf, A):
        _same_kind(t, W)
    assert tuple(Bf.shape) == (m, r) and tuple(A.shape) == (r, n) and 1 <= len(errors) <= 8
    assert all(b <= a for a, b in zip(errors, errors[1:]))
    actual = np.linalg.norm(W_np - _f64(Q) - _f64(Bf) @ _f64(A))
    np.testing.assert_allclose(errors[-1], actual, rtol=1e-10)
    # Q lies on the quantizer's grid: quantizing it again changes nothing (its absmax is a level)
    quant = (lambda X: quantize_uniform(X, bits, block_size=32)) if quantizer == "uniform" else (
        lambda X: quantize_nf4(X, block_size=32)
    )
    np.testing.assert_allclose(_f64(quant(Q)), _f64(Q), rtol=1e-12, atol=1e-14)
    # first iterate from Q0 = 0: L1 = SVD_r(W) (NumPy reference), Q1 = quantize(W - L1)
    L1 = _svd_r(W_np, r)
    first = np.linalg.norm(W_np - L1 - _f64(quant(np.asarray(W_np - L1))))
    np.testing.assert_allclose(errors[0], first, rtol=1e-10)
    # the low-rank part absorbs the outlying directions: well below quantizing W alone
    assert errors[-1] < 0.8 * np.linalg.norm(W_np - _f64(quant(W_np)))
    if len(errors) < 8:  # stopped early (happens at 2 bits): the next alternation would have increased the error
        L_next = _svd_r(W_np - _f64(Q), r)
        Q_next = _f64(quant(np.asarray(W_np - L_next)))
        assert np.linalg.norm(W_np - Q_next - L_next) > errors[-1]


def test_lowrank_plus_quantized_iterations_are_a_prefix():
    """Running fewer iterations gives the prefix of the error history (deterministic alternation)."""
    W = _weight_like(32, 24, seed=0)
    long = lowrank_plus_quantized(W, 2, 3, 6).errors
    for t in range(1, 4):
        assert lowrank_plus_quantized(W, 2, 3, t).errors == long[:t]


def test_lowrank_plus_quantized_float32_torch():
    W = torch.from_numpy(_weight_like(32, 24, seed=1)).float()
    Q, Bf, A, errors = lowrank_plus_quantized(W, 3, 4, 5, quantizer="nf4")
    assert Q.dtype == Bf.dtype == A.dtype == torch.float32
    np.testing.assert_allclose(errors[-1], float(torch.linalg.norm(W - Q - Bf @ A)), rtol=1e-4)


def test_lowrank_plus_quantized_bad_inputs():
    W = np.ones((6, 5))
    with pytest.raises(ValueError, match="bits must be 4 for quantizer='nf4'"):
        lowrank_plus_quantized(W, 1, 3, quantizer="nf4")
    with pytest.raises(ValueError, match="quantizer must be 'uniform' or 'nf4'"):
        lowrank_plus_quantized(W, 1, 4, quantizer="fp4")
    with pytest.raises(ValueError, match="rank must satisfy"):
        lowrank_plus_quantized(W, 6, 4)
    with pytest.raises(ValueError, match="iters must satisfy"):
        lowrank_plus_quantized(W, 1, 4, 0)
    with pytest.raises(ValueError, match="bits must satisfy 2 <= bits <= 8"):
        lowrank_plus_quantized(W, 1, 9)
    with pytest.raises(ValueError, match="W contains NaN"):
        lowrank_plus_quantized(np.full((3, 3), np.nan), 1)
