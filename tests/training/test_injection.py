"""``inject`` and friends on real models: MiniLM (nn.Linear) and a tiny GPT-2 (Conv1D).

References are independent of the code under test: target names are recomputed from
``named_modules`` with plain string tests, adapted outputs are compared with a copy of the base
model whose weights hold :math:`W_0 + sBA` computed in float64 (``dense_reference``), and base
outputs come from an untouched copy.  Tolerances: GPT-2 runs in float64 (``tol(float64)``:
every path is a short chain of products of O(1) numbers); MiniLM runs in float32, where the
adapted and reference paths round differently, so ``tol(float32)``.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from lowrank_theory import adapters
from lowrank_theory.adapters import AdaptedLinear
from lowrank_theory.adapters.projection import UniLoRA, UniLoRAShared
from lowrank_theory.adapters.random_basis import vera_basis
from lowrank_theory.linalg.random import derive_seed
from lowrank_theory.training import (
    adapted_layers,
    disable,
    find_targets,
    inject,
    merge,
    summary,
    trainable_parameters,
    unmerge,
)
from lowrank_theory.training.injection import CONFIG_ATTR, prepare
from tests.conftest import tol
from tests.training import (
    assert_unchanged,
    dense_reference,
    gpt2_inputs,
    load_minilm,
    minilm_inputs,
    output,
    randomize_adapters,
    snapshot,
    tiny_gpt2,
)

F32, F64 = tol(torch.float32), tol(torch.float64)


@pytest.fixture(scope="module")
def minilm_base() -> nn.Module:
    return load_minilm()


@pytest.fixture
def minilm(minilm_base) -> nn.Module:
    return copy.deepcopy(minilm_base)


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]


# ============================================================================ targets
def test_suffix_regex_exact_and_list_targets(minilm):
    names = [n for n, _ in minilm.named_modules()]
    queries = [n for n in names if n.split(".")[-1] == "query"]
    values = [n for n in names if n.split(".")[-1] == "value"]
    assert len(queries) == 6
    assert find_targets(minilm, "query") == queries
    assert find_targets(minilm, ".query") == queries
    both = [n for n in names if n in queries or n in values]
    assert find_targets(minilm, ["value", "query"]) == both  # module order, not list order
    assert find_targets(minilm, r"re:.*self\.(query|value)") == both
    assert find_targets(minilm, re.compile(r".*\.1\.attention\.self\.query")) == [queries[1]]
    assert find_targets(minilm, queries[2]) == [queries[2]]
    # "dense" is a suffix of attention.output.dense, intermediate.dense, output.dense and pooler.dense
    dense = [n for n in names if n.endswith(".dense")]
    assert find_targets(minilm, "dense") == dense
    assert find_targets(minilm, "dense", exclude=["pooler.dense", r"re:.*intermediate.*"]) == [
        n for n in dense if n != "pooler.dense" and "intermediate" not in n
    ]
    # a regex must match the whole name (PEFT's fullmatch): "query" alone as a regex matches nothing
    with pytest.raises(ValueError, match="matched no module"):
        find_targets(minilm, "re:query")
    with pytest.raises(ValueError, match="matched no module"):
        find_targets(minilm, re.compile("query"))
    # a suffix matches on a dot boundary only: "utput.dense" is not a suffix of "...output.dense"
    with pytest.raises(ValueError, match="matched no module"):
        find_targets(minilm, "utput.dense")


def test_all_linear(minilm):
    assert find_targets(minilm, "all-linear") == linear_names(minilm)
    gpt = tiny_gpt2(lm_head=True)
    got = find_targets(gpt, "all-linear")
    assert got == [n for n in linear_names(gpt) if n != "lm_head"]
    assert all(type(gpt.get_submodule(n)).__name__ == "Conv1D" for n in got)

    class WithHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5))
            self.classifier = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 2))
            self.score = nn.Linear(5, 1)
            self.decoder = nn.Linear(5, 7)  # the output head by get_output_embeddings, not by its name

        def get_output_embeddings(self) -> nn.Module:
            return self.decoder

    assert find_targets(WithHead(), "all-linear") == ["body.0", "body.2"]


def test_errors_name_the_problem(minilm):
    snap = snapshot(minilm)
    with pytest.raises(ValueError, match=r"matched no module.*attention\.self\.query"):
        inject(minilm, "lora", targets="q_proj", rank=2)
    with pytest.raises(ValueError, match=r"'nope'.*matched no module"):
        inject(minilm, "lora", targets=["query", "nope"], rank=2)  # one bad entry: nothing injected
    with pytest.raises(ValueError, match="unknown adapter 'not-a-method'"):
        inject(minilm, "not-a-method", targets="query")
    with pytest.raises(TypeError, match=r"'encoder\.layer\.0\.attention\.self' is BertSelfAttention"):
        inject(minilm, "lora", targets=r"re:encoder\.layer\.0\.attention\.self(\.query)?", rank=2)
    with pytest.raises(ValueError, match="rank"):  # adapter config errors surface before any change
        inject(minilm, "lora", targets="query", rank=10_000)
    with pytest.raises(TypeError, match="targets"):
        inject(minilm, "lora", targets=3, rank=2)
    assert_unchanged(minilm, snap)
    inject(minilm, "lora", targets="query", rank=2)
    with pytest.raises(ValueError, match="already holds an adapter named 'default'"):
        inject(minilm, "lora", targets=r"re:.*\.0\.attention\.self\.query", rank=2)
    # modules inside an AdaptedLinear are not candidates: ".base" is not targetable
    with pytest.raises(ValueError, match="matched no module"):
        inject(minilm, "lora", targets="query.base", rank=2)


# ============================================================================ behaviour
@pytest.mark.parametrize("which", ["minilm", "gpt2"])
def test_identity_dense_merge_disable(which, minilm):
    if which == "minilm":
        model, inputs, tl, targets = minilm, minilm_inputs(), F32, ["query", "value"]
    else:
        model, inputs, tl, targets = tiny_gpt2(), gpt2_inputs(), F64, "all-linear"
    base = copy.deepcopy(model)
    y_base = output(base, inputs)
    inject(model, "lora", targets=targets, rank=3, alpha=6.0, seed=0)
    torch.testing.assert_close(output(model, inputs), y_base, rtol=0, atol=0)  # B = 0: exactly the base
    randomize_adapters(model)
    y = output(model, inputs)
    assert float((y - y_base).abs().max()) > 1e-3, "randomized adapters must change the output"
    torch.testing.assert_close(y, output(dense_reference(base, model), inputs), **tl)
    with disable(model):
        torch.testing.assert_close(output(model, inputs), y_base, rtol=0, atol=0)
    assert not any(layer.disabled for layer in adapted_layers(model).values())
    merge(model)
    assert all(layer.merged for layer in adapted_layers(model).values())
    torch.testing.assert_close(output(model, inputs), y, **tl)
    unmerge(model)
    for name, layer in adapted_layers(model).items():
        torch.testing.assert_close(layer.base.weight, base.get_submodule(name).weight, **tl)
    torch.testing.assert_close(output(model, inputs), y, **tl)


def test_one_step_changes_only_adapters():
    model = tiny_gpt2()
    inject(model, "lora", targets=["c_attn", "c_fc"], rank=2, seed=0)
    layers = adapted_layers(model)
    adapter_ids = {id(p) for layer in layers.values() for p in layer.adapter.parameters()}
    params = trainable_parameters(model)
    assert {id(p) for p in params} == adapter_ids
    expected = sum(adapters.get("lora").param_count(*w, rank=2) for w in [(96, 32), (128, 32)] * 2)
    assert sum(p.numel() for p in params) == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    model(**gpt2_inputs()).last_hidden_state.pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    adapter_names = {n for n, p in model.named_parameters() if id(p) in adapter_ids}
    assert changed and changed <= adapter_names
    assert any(n.endswith(".adapters.default.B") for n in changed)  # B gets a gradient at B = 0
    assert all(p.grad is None for n, p in model.named_parameters() if n not in adapter_names)


def test_summary_counts(minilm, minilm_base):
    n_base = sum(p.numel() for p in minilm.parameters())
    inject(minilm, "lora", targets=["query", "key"], rank=4)
    text = summary(minilm)
    for name in find_targets(minilm_base, ["query", "key"]):
        assert re.search(rf"^{re.escape(name)}\s+default\s+lora\s+384x384\s+3,072\s+active$", text, re.M)
    total = 12 * 4 * (384 + 384)
    assert f"trainable: {total:,} of {n_base:,} base parameters ({100 * total / n_base:.4f}%)" in text
    rec = getattr(minilm, CONFIG_ATTR)
    assert rec[0]["method"] == "lora" and rec[0]["cfg"] == {"rank": 4} and len(rec[0]["layers"]) == 12


def test_from_weight_replaces_base_weight_conv1d():
    # LQ-LoRA: base <- Q(W0), adapter L1 L2 with ||W0 - Q - L1 L2|| = the reported error.  A Conv1D
    # weight written back without transposing would make this error O(||W0||).
    model = tiny_gpt2()
    base = copy.deepcopy(model)
    inject(model, "lq_lora", targets="c_fc", rank=4, iters=3)
    for name, layer in adapted_layers(model).items():
        W0 = base.get_submodule(name).weight.detach().T  # (d_out, d_in)
        assert not torch.equal(layer.weight, W0)
        with torch.no_grad():
            err = torch.linalg.norm(W0 - layer.weight - layer.adapter.delta_weight())
        assert float(err) == pytest.approx(layer.adapter.decomposition_errors[-1], rel=1e-6)
        assert float(err) < 0.5 * float(torch.linalg.norm(W0))
    assert getattr(model, CONFIG_ATTR)[0]["from_weight"] is True


def test_dora_from_weight_identity_conv1d():
    # DoRA's magnitude is the row norm of W0 as (d_out, d_in); the wrong orientation breaks identity.
    model = tiny_gpt2()
    y0 = output(model, gpt2_inputs())
    inject(model, "dora", targets="all-linear", rank=2, seed=0)
    for layer in adapted_layers(model).values():
        torch.testing.assert_close(layer.adapter.magnitude, torch.linalg.vector_norm(layer.weight, dim=1), **F64)
    torch.testing.assert_close(output(model, gpt2_inputs()), y0, **F64)


def test_shared_object_and_make_shared_hook(monkeypatch):
    model = tiny_gpt2()
    shared = UniLoRAShared(64, seed=3)
    inject(model, "unilora", targets=["c_attn", "c_proj"], rank=2, shared=shared)
    layers = adapted_layers(model)
    assert len(layers) == 6 and all(layer.adapter.shared is shared for layer in layers.values())
    assert [p is shared.theta_d for p in trainable_parameters(model)] == [True]
    assert shared.D == sum(2 * (a.d_in + a.d_out) for a in (la.adapter for la in layers.values()))
    assert "trainable: 64 of" in summary(model)

    # a class-level hook builds the model-wide state from the list of target shapes
    seen = []

    def make_shared(cls, shapes, d=256, seed=0, **_):
        seen.append(list(shapes))
        return {"shared": UniLoRAShared(d, seed=seed)}

    monkeypatch.setattr(UniLoRA, "make_shared", classmethod(make_shared), raising=False)
    model2 = tiny_gpt2()
    inject(model2, "unilora", targets="c_fc", rank=2, d=32, seed=1)
    assert seen == [[(128, 32), (128, 32)]]
    ads = [layer.adapter for layer in adapted_layers(model2).values()]
    assert ads[0].shared is ads[1].shared and ads[0].shared.d == 32


def test_vera_gets_largest_basis_shape():
    model = tiny_gpt2()
    inject(model, "vera", targets="all-linear", rank=8, seed=5)
    A, B = vera_basis(5, 8, (128, 128))  # largest d_out and d_in over the GPT-2 targets
    for layer in adapted_layers(model).values():
        ad = layer.adapter
        assert ad.config()["basis_shape"] == (128, 128)
        torch.testing.assert_close(ad.vera_A, A[:, : ad.d_in].to(ad.vera_A.dtype), rtol=0, atol=0)
        torch.testing.assert_close(ad.vera_B, B[: ad.d_out].to(ad.vera_B.dtype), rtol=0, atol=0)


def test_layer_seeds_and_dtype():
    same, per = tiny_gpt2(), tiny_gpt2()
    inject(same, "lora", targets="c_proj", rank=2, seed=4)
    inject(per, "lora", targets="c_proj", rank=2, seed=4, layer_seeds=True, dtype=torch.float32)
    a_same = [layer.adapter.A for layer in adapted_layers(same).values()]
    a_per = {n: layer.adapter for n, layer in adapted_layers(per).items()}
    assert torch.equal(a_same[0], a_same[2])  # same seed, same (32, 32) shape
    ref = adapters.create("lora", 32, 32, rank=2, seed=derive_seed(4, "h.0.attn.c_proj"))
    torch.testing.assert_close(a_per["h.0.attn.c_proj"].A, ref.A, rtol=0, atol=0)
    assert not torch.equal(a_per["h.0.attn.c_proj"].A, a_per["h.1.attn.c_proj"].A)
    assert a_same[0].dtype == torch.float64 and a_per["h.0.attn.c_proj"].A.dtype == torch.float32
    with pytest.raises(ValueError, match="layer_seeds"):
        inject(tiny_gpt2(), "lora", targets="c_proj", layer_seeds=True)


def test_prepare_does_not_touch_the_model():
    model = tiny_gpt2()
    snap = snapshot(model)
    plan = prepare(model, "lq_lora", targets="c_fc", rank=2, iters=1)
    assert set(plan.adapters) == {"h.0.mlp.c_fc", "h.1.mlp.c_fc"} and plan.new_weights
    assert_unchanged(model, snap)
    plan.apply()
    assert all(isinstance(model.get_submodule(n), AdaptedLinear) for n in plan.adapters)
    with pytest.raises(ValueError, match="already applied"):
        plan.apply()
