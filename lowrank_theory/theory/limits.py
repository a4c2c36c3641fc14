r"""Computational limits of LoRA: when can the attention-gradient term be approximated fast?

Hu, Su, Wu, Liu, Liu (arXiv:2406.03136) show that the LoRA gradient of an attention layer
with weight :math:`W = W^\star + \tfrac{\alpha}{r}BA` is a chain of products with the
:math:`L\times L` matrix

.. math:: \mathcal{A} = \exp\!\big(X W X^\top / d\big)\quad(\text{entrywise}),

and that nearly-linear-time algorithms (via low-rank approximations of :math:`\mathcal A`
chained through the gradient) exist when the norms of X, :math:`W^\star` and
:math:`\alpha BA/r` keep the entries of :math:`XWX^\top/d` below a threshold of order
:math:`\log L` (i.e. the bound :math:`B` on the entries of the factors is :math:`o(\sqrt{\log L})`),
while above it no sub-quadratic algorithm exists under SETH (the Alman–Song phase transition).

Numerically: the **polynomial method** replaces :math:`\exp(s)` by its degree-g Taylor
polynomial; on entries bounded by :math:`\beta` this has relative entrywise error
:math:`\le \beta^{g+1}e^{\beta}/(g+1)!`\ and rank :math:`\binom{d+g}{g}` independent of L.
So with :math:`\beta \lesssim \log L`, a polylog-rank approximation has small error; past the
threshold, the best rank-k error of :math:`\mathcal A` (Eckart–Young, computed exactly by SVD)
blows up.  We measure errors on the row-normalized (softmax) attention
:math:`P = D^{-1}\mathcal A`, entrywise in units of 1/L, since that is what the gradient chain
consumes; :func:`phase_transition` tabulates both approximations as the bound grows.
"""

from __future__ import annotations

import math
from math import comb

import numpy as np

__all__ = [
    "attention_matrix",
    "best_rank_error",
    "phase_transition",
    "softmax_rows",
    "taylor_error",
    "taylor_rank",
]


def attention_matrix(L: int, d: int, bound: float, *, rank: int = 4, alpha: float = 8.0,
                     seed: int = 0) -> tuple[np.ndarray, float]:
    r"""Build :math:`\exp(XWX^\top/d)` with :math:`\max|XWX^\top/d| =` ``bound``.

    X (L×d) has i.i.d. uniform entries in [−1, 1]; :math:`W = W^\star + \tfrac{\alpha}{r}BA`
    with Gaussian :math:`W^\star`, B, A (``rank`` r).  The logits :math:`S = XWX^\top/d` are
    rescaled so that their largest magnitude equals ``bound`` (the norm bound of the paper,
    up to the constants that relate entry bounds of X, W⋆, BA to that of S).

    Returns
    -------
    (A, scale) : (ndarray of shape (L, L), float)
        The attention matrix and the factor applied to S.
    """
    if L < 2 or d < 1:
        raise ValueError(f"L must be >= 2 and d >= 1, got L={L}, d={d}")
    if not (bound >= 0 and math.isfinite(bound)):
        raise ValueError(f"bound must be finite and >= 0, got {bound}")
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (L, d))
    W = rng.standard_normal((d, d)) / math.sqrt(d)
    B = rng.standard_normal((d, rank)) / math.sqrt(rank)
    A = rng.standard_normal((rank, d)) / math.sqrt(d)
    S = X @ (W + (alpha / rank) * B @ A) @ X.T / d
    peak = float(np.abs(S).max())
    scale = bound / peak if peak > 0 else 0.0
    return np.exp(scale * S), scale


def softmax_rows(A: np.ndarray) -> np.ndarray:
    r"""Row-normalize a positive matrix: :math:`D^{-1}\mathcal{A}` with :math:`D = \mathrm{diag}(\mathcal{A}1)`."""
    return A / A.sum(axis=1, keepdims=True)


def best_rank_error(P: np.ndarray, k: int) -> tuple[float, float]:
    """Best rank-k approximation of P (Eckart–Young, via the SVD).

    Returns ``(relative Frobenius error, L · max-entry error)``; the second is in units of
    the uniform attention weight 1/L, the scale at which an entrywise approximation of
    softmax attention stops being informative (values ≥ 1 mean useless).
    """
    U, S, Vh = np.linalg.svd(P)
    Pk = (U[:, :k] * S[:k]) @ Vh[:k]
    fro = float(np.sqrt((S[k:] ** 2).sum() / (S**2).sum()))
    return fro, float(np.abs(P - Pk).max() * P.shape[0])


def taylor_rank(d: int, degree: int) -> int:
    r"""Rank of the degree-g Taylor approximation of :math:`\exp(QK^\top)` with head dim d: :math:`\binom{d+g}{g}`."""
    return comb(d + degree, degree)


def taylor_error(logits: np.ndarray, degree: int) -> float:
    r"""Polynomial method: replace :math:`e^{s}` by :math:`\sum_{j\le g} s^j/j!`, row-normalize, and
    return :math:`L\cdot\max|P - P_g|` (entrywise error in units of 1/L)."""
    approx = np.zeros_like(logits)
    term = np.ones_like(logits)
    for j in range(degree + 1):
        if j:
            term = term * logits / j
        approx = approx + term
    P = softmax_rows(np.exp(logits))
    with np.errstate(divide="ignore", invalid="ignore"):
        Pg = approx / approx.sum(axis=1, keepdims=True)
    if not np.isfinite(Pg).all():
        return float("inf")
    return float(np.abs(P - Pg).max() * P.shape[0])


def phase_transition(lengths: list[int], ratios: list[float], *, d: int = 8, rank_fraction: float = 0.1,
                     degree: int = 3, seed: int = 0) -> list[dict]:
    r"""Tabulate approximation error of softmax attention against :math:`\Gamma = \beta/\log L`.

    For each sequence length L and ratio Γ the logit bound is :math:`\beta = \Gamma\log L`.
    We record, for :math:`P = D^{-1}\exp(XWX^\top/d)`, the best rank-k errors with
    :math:`k = \lceil \text{rank\_fraction}\cdot L\rceil` (a sub-quadratic budget) and the
    degree-g Taylor (polynomial-method) error.  The claim: the entrywise error (units of 1/L)
    is far below 1 for Γ below a constant and far above 1 past it, the gap widening with L.
    """
    rows = []
    for L in lengths:
        k = max(1, math.ceil(rank_fraction * L))
        for g in ratios:
            beta = g * math.log(L)
            A, _ = attention_matrix(L, d, beta, seed=seed)
            fro, ent = best_rank_error(softmax_rows(A), k)
            rows.append(dict(L=L, gamma=g, bound=beta, rank=k, lowrank_fro_error=fro, lowrank_entry_error=ent,
                             taylor_degree=degree, taylor_rank=taylor_rank(d, degree),
                             taylor_entry_error=taylor_error(np.log(A), degree)))
    return rows
