"""FourierFT against PEFT's implementation (``peft.FourierFTConfig``) on a tiny two-layer model.

PEFT builds ΔW = scaling · Re(ifft2(dense spectrum)) in float32 in every forward; ours applies
the same spectrum through rFFT / gather / irFFT.  Same seed -> same frequency locations; we copy
PEFT's spectrum values and compare ΔW, outputs, merged weights and spectrum gradients.
Tolerance: ``tol(float32)`` -- PEFT computes in float32 and both paths are short FFT chains.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear
from tests.adapters.contract import relerr
from tests.conftest import tol

peft = pytest.importorskip("peft")

TOL32 = tol(torch.float32)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(20, 12)  # non-square, non-power-of-two
        self.v = nn.Linear(12, 17)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(torch.tanh(self.q(x)))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    base = Tiny()
    ours = copy.deepcopy(base)
    cfg = peft.FourierFTConfig(n_frequency=30, scaling=150.0, random_loc_seed=11, target_modules=["q", "v"])
    pm = peft.get_peft_model(base, cfg)
    layers = {}
    for name in ("q", "v"):
        lin = getattr(ours, name)
        ad = adapters.create("fourierft", lin.out_features, lin.in_features,
                             n_frequency=30, scaling=150.0, random_loc_seed=11)
        p_layer = getattr(pm.base_model.model, name)
        with torch.no_grad():
            ad.spectrum.copy_(p_layer.fourierft_spectrum["default"])
        wrapped = AdaptedLinear(lin, ad)
        setattr(ours, name, wrapped)
        layers[name] = (p_layer, wrapped)
    return pm, ours, layers


def test_same_locations(pair):
    _, _, layers = pair
    for p_layer, wrapped in layers.values():
        assert torch.equal(p_layer.indices["default"].T.cpu(), wrapped.adapter.locations)


def test_same_delta_weight(pair):
    _, _, layers = pair
    for p_layer, wrapped in layers.values():
        dw_peft = p_layer.get_delta_weight("default").detach()
        dw_ours = wrapped.adapter.delta_weight().detach()
        assert float(dw_peft.norm()) > 0
        torch.testing.assert_close(dw_ours, dw_peft, **TOL32)


def test_same_outputs_and_gradients(pair):
    pm, ours, layers = pair
    x = torch.randn(4, 7, 20, generator=torch.Generator().manual_seed(3))
    y_peft = pm(x)
    y_ours = ours(x)
    assert relerr(y_ours.detach(), y_peft.detach()) < TOL32["rtol"]
    w = torch.randn(y_ours.shape, generator=torch.Generator().manual_seed(4))
    params_peft = [p_layer.fourierft_spectrum["default"] for p_layer, _ in layers.values()]
    params_ours = [wrapped.adapter.spectrum for _, wrapped in layers.values()]
    g_peft = torch.autograd.grad((y_peft * w).sum(), params_peft)
    g_ours = torch.autograd.grad((y_ours * w).sum(), params_ours)
    for a, b in zip(g_ours, g_peft):
        assert relerr(a, b) < TOL32["rtol"]


def test_same_merged_weights(pair):
    pm, ours, _ = pair
    merged_peft = copy.deepcopy(pm).merge_and_unload()
    ours_m = copy.deepcopy(ours)
    for name in ("q", "v"):
        getattr(ours_m, name).merge()
        w_ours = getattr(ours_m, name).weight
        w_peft = getattr(merged_peft, name).weight
        torch.testing.assert_close(w_ours, w_peft, **TOL32)
