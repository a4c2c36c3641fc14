"""PEFT's format for VeRA, RandLoRA, Uni-LoRA, FourierFT, AdaLoRA and HiRA (= our HUT), both ways, checked by PEFT.

Export: our adapted MiniLM (every trainable tensor moved off its init, several layer shapes,
per-layer settings PEFT keeps global where the method allows them) is written with
``export_peft`` and loaded by ``PeftModel.from_pretrained`` into a copy of the base model: PEFT's
outputs must equal ours.  Import: PEFT builds an adapter on MiniLM (``get_peft_model``, tensors
moved off their init, ``save_pretrained``), ``import_peft`` loads it into a copy of the base
model: our outputs must equal PEFT's.  The round trips ours -> PEFT -> ours and PEFT -> ours ->
our checkpoint -> ours must keep the outputs too.

Tolerance ``tol(float32)`` (rtol 2e-4, atol 2e-5, tests/conftest.py): MiniLM runs in float32, PEFT
and we apply the same numbers in a different order (FourierFT: PEFT's dense ifft2 against our
rFFT path; AdaLoRA: PEFT's alpha/(r + 1e-5) against our folded alpha/r; folded scales: one extra
rounding), so the outputs agree to float32 round-off through six transformer blocks.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_theory.adapters.projection import UniLoRA, UniLoRAShared, balanced_indices
from lowrank_theory.adapters.random_basis import RandLoRA, VeRA
from lowrank_theory.training import adapted_layers, export_peft, import_peft, inject, load_adapters, save_adapters
from lowrank_theory.training.peft_format import peft_type_of
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

F32 = tol(torch.float32)
QV = ["query", "value"]
SHAPES = ["query", "intermediate.dense", "output.dense"]  # 384x384, 1536x384 and 384x1536 (m < n)
# RandLoRA files repeat the (1536, N, r) bases under every layer (PEFT's layout): three layers keep them small
SHAPES_L0 = [f"encoder.layer.0.{n}" for n in ("attention.self.query", "intermediate.dense", "output.dense")]


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return load_minilm()


def _away_from(model: nn.Module, base: nn.Module, inputs) -> torch.Tensor:
    y = output(model, inputs)
    assert float((y - output(base, inputs)).abs().max()) > 1e-3, "the adapter must change the outputs"
    return y


def _peft_load(base: nn.Module, path) -> nn.Module:
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


# ============================================================================ export: ours -> PEFT
def _ours_vera(m):
    inject(m, "vera", targets=SHAPES, rank=16, seed=3)


def _ours_randlora(m):
    inject(m, "randlora", targets=SHAPES_L0, rank=96, alpha=40.0, seed=2)  # N = 4 bases of the 16 PEFT keeps


def _ours_randlora_sparse(m):
    inject(m, "randlora", targets=["query", "value"], rank=128, alpha=20.0, seed=4, basis="sparse")


def _ours_unilora(m):
    inject(m, "unilora", targets=["query", "intermediate.dense"], rank=2, shared=UniLoRAShared(96, seed=1), scale=0.7)


def _ours_fourierft(m):
    inject(m, "fourierft", targets="query", n_frequency=40, scaling=120.0, random_loc_seed=5)
    inject(m, "fourierft", targets="intermediate.dense", n_frequency=25, scaling=80.0, random_loc_seed=5)


def _ours_adalora(m):
    inject(m, "adalora", targets=QV, rank=6, alpha=12.0, seed=0)
    inject(m, "adalora", targets="output.dense", rank=4, alpha=2.0, seed=1)  # another scale, folded into E
    randomize_adapters(m, scale=0.05)
    layers = adapted_layers(m)
    layers["encoder.layer.1.attention.self.query"].adapter.prune_to(3)
    layers["encoder.layer.2.attention.self.value"].adapter.prune_to(torch.tensor([True, False] * 3))


def _ours_hut(m):
    inject(m, "hut", targets=QV, rank=2, seed=0)
    inject(m, "hut", targets="intermediate.dense", rank=2, seed=1)


EXPORTS = {
    "vera": (_ours_vera, "VERA"),
    "randlora": (_ours_randlora, "RANDLORA"),
    "randlora_sparse": (_ours_randlora_sparse, "RANDLORA"),
    "unilora": (_ours_unilora, "UNILORA"),
    "fourierft": (_ours_fourierft, "FOURIERFT"),
    "adalora": (_ours_adalora, "ADALORA"),
    "hut": (_ours_hut, "HIRA"),
}


def _ours(base: nn.Module, case: str) -> nn.Module:
    model = copy.deepcopy(base)
    EXPORTS[case][0](model)
    if case != "adalora":
        randomize_adapters(model, scale=0.05 if case != "fourierft" else 0.5)
    return model


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_export_matches_peft(tmp_path, base, case):
    model, inputs = _ours(base, case), minilm_inputs()
    y = _away_from(model, base, inputs)
    assert peft_type_of(model) == EXPORTS[case][1]
    export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == EXPORTS[case][1]
    pm = _peft_load(base, tmp_path)
    torch.testing.assert_close(output(pm, inputs), y, **F32)
    # and back: ours -> PEFT -> ours gives our outputs again
    back = import_peft(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(output(back, inputs), y, **F32)


def test_export_random_bases_round_trip_regenerates_them(tmp_path, base):
    # bases we exported are ours: importing them back needs no stored copy (seed regenerates them)
    for case in ("vera", "randlora"):
        export_peft(_ours(base, case), tmp_path / case)
        back = import_peft(copy.deepcopy(base), tmp_path / case)
        assert not any(layer.adapter.config().get("persistent_basis") for layer in adapted_layers(back).values())


def test_export_hut_adds_one_rank(tmp_path, base):
    export_peft(_ours(base, "hut"), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 3
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tuple(t["base_model.model.encoder.layer.0.attention.self.query.hira_A"].shape) == (3, 384)


def test_export_adalora_rank_pattern(tmp_path, base):
    export_peft(_ours(base, "adalora"), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["init_r"] == 6
    pattern = cfg["rank_pattern"]
    assert pattern["encoder.layer.1.attention.self.query.lora_E"] == [True] * 3 + [False] * 3
    assert sum(pattern["encoder.layer.2.attention.self.value.lora_E"]) == 3
    assert sum(pattern["encoder.layer.0.output.dense.lora_E"]) == 4


def test_export_errors(tmp_path, base):
    m = copy.deepcopy(base)
    inject(m, "vera", targets="query", rank=8)
    inject(m, "vera", targets="value", rank=16)
    with pytest.raises(ValueError, match="one VeRA rank r"):
        export_peft(m, tmp_path)
    m = copy.deepcopy(base)
    inject(m, "vera", targets="query", rank=8, seed=1)
    inject(m, "vera", targets="value", rank=8, seed=2)
    with pytest.raises(ValueError, match="different VeRA pairs"):
        export_peft(m, tmp_path)
    m = copy.deepcopy(base)
    inject(m, "unilora", targets="query", rank=2, shared=UniLoRAShared(32, seed=1))
    inject(m, "unilora", targets="value", rank=2, shared=UniLoRAShared(32, seed=1))
    with pytest.raises(ValueError, match="one theta_d"):
        export_peft(m, tmp_path)
    m = copy.deepcopy(base)
    inject(m, "fourierft", targets="query", n_frequency=10, random_loc_seed=1)
    inject(m, "fourierft", targets="value", n_frequency=10, random_loc_seed=2)
    with pytest.raises(ValueError, match="random_loc_seed"):
        export_peft(m, tmp_path)
    m = copy.deepcopy(base)
    inject(m, "hut", targets="query", rank=2)
    inject(m, "hut", targets="value", rank=3)
    with pytest.raises(ValueError, match="one HiRA rank r"):
        export_peft(m, tmp_path)
    with pytest.raises(ValueError, match="shared_a=False"):
        export_peft(inject(copy.deepcopy(base), "randlora", targets="query", rank=96, shared_a=False), tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


# ============================================================================ import: PEFT -> ours
def _perturb(pm: nn.Module, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _adalora_pruned(pm: nn.Module) -> None:
    """Prune two layers the way PEFT's rank allocator does: zero E outside a mask, record the masks."""
    masks = {
        "encoder.layer.0.attention.self.query": [True, False, True, True, False, True],
        "encoder.layer.3.attention.self.value": [False] * 5 + [True],
    }
    with torch.no_grad():
        for name, mask in masks.items():
            E = pm.base_model.model.get_submodule(name).lora_E["default"]
            E[~torch.tensor(mask)] = 0.0
    pm.peft_config["default"].rank_pattern = {f"{n}.lora_E": m for n, m in masks.items()}


IMPORTS = {
    "vera": (lambda: peft.VeraConfig(r=16, target_modules=SHAPES, projection_prng_key=5), "vera", None),
    "vera_no_projection": (
        lambda: peft.VeraConfig(r=8, target_modules=QV, projection_prng_key=2, save_projection=False),
        "vera",
        None,
    ),
    "randlora": (lambda: peft.RandLoraConfig(r=96, target_modules=SHAPES_L0, randlora_alpha=30), "randlora", None),
    "randlora_very_sparse": (
        lambda: peft.RandLoraConfig(r=128, target_modules=QV, very_sparse=True, projection_prng_key=9),
        "randlora",
        None,
    ),
    "unilora": (
        lambda: peft.UniLoraConfig(r=2, theta_d_length=64, target_modules=QV, proj_seed=7, save_indices=True),
        "unilora",
        None,
    ),
    "unilora_no_indices": (
        lambda: peft.UniLoraConfig(r=3, theta_d_length=100, target_modules=SHAPES, proj_seed=1),
        "unilora",
        None,
    ),
    "fourierft": (
        lambda: peft.FourierFTConfig(
            n_frequency=40, scaling=120.0, random_loc_seed=11, target_modules=SHAPES,
            n_frequency_pattern={"intermediate.dense": 30},
        ),
        "fourierft",
        None,
    ),
    "adalora": (
        lambda: peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=12, total_step=10, target_modules=QV),
        "adalora",
        _adalora_pruned,
    ),
    "hira": (lambda: peft.HiraConfig(r=2, target_modules=SHAPES), "hut", None),
}


def _peft_saved(base: nn.Module, case: str, path) -> tuple[nn.Module, torch.Tensor]:
    make, _, edit = IMPORTS[case]
    pm = peft.get_peft_model(copy.deepcopy(base), make())
    _perturb(pm, 0.5 if case.startswith(("fourierft", "unilora")) else 0.05)
    if edit is not None:
        edit(pm)
    pm.eval()
    pm.save_pretrained(str(path))
    return pm, output(pm, minilm_inputs())


@pytest.mark.parametrize("case", sorted(IMPORTS))
def test_import_from_peft(tmp_path, base, case):
    pm, y_peft = _peft_saved(base, case, tmp_path / "peft")
    assert float((y_peft - output(base, minilm_inputs())).abs().max()) > 1e-3
    ours = import_peft(copy.deepcopy(base), tmp_path / "peft")
    layers = adapted_layers(ours)
    peft_layers = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                   if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)}
    assert set(layers) == peft_layers
    assert {type(layer.adapter).name for layer in layers.values()} == {IMPORTS[case][1]}
    torch.testing.assert_close(output(ours, minilm_inputs()), y_peft, **F32)
    # our checkpoint of the imported model reloads into a fresh base with PEFT's outputs
    save_adapters(ours, tmp_path / "ours")
    extra = {}
    if IMPORTS[case][1] == "unilora":
        sh = next(iter(layers.values())).adapter.shared
        extra["shared"] = UniLoRAShared(sh.d, seed=sh.seed, init_bound=sh.init_bound, index_rule=sh.index_rule)
    again = load_adapters(copy.deepcopy(base), tmp_path / "ours", inject=True, **extra)
    torch.testing.assert_close(output(again, minilm_inputs()), y_peft, **F32)


def test_import_randlora_keeps_peft_bases(tmp_path, base):
    # PEFT's RandLoRA bases come from its own generator: we keep them as given, persistent tensors
    _peft_saved(base, "randlora", tmp_path)
    ours = import_peft(copy.deepcopy(base), tmp_path)
    ad = adapted_layers(ours)["encoder.layer.0.attention.self.query"].adapter
    assert ad.config()["persistent_basis"] is True and "randlora_B" in ad.state_dict()
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    torch.testing.assert_close(ad.randlora_A[0], t["base_model.randlora_A"][:, 0, :384], rtol=0, atol=0)


def test_import_vera_pair_from_seed_or_as_given(tmp_path, base):
    # PEFT's VeRA pair is the one our seed draws: no copy is kept...
    _peft_saved(base, "vera", tmp_path)
    ours = import_peft(copy.deepcopy(base), tmp_path)
    assert all(layer.adapter.config()["persistent_basis"] is False for layer in adapted_layers(ours).values())
    # ...but a pair changed after PEFT drew it is used as it is
    pm = peft.get_peft_model(copy.deepcopy(base), IMPORTS["vera"][0]())
    _perturb(pm)
    with torch.no_grad():
        pm.base_model.vera_A["default"].mul_(1.5)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "changed"))
    ours = import_peft(copy.deepcopy(base), tmp_path / "changed")
    assert all(layer.adapter.config().get("persistent_basis") for layer in adapted_layers(ours).values())
    torch.testing.assert_close(output(ours, minilm_inputs()), output(pm, minilm_inputs()), **F32)


def test_import_unilora_uses_the_seeded_rule(tmp_path, base):
    _peft_saved(base, "unilora", tmp_path)
    ours = import_peft(copy.deepcopy(base), tmp_path)
    sh = next(iter(adapted_layers(ours).values())).adapter.shared
    assert sh.index_rule == "balanced" and sh.seed == 7
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    q = adapted_layers(ours)["encoder.layer.0.attention.self.query"].adapter
    sh.finalize()
    assert torch.equal(sh.indices[q.offset : q.offset + 2 * 384].view(2, 384),
                       t["base_model.model.encoder.layer.0.attention.self.query.unilora_indices_A"])


# ============================================================================ adapter support for PEFT's bases
@pytest.mark.parametrize(("D", "d", "seed"), [(100, 7, 0), (96, 96, 3), (1000, 64, 42), (5, 1, 9)])
def test_balanced_indices_are_peft_generate_index(D, d, seed):
    from peft.tuners.unilora.model import UniLoraModel

    want = UniLoraModel.generate_index(D, d, seed).numpy()
    got = balanced_indices(D, d, seed)
    assert got.dtype == np.int64 and np.array_equal(got, want)
    counts = np.bincount(got, minlength=d)
    assert counts.min() == D // d and counts.max() == -(-D // d)


def test_unilora_index_rule_builds_balanced_projection():
    shared = UniLoRAShared(10, seed=4, index_rule="balanced")
    layer = UniLoRA(6, 5, rank=2, shared=shared)
    assert layer.config()["index_rule"] == "balanced"
    assert UniLoRA(6, 5, rank=2, d=10).config()["index_rule"] == "isometric"  # the default
    shared.finalize()
    assert np.array_equal(shared.indices.numpy(), balanced_indices(22, 10, 4))
    P = torch.zeros(22, 10, dtype=torch.float64)
    P[torch.arange(22), shared.indices] = shared.values.double()
    torch.testing.assert_close(P.T @ P, torch.eye(10, dtype=torch.float64), **tol(torch.float32))  # an isometry
    with pytest.raises(ValueError, match="index_rule"):
        UniLoRAShared(10, index_rule="uniform")


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (lambda **kw: VeRA(12, 9, rank=4, seed=1, **kw), ("vera_A", "vera_B")),
        (lambda **kw: RandLoRA(12, 9, rank=3, seed=1, **kw), ("randlora_A", "randlora_B")),
    ],
)
def test_persistent_basis(make, names):
    plain, kept = make(), make(persistent_basis=True)
    assert not set(names) & set(plain.state_dict()) and plain.config()["persistent_basis"] is False
    assert set(names) <= set(kept.state_dict()) and kept.config()["persistent_basis"] is True
    for n in names:  # same init, but the layer's own copy: writing it leaves the cached shared basis alone
        before = getattr(plain, n).clone()  # plain's buffer is a view of the cache itself
        assert torch.equal(getattr(kept, n), before)
        getattr(kept, n).mul_(2.0)
        assert torch.equal(getattr(make(), n), before) and torch.equal(getattr(plain, n), before)
    state = {k: v.clone() for k, v in kept.state_dict().items()}
    again = make(persistent_basis=True)
    again.load_state_dict(state)
    for n in names:
        assert torch.equal(getattr(again, n), getattr(kept, n))
    with pytest.raises(TypeError, match="persistent_basis"):
        make(persistent_basis=1)


# ============================================================================ GPT-2: Conv1D layers
GPT2_TARGETS = ["c_attn", "c_fc", "mlp.c_proj"]  # Conv1D 96x32, 128x32 and 32x128, weights stored transposed
GPT2_CASES = {
    "vera": ({"rank": 8}, lambda: peft.VeraConfig(r=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True)),
    "randlora": ({"rank": 8}, lambda: peft.RandLoraConfig(r=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True)),
    "unilora": (
        {"rank": 2, "shared": UniLoRAShared(40, seed=1)},
        lambda: peft.UniLoraConfig(r=2, theta_d_length=40, target_modules=GPT2_TARGETS, fan_in_fan_out=True),
    ),
    "fourierft": (
        {"n_frequency": 20},
        lambda: peft.FourierFTConfig(n_frequency=20, target_modules=GPT2_TARGETS, fan_in_fan_out=True),
    ),
    "adalora": (
        {"rank": 4, "alpha": 8.0},
        lambda: peft.AdaLoraConfig(init_r=4, total_step=5, target_modules=GPT2_TARGETS, fan_in_fan_out=True),
    ),
    "hut": ({"rank": 2}, lambda: peft.HiraConfig(r=2, target_modules=GPT2_TARGETS, fan_in_fan_out=True)),
}


@pytest.mark.parametrize("method", sorted(GPT2_CASES))
def test_conv1d_both_ways(tmp_path, method):
    base, inputs = tiny_gpt2(dtype=torch.float32), gpt2_inputs()
    cfg, make = GPT2_CASES[method]
    ours = inject(copy.deepcopy(base), method, targets=GPT2_TARGETS, **copy.deepcopy(cfg))
    randomize_adapters(ours, scale=0.3)
    export_peft(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    y = _away_from(ours, base, inputs)
    torch.testing.assert_close(output(_peft_load(base, tmp_path / "ours"), inputs), y, **F32)
    pm = peft.get_peft_model(copy.deepcopy(base), make())
    _perturb(pm, 0.3)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    y_peft = _away_from(pm, base, inputs)
    torch.testing.assert_close(output(import_peft(copy.deepcopy(base), tmp_path / "peft"), inputs), y_peft, **F32)


# ============================================================================ import errors
def _edit(path, fn) -> None:
    t = load_file(str(path / "adapter_model.safetensors"))
    fn(t)
    save_file(t, str(path / "adapter_model.safetensors"))


def _edit_cfg(path, **kv) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(kv)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


L0Q = "base_model.model.encoder.layer.0.attention.self.query"
IMPORT_ERRORS = {
    "vera lambda_b": ("vera", lambda p: _edit(p, lambda t: t.update({f"{L0Q}.vera_lambda_b": torch.ones(5)})),
                      "shape"),
    "vera rank": ("vera", lambda p: _edit_cfg(p, r=8), "rank r=8"),
    "randlora no bases": (
        "randlora",
        lambda p: _edit(p, lambda t: [t.pop(k) for k in list(t) if k.endswith(("randlora_A", "randlora_B"))]),
        "save_projection=True",
    ),
    "randlora copy differs": (
        "randlora", lambda p: _edit(p, lambda t: t[f"{L0Q}.randlora_B"].mul_(2)), "differs from base_model.randlora_B"
    ),
    "unilora indices": (
        "unilora", lambda p: _edit(p, lambda t: t[f"{L0Q}.unilora_indices_A"].fill_(0)), "neither PEFT's balanced"
    ),
    "unilora scales": (
        "unilora", lambda p: _edit(p, lambda t: t[f"{L0Q}.unilora_scales_A"].mul_(1.1)), "unilora_scales_A"
    ),
    "unilora theta": ("unilora", lambda p: _edit_cfg(p, theta_d_length=65), "unilora_theta_d"),
    "fourierft size": ("fourierft", lambda p: _edit_cfg(p, n_frequency=41), "fourierft_spectrum"),
    "adalora mask": (
        "adalora",
        lambda p: _edit_cfg(p, rank_pattern={"encoder.layer.0.attention.self.query.lora_E": [True] * 6}),
        "rank 4, the config says 6",
    ),
    "adalora missing E": ("adalora", lambda p: _edit(p, lambda t: t.pop(f"{L0Q}.lora_E")), "expected"),
    "hira unknown": ("hira", lambda p: _edit(p, lambda t: t.update({f"{L0Q}.hira_C": torch.ones(2)})), "hira_C"),
    "hira rank": ("hira", lambda p: _edit_cfg(p, r=3), "rank 2, the config says 3"),
    "modules_to_save": ("hira", lambda p: _edit_cfg(p, modules_to_save=["pooler"]), "modules_to_save"),
}


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory, base):
    root = tmp_path_factory.mktemp("peft_saved")
    for case in {c for c, _, _ in IMPORT_ERRORS.values()}:
        _peft_saved(base, case, root / case)
    return root


@pytest.mark.parametrize("name", sorted(IMPORT_ERRORS))
def test_import_errors_leave_model_unchanged(tmp_path, base, saved_dirs, name):
    case, corrupt, match = IMPORT_ERRORS[name]
    path = tmp_path / case
    path.mkdir()
    for f in (saved_dirs / case).iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    corrupt(path)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        import_peft(model, path)
    assert_unchanged(model, snap)
