"""Adapter checkpoints: the adapters' own state in safetensors, their recipe in JSON.

A checkpoint is a directory with two files:

* ``adapters.safetensors`` -- every adapter's ``state_dict`` under the layer's name
  (``encoder.layer.0.attention.self.query.adapter.A``): the trainable tensors and the persistent
  buffers that cannot be regenerated (learned locations, spectra chosen from the weight).  Frozen
  random bases are non-persistent buffers, so they are never stored; they are rebuilt from the
  seeds in the config.  A tensor shared by several layers (Uni-LoRA's one vector) is stored once
  and the other names are listed as aliases.
* ``adapter_config.json`` -- the format version, the library version, the injection records
  (method, cfg, targets, exclude, layer names; see :func:`~lowrank_theory.training.injection.inject`),
  and per layer the method, ``(d_out, d_in)``, the base type, the adapter's ``config()`` and its
  seeds.

Only safetensors is read or written (never pickle / ``torch.load``).  :func:`load_adapters`
validates everything -- the files parse, every tensor is finite, the layer set, methods, shapes,
configs, keys, tensor shapes and dtypes agree -- before it writes a single tensor, so a bad file
raises ``ValueError`` and leaves the model as it was (:func:`plan_load` is the validation alone).
Models sharded by FSDP2 save the same files (every rank calls :func:`save_adapters`, rank 0
writes) and load them shard by shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..adapters import Adapter
from .fsdp import full_tensor, is_sharded, shard_like
from .injection import CONFIG_ATTR, InjectionPlan, adapted_layers, prepare, to_json, unwrap_model

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "WEIGHTS_NAME",
    "LoadPlan",
    "adapter_state",
    "load_adapters",
    "plan_load",
    "save_adapters",
]

WEIGHTS_NAME = "adapters.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "lowrank_theory.adapters"
FORMAT_VERSION = 1


# ============================================================================ state
def adapter_state(layer_adapters: dict[str, Adapter]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapters' state under ``<layer>.adapter.<key>``, each shared tensor once.

    Parameters
    ----------
    layer_adapters : dict of str to Adapter
        ``{layer name: adapter}``.

    Returns
    -------
    state : dict of str to Tensor
        Canonical key -> tensor (the live tensors, not copies).
    aliases : dict of str to str
        Other key -> canonical key, for tensors that appear under several layers.
    """
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, ad in layer_adapters.items():
        for k, v in ad.state_dict(keep_vars=True).items():
            key = f"{name}.adapter.{k}"
            if id(v) in first:
                aliases[key] = first[id(v)]
            else:
                first[id(v)] = key
                state[key] = v
    return state, aliases


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for k, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: tensor {k!r} contains NaN or Inf values")


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file on the CPU; any failure is a ``ValueError`` naming the file."""
    if not path.is_file():
        raise ValueError(f"{what}: {path} does not exist")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{what}: {path} is not a readable safetensors file ({exc})") from None
    _check_finite(tensors, str(path))
    return tensors


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Load a JSON object; a missing or malformed file is a ``ValueError`` naming it."""
    if not path.is_file():
        raise ValueError(f"{what}: {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what}: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


# ============================================================================ save
def save_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapters of ``model`` to the directory ``path`` (created if needed).

    Parameters
    ----------
    model : nn.Module
        A model with adapted layers (see :func:`~lowrank_theory.training.injection.inject`).
    path : str or PathLike
        Directory; ``adapters.safetensors`` and ``adapter_config.json`` are (over)written in it.

    Returns
    -------
    Path
        The directory.

    Raises
    ------
    ValueError
        If the model has no adapted layer or an adapter tensor holds NaN/Inf.

    Notes
    -----
    On a model sharded by FSDP2 (:func:`~lowrank_theory.training.fsdp.shard_model`) this is a
    collective: every rank calls it, the sharded tensors are gathered, and rank 0 writes the
    same files an unsharded model gives.
    """
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("model has no adapted layer; nothing to save")
    state, aliases = adapter_state({n: layer.adapter for n, layer in layers.items()})
    sharded = is_sharded(model)  # FSDP: every rank calls, rank 0 writes
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():  # the same order on every rank: the gathers of sharded tensors match up
        t = full_tensor(v.detach()).to("cpu").contiguous()
        if t.numel() and t.data_ptr() in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[k] = t
    _check_finite(tensors, "save_adapters")
    layer_info = {}
    for n, layer in layers.items():
        ad = layer.adapter
        cfg = to_json(ad.config())
        layer_info[n] = {
            "method": type(ad).name,
            "shape": [ad.d_out, ad.d_in],
            "base": type(layer.base).__name__,
            "config": cfg,
            "seeds": {k: v for k, v in cfg.items() if "seed" in k},
            "trainable": ad.num_trainable,
        }
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "injections": to_json(getattr(model, CONFIG_ATTR, None)),
        "layers": layer_info,
        "aliases": aliases,
        "tensors": {k: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for k, t in tensors.items()},
    }
    out = Path(path)
    if sharded and dist.get_rank() != 0:
        return out  # rank 0 writes
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "library": FORMAT}
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=meta))
    _atomic_write(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return out


# ============================================================================ load
def _replay(model: nn.Module, config: dict[str, Any], overrides: dict[str, Any]) -> list[InjectionPlan]:
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


def _resized(layer_adapters: dict[str, Adapter], config: dict[str, Any]) -> dict[str, Adapter]:
    """Adapters rebuilt from the file's per-layer method and config where they differ from the model's."""
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
    ) -> None:
        self.model = model
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
        old = {}
        for n, new in self._swaps.items():
            layer = root.get_submodule(n)
            old[n] = layer.adapter
            layer.adapter = new
        try:
            yield self.model
        except BaseException:
            for n, ad in old.items():
                root.get_submodule(n).adapter = ad
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
    model: nn.Module, path: str | os.PathLike, *, inject: bool = False, resize: bool = False, **overrides: Any
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
            plans = _replay(model, config, overrides)
            layer_adapters = {n: ad for plan in plans for n, ad in plan.adapters.items()}
        else:
            plans = []
            layers = adapted_layers(model)
            merged = [n for n, layer in layers.items() if layer.merged]
            if merged:
                raise ValueError(f"layers {merged[:5]} are merged; unmerge(model) before loading adapters")
            layer_adapters = {n: layer.adapter for n, layer in layers.items()}
            if not layer_adapters:
                raise ValueError("model has no adapted layer; inject() it first or pass inject=True")
        swaps = _resized(layer_adapters, config) if resize else {}
    layer_adapters = {**layer_adapters, **swaps}
    for plan in plans:
        plan.adapters.update({n: a for n, a in swaps.items() if n in plan.adapters})
    pairs = _validate(layer_adapters, config, tensors)
    return LoadPlan(model, layer_adapters, plans, {} if plans else swaps, pairs)


def load_adapters(
    model: nn.Module, path: str | os.PathLike, *, inject: bool = False, resize: bool = False, **overrides: Any
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
    resize : bool
        Where a layer's saved method or config differs from the model's (a rank schedule changed
        the rank, LoRA-Squeeze replaced the adapter), rebuild that adapter from the saved
        per-layer method and config before loading (the swap happens only once everything is
        validated).  Without it such a difference is an error.
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
    return plan_load(model, path, inject=inject, resize=resize, **overrides).apply()
