"""Rank budgets (CoLoRA's allocation, TriAdaptLoRA's threshold) and the CoDyRA / TriAdaptLoRA schedules.

References: a brute-force search over every feasible integer allocation, a textbook D'Hondt table (all
quotients c_l / k sorted), NumPy's sort for the threshold, the formulas re-computed in floats, and the model's
own outputs before and after each rank change.  Tolerances: float64 models whose outputs differ by a
re-associated sum agree to 1e-12 relative; float32 merges (one rounding of W0 + ΔW) to 1e-5 relative.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowrank_theory.adapters.triangular import TriAdaptLoRA
from lowrank_theory.training.gated_schedules import CoDyRASchedule, TriAdaptLoRASchedule
from lowrank_theory.training.injection import adapted_layers, inject
from lowrank_theory.training.rank_budget import (
    GAINS,
    ablation_contributions,
    allocate_ranks,
    apply_ranks,
    colora_ranks,
    triadapt_growth_count,
    triadapt_threshold,
)


# ============================================================================ allocation
def _objective(scores, ranks, lo, w):
    return sum(c * sum(w(k) for k in range(a + 1, r + 1)) for c, r, a in zip(scores, ranks, lo))


def _brute_force(scores, budget, lo, hi, w):
    best = -math.inf
    for ranks in itertools.product(*[range(a, b + 1) for a, b in zip(lo, hi)]):
        if sum(ranks) == budget:
            best = max(best, _objective(scores, ranks, lo, w))
    return best


@given(scores=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=4), data=st.data())
def test_allocation_meets_the_budget_exactly_and_is_optimal(scores, data):
    n = len(scores)
    lo = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    hi = [a + data.draw(st.integers(0, 4)) for a in lo]
    budget = data.draw(st.integers(sum(lo), sum(hi)))
    gain = data.draw(st.sampled_from(sorted(GAINS)))
    ranks = allocate_ranks(scores, budget, min_rank=lo, max_rank=hi, gain=gain)
    assert sum(ranks) == budget and all(a <= r <= b for a, r, b in zip(lo, ranks, hi))
    got = _objective(scores, ranks, lo, GAINS[gain])
    assert got == pytest.approx(_brute_force(scores, budget, lo, hi, GAINS[gain]), rel=1e-12, abs=1e-12)


def _dhondt_table(votes, seats):
    """The textbook table: every quotient v_l / k, k = 1..seats, the `seats` largest win (ties: lower l)."""
    q = sorted(((-v / k, l) for l, v in enumerate(votes) for k in range(1, seats + 1)))
    out = [0] * len(votes)
    for _, l in q[:seats]:
        out[l] += 1
    return out


@given(votes=st.lists(st.integers(1, 1000), min_size=1, max_size=6), seats=st.integers(0, 30))
def test_dhondt_gain_is_the_dhondt_apportionment(votes, seats):
    assert allocate_ranks([float(v) for v in votes], seats, gain="dhondt") == _dhondt_table(votes, seats)


def test_linear_gain_fills_the_top_layers_and_proportional_examples():
    assert allocate_ranks([1.0, 5.0, 3.0], 7, max_rank=4, gain="linear") == [0, 4, 3]
    assert allocate_ranks([2.0, 1.0, 1.0], 8) == [4, 2, 2]  # D'Hondt is exactly proportional here
    assert allocate_ranks([0.0, 0.0], 3, min_rank=1) == [2, 1]  # ties go to the lower index
    assert allocate_ranks([3.0, 1.0], 4, gain=lambda k: 1.0 / k**2) == [3, 1]  # a callable gain


@pytest.mark.parametrize("call,match", [
    (lambda: allocate_ranks([], 3), "scores must hold"),
    (lambda: allocate_ranks([1.0, -1.0], 3), r"scores\[1\]"),
    (lambda: allocate_ranks([1.0, float("nan")], 3), r"scores\[1\]"),
    (lambda: allocate_ranks([1.0], -1), "budget"),
    (lambda: allocate_ranks([1.0], 2.5), "budget"),
    (lambda: allocate_ranks([1.0, 1.0], 9, max_rank=4), "budget must lie"),
    (lambda: allocate_ranks([1.0, 1.0], 1, min_rank=1), "budget must lie"),
    (lambda: allocate_ranks([1.0, 1.0], 3, min_rank=[1, 5], max_rank=[3, 4]), r"min_rank\[1\]=5"),
    (lambda: allocate_ranks([1.0, 1.0], 3, max_rank=[3]), "max_rank must be"),
    (lambda: allocate_ranks([1.0], 3, gain="hare"), "gain must be one of"),
    (lambda: allocate_ranks([1.0], 3, gain=lambda k: float(k)), "non-increasing"),
    (lambda: triadapt_threshold([1.0, 2.0], 3), "k must be"),
    (lambda: triadapt_threshold([], 1), "scores"),
])
def test_budget_bad_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ============================================================================ TriAdaptLoRA threshold
@given(t_w=st.integers(0, 50), span=st.integers(1, 200), data=st.data())
def test_growth_count_is_the_linear_and_exponential_formula(t_w, span, data):
    T = t_w + span
    t = data.draw(st.integers(t_w + 1, T))
    target = data.draw(st.integers(1, 400))
    now = data.draw(st.integers(0, target - 1))
    L = data.draw(st.integers(1, 80))
    mu = (t - t_w) / (T - t_w)
    lin = min(max(int(np.floor((target - now) * mu)), 1), L)
    exp = min(max(int(np.floor(np.exp(mu * np.log(target - now)))), 1), L)
    kw = dict(init_warmup=t_w, total_steps=T, target_total_rank=target, current_total_rank=now, num_matrices=L)
    assert triadapt_growth_count(t, **kw) == lin
    assert triadapt_growth_count(t, mode="non-linear", **kw) == exp


@given(scores=st.lists(st.floats(-5, 5), min_size=1, max_size=12), data=st.data())
def test_threshold_is_the_kth_largest(scores, data):
    k = data.draw(st.integers(1, len(scores)))
    thr = triadapt_threshold(scores, k)
    assert thr == np.sort(np.asarray(scores))[::-1][k - 1]
    assert sum(s >= thr for s in scores) >= k  # ties grow too


@pytest.mark.parametrize("kw,match", [
    (dict(step=5, init_warmup=5), "step must satisfy"),
    (dict(init_warmup=10), "init_warmup must be <"),
    (dict(current_total_rank=8), "current_total_rank must be <"),
    (dict(mode="cubic"), "mode"),
    (dict(num_matrices=0), "num_matrices"),
])
def test_growth_count_bad_arguments(kw, match):
    base = dict(step=6, init_warmup=2, total_steps=10, target_total_rank=8, current_total_rank=4, num_matrices=3)
    base.update(kw)
    step = base.pop("step")
    with pytest.raises(ValueError, match=match):
        triadapt_growth_count(step, **base)


# ============================================================================ schedules on a tiny model
class _Tiny(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q, self.k, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 6)

    def forward(self, x):
        return self.o(torch.tanh(self.q(x)) * torch.sigmoid(self.k(x)))


def _data(seed=0, n=64, d=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return x, y


def _model(method, seed=0, **cfg):
    torch.manual_seed(seed)
    m = _Tiny().double()
    return inject(m, method, ["q", "k", "o"], layer_seeds=True, seed=seed, **cfg)


def _train(model, sched, steps, lr=5e-2, seed=0):
    x, y = _data(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for t in range(1, steps + 1):
        loss = ((model(x) - y) ** 2).mean()
        extra = sched.extra_loss()
        (loss if extra is None else loss + extra).backward()
        sched.update()
        opt.step()
        sched.step(t, optimizer=opt)
        opt.zero_grad()
    return opt


def test_codyra_schedule_sparsifies_prunes_exactly_and_merges_at_task_end():
    model = _model("codyra", rank=6, gate_init="uniform")
    sched = CoDyRASchedule(model, total_steps=30, lam=1e-3, max_kappa=0.05, dense_ratio=0.3)
    assert [sched.kappa(t) for t in (1, 9, 10)] == [0.0, 0.0, 0.0] and sched.kappa(30) == pytest.approx(0.05)
    x, _ = _data(1)
    _train(model, sched, 29)  # every step but the last: thresholds only, no prune yet
    assert sum(sched.ranks().values()) == 18
    # reference for the last step: a copy whose gates get the same threshold but keep their zeros
    ref = copy.deepcopy(model)
    for m in adapted_layers(ref).values():
        m.adapter.threshold_(sched.kappa(30))
    y_ref = ref(x).detach()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    change = sched.step(30, optimizer=opt)
    after = sched.ranks()
    assert change is not None and 0 < sum(after.values()) < 18  # some ranks switched off at this scale
    assert after == {n: m.adapter.active_rank for n, m in adapted_layers(ref).items()}
    held = {id(q) for g in opt.param_groups for q in g["params"]}
    assert all(id(r.new) in held for r in change.remaps)  # the optimizer follows the new tensors
    y_pruned = model(x).detach()
    scale = float(y_ref.abs().max())
    assert float((y_pruned - y_ref).abs().max()) <= 1e-12 * scale  # pruning: float64 re-association only
    merged = sched.end_task()
    assert merged == after and sched.task == 1
    y_merged = model(x).detach()
    assert float((y_merged - y_pruned).abs().max()) <= 1e-12 * scale  # W0 + ΔW in float64, one rounding
    assert all(m.adapter.rank == 6 and torch.count_nonzero(m.adapter.B) == 0 for m in adapted_layers(model).values())


def test_codyra_schedule_is_deterministic_and_rule_matters():
    runs = []
    for rule in ("soft", "soft", "hard_push"):
        model = _model("codyra", rank=6, gate_init="uniform")
        sched = CoDyRASchedule(model, total_steps=30, lam=1e-3, max_kappa=0.05, dense_ratio=0.3, rule=rule)
        _train(model, sched, 30)
        runs.append((sched.ranks(), [m.adapter.gate.detach().clone() for m in adapted_layers(model).values()]))
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    soft, push = runs[0], runs[2]
    assert soft[0] != push[0] or any(not torch.equal(a, b) for a, b in zip(soft[1], push[1]))


def test_codyra_schedule_bad_arguments():
    model = _model("codyra", rank=2)
    for kw, match in ((dict(total_steps=0), "total_steps"), (dict(lam=-1.0), "lam"),
                      (dict(dense_ratio=1.0), "dense_ratio"), (dict(rule="x"), "rule"), (dict(max_kappa=-1), "kappa")):
        args = dict(total_steps=5)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            CoDyRASchedule(model, **args)
    with pytest.raises(ValueError, match="CoDyRA adapters"):
        CoDyRASchedule(_model("lora", rank=2), total_steps=5)


def _triadapt_run(steps=24):
    model = _model("triadaptlora", rank=1)
    sched = TriAdaptLoRASchedule(model, total_steps=steps, target_total_rank=9, warmup=4, interval=4, add_rank=2)
    x, y = _data(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    totals = []
    for t in range(1, steps + 1):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        layers = adapted_layers(model)
        moments = {n: opt.state[m.adapter.A]["exp_avg"].clone() for n, m in layers.items()}
        y0 = model(x).detach().clone()
        change = sched.step(t, optimizer=opt)
        if change:
            assert float((model(x).detach() - y0).abs().max()) <= 1e-12 * float(y0.abs().max())  # growth is exact
            for n, (b, _after) in change.ranks.items():
                A = adapted_layers(model)[n].adapter.A
                st_ = opt.state[A]["exp_avg"]
                assert torch.equal(st_[:b], moments[n]) and torch.count_nonzero(st_[b:]) == 0
        opt.zero_grad()
        totals.append(sum(sched.ranks().values()))
    return totals, [dict(c.ranks) for c in sched.history], model


def test_triadapt_schedule_grows_to_the_target_keeps_optimizer_state_and_is_deterministic():
    totals, history, model = _triadapt_run()
    assert totals[-1] <= 9 and totals[-1] > 3 and all(b >= a for a, b in zip(totals, totals[1:]))
    assert totals[3] == 3 and totals[4] == 3  # nothing up to the warm-up's end; first event at step 8
    assert all(isinstance(m.adapter, TriAdaptLoRA) for m in adapted_layers(model).values())
    again, history2, _ = _triadapt_run()
    assert again == totals and history2 == history


def test_triadapt_schedule_bad_arguments():
    model = _model("triadaptlora", rank=2)
    with pytest.raises(ValueError, match="target_total_rank"):
        TriAdaptLoRASchedule(model, total_steps=10, target_total_rank=3)
    with pytest.raises(ValueError, match="warmup must be"):
        TriAdaptLoRASchedule(model, total_steps=10, target_total_rank=8, warmup=10)
    with pytest.raises(ValueError, match="mode"):
        TriAdaptLoRASchedule(model, total_steps=10, target_total_rank=8, mode="log")


# ============================================================================ contributions → ranks
def test_ablation_contributions_and_apply_ranks():
    model = _model("lora", rank=2)
    for m in adapted_layers(model).values():
        with torch.no_grad():
            m.adapter.B.normal_(0, 0.5)
    x, y = _data(3)

    def loss_fn(mod):
        return ((mod(x) - y) ** 2).mean()

    c = ablation_contributions(model, loss_fn)
    full = float(loss_fn(model).detach())
    for name, layer in adapted_layers(model).items():
        layer.disabled = True
        assert c[name] == pytest.approx(float(loss_fn(model).detach()) - full, rel=0, abs=1e-15)
        layer.disabled = False
    ranks = colora_ranks(c, 7, min_rank=1, max_rank=4)
    assert sum(ranks.values()) == 7 and set(ranks) == set(c)
    new = apply_ranks(model, ranks, "lora", alpha=4.0)
    assert {n: a.rank for n, a in new.items()} == ranks
    assert all(a.A.dtype == torch.float64 for a in new.values())
    with torch.no_grad():  # fresh LoRAs have B = 0: the model is its base again, exactly
        base_out = model.o.base(torch.tanh(model.q.base(x)) * torch.sigmoid(model.k.base(x)))
        assert torch.equal(model(x), base_out)
    with pytest.raises(ValueError, match="not adapted"):
        apply_ranks(model, {"nope": 2})
    with pytest.raises(ValueError, match="non-empty mapping"):
        colora_ranks({}, 3)
