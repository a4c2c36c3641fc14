"""Check of proofs/21-diffora-topk-projection.md: DiffoRA's top-k discretization is the nearest k-hot selection
(brute force over all k-sets), it does not depend on the relaxation or the temperature, and the relaxed model at a
k-hot gate vector is the pruned model.  Negative controls: a threshold rule, a non-monotone score, float32 saturation.
Tolerance: float64's 1e-10 (tests/conftest.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank_theory.training import adapted_layers, inject
from lowrank_theory.training.module_selection import ModuleGates, keep_only, top_k
from tests.conftest import tol

TOL = tol("float64")


def _dist2(w: np.ndarray, S) -> float:
    z = np.zeros_like(w)
    z[list(S)] = 1.0
    return float(np.sum((w - z) ** 2))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from([-0.5, 0.0, 0.25, 0.5, 0.9, 1.3]), min_size=1, max_size=9), st.data())
def test_top_k_is_the_nearest_k_hot_vector(values, data):
    w = np.array(values)
    L = len(w)
    k = data.draw(st.integers(1, L))
    got = top_k(torch.tensor(w), k)
    dists = {S: _dist2(w, S) for S in itertools.combinations(range(L), k)}
    best = min(dists.values())
    assert _dist2(w, got) == pytest.approx(best, abs=1e-12)
    srt = np.sort(w)[::-1]
    assert best == pytest.approx(np.sum(w**2) + k - 2 * srt[:k].sum(), abs=1e-12)
    n_opt = sum(abs(d - best) < 1e-12 for d in dists.values())
    unique = k == L or srt[k - 1] > srt[k]
    assert (n_opt == 1) == unique


class Six(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(4, 3) for _ in range(6))

    def forward(self, x):
        return torch.stack([h(x) for h in self.heads], dim=1)


def _model(seed=0):
    torch.manual_seed(seed)
    m = Six().double()
    inject(m, "lora", targets="all-linear", rank=1, alpha=1, seed=seed, layer_seeds=True)
    with torch.no_grad():
        for layer in adapted_layers(m).values():
            layer.adapter.B.normal_()
    return m


LOGITS = torch.tensor([0.3, -1.0, 2.2, 0.3, 1.1, -0.2])


@pytest.mark.parametrize("relaxation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("tau", [0.1, 1.0, 10.0])
def test_selection_is_invariant_to_relaxation_and_temperature(relaxation, tau):
    g = ModuleGates(_model(), relaxation=relaxation, temperature=tau)
    with torch.no_grad():
        g.logits.copy_(LOGITS)
    order = np.argsort(-LOGITS.numpy(), kind="stable")
    z = LOGITS.double() / tau
    w64 = torch.sigmoid(z) if relaxation == "sigmoid" else 6 * torch.softmax(z, dim=0)
    for k in range(1, 7):
        assert g.select(k) == [f"heads.{i}" for i in order[:k]]
        assert top_k(w64, k) == order[:k].tolist()


def test_gated_model_at_a_k_hot_vector_is_the_pruned_model():
    m = _model(1)
    x = torch.randn(5, 4, dtype=torch.float64)
    S = [0, 2, 5]
    g = ModuleGates(m).attach()
    with torch.no_grad():  # float32 sigmoid: exactly 1 at +60, exactly 0 at -200
        g.logits.copy_(torch.tensor([60.0 if i in S else -200.0 for i in range(6)]))
    assert g.weights().tolist() == [1.0 if i in S else 0.0 for i in range(6)]
    relaxed = m(x).detach()
    g.detach()
    keep_only(m, [f"heads.{i}" for i in S])
    np.testing.assert_allclose(m(x).detach().numpy(), relaxed.numpy(), **TOL)


def test_negative_control_threshold_rule_keeps_the_wrong_count():
    w = np.full(6, 0.6)
    assert int((w > 0.5).sum()) == 6  # the nearest point of {0,1}^L is all ones
    assert len(top_k(torch.tensor(w), 2)) == 2


def test_negative_control_non_monotone_score_reorders():
    w = np.array([0.95, 0.5, 0.1, 0.7])
    k = 2
    bad = top_k(torch.tensor(w * (1 - w)), k)  # peaks at 0.5: not monotone
    good = top_k(torch.tensor(w), k)
    assert sorted(bad) != sorted(good)
    assert _dist2(w, bad) > _dist2(w, good) + 0.1


def test_negative_control_float32_saturation():
    logits = torch.tensor([20.0, 30.0])
    w32 = torch.sigmoid(logits)
    assert w32[0].item() == w32[1].item() == 1.0  # saturated: a tie the logits do not have
    assert top_k(w32, 1) == [0]  # ranking float32 gates picks the wrong module
    assert top_k(logits, 1) == [1]
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).double()
    inject(m, "lora", targets="all-linear", rank=1)
    g = ModuleGates(m)
    with torch.no_grad():
        g.logits.copy_(logits)
    assert g.select(1) == ["1"]  # the library ranks the logits
