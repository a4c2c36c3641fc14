"""truncated_svd, randomized_svd and recompress_factors against NumPy float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_theory import backend as B
from lowrank_theory.linalg import SVDResult, randomized_svd, recompress_factors, truncated_svd
from tests.conftest import tol

# The ``bk`` fixture only names a backend (no state), so sharing it across hypothesis examples is safe.
with_fixture = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
)
DTYPES = ["float32", "float64"]


def _f64(x) -> np.ndarray:
    return np.asarray(B.to_numpy(x), dtype=np.float64)


def _dense(res: SVDResult) -> np.ndarray:
    U, S, Vh = (_f64(t) for t in res)
    return (U * S) @ Vh


def _same_kind(out, like) -> None:
    assert B.backend_name(out) == B.backend_name(like)
    assert str(B.device_of(out)) == str(B.device_of(like))
    assert out.dtype == like.dtype


def _check_factors(res: SVDResult, like, m: int, n: int, k: int) -> None:
    """Shapes, backend/device/dtype, orthonormality and the sign convention of an SVDResult."""
    U, S, Vh = res
    assert tuple(U.shape) == (m, k) and tuple(S.shape) == (k,) and tuple(Vh.shape) == (k, n)
    for t in res:
        _same_kind(t, like)
    t = tol(like.dtype)
    Un, Sn, Vn = _f64(U), _f64(S), _f64(Vh)
    np.testing.assert_allclose(Un.T @ Un, np.eye(k), atol=10 * t["atol"])
    np.testing.assert_allclose(Vn @ Vn.T, np.eye(k), atol=10 * t["atol"])
    assert np.all(Sn >= 0) and np.all(np.diff(Sn) <= t["atol"] * max(1.0, Sn[0]))
    # sign convention: the largest-magnitude entry of each left singular vector is positive
    assert np.all(Un[np.argmax(np.abs(Un), axis=0), np.arange(k)] > 0)


def _with_spectrum(m: int, n: int, s: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An m×n matrix with singular values ``s`` (len(s) <= min(m, n)) and Haar-like singular vectors."""
    U, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    V, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return (U * s) @ V.T


def _truncation_tol(s: np.ndarray, k: int, delta: float) -> float:
    """Frobenius tolerance for comparing two rank-k truncations computed with errors of size ``delta``.

    ``[A + E]_k - A_k`` is ``O(||E||)`` plus the part from rotating the k-th singular subspace, at most
    ``sigma_k ||E|| / gap`` (Wedin) and never more than the ``2 sqrt(k) sigma_k`` of the components involved.
    """
    if k >= len(s):
        return delta
    gap = s[k - 1] - s[k]
    rot = 2 * math.sqrt(k) * s[k - 1]
    if gap > 0:
        rot = min(rot, 4 * delta * s[k - 1] / gap)
    return 4 * delta + rot


# ----------------------------------------------------------------------------- truncated_svd
@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(m=st.integers(1, 12), n=st.integers(1, 12), frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_truncated_svd_matches_float64_reference(bk, dtype, m, n, frac, seed):
    rng = np.random.default_rng(seed)
    A_np = rng.standard_normal((m, n)).astype(dtype)
    k = 1 + int(frac * (min(m, n) - 1))
    A = bk.asarray(A_np)
    res = truncated_svd(A, k)
    _check_factors(res, A, m, n, k)

    ref = np.linalg.svd(A_np.astype(np.float64), compute_uv=False)
    t = tol(dtype)
    scale = max(1.0, ref[0])
    np.testing.assert_allclose(_f64(res.S), ref[:k], rtol=t["rtol"], atol=t["atol"] * scale)
    # Eckart–Young–Mirsky: the squared error is exactly the tail energy
    err2 = np.linalg.norm(A_np.astype(np.float64) - _dense(res)) ** 2
    fro2 = float(np.sum(ref**2))
    assert abs(err2 - float(np.sum(ref[k:] ** 2))) <= t["rtol"] * fro2 + t["atol"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_truncated_svd_is_optimal_among_rank_r_candidates(bk, dtype):
    rng = np.random.default_rng(7)
    m, n, r = 14, 9, 3
    A_np = rng.standard_normal((m, n)).astype(dtype)
    A64 = A_np.astype(np.float64)
    res = truncated_svd(bk.asarray(A_np), r)
    ours = np.linalg.norm(A64 - _dense(res))
    U, S, Vh = (_f64(t) for t in res)
    candidates = []
    for _ in range(4):
        candidates.append(rng.standard_normal((m, r)) @ rng.standard_normal((r, n)))  # arbitrary rank r
        Q, _ = np.linalg.qr(rng.standard_normal((m, r)))
        candidates.append(Q @ (Q.T @ A64))  # best fit in a random r-dim column space
        eps = 1e-2
        Up = U + eps * rng.standard_normal(U.shape)
        Vp = Vh + eps * rng.standard_normal(Vh.shape)
        candidates.append((Up * S) @ Vp)  # rank-r perturbations of the optimum
    for C in candidates:
        assert np.linalg.matrix_rank(C) <= r
        # float64 round-off or float32 round-off of our factors; the perturbed candidates are worse
        # by O(eps^2 ||A||) = 1e-4 ||A||, far above both
        assert ours <= np.linalg.norm(A64 - C) + tol(dtype)["atol"] * np.linalg.norm(A64)


# ----------------------------------------------------------------------------- randomized_svd
@settings(with_fixture, max_examples=10)
@given(
    seed=st.integers(0, 2**16),
    decay=st.floats(0.5, 0.9),
    k=st.integers(2, 6),
    p=st.integers(2, 8),
)
def test_randomized_svd_within_hmt_expected_error_bound(bk, seed, decay, k, p):
    """HMT Thm 10.5 (truncated output, see randomized_svd Notes), q = 0:
    E ||A - Â_k||_F² <= (1 + k/(p-1)) Σ_{j>k} σ_j².  We check the mean over 8 independent sketches
    against it with no slack; on these spectra the measured mean ratio is about 1.03, far inside
    the factors 1 + k/(p-1) in [1.29, 7] that the bound allows, so a failure means a real defect."""
    rng = np.random.default_rng(seed)
    m, n = 36, 28
    s = decay ** np.arange(n)
    A_np = _with_spectrum(m, n, s, rng)
    A = bk.asarray(A_np)
    tail2 = float(np.sum(s[k:] ** 2))
    ratios = []
    for draw in range(8):
        res = randomized_svd(A, k, oversample=p, n_iter=0, seed=1000 * seed + draw)
        _check_factors(res, A, m, n, k)
        ratios.append(np.linalg.norm(A_np - _dense(res)) ** 2 / tail2)
    assert np.mean(ratios) <= 1 + k / (p - 1)
    assert min(ratios) >= 1 - 1e-9  # Eckart–Young: nothing beats the optimum


@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(m=st.integers(1, 10), n=st.integers(1, 10), frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_randomized_svd_with_full_sketch_equals_truncated(bk, dtype, m, n, frac, seed):
    """rank + oversample >= min(m, n): the sketch spans the whole range, so the result is exact."""
    rng = np.random.default_rng(seed)
    A_np = rng.standard_normal((m, n)).astype(dtype)
    k = 1 + int(frac * (min(m, n) - 1))
    A = bk.asarray(A_np)
    res = randomized_svd(A, k, oversample=min(m, n), n_iter=1, seed=seed)
    _check_factors(res, A, m, n, k)
    ref = np.linalg.svd(A_np.astype(np.float64))
    s = ref[1]
    t = tol(dtype)
    np.testing.assert_allclose(_f64(res.S), s[:k], rtol=t["rtol"], atol=t["atol"] * max(1.0, s[0]))
    best = (ref[0][:, :k] * s[:k]) @ ref[2][:k]
    delta = t["rtol"] * max(1.0, s[0])
    assert np.linalg.norm(_dense(res) - best) <= _truncation_tol(s, k, delta)


def test_randomized_svd_same_seed_same_result_on_every_backend(bk):
    rng = np.random.default_rng(11)
    A_np = _with_spectrum(30, 20, 0.7 ** np.arange(20), rng)
    ref = randomized_svd(A_np, 5, seed=42)  # NumPy
    out = randomized_svd(bk.asarray(A_np), 5, seed=42)
    again = randomized_svd(bk.asarray(A_np), 5, seed=42)
    for a, b, c in zip(ref, out, again):
        # identical host draws, so only float64 round-off of the backends' BLAS/LAPACK differs
        np.testing.assert_allclose(_f64(b), _f64(a), rtol=1e-10, atol=1e-10)
        np.testing.assert_array_equal(_f64(c), _f64(b))  # deterministic on one backend
    # a NumPy Generator is accepted as the seed and gives the same draws as its int seed
    gen = randomized_svd(A_np, 5, seed=np.random.default_rng(42))
    np.testing.assert_array_equal(_f64(gen.U), _f64(ref.U))
    # the seed is used: another seed gives (slightly) different vectors when the sketch is not exact
    other = randomized_svd(A_np, 5, oversample=1, n_iter=0, seed=43)
    assert not np.allclose(_f64(other.U), _f64(ref.U), rtol=0, atol=1e-13)


def test_power_iterations_improve_accuracy_on_flat_spectrum(bk):
    """σ_j = (1 + j)^{-1/2}: slow decay, where HMT (Cor. 10.10) predicts the power scheme helps:
    the tail enters through σ_j^{2q+1}.  Mean error over 6 sketches, each q compared on the same seeds."""
    rng = np.random.default_rng(3)
    m, n, k = 60, 40, 5
    s = 1.0 / np.sqrt(1.0 + np.arange(n))
    A_np = _with_spectrum(m, n, s, rng)
    A = bk.asarray(A_np)
    opt = math.sqrt(float(np.sum(s[k:] ** 2)))
    mean_excess = []
    for q in range(4):
        errs = [np.linalg.norm(A_np - _dense(randomized_svd(A, k, oversample=2, n_iter=q, seed=d))) for d in range(6)]
        mean_excess.append(np.mean(errs) / opt - 1)
    assert all(e >= -1e-12 for e in mean_excess)
    assert all(b < a for a, b in zip(mean_excess, mean_excess[1:]))  # strictly better with each q
    assert mean_excess[3] < 0.2 * mean_excess[0]


def test_power_iterations_keep_ill_conditioned_top_spectrum(bk):
    """Top singular values 1 .. 1e-5: (AAᵀ)^3 AΩ without re-orthonormalization loses the small ones
    to round-off (error ~ 10^4 × optimal); with QR after each product they are exact to ~1e-10."""
    rng = np.random.default_rng(5)
    s = np.concatenate([10.0 ** -np.arange(6.0), np.full(20, 1e-8)])
    A_np = _with_spectrum(40, 30, s, rng)
    k = 6
    res = randomized_svd(bk.asarray(A_np), k, oversample=4, n_iter=3, seed=0)
    opt = math.sqrt(float(np.sum(s[k:] ** 2)))
    assert np.linalg.norm(A_np - _dense(res)) <= 1.01 * opt
    np.testing.assert_allclose(_f64(res.S), s[:k], rtol=1e-8)


def test_randomized_svd_float32(bk):
    rng = np.random.default_rng(9)
    s = 0.6 ** np.arange(16)
    A_np = _with_spectrum(24, 16, s, rng).astype(np.float32)
    A = bk.asarray(A_np)
    res = randomized_svd(A, 4, seed=1)
    _check_factors(res, A, 24, 16, 4)
    # default q = 2 on a fast-decaying spectrum: optimal up to float32 round-off of the factors
    opt = math.sqrt(float(np.sum(s[4:] ** 2)))
    assert np.linalg.norm(A_np.astype(np.float64) - _dense(res)) <= 1.01 * opt + tol("float32")["atol"]


# ----------------------------------------------------------------------------- recompress_factors
@pytest.mark.parametrize("dtype", DTYPES)
@with_fixture
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    r=st.integers(1, 8),
    deficiency=st.integers(0, 7),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_recompress_factors_equals_truncated_svd_of_product(bk, dtype, m, n, r, deficiency, frac, seed):
    rng = np.random.default_rng(seed)
    rank_b = max(1, r - deficiency)  # deficiency > 0: B = B1 B2 has rank rank_b < r
    B_np = (rng.standard_normal((m, rank_b)) @ rng.standard_normal((rank_b, r))).astype(dtype)
    A_np = rng.standard_normal((r, n)).astype(dtype)
    k = 1 + int(frac * (min(m, n, r) - 1))
    Bx, Ax = bk.asarray(B_np), bk.asarray(A_np)
    res = recompress_factors(Bx, Ax, k)
    _check_factors(res, Ax, m, n, k)

    P64 = B_np.astype(np.float64) @ A_np.astype(np.float64)
    U, s, Vh = np.linalg.svd(P64)
    t = tol(dtype)
    scale = max(1.0, float(np.linalg.norm(B_np.astype(np.float64), 2) * np.linalg.norm(A_np.astype(np.float64), 2)))
    np.testing.assert_allclose(_f64(res.S), s[:k], rtol=t["rtol"], atol=t["atol"] * scale)
    best = (U[:, :k] * s[:k]) @ Vh[:k]
    assert np.linalg.norm(_dense(res) - best) <= _truncation_tol(s, k, t["rtol"] * scale)
    # and the same as our own dense path on this backend
    dense = truncated_svd(Bx @ Ax, k)
    np.testing.assert_allclose(_f64(res.S), _f64(dense.S), rtol=t["rtol"], atol=t["atol"] * scale)
    assert np.linalg.norm(_dense(res) - _dense(dense)) <= 2 * _truncation_tol(s, k, t["rtol"] * scale)


def test_recompress_factors_of_rank_deficient_b_is_exact(bk):
    """B of rank 2 < r = 5: the product has rank 2, so the rank-2 recompression reproduces it."""
    rng = np.random.default_rng(2)
    B_np = rng.standard_normal((10, 2)) @ rng.standard_normal((2, 5))
    A_np = rng.standard_normal((5, 8))
    res = recompress_factors(bk.asarray(B_np), bk.asarray(A_np), 2)
    np.testing.assert_allclose(_dense(res), B_np @ A_np, atol=1e-12 * np.linalg.norm(B_np @ A_np))
    # asking for more than the product's rank gives zero trailing singular values
    res4 = recompress_factors(bk.asarray(B_np), bk.asarray(A_np), 4)
    assert np.all(_f64(res4.S[2:]) <= 1e-12 * float(_f64(res4.S)[0]))
    _check_factors(res4, bk.asarray(A_np), 10, 8, 4)


# ----------------------------------------------------------------------------- bad inputs
FUNCS = {
    "truncated_svd": lambda X, k=2: truncated_svd(X, k),
    "randomized_svd": lambda X, k=2: randomized_svd(X, k, seed=0),
}


@pytest.mark.parametrize("name", ["truncated_svd", "randomized_svd"])
def test_bad_inputs(bk, name):
    f = FUNCS[name]
    good = np.random.default_rng(0).standard_normal((5, 4))
    with pytest.raises(TypeError, match="A must have dtype float32 or float64"):
        f(bk.asarray(np.arange(20).reshape(5, 4)))
    nan = good.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="A contains NaN or Inf"):
        f(bk.asarray(nan))
    inf = good.copy()
    inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="A contains NaN or Inf"):
        f(bk.asarray(inf))
    with pytest.raises(ValueError, match="A must be 2-dimensional"):
        f(bk.asarray(good[0]))
    with pytest.raises(ValueError, match="zero-sized"):
        f(bk.asarray(np.zeros((0, 4))))
    for bad_rank in (0, -1, 5):
        with pytest.raises(ValueError, match=r"rank must satisfy 1 <= rank <= min\(m, n\) = 4"):
            f(bk.asarray(good), bad_rank)
    with pytest.raises(TypeError, match="rank must be an int"):
        f(bk.asarray(good), 2.0)
    with pytest.raises(TypeError, match="A must be a NumPy, torch or CuPy array"):
        f(good.tolist())


def test_randomized_svd_bad_parameters():
    A = np.random.default_rng(0).standard_normal((6, 5))
    with pytest.raises(ValueError, match="oversample must be a non-negative int"):
        randomized_svd(A, 2, oversample=-1)
    with pytest.raises(ValueError, match="n_iter must be a non-negative int"):
        randomized_svd(A, 2, n_iter=-1)
    with pytest.raises(ValueError, match="n_iter must be a non-negative int"):
        randomized_svd(A, 2, n_iter=1.5)
    with pytest.raises(TypeError, match="seed must be"):
        randomized_svd(A, 2, seed=1.5)


def test_recompress_factors_bad_inputs(bk):
    rng = np.random.default_rng(0)
    Bm, Am = rng.standard_normal((6, 3)), rng.standard_normal((3, 5))
    with pytest.raises(ValueError, match=r"inner dimensions of B .* and A .* must match"):
        recompress_factors(bk.asarray(Bm), bk.asarray(rng.standard_normal((4, 5))), 2)
    for bad_rank in (0, 4):
        with pytest.raises(ValueError, match=r"rank must satisfy 1 <= rank <= min\(m, n, r\) = 3"):
            recompress_factors(bk.asarray(Bm), bk.asarray(Am), bad_rank)
    with pytest.raises(TypeError, match="B must have dtype"):
        recompress_factors(bk.asarray(np.ones((6, 3), dtype=np.int64)), bk.asarray(Am), 2)
    with pytest.raises(TypeError, match="A must have dtype"):
        recompress_factors(bk.asarray(Bm), bk.asarray(np.ones((3, 5), dtype=np.int32)), 2)
    with pytest.raises(TypeError, match="B and A must have the same dtype"):
        recompress_factors(bk.asarray(Bm.astype(np.float32)), bk.asarray(Am), 2)
    nan = Am.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="A contains NaN"):
        recompress_factors(bk.asarray(Bm), bk.asarray(nan), 2)
    with pytest.raises(ValueError, match="B must be 2-dimensional"):
        recompress_factors(bk.asarray(Bm[:, 0]), bk.asarray(Am), 1)
    with pytest.raises(TypeError):
        recompress_factors(Bm, torch.from_numpy(Am), 2)  # mixed backends
