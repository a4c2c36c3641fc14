"""Check of proofs/24-codyra-prune-exact.md: soft step = prox (1-Lipschitz), pruning and merging exact,
continual drift bounded by the kept gates, and the stored "hard_push" rule is no proximal map.

Tolerances: float64 forwards that differ by re-associated sums agree to 1e-12 relative; the numerical rank of a
drift uses the SVD cut 1e-9 · σ_max (float64 products of O(1) factors, far above round-off, far below any kept
rank-one term of this size).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowrank_theory.adapters.gated_rank import CoDyRA, codyra_gate_update
from lowrank_theory.training.gated_schedules import CoDyRASchedule
from lowrank_theory.training.injection import adapted_layers, inject

REL = 1e-12


def _prox_objective(z: np.ndarray, v: np.ndarray, kappa: float) -> np.ndarray:
    return 0.5 * (z - v) ** 2 + kappa * np.abs(z)


@given(seed=st.integers(0, 999), kappa=st.floats(0.0, 1.5))
def test_soft_step_is_the_prox_and_one_lipschitz(seed, kappa):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=9) * 2
    z = codyra_gate_update(torch.tensor(v), kappa, "soft").numpy()
    grid = np.linspace(-6, 6, 24001)  # spacing 5e-4: the grid minimum is within 1.3e-7 of the true minimum
    for i in range(v.size):
        assert _prox_objective(z[i], v[i], kappa) <= _prox_objective(grid, v[i], kappa).min() + 1e-12
    assert np.array_equal(z == 0, np.abs(v) <= kappa)
    u = v + rng.normal(size=9) * 0.3
    zu = codyra_gate_update(torch.tensor(u), kappa, "soft").numpy()
    assert np.linalg.norm(zu - z) <= np.linalg.norm(u - v) + 1e-15


def _random_codyra(m, n, r, seed):
    ad = CoDyRA(m, n, rank=r, alpha=2.0 * r).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return ad


@given(m=st.integers(2, 12), n=st.integers(2, 12), data=st.data())
def test_prune_after_the_step_is_exact(m, n, data):
    r = data.draw(st.integers(1, min(m, n)))
    ad = _random_codyra(m, n, r, data.draw(st.integers(0, 999)))
    ad.threshold_(data.draw(st.floats(0.0, 1.2)))
    x = torch.randn(6, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y, dw, kept = ad(x).detach().clone(), ad.delta_weight().detach().clone(), ad.active_rank
    ad.prune_zero_gates()
    assert ad.rank == kept and ad.num_trainable == kept * (m + n + 1)
    with torch.no_grad():
        if kept:
            assert float((ad(x) - y).norm() / y.norm()) <= REL
            assert float((ad.delta_weight() - dw).norm() / dw.norm()) <= REL
        else:
            assert torch.count_nonzero(y) == 0 and torch.count_nonzero(ad(x)) == 0


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _task(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 6, generator=g, dtype=torch.float64)
    return x, torch.randn(48, 4, generator=g, dtype=torch.float64)


def test_continual_tasks_drift_is_bounded_by_kept_gates():
    torch.manual_seed(0)
    net = inject(_Net().double(), "codyra", ["a", "b"], layer_seeds=True, seed=0, rank=4, gate_init="uniform")
    w0 = {n: m.base.weight.detach().clone() for n, m in adapted_layers(net).items()}
    sched = CoDyRASchedule(net, total_steps=25, lam=1e-3, max_kappa=0.05, dense_ratio=0.4)
    kept = {n: 0 for n in w0}
    bound = {n: 0.0 for n in w0}
    probe = torch.randn(10, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for task in range(3):
        x, y = _task(task)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=5e-2)
        for t in range(1, 26):
            loss = ((net(x) - y) ** 2).mean() + sched.extra_loss()
            loss.backward()
            opt.step()
            sched.step(t, optimizer=opt)
            opt.zero_grad()
        for n, m in adapted_layers(net).items():
            ad = m.adapter
            kept[n] += ad.rank
            with torch.no_grad():
                bound[n] += ad.scale * float((ad.gate.abs() * ad.B.norm(dim=0) * ad.A.norm(dim=1)).sum())
        before = net(probe).detach()
        sched.end_task()
        after = net(probe).detach()
        assert float((after - before).abs().max()) <= REL * float(before.abs().max())  # item 3
    assert 0 < sum(kept.values()) < 3 * 8  # the threshold cut ranks, and some survived
    for n, m in adapted_layers(net).items():
        drift = (m.base.weight.detach() - w0[n]).numpy()
        sv = np.linalg.svd(drift, compute_uv=False)
        numerical_rank = int((sv > 1e-9 * sv[0]).sum()) if sv[0] > 0 else 0
        assert numerical_rank <= kept[n]
        assert np.linalg.norm(drift) <= bound[n] * (1 + 1e-12)


def test_negative_control_pruning_a_small_nonzero_gate_is_not_exact():
    ad = _random_codyra(7, 6, 4, 1)
    with torch.no_grad():
        ad.gate[2] = 1e-3  # small, but not zero: no threshold step was taken
        ad.gate[0] = 0.0
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = ad(x).detach().clone()
    term = ad.scale * 1e-3 * (x @ ad.A[2].detach())[:, None] * ad.B[:, 2].detach()[None, :]
    with torch.no_grad():
        ad.gate[2] = 0.0  # cut it as if it were zero
    ad.prune_zero_gates()
    assert ad.rank == 2
    with torch.no_grad():
        assert float((y - ad(x)).norm()) > 1e-6  # the output moved ...
        assert float((y - ad(x) - term).norm()) <= 1e-12 * float(y.norm())  # ... by exactly that rank's term


def test_negative_control_hard_push_is_not_a_prox():
    kappa, eps = 0.3, 0.01
    u, v = torch.tensor([kappa + eps], dtype=torch.float64), torch.tensor([kappa - eps], dtype=torch.float64)
    hu, hv = codyra_gate_update(u, kappa, "hard_push"), codyra_gate_update(v, kappa, "hard_push")
    jump = float((hu - hv).abs())
    assert jump == pytest.approx(2 * kappa + eps, rel=1e-12) and jump > float((u - v).abs())  # not 1-Lipschitz
    su, sv = codyra_gate_update(u, kappa, "soft"), codyra_gate_update(v, kappa, "soft")
    assert float((su - sv).abs()) <= float((u - v).abs())
    vals = np.linspace(-2, 2, 41)
    vals = vals[np.abs(vals) > kappa]
    hp = codyra_gate_update(torch.tensor(vals), kappa, "hard_push").numpy()
    so = codyra_gate_update(torch.tensor(vals), kappa, "soft").numpy()
    assert (_prox_objective(hp, vals, kappa) > _prox_objective(so, vals, kappa) + 1e-9).all()

