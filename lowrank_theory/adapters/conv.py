r"""``AdaptedConv2d``: a frozen ``nn.Conv2d`` plus an adapter of its 4-D kernel, with exact merge/unmerge.

The counterpart of :class:`lowrank_theory.adapters.AdaptedLinear` for adapters whose update is a
convolution kernel :math:`\Delta K \in \mathbb R^{d_{out} \times d_{in}/g \times k_h \times k_w}`
(FLoRA's Tucker kernels).  ``forward(x) = base(x) + conv(x, ΔK)`` under the base layer's geometry
(stride, padding and padding mode, dilation, groups), computed through the adapter's own
structured path when it has one (``adapter.conv_forward(x, geometry)``) and by one convolution
with the dense ΔK otherwise.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter
from .layer import DEFAULT_ADAPTER, AdapterHost

__all__ = ["AdaptedConv2d", "ConvGeometry", "check_image_input", "conv2d_delta"]


class ConvGeometry(NamedTuple):
    """How a 2-D convolution walks its input (everything but the kernel and the bias).

    ``padding`` is a pair of ints or the string ``"same"``/``"valid"``, as ``nn.Conv2d`` stores it;
    ``padding_mode`` is one of ``"zeros"``, ``"reflect"``, ``"replicate"``, ``"circular"``.
    """

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, conv: nn.Conv2d | ConvGeometry | None) -> ConvGeometry:
        """The geometry of ``conv`` (an ``nn.Conv2d``), ``conv`` itself, or the default (stride 1, no padding)."""
        if conv is None:
            return cls()
        if isinstance(conv, cls):
            return conv
        if isinstance(conv, nn.Conv2d):
            return cls(tuple(conv.stride), conv.padding, tuple(conv.dilation), conv.groups, conv.padding_mode)
        raise TypeError(f"conv must be an nn.Conv2d, a ConvGeometry or None, got {type(conv).__name__}")

    def explicit_padding(self, kernel_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` pads, as ``F.pad`` takes them, for a kernel of ``kernel_size``."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads = []
            for d, k in zip(reversed(self.dilation), reversed(kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def pad(self, x: torch.Tensor, kernel_size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int] | str]:
        """Apply non-zero padding modes explicitly; return ``(x, padding argument for F.conv2d)``."""
        if self.padding_mode == "zeros":
            return x, self.padding
        return F.pad(x, self.explicit_padding(kernel_size), mode=self.padding_mode), (0, 0)


def conv2d_delta(x: torch.Tensor, kernel: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """``conv2d(x, kernel)`` without bias under ``geometry`` (padding modes included)."""
    x, padding = geometry.pad(x, tuple(kernel.shape[-2:]))
    return F.conv2d(x, kernel, None, geometry.stride, padding, geometry.dilation, geometry.groups)


def check_image_input(x: Any, channels: int, dtype: torch.dtype | None = None, name: str = "x") -> torch.Tensor:
    """Validate a conv input: a floating tensor (N, C, H, W) or (C, H, W) with ``C = channels``, in ``dtype``.

    The image counterpart of :func:`~lowrank_theory.adapters.base.check_input` (metadata only; another
    dtype is accepted under autocast).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, {channels}, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.ndim not in (3, 4) or x.shape[-3] != channels:
        raise ValueError(f"{name} must be an image batch (N, C, H, W) or (C, H, W) with C = {channels}, "
                         f"got shape {tuple(x.shape)}")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but the layer computes in {dtype}; cast it with x.to({dtype})")
    return x


class AdaptedConv2d(AdapterHost):
    r"""Wrap a frozen ``nn.Conv2d`` with named adapters of its kernel.

    ``forward(x) = base(x) + conv(x, ΔK)`` (summed over the active adapters); ``merge()`` writes
    ``K' = adapter.merged_weight(K0)`` into the base layer (accumulated in float32 or better, checked
    finite), ``unmerge()`` restores :math:`K_0` up to round-off, and ``disabled`` (or
    :meth:`disable_adapter`) gives the base output, merged or not.  The named-adapter API is
    :class:`~lowrank_theory.adapters.layer.AdapterHost`'s.

    Parameters
    ----------
    base : nn.Conv2d
        The frozen layer; its parameters get ``requires_grad=False``.
    adapter : Adapter, optional
        An additive adapter with ``kernel_size == base.kernel_size`` and
        ``(d_out, d_in) == (out_channels, in_channels // groups)``, whose ``delta_weight()`` is the
        (d_out, d_in, kh, kw) kernel.  If it has ``conv_forward(x, geometry)``, that structured path
        computes ``conv(x, ΔK)``; otherwise one convolution with the dense ΔK does.
    adapter_name : str, default ``"default"``

    Raises
    ------
    TypeError
        If ``base`` is not an ``nn.Conv2d``, ``adapter`` is not a kernel adapter, or it needs the
        base weight (multiplicative adapters are not supported on kernels here).
    ValueError
        If the adapter's kernel shape does not match the base layer's.
    """

    def __init__(self, base: nn.Conv2d, adapter: Adapter | None = None, *, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"base must be an nn.Conv2d, got {type(base).__name__}")
        self._init_host(base, adapter, adapter_name)

    def _check_adapter(self, adapter: Adapter) -> None:
        if not isinstance(adapter, Adapter):
            raise TypeError(f"adapter must be an Adapter, got {type(adapter).__name__}")
        if not hasattr(adapter, "kernel_size"):
            raise TypeError(f"adapter must parametrize a 4-D kernel (have kernel_size), got {type(adapter).__name__}")
        if adapter.needs_base:
            raise TypeError(f"{type(adapter).__name__} needs the base weight; AdaptedConv2d supports additive adapters")
        want = tuple(self.base.weight.shape)
        have = (adapter.d_out, adapter.d_in, *tuple(adapter.kernel_size))
        if have != want:
            raise ValueError(f"adapter is sized for a kernel {have} but base.weight has shape {want}")

    def _base_weight(self) -> torch.Tensor:
        return self.base.weight

    def _write_base_weight(self, w: torch.Tensor) -> None:
        self.base.weight.copy_(w)

    def _base_functional(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        out = conv2d_delta(x, w, ConvGeometry.of(self.base))
        return out if b is None else out + b.reshape(-1, 1, 1)

    def delta_output(self, x: torch.Tensor, adapter: Adapter | None = None) -> torch.Tensor:
        """``conv(x, ΔK)`` of ``adapter`` (default: the active one) under the base layer's geometry."""
        ad = self.adapter if adapter is None else adapter
        geometry = ConvGeometry.of(self.base)
        if hasattr(ad, "conv_forward"):
            return ad.conv_forward(x, geometry)
        return conv2d_delta(x, ad.delta_weight().to(x.dtype), geometry)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.base.in_channels, self.base.weight.dtype)
        if self.disabled:
            return self._disabled_output(x)
        base_out = self.base(x)
        if self._merged:
            return base_out
        for ad in self._active_list():
            base_out = base_out + self.delta_output(x, ad).to(base_out.dtype)
        return base_out
