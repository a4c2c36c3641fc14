"""``save_adapters`` / ``load_adapters``: round trips, what is (not) stored, and bad files.

A round trip must reproduce the saved model's outputs bit for bit (same ops on the same numbers,
so ``rtol=atol=0``), and a freshly injected model must differ before loading (else the test
proves nothing).  Every bad file must raise ``ValueError`` and leave the model exactly as it was
(all tensors, module types and requires_grad flags compared with a snapshot).
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_theory.adapters.projection import UniLoRAShared
from lowrank_theory.training import adapted_layers, inject, load_adapters, merge, save_adapters
from lowrank_theory.training.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import tol
from tests.training import (
    assert_unchanged,
    gpt2_inputs,
    load_minilm,
    minilm_inputs,
    output,
    randomize_adapters,
    snapshot,
    tiny_gpt2,
)

EXACT = dict(rtol=0, atol=0)


def trained(method: str = "lora", targets="all-linear", **cfg) -> nn.Module:
    model = inject(tiny_gpt2(), method, targets=targets, **cfg)
    randomize_adapters(model)
    return model


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert float((a - b).abs().max()) > 1e-4


# ============================================================================ round trips
def test_roundtrip_into_injected_model(tmp_path):
    model = trained(rank=3, alpha=6.0, seed=0)
    y = output(model, gpt2_inputs())
    save_adapters(model, tmp_path)
    stored = load_file(str(tmp_path / WEIGHTS_NAME))
    layers = adapted_layers(model)
    assert set(stored) == {f"{n}.adapter.{k}" for n in layers for k in ("A", "B")}  # no base weight
    for n, layer in layers.items():
        torch.testing.assert_close(stored[f"{n}.adapter.B"], layer.adapter.B.detach(), **EXACT)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["layers"]["h.0.attn.c_attn"]["shape"] == [96, 32]
    assert cfg["layers"]["h.0.attn.c_attn"]["seeds"] == {"seed": 0}
    assert cfg["injections"][0]["cfg"] == {"rank": 3, "alpha": 6.0, "seed": 0}
    fresh = inject(tiny_gpt2(), "lora", targets="all-linear", rank=3, alpha=6.0, seed=0)
    assert_differs(output(fresh, gpt2_inputs()), y)
    load_adapters(fresh, tmp_path)
    torch.testing.assert_close(output(fresh, gpt2_inputs()), y, **EXACT)


def test_roundtrip_inject_true_minilm(tmp_path):
    base = load_minilm()
    model = inject(copy.deepcopy(base), "lora", targets=["query", "value"], rank=2, alpha=4.0, rslora=True)
    randomize_adapters(model, scale=0.05)
    y = output(model, minilm_inputs())
    save_adapters(model, tmp_path)
    loaded = load_adapters(base, tmp_path, inject=True)
    assert loaded is base and len(adapted_layers(base)) == 12
    assert all(not p.requires_grad for n, p in base.named_parameters() if ".adapters." not in n)
    torch.testing.assert_close(output(base, minilm_inputs()), y, **EXACT)


def test_frozen_random_bases_are_regenerated_not_stored(tmp_path):
    model = trained("vera", rank=16, seed=7)
    y = output(model, gpt2_inputs())
    save_adapters(model, tmp_path)
    assert {k.rsplit(".", 1)[-1] for k in load_file(str(tmp_path / WEIGHTS_NAME))} == {"b", "d"}
    fresh = tiny_gpt2()
    load_adapters(fresh, tmp_path, inject=True)
    torch.testing.assert_close(output(fresh, gpt2_inputs()), y, **EXACT)


def test_shared_vector_stored_once(tmp_path):
    model = trained("unilora", targets=["c_attn", "c_fc"], rank=2, shared=UniLoRAShared(48, seed=2))
    y = output(model, gpt2_inputs())
    save_adapters(model, tmp_path)
    stored = load_file(str(tmp_path / WEIGHTS_NAME))
    assert list(stored) == ["h.0.attn.c_attn.adapter.shared.theta_d"] and stored[next(iter(stored))].shape == (48,)
    aliases = json.loads((tmp_path / CONFIG_NAME).read_text())["aliases"]
    assert len(aliases) == 3 and set(aliases.values()) == set(stored)
    base = tiny_gpt2()
    with pytest.raises(ValueError, match="shared"):  # the user-built object was not saved
        load_adapters(base, tmp_path, inject=True)
    assert not adapted_layers(base)
    with pytest.raises(ValueError, match="config mismatch"):  # another seed: another projection
        load_adapters(base, tmp_path, inject=True, shared=UniLoRAShared(48, seed=3))
    load_adapters(base, tmp_path, inject=True, shared=UniLoRAShared(48, seed=2))
    torch.testing.assert_close(output(base, gpt2_inputs()), y, **EXACT)


def test_learned_locations_are_stored(tmp_path):
    model = trained("loca", targets="c_proj", n_frequency=20)
    g = torch.Generator().manual_seed(0)
    for layer in adapted_layers(model).values():
        layer.adapter.set_locations(torch.randint(0, 32, (20, 2), generator=g))
    y = output(model, gpt2_inputs())
    save_adapters(model, tmp_path)
    fresh = inject(tiny_gpt2(), "loca", targets="c_proj", n_frequency=20)
    load_adapters(fresh, tmp_path)
    for name, layer in adapted_layers(fresh).items():
        torch.testing.assert_close(layer.adapter.locations, model.get_submodule(name).adapter.locations, **EXACT)
    torch.testing.assert_close(output(fresh, gpt2_inputs()), y, **EXACT)


@pytest.mark.parametrize(("method", "cfg"), [("dora", {"rank": 2}), ("lq_lora", {"rank": 2, "iters": 1})])
def test_from_weight_methods_roundtrip(tmp_path, method, cfg):
    model = trained(method, targets="c_fc", **cfg)
    y = output(model, gpt2_inputs())
    save_adapters(model, tmp_path)
    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert not any(k.endswith("weight") for k in keys)  # the replaced base (LQ-LoRA's Q) is rebuilt, not stored
    fresh = tiny_gpt2()
    load_adapters(fresh, tmp_path, inject=True)
    torch.testing.assert_close(output(fresh, gpt2_inputs()), y, **EXACT)


def test_never_unpickles(tmp_path, monkeypatch):
    model = trained(rank=2)
    save_adapters(model, tmp_path)
    raw = (tmp_path / WEIGHTS_NAME).read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header])["__metadata__"]["format"] == "pt"  # the safetensors layout

    def boom(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    load_adapters(inject(tiny_gpt2(), "lora", targets="all-linear", rank=2), tmp_path)


# ============================================================================ bad files
def _rewrite(path, fn):
    tensors = load_file(str(path / WEIGHTS_NAME))
    fn(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))


def _edit_json(path, fn):
    cfg = json.loads((path / CONFIG_NAME).read_text())
    fn(cfg)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))


KEY = "h.0.attn.c_attn.adapter.A"
CORRUPTIONS = {
    "truncated": (lambda p: (p / WEIGHTS_NAME).write_bytes((p / WEIGHTS_NAME).read_bytes()[:-7]), "safetensors"),
    "garbage": (lambda p: (p / WEIGHTS_NAME).write_bytes(b"not a tensor file"), "safetensors"),
    "no weights": (lambda p: (p / WEIGHTS_NAME).unlink(), "does not exist"),
    "bad json": (lambda p: (p / CONFIG_NAME).write_text("{"), "not valid JSON"),
    "format": (lambda p: _edit_json(p, lambda c: c.update(format_version=99)), "v1 config"),
    "missing key": (lambda p: _rewrite(p, lambda t: t.pop(KEY)), "missing keys"),
    "extra key": (lambda p: _rewrite(p, lambda t: t.update(extra=torch.zeros(2))), "unexpected keys"),
    "shape": (lambda p: _rewrite(p, lambda t: t.update({KEY: torch.zeros(3, 32)})), "shape mismatch"),
    "dtype": (lambda p: _rewrite(p, lambda t: t.update({KEY: torch.zeros(2, 32, dtype=torch.int64)})), "dtype"),
    "nan": (lambda p: _rewrite(p, lambda t: t[KEY].view(-1).__setitem__(5, float("nan"))), "NaN"),
    "method": (lambda p: _edit_json(p, lambda c: c["layers"][KEY[:-10]].update(method="vera")), "method mismatch"),
    "alpha": (lambda p: _edit_json(p, lambda c: c["layers"][KEY[:-10]]["config"].update(alpha=5.0)), "config"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
@pytest.mark.parametrize("inject_first", [False, True])
def test_bad_file_raises_and_leaves_model_unchanged(tmp_path, case, inject_first):
    save_adapters(trained(rank=2, seed=0), tmp_path)
    corrupt, match = CORRUPTIONS[case]
    corrupt(tmp_path)
    model = tiny_gpt2()
    if inject_first:
        model = inject(model, "lora", targets="all-linear", rank=2, seed=0)
        randomize_adapters(model, seed=9)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapters(model, tmp_path, inject=not inject_first)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda m: inject(m, "vera", targets="all-linear", rank=2), "method mismatch"),
        (
            lambda m: inject(m, "lora", targets="all-linear", rank=2, alpha=3.0, seed=0),
            r"config mismatch in \['alpha'\]",
        ),
        (lambda m: inject(m, "lora", targets="c_attn", rank=2, seed=0), "adapted layers differ"),
        (lambda m: merge(inject(m, "lora", targets="all-linear", rank=2, seed=0)), "merged"),
        (lambda m: m, "no adapted layer"),
    ],
)
def test_mismatched_model_raises_and_is_unchanged(tmp_path, setup, match):
    save_adapters(trained(rank=2, seed=0), tmp_path)
    model = setup(tiny_gpt2())
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapters(model, tmp_path)
    assert_unchanged(model, snap)


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no adapted layer"):
        save_adapters(tiny_gpt2(), tmp_path)
    model = trained(rank=2)
    with torch.no_grad():
        adapted_layers(model)["h.1.mlp.c_fc"].adapter.B[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.adapter\.B.*NaN or Inf"):
        save_adapters(model, tmp_path)
    with pytest.raises(TypeError, match="inject=True"):
        load_adapters(model, tmp_path, rank=3)


@pytest.mark.parametrize("method", ["fourierft", "loca"])
def test_checkpoints_load_across_compute_paths(tmp_path, method):
    """``path`` chooses how the update is computed, not what it is: a checkpoint written with one
    path loads into a model built with another and gives its outputs; a real config difference is
    still refused."""
    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 10)).double()

    src = base()
    inject(src, method, targets=["0"], n_frequency=7, path="dense")
    with torch.no_grad():
        next(iter(adapted_layers(src)["0"].adapter.parameters())).normal_()
    save_adapters(src, tmp_path)
    dst = base()
    inject(dst, method, targets=["0"], n_frequency=7, path="structured")
    x = torch.randn(5, 12, dtype=torch.float64)
    assert not torch.allclose(dst(x), src(x))  # before loading: different coefficients
    load_adapters(dst, tmp_path)
    torch.testing.assert_close(dst(x), src(x), **tol(torch.float64))  # two paths: round-off apart
    other = nn.Sequential(nn.Linear(12, 10)).double()
    inject(other, method, targets=["0"], n_frequency=8)
    with pytest.raises(ValueError, match="n_frequency"):
        load_adapters(other, tmp_path)
