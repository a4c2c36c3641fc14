"""FLoRA (linear and conv kernels, with AdaptedConv2d) and TLoRA: contract plus dense references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank_theory import adapters
from lowrank_theory.adapters.conv import AdaptedConv2d, ConvGeometry
from lowrank_theory.adapters.tensor import FLoRA, FLoRAConv2d, TLoRA, balanced_factors, tt_apply, tt_dense
from tests.adapters.contract import AdapterContract, make_base, randomize_, relerr
from tests.conftest import tol

F64 = tol(torch.float64)


# ----------------------------------------------------------------------------- contracts
class TestFLoRA(AdapterContract):
    name = "flora"
    cfg = {"ranks": (3, 2), "scale": 2.0, "seed": 0}


class TestFLoRAIntRank(AdapterContract):
    name = "flora"
    cfg = {"ranks": 4, "seed": 1}


class TestTLoRA(AdapterContract):
    name = "tlora"
    cfg = {"transform_rank": 2, "residual_rank": 3, "n_cores": 2, "seed": 0}


class TestTLoRAThreeCores(AdapterContract):
    name = "tlora"
    cfg = {"transform_rank": 2, "residual_rank": 2, "n_cores": 3, "seed": 1}
    shapes = [(12, 20), (8, 27)]


# ----------------------------------------------------------------------------- FLoRA (linear)
def test_flora_linear_dense_formula_and_init():
    ad = adapters.create("flora", 10, 7, ranks=(3, 4), scale=0.5, seed=2).double()
    assert float(ad.core.abs().max()) == 0.0  # zero core: ΔW = 0, factors random
    assert all(float(U.abs().min()) > 0 for U in ad.factors)
    randomize_(ad, seed=3)
    G = ad.core.detach().numpy()
    U1, U2 = (U.detach().numpy() for U in ad.factors)
    np.testing.assert_allclose(ad.delta_weight().detach().numpy(), 0.5 * U1 @ G @ U2.T, **F64)


# ----------------------------------------------------------------------------- FLoRA (conv)
def _conv(d_out=4, d_in=6, kernel=(3, 2), dtype=torch.float64, seed=0, **kw) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(d_in, d_out, kernel, **kw).to(dtype)


def _flora_layer(conv: nn.Conv2d, ranks=(3, 2, 2, 2), randomize=True, scale=1.5) -> AdaptedConv2d:
    ad = FLoRAConv2d(conv.out_channels, conv.in_channels // conv.groups, conv.kernel_size, ranks=ranks,
                     scale=scale, seed=1).to(conv.weight.dtype)
    if randomize:
        randomize_(ad, seed=2)
    return AdaptedConv2d(conv, ad)


def _dense_conv(x: torch.Tensor, conv: nn.Conv2d, kernel: torch.Tensor) -> torch.Tensor:
    """Reference: nn.Conv2d's own forward with the kernel swapped in (padding modes included)."""
    ref = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode).to(kernel.dtype)
    with torch.no_grad():
        ref.weight.copy_(kernel)
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
    return ref(x)


def test_flora_conv_kernel_matches_numpy_tucker():
    ad = _flora_layer(_conv()).adapter
    G = ad.core.detach().numpy()
    Uo, Ui, Uh, Uw = (U.detach().numpy() for U in ad.factors)
    ref = 1.5 * np.einsum("pqcd,op,iq,ac,bd->oiab", G, Uo, Ui, Uh, Uw)
    np.testing.assert_allclose(ad.delta_weight().detach().numpy(), ref, **F64)


GEOMETRIES = [
    {},
    {"stride": 2, "padding": 1},
    {"padding": 2, "dilation": 2, "padding_mode": "reflect"},
    {"padding": "same", "padding_mode": "circular"},
    {"padding": (1, 0), "padding_mode": "replicate", "stride": (1, 2)},
    {"padding": 1, "groups": 2},  # grouped: dense-kernel fallback
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: ",".join(f"{k}={v}" for k, v in g.items()) or "default")
def test_adapted_conv2d_matches_dense_conv_and_merges_exactly(geometry):
    conv = _conv(**geometry)
    layer = _flora_layer(conv)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    K0 = conv.weight.detach().clone()
    want = _dense_conv(x, conv, K0 + layer.adapter.delta_weight().detach())
    y = layer(x)
    assert relerr(y, want) < 1e-12
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=0)
    layer.merge()
    assert layer.merged and relerr(layer(x), want) < 1e-12
    layer.unmerge()
    assert not layer.merged and relerr(layer.weight, K0) < 1e-14
    assert relerr(layer(x), want) < 1e-12


@settings(max_examples=12)
@given(
    st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(0, 2), st.integers(1, 2),
    st.sampled_from(["zeros", "reflect", "replicate", "circular"]), st.integers(1, 3),
)
def test_conv_path_equals_dense_kernel_property(kh, kw, stride, pad, dil, mode, r):
    conv = _conv(3, 5, (kh, kw), stride=stride, padding=pad, dilation=dil, padding_mode=mode)
    ranks = (min(r, 3), min(r, 5), min(r, kh), min(r, kw))
    ad = _flora_layer(conv, ranks=ranks).adapter
    x = torch.randn(1, 5, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
    ref = _dense_conv(x, conv, ad.delta_weight().detach()) - (conv.bias[None, :, None, None])
    assert relerr(ad.conv_forward(x, conv), ref) < 1e-12


def test_flora_conv_identity_count_grads_and_gradcheck():
    conv = _conv(padding=1)
    layer = _flora_layer(conv, randomize=False)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), **F64)
    ad = layer.adapter
    core, factors = 3 * 2 * 2 * 2, 4 * 3 + 6 * 2 + 3 * 2 + 2 * 2
    assert ad.num_trainable == FLoRAConv2d.param_count(4, 6, (3, 2), ranks=(3, 2, 2, 2)) == core + factors
    randomize_(ad, seed=4)
    layer(x).pow(2).sum().backward()
    assert all(p.grad is None for p in conv.parameters())
    assert all(float(p.grad.abs().sum()) > 0 for p in ad.parameters())
    small = _flora_layer(_conv(2, 3, (2, 2), padding=1), ranks=(2, 2, 1, 2))  # gradcheck is O(#params) passes
    names = [n for n, p in small.named_parameters() if p.requires_grad]
    x1 = torch.randn(1, 3, 3, 3, dtype=torch.float64)

    def f(*ps):
        return torch.func.functional_call(small, dict(zip(names, ps)), (x1,))

    params = tuple(p.detach().clone().requires_grad_(True) for p in small.adapter.parameters())
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_flora_conv_bfloat16_and_state_roundtrip():
    ref = _flora_layer(_conv(dtype=torch.float32, padding=1))
    low = _flora_layer(_conv(dtype=torch.float32, padding=1), randomize=False)
    low.load_state_dict(ref.state_dict())
    low = low.to(torch.bfloat16)
    x = torch.randn(2, 6, 6, 6)
    y = low(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and relerr(y.float(), ref(x)) < 10 * tol(torch.bfloat16)["rtol"]


def test_conv_bad_inputs():
    conv = _conv()
    with pytest.raises(ValueError, match="adapter is sized"):
        AdaptedConv2d(conv, FLoRAConv2d(4, 6, 3, ranks=2))
    with pytest.raises(TypeError, match=r"base must be an nn\.Conv2d"):
        AdaptedConv2d(nn.Linear(6, 4), FLoRAConv2d(4, 6, (3, 2), ranks=2))
    with pytest.raises(TypeError, match="kernel_size"):
        AdaptedConv2d(conv, adapters.create("lora", 4, 6, rank=2))
    layer = _flora_layer(conv)
    with pytest.raises(ValueError, match="d_in"):
        layer.adapter.conv_forward(torch.randn(1, 5, 8, 8, dtype=torch.float64), conv)
    with pytest.raises(ValueError, match="kernel_size"):
        FLoRAConv2d(4, 6, (3, 2, 1))
    with pytest.raises(ValueError, match=r"ranks\[2\] \(kh\)"):
        FLoRAConv2d(4, 6, (3, 2), ranks=(2, 2, 4, 1))
    with pytest.raises(ValueError, match="ranks"):
        FLoRA(4, 6, ranks=(1, 2, 3))
    with pytest.raises(ValueError, match="scale"):
        FLoRA(4, 6, ranks=2, scale=float("inf"))
    with pytest.raises(TypeError, match="conv must be"):
        ConvGeometry.of("conv")


# ----------------------------------------------------------------------------- tensor trains / TLoRA
@settings(max_examples=25)
@given(st.integers(1, 5000), st.integers(1, 4))
def test_balanced_factors_property(size, parts):
    f = balanced_factors(size, parts)
    assert len(f) == parts and int(np.prod(f)) == size and list(f) == sorted(f, reverse=True)


def test_tt_dense_and_apply_against_entrywise_definition():
    rng = np.random.default_rng(0)
    rows, cols, ranks = (3, 2, 2), (2, 3, 1), (1, 2, 3, 1)
    cores = [torch.from_numpy(rng.standard_normal((ranks[k], rows[k], cols[k], ranks[k + 1]))) for k in range(3)]
    M = np.zeros((12, 6))
    for i in itertools.product(*map(range, rows)):
        for j in itertools.product(*map(range, cols)):
            v = np.eye(1)
            for k in range(3):
                v = v @ cores[k][:, i[k], j[k], :].numpy()
            M[np.ravel_multi_index(i, rows), np.ravel_multi_index(j, cols)] = v.item()
    np.testing.assert_allclose(tt_dense(cores).numpy(), M, **F64)
    x = torch.from_numpy(rng.standard_normal((2, 3, 6)))
    np.testing.assert_allclose(tt_apply(cores, x).numpy(), x.numpy() @ M.T, **F64)


def test_tlora_merge_formula_unmerge_and_identity():
    base = make_base(12, 20)
    ad = adapters.create("tlora", 12, 20, transform_rank=2, residual_rank=2, seed=3).double()
    W0 = base.weight.detach()
    torch.testing.assert_close(ad.merged_weight(W0), W0, rtol=0, atol=0)  # T = I, R = 0 at init
    randomize_(ad, seed=6)
    T = np.eye(12) + tt_dense(list(ad.transform_cores)).detach().numpy()
    R = tt_dense(list(ad.residual_cores)).detach().numpy()
    merged = ad.merged_weight(W0)
    np.testing.assert_allclose(merged.numpy(), T @ W0.numpy() + R, **F64)
    np.testing.assert_allclose(ad.unmerged_weight(merged).numpy(), np.linalg.solve(T, merged.numpy() - R), **F64)
    assert relerr(ad.unmerged_weight(merged), W0) < 1e-12
    # layer output through the structure, also without a bias
    x = torch.randn(4, 20, dtype=torch.float64)
    out = ad.layer_output(x, x @ W0.T, W0, None)
    np.testing.assert_allclose(out.detach().numpy(), x.numpy() @ (T @ W0.numpy() + R).T, **F64)


def test_tlora_singular_transform_and_bad_inputs():
    ad = adapters.create("tlora", 6, 5, n_cores=1).double()  # one core: ΔT is a dense 6x6 matrix
    with torch.no_grad():
        ad.transform_cores[0].copy_(-torch.eye(6, dtype=torch.float64)[None, :, :, None])
    with pytest.raises(ValueError, match="singular"):
        ad.unmerged_weight(torch.randn(6, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_cores"):
        TLoRA(6, 5, n_cores=0)
    with pytest.raises(ValueError, match="transform_rank"):
        TLoRA(6, 5, transform_rank=0)
    with pytest.raises(TypeError, match="residual_rank"):
        TLoRA(6, 5, residual_rank=1.5)
    with pytest.raises(ValueError, match="base_weight"):
        TLoRA(6, 5).delta_weight()
