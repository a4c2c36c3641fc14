r"""Fused frozen-base + LoRA linear layer: one autograd node, the low-rank term in the GEMM epilogue.

A LoRA layer computes :math:`y = x W_0^\top + b + s\,(x A^\top) B^\top`.  Written as three modules
(base linear, down, up) and an add, the step reads and writes the (tokens × d_out) output twice more
than the base layer and saves extra activations.  Here the low-rank term (plus the bias) is
computed first into a buffer that the base GEMM accumulates onto (``addmm`` with :math:`\beta = 1`:
the BLAS epilogue reads it while the GEMM is compute-bound), and the backward is written by hand:

.. math::

    \partial x = \partial y\,W_0 + s\,(\partial y\,B)\,A, \qquad
    \partial A = s\,(\partial y\,B)^\top x, \qquad
    \partial B = s\,\partial y^\top (x A^\top),

again with the low-rank part of :math:`\partial x` as the epilogue input of the big GEMM.  Saved for
backward: :math:`x` (held by the caller anyway) and the (tokens × r) :math:`xA^\top`; nothing of
size tokens × d_out.

Reference: E. J. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
"""

from __future__ import annotations

import torch

__all__ = ["lora_linear"]


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xa = x2 @ A.T  # (T, r)
        sB = B * scale
        # low-rank term (+ bias) first, then the base GEMM accumulates onto it (beta = 1)
        low = torch.addmm(bias, xa, sB.T) if bias is not None else xa @ sB.T
        y = torch.addmm(low, x2, weight.T)
        ctx.save_for_backward(x2, xa, weight, A, B)
        ctx.scale = scale
        ctx.in_shape = shape
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2, xa, weight, A, B = ctx.saved_tensors
        s = ctx.scale
        g2 = gy.reshape(-1, weight.shape[0])
        gB_proj = g2 @ B  # (T, r)
        gx = gA = gB = None
        if ctx.needs_input_grad[0]:
            gx = torch.addmm(gB_proj @ (A * s), g2, weight).reshape(ctx.in_shape)
        if ctx.needs_input_grad[3]:
            gA = (gB_proj.T @ x2) * s
        if ctx.needs_input_grad[4]:
            gB = (g2.T @ xa) * s
        return gx, None, None, gA, gB, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    r"""``x W0ᵀ + b + s (x Aᵀ) Bᵀ`` as one autograd node (frozen W0 and b; gradients for x, A, B).

    Parameters
    ----------
    x : Tensor, shape (..., n)
    weight : Tensor, shape (m, n)
        The frozen :math:`W_0` (no gradient is computed for it).
    bias : Tensor of shape (m,) or None
        The frozen bias.
    A : Tensor, shape (r, n)
    B : Tensor, shape (m, r)
    scale : float
        :math:`s` (``alpha / rank`` for LoRA, ``alpha / sqrt(rank)`` for rsLoRA).

    Returns
    -------
    Tensor, shape (..., m)
        Equal, up to floating-point summation order, to the unfused
        ``F.linear(x, W0, b) + s * (x @ A.T) @ B.T``.

    Raises
    ------
    ValueError
        If the shapes do not chain or the frozen weight or bias requires grad (use the unfused path).

    Notes
    -----
    See the module docstring for the backward formulas.  The products run in the inputs' dtype with
    the BLAS's float32 accumulation for fp16/bf16.

    References
    ----------
    E. J. Hu et al., arXiv:2106.09685.
    """
    m, n = weight.shape
    if x.shape[-1] != n or A.shape[1] != n or B.shape[0] != m or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"shapes do not chain: x (..., {x.shape[-1]}), weight {tuple(weight.shape)}, "
            f"A {tuple(A.shape)}, B {tuple(B.shape)}; expected x (..., n), weight (m, n), A (r, n), B (m, r)"
        )
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear needs a frozen weight and bias (requires_grad=False)")
    return _LoRALinear.apply(x, weight, bias, A, B, float(scale))
