"""DiffoRA's module selection (``training.module_selection``; method index name ``diffora``): the gated output
against the dense formula, gradients to the gates against the analytic value, the top-k discretization (exactly k,
numpy's stable argsort as reference), and pruning that leaves the kept layers' outputs bit-identical.
Tolerance: float64's 1e-10 (tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.training import adapted_layers, inject, merge
from lowrank_theory.training.injection import CONFIG_ATTR
from lowrank_theory.training.module_selection import (
    ModuleGates,
    adapter_parameters,
    keep_only,
    select_and_prune,
    top_k,
)
from tests.conftest import tol

TOL = tol("float64")


class Heads(nn.Module):
    """Four parallel 6→5 linear heads; the output stacks them, so each head's error is its own."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(6, 5) for _ in range(4))

    def forward(self, x):
        return torch.stack([h(x) for h in self.heads], dim=1)


def _model(seed=0, perturb=True):
    torch.manual_seed(seed)
    m = Heads().double()
    inject(m, "lora", targets="all-linear", rank=2, alpha=2, seed=seed, layer_seeds=True)
    if perturb:
        with torch.no_grad():
            for layer in adapted_layers(m).values():
                layer.adapter.B.normal_()
    return m


def _dense_heads(m, w):
    """Reference: head i outputs x W0ᵀ + b0 + w_i x ΔW_iᵀ, from the dense ΔW."""
    def f(x):
        outs = []
        for i, layer in enumerate(adapted_layers(m).values()):
            W0, b0 = layer.base.weight, layer.base.bias
            outs.append(x @ W0.T + b0 + w[i] * (x @ layer.adapter.delta_weight().T))
        return torch.stack(outs, dim=1)
    return f


# ----------------------------------------------------------------------------- relaxation
@pytest.mark.parametrize("relaxation", ["sigmoid", "softmax"])
def test_gate_weights_match_numpy(relaxation):
    m = _model()
    g = ModuleGates(m, relaxation=relaxation, temperature=0.7)
    with torch.no_grad():
        g.logits.copy_(torch.tensor([0.3, -1.2, 2.0, 0.0]))
    z = np.array([0.3, -1.2, 2.0, 0.0]) / 0.7
    ref = 1 / (1 + np.exp(-z)) if relaxation == "sigmoid" else 4 * np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(g.weights().detach().numpy(), ref, rtol=1e-6)  # float32 logits
    assert list(g.as_dict()) == [f"heads.{i}" for i in range(4)]
    assert ModuleGates(m, relaxation="softmax", init=3.0).weights().detach().tolist() == [1.0] * 4


@pytest.mark.parametrize("relaxation", ["sigmoid", "softmax"])
def test_gated_output_is_the_dense_interpolation(relaxation):
    m = _model(1)
    x = torch.randn(7, 6, dtype=torch.float64)
    plain = m(x)
    g = ModuleGates(m, relaxation=relaxation).attach()
    with torch.no_grad():
        g.logits.copy_(torch.tensor([1.0, -0.5, 0.0, 2.5]))
    w = g.weights().detach().double()
    np.testing.assert_allclose(m(x).detach().numpy(), _dense_heads(m, w)(x).detach().numpy(), **TOL)
    g.detach()
    torch.testing.assert_close(m(x), plain, rtol=0, atol=0)  # detached: the plain adapted model again


def test_gate_one_is_plain_lora_and_gate_zero_is_the_base():
    m = _model(2)
    x = torch.randn(3, 6, dtype=torch.float64)
    plain = m(x)
    with torch.no_grad():
        base = torch.stack([layer.base(x) for layer in adapted_layers(m).values()], dim=1)
    g = ModuleGates(m).attach()
    with torch.no_grad():
        g.logits.fill_(60.0)  # sigmoid(60) = 1 in float32
    np.testing.assert_allclose(m(x).detach().numpy(), plain.detach().numpy(), **TOL)
    with torch.no_grad():
        g.logits.fill_(-200.0)
    np.testing.assert_allclose(m(x).detach().numpy(), base.numpy(), **TOL)


def test_gradients_reach_the_gates_with_the_analytic_value():
    """dL/dα_i = σ'(α_i) <dL/dy_i, ΔW_i x> (sum over the batch); checked against the dense computation."""
    m = _model(3)
    g = ModuleGates(m).attach()
    with torch.no_grad():
        g.logits.copy_(torch.tensor([0.2, -0.4, 1.0, 0.0]))
    x = torch.randn(9, 6, dtype=torch.float64)
    target = torch.randn(9, 4, 5, dtype=torch.float64)
    loss = ((m(x) - target) ** 2).sum()
    loss.backward()
    assert g.logits.grad is not None and bool((g.logits.grad != 0).all())
    w = g.weights().detach().double()
    y = _dense_heads(m, w)(x).detach()
    ref = []
    for i, layer in enumerate(adapted_layers(m).values()):
        upd = (x @ layer.adapter.delta_weight().T).detach()
        ref.append((w[i] * (1 - w[i]) * (2 * (y[:, i] - target[:, i]) * upd).sum()).item())
    np.testing.assert_allclose(g.logits.grad.double().numpy(), ref, rtol=1e-6)  # float32 gate parameter
    assert all(p.grad is not None for p in adapter_parameters(m))  # the adapters train jointly


def test_search_finds_the_layers_that_need_an_update_and_pruning_keeps_their_outputs():
    """Heads 1 and 3 have a target off their base by a rank-2 change; heads 0 and 2 are already right.  First-order
    bi-level search (adapters on one batch, gates on another) ranks heads 1 and 3 on top; after pruning, the kept
    layers' outputs are bit-identical and the dropped ones are the original nn.Linear modules again."""
    m = _model(4, perturb=False)
    torch.manual_seed(5)
    shift = {1: torch.randn(5, 2, dtype=torch.float64) @ torch.randn(2, 6, dtype=torch.float64),
             3: torch.randn(5, 2, dtype=torch.float64) @ torch.randn(2, 6, dtype=torch.float64)}
    originals = {n: layer.base for n, layer in adapted_layers(m).items()}

    def target(x):
        with torch.no_grad():
            outs = [layer.base(x) + (x @ shift[i].T if i in shift else 0)
                    for i, layer in enumerate(adapted_layers(m).values())]
        return torch.stack(outs, dim=1)

    gates = ModuleGates(m).attach()
    opt_w = torch.optim.Adam(adapter_parameters(m), lr=0.03)
    opt_a = torch.optim.Adam(gates.gate_parameters(), lr=0.05)
    for _ in range(150):
        xt, xv = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 6, dtype=torch.float64)
        opt_w.zero_grad()
        ((m(xt) - target(xt)) ** 2).mean().backward()
        opt_w.step()
        opt_a.zero_grad()
        ((m(xv) - target(xv)) ** 2).mean().backward()
        opt_a.step()
    w = gates.weights().detach()
    assert min(w[1], w[3]) > max(w[0], w[2]) + 0.1, w  # measured: 0.85, 0.90 vs 0.50, 0.50
    x = torch.randn(5, 6, dtype=torch.float64)
    gates.detach()
    before = m(x).detach()
    chosen = select_and_prune(m, gates, 2)
    assert sorted(chosen) == ["heads.1", "heads.3"]
    assert list(adapted_layers(m)) == ["heads.1", "heads.3"]
    for n in ("heads.0", "heads.2"):
        assert m.get_submodule(n) is originals[n] and type(m.get_submodule(n)) is nn.Linear
    after = m(x).detach()
    torch.testing.assert_close(after[:, [1, 3]], before[:, [1, 3]], rtol=0, atol=0)
    assert getattr(m, CONFIG_ATTR)[0]["layers"] == ["heads.1", "heads.3"]
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 2 * 2 * (5 + 6)


# ----------------------------------------------------------------------------- discretization
@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, 3.0]), min_size=1, max_size=12), st.data())
def test_top_k_is_exactly_k_with_stable_ties(values, data):
    k = data.draw(st.integers(1, len(values)))
    got = top_k(torch.tensor(values), k)
    assert len(got) == k == len(set(got))
    ref = np.argsort(-np.array(values), kind="stable")[:k]
    assert got == ref.tolist()
    rest = [v for i, v in enumerate(values) if i not in got]
    assert not rest or min(values[i] for i in got) >= max(rest)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_keep_only_respects_k_and_leaves_kept_outputs_unchanged(k):
    m = _model(6)
    g = ModuleGates(m)
    with torch.no_grad():
        g.logits.copy_(torch.tensor([0.1, 0.9, -0.3, 0.5]))
    x = torch.randn(4, 6, dtype=torch.float64)
    before = m(x).detach()
    chosen = select_and_prune(m, g, k)
    assert chosen == ["heads.1", "heads.3", "heads.0", "heads.2"][:k]
    assert len(adapted_layers(m)) == k
    idx = [int(n.split(".")[1]) for n in chosen]
    torch.testing.assert_close(m(x).detach()[:, idx], before[:, idx], rtol=0, atol=0)


def test_keep_only_unmerges_a_merged_dropped_layer_and_keeps_ungated_layers():
    m = _model(7)
    W0 = {n: layer.base.weight.detach().clone() for n, layer in adapted_layers(m).items()}
    merge(m)
    dropped = keep_only(m, ["heads.2"])
    assert dropped == ["heads.0", "heads.1", "heads.3"]
    for n in dropped:
        np.testing.assert_allclose(m.get_submodule(n).weight.detach().numpy(), W0[n].numpy(), **TOL)
    m2 = _model(8)
    g = ModuleGates(m2, layers=["heads.0", "heads.1"])
    with torch.no_grad():
        g.logits.copy_(torch.tensor([0.0, 1.0]))
    assert select_and_prune(m2, g, 1) == ["heads.1"]
    assert list(adapted_layers(m2)) == ["heads.1", "heads.2", "heads.3"]  # ungated layers stay


# ----------------------------------------------------------------------------- bad arguments
def test_bad_arguments():
    m = _model(9)
    with pytest.raises(ValueError, match="relaxation"):
        ModuleGates(m, relaxation="gumbel")
    with pytest.raises(ValueError, match="temperature"):
        ModuleGates(m, temperature=0.0)
    with pytest.raises(ValueError, match="init"):
        ModuleGates(m, init=float("nan"))
    with pytest.raises(ValueError, match="layers"):
        ModuleGates(m, layers=["heads.9"])
    with pytest.raises(ValueError, match="layers"):
        ModuleGates(m, layers=["heads.0", "heads.0"])
    with pytest.raises(ValueError, match="adapted layer"):
        ModuleGates(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="k must"):
        top_k(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="k must"):
        top_k(torch.zeros(3), 0)
    with pytest.raises(TypeError, match="k must"):
        top_k(torch.zeros(3), 1.0)
    with pytest.raises(TypeError, match="scores"):
        top_k(torch.zeros(2, 2), 1)
    with pytest.raises(ValueError, match="NaN"):
        top_k(torch.tensor([0.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="names"):
        keep_only(m, [])
    with pytest.raises(ValueError, match="names"):
        keep_only(m, ["heads.0", "nope"])
    assert len(adapted_layers(m)) == 4  # refused calls changed nothing
    with pytest.raises(TypeError, match="gates"):
        select_and_prune(m, [0.1, 0.2], 1)
    merge(m)
    with pytest.raises(ValueError, match="merged"):
        ModuleGates(m).attach()


def test_a_layer_merged_while_gated_is_refused():
    m = _model(10)
    g = ModuleGates(m).attach()
    next(iter(adapted_layers(m).values())).merge()
    with pytest.raises(ValueError, match="merged"):
        m(torch.randn(2, 6, dtype=torch.float64))
    assert isinstance(m.heads[0], AdaptedLinear)
    g.detach()
