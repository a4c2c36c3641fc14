r"""Which modules of a model to adapt: targets by exact name, dotted suffix, regex or ``"all-linear"``.

Targets follow PEFT's habits:

* a plain string is an exact module name or a name suffix on a dot boundary
  (``"query"`` and ``".query"`` both match ``encoder.layer.0.attention.self.query``);
* ``"re:<pattern>"`` or a compiled ``re.Pattern`` must match the *whole* name (``re.fullmatch``,
  as PEFT does with a string ``target_modules``);
* a list mixes the above; every entry must match at least one module (a typo is an error,
  where PEFT only complains when nothing matched at all);
* ``"all-linear"`` takes every Linear / Conv1D except the output head: the module returned by
  ``model.get_output_embeddings()`` and anything under a ``lm_head``, ``classifier`` or ``score``
  module (PEFT's ``SEQ_CLS_HEAD_NAMES`` plus the usual LM head name).

An already adapted layer (:class:`~lowrank_theory.adapters.AdaptedLinear`) is a target too: it receives a
new named adapter next to those it holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..adapters import AdaptedLinear
from ..adapters.layer import DEFAULT_ADAPTER
from ..adapters.quantized_base import QuantizedLinear

__all__ = ["OUTPUT_HEAD_NAMES", "Target", "Targets", "find_targets", "is_linear", "to_json"]

#: Module names treated as output heads by ``"all-linear"`` (any path component).
OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score")

Target = str | re.Pattern
Targets = Target | Sequence[Target]


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear``, transformers' ``Conv1D`` (GPT-2's weight-transposed linear) and ``QuantizedLinear``."""
    return (isinstance(module, nn.Linear | QuantizedLinear)
            or (type(module).__name__ == "Conv1D" and hasattr(module, "nf")))


def to_json(value: Any) -> Any:
    """A JSON-able copy of a config value: tuples become lists, dtypes strings, other objects a marker.

    Objects that cannot be written (a shared module, a callable) become
    ``{"__object__": "<type name>"}``; re-injecting from such a record needs the object again.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, re.Pattern):
        return "re:" + value.pattern
    return {"__object__": type(value).__qualname__}


def _target_list(targets: Targets, name: str) -> list[Target]:
    if isinstance(targets, str | re.Pattern):
        return [targets]
    if isinstance(targets, Iterable):
        out = list(targets)
        for t in out:
            if not isinstance(t, str | re.Pattern):
                raise TypeError(f"{name} entries must be str or re.Pattern, got {type(t).__name__}")
        if not out:
            raise ValueError(f"{name} must not be empty")
        return out
    raise TypeError(f"{name} must be a str, an re.Pattern or a list of them, got {type(targets).__name__}")


def _matches(target: Target, key: str) -> bool:
    if isinstance(target, re.Pattern):
        return target.fullmatch(key) is not None
    if target.startswith("re:"):
        return re.fullmatch(target[3:], key) is not None
    suffix = target.lstrip(".")
    if not suffix:
        raise ValueError(f"target {target!r} is empty")
    return key == suffix or key.endswith("." + suffix)


def _some_names(model: nn.Module, limit: int = 12) -> str:
    lin = [n for n, m in model.named_modules() if n and is_linear(m)]
    shown = ", ".join(lin[:limit]) + (", ..." if len(lin) > limit else "")
    return f"{len(lin)} Linear/Conv1D modules: {shown}" if lin else "the model has no Linear/Conv1D module"


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named submodules that may be targeted: not the root, nothing inside an AdaptedLinear."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    out = []
    for n, m in model.named_modules():
        if n and not any(n.startswith(w + ".") for w in wrapped):
            out.append((n, m))
    return out


def _output_head_names(model: nn.Module) -> set[str]:
    heads: set[str] = set()
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Module):
            heads |= {n for n, m in model.named_modules() if m is emb}
    for n, _ in model.named_modules():
        if any(part in OUTPUT_HEAD_NAMES for part in n.split(".")):
            heads.add(n)
    return heads


def find_targets(model: nn.Module, targets: Targets = "all-linear", exclude: Targets | None = None, *,
                 adapter_name: str = DEFAULT_ADAPTER) -> list[str]:
    """Names of the modules ``targets`` selects (minus ``exclude``), in ``named_modules`` order.

    Parameters
    ----------
    model : nn.Module
    targets : str, re.Pattern or list of them
        See the module docstring (exact name, dotted suffix, ``"re:"`` full match, ``"all-linear"``).
        An already adapted layer (``AdaptedLinear``) is a target too: it receives ``adapter_name``
        next to the adapters it holds.
    exclude : same as ``targets``, optional
        Modules to leave alone (exclusions need not match anything).
    adapter_name : str, default ``"default"``
        The name the new adapters get; a layer that already holds an adapter of that name is an error.

    Returns
    -------
    list of str

    Raises
    ------
    ValueError
        If a target entry matches no module (the message lists some module names), or a matched
        layer already holds an adapter named ``adapter_name``.
    TypeError
        If a matched module is neither ``nn.Linear`` nor ``Conv1D``, or the arguments have the wrong type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    cands = _candidates(model)
    chosen: dict[str, nn.Module] = {}
    if isinstance(targets, str) and targets.lower() == "all-linear":
        heads = _output_head_names(model)
        chosen = {n: m for n, m in cands if (is_linear(m) or isinstance(m, AdaptedLinear)) and n not in heads}
        if not chosen:
            raise ValueError(f"targets='all-linear' matched no module outside the output head; {_some_names(model)}")
    else:
        for t in _target_list(targets, "targets"):
            hits = {n: m for n, m in cands if _matches(t, n)}
            if not hits:
                raise ValueError(f"target {to_json(t)!r} matched no module; {_some_names(model)}")
            chosen.update(hits)
    if exclude is not None:
        ex = _target_list(exclude, "exclude")
        chosen = {n: m for n, m in chosen.items() if not any(_matches(t, n) for t in ex)}
        if not chosen:
            raise ValueError(f"every target module is excluded by exclude={to_json(exclude)!r}")
    for n, m in chosen.items():
        if isinstance(m, AdaptedLinear):
            if adapter_name in m.adapters:
                raise ValueError(
                    f"module {n!r} already holds an adapter named {adapter_name!r} "
                    f"({type(m.adapters[adapter_name]).__name__}); pass another adapter_name to add one next to it"
                )
            continue
        if not is_linear(m):
            raise TypeError(f"target module {n!r} is {type(m).__name__}; only nn.Linear and Conv1D can be adapted")
    order = {n: i for i, (n, _) in enumerate(cands)}
    return sorted(chosen, key=order.__getitem__)
