"""The Adapter contract: one module parametrizes the update of one frozen weight.

An adapter for a weight :math:`W_0 \\in \\mathbb{R}^{m \\times n}` (``m = d_out``,
``n = d_in``) owns the trainable tensors of a structured update and offers

* :meth:`Adapter.delta_weight` -- the dense :math:`\\Delta W` (for merging, tests, theory);
* :meth:`Adapter.forward` -- ``x @ ΔWᵀ`` applied **through the structure** (factored
  products, FFT/DCT/WHT, gathers), never through a dense ΔW where the structure is cheaper;
* :meth:`Adapter.layer_output` -- the adapted layer's output from the frozen layer's
  output; additive methods return ``base_out + forward(x)``, multiplicative ones (DoRA,
  SSF, HUT) override it;
* :meth:`Adapter.merged_weight` / :meth:`Adapter.unmerged_weight` (and the bias
  counterparts) -- the exact merge and its inverse, accumulated in float32 or better;
* :attr:`Adapter.num_trainable` and the closed form :meth:`Adapter.param_count`.

Methods whose update depends on the frozen weight (DoRA, SSF, HUT) set
``needs_base = True`` and receive ``base_weight`` as an argument; :class:`AdaptedLinear`
passes it.  Methods whose *initialisation* reads the frozen weight (PiSSA, LoRA-XS,
LoLDU, SVFit, LQ-LoRA, QWHA, ...) offer a ``from_weight(W, **cfg)`` classmethod that
returns ``(adapter, new_base_weight)`` -- the base is replaced where the method says so
(PiSSA's residual, LQ-LoRA's quantized part) and returned unchanged otherwise.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["Adapter", "check_rank", "check_sizes", "check_weight"]


def check_sizes(d_out: int, d_in: int) -> tuple[int, int]:
    """Validate layer sizes: positive Python ints (``ValueError``/``TypeError`` otherwise)."""
    for name, v in (("d_out", d_out), ("d_in", d_in)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    return d_out, d_in


def check_rank(rank: int, d_out: int, d_in: int, name: str = "rank", *, upper: int | None = None) -> int:
    """Validate ``1 <= rank <= min(d_out, d_in)`` (or ``<= upper`` when given)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{name} must be an int, got {type(rank).__name__}")
    hi = min(d_out, d_in) if upper is None else upper
    if not 1 <= rank <= hi:
        raise ValueError(f"{name} must satisfy 1 <= {name} <= {hi} for a {d_out}x{d_in} weight, got {rank}")
    return rank


def check_weight(W: torch.Tensor, name: str = "weight", shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Validate a floating, finite torch weight (optionally of a given shape)."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if not W.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {W.dtype}")
    if shape is not None and tuple(W.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return W


class Adapter(nn.Module):
    """Base class of every adapter (see the module docstring for the contract).

    Subclasses set ``name`` (the registry key), implement :meth:`delta_weight`,
    :meth:`forward` and :meth:`param_count`, and set ``identity_at_init`` /
    ``needs_base`` / ``multiplicative`` as their method says.
    """

    name: ClassVar[str] = ""
    #: ΔW = 0 right after construction (so the adapted layer equals the base layer).
    identity_at_init: ClassVar[bool] = True
    #: ΔW depends on the frozen weight (pass ``base_weight``).
    needs_base: ClassVar[bool] = False
    #: The method defines the merged weight directly (DoRA, SSF, HUT).
    multiplicative: ClassVar[bool] = False
    #: Config keys that choose how the update is computed, not what it is (``path``): checkpoints
    #: written with one value load into an adapter built with another.
    execution_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, d_out: int, d_in: int) -> None:
        super().__init__()
        self.d_out, self.d_in = check_sizes(d_out, d_in)

    # ------------------------------------------------------------------ required
    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ΔW of shape (d_out, d_in)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ ΔWᵀ`` for ``x`` of shape (..., d_in), through the structure."""
        raise NotImplementedError

    @classmethod
    def param_count(cls, d_out: int, d_in: int, **cfg: Any) -> int:
        """Closed-form number of trainable scalars for a (d_out, d_in) weight."""
        raise NotImplementedError

    # ------------------------------------------------------------------ defaults
    @property
    def num_trainable(self) -> int:
        """Number of trainable scalars actually held (``requires_grad`` parameters)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this adapter (for checkpoints)."""
        return dict(getattr(self, "_config", {}))

    def _require_base(self, base_weight: torch.Tensor | None) -> torch.Tensor:
        if base_weight is None:
            raise ValueError(f"{type(self).__name__} needs base_weight (its update depends on W0)")
        if tuple(base_weight.shape) != (self.d_out, self.d_in):
            raise ValueError(
                f"base_weight must have shape ({self.d_out}, {self.d_in}), got {tuple(base_weight.shape)}"
            )
        return base_weight

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x must have last dimension d_in={self.d_in}, got shape {tuple(x.shape)}")

    def layer_output(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        base_weight: torch.Tensor,
        base_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """Output of the adapted layer given the frozen layer's ``base_out = x W0ᵀ + b0``."""
        delta = self(x, base_weight) if self.needs_base else self(x)
        return base_out + delta.to(base_out.dtype)

    def fused_output(
        self, x: torch.Tensor, base_weight: torch.Tensor, base_bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The whole adapted layer's output in one fused computation, or None when there is none.

        :class:`AdaptedLinear` calls this first and falls back to ``layer_output(x, base(x), ...)``
        on None.  Overridden by methods with a fused kernel (LoRA: :mod:`.fused`).
        """
        return None

    @torch.no_grad()
    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """``W0 + ΔW`` computed in float32 (or float64) and cast back to W0's dtype."""
        acc = torch.promote_types(base_weight.dtype, torch.float32)
        dw = self.delta_weight(base_weight) if self.needs_base else self.delta_weight()
        return (base_weight.to(acc) + dw.to(acc)).to(base_weight.dtype)

    @torch.no_grad()
    def unmerged_weight(self, merged_weight: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merged_weight`: ``W' − ΔW`` in float32 or better."""
        if self.needs_base:
            raise NotImplementedError(f"{type(self).__name__} must override unmerged_weight")
        acc = torch.promote_types(merged_weight.dtype, torch.float32)
        return (merged_weight.to(acc) - self.delta_weight().to(acc)).to(merged_weight.dtype)

    @torch.no_grad()
    def merged_bias(self, base_bias: torch.Tensor | None) -> torch.Tensor | None:
        """The merged bias (unchanged for additive methods)."""
        return base_bias

    @torch.no_grad()
    def unmerged_bias(self, merged_bias: torch.Tensor | None) -> torch.Tensor | None:
        """Inverse of :meth:`merged_bias`."""
        return merged_bias

    def extra_repr(self) -> str:
        return f"d_out={self.d_out}, d_in={self.d_in}, trainable={self.num_trainable}"
