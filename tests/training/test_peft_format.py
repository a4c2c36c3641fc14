"""PEFT's on-disk LoRA format, both ways, checked by PEFT 0.21 itself.

Export: our adapted model is written with ``export_peft``, loaded by ``PeftModel.from_pretrained``
into a copy of the base model, and PEFT's outputs and PEFT's merged weights
(``merge_and_unload``) must equal ours.  Import: PEFT builds and saves an adapter
(``get_peft_model`` + ``save_pretrained``) with its tensors moved off their init, ``import_peft``
loads it into a copy of the base model, and our outputs must equal PEFT's.

Tolerances: GPT-2 runs in float64 (``tol(float64)``); MiniLM in float32 (``tol(float32)``): PEFT
and we apply the same factors in a different order of operations (PEFT scales after B, we
scale after both), so results agree to round-off, not bit for bit.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_theory.training import adapted_layers, export_peft, import_peft, inject, merge
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

peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer  # noqa: E402

F32, F64 = tol(torch.float32), tol(torch.float64)
PATTERN = {"alpha_pattern": {r"encoder\.layer\.0\..*": 6}}
CONV1D = {"fan_in_fan_out": True}  # PEFT's flag for GPT-2's transposed Conv1D weights (it warns without it)


@pytest.fixture(scope="module")
def minilm_base() -> nn.Module:
    return load_minilm()


def _case(which: str, minilm_base: nn.Module):
    if which == "minilm":
        return copy.deepcopy(minilm_base), minilm_inputs(), F32
    return tiny_gpt2(), gpt2_inputs(), F64


def _peft_load(base: nn.Module, path) -> nn.Module:
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def _check_against_peft(model: nn.Module, base: nn.Module, inputs, tl, path) -> None:
    """Export ``model``; PEFT's outputs and merged weights must equal ours."""
    export_peft(model, path)
    pm = _peft_load(base, path)
    y = output(model, inputs)
    assert float((y - output(base, inputs)).abs().max()) > 1e-4, "adapters must be away from identity"
    torch.testing.assert_close(output(pm, inputs), y, **tl)
    merged_peft = pm.merge_and_unload()
    merge(model)
    for name, layer in adapted_layers(model).items():
        torch.testing.assert_close(merged_peft.get_submodule(name).weight, layer.base.weight, **tl)


# ============================================================================ export
@pytest.mark.parametrize(
    ("which", "targets", "cfg"),
    [
        ("minilm", ["query", "value"], {"rank": 4, "alpha": 8.0}),
        ("minilm", "attention.output.dense", {"rank": 2, "alpha": 3.0, "rslora": True}),
        ("gpt2", "all-linear", {"rank": 3, "alpha": 5.0}),
        ("gpt2", ["c_attn", "c_proj"], {"rank": 4, "alpha": 2.0, "rslora": True}),
    ],
)
def test_export_lora_matches_peft(tmp_path, minilm_base, which, targets, cfg):
    model, inputs, tl = _case(which, minilm_base)
    base = copy.deepcopy(model)
    inject(model, "lora", targets=targets, **cfg)
    randomize_adapters(model, scale=0.05)
    _check_against_peft(model, base, inputs, tl, tmp_path)
    pcfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (pcfg["r"], pcfg["lora_alpha"], pcfg["use_rslora"]) == (cfg["rank"], cfg["alpha"], cfg.get("rslora", False))
    assert pcfg["fan_in_fan_out"] is (which == "gpt2")
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.{n}.lora_{p}.weight" for n in adapted_layers(model) for p in "AB"}


def test_export_nonuniform_ranks_alphas_and_scales(tmp_path):
    # three injections: rank/alpha differ per group and one group uses rsLoRA, the others not
    model = tiny_gpt2()
    base = copy.deepcopy(model)
    inject(model, "lora", targets="c_attn", rank=2, alpha=4.0)
    inject(model, "lora", targets="c_fc", rank=4, alpha=3.0, rslora=True)
    inject(model, "lora", targets="h.1.mlp.c_proj", rank=2, alpha=4.0)
    randomize_adapters(model)
    _check_against_peft(model, base, gpt2_inputs(), F64, tmp_path)
    pcfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert pcfg["r"] == 2 and set(pcfg["rank_pattern"].values()) == {4}


@pytest.mark.parametrize(("which", "targets"), [("gpt2", "all-linear"), ("minilm", ["key", "dense"])])
def test_export_dora_matches_peft(tmp_path, minilm_base, which, targets):
    model, inputs, tl = _case(which, minilm_base)
    base = copy.deepcopy(model)
    inject(model, "dora", targets=targets, rank=2, alpha=4.0)
    randomize_adapters(model, scale=0.05)
    _check_against_peft(model, base, inputs, tl, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True


def test_export_errors(tmp_path):
    # a method PEFT lacks: the message names every method that exports (from the one table)
    with pytest.raises(ValueError, match="no counterpart of 'nola'") as err:
        export_peft(inject(tiny_gpt2(), "nola", targets="c_fc", rank=2, num_basis_a=3, num_basis_b=3), tmp_path)
    for name in ("adalora", "dora", "fourierft", "hut", "lora", "randlora", "unilora", "vera"):
        assert name in str(err.value)
    two_types = inject(tiny_gpt2(), "lora", targets="c_fc", rank=2)
    inject(two_types, "vera", targets="c_attn", rank=4)
    with pytest.raises(ValueError, match="one PEFT adapter holds one method"):
        export_peft(two_types, tmp_path)
    mixed = inject(tiny_gpt2(), "lora", targets="c_fc", rank=2)
    inject(mixed, "dora", targets="c_attn", rank=2)
    with pytest.raises(ValueError, match="use_dora is global"):
        export_peft(mixed, tmp_path)
    drop = inject(tiny_gpt2(), "lora", targets="c_fc", rank=2, dropout=0.1)
    inject(drop, "lora", targets="c_attn", rank=2)
    with pytest.raises(ValueError, match="lora_dropout"):
        export_peft(drop, tmp_path)
    with pytest.raises(ValueError, match="merged"):
        export_peft(merge(inject(tiny_gpt2(), "lora", targets="c_fc", rank=2)), tmp_path)
    with pytest.raises(ValueError, match="no adapted layer"):
        export_peft(tiny_gpt2(), tmp_path)


# ============================================================================ import
def _peft_saved(base: nn.Module, path, **lora_cfg) -> nn.Module:
    """A PEFT LoRA model on a copy of ``base`` with every adapter tensor moved off its init, saved to ``path``."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora_cfg))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    pm.eval()
    pm.save_pretrained(str(path))
    return pm


@pytest.mark.parametrize(
    ("which", "lora_cfg"),
    [
        ("minilm", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "rank_pattern": {"value": 2}}),
        ("minilm", {"r": 2, "lora_alpha": 3, "target_modules": ["output.dense"], "use_rslora": True, **PATTERN}),
        ("gpt2", {"r": 3, "lora_alpha": 6, "target_modules": ["c_attn", "c_fc"], "use_rslora": True, **CONV1D}),
        ("gpt2", {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_proj"], "use_dora": True, **CONV1D}),
    ],
)
def test_import_from_peft(tmp_path, minilm_base, which, lora_cfg):
    base, inputs, tl = _case(which, minilm_base)
    pm = _peft_saved(base, tmp_path, **lora_cfg)
    y_peft = output(pm, inputs)
    assert float((y_peft - output(base, inputs)).abs().max()) > 1e-4
    ours = import_peft(copy.deepcopy(base), tmp_path)
    method = "dora" if lora_cfg.get("use_dora") else "lora"
    layers = adapted_layers(ours)
    peft_layers = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == peft_layers
    assert {type(layer.adapter).name for layer in layers.values()} == {method}
    torch.testing.assert_close(output(ours, inputs), y_peft, **tl)
    for name, layer in layers.items():  # per-layer scale s = alpha/r or alpha/sqrt(r), from the patterns
        assert layer.adapter.scale == pytest.approx(pm.get_submodule(f"base_model.model.{name}").scaling["default"])


def _good_peft_dir(path) -> None:
    _peft_saved(tiny_gpt2(), path, r=2, lora_alpha=4, target_modules=["c_attn"], **CONV1D)


def _edit_cfg(path, **kv):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(kv)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    t = load_file(str(path / "adapter_model.safetensors"))
    fn(t)
    save_file(t, str(path / "adapter_model.safetensors"))


A_KEY = "base_model.model.h.1.attn.c_attn.lora_A.weight"
IMPORT_ERRORS = {
    "peft_type": (lambda p: _edit_cfg(p, peft_type="IA3"), "peft_type must be one of 'LORA'"),
    "bias": (lambda p: _edit_cfg(p, bias="all"), "bias='all'"),
    "modules_to_save": (lambda p: _edit_cfg(p, modules_to_save=["ln_f"]), "modules_to_save"),
    "pickle only": (
        lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"),
        "only safetensors",
    ),
    "unknown key": (
        lambda p: _edit_tensors(p, lambda t: t.update({"base_model.model.x.lora_E": t[A_KEY].clone()})),
        "lora_E",
    ),
    "missing B": (lambda p: _edit_tensors(p, lambda t: t.pop(A_KEY.replace("lora_A", "lora_B"))), "expected"),
    "rank": (lambda p: _edit_cfg(p, r=3), "rank 2, the config says 3"),
    "no module": (
        lambda p: _edit_tensors(
            p, lambda t: t.update({k.replace("h.1", "h.7"): v.clone() for k, v in list(t.items())})
        ),
        "matched no module",
    ),
    "width": (lambda p: _edit_tensors(p, lambda t: t.update({A_KEY: torch.zeros(2, 31)})), "shape"),
    "nan": (lambda p: _edit_tensors(p, lambda t: t[A_KEY].view(-1).__setitem__(0, float("nan"))), "NaN"),
    "corrupt": (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 5), "safetensors"),
}


@pytest.mark.parametrize("case", sorted(IMPORT_ERRORS))
def test_import_errors_leave_model_unchanged(tmp_path, case):
    _good_peft_dir(tmp_path)
    corrupt, match = IMPORT_ERRORS[case]
    corrupt(tmp_path)
    model = tiny_gpt2()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        import_peft(model, tmp_path)
    assert_unchanged(model, snap)
