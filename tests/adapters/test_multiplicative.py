"""DoRA, SSF and HUT against the contract, dense NumPy float64 formulas and their edge cases.

References are written independently of the adapters' code paths: row norms and merged weights
are formed densely in NumPy float64 (``np.linalg.norm`` of the full ``W0 + sBA``), so a wrong
axis, scale or structured shortcut shows as an O(1) error.  Tolerance: ``tol(float64)`` (every
path is a short chain of products of O(1) numbers).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear, row_norms
from lowrank_theory.adapters.multiplicative import HUT, SSF, DoRA, lowrank_row_norms
from tests.adapters.contract import AdapterContract, make_base, randomize_, relerr
from tests.conftest import tol

TOL64 = tol(torch.float64)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ----------------------------------------------------------------------------- contract
class _DoRAContract(AdapterContract):
    name = "dora"

    def make(self, d_out, d_in, dtype=torch.float64, seed=0):
        base = make_base(d_out, d_in, dtype, seed)
        ad, W = DoRA.from_weight(base.weight.detach(), **self.cfg)
        assert torch.equal(W, base.weight)  # DoRA keeps the base weight
        return ad, base


class TestDoRA(_DoRAContract):
    # exact gradient through the row norm, so gradcheck applies
    cfg = {"rank": 3, "alpha": 6.0, "detach_norm": False, "seed": 1}


class TestDoRADetached(_DoRAContract):
    # PEFT's default: the norm is a constant in backward, so finite differences of the forward
    # map disagree with the gradient by design; test_dora_detached_gradient checks it instead.
    cfg = {"rank": 2, "alpha": 4.0, "rslora": True, "seed": 2}


class TestSSF(AdapterContract):
    name = "ssf"
    cfg = {"init_std": 0.0}

    def test_forward_matches_numpy_reference(self):
        # SSF changes the bias too: the dense reference is x W'^T + b' with b' = gamma*b0 + beta.
        d_out, d_in = self.shapes[0]
        layer = self._layer(d_out, d_in)
        ad = layer.adapter
        x = self._x(d_in)
        W0, b0 = layer.weight, layer.bias
        gamma, beta = _np(ad.gamma), _np(ad.beta)
        ref = (_np(x) @ _np(W0).T + _np(b0)) * gamma + beta
        assert np.linalg.norm(gamma - 1) > 0
        np.testing.assert_allclose(_np(layer(x)), ref, **TOL64)
        np.testing.assert_allclose(_np(ad(x, W0)), _np(x) @ _np(ad.delta_weight(W0)).T, **TOL64)


class TestHUT(AdapterContract):
    name = "hut"
    cfg = {"rank": 3, "seed": 4}


class TestHUTStructured(AdapterContract):
    name = "hut"
    cfg = {"rank": 3, "seed": 5, "path": "structured"}


class TestHUTRank1(AdapterContract):
    name = "hut"
    cfg = {"rank": 1}


# ----------------------------------------------------------------------------- DoRA
def _exact_row_norms(W0: np.ndarray, B: np.ndarray, A: np.ndarray, s: float) -> np.ndarray:
    """‖W0 + sBA‖ per row in exact rational arithmetic (floats are exact binary fractions)."""
    F = Fraction
    out = []
    for i in range(W0.shape[0]):
        sq = F(0)
        for j in range(W0.shape[1]):
            v = F(W0[i, j]) + F(s) * sum(F(B[i, k]) * F(A[k, j]) for k in range(A.shape[0]))
            sq += v * v
        out.append(math.sqrt(sq))  # one rounding of the exact square
    return np.array(out)


@settings(max_examples=25)
@given(
    m=st.integers(1, 10),
    n=st.integers(1, 10),
    r=st.integers(1, 4),
    s=st.floats(-3, 3).filter(lambda v: abs(v) > 1e-3),
    cancel=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_lowrank_row_norms_match_exact(m, n, r, s, cancel, seed):
    g = np.random.default_rng(seed)
    W0, B, A = g.standard_normal((m, n)), g.standard_normal((m, r)), g.standard_normal((r, n))
    # make some rows nearly cancel (W0_i ≈ -s (BA)_i) to exercise the dense refinement
    k = min(cancel, m)
    W0[:k] = -s * (B[:k] @ A) + 1e-9 * g.standard_normal((k, n))
    exact = _exact_row_norms(W0, B, A, s)
    got = _np(lowrank_row_norms(torch.from_numpy(W0), torch.from_numpy(B), torch.from_numpy(A), s))
    # Backward-stability bound: any float64 evaluation of a row of W0 + sBA errs by
    # ~eps·(|W0| + |s||B||A|) per entry, so |error| <= c·eps·K_i with K_i below; c ≈ 450 covers
    # the refinement threshold's eps/refine_tol amplification (sqrt(1e3) ≈ 32) with margin.
    K = np.linalg.norm(np.abs(W0), axis=1) + abs(s) * np.linalg.norm(np.abs(B) @ np.abs(A), axis=1)
    assert np.all(np.abs(got - exact) <= 1e-13 * K)


def test_lowrank_row_norms_refinement_is_needed_for_cancelling_rows():
    g = np.random.default_rng(0)
    B, A = g.standard_normal((3, 2)), g.standard_normal((2, 6))
    W0 = -(B @ A) + 1e-7 * g.standard_normal((3, 6))
    exact = _exact_row_norms(W0, B, A, 1.0)
    args = (torch.from_numpy(W0), torch.from_numpy(B), torch.from_numpy(A), 1.0)
    refined = _np(lowrank_row_norms(*args))
    raw = _np(lowrank_row_norms(*args, refine_tol=0.0))
    assert np.max(np.abs(refined - exact) / exact) < 1e-7  # condition ~1e7, eps 1e-16
    assert np.max(np.abs(raw - exact) / exact) > 1e-4  # the expanded identity loses ~half the digits


def test_lowrank_row_norms_float32_promotes_and_never_needs_dense():
    g = torch.Generator().manual_seed(0)
    W0, B, A = (torch.randn(s, generator=g) for s in ((30, 40), (30, 4), (4, 40)))
    got = lowrank_row_norms(W0, B, A, 0.5)
    assert got.dtype == torch.float32
    ref = torch.linalg.vector_norm((W0 + 0.5 * B @ A).double(), dim=1)
    torch.testing.assert_close(got.double(), ref, **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_lowrank_row_norms_in_blocks_of_rows_equal_one_block(dtype, monkeypatch):
    """W0 is cast to the working dtype a block of rows at a time; ten blocks give the one-block
    result exactly (the same products per row), and both match the dense float64 norm to the
    output dtype's tolerance (float32 for half and single inputs)."""
    g = torch.Generator().manual_seed(0)
    W0, B, A = (torch.randn(sh, generator=g).to(dtype) for sh in ((37, 11), (37, 3), (3, 11)))
    ref = torch.linalg.vector_norm(W0.double() + 0.7 * B.double() @ A.double(), dim=1)
    one = lowrank_row_norms(W0, B, A, 0.7)
    monkeypatch.setattr(row_norms, "_ROW_BLOCK", 44)  # 4 rows of 11 per block: 10 blocks
    many = lowrank_row_norms(W0, B, A, 0.7)
    assert torch.equal(many, one)
    torch.testing.assert_close(one.double(), ref, **tol(one.dtype))


def test_dora_matches_numpy_formula():
    base = make_base(9, 13)
    ad, _ = DoRA.from_weight(base.weight.detach(), rank=3, alpha=5.0, seed=0)
    randomize_(ad, 3)
    layer = AdaptedLinear(base, ad)
    x = torch.randn(4, 13, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    V = _np(base.weight) + (5.0 / 3) * _np(ad.B) @ _np(ad.A)
    W_ref = (_np(ad.magnitude) / np.linalg.norm(V, axis=1))[:, None] * V
    np.testing.assert_allclose(_np(layer(x)), _np(x) @ W_ref.T + _np(base.bias), **TOL64)
    np.testing.assert_allclose(_np(ad.merged_weight(base.weight)), W_ref, **TOL64)
    np.testing.assert_allclose(_np(ad(x, base.weight)), _np(x) @ (W_ref - _np(base.weight)).T, **TOL64)


def test_dora_from_weight_magnitude_is_row_norm_and_lazy_init_matches():
    base = make_base(7, 11)
    ad, _ = DoRA.from_weight(base.weight.detach(), rank=2)
    np.testing.assert_allclose(_np(ad.magnitude), np.linalg.norm(_np(base.weight), axis=1), **TOL64)
    lazy = adapters.create("dora", 7, 11, rank=2).double()
    assert torch.isnan(lazy.magnitude).all()
    layer = AdaptedLinear(base, lazy)
    x = torch.randn(3, 11, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), **TOL64)
    np.testing.assert_allclose(_np(lazy.magnitude), _np(ad.magnitude), **TOL64)


def test_dora_detached_gradient_treats_norm_as_constant():
    base = make_base(8, 6)
    ad, _ = DoRA.from_weight(base.weight.detach(), rank=2, seed=0)
    randomize_(ad, 5)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    AdaptedLinear(base, ad)(x).pow(2).sum().backward()
    # reference: the same map with nu computed densely and frozen as a constant
    A, B, g = (p.detach().clone().requires_grad_(True) for p in (ad.A, ad.B, ad.magnitude))
    W0 = base.weight.detach()
    nu = torch.linalg.vector_norm(W0 + ad.scale * B.detach() @ A.detach(), dim=1)
    y = (g / nu) * (x @ W0.T + ad.scale * (x @ A.T) @ B.T) + base.bias
    y.pow(2).sum().backward()
    for ours, ref in ((ad.A, A), (ad.B, B), (ad.magnitude, g)):
        torch.testing.assert_close(ours.grad, ref.grad, **TOL64)
    # and the exact gradient differs: the detach is real
    exact, _ = DoRA.from_weight(W0, rank=2, seed=0, detach_norm=False)
    exact.load_state_dict(ad.state_dict())
    AdaptedLinear(make_base(8, 6), exact)(x).pow(2).sum().backward()
    assert relerr(exact.A.grad, ad.A.grad) > 1e-3


def test_dora_zero_norm_row_is_finite_and_invertible():
    base = make_base(6, 5)
    with torch.no_grad():
        base.weight[2] = 0.0
    ad, _ = DoRA.from_weight(base.weight.detach(), rank=2, seed=0)
    randomize_(ad, 1)
    with torch.no_grad():
        ad.B[2] = 0.0  # row 2 of W0 + sBA is exactly zero
    layer = AdaptedLinear(base, ad)
    x = torch.randn(4, 5, dtype=torch.float64)
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 2], base.bias[2].expand(4), **TOL64)
    W0 = base.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight[2], torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(layer(x), y, **TOL64)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, W0, **TOL64)


def test_dora_bad_inputs():
    with pytest.raises(ValueError, match="rank"):
        DoRA(5, 7, rank=6)
    with pytest.raises(ValueError, match="eps"):
        DoRA(5, 7, rank=2, eps=0.0)
    with pytest.raises(ValueError, match="magnitude"):
        DoRA(5, 7, rank=2, magnitude=torch.ones(4))
    with pytest.raises(ValueError, match="W"):
        DoRA.from_weight(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), rank=1)
    ad, W = DoRA.from_weight(torch.randn(5, 7, dtype=torch.float64), rank=2)
    with pytest.raises(ValueError, match="base_weight"):
        ad(torch.randn(2, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="base_weight"):
        ad.delta_weight(torch.randn(7, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="merge first"):
        ad.unmerged_weight(W)


# ----------------------------------------------------------------------------- SSF
def test_ssf_without_bias_merges_only_when_beta_is_zero():
    base = torch.nn.Linear(6, 4, bias=False).double()
    ad = adapters.create("ssf", 4, 6).double()
    layer = AdaptedLinear(base, ad)
    with torch.no_grad():
        ad.gamma.mul_(1.5)
    x = torch.randn(3, 6, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, **TOL64)
    layer.unmerge()
    with torch.no_grad():
        ad.beta.fill_(0.1)
    W = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="beta"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, W)


def test_ssf_paper_init_and_bad_inputs():
    ad = SSF(5, 3, init_std=0.02, seed=0)
    assert 0 < float((ad.gamma - 1).abs().max()) < 0.2 and 0 < float(ad.beta.abs().max()) < 0.2
    with pytest.raises(ValueError, match="init_std"):
        SSF(5, 3, init_std=-1.0)
    with torch.no_grad():
        ad.gamma[1] = 0.0
    with pytest.raises(ValueError, match="gamma"):
        ad.unmerged_weight(torch.randn(5, 3))


# ----------------------------------------------------------------------------- HUT
@pytest.mark.parametrize("rank", [1, 3])
def test_hut_paths_agree_with_numpy_hadamard(rank):
    base = make_base(10, 7)
    ad = HUT(10, 7, rank=rank, seed=0).double()
    randomize_(ad, 2)
    W0 = _np(base.weight)
    W_ref = W0 * (_np(ad.B) @ _np(ad.A))
    for batch in [(1,), (6,), (2, 3)]:
        x = torch.randn(*batch, 7, dtype=torch.float64)
        ref = _np(x) @ W_ref.T
        for path in ("structured", "dense"):
            ad.path = path
            np.testing.assert_allclose(_np(ad.apply_transformed(x, base.weight)), ref, **TOL64)
    if rank == 1:  # W0 ⊙ (b aᵀ) = diag(b) W0 diag(a)
        np.testing.assert_allclose(W_ref, np.diag(_np(ad.B)[:, 0]) @ W0 @ np.diag(_np(ad.A)[0]), **TOL64)


def test_hut_auto_path_choice():
    ad = HUT(6, 5, rank=3)
    assert ad._use_structured(torch.zeros(1, 5)) and not ad._use_structured(torch.zeros(4, 5))
    assert HUT(6, 5, rank=1)._use_structured(torch.zeros(4, 5))


def test_hut_identity_init_and_bad_inputs():
    ad = HUT(6, 5, rank=3, seed=0)
    torch.testing.assert_close(ad.transform(), torch.ones(6, 5))
    assert float(ad.A[1:].abs().sum()) > 0  # the random rows that break the symmetry
    with pytest.raises(ValueError, match="path"):
        HUT(6, 5, path="fast")
    with torch.no_grad():
        ad.B.zero_()
    with pytest.raises(ValueError, match="zero entries"):
        ad.unmerged_weight(torch.randn(6, 5))


def test_dora_w0_norm_cache_follows_in_place_changes_of_w0():
    """DoRA caches ‖w_i‖² of the frozen W0; an in-place write to W0 must invalidate it."""
    from lowrank_theory.adapters.multiplicative import DoRA

    torch.manual_seed(0)
    W0 = torch.randn(6, 5, dtype=torch.float64)
    ad = DoRA(6, 5, rank=2).double()
    with torch.no_grad():
        ad.B.normal_()
    x = torch.randn(3, 5, dtype=torch.float64)

    def dense():
        V = W0 + ad.scale * ad.B @ ad.A
        return x @ ((ad.magnitude / V.norm(dim=1))[:, None] * V).T

    torch.testing.assert_close(ad.layer_output(x, x @ W0.T, W0, None), dense())
    with torch.no_grad():
        W0.mul_(2.0)  # same storage, new version: the cached norms are stale
    torch.testing.assert_close(ad.layer_output(x, x @ W0.T, W0, None), dense())
