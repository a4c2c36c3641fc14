"""AdaLoRA and SoRA: the contract, PEFT's AdaLoRA as reference, pruning that really shrinks, the prox step.

Importing the module registers "adalora" and "sora" (until adapters/__init__ lists it).
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.adaptive_rank import (
    AdaLoRA,
    AdaLoRAImportance,
    SoRA,
    adalora_budget,
    soft_threshold,
    sora_lambda_schedule,
    sora_proximal_step,
)
from tests.adapters.contract import AdapterContract, randomize_
from tests.conftest import tol

F64 = tol(torch.float64)
PEFT_EPS = 1e-5  # PEFT's AdaLoRA divides by (ranknum + 1e-5); our alpha absorbs it exactly


class TestAdaLoRA(AdapterContract):
    name = "adalora"
    cfg = {"rank": 3, "alpha": 6.0}


class TestSoRA(AdapterContract):
    name = "sora"
    cfg = {"rank": 3, "alpha": 6.0}


# ----------------------------------------------------------------------------- PEFT reference
def _peft_model(n_in, hidden, n_out, r, alpha, **kw):
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).double()
    cfg = AdaLoraConfig(target_modules=["0", "2"], init_r=r, lora_alpha=alpha, lora_dropout=0.0, **kw)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off PEFT's init (λ = 0) so ΔW ≠ 0
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return pm


def _twin(peft_layer, r, alpha):
    """Our AdaptedLinear holding PEFT's exact numbers: P = lora_B, λ = lora_E, Q = lora_A."""
    base = copy.deepcopy(peft_layer.base_layer)
    ad = AdaLoRA(base.out_features, base.in_features, rank=r, alpha=alpha * r / (r + PEFT_EPS)).double()
    with torch.no_grad():
        ad.P.copy_(peft_layer.lora_B["default"])
        ad.lam.copy_(peft_layer.lora_E["default"][:, 0])
        ad.Q.copy_(peft_layer.lora_A["default"])
    return AdaptedLinear(base, ad)


def test_adalora_matches_peft_delta_and_output():
    pm = _peft_model(11, 7, 5, r=4, alpha=3, total_step=10)
    layers = [pm.base_model.model[0], pm.base_model.model[2]]
    twins = [_twin(lyr, 4, 3) for lyr in layers]
    for lyr, tw in zip(layers, twins):
        torch.testing.assert_close(tw.adapter.delta_weight(), lyr.get_delta_weight("default"), **F64)
    x = torch.randn(6, 11, dtype=torch.float64)
    ours = twins[1](torch.tanh(twins[0](x)))
    torch.testing.assert_close(ours, pm(x), **F64)


def test_adalora_budget_matches_peft():
    for kw in (dict(tinit=1, tfinal=2, total_step=10), dict(tinit=0, tfinal=0, total_step=7),
               dict(tinit=3, tfinal=4, total_step=40)):
        pm = _peft_model(11, 7, 5, r=5, alpha=2, target_r=2, **kw)
        ra = pm.base_model.rankallocator
        for step in range(kw["total_step"] + 3):
            ours = adalora_budget(step, initial_budget=ra.init_bgt, target_budget=ra.target_bgt,
                                  total_steps=kw["total_step"], t_init=kw["tinit"], t_final=kw["tfinal"])
            assert ours == ra.budget_schedule(step)[0], (kw, step)


def test_adalora_importance_and_masks_match_peft_training():
    """Train PEFT's AdaLoRA and our twins side by side; EMAs, scores, masks and ΔW agree every step."""
    from peft import get_peft_model_state_dict

    r, alpha, T, t_init, t_final = 4, 3, 10, 1, 2
    pm = _peft_model(11, 7, 5, r=r, alpha=alpha, target_r=2, tinit=t_init, tfinal=t_final, total_step=T,
                     deltaT=1, beta1=0.8, beta2=0.7)
    ra = pm.base_model.rankallocator
    layers = [pm.base_model.model[0], pm.base_model.model[2]]
    twins = [_twin(lyr, r, alpha) for lyr in layers]
    ads = [tw.adapter for tw in twins]
    imp = AdaLoRAImportance(ads, beta1=0.8, beta2=0.7)
    peft_params = [p for n, p in pm.named_parameters() if any(k in n for k in ("lora_A", "lora_B", "lora_E"))]
    ours_params = [p for a in ads for p in a.parameters()]
    g = torch.Generator().manual_seed(5)
    X, Y = torch.randn(16, 11, generator=g, dtype=torch.float64), torch.randn(16, 5, generator=g, dtype=torch.float64)
    n_masked_steps = 0
    for t in range(T - t_final + 1):
        for params, fwd in ((peft_params, pm), (ours_params, lambda x: twins[1](torch.tanh(twins[0](x))))):
            for p in params:
                p.grad = None
            (fwd(X) - Y).pow(2).mean().backward()
            with torch.no_grad():
                for p in params:
                    p -= 0.5 * p.grad
        pm.base_model.update_and_allocate(t)
        imp.update()
        for lyr, ib, ub in zip(("0", "2"), imp.ipt_bar, imp.unc_bar):
            for ours_name, peft_name in (("P", "lora_B"), ("lam", "lora_E"), ("Q", "lora_A")):
                key = f"base_model.model.{lyr}.{peft_name}.default"
                if key in ra.exp_avg_ipt:  # PEFT resets its state after the final allocation
                    ref_i, ref_u = ra.exp_avg_ipt[key], ra.exp_avg_unc[key]
                    torch.testing.assert_close(ib[ours_name], ref_i.reshape(ib[ours_name].shape), **F64)
                    torch.testing.assert_close(ub[ours_name], ref_u.reshape(ub[ours_name].shape), **F64)
        budget = adalora_budget(t, initial_budget=2 * r, target_budget=4, total_steps=T, t_init=t_init,
                                t_final=t_final)
        if t > t_init:  # PEFT masks from step t_init + 1 on (deltaT = 1), forced at T - t_final
            n_masked_steps += 1
            masks = imp.masks(budget)
            assert sum(int(mk.sum()) for mk in masks) == budget
            pattern = pm.peft_config["default"].rank_pattern
            for lyr, mk, ad in zip(("0", "2"), masks, ads):
                assert pattern[f"{lyr}.lora_E.default"] == mk.tolist()
                with torch.no_grad():
                    ad.lam[~mk] = 0.0
        for lyr, tw in zip(layers, twins):
            torch.testing.assert_close(tw.adapter.delta_weight(), lyr.get_delta_weight("default"), **F64)
    assert n_masked_steps >= 3
    # Cut for good: our pruned tensors equal PEFT's resized state dict for its final rank pattern.
    final = [tw.adapter.delta_weight().detach().clone() for tw in twins]
    kept = [ad.prune_to(mk) for ad, mk in zip(ads, masks)]
    sd = get_peft_model_state_dict(pm)
    for lyr, ad, dw, idx in zip(("0", "2"), ads, final, kept):
        assert ad.rank == len(idx) and ad.num_trainable == ad.rank * (ad.d_out + ad.d_in + 1)
        torch.testing.assert_close(ad.P, sd[f"base_model.model.{lyr}.lora_B"], **F64)
        torch.testing.assert_close(ad.lam, sd[f"base_model.model.{lyr}.lora_E"][:, 0], **F64)
        torch.testing.assert_close(ad.Q, sd[f"base_model.model.{lyr}.lora_A"], **F64)
        torch.testing.assert_close(ad.delta_weight(), dw, **F64)


def test_orthogonal_penalty_matches_numpy_and_peft():
    from peft import AdaLoraConfig, get_peft_model

    ad = randomize_(AdaLoRA(9, 13, rank=4, seed=2).double(), 3)
    P, Q = ad.P.detach().numpy(), ad.Q.detach().numpy()
    fp = np.linalg.norm(P.T @ P - np.eye(4))
    fq = np.linalg.norm(Q @ Q.T - np.eye(4))
    assert float(ad.orthogonal_penalty()) == pytest.approx(fp**2 + fq**2, rel=1e-12)
    assert float(ad.orthogonal_penalty(squared=False)) == pytest.approx(fp + fq, rel=1e-12)

    class WithLoss(nn.Module):  # PEFT adds its regularizer to ``outputs.loss``
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(13, 9).double()

        def forward(self, x):
            return types.SimpleNamespace(loss=self.lin(x).sum() * 0)

    pm = get_peft_model(WithLoss(), AdaLoraConfig(target_modules=["lin"], init_r=4, orth_reg_weight=1.0, total_step=5))
    with torch.no_grad():
        pm.base_model.model.lin.lora_B["default"].copy_(ad.P)
        pm.base_model.model.lin.lora_A["default"].copy_(ad.Q)
    peft_reg = float(pm.base_model(torch.zeros(1, 13, dtype=torch.float64)).loss)  # AdaLoraModel.forward
    assert peft_reg == pytest.approx(float(ad.orthogonal_penalty(squared=False)) / 2, rel=1e-12)  # PEFT averages
    ortho = AdaLoRA(9, 13, rank=4).double()
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(13, 4, dtype=torch.float64))
        ortho.Q.copy_(q.T)
        ortho.P.copy_(torch.linalg.qr(torch.randn(9, 4, dtype=torch.float64))[0])
    assert float(ortho.orthogonal_penalty()) < 1e-25


def test_adalora_prune_to_really_shrinks():
    m, n = 8, 11
    ad = randomize_(AdaLoRA(m, n, rank=5, alpha=10.0, seed=0).double(), 4)
    lam = ad.lam.detach().numpy().copy()
    P, Q, s = ad.P.detach().numpy().copy(), ad.Q.detach().numpy().copy(), ad.scale
    old_params = list(ad.parameters())  # keep them alive so identity is meaningful
    idx = ad.prune_to(2)  # int budget: the two largest |λ|
    expected = np.sort(np.argsort(-np.abs(lam))[:2])
    np.testing.assert_array_equal(idx.numpy(), expected)
    assert ad.rank == 2 and ad.num_trainable == AdaLoRA.param_count(m, n, rank=2) == 2 * (m + n + 1)
    assert not any(p is q for p in ad.parameters() for q in old_params)
    assert [tuple(p.shape) for p in old_params] == [(5, n), (5,), (m, 5)]
    lam_kept = np.where(np.isin(np.arange(5), expected), lam, 0.0)
    np.testing.assert_allclose(ad.delta_weight().detach().numpy(), s * (P * lam_kept) @ Q, **F64)
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(ad(x), x @ ad.delta_weight().T, **F64)
    rebuilt = AdaLoRA(m, n, **ad.config()).double()
    rebuilt.load_state_dict(ad.state_dict())
    torch.testing.assert_close(rebuilt.delta_weight(), ad.delta_weight(), **F64)
    mask = torch.tensor([True, False])
    ad.prune_to(mask)
    assert ad.rank == 1
    ad.prune_to(torch.tensor([False]))
    assert ad.rank == 0 and float(ad.delta_weight().abs().max()) == 0.0 and float(ad.orthogonal_penalty()) == 0.0
    with pytest.raises(ValueError, match="keep mask must have shape"):
        AdaLoRA(m, n, rank=3).prune_to(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="keep"):
        AdaLoRA(m, n, rank=3).prune_to(4)
    with pytest.raises(ValueError, match="scores must have shape"):
        AdaLoRA(m, n, rank=3).prune_to(1, scores=torch.ones(2))


def test_importance_allocate_shrinks_adapters_and_state():
    ads = [randomize_(AdaLoRA(7, 6, rank=4, seed=i).double(), i) for i in range(2)]
    imp = AdaLoRAImportance(ads)
    with pytest.raises(ValueError, match="update"):
        imp.triplet_scores()
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (ads[0](x).pow(2).sum() + ads[1](x).sin().sum()).backward()
    imp.update()
    scores = torch.cat(imp.triplet_scores())
    keep_ref = torch.argsort(scores, descending=True)[:3]
    kept = imp.allocate(3)
    assert sum(a.rank for a in ads) == 3
    flat_kept = torch.cat([kept[0], kept[1] + 4])
    assert set(flat_kept.tolist()) == set(keep_ref.tolist())
    for a in ads:
        a.zero_grad()
    (ads[0](x).pow(2).sum() + ads[1](x).sin().sum()).backward()
    imp.update()  # state was sliced with the adapters, so shapes still agree
    assert [s.shape[0] for s in imp.triplet_scores()] == [a.rank for a in ads]
    with pytest.raises(ValueError, match="budget"):
        imp.masks(-1)
    kept_some = next(a for a in ads if a.rank > 0)
    kept_some.prune_to(kept_some.rank - 1)  # outside allocate(): the state no longer matches
    with pytest.raises(ValueError, match="changed shape"):
        imp.update()


def test_adalora_bad_input():
    with pytest.raises(ValueError, match="rank"):
        AdaLoRA(5, 7, rank=6)
    with pytest.raises(TypeError, match="AdaLoRA"):
        AdaLoRAImportance([SoRA(4, 4, 2)])
    with pytest.raises(ValueError, match="beta1"):
        AdaLoRAImportance([AdaLoRA(4, 4, 2)], beta1=1.0)
    with pytest.raises(ValueError, match="grad"):
        AdaLoRAImportance([AdaLoRA(4, 4, 2)]).update()
    with pytest.raises(ValueError, match="target_budget"):
        adalora_budget(0, initial_budget=4, target_budget=5, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        adalora_budget(0, initial_budget=4, target_budget=2, total_steps=5, t_init=3, t_final=2)
    with pytest.raises(ValueError, match="step"):
        adalora_budget(-1, initial_budget=4, target_budget=2, total_steps=5)


# ----------------------------------------------------------------------------- SoRA
@settings(max_examples=25)
@given(
    g=st.lists(st.floats(-3, 3), min_size=1, max_size=8),
    lr=st.floats(1e-3, 1.0),
    lam=st.floats(0.0, 2.0),
    seed=st.integers(0, 99),
)
def test_proximal_step_is_the_l1_prox(g, lr, lam, seed):
    """z = T_{ηλ}(v) satisfies the optimality condition of argmin ½‖z − v‖² + ηλ‖z‖₁ (and the authors' 3-case rule)."""
    g = torch.tensor(g, dtype=torch.float64)
    grad = torch.from_numpy(np.random.default_rng(seed).standard_normal(g.shape[0]))
    z = sora_proximal_step(g, grad, lr, lam).numpy()
    v, tau = (g - lr * grad).numpy(), lr * lam
    nz = z != 0
    np.testing.assert_allclose(z[nz] - v[nz] + tau * np.sign(z[nz]), 0.0, atol=1e-12)
    assert np.all(np.abs(v[~nz]) <= tau + 1e-12)
    ref = v.copy()  # sparse_optimizer_multiply_lr.py: three in-place cases
    ref[v > tau] -= tau
    ref[v < -tau] += tau
    ref[np.abs(v) < tau] = 0.0
    np.testing.assert_allclose(z, ref, atol=1e-12)


def test_sora_train_prune_and_convert():
    """Proximal steps with a large λ zero some gates; cutting them keeps ΔW and shrinks the rank."""
    m, n, r = 10, 12, 6
    ad = SoRA(m, n, rank=r, alpha=6.0, seed=0).double()
    with torch.no_grad():
        ad.B.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        ad.gate.copy_(torch.tensor([2.0, -0.05, 1.0, 0.02, -1.5, 0.01], dtype=torch.float64))
    x, y = torch.randn(20, n, dtype=torch.float64), torch.randn(20, m, dtype=torch.float64)
    for _ in range(3):
        ad.zero_grad()
        (ad(x) - y).pow(2).mean().backward()
        with torch.no_grad():
            ad.gate.copy_(sora_proximal_step(ad.gate, ad.gate.grad, lr=0.1, lam=0.5))
    zero = (ad.gate == 0).sum().item()
    assert 1 <= zero < r
    dw = ad.delta_weight().detach().clone()
    idx = ad.prune_zero_gates()
    assert ad.rank == r - zero == len(idx) and ad.num_trainable == (r - zero) * (m + n + 1)
    torch.testing.assert_close(ad.delta_weight(), dw, **F64)
    lora = ad.to_lora()
    assert lora.rank == ad.rank and lora.scale == pytest.approx(ad.scale)
    torch.testing.assert_close(lora.delta_weight(), dw, **F64)
    torch.testing.assert_close(lora(x), ad(x), **F64)
    rebuilt = SoRA(m, n, **ad.config()).double()
    rebuilt.load_state_dict(ad.state_dict())
    torch.testing.assert_close(rebuilt.delta_weight(), dw, **F64)


def test_sora_init_and_gate_options():
    ad = SoRA(6, 5, rank=3, seed=4)
    assert float(ad.B.abs().max()) == 0.0 and float(ad.gate.abs().min()) > 0  # identity through B = 0
    ones = SoRA(6, 5, rank=3, gate_init="ones", seed=4)
    torch.testing.assert_close(ones.gate.detach(), torch.ones(3))
    torch.testing.assert_close(ones.A, ad.A)
    with pytest.raises(ValueError, match="gate_init"):
        SoRA(6, 5, rank=3, gate_init="zeros")
    with pytest.raises(ValueError, match="rank"):
        SoRA(6, 5, rank=7)
    with torch.no_grad():
        ad.gate.zero_()
    ad.prune_zero_gates()
    with pytest.raises(ValueError, match="rank"):
        ad.to_lora()


def test_soft_threshold_and_schedule_bad_input():
    with pytest.raises(ValueError, match="tau"):
        soft_threshold(torch.ones(3), -1.0)
    with pytest.raises(ValueError, match="NaN"):
        soft_threshold(torch.tensor([1.0, float("nan")]), 0.1)
    with pytest.raises(ValueError, match="lr"):
        sora_proximal_step(torch.ones(3), torch.ones(3), 0.0, 0.1)
    with pytest.raises(ValueError, match="lam"):
        sora_proximal_step(torch.ones(3), torch.ones(3), 0.1, -0.1)
    with pytest.raises(ValueError, match="grad"):
        sora_proximal_step(torch.ones(3), torch.ones(4), 0.1, 0.1)
    with pytest.raises(ValueError, match="lam0"):
        sora_lambda_schedule(0.0, 1.0, 4, kind="exp_linear")
    with pytest.raises(ValueError, match="kind"):
        sora_lambda_schedule(0.1, 1.0, 4, kind="cosine")
    with pytest.raises(ValueError, match="num"):
        sora_lambda_schedule(0.1, 1.0, 0)


@pytest.mark.parametrize("kind", ["linear", "exp_linear", "log_linear"])
def test_sora_lambda_schedule(kind):
    lams = sora_lambda_schedule(1e-3, 0.5, 6, kind=kind)
    assert len(lams) == 6 and lams[0] == 1e-3 and lams[-1] == 0.5
    assert all(a < b for a, b in zip(lams, lams[1:]))
    steps = {"linear": np.diff(lams), "exp_linear": np.diff(np.log(lams)), "log_linear": np.diff(np.exp(lams))}[kind]
    np.testing.assert_allclose(steps, steps[0], rtol=1e-9)  # evenly spaced in the named variable
    assert sora_lambda_schedule(0.2, 0.7, 1) == [0.2]
