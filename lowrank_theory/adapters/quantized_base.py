r"""Frozen quantized base layers: a linear layer stored only as block-wise NF4 or int8 codes (QLoRA's layout).

:class:`QuantizedLinear` holds :math:`W_0 \in \mathbb R^{m \times n}` as

* ``codes`` -- NF4: 4-bit indices into :func:`~lowrank_theory.linalg.nf4_codebook`, two per ``uint8``
  (the first entry in the high nibble, as bitsandbytes packs them); int8: one ``int8`` per entry;
* ``absmax`` -- one scale per block of ``block_size`` consecutive entries of the row-major flattened
  weight (float32; float64 for a float64 weight),

and nothing else: the float weight exists only as a transient tensor while a forward (or backward)
runs, dequantized in one pass.  The backward of the base product re-dequantizes from the packed
tensors rather than keeping the dequantized weight alive between forward and backward (as
bitsandbytes' ``MatMul4Bit`` does).  :class:`~lowrank_theory.adapters.AdaptedLinear` accepts it
as a base: adapters see the dequantized :math:`W_0`, merging is refused unless asked to requantize.

Why our own format rather than a library's (measured on this machine, torch 2.13.0+cpu): torchao 0.18's
``NF4Tensor`` works on CPU (dequantize, matmul, autograd to an adapter) but always double-quantizes
the block scales (so its codes differ from the reference quantizer), cannot be written by
safetensors (a tensor subclass without a plain data pointer), and loads a CUDA extension that fails
here with a warning; bitsandbytes 0.50.2's CPU functions (``quantize_4bit`` / ``dequantize_4bit``)
give the same codes as ours, bit for bit, but its import tries to fetch a kernel from a model hub
and its ``Linear4bit`` module fails on CPU.  This format is the same layout as bitsandbytes'
(uint8 nibble pairs, float32 absmax per 64 entries), in plain tensors that safetensors, ``deepcopy``
and ``.to(device)`` handle.

References
----------
T. Dettmers, A. Pagnoni, A. Holtzman, L. Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized
LLMs", arXiv:2305.14314 (NF4, block-wise absmax).  T. Dettmers et al., "LLM.int8(): 8-bit Matrix
Multiplication for Transformers at Scale", arXiv:2208.07339 (absmax int8).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg import nf4_codebook
from .base import check_input

__all__ = ["SCHEMES", "QuantizationError", "QuantizedLinear", "dequantize_weight", "quantize_weight"]

logger = logging.getLogger(__name__)

#: The storage schemes: 4-bit NormalFloat (two codes per byte) and symmetric absmax int8.
SCHEMES = ("nf4", "int8")
_INT8_LEVELS = 127.0  # 2**(8-1) - 1: levels -127..127, as quantize_uniform(W, 8)


class QuantizationError(NamedTuple):
    r"""How far a dequantized weight is from the float weight it was made from.

    ``frobenius`` :math:`\|W - \hat W\|_F`, ``relative`` :math:`\|W - \hat W\|_F / \|W\|_F`
    (0 for :math:`W = 0`), ``max_abs`` :math:`\max |W - \hat W|`, all computed in float64.
    """

    frobenius: float
    relative: float
    max_abs: float

    @classmethod
    def between(cls, W: torch.Tensor, W_hat: torch.Tensor) -> QuantizationError:
        """The error of ``W_hat`` as an approximation of ``W`` (same shape)."""
        d = (W.detach().double() - W_hat.detach().double())
        fro, ref = float(d.norm()), float(W.detach().double().norm())
        return cls(fro, fro / ref if ref > 0 else fro, float(d.abs().max()) if d.numel() else 0.0)


# ============================================================================ packing
def _check_scheme(scheme: Any, block_size: Any) -> tuple[str, int]:
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return scheme, block_size


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the block scales and of the quantizer's arithmetic: float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


@functools.lru_cache(maxsize=16)
def _codebook(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return nf4_codebook(like=torch.empty(0, dtype=dtype)).to(device)


@functools.lru_cache(maxsize=16)
def _pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 2): the two NF4 levels a byte holds, high nibble first -- one gather dequantizes two codes."""
    code = _codebook(dtype, device)
    b = torch.arange(256, device=device)
    return torch.stack([code[b >> 4], code[b & 15]], dim=1)


def _blocks(W: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major flatten into (n_blocks, block_size) (zero-padded) in the scale dtype, and the absmax per block."""
    flat = W.detach().reshape(-1).to(_scale_dtype(W.dtype))
    pad = (-flat.numel()) % block_size
    if pad:
        flat = F.pad(flat, (0, pad))
    blocks = flat.reshape(-1, block_size)
    return blocks, blocks.abs().amax(dim=1)


def quantize_weight(W: torch.Tensor, scheme: str = "nf4", block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Pack a weight into block-wise codes and scales.

    Parameters
    ----------
    W : Tensor, any shape (a (d_out, d_in) weight)
        Finite floating tensor; flattened row-major into blocks of ``block_size`` (the last one
        zero-padded, which leaves its absmax unchanged).  Half precision is quantized from its
        exact float32 values.
    scheme : {"nf4", "int8"}
    block_size : int, default 64
        Entries sharing one scale.

    Returns
    -------
    codes : Tensor
        ``"nf4"``: ``uint8`` of shape ``(ceil(n_blocks * block_size / 2),)``, two 4-bit indices per
        byte, the even-indexed entry in the high nibble; ``"int8"``: ``int8`` of shape
        ``(n_blocks * block_size,)`` in :math:`[-127, 127]`.
    absmax : Tensor, shape (n_blocks,)
        :math:`a_k = \max_{i \in \text{block } k} |w_i|`, float32 (float64 for a float64 ``W``).

    Raises
    ------
    TypeError, ValueError
        ``W`` not a finite, non-empty floating tensor; unknown ``scheme``; ``block_size < 1``.

    Notes
    -----
    NF4 (QLoRA): code :math:`j_i` = the number of midpoints :math:`(c_j + c_{j+1})/2` of the code book
    :math:`c` below :math:`w_i / a_k` (the nearest level, ties to the lower one; :math:`a_k = 0`
    divides by 1), so :math:`\hat w_i = a_k c_{j_i}` is exactly
    :func:`lowrank_theory.linalg.quantize_nf4`.  int8 (absmax, :math:`q = 127`):
    :math:`j_i = \operatorname{round}(w_i / (a_k / q))` and :math:`\hat w_i = j_i \, a_k / q`, exactly
    :func:`lowrank_theory.linalg.quantize_uniform` with 8 bits.
    """
    scheme, block_size = _check_scheme(scheme, block_size)
    if not isinstance(W, torch.Tensor) or not W.is_floating_point():
        raise TypeError(f"W must be a floating torch.Tensor, got {getattr(W, 'dtype', type(W).__name__)}")
    if W.numel() == 0:
        raise ValueError(f"W must be non-empty, got shape {tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W contains NaN or Inf values; it cannot be quantized")
    blocks, absmax = _blocks(W, block_size)
    if scheme == "int8":
        step = absmax / _INT8_LEVELS
        safe = torch.where(step > 0, step, torch.ones_like(step))
        codes = torch.round(blocks / safe[:, None]).to(torch.int8)
        return codes.reshape(-1), absmax
    code = _codebook(blocks.dtype, blocks.device)
    mids = (code[1:] + code[:-1]) / 2
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    x = blocks / safe[:, None]
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for m in mids:
        idx += x > m
    idx = idx.reshape(-1)
    if idx.numel() % 2:
        idx = F.pad(idx, (0, 1), value=7)  # pad with the code of 0.0
    return (idx[0::2] << 4) | idx[1::2], absmax


def dequantize_weight(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    scheme: str = "nf4",
    block_size: int = 64,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Unpack :func:`quantize_weight`'s output: :math:`\hat w_i = a_k c_{j_i}` (NF4) or :math:`j_i a_k / 127` (int8).

    Parameters
    ----------
    codes, absmax : Tensor
        As returned by :func:`quantize_weight`.
    shape : tuple of int
        The weight's shape.
    scheme, block_size
        As given to :func:`quantize_weight`.
    dtype : torch.dtype, optional
        Output dtype (default ``absmax``'s); the values are computed in ``absmax``'s dtype and rounded once.

    Returns
    -------
    Tensor of ``shape``
        A new tensor (one gather and one multiply per entry).
    """
    scheme, block_size = _check_scheme(scheme, block_size)
    n_blocks = absmax.shape[0]
    if scheme == "int8":
        vals = codes.reshape(n_blocks, block_size).to(absmax.dtype) * (absmax / _INT8_LEVELS)[:, None]
    else:
        table, idx = _pair_table(absmax.dtype, absmax.device), codes.to(torch.int32)
        if table.element_size() == 4:  # one 8-byte word per byte of codes: a 1-D gather (4x faster than rows of 2)
            pairs = table.view(torch.int64).reshape(-1).index_select(0, idx).view(absmax.dtype)
        else:
            pairs = table.index_select(0, idx)  # (n_bytes, 2)
        vals = pairs.reshape(-1)[: n_blocks * block_size].reshape(n_blocks, block_size) * absmax[:, None]
    out = vals.reshape(-1)[: math.prod(shape)].reshape(shape)
    return out if dtype is None else out.to(dtype)


class _QuantizedMatmul(torch.autograd.Function):
    """``x Wᵀ + b`` for a dequantized frozen W; the backward re-dequantizes from the packed tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, codes, absmax, meta):
        ctx.save_for_backward(codes, absmax)
        ctx.meta = meta
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        gx = None
        if ctx.needs_input_grad[0]:
            codes, absmax = ctx.saved_tensors
            w = dequantize_weight(codes, absmax, *ctx.meta, dtype=gy.dtype)
            gx = gy @ w
        return gx, None, None, None, None, None


# ============================================================================ the layer
class QuantizedLinear(nn.Module):
    r"""A frozen linear layer :math:`y = x \hat W^\top + b` whose weight is stored only in packed NF4 or int8.

    Parameters
    ----------
    in_features, out_features : int
        n and m; the weight is (m, n).
    scheme : {"nf4", "int8"}, default "nf4"
    block_size : int, default 64
        Entries (row-major) per absmax scale.
    bias : bool, default True
        Hold a frozen float bias of shape (m,).
    dtype : torch.dtype, default float32
        The compute dtype: the dequantized weight, the bias and the inputs it accepts.
    device : torch.device, optional

    Notes
    -----
    Built empty (all codes zero, scales zero) for loading a ``state_dict``; use :meth:`from_linear`
    or :meth:`from_weight` to quantize a weight.  Storage for :math:`N = mn` entries: NF4
    :math:`\lceil N'/2 \rceil` bytes of codes plus :math:`4 N'/B` bytes of float32 scales
    (:math:`N'` = N rounded up to a block), 4.5 bits per entry at B = 64 -- 0.28 of a bf16 weight;
    int8 8.5 bits, 0.53 of bf16 (:meth:`storage_bytes`).  ``.to(dtype)`` / ``.half()`` change the
    compute dtype and the bias and leave the scales in their dtype (they are the stored weight).
    Double quantization of the scales (QLoRA's 8-bit scales of scales) is not done.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        scheme: str = "nf4",
        block_size: int = 64,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.scheme, self.block_size = _check_scheme(scheme, block_size)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        n_blocks = -(-in_features * out_features // block_size)
        if scheme == "nf4":
            codes = torch.zeros(-(-n_blocks * block_size // 2), dtype=torch.uint8, device=device)
        else:
            codes = torch.zeros(n_blocks * block_size, dtype=torch.int8, device=device)
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=_scale_dtype(dtype), device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_weight(
        cls, W: torch.Tensor, bias: torch.Tensor | None = None, *, scheme: str = "nf4", block_size: int = 64
    ) -> QuantizedLinear:
        """Quantize ``W`` (d_out, d_in) (bias (d_out,) kept in float) into a new layer in ``W``'s dtype and device.

        Raises
        ------
        TypeError, ValueError
            ``W`` not a finite 2-D floating tensor, ``bias`` of the wrong shape, bad ``scheme``/``block_size``.
        """
        if not isinstance(W, torch.Tensor) or W.ndim != 2:
            raise ValueError(f"W must be a 2-D (d_out, d_in) tensor, got {getattr(W, 'shape', type(W).__name__)}")
        codes, absmax = quantize_weight(W, scheme, block_size)  # validates W, scheme, block_size
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (W.shape[0],)):
            raise ValueError(f"bias must be a tensor of shape ({W.shape[0]},), got {getattr(bias, 'shape', bias)}")
        layer = cls(W.shape[1], W.shape[0], scheme=scheme, block_size=block_size, bias=bias is not None,
                    dtype=W.dtype, device=W.device)
        layer.codes, layer.absmax = codes, absmax
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, *, scheme: str = "nf4", block_size: int = 64) -> QuantizedLinear:
        """Quantize an ``nn.Linear`` (or a transformers ``Conv1D``, whose weight is stored transposed)."""
        if isinstance(linear, nn.Linear):
            W = linear.weight
        elif type(linear).__name__ == "Conv1D" and hasattr(linear, "nf"):
            W = linear.weight.T
        else:
            raise TypeError(f"linear must be nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        return cls.from_weight(W.detach(), None if linear.bias is None else linear.bias.detach(),
                               scheme=scheme, block_size=block_size)

    # ------------------------------------------------------------------ the weight
    @property
    def shape(self) -> tuple[int, int]:
        """The weight's shape (out_features, in_features)."""
        return (self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight, a new (out_features, in_features) tensor in ``dtype`` (default the compute dtype)."""
        return dequantize_weight(self.codes, self.absmax, self.shape, self.scheme, self.block_size,
                                 dtype or self.compute_dtype)

    @torch.no_grad()
    def requantize_(self, W: torch.Tensor) -> QuantizationError:
        r"""Store the quantization of ``W`` (out_features, in_features) as the new weight; return its error.

        Validated before anything is written (a bad ``W`` leaves the layer unchanged).  ``W`` is
        quantized from its values in the scale dtype (float32, or float64), so the result is what
        :meth:`from_weight` gives; the error is :math:`W - \operatorname{dequant}(\operatorname{quant}(W))`
        with the dequantized weight in the compute dtype, as :meth:`dequantize` returns it.
        """
        if not isinstance(W, torch.Tensor) or tuple(W.shape) != self.shape:
            raise ValueError(f"W must have shape {self.shape}, got {tuple(getattr(W, 'shape', ()))}")
        codes, absmax = quantize_weight(W.to(self.absmax.dtype), self.scheme, self.block_size)
        self.codes = codes.to(self.codes.device)
        self.absmax = absmax.to(self.absmax.device)
        return QuantizationError.between(W, self.dequantize())

    def storage_bytes(self) -> int:
        """Bytes of the stored weight: codes plus block scales (the bias not included)."""
        return self.codes.numel() * self.codes.element_size() + self.absmax.numel() * self.absmax.element_size()

    # ------------------------------------------------------------------ module
    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x Ŵᵀ + b`` for x (..., in_features); ``weight`` is an already dequantized Ŵ to reuse (no second pass)."""
        check_input(x, self.in_features, self.compute_dtype)
        w = self.dequantize() if weight is None else weight
        meta = (self.shape, self.scheme, self.block_size)
        return _QuantizedMatmul.apply(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                                      self.codes, self.absmax, meta)

    def _apply(self, fn, recurse: bool = True):
        # .to(dtype)/.half() cast floating tensors: the compute dtype and the bias follow, the scales keep
        # their dtype (they are the stored weight) and only move to the new device.
        probe = fn(torch.zeros((), dtype=self.compute_dtype, device=self.absmax.device))
        absmax = self.absmax
        super()._apply(fn, recurse)
        self._buffers["absmax"] = absmax.to(device=self._buffers["absmax"].device)
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"block_size={self.block_size}, bias={self.bias is not None}, dtype={self.compute_dtype}")
