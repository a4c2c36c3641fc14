"""SaRA: the public checker on it, its support against a NumPy reference, the sparse forward and gradient,
the nuclear-norm penalty and prox, and the progressive re-selection.

Tolerances: float64 comparisons use 1e-12 relative (every formula here is a handful of exact sums and one
SVD of a matrix of at most 30×40, whose backward error is ~1e-15); float32 comparisons 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.sara import (
    SaRA,
    SaRASchedule,
    nuclear_prox,
    remask_layer_,
    sara_support,
    sara_support_size,
)
from lowrank_theory.testing import parametrize_with_checks, registered_factory, seeded_linear

RTOL64 = 1e-12


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------- the public checker
@parametrize_with_checks({
    "sara.from_weight(f=0.15)": registered_factory("sara", fraction=0.15, seed=1),
    "sara.from_weight(f=1)": registered_factory("sara", fraction=1.0),
    "sara.create(f=0.2)": registered_factory("sara", from_weight=False, fraction=0.2, seed=3),
})
def test_sara_passes_the_checker(check):
    check()


# ----------------------------------------------------------------------------- support
@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 9), f=st.floats(0.05, 1.0), seed=st.integers(0, 10_000),
       ties=st.booleans())
def test_support_is_the_k_smallest_magnitudes(m, n, f, seed, ties):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n))
    if ties:  # many equal magnitudes of both signs: the tie-break by flat index must decide
        W = np.round(W) * 0.5
    k = sara_support_size(m, n, f)
    if k < 1:
        with pytest.raises(ValueError, match="fraction"):
            SaRA(m, n, fraction=f)
        return
    ad, base = SaRA.from_weight(torch.from_numpy(W), fraction=f)
    flat = ad.flat_indices().numpy()
    ref = np.sort(np.argsort(np.abs(W).ravel(), kind="stable")[:k])  # NumPy's stable sort: same tie rule
    np.testing.assert_array_equal(flat, ref)
    assert ad.num_trainable == k == SaRA.param_count(m, n, fraction=f) == math.floor(f * m * n * (1 + 1e-12))
    mags = np.abs(W).ravel()
    outside = np.setdiff1d(np.arange(m * n), flat)
    if outside.size:
        assert mags[flat].max() <= ad.threshold == mags[outside].min()
        if not ties:  # no ties at the boundary: the support is exactly {|w| < theta}
            np.testing.assert_array_equal(flat, np.flatnonzero(mags < ad.threshold))
    else:
        assert ad.threshold == math.inf
    assert base is not None and torch.equal(base, torch.from_numpy(W))


def test_fraction_and_weight_are_validated():
    with pytest.raises(ValueError, match="fraction"):
        SaRA(4, 5, fraction=0.0)
    with pytest.raises(ValueError, match="fraction"):
        SaRA(4, 5, fraction=1.5)
    with pytest.raises(ValueError, match="no trainable entry"):
        SaRA(3, 3, fraction=0.1)
    with pytest.raises(TypeError, match="W"):
        SaRA.from_weight(np.ones((3, 3)), fraction=0.5)
    with pytest.raises(ValueError, match="NaN"):
        SaRA.from_weight(torch.full((3, 3), float("nan")), fraction=0.5)
    with pytest.raises(ValueError, match="k must be"):
        sara_support(torch.ones(2, 2), 5)
    with pytest.raises(ValueError, match="tau"):
        nuclear_prox(torch.ones(2, 2), -1.0)


# ----------------------------------------------------------------------------- forward and gradient
def test_forward_and_value_gradient_match_a_dense_reference():
    torch.manual_seed(0)
    m, n, f = 11, 14, 0.2
    W = torch.randn(m, n, dtype=torch.float64)
    ad, _ = SaRA.from_weight(W, fraction=f)
    ad = ad.double()
    with torch.no_grad():
        ad.values.copy_(torch.randn(ad.k, dtype=torch.float64))
    x = torch.randn(5, 3, n, dtype=torch.float64)
    G = torch.randn(5, 3, m, dtype=torch.float64)
    # dense reference built from the index lists in NumPy
    D = np.zeros((m, n))
    D[ad.rows.numpy(), ad.cols.numpy()] = ad.values.detach().numpy()
    assert np.abs(ad.delta_weight().detach().numpy() - D).max() == 0.0
    y = ad(x)
    assert _rel(y, torch.from_numpy(x.numpy() @ D.T)) < RTOL64
    (y * G).sum().backward()
    # dL/dv_t = sum over tokens of G[..., r_t] x[..., c_t]: the full gradient G^T X read on the support
    full = G.reshape(-1, m).T @ x.reshape(-1, n)
    assert ad.values.grad.shape == (ad.k,)
    assert _rel(ad.values.grad, full[ad.rows, ad.cols]) < RTOL64


def test_adapted_layer_trains_only_the_values_and_only_the_support_moves():
    base = seeded_linear(12, 10, torch.float32, seed=2)
    W0 = base.weight.detach().clone()
    ad, _ = SaRA.from_weight(W0, fraction=0.1)
    layer = AdaptedLinear(base, ad)
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["adapters.default.values"]
    x = torch.randn(16, 10)
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        opt.step()
    merged, _ = layer.merged_weights()
    moved = (merged - W0) != 0
    assert torch.equal(base.weight, W0)
    on = torch.zeros(12 * 10, dtype=torch.bool)
    on[ad.flat_indices()] = True
    assert not bool(moved.reshape(-1)[~on].any())  # nothing off the support changed
    assert int(moved.sum()) > 0


# ----------------------------------------------------------------------------- nuclear norm
def test_penalty_is_the_nuclear_norm_and_its_gradient_is_uv_on_the_support():
    torch.manual_seed(1)
    ad, _ = SaRA.from_weight(torch.randn(9, 13, dtype=torch.float64), fraction=0.4)
    ad = ad.double()
    with torch.no_grad():
        ad.values.copy_(torch.randn(ad.k, dtype=torch.float64))
    pen = ad.nuclear_norm_penalty()
    D = ad.delta_weight().detach().numpy()
    assert abs(float(pen.detach()) - np.linalg.norm(D, "nuc")) < RTOL64 * np.linalg.norm(D, "nuc")
    pen.backward()
    U, _, Vh = np.linalg.svd(D, full_matrices=False)  # full rank (9): the gradient of ||.||_* is U V^T
    UV = U @ Vh
    np.testing.assert_allclose(ad.values.grad.numpy(), UV[ad.rows.numpy(), ad.cols.numpy()], rtol=0, atol=1e-12)


def test_penalty_gradient_is_finite_at_init():
    ad, _ = SaRA.from_weight(torch.randn(6, 8), fraction=0.5)
    ad.nuclear_norm_penalty().backward()
    assert torch.isfinite(ad.values.grad).all()


def test_nuclear_prox_matches_numpy_svt_and_proximal_step_keeps_the_support():
    rng = np.random.default_rng(3)
    Y = rng.standard_normal((7, 10))
    tau = 1.3
    U, S, Vh = np.linalg.svd(Y, full_matrices=False)
    ref = (U * np.maximum(S - tau, 0)) @ Vh
    out = nuclear_prox(torch.from_numpy(Y), tau).numpy()
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
    assert np.linalg.matrix_rank(out) == int((S > tau).sum())
    ad, _ = SaRA.from_weight(torch.from_numpy(rng.standard_normal((7, 10))), fraction=0.3)
    ad = ad.double()
    with torch.no_grad():
        ad.values.copy_(torch.from_numpy(rng.standard_normal(ad.k)))
    D = ad.delta_weight().detach().numpy()
    ad.proximal_step_(0.5)
    U, S, Vh = np.linalg.svd(D, full_matrices=False)
    P = (U * np.maximum(S - 0.5, 0)) @ Vh
    np.testing.assert_allclose(ad.values.detach().numpy(), P[ad.rows.numpy(), ad.cols.numpy()], atol=1e-12)


# ----------------------------------------------------------------------------- progressive re-selection
def test_remask_keeps_the_output_and_reselects_on_the_updated_weight():
    base = seeded_linear(10, 12, torch.float64, seed=4)
    ad, _ = SaRA.from_weight(base.weight.detach(), fraction=0.2)
    ad = ad.double()
    layer = AdaptedLinear(base, ad)
    with torch.no_grad():  # large values: several trained entries leave the small range
        ad.values.copy_(3.0 * torch.randn(ad.k, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(6, 12, dtype=torch.float64)
    before = layer(x).detach()
    W1 = (base.weight + ad.delta_weight()).detach().clone()
    old = set(ad.flat_indices().tolist())
    remask_layer_(layer)
    assert _rel(layer(x), before) < RTOL64
    assert torch.equal(base.weight, W1) and bool((ad.values == 0).all())
    ref = set(np.argsort(np.abs(W1.numpy()).ravel(), kind="stable")[:ad.k].tolist())
    assert set(ad.flat_indices().tolist()) == ref != old


def test_schedule_remasks_at_the_listed_steps_and_clears_optimizer_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    for i in (0, 2):
        ad, _ = SaRA.from_weight(model[i].weight.detach(), fraction=0.25)
        model[i] = AdaptedLinear(model[i].requires_grad_(False), ad.double())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.5)
    sched = SaRASchedule(at=[2])
    x, y = torch.randn(20, 8, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64)
    counts = []
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        before = model(x).detach()
        counts.append(sched.step(model, opt))
        assert _rel(model(x), before) < RTOL64
    assert counts == [0, 2, 0]
    with pytest.raises(ValueError, match="positive ints"):
        SaRASchedule(at=[0])
    with pytest.raises(TypeError, match="SaRA"):
        remask_layer_(nn.Linear(2, 2))


def test_registry_and_index_entry():
    assert adapters.get("sara") is SaRA
    assert SaRA.index_entry.name == "sara"
    ad = adapters.create("sara", 10, 10, fraction=0.2, seed=9)
    assert ad.config() == {"fraction": 0.2, "seed": 9}
