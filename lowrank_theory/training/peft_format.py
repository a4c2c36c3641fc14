r"""PEFT's on-disk LoRA format: export our LoRA / rsLoRA / DoRA adapters, import PEFT's.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` (``peft_type: "LORA"``, ``r``,
``lora_alpha``, ``use_rslora``, ``use_dora``, ``target_modules``, ``rank_pattern``,
``alpha_pattern``, ``fan_in_fan_out``, ...) and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` (shape (r, d_in)),
``...lora_B.weight`` (shape (d_out, r)) and, for DoRA, ``...lora_magnitude_vector`` (d_out,)
-- checked against PEFT 0.21's ``save_pretrained`` output on GPT-2 (Conv1D) and BERT (Linear).
The factors have the same orientation as ours for Linear and Conv1D alike
(:math:`\Delta W = s\,BA` with :math:`W` as (d_out, d_in)); PEFT's ``fan_in_fan_out`` only says
that the *base* weight is stored transposed.

Scales.  PEFT computes :math:`s = \alpha/r` (``use_rslora``: :math:`\alpha/\sqrt r`) with one
global ``lora_alpha`` / ``r`` and per-layer overrides in ``alpha_pattern`` / ``rank_pattern``;
a pattern key ``k`` applies to module ``name`` when ``re.match(rf"(.*\.)?({k})$", name)``
(``peft.utils.other.get_pattern_key``).  Export writes the most common rank and alpha globally and
the escaped full module name as the pattern key of every other layer; layers whose rsLoRA flag
differs from the global one get the alpha that gives their scale under the global rule.

DoRA matches PEFT's forward :math:`y = (g/\nu)\odot(W_0x + sBAx) + b_0` with the detached row
norm :math:`\nu = \|W_0 + sBA\|_{\text{row}}` (our ``DoRA(detach_norm=True)``, the default).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters import Adapter
from .checkpoint import read_json, read_safetensors
from .injection import InjectionPlan, adapted_layers, find_targets, prepare

__all__ = ["PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "export_peft", "import_peft"]

logger = logging.getLogger(__name__)

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "magnitude"}
#: PEFT config fields that change what the adapter computes and that we do not support
#: (a truthy / non-default value is refused on import).
UNSUPPORTED = (
    "lora_bias",
    "modules_to_save",
    "layer_replication",
    "use_qalora",
    "trainable_token_indices",
    "target_parameters",
    "use_bdlora",
    "alora_invocation_tokens",
)


def _pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    # Same rule as peft.utils.other.get_pattern_key: first key k with re.match(rf"(.*\.)?({k})$", name).
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", name):
            return k
    return None


def _scale_alpha(alpha: float, rank: int, rslora: bool, global_rslora: bool) -> float:
    if rslora == global_rslora:
        return alpha
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    return scale * (math.sqrt(rank) if global_rslora else rank)


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


# ============================================================================ export
def export_peft(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write the LoRA / DoRA adapters of ``model`` as a PEFT LoRA adapter directory.

    Parameters
    ----------
    model : nn.Module
        Injected with ``"lora"`` or ``"dora"`` only (one of them); names are taken relative to
        ``model``, so load the export with ``PeftModel.from_pretrained`` on the same class.
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
        No adapted layer, a method other than LoRA/DoRA, LoRA mixed with DoRA, per-layer dropout
        values that differ (PEFT has one ``lora_dropout``), a merged layer, or NaN/Inf factors.
    """
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("model has no adapted layer; nothing to export")
    methods = {n: type(layer.adapter).name for n, layer in layers.items()}
    bad = {n: m for n, m in methods.items() if m not in ("lora", "dora")}
    if bad:
        raise ValueError(f"PEFT's LoRA format holds LoRA and DoRA only; layers {dict(list(bad.items())[:5])} are not")
    if len(set(methods.values())) > 1:
        raise ValueError("PEFT's use_dora is global: export LoRA and DoRA layers separately")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"layers {merged[:5]} are merged; unmerge(model) before exporting")
    use_dora = next(iter(methods.values())) == "dora"
    cfgs = {n: layer.adapter.config() for n, layer in layers.items()}
    dropouts = {float(c.get("dropout", 0.0)) for c in cfgs.values()}
    if len(dropouts) > 1:
        raise ValueError(f"PEFT has one lora_dropout for all layers; these layers use {sorted(dropouts)}")
    global_rs = _most_common([bool(c["rslora"]) for c in cfgs.values()])
    ranks = {n: int(c["rank"]) for n, c in cfgs.items()}
    alphas = {n: _scale_alpha(float(c["alpha"]), ranks[n], bool(c["rslora"]), global_rs) for n, c in cfgs.items()}
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    tensors: dict[str, torch.Tensor] = {}
    for n, layer in layers.items():
        ad = layer.adapter
        parts = {"lora_A.weight": ad.A, "lora_B.weight": ad.B}
        if use_dora:
            parts["lora_magnitude_vector"] = ad.magnitude
        for suffix, t in parts.items():
            t = t.detach().to("cpu").contiguous().clone()
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"layer {n!r}: {suffix} contains NaN or Inf values")
            tensors[f"{PREFIX}{n}.{suffix}"] = t
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropouts.pop(),
        "use_rslora": global_rs,
        "use_dora": use_dora,
        "target_modules": sorted(layers),
        "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != alpha},
        "fan_in_fan_out": any(type(layer.base).__name__ == "Conv1D" for layer in layers.values()),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    (out / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


# ============================================================================ import
def _read_peft(root: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    if not (root / PEFT_WEIGHTS_NAME).is_file() and (root / "adapter_model.bin").is_file():
        raise ValueError(f"import_peft: {root} holds only adapter_model.bin (pickle); only safetensors is read")
    config = read_json(root / PEFT_CONFIG_NAME, "import_peft")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"import_peft: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"import_peft: bias={config['bias']!r} is not supported (only 'none')")
    for key in UNSUPPORTED:
        if config.get(key):
            raise ValueError(f"import_peft: {key}={config[key]!r} is not supported")
    tensors = read_safetensors(root / PEFT_WEIGHTS_NAME, "import_peft")
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"import_peft: key {key!r} does not start with {PREFIX!r}")
        rest = key[len(PREFIX) :]
        for suffix, part in SUFFIXES.items():
            if rest.endswith("." + suffix):
                per_layer.setdefault(rest[: -len(suffix) - 1], {})[part] = t
                break
        else:
            raise ValueError(f"import_peft: unsupported tensor {key!r} (expected lora_A / lora_B / magnitude)")
    return config, per_layer


def import_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Inject ``model`` with the LoRA / rsLoRA / DoRA adapter saved by PEFT at ``path`` and load it.

    Parameters
    ----------
    model : nn.Module
        The base model PEFT's adapter was trained on (same module names), not yet adapted there.
    path : str or PathLike
        A PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Returns
    -------
    nn.Module
        ``model``, with ``"lora"`` (or ``"dora"``) adapters holding PEFT's tensors.

    Raises
    ------
    ValueError
        Not a LoRA config, options we do not model (bias, modules to save, ...), a pickle-only
        adapter, unknown tensor keys, a layer missing A or B (or DoRA's magnitude), a rank that
        disagrees with ``r`` / ``rank_pattern``, a module that is missing or of another shape,
        corrupt files or NaN/Inf.  The model is unchanged when this is raised.
    """
    config, per_layer = _read_peft(Path(path))
    use_dora = bool(config.get("use_dora", False))
    needed = {"A", "B", "magnitude"} if use_dora else {"A", "B"}
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    groups: dict[tuple[int, float], list[str]] = {}
    for name, parts in per_layer.items():
        if set(parts) != needed:
            raise ValueError(f"import_peft: layer {name!r} has tensors {sorted(parts)}, expected {sorted(needed)}")
        A, B = parts["A"], parts["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"import_peft: layer {name!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} disagree"
            )
        rank = int(A.shape[0])
        rk = _pattern_key(rank_pattern, name)
        want_rank = int(rank_pattern[rk] if rk is not None else config.get("r", 8))
        if rank != want_rank:
            raise ValueError(f"import_peft: layer {name!r} has rank {rank}, the config says {want_rank}")
        ak = _pattern_key(alpha_pattern, name)
        alpha = float(alpha_pattern[ak] if ak is not None else config.get("lora_alpha", 8))
        groups.setdefault((rank, alpha), []).append(name)
    method = "dora" if use_dora else "lora"
    cfg: dict[str, Any] = {"rslora": rslora}
    dropout = float(config.get("lora_dropout", 0.0))
    if not use_dora:
        cfg["dropout"] = dropout
    elif dropout:
        logger.warning("import_peft: our DoRA has no dropout; lora_dropout=%s is ignored", dropout)
    plans: list[InjectionPlan] = []
    for (rank, alpha), names in groups.items():
        targets = [re.compile(re.escape(n)) for n in names]
        find_targets(model, targets)  # every module must exist and be Linear / Conv1D
        plans.append(prepare(model, method, targets, rank=rank, alpha=alpha, **cfg))
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for plan in plans:
        for name, ad in plan.adapters.items():
            copies += _pairs(name, ad, per_layer[name])
    for plan in plans:
        plan.apply()
    with torch.no_grad():
        for dst, src in copies:
            dst.copy_(src)
    return model


def _pairs(name: str, ad: Adapter, parts: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for part, src in parts.items():
        dst = getattr(ad, part)
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"import_peft: layer {name!r} ({ad.d_out}x{ad.d_in}): {part} has shape {tuple(src.shape)}, "
                f"expected {tuple(dst.shape)}"
            )
        out.append((dst, src))
    return out
