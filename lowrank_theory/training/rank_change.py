r"""Rank changes that replace tensors, and how an optimizer follows them.

A rank schedule (:mod:`~lowrank_theory.training.schedules`) replaces adapter tensors by new,
smaller or larger ``nn.Parameter`` objects.  An optimizer holds references to the old tensors
(in ``param_groups`` and as the keys of ``optimizer.state``).  After a rank change, call
:func:`remap_optimizer` with the :class:`ParamRemap` list of the returned :class:`RankChange`
(every schedule does it itself when given the optimizer): it swaps the new tensors into the
*same* optimizer object, so an LR scheduler bound to it keeps working, and carries the state
over.  A ``DistributedDataParallel`` wrapper must also be rebuilt
(:meth:`~lowrank_theory.training.trainer.Trainer.parameters_changed` does both).

:class:`RankSchedule` is the base class of the schedules and their trainer-callback protocol.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..adapters import AdaptedLinear
from .injection import adapted_layers

__all__ = ["ParamRemap", "RankChange", "RankSchedule", "remap_optimizer"]


# ============================================================================ remapping
@dataclass
class ParamRemap:
    """How one parameter was replaced.

    Attributes
    ----------
    old : nn.Parameter
        The tensor the optimizer may still hold.
    new : nn.Parameter or None
        Its replacement (None: removed).
    dim : int or None
        The axis whose length changed.
    index : torch.Tensor of int64 or None
        For each position ``j`` of ``new`` along ``dim``, the old position it continues, or
        ``-1`` for a fresh entry.  None: ``new`` is unrelated to ``old`` (a new basis), state reset.
    """

    old: nn.Parameter
    new: nn.Parameter | None
    dim: int | None = None
    index: torch.Tensor | None = None


@dataclass
class RankChange:
    """What one schedule event did: ``ranks[layer] = (before, after)`` and the parameter remaps."""

    step: int
    ranks: dict[str, tuple[int, int]] = field(default_factory=dict)
    remaps: list[ParamRemap] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.remaps)


def _take(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``t`` indexed by ``index`` along ``dim``, with zeros where ``index == -1``."""
    index = index.to(t.device)
    fresh = index < 0
    out = t.index_select(dim, index.clamp_min(0)).clone()
    if bool(fresh.any()):
        shape = [1] * out.ndim
        shape[dim] = -1
        out = out.masked_fill(fresh.view(shape), 0)
    return out


@torch.no_grad()
def remap_optimizer(optimizer: torch.optim.Optimizer, remaps: Sequence[ParamRemap]) -> torch.optim.Optimizer:
    """Swap replaced parameters into ``optimizer`` in place and carry their state over.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Any optimizer (AdamW, SGD, the rules of :mod:`~lowrank_theory.training.optim`).
    remaps : sequence of ParamRemap
        From :attr:`RankChange.remaps`.

    Returns
    -------
    torch.optim.Optimizer
        The same object.

    Notes
    -----
    For an element-wise rule (SGD with momentum, Adam/AdamW) a pruned model continues exactly
    as the unpruned one would on the kept coordinates: the kept moments are the old moments at
    the kept positions.  Fresh coordinates (growth) start with zero moments but share the
    parameter's step count, so Adam's bias correction treats them as old (their first steps
    are smaller than a fresh Adam's) -- the usual behaviour of ``add_param_group``-free growth.
    State whose shape is not the parameter's (weight-space moments of LoRA-Pro, keyed on B) is
    dropped for that parameter.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    by_id = {id(r.old): r for r in remaps}
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            r = by_id.get(id(p))
            if r is None:
                params.append(p)
                continue
            state = optimizer.state.pop(p, None)
            if r.new is None:
                continue
            params.append(r.new)
            if not state or r.index is None or r.dim is None:
                continue
            new_state: dict[str, Any] | None = {}
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(r.old.shape):
                    new_state[k] = _take(v, r.dim, r.index)
                elif not isinstance(v, torch.Tensor) or v.ndim == 0:
                    new_state[k] = v
                else:
                    new_state = None
                    break
            if new_state:
                optimizer.state[r.new] = new_state
        group["params"] = params
    return optimizer


def _replace(module: nn.Module, name: str, value: torch.Tensor, dim: int, index: torch.Tensor) -> ParamRemap:
    old = getattr(module, name)
    new = nn.Parameter(value.to(device=old.device, dtype=old.dtype), requires_grad=old.requires_grad)
    setattr(module, name, new)
    return ParamRemap(old, new, dim, index.to(torch.long).cpu())


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


# ============================================================================ base class
class RankSchedule:
    """Base class: trainer-callback protocol and bookkeeping shared by every schedule.

    Subclasses implement :meth:`step` (and :meth:`update` where needed).  As a callback of
    :class:`~lowrank_theory.training.trainer.Trainer`: ``extra_loss`` is added to each
    micro-batch loss, ``after_backward`` calls :meth:`update`, ``after_step`` calls
    :meth:`step` with the trainer's optimizer and tells the trainer when tensors changed.
    """

    adapter_type: type[nn.Module] = nn.Module

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.history: list[RankChange] = []
        if not self.layers():
            raise ValueError(
                f"{type(self).__name__} needs {self.adapter_type.__name__} adapters in the model; inject() them first"
            )

    def layers(self) -> dict[str, AdaptedLinear]:
        """``{name: AdaptedLinear}`` of the layers this schedule acts on (looked up afresh each call)."""
        return {n: m for n, m in adapted_layers(self.model).items() if isinstance(m.adapter, self.adapter_type)}

    def ranks(self) -> dict[str, int]:
        """Current rank of every scheduled layer."""
        return {n: int(m.adapter.rank) for n, m in self.layers().items()}

    def num_trainable(self) -> int:
        """Trainable scalars of the scheduled adapters."""
        return sum(m.adapter.num_trainable for m in self.layers().values())

    def extra_loss(self, trainer: Any = None) -> torch.Tensor | None:
        """A regularizer to add to the loss (None: nothing)."""
        return None

    def update(self) -> None:
        """Called after the backward pass, before ``optimizer.step()``."""

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> RankChange | None:
        """Called after ``optimizer.step()`` with the number of completed steps."""
        raise NotImplementedError

    def _finish(self, change: RankChange, optimizer: torch.optim.Optimizer | None) -> RankChange | None:
        if not change:
            return None
        if optimizer is not None:
            remap_optimizer(optimizer, change.remaps)
        self.history.append(change)
        return change

    # -------------------------------------------------------------- trainer callback protocol
    def on_train_begin(self, trainer: Any) -> None:
        pass

    def after_backward(self, trainer: Any) -> None:
        self.update()

    def after_step(self, trainer: Any) -> None:
        if self.step(trainer.step, trainer.optimizer):
            trainer.parameters_changed()

    def on_train_end(self, trainer: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """JSON-able values and tensors needed to resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _check_int(value: Any, name: str, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def _check_pos(value: Any, name: str, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)
