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

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..adapters import Adapter
from ..adapters.layer import DEFAULT_ADAPTER
from .fsdp import full_tensor, is_sharded
from .injection import CONFIG_ATTR, adapted_layers, unwrap_model
from .targets import to_json

__all__ = ["CONFIG_NAME", "FORMAT", "WEIGHTS_NAME", "adapter_state", "read_json", "read_safetensors",
           "save_adapters"]


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
def _names_of(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in adapted_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def save_adapters(model: nn.Module, path: str | os.PathLike, *, adapter_name: str | None = DEFAULT_ADAPTER) -> Path:
    """Write the adapters of ``model`` to the directory ``path`` (created if needed).

    Parameters
    ----------
    model : nn.Module
        A model with adapted layers (see :func:`~lowrank_theory.training.injection.inject`).
    path : str or PathLike
        Directory; ``adapters.safetensors`` and ``adapter_config.json`` are (over)written in it.
    adapter_name : str or None, default ``"default"``
        The named adapter to save (each layer's adapter of that name).  ``None`` saves every adapter
        of the model: ``"default"`` in ``path`` itself and each other name in ``path/<name>/`` (PEFT's
        layout), each a complete checkpoint of its own.

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
    if adapter_name is None:
        out = Path(path)
        for name in _names_of(model):
            save_adapters(model, out if name == DEFAULT_ADAPTER else out / name, adapter_name=name)
        return out
    layers = {n: layer for n, layer in adapted_layers(model).items() if adapter_name in layer.adapters}
    if not layers:
        raise ValueError(f"model has no adapted layer holding an adapter named {adapter_name!r}; nothing to save "
                         f"(adapters: {_names_of(model)})")
    state, aliases = adapter_state({n: layer.adapters[adapter_name] for n, layer in layers.items()})
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
        ad = layer.adapters[adapter_name]
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
        "adapter_name": adapter_name,
        "injections": to_json([r for r in getattr(unwrap_model(model), CONFIG_ATTR, None) or []
                               if r.get("adapter_name", DEFAULT_ADAPTER) == adapter_name] or None),
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
