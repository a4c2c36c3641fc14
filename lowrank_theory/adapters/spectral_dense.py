r"""The dense path of the sparse-spectrum adapters (FourierFT, LoCA): one GEMM with the merged weight.

A sparse-spectrum adapter has :math:`\Delta W = s\,T_m^{*} F\, T_n` with :math:`c` nonzeros
:math:`F_{k_i l_i} = a_i`.  Its *structured* path (the adapters' ``forward``) transforms every token
twice forward and twice backward and scatters :math:`c` products per token; its cost grows with the
token count T.  The *dense* path here pays a per-call cost in the weight size instead:

* forward: :math:`W' = W_0 + \Delta W` (an inverse 2-D transform of the spectrum, in float32 or
  better, added to :math:`W_0` and cast to its dtype), then one product :math:`y = x W'^\top + b`
  that *replaces* the frozen layer's own product;
* backward: :math:`\partial x = \partial y\, W'` (again replacing the frozen layer's product) and
  the coefficient gradient from one transform of x and one of the output gradient,

  .. math:: \frac{\partial L}{\partial a_i} = \sum_t \hat g_{t k_i}\,\hat x_{t l_i},

  :math:`c` dot products of gathered columns -- never :math:`\partial L / \partial \Delta W =
  \partial y^\top x`, which would cost a third product of the layer's size.  The sum over tokens
  runs in chunks (:func:`token_chunks`), so its transient memory does not grow with T.

Compared with the base layer alone the dense path adds :math:`O(mn\log(mn))` per call for
:math:`\Delta W` and :math:`O(T(m\log m + n\log n + c))` in backward; the structured path adds
about twice the per-token part, :math:`O(T(m\log m + n\log n + c))` in each pass.
:func:`prefers_dense` compares the two and is what ``path="auto"`` uses.

In half precision :math:`W'` is rounded to :math:`W_0`'s dtype (what merging does); the coefficient
gradient is computed from x and the output gradient in float32 and is not affected by it.

References: Z. Gao et al., "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform",
arXiv:2405.03003 (FourierFT); Z. Du et al., "LoCA: Location-Aware Cosine Adaptation for
Parameter-Efficient Fine-Tuning", arXiv:2502.06820 (LoCA).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["PATHS", "SpectralDense", "SpectralPaths", "gather_columns", "prefers_dense",
           "spectral_dense_linear", "token_chunks"]

PATHS = ("auto", "structured", "dense")


def gather_columns(a: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``a[:, index].T`` for a (T, k) -> (len(index), T), as one transpose and a gather of whole rows.

    Gathering along the last axis reads one element per (token, index); copying the transpose
    once and gathering rows moves contiguous runs instead (about 3x faster on CPU at T = 1024).
    """
    return a.T.contiguous().index_select(0, index)


def prefers_dense(tokens: int, d_out: int, d_in: int, n_frequency: int) -> bool:
    r"""Whether the dense path costs fewer FLOPs than the structured one for one training step.

    With :math:`m` = ``d_out``, :math:`n` = ``d_in``, :math:`c` = ``n_frequency`` and T tokens, the
    structured path minus the dense one is about
    :math:`T\,(m\log_2 m + n\log_2 n + 2c) - mn\,(\log_2(mn) + 1)` (per-token transforms and scatters
    saved, against one inverse 2-D transform and one add of the weight's size), so the dense path
    is chosen when

    .. math:: T\,(m\log_2 m + n\log_2 n + 2c) \ge mn\,(\log_2(mn) + 1).

    At m = n = 384, c = 1000 that is T ≥ 312 tokens; at m = n = 4096, c = 1000, T ≥ 4182.  The
    op-by-op model (:func:`lowrank_theory.theory.complexity.cost`, ``path="structured"`` vs
    ``"dense"``) agrees with this rule on the sizes its tests check.
    """
    m, n = d_out, d_in
    per_token = m * math.log2(max(m, 2)) + n * math.log2(max(n, 2)) + 2 * n_frequency
    return tokens * per_token >= m * n * (math.log2(max(m * n, 2)) + 1)


#: bytes of one token chunk of x or of the output gradient, in float32, that the dense path's backward
#: transforms at once (the coefficient gradient is a sum over tokens, so chunks add up); 16 MiB
_CHUNK_BYTES = 1 << 24


def token_chunks(tokens: int, width: int) -> list[slice]:
    """Slices of ``range(tokens)`` whose float32 rows of ``width`` take at most :data:`_CHUNK_BYTES`.

    Bounds the backward's transient memory (transforms, transposes and gathers of a chunk, a few
    times its size) independently of the token count; at least one slice, empty when ``tokens`` is 0.
    """
    rows = max(1, _CHUNK_BYTES // (4 * max(1, width)))
    return [slice(i, min(i + rows, tokens)) for i in range(0, tokens, rows)] or [slice(0, 0)]


class SpectralDense(Protocol):
    """What :func:`spectral_dense_linear` needs from an adapter."""

    d_out: int
    d_in: int

    def dense_delta(self, coefficients: torch.Tensor) -> torch.Tensor:
        """:math:`\\Delta W` (m, n) from the coefficients, in float32 or better, without autograd."""

    def coefficient_grad(self, x2: torch.Tensor, g2: torch.Tensor, coefficients: torch.Tensor,
                         need: bool, probed: bool) -> torch.Tensor | None:
        """:math:`\\partial L/\\partial a` from x (T, n) and :math:`\\partial L/\\partial y` (T, m), float32+.

        ``need``: the coefficients require grad; ``probed``: the forward got a probe (LoCA's
        location phase: the location estimate is accumulated as a side effect).
        """


class _SpectralDenseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coefficients, probe, adapter, base_weight, base_bias):
        ctx.probed = probe is not None  # the probe makes the backward run when the coefficients are frozen
        with torch.no_grad():
            W = adapter.dense_delta(coefficients)  # a fresh float32+ tensor: W0 is added in place
            W = W.to(x.dtype) if base_weight is None else W.add_(base_weight).to(base_weight.dtype)
        y = F.linear(x, W, base_bias)
        ctx.save_for_backward(x, coefficients, W)
        ctx.adapter = adapter
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, coefficients, W = ctx.saved_tensors
        ad = ctx.adapter
        x2, g2 = x.reshape(-1, ad.d_in), gy.reshape(-1, ad.d_out)
        gx = gW = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ W.to(g2.dtype)).reshape(x.shape).to(x.dtype)
        ga = None
        for rows in token_chunks(x2.shape[0], max(ad.d_in, ad.d_out)):
            part = ad.coefficient_grad(x2[rows], g2[rows], coefficients, ctx.needs_input_grad[1], ctx.probed)
            if part is not None:
                ga = part if ga is None else ga + part
        if ga is not None:
            ga = ga.to(coefficients.dtype)
        if ctx.needs_input_grad[4]:  # a base weight that is not frozen (unusual): its dense gradient
            gW = (g2.T @ x2.to(g2.dtype)).to(W.dtype)
        if ctx.needs_input_grad[5]:
            gb = g2.sum(dim=0)
        return gx, ga, None, None, gW, gb


def spectral_dense_linear(
    adapter: SpectralDense,
    x: torch.Tensor,
    coefficients: torch.Tensor,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    probe: torch.Tensor | None = None,
) -> torch.Tensor:
    r""":math:`y = x\,(W_0 + \Delta W)^\top + b` by the dense path (:math:`x\,\Delta W^\top` without ``base_weight``).

    Parameters
    ----------
    adapter : FourierFT or LoCA
        Supplies ``dense_delta`` and ``coefficient_grad`` (see the module docstring).
    x : Tensor (..., n)
    coefficients : Tensor (c,)
        The trainable spectrum values (their gradient comes from ``coefficient_grad``).
    base_weight : Tensor (m, n), optional
        The frozen :math:`W_0`; its dtype is the product's.  ``None``: the update alone.
    base_bias : Tensor (m,), optional
    probe : Tensor, optional
        A scalar requiring grad, passed so that the backward runs when nothing else requires grad
        (LoCA's location phase with frozen coefficients); it gets no gradient.

    Returns
    -------
    Tensor (..., m)
    """
    return _SpectralDenseLinear.apply(x, coefficients, probe, adapter, base_weight, base_bias)


class SpectralPaths:
    """Mixin for FourierFT and LoCA (listed before :class:`Adapter` in the bases): the path choice
    and the dense path's fused layer.  The class sets ``path`` and ``n_frequency`` and provides
    ``_values()`` (the trainable coefficients) and ``_probe(x)``."""

    def _use_dense(self, x: torch.Tensor) -> bool:
        if self.path != "auto":
            return self.path == "dense"
        return prefers_dense(x.numel() // self.d_in, self.d_out, self.d_in, self.n_frequency)

    def _probe(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def _dense(self, x, base_weight=None, base_bias=None):
        return spectral_dense_linear(self, x, self._values(), base_weight, base_bias, self._probe(x))

    def fused_output(self, x, base_weight, base_bias):
        """The whole layer by the dense path when it is the one chosen, else None (structured)."""
        if not self._use_dense(x):
            return None
        self._check_input(x)
        return self._dense(x, base_weight, base_bias)
