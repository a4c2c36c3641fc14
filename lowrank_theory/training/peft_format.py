r"""PEFT's on-disk adapter format, both ways, for every method PEFT also has.

A PEFT adapter is a directory with ``adapter_config.json`` (``peft_type`` and the method's
fields) and ``adapter_model.safetensors`` (keys ``base_model.model.<module>.<suffix>`` per layer,
``base_model.<name>`` for model-wide tensors).  :func:`export_peft` writes our adapted model in
that format so that ``peft.PeftModel.from_pretrained`` computes what we compute;
:func:`import_peft` injects a base model with the adapter PEFT saved and loads it.

The methods, each mapped in :mod:`~lowrank_theory.training.peft_lora` or
:mod:`~lowrank_theory.training.peft_random` (one :class:`~.peft_common.PeftMethod` each, listed in
:data:`PEFT_METHODS`, which both directions read):

=============  ======================  ===============================================
PEFT type      ours                    notes
=============  ======================  ===============================================
``LORA``       ``lora``, ``dora``      rsLoRA, rank / alpha patterns, DoRA
``ADALORA``    ``adalora``             pruned ranks as ``rank_pattern`` masks
``HIRA``       ``hut``                 HiRA rank r = HUT rank r + 1 (exact, see peft_lora)
``VERA``       ``vera``                shared pair written (``save_projection=True``)
``RANDLORA``   ``randlora``            shared bases written; PEFT's kept as given
``UNILORA``    ``unilora``             one theta_d; indices and scales written
``FOURIERFT``  ``fourierft``           locations from ``random_loc_seed``
=============  ======================  ===============================================

Checked against PEFT 0.21 (``tests/training/test_peft_format.py`` and ``test_peft_methods.py``):
both directions, outputs equal to float32 round-off on MiniLM and GPT-2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint import read_json, read_safetensors
from .injection import adapted_layers
from .peft_common import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, PREFIX, SHARED_PREFIX, PeftFile, PeftMethod
from .peft_lora import ADALORA, HIRA, LORA
from .peft_random import FOURIERFT, RANDLORA, UNILORA, VERA

__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_METHODS",
    "PEFT_WEIGHTS_NAME",
    "export_peft",
    "exportable_methods",
    "import_peft",
    "peft_type_of",
]

#: The one table both directions read: PEFT type -> mapping.
PEFT_METHODS: dict[str, PeftMethod] = {
    m.peft_type: m for m in (LORA, ADALORA, HIRA, VERA, RANDLORA, UNILORA, FOURIERFT)
}
#: Config fields of every PEFT method that change what the adapter computes and that we do not model.
COMMON_UNSUPPORTED = ("modules_to_save", "trainable_token_indices", "layer_replication")


def exportable_methods() -> list[str]:
    """Our registry names that have a PEFT counterpart (sorted)."""
    return sorted(name for m in PEFT_METHODS.values() for name in m.methods)


def _method_for(names: set[str]) -> PeftMethod:
    known = {name: m for m in PEFT_METHODS.values() for name in m.methods}
    missing = sorted(names - set(known))
    if missing:
        raise ValueError(
            f"PEFT has no counterpart of {', '.join(map(repr, missing))}; "
            f"the methods that export are {', '.join(exportable_methods())}"
        )
    types = {known[n].peft_type for n in names}
    if len(types) > 1:
        raise ValueError(f"one PEFT adapter holds one method; this model mixes {sorted(types)}: export them separately")
    return known[next(iter(names))]


def peft_type_of(model: nn.Module) -> str | None:
    """The PEFT type the adapted layers of ``model`` export to, or None when they have none (or mix types)."""
    layers = adapted_layers(model)
    if not layers:
        return None
    try:
        return _method_for({type(layer.adapter).name for layer in layers.values()}).peft_type
    except ValueError:
        return None


# ============================================================================ export
def export_peft(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write the adapters of ``model`` as a PEFT adapter directory.

    Parameters
    ----------
    model : nn.Module
        Injected with one method that PEFT has (see :func:`exportable_methods`; LoRA and DoRA are
        one PEFT type but go in separate exports); names are taken relative to ``model``, so load
        the export with ``PeftModel.from_pretrained`` on the same base class.
    path : str or PathLike
        Directory to (over)write ``adapter_config.json`` and ``adapter_model.safetensors`` in.
    base_model_name_or_path : str, optional
        Written to the config; default ``model.config._name_or_path`` when present.
    task_type : str, optional
        PEFT's ``task_type`` (e.g. ``"CAUSAL_LM"``), default None.

    Returns
    -------
    Path

    Raises
    ------
    ValueError
        No adapted layer; a method PEFT does not have (the message lists those that export);
        methods of several PEFT types; a merged layer; NaN/Inf tensors; or settings PEFT keeps
        global that differ between layers and cannot be folded into the tensors (dropout,
        VeRA / RandLoRA / Uni-LoRA rank, FourierFT's location seed, several frozen bases or
        Uni-LoRA vectors, LoRA mixed with DoRA).

    Notes
    -----
    Per-layer scales that PEFT keeps global (AdaLoRA, RandLoRA, FourierFT, Uni-LoRA) are folded
    into a tensor the update is linear in, so the exported adapter computes the same ΔW up to one
    rounding.
    """
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("model has no adapted layer; nothing to export")
    method = _method_for({type(layer.adapter).name for layer in layers.values()})
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"layers {merged[:5]} are merged; unmerge(model) before exporting")
    fields, tensors = method.export(layers)
    for k, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"export_peft: tensor {k!r} contains NaN or Inf values")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config: dict[str, Any] = {
        "peft_type": method.peft_type,
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": sorted(layers),
        "fan_in_fan_out": any(type(layer.base).__name__ == "Conv1D" for layer in layers.values()),
        "bias": "none",
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
        **fields,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    (out / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


# ============================================================================ import
def _read_peft(root: Path) -> tuple[PeftMethod, PeftFile]:
    if not (root / PEFT_WEIGHTS_NAME).is_file() and (root / "adapter_model.bin").is_file():
        raise ValueError(f"import_peft: {root} holds only adapter_model.bin (pickle); only safetensors is read")
    config = read_json(root / PEFT_CONFIG_NAME, "import_peft")
    method = PEFT_METHODS.get(config.get("peft_type"))
    if method is None:
        raise ValueError(
            f"import_peft: peft_type must be one of {', '.join(map(repr, PEFT_METHODS))}, "
            f"got {config.get('peft_type')!r}"
        )
    if config.get("bias", "none") not in (None, "none"):
        raise ValueError(f"import_peft: bias={config['bias']!r} is not supported (only 'none')")
    for key in COMMON_UNSUPPORTED + method.unsupported:
        if config.get(key):
            raise ValueError(f"import_peft: {key}={config[key]!r} is not supported")
    tensors = read_safetensors(root / PEFT_WEIGHTS_NAME, "import_peft")
    f = PeftFile(config, {}, {})
    # longest suffix first: "lora_A" must not swallow a key ending in "lora_A.weight"
    suffixes = sorted(method.suffixes, key=len, reverse=True)
    for key, t in tensors.items():
        if key.startswith(PREFIX):
            rest = key[len(PREFIX) :]
            suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
            if suffix is None:
                raise ValueError(
                    f"import_peft: unsupported tensor {key!r} for {method.peft_type} "
                    f"(expected {', '.join(method.suffixes)})"
                )
            f.layers.setdefault(rest[: -len(suffix) - 1], {})[suffix] = t
        elif key.startswith(SHARED_PREFIX) and key[len(SHARED_PREFIX) :] in method.shared:
            f.shared[key[len(SHARED_PREFIX) :]] = t
        else:
            raise ValueError(f"import_peft: unsupported tensor {key!r} for {method.peft_type}")
    if not f.layers and not method.targets_from_config:
        raise ValueError(f"import_peft: {root / PEFT_WEIGHTS_NAME} holds no adapted layer")
    required = set(method.suffixes if method.required is None else method.required)
    for name, parts in f.layers.items():
        if not required <= set(parts):
            raise ValueError(
                f"import_peft: layer {name!r} has tensors {sorted(parts)}, expected {sorted(required)}"
            )
    return method, f


def import_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Inject ``model`` with the adapter PEFT saved at ``path`` and load its tensors.

    Parameters
    ----------
    model : nn.Module
        The base model the adapter was trained on (same module names), not yet adapted there.
    path : str or PathLike
        A PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) of one
        of the types in :data:`PEFT_METHODS`.

    Returns
    -------
    nn.Module
        ``model``, with our counterpart adapters holding PEFT's tensors (HiRA: HUT of rank r + 1).

    Raises
    ------
    ValueError
        Another PEFT type, options we do not model (bias, modules to save, ...), a pickle-only
        adapter, unknown or missing tensors, ranks or sizes that disagree with the config, a
        module that is missing or of another shape, bases or indices we cannot hold, corrupt
        files or NaN/Inf.  Everything is checked first: the model is unchanged when this is raised.
    """
    method, f = _read_peft(Path(path))
    plans, copies = method.prepare(model, f)
    for dst, src in copies:
        if tuple(src.shape) != tuple(dst.shape):  # a mapping bug, never the user's file: still before any change
            raise ValueError(f"import_peft: internal shape mismatch {tuple(src.shape)} -> {tuple(dst.shape)}")
    for p in plans:
        p.apply()
    with torch.no_grad():
        for dst, src in copies:
            dst.copy_(src)
    return model
