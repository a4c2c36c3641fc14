r"""The pieces every PEFT method mapping shares: file layout, the mapping record, small helpers.

A PEFT adapter directory holds ``adapter_config.json`` (``peft_type`` and the method's fields)
and ``adapter_model.safetensors``.  Per-layer tensors are keyed
``base_model.model.<module path>.<suffix>`` (``lora_A.weight``, ``vera_lambda_b``, ...), tensors
shared by the whole model ``base_model.<name>`` (VeRA's ``vera_A``, Uni-LoRA's
``unilora_theta_d``).  Each method is described once by a :class:`PeftMethod`: the PEFT type,
our registry names it holds, the tensor names it reads, and two functions -- ``export`` (our
adapted layers -> config fields and tensors) and ``prepare`` (a parsed file -> injection plans
and the tensor copies that load it, built without touching the model).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import AdaptedLinear
from .injection import InjectionPlan, prepare
from .targets import find_targets, is_linear

__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "PREFIX",
    "SHARED_PREFIX",
    "Copies",
    "PeftFile",
    "PeftMethod",
]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."

#: (destination tensor in one of our adapters, source tensor from the file), copied after apply.
Copies = list[tuple[torch.Tensor, torch.Tensor]]
Layers = dict[str, AdaptedLinear]


@dataclass
class PeftFile:
    """A parsed PEFT adapter: its config, per-layer tensors ``{module: {suffix: t}}`` and shared tensors."""

    config: dict[str, Any]
    layers: dict[str, dict[str, torch.Tensor]]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, key: str, default: Any) -> Any:
        """``config[key]``, or ``default`` where the key is absent or null (PEFT's dataclass default)."""
        value = self.config.get(key)
        return default if value is None else value


@dataclass(frozen=True)
class PeftMethod:
    """How one PEFT method maps onto our adapters (see the module docstring)."""

    peft_type: str
    methods: tuple[str, ...]
    suffixes: tuple[str, ...]
    export: Callable[[Layers], tuple[dict[str, Any], dict[str, torch.Tensor]]]
    prepare: Callable[[nn.Module, PeftFile], tuple[list[InjectionPlan], Copies]]
    shared: tuple[str, ...] = ()
    #: config fields that change what the adapter computes and that we do not model (refused when truthy)
    unsupported: tuple[str, ...] = ()
    #: the suffixes every layer must have (default: all of ``suffixes``)
    required: tuple[str, ...] | None = None
    #: a file may hold no per-layer tensor at all (Uni-LoRA without indices): layers come from the config
    targets_from_config: bool = False


# ============================================================================ helpers
def pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    r"""PEFT's ``get_pattern_key``: the first key ``k`` with ``re.match(rf"(.*\.)?({k})$", name)``."""
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", name):
            return k
    return None


def per_layer(f: PeftFile, name: str, global_key: str, pattern: str, default: Any) -> Any:
    """A per-layer setting: the value of the first matching key of ``config[pattern]``, else the global one."""
    patterns = f.get(pattern, {})
    k = pattern_key(patterns, name)
    return patterns[k] if k is not None else f.get(global_key, default)


def most_common(values: list[Any]) -> Any:
    """The most frequent value (the first one seen among ties)."""
    return Counter(values).most_common(1)[0][0]


def global_and_pattern(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value and ``{escaped full name: value}`` for the layers that differ from it."""
    glob = most_common(list(values.values()))
    return glob, {re.escape(n): v for n, v in values.items() if v != glob}


def one_value(values: dict[str, Any], what: str) -> Any:
    """The single value every layer shares; ``ValueError`` naming ``what`` when they differ."""
    distinct = sorted(set(values.values()), key=repr)
    if len(distinct) != 1:
        raise ValueError(f"PEFT has one {what} for all layers; these layers use {distinct[:5]}")
    return distinct[0]


def layer_configs(layers: Layers) -> dict[str, dict[str, Any]]:
    return {n: layer.adapter.config() for n, layer in layers.items()}


def dropout_of(layers: Layers, field: str) -> float:
    """The one input-dropout probability of all layers (PEFT has a single ``field``, e.g. ``lora_dropout``)."""
    return float(one_value({n: float(c.get("dropout", 0.0)) for n, c in layer_configs(layers).items()}, field))


def detached(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy, for writing."""
    return t.detach().to("cpu").contiguous().clone()


def check_shape(name: str, part: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` itself when its shape is ``shape``; otherwise a ``ValueError`` naming the layer and tensor."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"import_peft: layer {name!r}: {part} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def weight_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    """``{name: (d_out, d_in)}`` of the target modules (validated: they exist and are Linear / Conv1D)."""
    find_targets(model, [re.compile(re.escape(n)) for n in names])
    out = {}
    for n in names:
        mod = model.get_submodule(n)
        w = mod.weight if isinstance(mod, nn.Linear) else mod.weight.T
        out[n] = (int(w.shape[0]), int(w.shape[1]))
    return out


def plan(model: nn.Module, method: str, names: list[str], **cfg: Any) -> InjectionPlan:
    """An injection plan of ``method`` on exactly the modules ``names`` (nothing is changed yet)."""
    targets = [re.compile(re.escape(n)) for n in names]
    find_targets(model, targets)  # every module must exist and be Linear / Conv1D
    return prepare(model, method, targets, **cfg)


def grouped(values: dict[str, Any]) -> dict[Any, list[str]]:
    """``{value: [names]}`` in first-seen order (one injection per distinct config)."""
    out: dict[Any, list[str]] = {}
    for n, v in values.items():
        out.setdefault(v, []).append(n)
    return out


def fold(scale: float, ref: float) -> float:
    """The factor that turns a layer's scale ``scale`` into the global ``ref`` when folded into a linear tensor."""
    if not math.isfinite(scale) or not math.isfinite(ref) or ref == 0:
        raise ValueError(f"cannot fold scale {scale} into a global scale {ref}")
    return scale / ref


def _peft_matches(target: Any, name: str) -> bool:
    # PEFT's check_target_module_exists: a str is a full regex match, a list a name or dotted suffix
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def config_targets(model: nn.Module, f: PeftFile) -> list[str]:
    """The modules PEFT's ``target_modules`` / ``exclude_modules`` select in ``model``, in module order.

    For files that do not list their layers through per-layer tensors.  ``"all-linear"`` is our
    :func:`~lowrank_theory.training.targets.find_targets` rule (every Linear / Conv1D but the
    output head, as PEFT's); ``layers_to_transform`` is refused.
    """
    targets, exclude = f.config.get("target_modules"), f.config.get("exclude_modules")
    if f.config.get("layers_to_transform") is not None:
        raise ValueError("import_peft: layers_to_transform is not supported when the layers come from the config")
    if not targets:
        raise ValueError("import_peft: the file holds no per-layer tensor and the config no target_modules")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        names = find_targets(model, "all-linear")
    else:
        names = [n for n, m in model.named_modules() if n and is_linear(m) and _peft_matches(targets, n)]
    if exclude:
        names = [n for n in names if not _peft_matches(exclude, n)]
    if not names:
        raise ValueError(f"import_peft: target_modules={targets!r} selects no Linear / Conv1D module of the model")
    return names
