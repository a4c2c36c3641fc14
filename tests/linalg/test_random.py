"""random_basis and derive_seed: reproducibility across backends, distributions, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_theory import backend as B
from lowrank_theory.linalg import BASIS_KINDS, derive_seed, random_basis
from tests.conftest import tol

with_fixture = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
shapes = st.lists(st.integers(1, 7), min_size=2, max_size=3).map(tuple)


# ----------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("kind", BASIS_KINDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_seed_same_values_on_every_backend(bk, kind, dtype):
    """The float64 host draw, cast once, is bitwise equal on every backend; it equals NumPy's PCG64 stream."""
    like = bk.asarray(np.zeros(1, dtype=dtype))
    out = random_basis((6, 4), kind, seed=7, like=like)
    assert B.backend_name(out) == B.backend_name(like) and str(B.device_of(out)) == str(B.device_of(like))
    assert out.dtype == like.dtype and tuple(out.shape) == (6, 4)
    host = random_basis((6, 4), kind, seed=7)
    assert host.dtype == np.float64
    np.testing.assert_array_equal(B.to_numpy(out), host.astype(dtype))
    # a different seed gives a different basis
    assert not np.array_equal(random_basis((6, 4), kind, seed=8), host)


def test_gaussian_is_numpy_default_rng_stream():
    """Documented generator: numpy.random.default_rng(seed).standard_normal(shape) (PCG64)."""
    ref = np.random.default_rng(123).standard_normal((3, 5))
    np.testing.assert_array_equal(random_basis((3, 5), "gaussian", seed=123), ref)
    assert isinstance(np.random.default_rng(123).bit_generator, np.random.PCG64)


def test_dtype_argument_overrides_like():
    like = torch.zeros(2, dtype=torch.float64)
    out = random_basis((3, 3), "gaussian", seed=0, like=like, dtype=torch.float32)
    assert out.dtype == torch.float32
    bf = random_basis((3, 3), "gaussian", seed=0, like=like, dtype="bfloat16")
    assert bf.dtype == torch.bfloat16
    ref = torch.from_numpy(random_basis((3, 3), "gaussian", seed=0)).to(torch.bfloat16)
    assert torch.equal(bf, ref)
    assert random_basis((2,), "gaussian", seed=0, dtype="float32").dtype == np.float32


@pytest.mark.parametrize("scale", ["fan_in", 0.25])
def test_scale(scale):
    base = random_basis((4, 9), "rademacher", seed=3)
    out = random_basis((4, 9), "rademacher", seed=3, scale=scale)
    factor = 1 / 3 if scale == "fan_in" else 0.25
    np.testing.assert_allclose(out, factor * base, rtol=1e-15)


# ----------------------------------------------------------------------------- distributions
@given(shape=shapes, seed=st.integers(0, 2**32))
def test_orthogonal_has_orthonormal_columns_or_rows(shape, seed):
    Q = random_basis(shape, "orthogonal", seed=seed)
    assert Q.shape == shape
    *_, m, n = shape
    G = np.swapaxes(Q, -1, -2) @ Q if m >= n else Q @ np.swapaxes(Q, -1, -2)
    np.testing.assert_allclose(G, np.broadcast_to(np.eye(min(m, n)), G.shape), atol=1e-13)


def test_orthogonal_on_torch_float32_is_orthonormal():
    Q = random_basis((16, 5), "orthogonal", seed=1, like=torch.zeros(1))
    np.testing.assert_allclose((Q.T @ Q).numpy(), np.eye(5), **tol("float32"))


def test_orthogonal_is_haar_distributed():
    """Moments of Haar measure on O(n) over many seeds.

    For Q Haar on O(n): E[Q_00] = 0, E[Q_00^2] = 1/n, E[tr Q] = 0 and E[(tr Q)^2] = 1 (n >= 2; the
    number of fixed points of a random permutation has the same first two moments).  Without
    Mezzadri's sign fix, LAPACK's Householder QR makes Q_00 = -|z_0|/||z|| < 0 always, so E[Q_00]
    is about -0.46 for n=4 and E[tr Q] is biased.  With N = 4000 draws the standard errors are
    sd/sqrt(N): Q_00 (sd 1/2) 0.008, Q_00^2 (sd 0.25) 0.004, tr Q (sd 1) 0.016, (tr Q)^2 (sd <= 1.5)
    0.024; the tolerances below are 5 standard errors.
    """
    n, N = 4, 4000
    Qs = np.stack([random_basis((n, n), "orthogonal", seed=s) for s in range(N)])
    q00, tr = Qs[:, 0, 0], np.trace(Qs, axis1=1, axis2=2)
    assert abs(q00.mean()) < 0.04
    assert abs((q00**2).mean() - 1 / n) < 0.02
    assert abs(tr.mean()) < 0.08
    assert abs((tr**2).mean() - 1.0) < 0.12
    # wide shapes: rows are Haar too (each row uniform on the sphere: E[Q_00^2] = 1/5 for 2 x 5)
    W = np.stack([random_basis((2, 5), "orthogonal", seed=s) for s in range(N)])
    assert abs(W[:, 0, 0].mean()) < 0.04 and abs((W[:, 0, 0] ** 2).mean() - 1 / 5) < 0.02


@pytest.mark.parametrize("density", [1 / 3, 0.1, 1.0])
def test_sparse_ternary_values_and_density(density):
    """Values in sqrt(1/density)·{-1, 0, 1}; fraction of non-zeros ≈ density (5 binomial standard errors)."""
    N = 200 * 100
    S = random_basis((200, 100), "sparse_ternary", seed=11, density=density)
    c = math.sqrt(1 / density)
    assert set(np.unique(S)) <= {-c, 0.0, c}
    frac = np.count_nonzero(S) / N
    assert abs(frac - density) <= 5 * math.sqrt(density * (1 - density) / N) + 1e-12
    nz = S[S != 0]
    assert abs(np.mean(nz > 0) - 0.5) < 5 * 0.5 / math.sqrt(nz.size)  # signs balanced
    assert abs(np.mean(S**2) - 1.0) < 0.05  # unit variance (Achlioptas' scaling)


def test_rademacher_and_gaussian_moments():
    R = random_basis((100, 100), "rademacher", seed=5)
    assert set(np.unique(R)) == {-1.0, 1.0}
    assert abs(R.mean()) < 5 / 100  # sd of the mean is 1/sqrt(1e4) = 0.01
    G = random_basis((100, 100), "gaussian", seed=5)
    assert abs(G.mean()) < 0.05 and abs(G.var() - 1) < 5 * math.sqrt(2 / 1e4)


# ----------------------------------------------------------------------------- derive_seed
def test_derive_seed_is_deterministic_and_distinct():
    a = derive_seed(0, "layer.0.q", 3)
    assert a == derive_seed(0, "layer.0.q", 3)
    children = {derive_seed(0, i) for i in range(200)} | {derive_seed(1, i) for i in range(200)}
    assert len(children) == 400
    assert derive_seed(0, "a") != derive_seed(0, "b") != derive_seed(0)
    assert 0 <= a < 2**63
    # it is numpy's SeedSequence with this spawn key (independent streams by construction)
    ref = np.random.SeedSequence(5, spawn_key=(1, 2)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)
    assert derive_seed(5, 1, 2) == int(ref)
    b1 = random_basis((50,), "gaussian", seed=derive_seed(9, 0))
    b2 = random_basis((50,), "gaussian", seed=derive_seed(9, 1))
    assert abs(np.corrcoef(b1, b2)[0, 1]) < 0.6  # independent draws (|r| < 0.6 has p > 1 - 1e-5 at n=50)


def test_derive_seed_for_string_keys_is_the_same_in_every_process():
    """Frozen random bases are rebuilt from derive_seed(seed, layer_name) when a checkpoint loads, often in
    a new process: the string key must not go through Python's per-process salted hash()."""
    import hashlib
    import os
    import subprocess
    import sys

    key = "encoder.layer.0.attention.self.query"
    code = ("from lowrank_theory.linalg import derive_seed, random_basis; "
            f"print(derive_seed(7, {key!r}, 2), "
            f"float(random_basis((3,), 'gaussian', seed=derive_seed(7, {key!r}))[0]))")
    outs = set()
    for hash_seed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout.strip())
    here = f"{derive_seed(7, key, 2)} {float(random_basis((3,), 'gaussian', seed=derive_seed(7, key))[0])}"
    assert outs == {here}
    # the documented construction, restated: SHA-256's first 8 bytes (little-endian) as the spawn key
    k = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    ref = np.random.SeedSequence(7, spawn_key=(k, 2)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)
    assert derive_seed(7, key, 2) == int(ref)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(shape=(3, 0), kind="gaussian", seed=0), ValueError, "shape"),
        (dict(shape=(3, 2.0), kind="gaussian", seed=0), TypeError, "shape"),
        (dict(shape=(), kind="gaussian", seed=0), TypeError, "shape"),
        (dict(shape=(3,), kind="orthogonal", seed=0), ValueError, "shape"),
        (dict(shape=(3, 3), kind="uniform", seed=0), ValueError, "kind.*gaussian.*rademacher"),
        (dict(shape=(3, 3), kind="gaussian", seed=1.5), TypeError, "seed"),
        (dict(shape=(3, 3), kind="gaussian", seed=-1), ValueError, "seed"),
        (dict(shape=(3, 3), kind="gaussian", seed=True), TypeError, "seed"),
        (dict(shape=(3, 3), kind="sparse_ternary", seed=0, density=0.0), ValueError, "density"),
        (dict(shape=(3, 3), kind="sparse_ternary", seed=0, density=1.5), ValueError, "density"),
        (dict(shape=(3, 3), kind="gaussian", seed=0, scale="xavier"), ValueError, "scale"),
        (dict(shape=(3, 3), kind="gaussian", seed=0, like=[1.0]), TypeError, "like"),
        (dict(shape=(3, 3), kind="gaussian", seed=0, like=np.zeros(1, dtype=np.int64)), TypeError, "like"),
        (dict(shape=(3, 3), kind="gaussian", seed=0, dtype="int32"), TypeError, "dtype"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    kwargs = dict(kwargs)
    shape, kind = kwargs.pop("shape"), kwargs.pop("kind")
    with pytest.raises(exc, match=match):
        random_basis(shape, kind, **kwargs)


def test_derive_seed_bad_arguments():
    with pytest.raises(TypeError, match="seed"):
        derive_seed("0")
    with pytest.raises(TypeError, match="keys"):
        derive_seed(0, 1.5)
    with pytest.raises(ValueError, match="keys"):
        derive_seed(0, -2)
