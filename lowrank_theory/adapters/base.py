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

import functools
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

from .params import Param, validate_params

__all__ = ["Adapter", "check_input", "check_rank", "check_sizes", "check_weight", "working_dtype"]


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
    """Validate a floating, finite torch weight (optionally of a given shape).  A ``meta`` tensor has no
    values, so only its type and shape are checked (shape-only memory accounting builds adapters on it)."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if not W.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {W.dtype}")
    if shape is not None and tuple(W.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(W.shape)}")
    if W.device.type != "meta" and not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return W


def check_input(x: Any, d_in: int, dtype: torch.dtype | None = None, name: str = "x") -> torch.Tensor:
    """Validate a layer input: a floating torch tensor of shape (..., d_in), in ``dtype`` when given.

    The one input check of the package: :class:`~lowrank_theory.adapters.AdaptedLinear` calls it on
    every forward and :meth:`Adapter._check_input` for adapters used on their own.  Only metadata is
    read (no value, no host sync), so it is free on CUDA and inside ``torch.compile``.  A dtype that
    differs from ``dtype`` is accepted while autocast is active on ``x``'s device (autocast casts).
    NaN/Inf *values* are not checked: they propagate, as through ``nn.Linear``.

    Raises
    ------
    TypeError
        ``x`` is not a torch tensor, is not floating (int, bool, complex), or has another dtype.
    ValueError
        ``x`` is 0-d or its last dimension is not ``d_in``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., {d_in}), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have shape (..., {d_in}), got a 0-d tensor")
    if x.shape[-1] != d_in:
        raise ValueError(f"{name} must have last dimension d_in={d_in}, got shape {tuple(x.shape)}")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but the layer computes in {dtype}; cast it with x.to({dtype})")
    return x


@contextmanager
def working_dtype(module: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """Hold every floating parameter and buffer of ``module`` in ``dtype`` inside the block; restore exactly.

    Used by merges: ΔW of an fp16/bf16 adapter is computed from the same half-precision values but
    in float32 (or float64), so the merged weight is rounded once, at the end.  The original tensors
    are put back on exit (no round trip through ``dtype``), so the block changes nothing.  A tensor
    shared by several modules (one Parameter object) is converted once and stays shared.
    """
    params: list[tuple[nn.Parameter, torch.Tensor]] = []
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
    seen: set[int] = set()
    try:
        for mod in module.modules():
            for p in mod._parameters.values():
                if p is not None and p.is_floating_point() and p.dtype != dtype and id(p) not in seen:
                    seen.add(id(p))
                    params.append((p, p.data))
                    p.data = p.data.to(dtype)
            for key, b in list(mod._buffers.items()):
                if b is not None and b.is_floating_point() and b.dtype != dtype:
                    buffers.append((mod, key, b))
                    mod._buffers[key] = b.to(dtype)
        yield module
    finally:
        for p, data in params:
            p.data = data
        for mod, key, b in buffers:
            mod._buffers[key] = b


def _validating_init(owner: type, init):
    """Wrap ``owner.__init__`` so its keywords are checked against ``owner.params`` before any work.

    The validated, normalized keywords (defaults filled in) become the adapter's ``config()``; the
    outermost constructor of a subclass chain sets it (a ``super().__init__`` call does not overwrite).
    """
    sig = inspect.signature(init)
    fixed = ("self", "d_out", "d_in")
    var_kw = [n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = {k: v for k, v in bound.arguments.items() if k not in fixed and k not in var_kw}
        for k in var_kw:
            values.update(bound.arguments.get(k, {}))
        schema = owner.params
        if schema:
            values = validate_params(owner.__name__, schema, values)
        if "_config" not in self.__dict__:
            object.__setattr__(self, "_config", dict(values))
        pos = [bound.arguments[k] for k in fixed[1:] if k in bound.arguments]
        init(self, *pos, **values)

    __init__._validates = True  # type: ignore[attr-defined]
    return __init__


class Adapter(nn.Module):
    """Base class of every adapter (see the module docstring for the contract).

    Subclasses set ``name`` (the registry key), implement :meth:`delta_weight`,
    :meth:`forward` and :meth:`param_count`, and set ``identity_at_init`` /
    ``needs_base`` / ``multiplicative`` as their method says.
    """

    name: ClassVar[str] = ""
    #: The adapted layer equals the layer it was built from right after construction (ΔW = 0 for
    #: ``create``; for ``from_weight`` the base is re-expressed so the sum is unchanged).  A class
    #: default that an instance may override where its config decides (SSF's ``init_std``).
    identity_at_init: bool = True
    #: Autograd's gradient is the derivative of ``forward`` (False where a term is a constant in backward
    #: by design, e.g. DoRA's detached norm): the gradcheck applies.
    exact_gradient: bool = True
    #: ΔW depends on the frozen weight (pass ``base_weight``).
    needs_base: ClassVar[bool] = False
    #: The method defines the merged weight directly (DoRA, SSF, HUT).
    multiplicative: ClassVar[bool] = False
    #: Config keys that choose how the update is computed, not what it is (``path``): checkpoints
    #: written with one value load into an adapter built with another.
    execution_keys: ClassVar[tuple[str, ...]] = ()
    #: The constructor's keywords with their types and ranges (:mod:`.params`); validated before any
    #: work by every construction path, and the source of :meth:`config`.  Registered classes must
    #: declare every keyword of their constructor (checked by :func:`~lowrank_theory.adapters.register`).
    params: ClassVar[Mapping[str, Param]] = MappingProxyType({})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_validates", False):
            cls.__init__ = _validating_init(cls, init)  # type: ignore[method-assign]

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
        """Constructor keyword arguments that rebuild this adapter: ``create(name, d_out, d_in, **config())``.

        The validated constructor keywords (defaults filled in), updated by methods whose structure
        changes in training (a rank schedule).  Tensors passed to the constructor (a protected basis,
        given locations) are included, so the rebuilt adapter has them; with ``load_state_dict`` of the
        original's state it then computes the same update.
        """
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
        check_input(x, self.d_in)

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

    # ------------------------------------------------------------------ merging
    def merge_dtype(self, base_weight: torch.Tensor | None) -> torch.dtype:
        """The working dtype of a merge: float32, or wider when W0 or an adapter tensor is wider."""
        acc = torch.float32 if base_weight is None else torch.promote_types(base_weight.dtype, torch.float32)
        for t in (*self.parameters(), *self.buffers()):
            if t.is_floating_point():
                acc = torch.promote_types(acc, t.dtype)
        return acc

    @torch.no_grad()
    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        r"""The merged weight :math:`W'` in W0's dtype, computed in :meth:`merge_dtype` and rounded once.

        ΔW itself is evaluated in the working dtype: the adapter's (possibly fp16/bf16) tensors are
        held in float32 or better for the computation (:func:`working_dtype`), so a half-precision merge
        is the correctly rounded :math:`W_0 + \Delta W` up to one rounding of a float32 sum.
        Subclasses change the math in :meth:`_merge`, not here.
        """
        acc = self.merge_dtype(base_weight)
        with working_dtype(self, acc):
            return self._merge(base_weight.to(acc)).to(base_weight.dtype)

    @torch.no_grad()
    def unmerged_weight(self, merged_weight: torch.Tensor) -> torch.Tensor:
        r"""Inverse of :meth:`merged_weight`, in the same working dtype: :math:`W_0 = W' - \Delta W` for
        additive methods (the method's own inverse, :meth:`_unmerge`, for multiplicative ones)."""
        acc = self.merge_dtype(merged_weight)
        with working_dtype(self, acc):
            return self._unmerge(merged_weight.to(acc)).to(merged_weight.dtype)

    def _merge(self, base_weight: torch.Tensor) -> torch.Tensor:
        r""":math:`W_0 + \Delta W`, everything already in the working dtype (multiplicative methods override it)."""
        dw = self.delta_weight(base_weight) if self.needs_base else self.delta_weight()
        return base_weight + dw.to(base_weight.dtype)

    def _unmerge(self, merged_weight: torch.Tensor) -> torch.Tensor:
        r""":math:`W' - \Delta W` in the working dtype (methods with ``needs_base`` must override)."""
        if self.needs_base:
            raise TypeError(f"{type(self).__name__} has needs_base=True, so it must define its own _unmerge")
        return merged_weight - self.delta_weight().to(merged_weight.dtype)

    @torch.no_grad()
    def merged_bias(self, base_bias: torch.Tensor | None) -> torch.Tensor | None:
        """The merged bias (unchanged for additive methods; :meth:`_merge_bias` in the working dtype)."""
        return self._bias_op(self._merge_bias, Adapter._merge_bias, base_bias)

    @torch.no_grad()
    def unmerged_bias(self, merged_bias: torch.Tensor | None) -> torch.Tensor | None:
        """Inverse of :meth:`merged_bias`."""
        return self._bias_op(self._unmerge_bias, Adapter._unmerge_bias, merged_bias)

    def _bias_op(self, op, default, bias: torch.Tensor | None) -> torch.Tensor | None:
        if getattr(op, "__func__", None) is default:
            return bias
        with working_dtype(self, acc := self.merge_dtype(bias)):
            out = op(None if bias is None else bias.to(acc))
        return out if out is None or bias is None else out.to(bias.dtype)

    def _merge_bias(self, base_bias: torch.Tensor | None) -> torch.Tensor | None:
        """The merged bias in the working dtype (None for a layer without bias); identity by default."""
        return base_bias

    def _unmerge_bias(self, merged_bias: torch.Tensor | None) -> torch.Tensor | None:
        return merged_bias

    def extra_repr(self) -> str:
        return f"d_out={self.d_out}, d_in={self.d_in}, trainable={self.num_trainable}"
