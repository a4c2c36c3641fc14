"""M2N2: the fitness and attraction formulas, the crossover against the authors' SLERP, the archive rules,
determinism, and a toy problem where only split-point crossover finds the best merge.

References are written from the paper's equations and from the authors' ``helper_fn.py`` / ``natural_niches_fn.py``
(github.com/SakanaAI/natural_niches), in NumPy float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowrank_theory.merging import m2n2, niche_fitness
from lowrank_theory.merging.natural_niches import _attraction, _crossover
from tests.conftest import tol

F64 = tol(torch.float64)
scores_st = hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 7)),
                       elements=st.sampled_from([0.0, 1.0, 0.25, 0.5]))


@given(S=scores_st, alpha=st.sampled_from([0.0, 0.5, 1.0, 2.0]))
def test_niche_fitness_formula(S, alpha):
    K, N = S.shape
    want = np.zeros(K)
    for k in range(K):
        for j in range(N):
            z = sum(S[i, j] for i in range(K))
            want[k] += S[k, j] / (z if z > 0 else 1.0) ** alpha
    np.testing.assert_allclose(niche_fitness(S, alpha), want, **F64)
    if alpha == 0.0:
        np.testing.assert_allclose(niche_fitness(S, 0.0), S.sum(axis=1), **F64)  # no competition: total score


def test_competition_rewards_a_unique_skill():
    """Four models solve the same 3 points, one solves 1 other point alone: with α = 1 it is the fittest."""
    S = np.array([[1, 1, 1, 0]] * 4 + [[0, 0, 0, 1]], dtype=float)
    f = niche_fitness(S, 1.0)
    np.testing.assert_allclose(f, [0.75, 0.75, 0.75, 0.75, 1.0], **F64)
    assert niche_fitness(S, 0.0)[4] < niche_fitness(S, 0.0)[0]  # negative control: without competition it is not


@given(S=scores_st, data=st.data())
def test_attraction_formula(S, data):
    a = data.draw(st.integers(0, S.shape[0] - 1))
    z = S.sum(axis=0)
    z = np.where(z > 0, z, 1.0)
    want = [sum(max(0.0, (S[b, j] - S[a, j]) / z[j]) for j in range(S.shape[1])) for b in range(S.shape[0])]
    np.testing.assert_allclose(_attraction(S, a, 1.0), want, **F64)
    assert _attraction(S, a, 1.0)[a] == 0.0  # never attracted to itself


def _authors_slerp_w_splitpoint(val, split, x, y):
    """helper_fn.py: mixing val before the split point, 1 - val after; one angle for the whole vectors."""
    v = np.where(np.arange(x.size) < split, val, 1.0 - val)
    omega = np.arccos(np.clip(np.dot(x / np.linalg.norm(x), y / np.linalg.norm(y)), -1, 1))
    so = np.sin(omega)
    if so > 1e-6:
        return np.sin((1.0 - v) * omega) / so * x + np.sin(v * omega) / so * y
    return (1.0 - v) * x + v * y


@pytest.mark.parametrize("split", [0, 3, 7, 11, 20])
@pytest.mark.parametrize("mix", [0.0, 0.3, 0.9])
def test_crossover_is_the_authors_slerp(split, mix):
    g = np.random.default_rng(0)
    a = {"w": g.standard_normal((3, 4)), "b": g.standard_normal(8)}  # 20 entries in key order
    b = {"w": g.standard_normal((3, 4)), "b": g.standard_normal(8)}
    flat = lambda d: np.concatenate([d["w"].ravel(), d["b"]])  # noqa: E731
    child = _crossover(a, b, split, mix, "slerp")
    np.testing.assert_allclose(flat(child), _authors_slerp_w_splitpoint(mix, split, flat(a), flat(b)), **F64)
    lin = _crossover(a, b, split, mix, "linear")
    v = np.where(np.arange(20) < split, mix, 1 - mix)
    np.testing.assert_allclose(flat(lin), (1 - v) * flat(a) + v * flat(b), **F64)
    if 0 < mix < 1:  # negative control: SLERP is not linear interpolation on non-parallel vectors
        assert np.max(np.abs(flat(child) - flat(lin))) > 1e-3
    # parallel parents: SLERP falls back to the linear formula (sin Ω ≈ 0)
    par = _crossover(a, {k: 2 * v_ for k, v_ in a.items()}, split, mix, "slerp")
    np.testing.assert_allclose(flat(par), (1 - v) * flat(a) + v * 2 * flat(a), **F64)


def test_crossover_keeps_torch_dtype():
    a = {"w": torch.randn(4, 4, dtype=torch.bfloat16)}
    b = {"w": torch.randn(4, 4, dtype=torch.bfloat16)}
    out = _crossover(a, b, 5, 0.4, "slerp")
    assert out["w"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------- the toy problem
D = 40


def _toy():
    """Target 0.  Seed A is right (0) on the first half and wrong (1) on the second; B the other way round.

    Per-example score: 1 where |θ_j| < 0.25.  Both seeds score 0.5; any interpolation at one global t scores at most
    0.5 (the halves need t < 0.25 and t > 0.75 at once); A's head with B's tail, a split-point crossover at D/2 with
    mix 0, scores 1.
    """
    a = {"w": np.concatenate([np.zeros(D // 2), np.ones(D // 2)])}
    b = {"w": np.concatenate([np.ones(D // 2), np.zeros(D // 2)])}
    calls = []

    def score(p):
        calls.append(1)
        return (np.abs(p["w"]) < 0.25).astype(float)

    return [a, b], score, calls


def test_split_points_find_the_merge_no_global_interpolation_can():
    seeds, score, calls = _toy()
    res = m2n2(seeds, score, steps=150, archive_size=6, seed=0, interpolation="linear")
    assert len(calls) == 2 + 150  # one score per seed and per step
    assert res.scores.mean(axis=1).max() >= 0.9 > 0.5
    assert res.scores[res.best_index].mean() == res.scores.mean(axis=1).max()
    np.testing.assert_array_equal(score(res.best), res.scores[res.best_index])
    # ablation: without split points every child is a global interpolation; the best stays at 0.5
    flat = m2n2(seeds, score, steps=150, archive_size=6, seed=0, interpolation="linear", split_point=False)
    assert flat.scores.mean(axis=1).max() <= 0.5


def test_deterministic_given_a_seed():
    seeds, score, _ = _toy()
    r1 = m2n2(seeds, score, steps=40, seed=7)
    r2 = m2n2(seeds, score, steps=40, seed=7)
    assert r1.history == r2.history
    np.testing.assert_array_equal(r1.scores, r2.scores)
    for k in r1.best:
        np.testing.assert_array_equal(r1.best[k], r2.best[k])
    r3 = m2n2(seeds, score, steps=40, seed=8)
    assert r3.history != r1.history


def test_archive_rules():
    """Seeds fill the archive first; a child enters while there is room, then replaces the least fit (children that
    are the least fit themselves are dropped); fitness is recomputed on the final archive."""
    seeds, score, _ = _toy()
    res = m2n2(seeds, score, steps=60, archive_size=4, seed=1)
    assert len(res.archive) == 4 and res.scores.shape == (4, D)
    slots = [h["slot"] for h in res.history]
    assert slots[:2] == [2, 3]  # room for two children after the two seeds
    assert all(s is None or 0 <= s < 4 for s in slots)
    np.testing.assert_allclose(res.fitness, niche_fitness(res.scores), **F64)
    for h in res.history:
        assert 0 <= h["split"] < D and 0.0 <= h["mix"] < 1.0
    # matchmaking: parent B is never parent A when some member is attracted to A (here always: A and B disagree)
    assert all(h["parents"][0] != h["parents"][1] for h in res.history[:5])


def test_torch_parameter_dicts_and_mutation():
    g = torch.Generator().manual_seed(0)
    seeds = [{"w": torch.randn(6, generator=g, dtype=torch.float64)} for _ in range(2)]
    target = torch.zeros(6, dtype=torch.float64)
    res = m2n2(seeds, lambda p: (p["w"] - target).abs().neg().exp(), steps=20, seed=0, mutation_std=0.05)
    assert isinstance(res.best["w"], torch.Tensor) and res.best["w"].dtype == torch.float64
    assert math.isfinite(float(res.scores.mean()))
