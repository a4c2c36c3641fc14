r"""Model-level operations on injected adapters: names, activation, merge, disable, unload, summary.

After :func:`~lowrank_theory.training.inject`, every target is an
:class:`~lowrank_theory.adapters.AdaptedLinear` that may hold several named adapters (see
:class:`~lowrank_theory.adapters.layer.AdapterHost`).  These functions act on all adapted layers of a
model at once, the way PEFT's ``PeftModel`` methods do:

* :func:`adapter_names`, :func:`active_adapters`, :func:`set_adapter`, :func:`delete_adapter`;
* :func:`merge` / :func:`unmerge` (the active adapters; checked, float32 or better) and :func:`disable`;
* :func:`merge_and_unload` -- fold the active adapters in and put the original modules back, so the
  model's ``state_dict`` keys are exactly those it had before injection; :func:`unload` -- the same
  without merging (the adapters are dropped; merged layers are unmerged first);
* :func:`summary` and :func:`trainable_parameters`.

Every function validates its arguments on all layers before it changes any layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..adapters import AdaptedLinear
from .injection import CONFIG_ATTR, ORIGINAL_FLAGS_ATTR, adapted_layers, unwrap_model

__all__ = [
    "active_adapters",
    "adapter_names",
    "delete_adapter",
    "disable",
    "merge",
    "merge_and_unload",
    "set_adapter",
    "summary",
    "trainable_parameters",
    "unload",
    "unmerge",
]


def _require_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("model has no adapted layer; call inject() first")
    return layers


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad`` (each shared tensor once), for an optimizer."""
    return [p for p in model.parameters() if p.requires_grad]


# ============================================================================ names
def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name held by some adapted layer, in order of first appearance."""
    names: dict[str, None] = {}
    for layer in _require_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapter names (those of the first layer that holds any; ``set_adapter`` keeps them equal)."""
    seen: dict[str, None] = {}
    for layer in _require_layers(model).values():
        seen.update(dict.fromkeys(layer.active_adapters))
    return list(seen)


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Activate ``names`` (one or several, whose updates add) on every layer that holds them.

    A layer holding none of ``names`` keeps no active adapter (it computes its base output).  Inactive
    adapters are frozen and get their trainable flags back when activated again.

    Raises
    ------
    ValueError
        A name held by no layer, a merged layer, or a multiplicative method (DoRA, ...) activated
        together with another adapter on one layer; no layer is changed.
    """
    want = [names] if isinstance(names, str) else list(names)
    layers = _require_layers(model)
    known = adapter_names(model)
    unknown = [n for n in want if n not in known]
    if unknown or not want:
        raise ValueError(f"names must be adapter names of the model, got {want}; known: {known}")
    plan = {}
    for lname, layer in layers.items():
        try:
            plan[lname] = layer.check_set_adapter([n for n in want if n in layer.adapters])
        except ValueError as exc:
            raise ValueError(f"layer {lname!r}: {exc}") from None
    for lname, layer in layers.items():
        layer.set_adapter(plan[lname])
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove the adapter ``name`` from every layer (not while merged); layers left empty keep their base.

    The injection records of that name are dropped too, so a checkpoint of the model no longer lists it.
    """
    layers = _require_layers(model)
    holders = {n: layer for n, layer in layers.items() if name in layer.adapters}
    if not holders:
        raise ValueError(f"no layer holds an adapter named {name!r}; known: {adapter_names(model)}")
    merged = [n for n, layer in holders.items() if name in layer.merged_adapters]
    if merged:
        raise ValueError(f"adapter {name!r} is merged in {merged[:5]}; unmerge(model) first")
    for layer in holders.values():
        layer.delete_adapter(name)
    root = unwrap_model(model)
    records = getattr(root, CONFIG_ATTR, None) or []
    setattr(root, CONFIG_ATTR, [r for r in records if r.get("adapter_name", "default") != name])
    return model


# ============================================================================ merge / disable
def merge(model: nn.Module, *, safe: bool = True, requantize: bool = False) -> nn.Module:
    """Fold the active adapters of every adapted layer into its base weight; return ``model``.

    Parameters
    ----------
    model : nn.Module
    safe : bool, default True
        First compute every layer's merged weight and check it is finite (then discard it), and only
        then write any: a non-finite update in one layer raises ``ValueError`` naming it and leaves the
        whole model bit-identical.  This costs one extra evaluation of each ΔW and no extra memory
        beyond one layer's weight.  ``safe=False`` writes layer by layer without checking.
    requantize : bool, default False
        Layers over a quantized (NF4/int8) base can merge only by requantizing (lossy, not undoable;
        :meth:`~lowrank_theory.adapters.AdaptedLinear.merge`).  Without it a model holding such a layer
        is refused before any layer changes; with it each such layer's ``requantization_error`` is set.

    Notes
    -----
    Each layer's merge computes ΔW and the sum in float32 or better and rounds once
    (:meth:`~lowrank_theory.adapters.Adapter.merged_weight`).
    """
    layers = _require_layers(model)
    packed = {n: layer.base.scheme for n, layer in layers.items() if getattr(layer, "quantized", False)
              and not layer.merged and layer.active_adapters}
    if packed and not requantize:
        raise ValueError(f"layers {list(packed)[:3]} have a quantized ({', '.join(sorted(set(packed.values())))}) "
                         f"base: merging needs a lossy requantization; pass requantize=True to accept it (no layer "
                         f"was changed)")
    if safe:
        for name, layer in layers.items():
            if layer.merged or not layer.active_adapters:
                continue
            w, b = layer.merged_weights()
            bad = [k for k, t in (("weight", w), ("bias", b)) if t is not None and not bool(torch.isfinite(t).all())]
            if bad:
                raise ValueError(
                    f"merging layer {name!r} gives a non-finite {' and '.join(bad)} (NaN/Inf in its adapter or an "
                    f"overflow of {w.dtype}); no layer was changed"
                )
            del w, b
    for layer in layers.values():
        if getattr(layer, "quantized", False):
            layer.merge(safe=False, requantize=requantize)
        else:
            layer.merge(safe=False)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` on every adapted layer; return ``model``.

    Every merged layer is checked first (its adapters unchanged since the merge, see
    :meth:`AdaptedLinear.unmerge`), so a refusal leaves the whole model as it was.
    """
    layers = _require_layers(model)
    for name, layer in layers.items():
        try:
            layer.check_unmerge()
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from None
    for layer in layers.values():
        layer.unmerge()
    return model


@contextmanager
def disable(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: every adapted layer computes its base output only, merged or not (restored on exit)."""
    layers = list(_require_layers(model).values())
    prev = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, p in zip(layers, prev, strict=True):
            layer.disabled = p


# ============================================================================ unload
def _put_bases_back(model: nn.Module, layers: dict[str, AdaptedLinear]) -> None:
    root = unwrap_model(model)
    for name, layer in layers.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent_name), attr, layer.base)
    for p, flag in getattr(root, ORIGINAL_FLAGS_ATTR, None) or []:
        p.requires_grad_(flag)
    for attr in (CONFIG_ATTR, ORIGINAL_FLAGS_ATTR):
        if attr in root.__dict__:
            object.__delattr__(root, attr)


def merge_and_unload(model: nn.Module, *, safe: bool = True, requantize: bool = False) -> nn.Module:
    """Fold the active adapters in and return the model with its original modules back in place.

    The result is the plain model it was before :func:`~lowrank_theory.training.inject`: the same
    module types and ``state_dict`` keys, the parameters' ``requires_grad`` flags of before the first
    injection, no injection records -- with the merged weights, so its output equals the adapted
    model's to the merge tolerance (one rounding of each weight to its dtype).  Inactive adapters are
    dropped.

    Parameters
    ----------
    model : nn.Module
        Changed in place and returned.
    safe, requantize : bool
        As :func:`merge`: a non-finite merge raises ``ValueError`` before any layer changes; layers over a
        quantized base need ``requantize=True`` and come back as their (requantized) ``QuantizedLinear``.
    """
    layers = _require_layers(model)
    merge(model, safe=safe, requantize=requantize)
    _put_bases_back(model, layers)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter and return the model with its original modules and weights back.

    Merged layers are unmerged first (checked, as :func:`unmerge`), so the base weights are the frozen
    ones; then the modules are put back as :func:`merge_and_unload` does.
    """
    layers = _require_layers(model)
    unmerge(model)
    _put_bases_back(model, layers)
    return model


# ============================================================================ summary
def summary(model: nn.Module) -> str:
    """A table of the adapted layers (name, adapter, method, shape, trainable, active) and the totals.

    The total counts each shared tensor once (``model.parameters()`` deduplicates), so with a
    model-wide vector (Uni-LoRA) the per-layer counts add up to more than the total.
    """
    layers = _require_layers(model)
    rows = [("layer", "adapter", "method", "shape", "trainable", "state")]
    for n, layer in layers.items():
        for an, ad in layer.adapters.items():
            state = "merged" if an in layer.merged_adapters else ("active" if an in layer.active_adapters else "-")
            rows.append((n, an, type(ad).name, f"{ad.d_out}x{ad.d_in}", f"{ad.num_trainable:,}", state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    adapter_ids = {id(p) for layer in layers.values() for ad in layer.adapters.values() for p in ad.parameters()}
    params = list(model.parameters())
    base = sum(p.numel() for p in params if id(p) not in adapter_ids)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    pct = 100.0 * trainable / base if base else float("inf")
    lines.append(f"trainable: {trainable:,} of {base:,} base parameters ({pct:.4f}%) in {len(layers)} adapted layers")
    return "\n".join(lines)
