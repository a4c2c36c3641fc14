"""``AdaptedLinear``: a frozen base layer plus one adapter, with exact merge/unmerge."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .base import Adapter

__all__ = ["AdaptedLinear"]


def _is_hf_conv1d(layer: nn.Module) -> bool:
    # GPT-2's Conv1D stores weight as (d_in, d_out) and computes x @ W + b.
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


class AdapterSwitch:
    """What every adapted layer shares: the ``disabled``/``merged`` flags' context manager and repr."""

    disabled: bool
    merged: bool

    @contextmanager
    def disable_adapter(self):
        """Context manager: the layer computes the base output only."""
        prev, self.disabled = self.disabled, True
        try:
            yield self
        finally:
            self.disabled = prev

    def extra_repr(self) -> str:
        return f"merged={self.merged}, disabled={self.disabled}"


class AdaptedLinear(AdapterSwitch, nn.Module):
    """Wrap a frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) with an :class:`Adapter`.

    ``forward(x) = adapter.layer_output(x, base(x), W0, b0)`` -- for additive methods
    ``base(x) + x ΔWᵀ``.  ``merge()`` writes ``W' = merged_weight(W0)`` into the base
    layer (accumulated in float32 for fp16/bf16 weights), ``unmerge()`` restores ``W0``
    up to round-off, and ``disabled`` (or :meth:`disable_adapter`) bypasses the adapter.

    Parameters
    ----------
    base : nn.Linear or transformers Conv1D
        The frozen layer; its parameters get ``requires_grad=False``.
    adapter : Adapter
        Sized for the base weight, ``(d_out, d_in)``.
    """

    def __init__(self, base: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        if not isinstance(adapter, Adapter):
            raise TypeError(f"adapter must be an Adapter, got {type(adapter).__name__}")
        self.conv1d = _is_hf_conv1d(base)
        if not (isinstance(base, nn.Linear) or self.conv1d):
            raise TypeError(f"base must be nn.Linear or transformers Conv1D, got {type(base).__name__}")
        d_out, d_in = self._shape(base)
        if (adapter.d_out, adapter.d_in) != (d_out, d_in):
            raise ValueError(
                f"adapter is sized ({adapter.d_out}, {adapter.d_in}) but base weight is ({d_out}, {d_in})"
            )
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.adapter = adapter
        self.merged = False
        self.disabled = False

    def _shape(self, base: nn.Module) -> tuple[int, int]:
        w = base.weight
        return (w.shape[1], w.shape[0]) if self.conv1d else (w.shape[0], w.shape[1])

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as (d_out, d_in) (a view for Conv1D)."""
        w = self.base.weight
        return w.T if self.conv1d else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base(x)
        fused = self.adapter.fused_output(x, self.weight, self.bias)
        if fused is not None:
            return fused
        return self.adapter.layer_output(x, self.base(x), self.weight, self.bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (and bias, for methods that change it)."""
        if self.merged:
            return
        new_w = self.adapter.merged_weight(self.weight)
        new_b = self.adapter.merged_bias(self.bias)
        self._write(new_w, new_b)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`, restoring the frozen weight up to round-off."""
        if not self.merged:
            return
        new_w = self.adapter.unmerged_weight(self.weight)
        new_b = self.adapter.unmerged_bias(self.bias)
        self._write(new_w, new_b)
        self.merged = False

    def _write(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        target = self.base.weight
        target.copy_(w.T if self.conv1d else w)
        if b is not None and self.base.bias is not None:
            self.base.bias.copy_(b)
