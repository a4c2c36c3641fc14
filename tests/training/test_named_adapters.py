"""Several named adapters per layer and per model, merge_and_unload / unload, and checkpoints by name.

References: the dense formula ``x (W0 + Σ_active ΔW)ᵀ + b`` in float64 (tolerance 1e-10: short chains of
products), the model before injection (state-dict keys, outputs, requires_grad flags), and the public
checker (``lowrank_theory.testing``) for the layer behaviour with two active adapters.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.testing import check_adapter, seeded_linear, tol
from lowrank_theory.training import (
    active_adapters,
    adapted_layers,
    adapter_names,
    delete_adapter,
    disable,
    inject,
    load_adapters,
    merge,
    merge_and_unload,
    save_adapters,
    set_adapter,
    unload,
    unmerge,
)
from lowrank_theory.training.data import tiny_gpt2
from tests.adapters.contract import randomize_

F64 = tol(torch.float64)


def _x(d_in, seed=3, dtype=torch.float64):
    return torch.randn(4, d_in, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def two_adapter_layer(d_out=12, d_in=20, dtype=torch.float64, moved=True):
    base = seeded_linear(d_out, d_in, dtype)
    a = adapters.create("lora", d_out, d_in, rank=2).to(dtype)
    b = adapters.create("vera", d_out, d_in, rank=4).to(dtype)
    layer = AdaptedLinear(base, randomize_(a, 1) if moved else a)
    layer.add_adapter("b", randomize_(b, 2) if moved else b)
    return layer


# ============================================================================ one layer
def test_added_adapter_is_inactive_and_frozen_until_set():
    layer = two_adapter_layer()
    x = _x(20)
    W, b = layer.weight, layer.bias
    dw_a = layer.adapters["default"].delta_weight()
    dw_b = layer.adapters["b"].delta_weight()
    assert layer.active_adapters == ("default",)
    assert not any(p.requires_grad for p in layer.adapters["b"].parameters())
    torch.testing.assert_close(layer(x), x @ (W + dw_a).T + b, **F64)
    layer.set_adapter(["default", "b"])  # several active: their updates add, as in PEFT
    assert all(p.requires_grad for p in layer.adapters["b"].parameters())
    torch.testing.assert_close(layer(x), x @ (W + dw_a + dw_b).T + b, **F64)
    layer.set_adapter("b")
    assert not any(p.requires_grad for p in layer.adapters["default"].parameters())
    torch.testing.assert_close(layer(x), x @ (W + dw_b).T + b, **F64)
    layer.set_adapter([])
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)


def test_two_active_adapters_pass_the_checker():
    def factory(d_out, d_in, dtype):
        layer = two_adapter_layer(d_out, d_in, dtype, moved=False)
        layer.set_adapter(["default", "b"])
        return layer

    report = check_adapter(factory, raise_on_failure=False, skip=["config_roundtrip", "param_count"])
    assert report.passed, str(report)


def test_merge_acts_on_the_active_adapters_and_refuses_switching_while_merged():
    layer = two_adapter_layer()
    layer.set_adapter(["default", "b"])
    x = _x(20)
    y = layer(x).detach()
    W0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged_adapters == ("default", "b")
    torch.testing.assert_close(layer(x), y, **F64)
    with pytest.raises(ValueError, match="unmerge"):
        layer.set_adapter("b")
    with pytest.raises(ValueError, match="merged"):
        layer.delete_adapter("b")
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x), x @ W0.T + layer.bias, **F64)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, W0, **F64)


def test_multiplicative_adapter_is_active_alone():
    base = seeded_linear(8, 6)
    ad, _ = adapters.get("dora").from_weight(base.weight.detach(), rank=2)
    layer = AdaptedLinear(base, adapters.create("lora", 8, 6, rank=2).double())
    layer.add_adapter("d", ad.double())
    with pytest.raises(ValueError, match="multiplicative"):
        layer.set_adapter(["default", "d"])
    assert layer.active_adapters == ("default",)  # unchanged by the refusal
    layer.set_adapter("d")
    assert layer.active_adapters == ("d",)


def test_adapter_attribute_assignment_replaces_the_active_adapter():
    layer = two_adapter_layer()
    new = adapters.create("lora", 12, 20, rank=3).double()
    layer.adapter = new  # nn.Module.__setattr__ would register a stray submodule named "adapter"
    assert layer.adapters["default"] is new and layer.adapter is new
    assert "adapter" not in dict(layer.named_children())
    layer.set_adapter(["default", "b"])
    with pytest.raises(ValueError, match="2 active adapters"):
        _ = layer.adapter


def test_bad_names_are_refused_before_any_change():
    layer = two_adapter_layer()
    for bad, exc in ((3, TypeError), ("", ValueError), ("a.b", ValueError), ("default", ValueError)):
        with pytest.raises(exc, match="adapter_name"):
            layer.add_adapter(bad, adapters.create("lora", 12, 20, rank=2).double())
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        layer.set_adapter(["default", "zz"])
    with pytest.raises(ValueError, match="distinct"):
        layer.set_adapter(["b", "b"])
    assert layer.active_adapters == ("default",) and list(layer.adapters) == ["default", "b"]


# ============================================================================ a model
@pytest.fixture
def gpt2():
    torch.manual_seed(0)
    return tiny_gpt2().double()


def _ids():
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def _out(model):
    return model(_ids()).last_hidden_state


def _moved(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_model_level_names_activation_merge_and_disable(gpt2):
    base = copy.deepcopy(gpt2)
    inject(gpt2, "lora", targets="c_attn", rank=2)
    _moved(gpt2)
    inject(gpt2, "vera", targets=["c_attn", "c_fc"], adapter_name="v", rank=4)
    assert adapter_names(gpt2) == ["default", "v"] and active_adapters(gpt2) == ["default", "v"]
    # c_fc's only adapter is v (active there); c_attn holds both, with v added inactive
    assert adapted_layers(gpt2)["h.0.attn.c_attn"].active_adapters == ("default",)
    set_adapter(gpt2, "v")
    _moved(gpt2)  # trains v only (default is frozen now)
    set_adapter(gpt2, ["default", "v"])
    y = _out(gpt2).detach()
    assert not torch.allclose(y, _out(base))
    merge(gpt2)
    torch.testing.assert_close(_out(gpt2), y, **F64)
    with disable(gpt2):
        torch.testing.assert_close(_out(gpt2), _out(base), **F64)
    unmerge(gpt2)
    with pytest.raises(ValueError, match="no layer holds an adapter named 'zz'"):
        delete_adapter(gpt2, "zz")
    delete_adapter(gpt2, "v")
    assert adapter_names(gpt2) == ["default"]
    assert all(r.get("adapter_name") == "default" for r in gpt2.lowrank_adapter_config)


def test_merge_and_unload_gives_back_the_plain_model(gpt2):
    base = copy.deepcopy(gpt2)
    keys = list(gpt2.state_dict())
    flags = {n: p.requires_grad for n, p in gpt2.named_parameters()}
    inject(gpt2, "lora", targets=["c_attn", "c_proj"], rank=2)
    inject(gpt2, "randlora", targets="c_fc", adapter_name="r", rank=4)
    set_adapter(gpt2, ["default", "r"])
    _moved(gpt2)
    y = _out(gpt2).detach()
    out = merge_and_unload(gpt2)
    assert out is gpt2 and not adapted_layers(gpt2) and not hasattr(gpt2, "lowrank_adapter_config")
    assert list(gpt2.state_dict()) == keys
    assert {n: p.requires_grad for n, p in gpt2.named_parameters()} == flags
    torch.testing.assert_close(_out(gpt2), y, **F64)  # float64 weights: one rounding each
    assert not torch.allclose(_out(gpt2), _out(base))


def test_unload_drops_adapters_and_restores_the_weights(gpt2):
    base = copy.deepcopy(gpt2)
    inject(gpt2, "lora", targets="c_attn", rank=2)
    _moved(gpt2)
    merge(gpt2)
    unload(gpt2)  # unmerges first, so the frozen weights come back
    assert list(gpt2.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(_out(gpt2), _out(base), **F64)


def test_merge_and_unload_refuses_a_nonfinite_merge_without_changing_anything(gpt2):
    inject(gpt2, "lora", targets=["c_attn", "c_fc"], rank=2)
    layer = adapted_layers(gpt2)["h.0.mlp.c_fc"]
    with torch.no_grad():
        layer.adapter.B[0, 0] = float("inf")
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_fc"):
        merge_and_unload(gpt2)
    assert adapted_layers(gpt2) and all(torch.equal(v, before[k]) for k, v in gpt2.state_dict().items())


def test_save_and_load_by_name_and_all(gpt2, tmp_path):
    inject(gpt2, "lora", targets="c_attn", rank=2)
    inject(gpt2, "vera", targets=["c_attn", "c_fc"], adapter_name="v", rank=4, seed=3)
    set_adapter(gpt2, ["default", "v"])
    _moved(gpt2)
    y = _out(gpt2).detach()
    save_adapters(gpt2, tmp_path / "all", adapter_name=None)
    assert (tmp_path / "all" / "adapter_config.json").is_file()
    assert (tmp_path / "all" / "v" / "adapter_config.json").is_file()
    save_adapters(gpt2, tmp_path / "only_v", adapter_name="v")
    fresh = tiny_gpt2().double()
    load_adapters(fresh, tmp_path / "all", inject=True, adapter_name=None)
    assert adapter_names(fresh) == ["default", "v"]
    set_adapter(fresh, ["default", "v"])
    torch.testing.assert_close(_out(fresh), y, **F64)
    # one adapter loaded under another name
    other = tiny_gpt2().double()
    load_adapters(other, tmp_path / "only_v", inject=True, adapter_name="w")
    assert adapter_names(other) == ["w"]
    with pytest.raises(ValueError, match="no adapted layer holding an adapter named 'v'"):
        load_adapters(other, tmp_path / "only_v", adapter_name="v")


def test_frozen_basis_seeds_come_from_the_file(gpt2, tmp_path):
    inject(gpt2, "vera", targets="c_attn", rank=4, seed=11)
    _moved(gpt2)
    y = _out(gpt2).detach()
    save_adapters(gpt2, tmp_path)
    other = inject(tiny_gpt2().double(), "vera", targets="c_attn", rank=4, seed=12)  # another frozen pair
    assert not torch.allclose(_out(other), y)
    load_adapters(other, tmp_path)  # the file's seed rebuilds the pair the adapter was trained with
    torch.testing.assert_close(_out(other), y, **F64)
    assert adapted_layers(other)["h.0.attn.c_attn"].adapter.config()["seed"] == 11
    with pytest.raises(ValueError, match="config mismatch"):  # a rank is no seed: still an error
        load_adapters(inject(tiny_gpt2().double(), "vera", targets="c_attn", rank=5, seed=11), tmp_path)


def test_from_weight_method_is_not_added_next_to_other_adapters(gpt2):
    inject(gpt2, "lora", targets="c_attn", rank=2)
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    with pytest.raises(ValueError, match="rewrites the base weight"):
        inject(gpt2, "pissa", targets="c_attn", adapter_name="p", rank=2)
    assert all(torch.equal(v, before[k]) for k, v in gpt2.state_dict().items())
    inject(gpt2, "pissa", targets="c_attn", adapter_name="p", rank=2, from_weight=False)  # a plain shell is fine
    assert adapter_names(gpt2) == ["default", "p"]


def test_inject_on_a_linear_only_model_keeps_working():
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    inject(m, "lora", rank=2)
    with pytest.raises(ValueError, match="already holds an adapter named 'default'"):
        inject(m, "lora", rank=2)
    inject(m, "lora", rank=1, adapter_name="second")
    assert adapter_names(m) == ["default", "second"]
