r"""Fused frozen-base + LoRA linear layer: one autograd node, the low-rank term in the GEMM epilogue.

A LoRA layer computes :math:`y = x W_0^\top + b + s\,(x A^\top) B^\top`.  Written as three modules
(base linear, down, up) and an add, the step allocates and passes over the (tokens × d_out) output
several more times than the base layer and keeps more activations for backward.  Here the base GEMM
runs first and the rank-r term is accumulated into its output in place (``addmm_``: one read and one
write of y), and the backward is written by hand the same way:

.. math::

    \partial x = \partial y\,W_0 + s\,(\partial y\,B)\,A, \qquad
    \partial A = s\,(\partial y\,B)^\top x, \qquad
    \partial B = s\,\partial y^\top (x A^\top).

Saved for backward: :math:`x` (held by the caller anyway) and the (tokens × r) :math:`xA^\top`;
nothing of size tokens × d_out.  Measured alternatives (``benchmarks/gpu_lora_paths.py``, H100,
bf16, d = 4096, 8192 tokens, fwd + bwd over the base layer's): unfused 1.57×, the rank-r term as
the GEMM's C input 1.49×, this in-place form 1.39×, a concatenated ``[W0; A]`` GEMM 1.70×.

Reference: E. J. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fusable", "lora_linear"]


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xa = x2 @ A.T  # (T, r)
        y = F.linear(x2, weight, bias)  # the base GEMM, bias in its epilogue
        y.addmm_(xa, B.T, alpha=scale)  # rank-r term accumulated in place: one read + write of y
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
            gx = g2 @ weight
            gx.addmm_(gB_proj, A, alpha=s)
            gx = gx.reshape(ctx.in_shape)
        if ctx.needs_input_grad[3]:
            gA = (gB_proj.T @ x2) * s
        if ctx.needs_input_grad[4]:
            gB = (g2.T @ xa) * s
        return gx, None, None, gA, gB, None


def fusable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *factors: torch.Tensor) -> bool:
    """Whether :func:`lora_linear` applies: the frozen weight and bias need no gradient and every
    tensor shares one dtype and device (otherwise the caller runs its unfused path)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return False
    tensors = [x, weight, *factors] + ([bias] if bias is not None else [])
    return len({(t.dtype, t.device) for t in tensors}) == 1


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
    the BLAS's float32 accumulation for fp16/bf16; the in-place accumulation rounds y once, as the
    unfused ``base + lora`` does.

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
