r"""Gradient approximation: the weight-space step each low-rank method actually takes.

Setting.  A frozen weight plus a LoRA update, :math:`W = W_0 + s\,BA` with
:math:`B\in\mathbb{R}^{m\times r}`, :math:`A\in\mathbb{R}^{r\times n}`, and the full
gradient :math:`G = \partial L/\partial W \in \mathbb{R}^{m\times n}`.  By the chain rule
LoRA's factor gradients are :math:`g_B = s\,G A^\top`, :math:`g_A = s\,B^\top G`, and a
gradient step with rate :math:`\eta` changes :math:`W`, to first order, by
:math:`-\eta\, s(g_B A + B g_A) = -\eta\, s^2 (G A^\top A + B B^\top G)`.

Every step reachable by moving B and A lies in the tangent space
:math:`\mathcal{T} = \{BX + YA\}` of the rank-r manifold; the closest such step to G is the
orthogonal projection (LoRA-Pro, arXiv:2407.18242, Thm 2.1)

.. math::  \Pi_{\mathcal T}(G) = P_B G + G P_A - P_B G P_A,\qquad
           G - \Pi_{\mathcal T}(G) = (I-P_B)\,G\,(I-P_A),

with :math:`P_B = B(B^\top B)^{-1}B^\top` and :math:`P_A = A^\top(AA^\top)^{-1}A`.  So
:math:`\|(I-P_B)G(I-P_A)\|_F/\|G\|_F` is a lower bound on the relative error of any
LoRA-family step (after the best rescaling).

All functions take NumPy or torch arrays (one backend per call) and return the same kind.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ..backend import as_backend, check_matrix, namespace, to_numpy

__all__ = [
    "LoRAProGradients",
    "StepMetrics",
    "altlora_step",
    "compare_steps",
    "lora_plus_step",
    "lora_step",
    "lorapro_gradients",
    "lorapro_step",
    "lorasb_step",
    "projector",
    "step_metrics",
    "tangent_projection",
    "tangent_residual",
]


def _check(G: Any, B: Any, A: Any):
    xp = check_matrix(G, "G")
    check_matrix(B, "B")
    check_matrix(A, "A")
    m, n = G.shape
    if B.shape[0] != m:
        raise ValueError(f"B must have {m} rows to match G of shape {tuple(G.shape)}, got {tuple(B.shape)}")
    if A.shape[1] != n:
        raise ValueError(f"A must have {n} columns to match G of shape {tuple(G.shape)}, got {tuple(A.shape)}")
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"B (m, r) and A (r, n) must share r, got {tuple(B.shape)} and {tuple(A.shape)}")
    return xp


def projector(F: Any, side: str) -> Any:
    r"""Orthogonal projector on the column space (``side="col"``) or row space (``"row"``) of F.

    :math:`P = F(F^\top F)^{+}F^\top` for columns, :math:`F^\top(FF^\top)^{+}F` for rows; computed
    from an orthonormal basis (QR) rather than the normal equations, for accuracy.
    Rank deficiency is handled by an SVD-based basis with the usual relative cut-off.
    """
    xp = namespace(F)
    M = F if side == "col" else F.T
    U, S, _ = xp.linalg.svd(M, full_matrices=False)
    eps = float(np.finfo(to_numpy(S[:1]).dtype).eps)
    keep = S > (S[0] * max(M.shape) * eps if S.shape[0] else 0)
    Q = U[:, keep]
    return Q @ Q.T


def tangent_projection(G: Any, B: Any, A: Any) -> Any:
    r"""Projection of G on the tangent space :math:`\{BX + YA\}`: :math:`P_BG + GP_A - P_BGP_A`."""
    _check(G, B, A)
    PB, PA = projector(B, "col"), projector(A, "row")
    PBG = PB @ G
    return PBG + G @ PA - PBG @ PA


def tangent_residual(G: Any, B: Any, A: Any) -> Any:
    r"""The unreachable part :math:`(I-P_B)\,G\,(I-P_A)` (Frobenius-orthogonal to the tangent space)."""
    return G - tangent_projection(G, B, A)


def lora_step(G: Any, B: Any, A: Any, scale: float = 1.0) -> Any:
    r"""Vanilla LoRA's first-order weight change per unit rate: :math:`s^2(BB^\top G + G A^\top A)`.

    References: Hu et al., arXiv:2106.09685.
    """
    _check(G, B, A)
    return scale**2 * (B @ (B.T @ G) + (G @ A.T) @ A)


def lora_plus_step(G: Any, B: Any, A: Any, scale: float = 1.0, ratio: float = 16.0) -> Any:
    r"""LoRA+ (arXiv:2402.12354): B's rate is ``ratio`` × A's, so the step is
    :math:`s^2(BB^\top G + \lambda\, G A^\top A)`."""
    _check(G, B, A)
    return scale**2 * (B @ (B.T @ G) + ratio * ((G @ A.T) @ A))


class LoRAProGradients(NamedTuple):
    """LoRA-Pro's adjusted factor gradients and the free matrix that fixes them."""

    g_A: Any
    g_B: Any
    X: Any


def lorapro_gradients(G: Any, B: Any, A: Any, scale: float = 1.0) -> LoRAProGradients:
    r"""LoRA-Pro's adjusted gradients (Wang et al., arXiv:2407.18242, Thms 2.1–2.2).

    Solves :math:`\min_{g_A, g_B}\|s(Bg_A + g_BA) - G\|_F`.  Every minimizer has the form

    .. math:: g_A = \tfrac1s (B^\top B)^{-1}B^\top G + XA,\qquad
              g_B = \tfrac1s (I-P_B)\,G A^\top(AA^\top)^{-1} - BX,

    for a free :math:`X\in\mathbb{R}^{r\times r}` (the step :math:`s(Bg_A+g_BA)` is the tangent
    projection whatever X is).  X is fixed by keeping the adjusted gradients closest to
    LoRA's own, :math:`\min_X \|g_A - sB^\top G\|^2 + \|g_B - sGA^\top\|^2`, whose
    stationarity condition is the Sylvester equation

    .. math:: B^\top B\,X + X\,AA^\top = -\tfrac1s (B^\top B)^{-1} B^\top G A^\top,

    solved with ``scipy.linalg.solve_sylvester`` on the host (it is r×r).
    B and A must have full rank r (else the inverses do not exist: ``ValueError``).
    """
    xp = _check(G, B, A)
    if scale == 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be finite and non-zero, got {scale}")
    import scipy.linalg

    BtB = B.T @ B
    AAt = A @ A.T
    r = BtB.shape[0]
    for name, Mx in (("B", BtB), ("A", AAt)):
        if int(np.linalg.matrix_rank(to_numpy(Mx).astype(np.float64))) < r:
            raise ValueError(f"{name} must have full rank r={r} for LoRA-Pro's adjusted gradients")
    BtG = B.T @ G
    g_A0 = xp.linalg.solve(BtB, BtG) / scale
    GAt = G @ A.T
    PB = projector(B, "col")
    g_B0 = xp.linalg.solve(AAt, (GAt - PB @ GAt).T).T / scale
    rhs = -xp.linalg.solve(BtB, BtG @ A.T) / scale
    X_np = scipy.linalg.solve_sylvester(to_numpy(BtB).astype(np.float64), to_numpy(AAt).astype(np.float64),
                                        to_numpy(rhs).astype(np.float64))
    X = xp.astype(as_backend(X_np, like=G), G.dtype)
    return LoRAProGradients(g_A0 + X @ A, g_B0 - B @ X, X)


def lorapro_step(G: Any, B: Any, A: Any, scale: float = 1.0) -> Any:
    """Weight change of LoRA-Pro's adjusted gradients, :math:`s(Bg_A + g_BA)` (= tangent projection)."""
    g = lorapro_gradients(G, B, A, scale)
    return scale * (B @ g.g_A + g.g_B @ A)


def lorasb_step(G: Any, B: Any, A: Any) -> Any:
    r"""LoRA-XS / LoRA-SB core step: with B, A frozen and ΔW = B R A, :math:`g_R = B^\top G A^\top`
    and the weight change is :math:`B B^\top G A^\top A` (arXiv:2405.17604, arXiv:2411.19557).
    With orthonormal B columns and A rows this is :math:`P_B G P_A`, the best step in {BXA}."""
    _check(G, B, A)
    return B @ ((B.T @ G) @ A.T) @ A


def altlora_step(G: Any, B: Any, A: Any) -> Any:
    r"""AltLoRA-style alternating exact projected steps, over one A-step then one B-step.

    The A-step takes the best step in :math:`\{BX\}`, :math:`P_B G`; assuming a quadratic
    loss with identity Hessian and unit rate, the gradient left for the B-step is
    :math:`G - P_BG`, whose best step in :math:`\{YA\}` is :math:`(I-P_B)GP_A`.  The sum
    :math:`P_BG + (I-P_B)GP_A` equals the tangent projection: under that model alternating
    exact steps reach LoRA-Pro's optimum in one round.  (Our reading of the AltLoRA seed
    paper; its momentum kept in the low-rank space does not change the one-step direction.)
    """
    _check(G, B, A)
    PBG = projector(B, "col") @ G
    return PBG + (G - PBG) @ projector(A, "row")


class StepMetrics(NamedTuple):
    rel_error: float  # ‖step − G‖ / ‖G‖ (raw, as the method scales it)
    cosine: float  # ⟨step, G⟩ / (‖step‖‖G‖)
    rel_error_best_scale: float  # min_c ‖c·step − G‖ / ‖G‖ = sqrt(1 − cos²)


def step_metrics(step: Any, G: Any) -> StepMetrics:
    """Relative error, cosine and best-rescaled error of a weight-space step against G."""
    xp = namespace(G)
    g = float(xp.linalg.vector_norm(G))
    s = float(xp.linalg.vector_norm(step))
    if g == 0:
        raise ValueError("G must be non-zero")
    cos = float(xp.sum(step * G)) / (s * g) if s > 0 else 0.0
    cos = max(-1.0, min(1.0, cos))
    return StepMetrics(float(xp.linalg.vector_norm(step - G)) / g, cos, math.sqrt(max(0.0, 1 - cos * cos)))


def compare_steps(G: Any, B: Any, A: Any, scale: float = 1.0, lora_plus_ratio: float = 16.0) -> list[dict]:
    """One row per method: its step's metrics and the tangent-space lower bound.

    Rows: ``lora``, ``lora_plus``, ``lorapro``, ``altlora``, ``lora_sb`` (B, A frozen) and
    ``bound`` (``rel_error`` = ‖(I−P_B)G(I−P_A)‖/‖G‖).  Every step above lies in the tangent
    space, so no row's ``rel_error_best_scale`` can go below the bound.
    """
    xp = namespace(G)
    steps = {
        "lora": lora_step(G, B, A, scale),
        "lora_plus": lora_plus_step(G, B, A, scale, lora_plus_ratio),
        "lorapro": lorapro_step(G, B, A, scale),
        "altlora": altlora_step(G, B, A),
        "lora_sb": lorasb_step(G, B, A),
    }
    rows = [dict(method=k, **step_metrics(v, G)._asdict()) for k, v in steps.items()]
    res = tangent_residual(G, B, A)
    bound = float(xp.linalg.vector_norm(res)) / float(xp.linalg.vector_norm(G))
    rows.append(dict(method="bound", rel_error=bound, cosine=math.sqrt(max(0.0, 1 - bound**2)),
                     rel_error_best_scale=bound))
    return rows
