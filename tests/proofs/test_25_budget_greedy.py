"""Check of proofs/25-budget-greedy.md: greedy by marginal gain meets the budget and maximises a separable
concave score; D'Hondt / Sainte-Laguë are its special cases; moving a rank never helps; increasing weights break it.

Tolerance: objective values are sums of at most ~20 float64 products, compared to 1e-12 relative.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory.training.rank_budget import GAINS, allocate_ranks


def _F(c, r, lo, w):
    return sum(cl * sum(w(k) for k in range(a + 1, rl + 1)) for cl, rl, a in zip(c, r, lo))


def _feasible(lo, hi, R):
    for r in itertools.product(*[range(a, b + 1) for a, b in zip(lo, hi)]):
        if sum(r) == R:
            yield r


@st.composite
def _instance(draw):
    n = draw(st.integers(1, 4))
    c = draw(st.lists(st.floats(0.0, 5.0), min_size=n, max_size=n))
    lo = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    hi = [a + draw(st.integers(0, 4)) for a in lo]
    R = draw(st.integers(sum(lo), sum(hi)))
    kind = draw(st.sampled_from([*sorted(GAINS), "random"]))
    if kind == "random":
        steps = draw(st.lists(st.floats(0.0, 1.0), min_size=8, max_size=8))
        vals = list(np.maximum(2.0 - np.cumsum(steps) / 4.0, 0.01))  # positive, non-increasing
        w = lambda k, v=vals: float(v[min(k, len(v)) - 1])  # noqa: E731
    else:
        w = GAINS[kind]
    return c, lo, hi, R, w


@given(_instance())
def test_greedy_is_the_brute_force_optimum(inst):
    c, lo, hi, R, w = inst
    r = allocate_ranks(c, R, min_rank=lo, max_rank=hi, gain=w)
    assert sum(r) == R and all(a <= x <= b for a, x, b in zip(lo, r, hi))
    best = max(_F(c, q, lo, w) for q in _feasible(lo, hi, R))
    assert _F(c, r, lo, w) == pytest.approx(best, rel=1e-12, abs=1e-12)


@given(_instance())
def test_greedy_gain_sequence_is_the_sorted_union(inst):
    c, lo, hi, R, w = inst
    items = sorted((cl * w(k) for cl, a, b in zip(c, lo, hi) for k in range(a + 1, b + 1)), reverse=True)
    r = allocate_ranks(c, R, min_rank=lo, max_rank=hi, gain=w)
    assert _F(c, r, lo, w) == pytest.approx(sum(items[: R - sum(lo)]), rel=1e-12, abs=1e-12)


def _divisor_table(votes, seats, divisor):
    q = sorted((-v / divisor(k), i) for i, v in enumerate(votes) for k in range(1, seats + 1))
    out = [0] * len(votes)
    for _, i in q[:seats]:
        out[i] += 1
    return out


@given(votes=st.lists(st.integers(1, 500), min_size=1, max_size=5), seats=st.integers(0, 25))
def test_divisor_methods(votes, seats):
    c = [float(v) for v in votes]
    assert allocate_ranks(c, seats, gain="dhondt") == _divisor_table(votes, seats, lambda k: k)
    assert allocate_ranks(c, seats, gain="sainte_lague") == _divisor_table(votes, seats, lambda k: 2 * k - 1)


@given(_instance())
def test_negative_control_moving_one_rank_never_helps(inst):
    c, lo, hi, R, w = inst
    r = allocate_ranks(c, R, min_rank=lo, max_rank=hi, gain=w)
    f = _F(c, r, lo, w)
    for i, j in itertools.permutations(range(len(c)), 2):
        if r[i] > lo[i] and r[j] < hi[j]:
            q = list(r)
            q[i] -= 1
            q[j] += 1
            assert _F(c, q, lo, w) <= f + 1e-12 * max(1.0, abs(f))


def test_negative_control_moves_strictly_lower_in_general_position():
    c, R = [3.1, 1.7, 0.9], 9
    r = allocate_ranks(c, R, gain="dhondt")
    f = _F(c, r, [0, 0, 0], GAINS["dhondt"])
    drops = []
    for i, j in itertools.permutations(range(3), 2):
        if r[i] > 0:
            q = list(r)
            q[i] -= 1
            q[j] += 1
            drops.append(f - _F(c, q, [0, 0, 0], GAINS["dhondt"]))
    assert drops and min(drops) > 1e-6  # the optimum is strict: every move loses


def _plain_greedy(c, R, hi, w):
    r = [0] * len(c)
    for _ in range(R):
        cand = [(c[i] * w(r[i] + 1), -i) for i in range(len(c)) if r[i] < hi[i]]
        _, neg = max(cand)
        r[-neg] += 1
    return r


def test_negative_control_increasing_weights_break_greedy():
    c, hi, R = [1.0, 0.9], [1, 2], 2
    w = lambda k: float(10 ** (k - 1))  # noqa: E731  increasing: 1, 10, ...
    g = _plain_greedy(c, R, hi, w)
    assert g == [1, 1]
    best = max(_feasible([0, 0], hi, R), key=lambda q: _F(c, q, [0, 0], w))
    assert best == (0, 2) and _F(c, best, [0, 0], w) > _F(c, g, [0, 0], w) + 1.0  # 9.9 vs 1.9
    with pytest.raises(ValueError, match="non-increasing"):
        allocate_ranks(c, R, max_rank=hi, gain=w)
    assert math.isclose(_F(c, allocate_ranks(c, R, max_rank=hi, gain="linear"), [0, 0], GAINS["linear"]), 1.9)
