"""What the checks see of a layer: one small interface over our adapted layers and other libraries' layers.

A *factory* given to :func:`~lowrank_theory.testing.check_adapter` is called as
``factory(d_out, d_in, dtype)`` and returns one of

* an :class:`~lowrank_theory.adapters.Adapter` -- the checker wraps it in an
  :class:`~lowrank_theory.adapters.AdaptedLinear` over a seeded random ``nn.Linear(d_in, d_out)``;
* an :class:`~lowrank_theory.adapters.AdaptedLinear` (for methods whose init reads the weight:
  build the base, call ``from_weight``, wrap) -- used as it is;
* a :class:`LayerView` -- any other library's layer presented to the checks
  (:class:`~lowrank_theory.testing.peft_view.PeftLayerView` does this for PEFT's tuners).

:class:`LayerView` is the contract: the checks call nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdaptedLinear, Adapter
from ..adapters.conv import AdaptedConv2d, ConvGeometry, conv2d_delta

__all__ = ["AdaptedConv2dView", "AdaptedLinearView", "LayerView", "as_view", "seeded_conv2d", "seeded_linear"]


def seeded_linear(d_out: int, d_in: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Linear:
    """A frozen ``nn.Linear(d_in, d_out)`` with weight ~ N(0, 1/d_in) and bias ~ N(0, 0.01) from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in**0.5)
        lin.bias.copy_(0.1 * torch.randn(d_out, generator=g, dtype=torch.float64))
    return lin.to(dtype).requires_grad_(False)


def seeded_conv2d(d_out: int, d_in: int, kernel_size: tuple[int, int], dtype: torch.dtype = torch.float64,
                  seed: int = 0, padding: int = 1) -> nn.Conv2d:
    """A frozen ``nn.Conv2d(d_in, d_out, kernel_size, padding=1)`` with N(0, 1/fan_in) weights from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(d_in, d_out, kernel_size, padding=padding, bias=True)
    fan_in = d_in * kernel_size[0] * kernel_size[1]
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64) / fan_in**0.5)
        conv.bias.copy_(0.1 * torch.randn(d_out, generator=g, dtype=torch.float64))
    return conv.to(dtype).requires_grad_(False)


class LayerView:
    """The layer under test, as the checks use it.  Subclass it to present another library's layer.

    Required: ``module`` (the ``nn.Module`` whose ``forward`` is the adapted layer), ``d_out``, ``d_in``,
    and the methods below that raise ``TypeError`` here.  Optional ones return None when a check does
    not apply (e.g. ``rebuild`` for layers that have no registry config), and the check is then skipped.
    """

    module: nn.Module
    d_out: int
    d_in: int
    #: ΔW = 0 right after construction (the check of identity at init applies).
    identity_at_init: bool = True
    #: The adapter defines the merged weight directly (DoRA, SSF, ...): no additive ΔW to check alone.
    multiplicative: bool = False
    #: Autograd's gradient is the derivative of the forward (gradcheck applies).
    exact_gradient: bool = True
    #: ``(W, b)`` of the layer the adapter was built from, when the build replaced the stored base
    #: (PiSSA's residual); None means the stored weights at construction.
    initial_weights: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # ------------------------------------------------------------------ required
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def merge(self, *, safe: bool) -> None:
        raise TypeError(f"{type(self).__name__} must define merge")

    def unmerge(self) -> None:
        raise TypeError(f"{type(self).__name__} must define unmerge")

    def disable(self) -> AbstractContextManager[Any]:
        """A context manager inside which the layer computes its base output."""
        raise TypeError(f"{type(self).__name__} must define disable")

    def stored_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base layer's stored (d_out, d_in) weight and bias, merged or not (no copy)."""
        raise TypeError(f"{type(self).__name__} must define stored_weights")

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W0 + ΔW, b')`` computed densely from the adapter's tensors (not through ``forward``)."""
        raise TypeError(f"{type(self).__name__} must define dense_weights")

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable tensors (name, parameter) of the adapter."""
        raise TypeError(f"{type(self).__name__} must define adapter_parameters")

    def base_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The frozen base layer's parameters."""
        raise TypeError(f"{type(self).__name__} must define base_parameters")

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's checkpoint state (what a save writes)."""
        raise TypeError(f"{type(self).__name__} must define adapter_state")

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        raise TypeError(f"{type(self).__name__} must define load_adapter_state")

    def cast(self, base_dtype: torch.dtype, adapter_dtype: torch.dtype) -> None:
        """Hold the base layer in ``base_dtype`` and the adapter's floating tensors in ``adapter_dtype``."""
        raise TypeError(f"{type(self).__name__} must define cast")

    # ------------------------------------------------------------------ inputs (a linear layer's by default)
    def example_input(self, dtype: torch.dtype, batch: tuple[int, ...] = (3, 5), seed: int = 7) -> torch.Tensor:
        """A seeded N(0, 1) input in ``dtype`` on the layer's device."""
        w, _ = self.stored_weights()
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*batch, self.d_in, generator=g, dtype=torch.float64).to(device=w.device, dtype=dtype)

    def functional(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The base layer's math with weight ``w`` and bias ``b`` (the dense reference of the checks)."""
        return F.linear(x, w, b)

    def wrong_shape_input(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(2, self.d_in + 1, dtype=dtype)

    def empty_input(self, dtype: torch.dtype) -> tuple[torch.Tensor, tuple[int, ...]]:
        """An empty batch and the output shape it must give."""
        return torch.zeros(0, self.d_in, dtype=dtype), (0, self.d_out)

    # ------------------------------------------------------------------ optional
    def rebuild(self) -> LayerView | None:
        """A new layer built from this one's recorded config (same base), or None where there is none."""
        return None

    def expected_param_count(self) -> int | None:
        """The method's closed-form count of trainable scalars for this shape, or None."""
        return None

    def all_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the adapter, frozen buffers included (for the determinism check)."""
        return {n: t for n, t in self.module.named_parameters()} | {n: t for n, t in self.module.named_buffers()}

    @property
    def name(self) -> str:
        return type(self.module).__name__


class AdaptedLinearView(LayerView):
    """Our :class:`~lowrank_theory.adapters.AdaptedLinear` seen by the checks: its *active* adapters.

    With several active adapters (their updates add) the view's tensors and state are theirs together,
    keyed ``"<adapter name>.<key>"``.
    """

    def __init__(self, layer: AdaptedLinear,
                 initial_weights: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:
        if not isinstance(layer, AdaptedLinear):
            raise TypeError(f"layer must be an AdaptedLinear, got {type(layer).__name__}")
        self._init_view(layer, (layer.d_out, layer.d_in), initial_weights)

    def _init_view(self, layer, shape, initial_weights) -> None:
        self.module = layer
        self.d_out, self.d_in = shape
        if not layer.active_adapters:
            raise ValueError("the layer has no active adapter to check")
        ads = self.active
        self.identity_at_init = all(bool(a.identity_at_init) for a in ads)
        self.exact_gradient = all(bool(a.exact_gradient) for a in ads)
        self.multiplicative = any(bool(a.multiplicative) for a in ads)
        self.initial_weights = initial_weights

    @property
    def active(self) -> list[Adapter]:
        return [self.module.adapters[n] for n in self.module.active_adapters]

    @property
    def adapter(self) -> Adapter:
        """The active adapter when there is one (``config`` and ``param_count`` checks need a single one)."""
        return self.module.adapter

    @property
    def name(self) -> str:
        return "+".join(type(a).name or type(a).__name__ for a in self.active)

    def merge(self, *, safe: bool) -> None:
        self.module.merge(safe=safe)

    def unmerge(self) -> None:
        self.module.unmerge()

    def disable(self) -> AbstractContextManager[Any]:
        return self.module.disable_adapter()

    def stored_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.module.weight, self.module.bias

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.module.merged_weights()

    def _named(self):
        return [(n, self.module.adapters[n]) for n in self.module.active_adapters]

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{an}.{k}", p) for an, ad in self._named() for k, p in ad.named_parameters() if p.requires_grad]

    def base_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.module.base.named_parameters())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {f"{an}.{k}": t for an, ad in self._named() for k, t in ad.state_dict().items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        for an, ad in self._named():
            ad.load_state_dict({k[len(an) + 1:]: t for k, t in state.items() if k.startswith(an + ".")})

    def cast(self, base_dtype: torch.dtype, adapter_dtype: torch.dtype) -> None:
        self.module.base.to(base_dtype)
        for ad in self.active:
            ad._apply(lambda t: t.to(adapter_dtype) if t.is_floating_point() else t)

    def _rebuilt_adapter(self) -> Adapter | None:
        from ..adapters import create, names

        if len(self.active) != 1 or type(self.adapter).name not in names():
            return None
        ad = create(type(self.adapter).name, self.d_out, self.d_in, **self.adapter.config())
        ref = next(iter(self.adapter.parameters()))
        ad._apply(lambda t: t.to(ref.dtype) if t.is_floating_point() else t)
        ad.load_state_dict(self.adapter.state_dict())
        return ad

    def rebuild(self) -> LayerView | None:
        ad = self._rebuilt_adapter()
        return None if ad is None else AdaptedLinearView(AdaptedLinear(self.module.base, ad), self.initial_weights)

    def expected_param_count(self) -> int | None:
        total = 0
        for ad in self.active:
            try:
                total += int(type(ad).param_count(self.d_out, self.d_in, **ad.config()))
            except NotImplementedError:
                return None
        return total

    def all_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{an}.{k}": t for an, ad in self._named()
                for k, t in (*ad.named_parameters(), *ad.named_buffers())}


class AdaptedConv2dView(AdaptedLinearView):
    """Our :class:`~lowrank_theory.adapters.conv.AdaptedConv2d` seen by the checks (weights are 4-D kernels)."""

    def __init__(self, layer: AdaptedConv2d,
                 initial_weights: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:
        if not isinstance(layer, AdaptedConv2d):
            raise TypeError(f"layer must be an AdaptedConv2d, got {type(layer).__name__}")
        self._init_view(layer, (layer.base.out_channels, layer.base.in_channels), initial_weights)

    def example_input(self, dtype: torch.dtype, batch: tuple[int, ...] = (2,), seed: int = 7) -> torch.Tensor:
        w, _ = self.stored_weights()
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*batch, self.d_in, 4, 5, generator=g, dtype=torch.float64).to(device=w.device, dtype=dtype)

    def functional(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        out = conv2d_delta(x, w, ConvGeometry.of(self.module.base))
        return out if b is None else out + b.reshape(-1, 1, 1)

    def wrong_shape_input(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(2, self.d_in + 1, 4, 5, dtype=dtype)

    def empty_input(self, dtype: torch.dtype) -> tuple[torch.Tensor, tuple[int, ...]]:
        x = torch.zeros(0, self.d_in, 4, 5, dtype=dtype)
        w, b = self.stored_weights()
        return x, tuple(self.functional(x, w.to(dtype), None if b is None else b.to(dtype)).shape)

    def rebuild(self) -> LayerView | None:
        ad = self._rebuilt_adapter()
        return None if ad is None else AdaptedConv2dView(AdaptedConv2d(self.module.base, ad), self.initial_weights)


def as_view(obj: Any, d_out: int, d_in: int, dtype: torch.dtype, seed: int = 0) -> LayerView:
    """Normalize what a factory returned (see the module docstring) to a :class:`LayerView`."""
    if isinstance(obj, LayerView):
        view = obj
    elif isinstance(obj, AdaptedLinear):
        view = AdaptedLinearView(obj)
    elif isinstance(obj, AdaptedConv2d):
        view = AdaptedConv2dView(obj)
    elif isinstance(obj, Adapter) and hasattr(obj, "kernel_size"):
        base = seeded_conv2d(d_out, d_in, tuple(obj.kernel_size), dtype, seed)
        view = AdaptedConv2dView(AdaptedConv2d(base, obj))
    elif isinstance(obj, Adapter):
        view = AdaptedLinearView(AdaptedLinear(seeded_linear(d_out, d_in, dtype, seed), obj))
    else:
        raise TypeError(
            f"the factory must return an Adapter, an AdaptedLinear or a LayerView, got {type(obj).__name__}"
        )
    if (view.d_out, view.d_in) != (d_out, d_in):
        raise ValueError(f"the factory built a ({view.d_out}, {view.d_in}) layer for ({d_out}, {d_in})")
    return view


def trainable_tensors(view: LayerView) -> Iterator[nn.Parameter]:
    """The adapter's trainable parameters (each once)."""
    seen: set[int] = set()
    for _, p in view.adapter_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p
