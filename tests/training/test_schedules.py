"""Rank schedules change the tensors for real, and the optimizer follows them.

References are written here independently of the library: AdaLoRA's cubic budget (Eq. 12),
soft thresholding, IncreLoRA's module score from a dense autograd gradient, Eckart--Young by
NumPy's SVD, and for the optimizer a second AdamW that never saw the rank change.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowrank_theory.adapters.adaptive_rank import AdaLoRA
from lowrank_theory.training import adapted_layers, inject, load_adapters, save_adapters
from lowrank_theory.training.schedules import (
    AdaLoRASchedule,
    IncreLoRASchedule,
    LoRASqueezeSchedule,
    ParamRemap,
    SoRASchedule,
    grow_adalora,
    make_schedule,
    remap_optimizer,
    squeeze_model,
)
from tests.conftest import tol
from tests.training import assert_unchanged, snapshot

TOL = tol(torch.float64)
X = torch.randn(40, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
Y = torch.randn(40, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)


def tiny(method: str, seed: int = 0, **cfg) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8)).double()
    inject(m, method, targets=["0", "2"], layer_seeds=True, seed=seed, **cfg)
    return m


def loss_of(m: nn.Module) -> torch.Tensor:
    return ((m(X) - Y) ** 2).mean()


def trainable_ids(m: nn.Module) -> set[int]:
    return {id(p) for p in m.parameters() if p.requires_grad}


def opt_ids(opt: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in opt.param_groups for p in g["params"]}


def run(m, sched, steps, opt=None, lr=1e-2, on_step=None):
    opt = opt or torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    for t in range(1, steps + 1):
        loss = loss_of(m)
        reg = sched.extra_loss()
        (loss if reg is None else loss + reg).backward()
        sched.update()
        opt.step()
        if on_step is not None:
            on_step(t, "before")
        sched.step(t, opt)
        if on_step is not None:
            on_step(t, "after")
        opt.zero_grad()
    return opt


# ============================================================================ remap_optimizer
@given(
    rows=st.integers(2, 6), cols=st.integers(2, 6), dim=st.integers(0, 1), seed=st.integers(0, 10_000),
    grow=st.integers(0, 2),
)
def test_remap_matches_an_optimizer_that_never_saw_the_change(rows, cols, dim, seed, grow):
    g = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    ref = nn.Parameter(p.detach().clone())
    opt, opt_ref = torch.optim.AdamW([p], lr=0.1), torch.optim.AdamW([ref], lr=0.1)
    for _ in range(2):
        grad = torch.randn(rows, cols, generator=g, dtype=torch.float64)
        p.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        opt_ref.step()
    n = p.shape[dim]
    keep = torch.sort(torch.randperm(n, generator=g)[: max(1, n - 1)]).values
    index = torch.cat([keep, torch.full((grow,), -1)])
    fresh = torch.zeros([len(index) - len(keep) if d == dim else p.shape[d] for d in range(2)], dtype=torch.float64)
    new = nn.Parameter(torch.cat([p.detach().index_select(dim, keep), fresh], dim=dim))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert remap_optimizer(opt, [ParamRemap(p, new, dim, index)]) is opt
    assert opt_ids(opt) == {id(new)} and p not in opt.state
    st_new = opt.state[new]
    # kept coordinates carry the old moments, fresh ones start at zero, the step count is kept
    for k in ("exp_avg", "exp_avg_sq"):
        old = opt_ref.state[ref][k].index_select(dim, keep)
        assert torch.equal(st_new[k].narrow(dim, 0, len(keep)), old)
        assert torch.count_nonzero(st_new[k].narrow(dim, len(keep), grow)) == 0
    assert float(st_new["step"]) == float(opt_ref.state[ref]["step"])
    # one more step: on the kept coordinates identical to the optimizer that never pruned
    grad = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    ref.grad = grad
    new.grad = torch.cat([grad.index_select(dim, keep), torch.zeros_like(fresh)], dim=dim)
    opt_ref.step()
    opt.step()
    sched.step()
    torch.testing.assert_close(new.detach().narrow(dim, 0, len(keep)), ref.detach().index_select(dim, keep),
                               rtol=0, atol=0)


def test_remap_drops_unrelated_state_removes_and_keeps_others():
    a, b, c = (nn.Parameter(torch.randn(3, 2, dtype=torch.float64)) for _ in range(3))
    opt = torch.optim.AdamW([a, b, c], lr=0.1)
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    opt.step()
    opt.state[c]["weight_space"] = torch.zeros(7, 7)  # state of another shape (like LoRA-Pro's): dropped
    a2, c2 = nn.Parameter(torch.randn(4, 2, dtype=torch.float64)), nn.Parameter(torch.randn(2, 2, dtype=torch.float64))
    remap_optimizer(opt, [ParamRemap(a, a2), ParamRemap(b, None), ParamRemap(c, c2, 0, torch.tensor([0, 2]))])
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(a2), id(c2)]
    assert a2 not in opt.state and c2 not in opt.state and len(opt.state) == 0
    with pytest.raises(TypeError, match="optimizer"):
        remap_optimizer(object(), [])


# ============================================================================ AdaLoRA
def budget_eq12(t, b0, bT, T, ti, tf):
    if t <= ti:
        return b0
    if t > T - tf:
        return bT
    return int(bT + (b0 - bT) * (1 - (t - ti) / (T - ti - tf)) ** 3)


def test_adalora_prunes_to_the_cubic_budget_and_shrinks_the_tensors():
    m = tiny("adalora", rank=6)
    sched = AdaLoRASchedule(m, total_steps=12, target_rank=2, t_init=2, t_final=3, delta_t=2, orth_reg=0.05)
    seen = []

    def check(t, when):
        layers = adapted_layers(m)
        if when == "before":
            check.prev = {n: tuple(getattr(l.adapter, k).detach().clone() for k in ("P", "lam", "Q"))
                          for n, l in layers.items()}
            return
        total = sum(l.adapter.rank for l in layers.values())
        due = t > 2 and (t % 2 == 0 or t > 12 - 3)
        if due:
            check.expected = min(check.expected, budget_eq12(t, 12, 4, 12, 2, 3))
        assert total == check.expected
        seen.append(total)
        for n, l in layers.items():
            ad = l.adapter
            assert ad.P.shape == (ad.d_out, ad.rank) and ad.lam.shape == (ad.rank,) and ad.Q.shape == (ad.rank, ad.d_in)
            assert ad.num_trainable == AdaLoRA.param_count(ad.d_out, ad.d_in, rank=ad.rank)
            # the kept triplets are columns of the old ones: ΔW = old ΔW with the dropped λ set to 0
            P, lam, Q = (v.numpy() for v in check.prev[n])
            kept = [int(np.flatnonzero(np.all(np.isclose(P, ad.P.detach().numpy()[:, [j]]), axis=0))[0])
                    for j in range(ad.rank)]
            ref = ad.scale * (P[:, kept] * lam[kept]) @ Q[kept]
            np.testing.assert_allclose(ad.delta_weight().detach().numpy(), ref, **TOL)
        assert opt_ids(check.opt) == trainable_ids(m)

    check.opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    check.expected = 12
    run(m, sched, 12, opt=check.opt, on_step=check)
    assert seen[-1] == 4 and sum(sched.ranks().values()) == 4
    assert sched.num_trainable() == sum(AdaLoRA.param_count(10, 12, rank=r) if n == "0" else
                                        AdaLoRA.param_count(8, 10, rank=r) for n, r in sched.ranks().items())
    assert [c.step for c in sched.history] == sorted(c.step for c in sched.history)
    reg = sched.extra_loss()
    ref = 0.0
    for l in adapted_layers(m).values():
        P, Q, eye = l.adapter.P.detach().numpy(), l.adapter.Q.detach().numpy(), np.eye(l.adapter.rank)
        ref += np.linalg.norm(P.T @ P - eye) ** 2 + np.linalg.norm(Q @ Q.T - eye) ** 2
    assert math.isclose(float(reg.detach()), 0.05 * ref, rel_tol=1e-10)


def test_adalora_checkpoint_after_prune_needs_resize(tmp_path):
    m = tiny("adalora", rank=6)
    run(m, AdaLoRASchedule(m, total_steps=6, target_budget=5, delta_t=1), 6)
    save_adapters(m, tmp_path)
    fresh = tiny("adalora", rank=6)
    with pytest.raises(ValueError, match="config mismatch"):
        load_adapters(fresh, tmp_path)
    load_adapters(fresh, tmp_path, resize=True)
    torch.testing.assert_close(fresh(X), m(X), **TOL)
    assert {n: l.adapter.rank for n, l in adapted_layers(fresh).items()} == {
        n: l.adapter.rank for n, l in adapted_layers(m).items()}
    # a file whose per-layer config cannot be rebuilt is refused before anything changes
    cfg_path = tmp_path / "adapter_config.json"
    good = cfg_path.read_text()
    bad = json.loads(good)
    bad["layers"]["2"]["config"]["rank"] = 999
    cfg_path.write_text(json.dumps(bad))
    other = tiny("adalora", rank=6)
    snap = snapshot(other)
    with pytest.raises(ValueError, match="cannot rebuild"):
        load_adapters(other, tmp_path, resize=True)
    assert_unchanged(other, snap)
    cfg_path.write_text(good)
    torch.manual_seed(0)  # the same base weights as tiny()
    base = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8)).double()
    load_adapters(base, tmp_path, inject=True, resize=True)
    torch.testing.assert_close(base(X), m(X), **TOL)


# ============================================================================ SoRA
def test_sora_proximal_step_leaves_the_optimizer_out_and_prunes_zero_gates():
    m = tiny("sora", rank=5)
    lr, lam = 0.05, 3.0
    sched = SoRASchedule(m, total_steps=4, lr=lr, lam0=lam, lam_max=lam, num_stages=2, gate_step="sgd")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    before_total = sched.num_trainable()
    for t in range(1, 5):
        loss_of(m).backward()
        gates = {n: (l.adapter.gate.detach().clone(), l.adapter.gate.grad.detach().clone())
                 for n, l in adapted_layers(m).items()}
        sched.update()
        opt.step()  # must not move the gates (their grad was taken away)
        for n, l in adapted_layers(m).items():
            assert torch.equal(l.adapter.gate.detach(), gates[n][0])
        pre = {n: (l.adapter.B.detach().clone(), l.adapter.A.detach().clone()) for n, l in adapted_layers(m).items()}
        sched.step(t, opt)
        opt.zero_grad()
        for n, l in adapted_layers(m).items():
            g, grad = (v.numpy() for v in gates[n])
            z = g - lr * grad
            g_new = np.sign(z) * np.maximum(np.abs(z) - lr * lam, 0.0)  # soft threshold, written here
            keep = np.flatnonzero(g_new) if t % 2 == 0 else np.arange(g_new.size)
            B, A = (v.numpy() for v in pre[n])
            ref = l.adapter.scale * (B[:, keep] * g_new[keep]) @ A[keep]
            np.testing.assert_allclose(l.adapter.delta_weight().detach().numpy(), ref, **TOL)
            np.testing.assert_allclose(l.adapter.gate.detach().numpy(), g_new[keep], **TOL)
            assert l.adapter.rank == keep.size
        assert opt_ids(opt) == trainable_ids(m)
    assert sched.num_trainable() < before_total
    assert len(sched.history) == 2


# ============================================================================ IncreLoRA
def test_increlora_score_matches_a_dense_gradient_and_growth_keeps_delta():
    m = tiny("adalora", rank=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for l in adapted_layers(m).values():
            l.adapter.lam.copy_(torch.randn(l.adapter.rank, generator=g, dtype=torch.float64))
    sched = IncreLoRASchedule(m, max_total_rank=6, interval=1, top_h=1, add_rank=2, orth_reg=0.0, beta1=0.5, beta2=0.7)
    # dense reference: dL/dW0 = dL/dΔW for an additive adapter
    layers = adapted_layers(m)
    for l in layers.values():
        l.base.weight.requires_grad_(True)
    loss_of(m).backward()
    raw = {}
    for n, l in layers.items():
        G = l.base.weight.grad.detach()
        dW = l.adapter.delta_weight().detach()
        raw[n] = float((dW.abs() * G.abs()).sum() / math.sqrt(G.numel()))
        l.base.weight.requires_grad_(False)
        l.base.weight.grad = None
    before = {n: l.adapter.delta_weight().detach().clone() for n, l in layers.items()}
    ranks0 = sched.ranks()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.0)  # lr 0: weights fixed
    opt.step()
    change = sched.step(1, opt)
    for n in layers:
        ipt = 0.5 * raw[n]
        assert math.isclose(sched.ipt[n], ipt, rel_tol=1e-10)
        assert math.isclose(sched.unc[n], 0.3 * abs(raw[n] - ipt), rel_tol=1e-10)
    winner = max(raw, key=raw.get)
    assert change is not None and list(change.ranks) == [winner]
    assert sched.ranks()[winner] == ranks0[winner] + 2
    for n, l in adapted_layers(m).items():  # growth is function-preserving
        torch.testing.assert_close(l.adapter.delta_weight().detach(), before[n], rtol=0, atol=0)
        assert l.adapter.num_trainable == AdaLoRA.param_count(l.adapter.d_out, l.adapter.d_in, rank=l.adapter.rank)
    assert opt_ids(opt) == trainable_ids(m)
    opt.zero_grad()
    run(m, sched, 6, opt=opt)
    assert sum(sched.ranks().values()) == 6  # stops at max_total_rank
    sched.detach()


def test_grow_adalora_checks_and_rank_zero():
    ad = AdaLoRA(6, 5, rank=1, seed=0)
    remaps = grow_adalora(ad, 2, seed=1)
    assert ad.rank == 3 and [r.index.tolist() for r in remaps] == [[0, -1, -1]] * 3
    assert ad.config()["rank"] == 3 and math.isclose(ad.config()["alpha"] / 3, ad.scale)
    with pytest.raises(ValueError, match="exceed"):
        grow_adalora(ad, 3)
    with pytest.raises(ValueError, match="rank-0"):
        grow_adalora(AdaLoRA(6, 5, rank=0), 1)
    with pytest.raises(TypeError, match="AdaLoRA"):
        grow_adalora(nn.Linear(2, 2), 1)


# ============================================================================ LoRA-Squeeze
def best_rank(D: np.ndarray, r: int) -> np.ndarray:
    U, S, Vt = np.linalg.svd(D, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r]


def test_squeeze_schedule_follows_its_ranks_with_eckart_young_updates():
    m = tiny("lora", rank=6)
    with torch.no_grad():
        for l in adapted_layers(m).values():
            l.adapter.B.normal_(generator=torch.Generator().manual_seed(2))
    sched = LoRASqueezeSchedule(m, target_rank=2, start_step=0, end_step=4, num_events=2)
    assert sched.events == [2, 4] and sched.planned_ranks("0") == [4, 2]

    def check(t, when):
        layers = adapted_layers(m)
        if when == "before":
            check.prev = {n: l.adapter.delta_weight().detach().numpy().copy() for n, l in layers.items()}
            return
        for n, l in layers.items():
            want = {2: 4, 4: 2}.get(t, l.adapter.rank)
            assert l.adapter.rank == want and l.adapter.num_trainable == want * (l.adapter.d_out + l.adapter.d_in)
            if t in (2, 4):
                np.testing.assert_allclose(l.adapter.delta_weight().detach().numpy(), best_rank(check.prev[n], want),
                                           rtol=1e-9, atol=1e-12)
        assert opt_ids(check.opt) == trainable_ids(m)

    check.opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    run(m, sched, 5, opt=check.opt, on_step=check)


def test_post_hoc_squeeze_model():
    m = tiny("lora", rank=5)
    with torch.no_grad():
        for l in adapted_layers(m).values():
            l.adapter.B.normal_(generator=torch.Generator().manual_seed(4))
    before = {n: l.adapter.delta_weight().detach().numpy().copy() for n, l in adapted_layers(m).items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    change = squeeze_model(m, 2, optimizer=opt)
    assert set(change.ranks) == {"0", "2"} and all(v == (5, 2) for v in change.ranks.values())
    for n, l in adapted_layers(m).items():
        np.testing.assert_allclose(l.adapter.delta_weight().detach().numpy(), best_rank(before[n], 2),
                                   rtol=1e-9, atol=1e-12)
    assert opt_ids(opt) == trainable_ids(m)
    assert not squeeze_model(m, 3)  # nothing above rank 3: no change
    with pytest.raises(ValueError, match="LoRA"):
        squeeze_model(tiny("vera", rank=4), 2)


# ============================================================================ factory and errors
@pytest.mark.parametrize(
    ("name", "method", "cfg"),
    [("adalora", "adalora", {"rank": 4}), ("sora", "sora", {"rank": 4}), ("increlora", "adalora", {"rank": 1}),
     ("squeeze", "lora", {"rank": 6})],
)
def test_every_schedule_changes_num_trainable(name, method, cfg):
    m = tiny(method, **cfg)
    kw = {"lam0": 2.0, "lam_max": 4.0} if name == "sora" else {}
    sched = make_schedule(name, m, 20, **kw)
    n0 = sched.num_trainable()
    opt = run(m, sched, 20)
    assert sched.num_trainable() != n0 and sched.history
    assert sched.num_trainable() == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert opt_ids(opt) == trainable_ids(m)
    if isinstance(sched, IncreLoRASchedule):
        sched.detach()


def test_schedule_errors():
    with pytest.raises(ValueError, match="AdaLoRA adapters"):
        AdaLoRASchedule(tiny("lora", rank=2), total_steps=5, target_rank=1)
    with pytest.raises(ValueError, match="exactly one"):
        AdaLoRASchedule(tiny("adalora", rank=2), total_steps=5)
    with pytest.raises(ValueError, match="target_budget"):
        AdaLoRASchedule(tiny("adalora", rank=2), total_steps=5, target_budget=9)
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_schedule("nope", tiny("lora", rank=2), 5)
    with pytest.raises(ValueError, match="max_total_rank"):
        IncreLoRASchedule(tiny("adalora", rank=2), max_total_rank=3)
    with pytest.raises(ValueError, match="num_events"):
        LoRASqueezeSchedule(tiny("lora", rank=4), 2, 0, 2, num_events=3)
    with pytest.raises(ValueError, match="num_stages"):
        SoRASchedule(tiny("sora", rank=2), total_steps=2, num_stages=3)


def sora_with_b(rank: int) -> nn.Module:
    """A SoRA model whose B is not zero (at init B = 0 makes every gate gradient 0)."""
    m = tiny("sora", rank=rank)
    with torch.no_grad():
        for layer in adapted_layers(m).values():
            layer.adapter.B.copy_(torch.randn(layer.adapter.B.shape, generator=torch.Generator().manual_seed(1)))
    return m


def test_sora_adam_gate_step_matches_a_numpy_adam_and_keeps_moments_through_pruning():
    """``gate_step="adam"``: d = m/(√v + ε)·√(1-β2^t)/(1-β1^t), g ← T_{ηλ}(g − η d), written in NumPy
    here; at a stage end the pruned gates' moments go and the kept ones stay with their gates."""
    m = sora_with_b(5)
    lr, lam, b1, b2, eps = 0.3, 0.4, 0.9, 0.999, 1e-6
    sched = SoRASchedule(m, total_steps=4, lr=lr, lam0=lam, lam_max=lam, num_stages=2)
    ref = {n: [l.adapter.gate.detach().numpy().copy(), 0.0, 0.0] for n, l in adapted_layers(m).items()}
    for t in range(1, 5):
        loss_of(m).backward()
        grads = {n: l.adapter.gate.grad.detach().numpy().copy() for n, l in adapted_layers(m).items()}
        assert all(np.abs(g).max() > 0 for g in grads.values())
        sched.update()
        sched.step(t)
        for n, l in adapted_layers(m).items():
            g, mom, vel = ref[n]
            mom = b1 * mom + (1 - b1) * grads[n]
            vel = b2 * vel + (1 - b2) * grads[n] ** 2
            d = mom / (np.sqrt(vel) + eps) * np.sqrt(1 - b2**t) / (1 - b1**t)
            z = g - lr * d
            g = np.sign(z) * np.maximum(np.abs(z) - lr * lam, 0.0)
            if t % 2 == 0:  # stage end: zero gates and their moments are cut
                keep = np.flatnonzero(g)
                g, mom, vel = g[keep], mom[keep], vel[keep]
            ref[n] = [g, mom, vel]
            np.testing.assert_allclose(l.adapter.gate.detach().numpy(), g, **TOL)
        for p in m.parameters():
            p.grad = None
    assert any(len(r[0]) < 5 for r in ref.values())  # the threshold cut something


def test_sora_adam_state_round_trips():
    """A schedule rebuilt from ``state_dict`` (a resume) takes the uninterrupted run's next step;
    one rebuilt without it (Adam restarted) does not."""
    def make():
        model = sora_with_b(4)
        return model, SoRASchedule(model, total_steps=6, lr=0.1, lam0=0.01, lam_max=0.01)

    def one(model, sched, t):
        loss_of(model).backward()
        sched.update()
        sched.step(t)
        for p in model.parameters():
            p.grad = None

    def gates(model):
        return [layer.adapter.gate.detach().clone() for layer in adapted_layers(model).values()]

    runs = [make() for _ in range(3)]
    for model, sched in runs:
        for t in (1, 2):
            one(model, sched, t)
    one(*runs[0], 3)  # uninterrupted
    resumed = SoRASchedule(runs[1][0], total_steps=6, lr=0.1, lam0=0.01, lam_max=0.01)
    resumed.load_state_dict(runs[1][1].state_dict())
    one(runs[1][0], resumed, 3)
    restarted = SoRASchedule(runs[2][0], total_steps=6, lr=0.1, lam0=0.01, lam_max=0.01)
    one(runs[2][0], restarted, 3)
    for ga, gb in zip(gates(runs[0][0]), gates(runs[1][0])):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    assert any(not torch.equal(ga, gc) for ga, gc in zip(gates(runs[0][0]), gates(runs[2][0])))
    with pytest.raises(ValueError, match="gate_step"):
        SoRASchedule(tiny("sora", rank=2), total_steps=2, gate_step="adagrad")
