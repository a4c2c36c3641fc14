"""Loading adapter checkpoints: validate every file against the model first, then write.

:func:`plan_load` reads a checkpoint written by :func:`~lowrank_theory.training.checkpoint.save_adapters`
and checks everything -- the files parse, every tensor is finite, the layer set, methods, shapes,
configs, keys, tensor shapes and dtypes agree -- without changing the model; :meth:`LoadPlan.apply`
then writes.  :func:`load_adapters` is the two in one.  Only safetensors is read (never pickle).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import Adapter
from ..adapters.layer import DEFAULT_ADAPTER
from .checkpoint import CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME, adapter_state, read_json, read_safetensors
from .fsdp import shard_like
from .injection import InjectionPlan, adapted_layers, prepare, unwrap_model
from .targets import to_json

__all__ = ["LoadPlan", "load_adapters", "plan_load"]


# ============================================================================ load
def _replay(model: nn.Module, config: dict[str, Any], overrides: dict[str, Any],
            adapter_name: str) -> list[InjectionPlan]:
    records = config.get("injections")
    if not isinstance(records, list) or not records:
        raise ValueError("inject=True needs injection records in adapter_config.json; this file has none")
    plans = []
    for rec in records:
        try:
            method, cfg, names = rec["method"], dict(rec["cfg"]), list(rec["layers"])
        except (KeyError, TypeError):
            raise ValueError(f"malformed injection record in adapter_config.json: {rec!r}") from None
        cfg.update(overrides)
        missing = [k for k, v in cfg.items() if isinstance(v, dict) and "__object__" in v]
        if missing:
            raise ValueError(
                f"injection of {method!r} was configured with objects that were not saved ({', '.join(missing)}); "
                f"pass them again: load_adapters(model, path, inject=True, {missing[0]}=...)"
            )
        dtype = rec.get("dtype")
        plans.append(
            prepare(
                model,
                method,
                [re.compile(re.escape(n)) for n in names],
                from_weight=bool(rec.get("from_weight", False)),
                dtype=None if dtype is None else getattr(torch, dtype),
                layer_seeds=bool(rec.get("layer_seeds", False)),
                adapter_name=adapter_name,
                **({"quantize_base": rec["quantize_base"], "quant_block_size": rec.get("quant_block_size", 64)}
                   if rec.get("quantize_base") and "quantize_base" not in cfg else {}),
                **cfg,
            )
        )
    seen: set[str] = set()
    for plan in plans:
        dup = seen & set(plan.adapters)
        if dup:
            raise ValueError(f"injection records overlap on layers {sorted(dup)}")
        seen |= set(plan.adapters)
    return plans


def _validate(
    layer_adapters: dict[str, Adapter], config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Check the file against the adapters; return (destination, source) pairs to copy."""
    info = config.get("layers")
    if not isinstance(info, dict):
        raise ValueError("adapter_config.json has no 'layers' table")
    missing, extra = sorted(set(info) - set(layer_adapters)), sorted(set(layer_adapters) - set(info))
    if missing or extra:
        raise ValueError(
            f"adapted layers differ: in the file but not the model {missing[:5]}, "
            f"in the model but not the file {extra[:5]}"
        )
    for n, ad in layer_adapters.items():
        entry = info[n]
        if entry.get("method") != type(ad).name:
            raise ValueError(
                f"layer {n!r}: method mismatch, file has {entry.get('method')!r}, model has {type(ad).name!r}"
            )
        if list(entry.get("shape", [])) != [ad.d_out, ad.d_in]:
            raise ValueError(
                f"layer {n!r}: shape mismatch, file has {entry.get('shape')}, model has {[ad.d_out, ad.d_in]}"
            )
        want, have = _update_config(ad, entry.get("config")), _update_config(ad, to_json(ad.config()))
        if want != have:
            keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            raise ValueError(f"layer {n!r}: config mismatch in {keys}: file {want}, model {have}")
    state, model_aliases = adapter_state(layer_adapters)
    file_aliases = config.get("aliases") or {}
    keys = {**{k: k for k in state}, **model_aliases}
    expected_in_file = {file_aliases.get(k, k) for k in keys}
    absent = sorted(expected_in_file - set(tensors))
    unexpected = sorted(set(tensors) - expected_in_file)
    if absent or unexpected:
        raise ValueError(f"adapters.safetensors: missing keys {absent[:5]}, unexpected keys {unexpected[:5]}")
    pairs = []
    for k, canon in keys.items():
        dst, src = state[canon], tensors[file_aliases.get(k, k)]
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"tensor {k!r}: shape mismatch, file {tuple(src.shape)}, model {tuple(dst.shape)}")
        same_kind = src.dtype == dst.dtype or (src.is_floating_point() and dst.is_floating_point())
        if not same_kind:
            raise ValueError(f"tensor {k!r}: dtype mismatch, file {src.dtype}, model {dst.dtype}")
        pairs.append((dst, src))
    return pairs


def _update_config(ad: Adapter, config: Any) -> dict[str, Any]:
    """The part of a (JSON) config that defines the update: ``execution_keys`` (``path``) dropped,
    so a checkpoint loads whichever way the model computes the same update."""
    if not isinstance(config, dict):
        return {"__invalid__": config}
    return {k: v for k, v in config.items() if k not in type(ad).execution_keys}


def _seed_keys_only(ad: Adapter, want: Any, have: Any) -> bool:
    """The saved and the model's configs differ, and only in seed keys (frozen random bases' seeds).

    Never for adapters built around a model-level shared object (Uni-LoRA's vector, S2-LoRA's pair):
    one layer rebuilt from its config would get a private copy and leave the sharing.
    """
    if any(p.kind == "instance" for p in type(ad).params.values()):
        return False
    if not (isinstance(want, dict) and isinstance(have, dict)) or set(want) != set(have):
        return False
    diff = [k for k in want if want[k] != have[k]]
    return bool(diff) and all("seed" in k for k in diff)


def _resized(layer_adapters: dict[str, Adapter], config: dict[str, Any], *,
             seeds_only: bool = False) -> dict[str, Adapter]:
    """Adapters rebuilt from the file's per-layer method and config where they differ from the model's.

    With ``seeds_only`` only those whose config differs in seed keys alone are rebuilt: the file's
    seeds regenerate its frozen random bases (a model injected with another seed still loads the
    checkpoint exactly); any other difference is left for :func:`_validate` to report.
    """
    from .. import adapters as registry

    info = config.get("layers")
    if not isinstance(info, dict):
        raise ValueError("adapter_config.json has no 'layers' table")
    out: dict[str, Adapter] = {}
    for n, ad in layer_adapters.items():
        entry = info.get(n)
        if not isinstance(entry, dict):
            continue  # _validate reports the missing layer
        if entry.get("method") == type(ad).name and (
            _update_config(ad, entry.get("config")) == _update_config(ad, to_json(ad.config()))
        ):
            continue
        if list(entry.get("shape", [])) != [ad.d_out, ad.d_in]:
            continue  # a shape mismatch is an error, reported by _validate
        if seeds_only and not (entry.get("method") == type(ad).name and _seed_keys_only(
                ad, _update_config(ad, entry.get("config")), _update_config(ad, to_json(ad.config())))):
            continue
        cfg = entry.get("config")
        if not isinstance(cfg, dict) or any(isinstance(v, dict) and "__object__" in v for v in cfg.values()):
            raise ValueError(f"layer {n!r}: cannot rebuild {entry.get('method')!r} from its saved config {cfg}")
        try:
            new = registry.create(entry["method"], ad.d_out, ad.d_in, **cfg)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"layer {n!r}: cannot rebuild {entry.get('method')!r} with {cfg}: {exc}") from None
        ref = next(iter(ad.parameters()), None)
        if ref is not None:
            new._apply(lambda t, ref=ref: t.to(ref.dtype) if t.is_floating_point() else t)
            new = new.to(ref.device)
        new.train(ad.training)
        out[n] = new
    return out


class LoadPlan:
    """A checkpoint load that :func:`plan_load` validated and has not yet written.

    Every file was read and checked against the model; nothing of the model changed.
    :meth:`apply` writes it (replaying the injection, swapping resized adapters in, copying the
    tensors); :meth:`applying` does the same around a block of the caller's own checks that need
    the new modules in place (the trainer builds its optimizer and loads its callbacks there), and
    puts the old modules back if the block raises.

    Attributes
    ----------
    model : nn.Module
        The model the plan was made for.
    adapters : dict of str to Adapter
        ``{layer name: adapter}`` as they will be after :meth:`apply` (new ones where a layer is
        rebuilt or injected).
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: dict[str, Adapter],
        plans: list[InjectionPlan],
        swaps: dict[str, Adapter],
        pairs: list[tuple[torch.Tensor, torch.Tensor]],
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        self.model = model
        self.adapter_name = adapter_name
        self.adapters = adapters
        self._plans, self._swaps, self._pairs = plans, swaps, pairs
        self.applied = False

    def _check_fresh(self) -> None:
        if self.applied:
            raise RuntimeError("this LoadPlan was already applied")

    @contextlib.contextmanager
    def applying(self) -> Iterator[nn.Module]:
        """Swap the resized adapters in for the block; copy the tensors when it ends without error.

        If the block raises, the model's previous adapter modules are put back (the very same
        objects, so every tensor is as it was) and the exception propagates.  Only for plans made
        with ``inject=False`` (an injection is not undone); use :meth:`apply` otherwise.
        """
        self._check_fresh()
        if self._plans:
            raise RuntimeError("applying() needs a plan made with inject=False; use apply()")
        root = unwrap_model(self.model)
        name = self.adapter_name
        old = {}
        for n, new in self._swaps.items():
            layer = root.get_submodule(n)
            old[n] = layer.adapters[name]
            layer.replace_adapter(name, new)
        try:
            yield self.model
        except BaseException:
            for n, ad in old.items():
                root.get_submodule(n).replace_adapter(name, ad)
            raise
        self._copy()

    def _copy(self) -> None:
        with torch.no_grad():
            for dst, src in self._pairs:
                dst.copy_(shard_like(src.to(dst.dtype), dst))  # a sharded tensor keeps this rank's part
        self.applied = True

    def apply(self) -> nn.Module:
        """Write the checkpoint into the model; return the model."""
        self._check_fresh()
        if not self._plans:
            with self.applying():
                pass
            return self.model
        for plan in self._plans:
            plan.apply()
        self._copy()
        return self.model


def plan_load(
    model: nn.Module, path: str | os.PathLike, *, inject: bool = False, resize: bool = False,
    adapter_name: str = DEFAULT_ADAPTER, **overrides: Any
) -> LoadPlan:
    """Read and validate a checkpoint written by :func:`save_adapters`; change nothing.

    Parameters are those of :func:`load_adapters`, which is ``plan_load(...).apply()``.

    Returns
    -------
    LoadPlan
        The validated load; its :meth:`~LoadPlan.apply` writes it.

    Raises
    ------
    ValueError
        As :func:`load_adapters`.  The model is unchanged (and so is the global torch RNG:
        adapters rebuilt for ``resize`` are drawn under a forked RNG).
    """
    if overrides and not inject:
        raise TypeError(f"config overrides {sorted(overrides)} are only used with inject=True")
    root = Path(path)
    config = read_json(root / CONFIG_NAME, "load_adapters")
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load_adapters: {root / CONFIG_NAME} is not a {FORMAT} v{FORMAT_VERSION} config "
            f"(format={config.get('format')!r}, version={config.get('format_version')!r})"
        )
    tensors = read_safetensors(root / WEIGHTS_NAME, "load_adapters")
    with torch.random.fork_rng(devices=[]):  # building adapters draws random inits: leave the caller's RNG
        if inject:
            plans = _replay(model, config, overrides, adapter_name)
            layer_adapters = {n: ad for plan in plans for n, ad in plan.adapters.items()}
        else:
            plans = []
            layers = {n: layer for n, layer in adapted_layers(model).items() if adapter_name in layer.adapters}
            merged = [n for n, layer in layers.items() if adapter_name in layer.merged_adapters]
            if merged:
                raise ValueError(f"layers {merged[:5]} are merged; unmerge(model) before loading adapters")
            layer_adapters = {n: layer.adapters[adapter_name] for n, layer in layers.items()}
            if not layer_adapters:
                raise ValueError(f"model has no adapted layer holding an adapter named {adapter_name!r}; inject() "
                                 f"it first or pass inject=True")
        swaps = _resized(layer_adapters, config, seeds_only=not resize)
    layer_adapters = {**layer_adapters, **swaps}
    for plan in plans:
        plan.adapters.update({n: a for n, a in swaps.items() if n in plan.adapters})
    pairs = _validate(layer_adapters, config, tensors)
    return LoadPlan(model, layer_adapters, plans, {} if plans else swaps, pairs, adapter_name)


def load_adapters(
    model: nn.Module, path: str | os.PathLike, *, inject: bool = False, resize: bool = False,
    adapter_name: str | None = DEFAULT_ADAPTER, **overrides: Any
) -> nn.Module:
    """Load a checkpoint written by :func:`save_adapters` into ``model``.

    Everything is validated first (:func:`plan_load`), then written (:meth:`LoadPlan.apply`).

    Parameters
    ----------
    model : nn.Module
        With ``inject=False``: a model injected the same way (same layers, methods and configs).
        With ``inject=True``: the base model; the file's injection records are replayed first
        (frozen random bases and ``from_weight`` inits are rebuilt from seeds and base weights).
    path : str or PathLike
        The checkpoint directory.
    inject : bool
        Inject from the recorded config before loading.
    adapter_name : str or None, default ``"default"``
        The named adapter of each layer to load into (with ``inject=True``: the name the injected
        adapters get, so one checkpoint can be loaded under another name).  ``None`` loads every
        checkpoint :func:`save_adapters` wrote with ``adapter_name=None``: ``path`` as ``"default"``
        (when present) and each ``path/<name>/``; all are validated before any is written.
    resize : bool
        Where a layer's saved method or config differs from the model's (a rank schedule changed
        the rank, LoRA-Squeeze replaced the adapter), rebuild that adapter from the saved
        per-layer method and config before loading (the swap happens only once everything is
        validated).  Without it such a difference is an error -- except one in seeds only: the
        file's seeds then rebuild the frozen random bases (VeRA's pair, SLTrain's support, ...), so
        the checkpoint loads exactly into a model injected with other seeds.
    **overrides
        Config values to use when replaying (needed for objects that were not saved, e.g. a
        user-built shared module).

    Returns
    -------
    nn.Module
        ``model``, changed in place.

    Raises
    ------
    ValueError
        Missing or corrupt files, NaN/Inf tensors, a different layer set, method, shape or
        config, a missing or unexpected key, a tensor of the wrong shape or dtype kind, or a
        merged layer.  The model is left unchanged.
    """
    if adapter_name is not None:
        return plan_load(model, path, inject=inject, resize=resize, adapter_name=adapter_name, **overrides).apply()
    root = Path(path)
    found = [(DEFAULT_ADAPTER, root)] if (root / CONFIG_NAME).is_file() else []
    found += [(d.name, d) for d in sorted(root.iterdir()) if d.is_dir() and (d / CONFIG_NAME).is_file()] \
        if root.is_dir() else []
    if not found:
        raise ValueError(f"load_adapters: no checkpoint ({CONFIG_NAME}) in {root} or its subfolders")
    plans = [plan_load(model, p, inject=inject, resize=resize, adapter_name=n, **overrides) for n, p in found]
    for plan in plans:  # every file validated (and every injection planned) before the first write
        plan.apply()
    return model
