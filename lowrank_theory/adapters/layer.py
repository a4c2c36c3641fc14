"""Adapted layers: a frozen base layer holding named adapters, with exact, checked merge/unmerge.

:class:`AdapterHost` is what :class:`AdaptedLinear` and
:class:`~lowrank_theory.adapters.conv.AdaptedConv2d` share:

* **named adapters** -- ``add_adapter(name, adapter)``, ``set_adapter(name | [names])``,
  ``delete_adapter(name)``, ``active_adapters``; one adapter called ``"default"`` is the simple case
  and ``layer.adapter`` is then that adapter.  Several active adapters add their updates (as in
  PEFT); a multiplicative method (DoRA, SSF, HUT, TLoRA) defines the whole layer and is active alone.
* **merge / unmerge** -- ``merge()`` folds the active adapters into the base weight, the new weight
  computed in float32 or better (:meth:`Adapter.merged_weight`) and, with ``safe=True`` (the
  default), refused with the weights left bit-identical when it is not finite.  ``unmerge()`` restores
  W0 up to round-off and refuses when a merged adapter changed since the merge (its tensors are
  compared with a copy taken at merge time), since W0 could then not be recovered.
* **disable** -- ``disabled`` / :meth:`disable_adapter` give the base layer's output, also while
  merged (then the base weight is recovered on the fly, without writing it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, check_input, working_dtype
from .quantized_base import QuantizationError, QuantizedLinear

__all__ = ["DEFAULT_ADAPTER", "AdaptedLinear", "AdapterHost"]

logger = logging.getLogger(__name__)

#: The name of an adapter added without one.
DEFAULT_ADAPTER = "default"


def _is_hf_conv1d(layer: nn.Module) -> bool:
    # GPT-2's Conv1D stores weight as (d_in, d_out) and computes x @ W + b.
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def _check_name(name: Any, what: str = "adapter_name") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    if not name or "." in name or not name.isprintable():
        raise ValueError(f"{what} must be a non-empty printable name without '.', got {name!r}")
    return name


def _state_copy(adapter: Adapter) -> dict[str, torch.Tensor]:
    """A copy of the adapter's state (trainable tensors and persistent buffers) to compare at unmerge."""
    return {k: v.detach().clone() for k, v in adapter.state_dict(keep_vars=True).items()}


class AdapterHost(nn.Module):
    """Named adapters over one frozen base layer (see the module docstring); subclasses supply the layer math.

    A subclass sets ``self.base`` and calls :meth:`_init_host`, and implements :meth:`_check_adapter`,
    :meth:`_base_weight` / :meth:`_write_base_weight` (the weight in the adapters' layout),
    :meth:`_base_functional` (the base layer's math with a given weight and bias) and :meth:`forward`.
    """

    base: nn.Module

    def _init_host(self, base: nn.Module, adapter: Adapter | None, adapter_name: str) -> None:
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.adapters = nn.ModuleDict()
        self._active: list[str] = []
        self._merged: list[str] = []
        self._snapshots: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
        self._parked: dict[str, dict[str, bool]] = {}  # an inactive adapter's requires_grad flags
        self.disabled = False
        if adapter is not None:
            self.add_adapter(adapter_name, adapter)

    # ------------------------------------------------------------------ subclass hooks
    def _check_adapter(self, adapter: Adapter) -> None:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must define _check_adapter")

    def _base_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must define _base_weight")

    def _write_base_weight(self, w: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must define _write_base_weight")

    def _base_functional(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define _base_functional")  # pragma: no cover

    # ------------------------------------------------------------------ names
    @property
    def active_adapters(self) -> tuple[str, ...]:
        """Names of the adapters whose updates the layer applies (and merges)."""
        return tuple(self._active)

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        """Names of the adapters folded into the base weight, in merge order."""
        return tuple(self._merged)

    @property
    def merged(self) -> bool:
        """True while any adapter is folded into the base weight."""
        return bool(self._merged)

    @property
    def adapter(self) -> Adapter:
        """The active adapter, when exactly one is active (the usual case)."""
        if len(self._active) != 1:
            raise ValueError(
                f"layer has {len(self._active)} active adapters {self._active}; use layer.adapters[name] "
                f"(known: {list(self.adapters)})"
            )
        return self.adapters[self._active[0]]

    @adapter.setter
    def adapter(self, new: Adapter) -> None:
        """Replace the (single) active adapter, e.g. after a rank schedule rebuilt it."""
        name = self._active[0] if len(self._active) == 1 else None
        if name is None:
            raise ValueError(f"layer has {len(self._active)} active adapters; use replace_adapter(name, new)")
        self.replace_adapter(name, new)

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module.__setattr__ would register a Module value as a new submodule and skip the property
        if name == "adapter":
            AdapterHost.adapter.fset(self, value)  # type: ignore[attr-defined]
        else:
            super().__setattr__(name, value)

    def replace_adapter(self, name: str, new: Adapter) -> None:
        """Put ``new`` in place of the adapter ``name`` (same name, same active state); not while merged."""
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; known: {list(self.adapters)}")
        if name in self._merged:
            raise ValueError(f"adapter {name!r} is merged; unmerge() before replacing it")
        self._check_adapter(new)
        self.adapters[name] = new

    def add_adapter(self, name: str, adapter: Adapter, *, activate: bool | None = None) -> None:
        """Add ``adapter`` under ``name``; it becomes active when it is the first (or ``activate=True``).

        Raises
        ------
        TypeError, ValueError
            A bad name, a name in use, or an adapter that does not fit the base layer (shape, kind).
        """
        name = _check_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter_name {name!r} is already in use; known: {list(self.adapters)}")
        self._check_adapter(adapter)
        if activate is None:
            activate = not self._active
        if activate:
            self._check_combination([*self._active, name], {name: adapter})
            if self._merged:
                raise ValueError("cannot activate an adapter while the layer is merged; unmerge() first")
        self.adapters[name] = adapter
        if activate:
            self._active.append(name)
        else:
            self._park(name)

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` (one name or several) the active adapters, in that order.

        Inactive adapters are frozen (``requires_grad=False``) and get their trainable flags back when
        they are activated again, as in PEFT, so an optimizer over the trainable parameters sees only
        the active ones.
        """
        names = self.check_set_adapter(names)
        for n in self._active:
            if n not in names:
                self._park(n)
        for n in names:
            self._unpark(n)
        self._active = names

    def check_set_adapter(self, names: str | Sequence[str]) -> list[str]:
        """Validate :meth:`set_adapter`'s argument without changing anything; return the names as a list.

        An empty list is allowed: no adapter active, the layer computes its base output.
        """
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            _check_name(n, "names")
            if n not in self.adapters:
                raise ValueError(f"no adapter named {n!r}; known: {list(self.adapters)}")
        if len(set(names)) != len(names):
            raise ValueError(f"names must be distinct, got {names}")
        if self._merged and names != self._active:
            raise ValueError(f"adapters {self._merged} are merged; unmerge() before changing the active adapters")
        self._check_combination(names, {})
        return names

    def _park(self, name: str) -> None:
        """Freeze an adapter that leaves the active set, remembering which of its tensors trained."""
        ad = self.adapters[name]
        self._parked[name] = {k: p.requires_grad for k, p in ad.named_parameters()}
        for p in ad.parameters():
            p.requires_grad_(False)

    def _unpark(self, name: str) -> None:
        flags = self._parked.pop(name, None)
        if flags is not None:
            for k, p in self.adapters[name].named_parameters():
                p.requires_grad_(flags.get(k, False))

    def delete_adapter(self, name: str) -> None:
        """Remove the adapter ``name`` (not while it is merged)."""
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; known: {list(self.adapters)}")
        if name in self._merged:
            raise ValueError(f"adapter {name!r} is merged; unmerge() before deleting it")
        del self.adapters[name]
        self._parked.pop(name, None)
        if name in self._active:
            self._active.remove(name)

    def _check_combination(self, names: list[str], extra: dict[str, Adapter]) -> None:
        ads = [extra.get(n) or self.adapters[n] for n in names]
        if len(ads) > 1 and any(a.multiplicative for a in ads):
            mult = [n for n, a in zip(names, ads) if a.multiplicative]
            raise ValueError(
                f"adapters {mult} define the whole layer (multiplicative methods) and can only be active alone, "
                f"got active {names}"
            )

    def _active_list(self) -> list[Adapter]:
        return [self.adapters[n] for n in self._active]

    # ------------------------------------------------------------------ switches
    @contextmanager
    def disable_adapter(self) -> Iterator[AdapterHost]:
        """Context manager: the layer computes the base output only (also while merged); restored on exit."""
        prev, self.disabled = self.disabled, True
        try:
            yield self
        finally:
            self.disabled = prev

    # ------------------------------------------------------------------ dense views
    @property
    def weight(self) -> torch.Tensor:
        """The stored base weight in the adapters' layout (the merged weight while merged)."""
        return self._base_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @torch.no_grad()
    def _chain(self, names: Sequence[str], w: torch.Tensor, b: torch.Tensor | None, *, merge: bool):
        """Apply the named adapters' merges (or, reversed, their unmerges) to ``(w, b)``.

        The whole chain runs in one working dtype (float32, or wider when W0 or an adapter is wider)
        and is rounded to the stored dtype once at the end, so several merged adapters cost one
        rounding, not one per adapter.
        """
        ads = [self.adapters[n] for n in (names if merge else list(reversed(names)))]
        acc = w.dtype
        for ad in ads:
            acc = torch.promote_types(acc, ad.merge_dtype(w))
        wa, ba = w.to(acc), None if b is None else b.to(acc)
        for ad in ads:
            with working_dtype(ad, acc):
                if merge:
                    wa, ba = ad._merge(wa), ad._merge_bias(ba)
                else:
                    wa, ba = ad._unmerge(wa), ad._unmerge_bias(ba)
        return wa.to(w.dtype), None if ba is None or b is None else ba.to(b.dtype)

    @torch.no_grad()
    def base_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W0, b0)``: the frozen weight and bias, recovered (not written) while merged."""
        w, b = self._base_weight(), self.bias
        if not self._merged:
            return w, b
        self._check_unchanged()
        return self._chain(self._merged, w, b, merge=False)

    @torch.no_grad()
    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W', b')`` that :meth:`merge` writes for the active adapters (the stored ones while merged)."""
        if self._merged:  # every active adapter is merged: activating or switching needs unmerge() first
            return self._base_weight(), self.bias
        return self._chain(self._active, self._base_weight(), self.bias, merge=True)

    # ------------------------------------------------------------------ merge / unmerge
    @torch.no_grad()
    def merge(self, *, safe: bool = True) -> None:
        """Fold the active adapters into the base weight (and bias, for methods that change it).

        Parameters
        ----------
        safe : bool, default True
            Check that the new weight and bias are finite before writing them; if not, raise
            ``ValueError`` and leave the layer bit-identical (PEFT's ``safe_merge``; the check is one
            pass over a tensor the merge computes anyway).

        Notes
        -----
        Each adapter's :meth:`~lowrank_theory.adapters.Adapter.merged_weight` computes ΔW and the sum
        in float32 or better and rounds once to the base dtype.  A copy of each merged adapter's
        state is kept so that :meth:`unmerge` can refuse if it changed meanwhile.
        """
        todo = [n for n in self._active if n not in self._merged]
        if not todo:
            return
        w, b = self._chain(todo, self._base_weight(), self.bias, merge=True)
        if safe:
            bad = [k for k, t in (("weight", w), ("bias", b)) if t is not None and not bool(torch.isfinite(t).all())]
            if bad:
                raise ValueError(
                    f"merging adapters {todo} gives a non-finite {' and '.join(bad)} (NaN/Inf in the update or an "
                    f"overflow of {w.dtype}); the layer was left unchanged"
                )
        for n in todo:
            self._snapshots[n] = (id(self.adapters[n]), _state_copy(self.adapters[n]))
        self._write(w, b)
        self._merged.extend(todo)

    def check_unmerge(self) -> None:
        """Raise ``ValueError`` if :meth:`unmerge` would refuse (a merged adapter changed or was replaced)."""
        self._check_unchanged()

    def _check_unchanged(self) -> None:
        for n in self._merged:
            ad = self.adapters[n] if n in self.adapters else None
            ident, state = self._snapshots[n]
            if ad is None or id(ad) != ident:
                raise ValueError(f"adapter {n!r} was replaced while merged: W0 cannot be recovered by unmerge")
            now = ad.state_dict(keep_vars=True)
            changed = sorted(k for k in set(now) | set(state)
                             if k not in now or k not in state or now[k].shape != state[k].shape
                             or not torch.equal(now[k].detach(), state[k]))
            if changed:
                raise ValueError(
                    f"adapter {n!r} changed since it was merged ({', '.join(changed[:4])}): unmerging would not "
                    f"restore W0. Restore its tensors first (load the state it was merged with), or reload the base"
                )

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`, restoring the frozen weight up to round-off.

        Raises
        ------
        ValueError
            A merged adapter changed (or was replaced) since the merge, or the method's inverse does not
            exist (SSF/DoRA with a zero scale, HUT with a zero Hadamard factor); the layer is unchanged.
        """
        if not self._merged:
            return
        self._check_unchanged()
        w, b = self._chain(self._merged, self._base_weight(), self.bias, merge=False)
        self._write(w, b)
        for n in self._merged:
            self._snapshots.pop(n, None)
        self._merged = []

    def _write(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        self._write_base_weight(w)
        if b is not None and self.base.bias is not None:
            self.base.bias.copy_(b)

    # ------------------------------------------------------------------ forward pieces
    def _adapter_dtype(self, ad: Adapter) -> torch.dtype | None:
        for p in ad.parameters():
            if p.is_floating_point():
                return p.dtype
        return None

    def _disabled_output(self, x: torch.Tensor) -> torch.Tensor:
        if not self._merged:
            return self.base(x)
        w, b = self.base_weights()
        return self._base_functional(x, w, b)

    def extra_repr(self) -> str:
        names = ", ".join(f"{n}{'*' if n in self._active else ''}" for n in self.adapters)
        return f"adapters=[{names}], merged={self.merged_adapters}, disabled={self.disabled}"


class AdaptedLinear(AdapterHost):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) with named adapters.

    ``forward(x) = adapter.layer_output(x, base(x), W0, b0)`` -- for additive methods
    ``base(x) + x ΔWᵀ`` (summed over the active adapters).  ``merge()`` writes ``W' = merged_weight(W0)``
    into the base layer (accumulated in float32 for fp16/bf16 weights, checked finite), ``unmerge()``
    restores ``W0`` up to round-off, and ``disabled`` (or :meth:`disable_adapter`) gives the base output,
    merged or not.  See :class:`AdapterHost` for the named-adapter API.

    Parameters
    ----------
    base : nn.Linear or transformers Conv1D
        The frozen layer; its parameters get ``requires_grad=False``.
    adapter : Adapter, optional
        Sized for the base weight, ``(d_out, d_in)``; added as ``adapter_name`` and made active.
    adapter_name : str, default ``"default"``

    Notes
    -----
    Every forward validates ``x`` once (:func:`~lowrank_theory.adapters.base.check_input`: a floating
    tensor of shape (..., d_in) in the base weight's dtype, or any floating dtype under autocast), from
    metadata only.  NaN/Inf values in ``x`` propagate, as through ``nn.Linear``.  An adapter held in
    another dtype than the base (``inject(..., dtype=torch.float32)`` on a bf16 model) gets ``x`` in its
    own dtype and its update is cast back to the base output's dtype.

    **Quantized base.**  Over a :class:`~lowrank_theory.adapters.quantized_base.QuantizedLinear` (packed
    NF4/int8, the only stored copy of W0) each forward dequantizes W0 once into a transient tensor, used
    for the base product and by adapters that read W0 (DoRA, SSF, HUT, ...); the fused single-node paths
    are not taken (they would keep that tensor alive until backward).  ``merge()`` is refused
    (``ValueError``, nothing written): folding ΔW into packed codes needs a lossy requantization.
    ``merge(requantize=True)`` does it -- dequantize, merge in float32, requantize -- and returns the
    :class:`~lowrank_theory.adapters.quantized_base.QuantizationError` of the requantized merged weight
    (also logged); ``unmerge()`` and the disabled output are then refused, since W0 is not recoverable.
    """

    def __init__(self, base: nn.Module, adapter: Adapter | None = None, *, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        self.conv1d = _is_hf_conv1d(base)
        self.quantized = isinstance(base, QuantizedLinear)
        if not (isinstance(base, nn.Linear) or self.conv1d or self.quantized):
            raise TypeError(
                f"base must be nn.Linear, transformers Conv1D or QuantizedLinear, got {type(base).__name__}"
            )
        if adapter is not None and not isinstance(adapter, Adapter):
            raise TypeError(f"adapter must be an Adapter, got {type(adapter).__name__}")
        if self.quantized:
            self.d_out, self.d_in = base.shape
        else:
            w = base.weight
            self.d_out, self.d_in = (w.shape[1], w.shape[0]) if self.conv1d else (w.shape[0], w.shape[1])
        #: The requantization error of a ``merge(requantize=True)`` (None until one happened).
        self.requantization_error: QuantizationError | None = None
        self._init_host(base, adapter, adapter_name)

    def _check_adapter(self, adapter: Adapter) -> None:
        if not isinstance(adapter, Adapter):
            raise TypeError(f"adapter must be an Adapter, got {type(adapter).__name__}")
        if (adapter.d_out, adapter.d_in) != (self.d_out, self.d_in) or hasattr(adapter, "kernel_size"):
            raise ValueError(
                f"adapter is sized ({adapter.d_out}, {adapter.d_in}) but base weight is ({self.d_out}, {self.d_in})"
            )

    def _base_weight(self) -> torch.Tensor:
        if self.quantized:
            return self.base.dequantize()
        w = self.base.weight
        return w.T if self.conv1d else w

    def _write_base_weight(self, w: torch.Tensor) -> None:
        if self.quantized:  # reached only through merge(requantize=True)
            self.requantization_error = self.base.requantize_(w)
            return
        self.base.weight.copy_(w.T if self.conv1d else w)

    # ------------------------------------------------------------------ quantized base: merge policy
    def _pending_merge(self) -> list[str]:
        return [n for n in self._active if n not in self._merged]

    def merge(self, *, safe: bool = True, requantize: bool = False) -> QuantizationError | None:
        r"""Fold the active adapters into the base (see :meth:`AdapterHost.merge`).

        Parameters
        ----------
        safe : bool, default True
            As :meth:`AdapterHost.merge`.
        requantize : bool, default False
            Required for a quantized base: dequantize, merge in float32 (rounded once to the compute
            dtype), quantize the merged weight again.  Lossy, so :meth:`unmerge` is refused afterwards.

        Returns
        -------
        QuantizationError or None
            For a requantizing merge, :math:`W' - \operatorname{dequant}(\operatorname{quant}(W'))` of the
            merged weight :math:`W'`; None otherwise.

        Raises
        ------
        ValueError
            A quantized base without ``requantize=True`` (nothing is written), ``requantize=True`` on a
            float base, or a non-finite merge (``safe``).
        """
        if requantize and not self.quantized:
            raise ValueError("requantize=True applies to a quantized base only; this layer's base is "
                             f"{type(self.base).__name__}")
        if self.quantized and self._pending_merge():
            if not requantize:
                raise ValueError(
                    f"cannot merge into a quantized ({self.base.scheme}) base: the packed weight cannot hold "
                    "W0 + ΔW exactly, so merging needs a lossy requantization that unmerge() cannot undo. "
                    "Use merge(requantize=True) to accept that (the error is returned); the layer is unchanged"
                )
            super().merge(safe=safe)
            err = self.requantization_error
            logger.info("merged %s into a quantized %s base with requantization: error %s",
                        self._merged, self.base.scheme, err)
            return err
        super().merge(safe=safe)
        return None

    def _refuse_requantized(self, what: str) -> None:
        if self.quantized and self._merged:
            raise ValueError(f"{what}: adapters {self._merged} were merged into the quantized base by requantizing, "
                             "which is not invertible (W0 is not recoverable); reload the base to undo")

    def unmerge(self) -> None:
        self._refuse_requantized("cannot unmerge")
        super().unmerge()

    def base_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._refuse_requantized("cannot recover the base weights (or give the disabled output)")
        return super().base_weights()

    def _base_functional(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_in, self.base.compute_dtype if self.quantized else self._base_weight().dtype)
        if self.disabled:
            return self._disabled_output(x)
        if self._merged or not self._active or x.numel() == 0:
            return self.base(x)
        W, b = self._base_weight(), self.bias
        if len(self._active) == 1 and not self.quantized:
            ad = self.adapters[self._active[0]]
            fused = ad.fused_output(x, W, b)
            if fused is not None:
                return fused
        out = self.base(x, W) if self.quantized else self.base(x)
        for ad in self._active_list():
            dt = self._adapter_dtype(ad)
            xa = x if dt is None or dt == x.dtype or torch.is_autocast_enabled(x.device.type) else x.to(dt)
            out = ad.layer_output(xa, out, W, b)
        return out
