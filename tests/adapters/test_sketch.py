"""SketchTune (``sketchtune``, arXiv:2410.06364): codes into trainable per-row-group codebooks.

* The public checker on the from_weight path (base = the sketch of W0; identity at init declared False
  because the layer differs from W0 by the sketch error) and on the create path (ΔW = 0 at init).
* The codebook gradient of the custom backward equals the scatter-add, computed in NumPy with ``np.add.at``,
  of ∂L/∂Ŵ taken by autograd through a dense leaf Ŵ (an independent reference: no custom Function).
* The sketch: codes/codebooks equal a plain NumPy Lloyd loop; the k-means error never increases; the
  sketch error decreases with bits; at init the layer is exactly x Ŵ0ᵀ + b, off W0 by the reported error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.sketch import SketchTune, column_groups, gather_sketch, sketch_weight
from lowrank_theory.testing import parametrize_with_checks, registered_factory, seeded_linear

#: float64 results of the same sums in another order: round-off ~1e-15 relative; 1e-12 leaves margin and
#: still fails on any wrong index (a misplaced entry changes the result at order 1).
F64 = 1e-12


@parametrize_with_checks({
    "sketchtune.from_weight(bits=2,groups=3)": registered_factory("sketchtune", bits=2, groups=3, iters=5),
    "sketchtune.from_weight(bits=4,groups=1)": registered_factory("sketchtune", bits=4, groups=1),
    "sketchtune.create(bits=2,groups=2)": registered_factory("sketchtune", from_weight=False, bits=2, groups=2),
})
def test_sketchtune_contract(check):
    check()


def _np_scatter(grad_W: np.ndarray, codes: np.ndarray, col_group: np.ndarray, G: int, K: int) -> np.ndarray:
    out = np.zeros((grad_W.shape[0], G, K))
    rows = np.repeat(np.arange(grad_W.shape[0]), grad_W.shape[1])
    np.add.at(out, (rows, np.tile(col_group, grad_W.shape[0]), codes.reshape(-1)), grad_W.reshape(-1))
    return out


@pytest.mark.parametrize("shape,bits,groups", [((12, 20), 2, 3), ((17, 9), 3, 1), ((8, 16), 4, 4)])
def test_codebook_gradient_is_the_scatter_add_of_the_dense_gradient(shape, bits, groups):
    d_out, d_in = shape
    base = seeded_linear(d_out, d_in)
    ad, W_hat = SketchTune.from_weight(base.weight.detach(), bits=bits, groups=groups, iters=5)
    with torch.no_grad():
        base.weight.copy_(W_hat)
        ad.codebook.add_(0.1 * torch.randn(ad.codebook.shape, generator=torch.Generator().manual_seed(3),
                                           dtype=torch.float64))
    layer = AdaptedLinear(base, ad)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, d_in, generator=g, dtype=torch.float64)
    r = torch.randn(2, 7, d_out, generator=g, dtype=torch.float64)
    (torch.tanh(layer(x)) * r).sum().backward()
    # reference: the same loss through a dense leaf W' (plain F.linear, no custom backward)
    codes, cg = ad.codes.numpy(), column_groups(d_in, groups).numpy()
    S = ad.codebook.detach().numpy()
    W_dense = torch.tensor(S[np.arange(d_out)[:, None], cg[None, :], codes], requires_grad=True)
    (torch.tanh(torch.nn.functional.linear(x, W_dense, base.bias)) * r).sum().backward()
    want = _np_scatter(W_dense.grad.numpy(), codes, cg, groups, 2 ** bits)
    got = ad.codebook.grad.numpy()
    assert np.abs(got - want).max() <= F64 * np.abs(want).max()
    assert np.count_nonzero(want) > 0
    # the gather itself: Ŵ(S) from the library equals the NumPy fancy-index
    assert torch.equal(ad.sketched_weight().detach(), torch.from_numpy(S[np.arange(d_out)[:, None], cg, codes]))


def _np_kmeans(W: np.ndarray, bits: int, groups: int, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: one (row, group) at a time, a plain Lloyd loop (quantile start, first-index ties)."""
    m, n = W.shape
    K = 2 ** bits
    cg = np.arange(n) * groups // n
    codes = np.zeros((m, n), dtype=np.int64)
    C = np.zeros((m, groups, K))
    for i in range(m):
        for g in range(groups):
            v = W[i, cg == g]
            c = np.quantile(v, (np.arange(K) + 0.5) / K)
            a = np.abs(v[:, None] - c[None, :]).argmin(1)
            for _ in range(iters):
                c = np.array([v[a == k].mean() if np.any(a == k) else c[k] for k in range(K)])
                a_new = np.abs(v[:, None] - c[None, :]).argmin(1)
                if np.array_equal(a_new, a):
                    break
                a = a_new
            codes[i, cg == g], C[i, g] = a, c
    return codes, C


@pytest.mark.parametrize("bits,groups,iters", [(1, 1, 10), (2, 3, 10), (3, 2, 0), (4, 5, 20)])
def test_sketch_matches_a_numpy_lloyd_loop(bits, groups, iters):
    W = torch.randn(9, 23, generator=torch.Generator().manual_seed(bits * 10 + groups), dtype=torch.float64)
    res = sketch_weight(W, bits, groups, iters)
    codes, C = _np_kmeans(W.numpy(), bits, groups, iters)
    W_lib = gather_sketch(res.codebook, res.codes, column_groups(23, groups)).numpy()
    W_np = C[np.arange(9)[:, None], np.arange(23)[None, :] * groups // 23, codes]
    assert np.abs(W_lib - W_np).max() <= F64 * np.abs(W.numpy()).max()
    assert np.array_equal(res.codes.numpy(), codes)


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_error_never_increases_and_sketch_error_decreases_with_bits(seed):
    W = torch.randn(16, 48, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    finals = []
    for bits in range(1, 6):
        res = sketch_weight(W, bits, groups=2, iters=30)
        e = np.array(res.errors)
        assert np.all(np.diff(e) <= 1e-12 * e[0])  # Lloyd's steps are descent steps (round-off slack)
        finals.append(e[-1])
    assert np.all(np.diff(finals) < 0), finals
    assert finals[-1] < 1e-2 * finals[0]  # 32 levels per 24 weights: almost exact


def test_layer_at_init_is_the_sketched_layer_and_off_w0_by_the_sketch_error():
    base = seeded_linear(20, 30)
    W0 = base.weight.detach().clone()
    ad, W_hat = SketchTune.from_weight(W0, bits=3, groups=2)
    assert ad.identity_at_init is False and SketchTune.identity_at_init is True
    with torch.no_grad():
        base.weight.copy_(W_hat)
    layer = AdaptedLinear(base, ad)
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(ad.delta_weight(), torch.zeros(20, 30, dtype=torch.float64))
    assert torch.allclose(layer(x), x @ W_hat.T + base.bias, rtol=0, atol=1e-14)
    rel = float((W0 - W_hat).norm() / W0.norm())
    assert ad.sketch_error == pytest.approx(rel, rel=1e-12) and 0.05 < rel < 0.5
    assert ad.sketch_errors[-1] == pytest.approx(float(((W0 - W_hat) ** 2).sum()), rel=1e-12)
    # an SGD step on the codebook moves the weight only within the codebook's span: Ŵ(S) stays a gather
    layer(x).pow(2).sum().backward()
    with torch.no_grad():
        ad.codebook.sub_(0.1 * ad.codebook.grad)
    merged = layer.merged_weights()[0]
    assert torch.allclose(merged, ad.sketched_weight(), rtol=0, atol=1e-14)
    assert len(torch.unique(merged[0, :15])) <= 8  # row 0, group 0: at most 2**3 distinct values


def test_param_count_and_registry():
    assert "sketchtune" in adapters.names()
    assert SketchTune.param_count(384, 1536, bits=4, groups=4) == 384 * 4 * 16
    ad = adapters.create("sketchtune", 12, 20, bits=2, groups=5)
    assert ad.num_trainable == 12 * 5 * 4 and ad.codes.dtype == torch.uint8
    assert set(ad.state_dict()) == {"codes", "codebook0", "codebook"}


@pytest.mark.parametrize("cfg,err", [
    (dict(bits=0), ValueError), (dict(bits=9), ValueError), (dict(bits=2.0), TypeError),
    (dict(groups=0), ValueError), (dict(groups=21), ValueError), (dict(iters=-1), ValueError),
])
def test_bad_config_is_refused_before_any_work(cfg, err):
    with pytest.raises(err, match=next(iter(cfg))):
        SketchTune(12, 20, **cfg)


def test_sketch_weight_rejects_bad_input():
    with pytest.raises(TypeError, match="W"):
        sketch_weight(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="W"):
        sketch_weight(torch.ones(3, 4, 2))
    with pytest.raises(ValueError, match="groups"):
        sketch_weight(torch.ones(3, 4), groups=5)
