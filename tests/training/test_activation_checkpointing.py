"""Activation checkpointing over every linear method (issue #19, item 3).

Checkpointing drops a region's activations in the forward and recomputes them in the backward.
For an adapter that is correct when the recomputation replays the same operations on the same
numbers -- including the same dropout masks, which ``torch.utils.checkpoint`` ensures by saving
and restoring the RNG state (``preserve_rng_state=True``, the default) -- and when the forward
has no side effect that a second run would repeat (a cache filled twice, a buffer updated twice).
Then the gradients are *the same floats* as without checkpointing, so they are compared exactly
(``torch.equal``), and so is the whole ``state_dict`` after two SGD steps.

* Every registered linear method (``flora_conv2d`` is a conv method) in both layers of a float64
  MLP with a ``Dropout(0.2)`` between them and adapter dropout 0.2 where the method has one,
  through ``torch.utils.checkpoint.checkpoint`` (non-reentrant and reentrant).  Negative control:
  with ``preserve_rng_state=False`` the masks differ and so do the gradients -- the comparison
  sees a wrong replay.
* ``torch.compile`` (``fullgraph=True``, ``aot_eager``) of a checkpointed MLP for LoRA, DoRA and
  LoCA, against eager without checkpointing (float32; the same graph ops, measured identical).
* One MiniLM with every linear method injected, one method per projection (33 of its 36), in
  ``train()`` mode (MiniLM's own dropout 0.1 active) under Hugging Face's
  ``activation_checkpointing_enable`` (the successor of ``gradient_checkpointing_enable`` in
  transformers 5): every adapter recomputed (forward hooks count two calls per step), gradients
  identical, also reentrant.

No method needed a change: every one gives identical gradients and state.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowrank_theory import adapters
from lowrank_theory.adapters.projection import UniLoRAShared
from lowrank_theory.training import adapted_layers, inject
from tests.training import load_minilm, minilm_inputs

#: small configurations (the defaults are sized for wide layers); the rest use their defaults
SMALL = {
    "adalora": {"rank": 2}, "comp_lora": {"rank": 2}, "dora": {"rank": 2}, "fourierft": {"n_frequency": 20},
    "loca": {"n_frequency": 20}, "lora": {"rank": 2}, "lq_lora": {"rank": 2, "iters": 1}, "milora": {"rank": 2},
    "pissa": {"rank": 2}, "qwha": {"n_frequency": 20}, "randlora": {"rank": 2}, "sora": {"rank": 2},
    "unilora": {"rank": 2}, "vera": {"rank": 8},
}
LINEAR = [n for n in adapters.names() if n != "flora_conv2d"]


def config(name: str, d: int) -> dict:
    """``SMALL[name]``, adapter dropout 0.2 where the method has one; Uni-LoRA's shared vector of length ``d``."""
    cfg = dict(SMALL.get(name, {}))
    if "dropout" in inspect.signature(adapters.get(name).__init__).parameters:
        cfg["dropout"] = 0.2
    if name == "unilora":
        cfg["shared"] = UniLoRAShared(d, seed=1)
    return cfg


def mlp(name: str, dtype=torch.float64) -> nn.Module:
    """``Linear(16, 24) -> Dropout(0.2) -> GELU -> Linear(24, 16)``, ``name`` in both linears, moved off its init."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Dropout(0.2), nn.GELU(), nn.Linear(24, 16)).to(dtype)
    inject(model, name, ["0", "3"], **config(name, 32))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    return model.train()


def grads(model: nn.Module, x: torch.Tensor, **ck) -> list[torch.Tensor]:
    """Gradients of ``sum(model(x)^2)`` for the trainable tensors; ``ck``: through ``checkpoint(**ck)``."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(5)  # the same dropout masks for every variant
    x = x.clone().requires_grad_(bool(ck.get("use_reentrant")))  # reentrant needs an input that requires grad
    y = checkpoint(model, x, **ck) if ck else model(x)
    (y * y).sum().backward()
    out = [p.grad for p in model.parameters() if p.requires_grad]
    assert out and all(g is not None for g in out)
    return [g.clone() for g in out]


X = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", LINEAR)
def test_checkpointed_gradients_and_steps_are_identical(name):
    model = mlp(name)
    ref = grads(model, X)
    for reentrant in (False, True):
        got = grads(model, X, use_reentrant=reentrant)
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)), (name, reentrant)
    # negative control: without the RNG replay the recomputed masks differ, and the comparison sees it
    other = grads(model, X, use_reentrant=False, preserve_rng_state=False)
    assert not all(torch.equal(a, b) for a, b in zip(other, ref, strict=True)), name
    # two SGD steps each way: every parameter and buffer identical (a forward side effect that the
    # recomputation repeats -- a cache or a running estimate updated twice -- would show here)
    start = copy.deepcopy(model.state_dict())
    twin = copy.deepcopy(model)
    for _ in range(2):
        for m, ck in ((model, {}), (twin, {"use_reentrant": False})):
            step = grads(m, X, **ck)
            with torch.no_grad():
                for p, g in zip([p for p in m.parameters() if p.requires_grad], step, strict=True):
                    p.sub_(0.1 * g)
    sa, sb = model.state_dict(), twin.state_dict()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == [], name
    assert any(not torch.equal(v, start[k]) for k, v in sa.items()), name  # the steps moved it


class Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, x, use_reentrant=False)


@pytest.mark.parametrize("name", ["lora", "dora", "loca"])
def test_compiled_checkpointed_gradients_equal_eager(name):
    """``torch.compile(fullgraph=True)`` of a checkpointed region: one graph (checkpoint is a
    higher-order op to dynamo), and the gradients of eager without checkpointing, dropout included.
    Float32, because float64 DoRA refines ill-conditioned rows with a host read (a graph break by
    design).  Measured identical here; compared at relative 1e-5 because AOTAutograd's decompositions
    may reorder a reduction (the argument of tests/adapters/test_compile.py)."""
    model = mlp(name, torch.float32)
    x = X.float()
    ref = grads(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(Checkpointed(model), backend="aot_eager", fullgraph=True)
    for _ in range(2):  # the second call reuses the graph
        got = grads(compiled, x)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ============================================================================ MiniLM
PROJECTIONS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


def test_minilm_activation_checkpointing_over_every_linear_method():
    model = load_minilm()
    slots = [f"encoder.layer.{i}.{p}" for i in range(6) for p in PROJECTIONS]
    slots += [f"encoder.layer.{i}.{ffn}.dense" for ffn in ("intermediate", "output") for i in range(6)]
    assert len(slots) >= len(LINEAR)
    for name, slot in zip(LINEAR, slots):
        inject(model, name, [slot], **config(name, 64))
    layers = adapted_layers(model)
    assert {type(layer.adapter).name for layer in layers.values()} == set(LINEAR)
    calls = dict.fromkeys(layers, 0)
    for n, layer in layers.items():
        layer.register_forward_hook(lambda mod, args, out, n=n: calls.__setitem__(n, calls[n] + 1))
    model.train()  # MiniLM's dropout (0.1) and the adapters' are active
    inputs = minilm_inputs()
    named = [n for n, p in model.named_parameters() if p.requires_grad]

    def step(**kw):
        for p in model.parameters():
            p.grad = None
        calls.update(dict.fromkeys(calls, 0))
        torch.manual_seed(7)
        out = model(**inputs).last_hidden_state
        (out.double() ** 2).mean().backward()
        got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None for g in got.values()), [n for n, g in got.items() if g is None]
        return {n: g.clone() for n, g in got.items()}, dict(calls)

    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    ref, once = step()
    assert set(once.values()) == {1}
    for kwargs in ({"use_reentrant": False}, {"use_reentrant": True}):
        enable(kwargs)
        got, twice = step()
        disable()
        assert set(twice.values()) == {2}, kwargs  # every adapted layer was recomputed
        assert [n for n in named if not torch.equal(got[n], ref[n])] == [], kwargs
    enable({"use_reentrant": False, "preserve_rng_state": False})  # negative control: other masks
    other, _ = step()
    disable()
    assert any(not torch.equal(other[n], ref[n]) for n in named)
