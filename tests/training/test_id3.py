"""ID3 (step-by-step unmasking): the schedule, the D3 importance against a float64 NumPy reference, the selection
against a NumPy top-k, masked entries frozen through SGD/Adam steps, determinism and validation.

Tolerances: the importance is compared at 1e-12 relative in float64 (one abs, one add, one power, one division);
selections and masks are compared exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank_theory.training.id3 import ID3Mask, d3_importance, unmask_schedule


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


@settings(max_examples=40, deadline=None)
@given(budget=st.integers(1, 500), steps=st.integers(1, 60))
def test_schedule_is_uniform_and_ends_at_the_budget(budget, steps):
    N = unmask_schedule(budget, steps)
    inc = np.diff([0, *N])
    assert N[-1] == budget and len(N) == steps
    assert set(inc.tolist()) <= {budget // steps, budget // steps + 1}
    assert (inc[:-1] >= inc[1:]).all()  # the remainder is spent in the first steps


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(1e-6, 1.0), e=st.floats(-2.0, 3.0))
def test_importance_matches_a_float64_reference(seed, eps, e):
    rng = np.random.default_rng(seed)
    th, g = rng.standard_normal((4, 7)), rng.standard_normal((4, 7))
    th[0, 0] = 0.0
    ref = np.abs(g) / (eps + np.abs(th)) ** e
    out = d3_importance(torch.from_numpy(th), torch.from_numpy(g), eps, e).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=0)
    # float32 inputs are scored in float32 (not half): same values to float32 rounding
    out32 = d3_importance(torch.from_numpy(th).float(), torch.from_numpy(g).float(), eps, e)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=1e-5, atol=1e-30)


def test_budget_exact_each_step_selection_is_numpy_topk_and_masked_entries_never_move():
    model = _model()
    x, y = _data()
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    B, T = 23, 5  # 23 = 5*4 + 3: steps 1-3 unmask 5, steps 4-5 unmask 4
    rule = ID3Mask(params, budget=B, total_steps=T, eps=1e-3, exponent=1.0)
    opt = rule.check_optimizer(torch.optim.Adam(model.parameters(), lr=0.05))
    init = {k: p.detach().clone() for k, p in params.items()}
    for t in range(1, T + 3):
        opt.zero_grad()
        _loss(model, x, y).backward()
        # the reference: scores of still-masked entries in float64, global order, ties by flat index
        th = np.concatenate([p.detach().numpy().ravel() for p in params.values()])
        g = np.concatenate([p.grad.numpy().ravel() for p in params.values()])
        masked = ~np.concatenate([m.numpy().ravel() for m in rule.masks])
        s = np.where(masked, np.abs(g) / (1e-3 + np.abs(th)), -np.inf)
        n_new = rule.target(t) - rule.num_unmasked
        expect = np.sort(np.argsort(-s, kind="stable")[:n_new])
        before = np.concatenate([m.numpy().ravel() for m in rule.masks])
        assert rule.step() == n_new
        after = np.concatenate([m.numpy().ravel() for m in rule.masks])
        np.testing.assert_array_equal(np.flatnonzero(after & ~before), expect)
        assert rule.num_unmasked == min(t * 4 + min(t, 3), B) <= total
        assert not (before & ~after).any()  # unmasked entries stay unmasked
        for p, m in zip(params.values(), rule.masks, strict=True):
            assert bool((p.grad[~m] == 0).all())
        opt.step()
        for (k, p), m in zip(params.items(), rule.masks, strict=True):
            assert torch.equal(p.detach()[~m], init[k][~m]), k  # bit-identical where masked
    moved = sum(int((p.detach() != init[k]).sum()) for k, p in params.items())
    assert rule.num_unmasked == B and 0 < moved <= B


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.0),
])
def test_masked_entries_frozen_under_momentum_optimizers(make_opt):
    model = _model(2)
    x, y = _data(3)
    rule = ID3Mask(list(model.parameters()), budget=10, total_steps=4, exponent=0.0, eps=0.0)
    opt = rule.check_optimizer(make_opt(model.parameters()))
    init = [p.detach().clone() for p in model.parameters()]
    for _ in range(8):
        opt.zero_grad()
        _loss(model, x, y).backward()
        rule.step()
        opt.step()
    for p, p0, m in zip(model.parameters(), init, rule.masks, strict=True):
        assert torch.equal(p.detach()[~m], p0[~m])


def test_negative_control_weight_decay_would_move_masked_entries_and_is_refused():
    model = _model(4)
    x, y = _data(5)
    rule = ID3Mask(list(model.parameters()), budget=5, total_steps=5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        rule.check_optimizer(opt)
    init = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    _loss(model, x, y).backward()
    rule.step()
    opt.step()  # ignoring the refusal: decoupled decay shrinks masked entries
    assert any(not torch.equal(p.detach()[~m], p0[~m]) for p, p0, m in zip(model.parameters(), init, rule.masks,
                                                                             strict=True))


def test_deterministic_and_rule_changes_the_outcome():
    def run(exponent):
        model = _model(6)
        x, y = _data(7)
        rule = ID3Mask(dict(model.named_parameters()), budget=12, total_steps=3, exponent=exponent)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(4):
            opt.zero_grad()
            _loss(model, x, y).backward()
            rule.step()
            opt.step()
        return [m.clone() for m in rule.masks], [p.detach().clone() for p in model.parameters()]

    m1, p1 = run(1.0)
    m2, p2 = run(1.0)
    assert all(torch.equal(a, b) for a, b in zip(m1, m2, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
    m3, _ = run(-1.0)  # another exponent picks other entries (the score is not ignored)
    assert not all(torch.equal(a, b) for a, b in zip(m1, m3, strict=True))


def test_parameter_without_gradient_scores_zero():
    a = nn.Parameter(torch.ones(3))
    b = nn.Parameter(torch.ones(2))
    rule = ID3Mask([a, b], budget=2, total_steps=1, exponent=0.0)
    (a * torch.tensor([1.0, 3.0, 2.0])).sum().backward()
    rule.step()
    assert rule.masks[0].tolist() == [False, True, True] and b.grad is None and not rule.masks[1].any()


def test_validation():
    p = nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="budget"):
        ID3Mask([p], budget=5, total_steps=2)
    with pytest.raises(ValueError, match="total_steps"):
        ID3Mask([p], budget=2, total_steps=0)
    with pytest.raises(ValueError, match="twice"):
        ID3Mask([p, p], budget=2, total_steps=1)
    with pytest.raises(TypeError, match="requires_grad"):
        ID3Mask([torch.zeros(3)], budget=1, total_steps=1)
    with pytest.raises(ValueError, match="eps must be > 0"):
        ID3Mask([p], budget=1, total_steps=1, eps=0.0, exponent=1.0)
    with pytest.raises(ValueError, match="at least one"):
        ID3Mask([], budget=1, total_steps=1)
    with pytest.raises(ValueError, match="shape"):
        d3_importance(torch.zeros(2), torch.zeros(3))
