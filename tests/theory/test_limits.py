"""Computational-limits experiment: the transition of sub-quadratic approximability."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lowrank_theory.theory import limits


def test_attention_bound_is_respected():
    A, scale = limits.attention_matrix(50, 4, 3.0, seed=1)
    assert scale > 0
    assert abs(np.abs(np.log(A)).max() - 3.0) < 1e-12


def test_best_rank_error_is_eckart_young():
    P = limits.softmax_rows(limits.attention_matrix(40, 4, 2.0)[0])
    s = np.linalg.svd(P, compute_uv=False)
    fro, ent = limits.best_rank_error(P, 5)
    assert abs(fro - np.sqrt((s[5:] ** 2).sum() / (s**2).sum())) < 1e-12
    assert limits.best_rank_error(P, 40)[1] < 1e-9  # full rank: exact (negative control for k < L)
    assert ent > 0


def test_taylor_rank_and_error():
    assert limits.taylor_rank(8, 3) == math.comb(11, 3)
    logits = np.log(limits.attention_matrix(30, 4, 0.5)[0])
    errs = [limits.taylor_error(logits, g) for g in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))  # more degree, less error on a bounded range


def test_phase_transition_sharpens_with_length():
    rows = limits.phase_transition([64, 256], [0.1, 0.25, 2.0, 4.0], rank_fraction=0.1)
    by = {(r["L"], r["gamma"]): r["lowrank_entry_error"] for r in rows}
    for L in (64, 256):
        assert by[(L, 0.1)] < 0.1 and by[(L, 0.25)] < 0.5  # below threshold: approximable
        assert by[(L, 2.0)] > 5 and by[(L, 4.0)] > 20  # above: useless entrywise
    assert by[(256, 0.25)] < by[(64, 0.25)]  # the gap widens with L
    assert by[(256, 2.0)] > by[(64, 2.0)]


def test_bad_inputs():
    with pytest.raises(ValueError, match="L"):
        limits.attention_matrix(1, 4, 1.0)
    with pytest.raises(ValueError, match="bound"):
        limits.attention_matrix(8, 4, float("nan"))
