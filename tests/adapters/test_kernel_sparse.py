"""SNELLA (``snella``, arXiv:2510.24037): kernelized low-rank merge, top-k inside a layer, allocation across layers
(the allocation rule is the method-index entry ``snella_bilevel``).

* The public checker on three configurations (SNELLA's mixed kernel, SNELL's distance kernel, the authors'
  magnitude weighting whose gradient is not the forward's derivative: gradcheck skipped by design).
* M equals the formula evaluated entry by entry in NumPy; ΔW keeps exactly k entries, the k largest |M|.
* Rank: the distance kernel of rank-q factors is full rank, the squared-distance kernel (negative control)
  has rank <= q/H + 2 per head, LoRA's inner product rank <= q.
* ``allocate_volume`` sums exactly to the volume, respects capacities, is proportional within one unit, and
  matches an independent fractional water-filling; the cubic schedule hits its end points; the allocator on a
  tiny model trains, re-allocates, and the kept counts follow the volume.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank_theory.adapters.kernel_sparse import SNELLA, keep_count
from lowrank_theory.testing import parametrize_with_checks, registered_factory
from lowrank_theory.training import inject
from lowrank_theory.training.bilevel_sparsity import BilevelAllocator, allocate_volume, cubic_volume


@parametrize_with_checks({
    "snella(mixed)": registered_factory("snella", rank=4, density=0.3),
    "snella(distance)": registered_factory("snella", rank=2, heads=2, density=0.5, kernel="distance"),
    "snella(magnitude)": registered_factory("snella", rank=2, heads=1, density=1.0, weighting="magnitude"),
})
def test_snella_contract(check):
    check()


def _perturbed(ad, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return ad


def test_merged_matrix_is_the_formula_entry_by_entry():
    ad = _perturbed(SNELLA(7, 5, rank=4, heads=2, density=0.4, coeff=0.2).double())
    A, B = ad.A.detach().numpy(), ad.B.detach().numpy()
    a, gam, b = ad.a.item(), ad.gamma.item(), ad.b.item()
    K = np.zeros((7, 5))
    for i in range(7):
        for j in range(5):
            K[i, j] = sum(0.2 * (-1) ** h * np.sqrt(((B[h, i] - A[h, j]) ** 2).sum()) for h in range(2))
    E = np.exp(K / gam)
    M = K + a * E / E.sum(axis=0, keepdims=True) + b  # softmax over outputs i, per input column j
    got = ad.merged_matrix().detach().numpy()
    assert np.abs(got - M).max() <= 1e-12 * np.abs(M).max()
    dw = ad.delta_weight().detach().numpy()
    k = keep_count(7, 5, 0.4)
    assert k == 14 and np.count_nonzero(dw) == k
    thr = np.sort(np.abs(M).ravel())[::-1][k - 1]
    assert np.all(np.abs(M[dw != 0]) >= thr) and np.all(dw[dw != 0] == got[dw != 0])
    ad.set_keep(3)
    assert np.count_nonzero(ad.delta_weight().detach().numpy()) == 3 and ad.config()["density"] == 3 / 35


def test_distance_kernel_is_full_rank_the_squared_distance_kernel_is_not():
    d_out, d_in, q = 40, 30, 4
    ad = _perturbed(SNELLA(d_out, d_in, rank=q, heads=2, density=1.0, kernel="distance").double(), seed=2)
    K = ad.merged_matrix().detach()
    assert int(torch.linalg.matrix_rank(K)) == min(d_out, d_in)  # far above q = 4
    # negative control: squared distances ||b - a||² = |b|² + |a|² - 2 b·a have rank <= d + 2 per head
    sq = sum(((-1) ** h) * torch.cdist(ad.B[h], ad.A[h]).detach() ** 2 for h in range(2))
    assert int(torch.linalg.matrix_rank(sq)) <= 2 * (q // 2 + 2)
    lora = torch.randn(d_out, q, dtype=torch.float64) @ torch.randn(q, d_in, dtype=torch.float64)
    assert int(torch.linalg.matrix_rank(lora)) == q


def test_gradient_reaches_only_kept_entries():
    ad = _perturbed(SNELLA(9, 6, rank=2, heads=1, density=0.2, kernel="distance").double(), seed=4)
    dw = ad.delta_weight()
    mask = dw.detach() != 0
    G = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (dw * G).sum().backward()
    # reference: the same derivative with the dropped entries' G zeroed gives the same factor gradients
    gA, gB = ad.A.grad.clone(), ad.B.grad.clone()
    ad.A.grad = ad.B.grad = None
    (ad.merged_matrix() * (G * mask)).sum().backward()
    assert torch.allclose(gA, ad.A.grad, rtol=1e-12, atol=0) and torch.allclose(gB, ad.B.grad, rtol=1e-12, atol=0)


def test_param_count_and_bad_config():
    assert SNELLA.param_count(768, 768, rank=16) == 16 * 1536 + 3
    assert SNELLA(12, 20, rank=4, kernel="distance").num_trainable == 4 * 32
    with pytest.raises(ValueError, match="heads"):
        SNELLA(12, 20, rank=3, heads=2)
    with pytest.raises(ValueError, match="density"):
        SNELLA(12, 20, density=1.5)
    with pytest.raises(ValueError, match="k must"):
        SNELLA(12, 20, rank=4).set_keep(241)


# ----------------------------------------------------------------------------- allocation across layers
def _fractional_waterfill(s, V, caps):
    """Reference: the real-valued capped proportional split, by bisection on the water level λ."""
    s, caps = np.asarray(s, float), np.asarray(caps, float)
    V = min(V, caps.sum())
    if s.sum() == 0:
        s = np.ones_like(s)
    lo, hi = 0.0, 1e12
    for _ in range(200):
        lam = (lo + hi) / 2
        if np.minimum(lam * s, caps).sum() < V:
            lo = lam
        else:
            hi = lam
    return np.minimum(hi * s, caps)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 8))
def test_allocate_volume_is_an_exact_integer_waterfill(data, n):
    # scores 0 or in [1e-3, 10]: the bisection reference needs a bounded ratio of scores
    s = data.draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 10)), min_size=n, max_size=n))
    caps = data.draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    V = data.draw(st.integers(0, 400))
    k = allocate_volume(s, V, caps)
    assert sum(k) == min(V, sum(caps))
    assert all(0 <= ki <= ci for ki, ci in zip(k, caps))
    # reference: real-valued water-fill over the positive-score layers, then (if they are full) over the
    # zero-score ones with equal weights -- the documented order
    pos = np.array([x > 0 and c > 0 for x, c in zip(s, caps)])
    ref = np.zeros(n)
    if pos.any():
        ref[pos] = _fractional_waterfill(np.asarray(s)[pos], V, np.asarray(caps)[pos])
    rest = min(V, sum(caps)) - ref.sum()
    if rest > 1e-9 and (~pos).any():
        ref[~pos] = _fractional_waterfill(np.ones((~pos).sum()), rest, np.asarray(caps)[~pos])
    assert np.all(np.abs(np.asarray(k) - ref) <= 1 + 1e-6), (k, ref)


def test_allocate_volume_rejects_bad_input():
    with pytest.raises(ValueError, match="length"):
        allocate_volume([1.0], 3, [1, 2])
    with pytest.raises(ValueError, match="scores"):
        allocate_volume([-1.0], 3, [4])
    with pytest.raises(ValueError, match="volume"):
        allocate_volume([1.0], -1, [4])


def test_cubic_volume_end_points_and_shape():
    v = [cubic_volume(t, 1000, 100, 10, 20, 110) for t in range(0, 111)]
    assert v[:11] == [1000] * 11 and v[91:] == [100] * 20
    assert all(a >= b for a, b in zip(v, v[1:]))
    t = 50  # halfway through the decay: 100 + 900 * (1 - 40/80)^3
    assert v[t] == int(100 + 900 * 0.5 ** 3)
    with pytest.raises(ValueError, match="total_steps"):
        cubic_volume(0, 1, 0, 5, 5, 10)


def test_allocator_on_a_tiny_model_follows_the_volume_and_favours_the_important_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    inject(model, "snella", ["0", "2"], rank=2, heads=2, density=0.5, kernel="distance")
    alloc = BilevelAllocator(model, target_density=0.2, warmup=2, final_warmup=2, total_steps=12, interval=2)
    assert alloc.init_volume == round(0.5 * 60) + round(0.5 * 80) and alloc.target_volume == round(0.2 * 140)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randn(32, 2, generator=g, dtype=torch.float64)
    for t in range(1, 13):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        alloc.update_importance()
        opt.step()
        counts = alloc.step(t)
        if counts is not None:
            assert sum(counts.values()) == alloc.volume(t)
            nnz = sum(int((m.adapter.delta_weight() != 0).sum()) for m in (model[0], model[2]))
            assert nnz == alloc.volume(t)
    assert sum(a.keep for a in alloc.adapters.values()) == alloc.target_volume
    sc = alloc.scores()
    assert all(v > 0 for v in sc.values())
    hi = max(sc, key=sc.get)
    lo = min(sc, key=sc.get)
    dens = alloc.densities()
    assert sc[hi] > sc[lo] and dens[hi] * alloc.adapters[hi].d_in * alloc.adapters[hi].d_out > 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=12, max_size=12), st.integers(0, 12))
def test_keep_mask_is_the_first_k_of_a_stable_descending_sort(values, k):
    """The selection (k-th largest, then the first tied entries in flat order) keeps exactly the entries a stable
    descending sort of |M| puts first -- with many exact ties (integers in [-3, 3]), where the order matters."""
    ad = SNELLA(3, 4, rank=2, heads=1, density=0.5)
    ad.keep = k
    M = torch.tensor(values, dtype=torch.float64).view(3, 4)
    want = np.zeros(12, dtype=bool)
    want[np.argsort(-np.abs(np.array(values, dtype=float)), kind="stable")[:k]] = True
    got = ad.keep_mask(M)
    assert got.dtype == torch.bool and int(got.sum()) == k
    assert np.array_equal(got.reshape(-1).numpy(), want)
