"""TIES and task arithmetic against their papers' formulas, PCB against a dense re-statement of its authors' code.

Each reference is written here from the source it names, entry by entry or with plain torch ops, independently of
the library's implementation; float64 throughout, so the comparisons are at float64 round-off (``F64``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_theory.merging import pcb, task_arithmetic, ties, trim
from tests.conftest import tol

F64 = tol(torch.float64)


def _tvs(T=3, shape=(7, 6), seed=0):
    g = np.random.default_rng(seed)
    return [g.standard_normal(shape) for _ in range(T)]


# ----------------------------------------------------------------------------- task arithmetic
def test_task_arithmetic_is_ilharco_et_al(bk):
    """θ_m = θ_0 + λ Σ_t τ_t with τ_t = θ_t − θ_0 (Ilharco et al. 2023, task addition)."""
    g = np.random.default_rng(1)
    theta0 = g.standard_normal((5, 4))
    thetas = [theta0 + g.standard_normal((5, 4)) for _ in range(3)]
    lam = 0.4
    want = theta0 + lam * sum(t - theta0 for t in thetas)
    tvs = [bk.asarray(t - theta0) for t in thetas]
    got = bk.asarray(theta0) + task_arithmetic(tvs, [lam] * 3)
    np.testing.assert_allclose(bk.to_numpy(got), want, **F64)


# ----------------------------------------------------------------------------- TIES
def _ties_paper(tvs: list[np.ndarray], density: float, lam: float) -> np.ndarray:
    """Yadav et al. (2023), §4 / Algorithm 1, one entry at a time.

    1. Trim: keep the top-k% of each task vector by magnitude (k% of D entries, rounded down), zero the rest.
    2. Elect: γ^p = sgn(Σ_t τ̂_t^p).
    3. Disjoint merge: A^p = {t : sgn(τ̂_t^p) = γ^p}, τ_m^p = (1/|A^p|) Σ_{t∈A^p} τ̂_t^p.
    θ = θ_init + λ τ_m.
    """
    D = tvs[0].size
    keep = int(density * D)
    trimmed = []
    for t in tvs:
        flat = t.ravel()
        order = sorted(range(D), key=lambda i: -abs(flat[i]))
        kept = np.zeros(D)
        for i in order[:keep]:
            kept[i] = flat[i]
        trimmed.append(kept)
    out = np.zeros(D)
    for p in range(D):
        mass = sum(t[p] for t in trimmed)
        gamma = 1.0 if mass >= 0 else -1.0
        agree = [t[p] for t in trimmed if np.sign(t[p]) == gamma]
        out[p] = sum(agree) / len(agree) if agree else 0.0
    return lam * out.reshape(tvs[0].shape)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_is_the_papers_algorithm(bk, density):
    tvs = _tvs()
    lam = 1.3
    got = ties([bk.asarray(t) for t in tvs], [lam] * 3, density)
    np.testing.assert_allclose(bk.to_numpy(got), _ties_paper(tvs, density, lam), **F64)


def test_ties_negative_controls():
    """The disjoint mean matters (a plain mean of the trimmed vectors differs), and so does the election."""
    tvs = _tvs(seed=3)
    got = ties(tvs, None, 0.5)
    plain_mean = sum(trim(t, 0.5) for t in tvs) / 3
    assert np.max(np.abs(got - plain_mean)) > 0.1
    # odd in τ (no entry sums to exactly 0 here): negating every task vector negates the merge
    np.testing.assert_allclose(ties([-t for t in tvs], None, 0.5), -got, **F64)
    # electing by the vote of signs instead of the mass changes the result on these vectors
    assert np.max(np.abs(ties(tvs, None, 0.5, majority_sign_method="frequency") - got)) > 0.1


def test_trim_keeps_floor_of_density_times_size():
    """The paper's "top-k %" and PEFT's int(density · numel); the TIES authors' code (kthvalue, >=) keeps one more."""
    x = np.arange(1.0, 41.0).reshape(5, 8) * np.where(np.arange(40).reshape(5, 8) % 3 == 0, -1, 1)
    for density in (0.1, 0.25, 0.29, 0.5, 0.999):
        kept = trim(x, density)
        k = int(density * 40)
        assert np.count_nonzero(kept) == k
        assert set(np.abs(kept[kept != 0])) == set(range(40 - k + 1, 41))  # exactly the k largest magnitudes


# ----------------------------------------------------------------------------- PCB
def _pcb_authors(tvs: torch.Tensor, lams: list[float], ratio: float, clip: float) -> torch.Tensor:
    """github.com/duguodong7/pcb-merging, ``pcb-merging.py: PCB_merge`` (rows = flattened task vectors), re-stated.

    Helpers as there: ``normalize`` is the row-wise min–max; ``clamp(x, lo, hi)`` clips each row to its sorted
    values at index int(d·lo) and int(d·(1 − hi)) − 1.  The λ enter as in ``vision_source_code/pcb_ES.py:
    compute_acc`` (multiplying the clipped task vectors).
    """
    n, d = tvs.shape

    def normalize(x):
        mn, mx = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - mn) / (mx - mn)

    def clamp(x, lo, hi):
        s = torch.sort(x, dim=1).values
        return torch.clamp(x, s[:, int(d * lo)].unsqueeze(1), s[:, int(d * (1 - hi) - 1)].unsqueeze(1))

    a = clamp(tvs.abs(), clip, clip)
    clipped = tvs.sign() * a
    intra = torch.exp(n * normalize(a) ** 2)
    inter = torch.tanh(tvs * tvs.sum(dim=0))
    scale = normalize(clamp(intra * inter, 1 - ratio, 0))
    weighted = clipped * torch.tensor(lams, dtype=tvs.dtype).unsqueeze(1)
    return (weighted * scale).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)


@pytest.mark.parametrize("ratio,clip", [(0.1, 1e-4), (0.05, 0.01), (0.5, 0.0), (1.0, 1e-4)])
def test_pcb_is_the_authors_pcb_merge(ratio, clip):
    g = torch.Generator().manual_seed(0)
    # magnitudes like real task vectors (1e-3) and unlike them (1): tanh is linear in the first, saturates in the second
    for size in (1e-3, 1.0):
        T = size * torch.randn(4, 2000, generator=g, dtype=torch.float64)
        lams = [1.2, 0.8, 1.0, 1.3]
        want = _pcb_authors(T, lams, ratio, clip)
        got = pcb([t.reshape(40, 50) for t in T], lams, ratio, clip_ratio=clip)
        torch.testing.assert_close(got.reshape(-1), want, **F64)


def test_pcb_negative_controls():
    """The comparison above can fail: the authors' two vision variants of inter-balancing (``pcb_ES.py``:
    Σ_j tanh(τ̃_i ⊙ τ̃_j) of min–max-normalized τ̃) and a smaller drop ratio give other merges."""
    g = torch.Generator().manual_seed(1)
    T = torch.randn(3, 500, generator=g, dtype=torch.float64)
    ours = pcb(list(T), None, 0.2)
    n, d = T.shape
    a = T.abs()
    norm = (a - a.min(1, keepdim=True).values) / (a.max(1, keepdim=True).values - a.min(1, keepdim=True).values)
    tilde = T.sign() * norm
    inter_es = torch.stack([torch.tanh(tilde[i] * tilde).sum(0) for i in range(n)])
    beta = torch.exp(n * norm**2) * inter_es
    thr = torch.sort(beta, dim=1).values[:, int(d * 0.8)].unsqueeze(1)
    b = torch.maximum(beta, thr)
    b = (b - b.min(1, keepdim=True).values) / (b.max(1, keepdim=True).values - b.min(1, keepdim=True).values)
    es = (T * b).sum(0) / torch.clamp(b.sum(0), min=1e-12)
    assert (ours - es).abs().max() > 0.1
    assert (ours - pcb(list(T), None, 0.1)).abs().max() > 0.1


def test_pcb_one_task_is_the_drop_step():
    """N = 1: τ_m = λ τ̄ on the kept entries, 0 elsewhere; with distinct β the kept count is D − 1 − ⌊D(1 − r)⌋."""
    g = np.random.default_rng(5)
    t = g.standard_normal(1000)
    out = pcb([t], [0.7], 0.3, clip_ratio=0.0)
    kept = out != 0
    assert kept.sum() == 1000 - 1 - int(1000 * 0.7)
    np.testing.assert_allclose(out[kept], 0.7 * t[kept], **F64)


def test_pcb_constant_task_gives_zeros_not_nan():
    """Our choice where the authors' min–max divides by zero: a constant row normalizes to zeros."""
    out = pcb([np.zeros((4, 4)), np.ones((4, 4))], None, 0.5)
    assert np.all(np.isfinite(out))
