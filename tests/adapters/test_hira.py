"""HiRA (``adapters.hira.HiRA``, registered ``"hira"``): the public adapter checks, a cross-check against PEFT
0.21.2's HiRA layer (``peft.HiraConfig``), and its exact relation to HUT (rank r + 1, first component frozen).

PEFT computes ``base(x) + F.linear(x, W0 * (B @ A))`` with a dense Hadamard product; ours goes through r products
with W0 (structured) or the same dense product.  Both run in float64 and differ only in summation order, so the
tolerance is float64's 1e-10 (tests/conftest.py).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.hira import HiRA
from lowrank_theory.adapters.multiplicative import HUT
from lowrank_theory.testing import parametrize_with_checks, registered_factory
from tests.conftest import tol

peft = pytest.importorskip("peft")

TOL = tol("float64")

CONFIGS = {  # auto picks the structured path at rank 1 and the dense one at rank 3 for the checks' batches
    "hira-r1": registered_factory("hira", rank=1),
    "hira-r3": registered_factory("hira", rank=3, seed=5),
}


@parametrize_with_checks(CONFIGS)
def test_hira_passes_the_adapter_checks(check):
    check()


def _perturbed(ad: HiRA, seed: int) -> HiRA:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ad.B.copy_(0.5 * torch.randn(ad.B.shape, generator=g, dtype=ad.B.dtype))
        ad.A.add_(0.2 * torch.randn(ad.A.shape, generator=g, dtype=ad.A.dtype))
    return ad


@pytest.mark.parametrize("path", ["structured", "dense", "auto"])
def test_forward_delta_and_merge_match_the_dense_formula(path):
    torch.manual_seed(0)
    base = nn.Linear(9, 7).double()
    ad = _perturbed(HiRA(7, 9, rank=3, path=path).double(), 1)
    layer = AdaptedLinear(base, ad)
    x = torch.randn(5, 9, dtype=torch.float64)
    W0, b0, B, A = (t.detach().numpy() for t in (base.weight, base.bias, ad.B, ad.A))
    W = W0 + W0 * (B @ A)
    np.testing.assert_allclose(layer(x).detach().numpy(), x.numpy() @ W.T + b0, **TOL)
    np.testing.assert_allclose(ad.delta_weight(base.weight).detach().numpy(), W0 * (B @ A), **TOL)
    layer.merge()
    np.testing.assert_allclose(base.weight.detach().numpy(), W, **TOL)
    layer.unmerge()
    np.testing.assert_allclose(base.weight.detach().numpy(), W0, **TOL)


def test_init_is_peft_init_weights_true():
    """B = 0 (ΔW = 0) and A ~ U(-1/√n, 1/√n), PEFT's kaiming_uniform_(a=√5): compare the bound and spread with a
    PEFT layer's A of the same shape (1800 entries: the empirical max is within 1 % of the bound)."""
    ad = HiRA(30, 60, rank=30, seed=3)
    assert torch.count_nonzero(ad.B) == 0
    lin = nn.Linear(60, 30)
    pm = peft.get_peft_model(nn.Sequential(lin), peft.HiraConfig(r=30, target_modules=["0"]))
    pA = pm.base_model.model[0].hira_A["default"].detach()
    bound = 1 / np.sqrt(60)
    for A in (ad.A.detach(), pA):
        assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
    assert torch.count_nonzero(pm.base_model.model[0].hira_B["default"]) == 0
    assert HiRA.param_count(30, 60, rank=30) == ad.num_trainable == pA.numel() + 30 * 30


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(20, 12)
        self.v = nn.Linear(12, 17)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(torch.tanh(self.q(x)))


@pytest.mark.parametrize("path", ["structured", "dense"])
def test_matches_peft_hira_outputs_gradients_and_merge(path):
    torch.manual_seed(0)
    base = Tiny().double()
    ours = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.HiraConfig(r=3, target_modules=["q", "v"], hira_dropout=0.0))
    g = torch.Generator().manual_seed(2)
    for name in ("q", "v"):
        p_layer = getattr(pm.base_model.model, name)
        lin = getattr(ours, name)
        ad = HiRA(lin.out_features, lin.in_features, rank=3, path=path).double()
        with torch.no_grad():  # move PEFT's tensors off their init, copy them into ours
            for t in (p_layer.hira_A["default"], p_layer.hira_B["default"]):
                t.add_(0.4 * torch.randn(t.shape, generator=g, dtype=t.dtype))
            ad.A.copy_(p_layer.hira_A["default"])
            ad.B.copy_(p_layer.hira_B["default"])
        setattr(ours, name, AdaptedLinear(lin, ad))
    x = torch.randn(6, 20, dtype=torch.float64)
    y_p, y_o = pm(x), ours(x)
    np.testing.assert_allclose(y_o.detach().numpy(), y_p.detach().numpy(), **TOL)
    y_p.square().sum().backward()
    y_o.square().sum().backward()
    for name in ("q", "v"):
        p_layer, o_layer = getattr(pm.base_model.model, name), getattr(ours, name)
        np.testing.assert_allclose(o_layer.adapter.A.grad.numpy(), p_layer.hira_A["default"].grad.numpy(), **TOL)
        np.testing.assert_allclose(o_layer.adapter.B.grad.numpy(), p_layer.hira_B["default"].grad.numpy(), **TOL)
        np.testing.assert_allclose(o_layer.adapter.delta_weight(o_layer.weight).detach().numpy(),
                                   (p_layer.get_base_layer().weight * p_layer.get_delta_weight("default")).detach()
                                   .numpy(), **TOL)
    merged_p = pm.merge_and_unload()
    for name in ("q", "v"):
        o_layer = getattr(ours, name)
        o_layer.merge()
        np.testing.assert_allclose(o_layer.weight.detach().numpy(), getattr(merged_p, name).weight.detach().numpy(),
                                   **TOL)


def test_hira_is_hut_of_rank_plus_one_and_not_hut_of_the_same_rank():
    torch.manual_seed(1)
    base = nn.Linear(8, 6).double()
    W0 = base.weight.detach()
    hira = _perturbed(HiRA(6, 8, rank=2).double(), 4)
    hut = HUT(6, 8, rank=3).double()
    with torch.no_grad():  # HiRA rank r -> HUT rank r + 1: B = [1, B'], A = [1; A']
        hut.B.copy_(torch.cat([torch.ones(6, 1, dtype=torch.float64), hira.B], dim=1))
        hut.A.copy_(torch.cat([torch.ones(1, 8, dtype=torch.float64), hira.A], dim=0))
    np.testing.assert_allclose(hut.merged_weight(W0).numpy(), hira.merged_weight(W0).numpy(), **TOL)
    # HUT rank r -> HiRA rank r + 1: B = [B_hut, -1], A = [A_hut; 1]
    hut2 = HUT(6, 8, rank=2).double()
    with torch.no_grad():
        hut2.B.normal_()
        hut2.A.normal_()
    hira3 = HiRA(6, 8, rank=3).double()
    with torch.no_grad():
        hira3.B.copy_(torch.cat([hut2.B, -torch.ones(6, 1, dtype=torch.float64)], dim=1))
        hira3.A.copy_(torch.cat([hut2.A, torch.ones(1, 8, dtype=torch.float64)], dim=0))
    np.testing.assert_allclose(hira3.merged_weight(W0).numpy(), hut2.merged_weight(W0).numpy(), **TOL)
    # negative control: the same factors in a HUT of the same rank (what an alias hira -> hut would do) differ
    same = HUT(6, 8, rank=2).double()
    with torch.no_grad():
        same.B.copy_(hira.B)
        same.A.copy_(hira.A)
    diff = (same.merged_weight(W0) - hira.merged_weight(W0)).abs().max().item()
    np.testing.assert_allclose(diff, W0.abs().max().item(), rtol=1e-12)  # off by exactly W0: the frozen 1 term
    assert adapters.get("hira") is HiRA and adapters.get("hut") is HUT


def test_unmerge_refuses_a_zero_factor_and_bad_rank():
    torch.manual_seed(2)
    base = nn.Linear(4, 3).double()
    ad = HiRA(3, 4, rank=1).double()
    layer = AdaptedLinear(base, ad)
    with torch.no_grad():
        ad.B.fill_(-1.0)
        ad.A.fill_(1.0)  # 1 + BA = 0 everywhere: W' = 0, W0 not recoverable
    layer.merge()
    with pytest.raises(ValueError, match="cannot unmerge"):
        layer.unmerge()
    with pytest.raises(ValueError, match="rank"):
        HiRA(3, 4, rank=5)
    with pytest.raises(ValueError, match="path"):
        HiRA(3, 4, rank=1, path="fast")
    with pytest.raises(ValueError, match="base_weight"):
        HiRA(3, 4, rank=1)(torch.zeros(2, 4))
