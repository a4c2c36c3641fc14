"""DoRA against PEFT's implementation (``LoraConfig(use_dora=True)``) on a tiny float64 model.

PEFT forms ``lora_B @ lora_A`` densely and takes ``torch.linalg.norm(W0 + s·BA, dim=1)``, detached
in backward; ours computes the same row norm from the factors (never forming BA).  We copy
PEFT's lora_A, lora_B and magnitude (after moving them off their init) into ours and compare the
magnitude init, outputs, gradients (PEFT detaches the norm: our default), ΔW and merged weights.
Tolerance: ``tol(float64)`` -- both sides run in float64 and differ only in summation order.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.multiplicative import DoRA
from tests.conftest import tol

peft = pytest.importorskip("peft")

TOL64 = tol(torch.float64)
RANK, ALPHA = 4, 8.0


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(20, 12)  # non-square
        self.v = nn.Linear(12, 17)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(torch.tanh(self.q(x)))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    base = Tiny().double()
    ours = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, use_dora=True, target_modules=["q", "v"]))
    g = torch.Generator().manual_seed(1)
    layers, inits = {}, {}
    for name in ("q", "v"):
        p_layer = getattr(pm.base_model.model, name)
        lin = getattr(ours, name)
        ad, _ = DoRA.from_weight(lin.weight.detach(), rank=RANK, alpha=ALPHA)
        init_mag = p_layer.lora_magnitude_vector["default"].weight.detach().clone()
        with torch.no_grad():  # move PEFT's tensors off their init, then copy them into ours
            for t in (p_layer.lora_A["default"].weight, p_layer.lora_B["default"].weight):
                t.add_(0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype))
            p_layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.2 * torch.rand(lin.out_features, generator=g))
            ad.A.copy_(p_layer.lora_A["default"].weight)
            ad.B.copy_(p_layer.lora_B["default"].weight)
        layers[name] = (p_layer, ad)
        inits[name] = init_mag
    for name, (p_layer, ad) in layers.items():
        with torch.no_grad():
            ad.magnitude.copy_(p_layer.lora_magnitude_vector["default"].weight)
        setattr(ours, name, AdaptedLinear(getattr(ours, name), ad))
    return pm, ours, layers, inits


def test_magnitude_init_matches_peft(pair):
    _, ours, _, inits = pair
    for name, peft_init in inits.items():
        W0 = getattr(ours, name).weight.detach()
        fresh, _ = DoRA.from_weight(W0, rank=RANK, alpha=ALPHA)
        torch.testing.assert_close(fresh.magnitude.detach(), peft_init, **TOL64)


def test_outputs_and_gradients_match_peft(pair):
    pm, ours, layers, _ = pair
    x = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y_peft, y_ours = pm(x), ours(x)
    torch.testing.assert_close(y_ours, y_peft, **TOL64)
    w = torch.randn(y_ours.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (y_peft * w).sum().backward()
    (y_ours * w).sum().backward()
    for p_layer, ad in layers.values():
        pairs = (
            (ad.A, p_layer.lora_A["default"].weight),
            (ad.B, p_layer.lora_B["default"].weight),
            (ad.magnitude, p_layer.lora_magnitude_vector["default"].weight),
        )
        for ours_p, peft_p in pairs:
            assert float(peft_p.grad.abs().max()) > 0
            torch.testing.assert_close(ours_p.grad, peft_p.grad, **TOL64)


def test_merged_weights_match_peft(pair):
    pm, ours, layers, _ = pair
    merged_peft = copy.deepcopy(pm).merge_and_unload()
    for name, (_, ad) in layers.items():
        W0 = getattr(ours, name).weight.detach()
        W_peft = getattr(merged_peft, name).weight.detach()
        torch.testing.assert_close(ad.merged_weight(W0), W_peft, **TOL64)
        torch.testing.assert_close(ad.delta_weight(W0).detach(), W_peft - W0, **TOL64)
        assert float((W_peft - W0).norm()) > 1e-3  # the adapters really moved the weights
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = ours(x)
    for name in ("q", "v"):
        getattr(ours, name).merge()
    torch.testing.assert_close(ours(x), merged_peft(x), **TOL64)
    torch.testing.assert_close(ours(x), y, **TOL64)
    for name in ("q", "v"):
        getattr(ours, name).unmerge()
