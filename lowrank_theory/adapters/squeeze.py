"""LoRA-Squeeze: compress a trained LoRA to a lower rank without forming its dense update.

:func:`squeeze_lora` returns a new :class:`~lowrank_theory.adapters.lowrank.LoRA` of rank
:math:`r_{tgt}` whose update is the best rank-:math:`r_{tgt}` approximation of the source's
:math:`s\\,BA`; :func:`squeeze_schedule` gives the ranks of the gradual (in-tuning) variant.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..linalg import SVDResult, recompress_factors
from .lowrank import LoRA

__all__ = ["squeeze_lora", "squeeze_schedule"]


def _check_pos_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _randomized_factored_svd(
    B: torch.Tensor, A: torch.Tensor, rank: int, oversample: int, n_iter: int, seed: int | None
) -> SVDResult:
    """Randomized range finder on the implicit operator ``B @ A`` (only products with B, A)."""
    m, r = B.shape
    n = A.shape[1]
    ell = min(rank + oversample, r, m, n)
    omega = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, ell))).to(B)
    Q = torch.linalg.qr(B @ (A @ omega))[0]  # (m, ell): range of (BA) Ω
    for _ in range(n_iter):
        Qt = torch.linalg.qr(A.T @ (B.T @ Q))[0]  # (n, ell)
        Q = torch.linalg.qr(B @ (A @ Qt))[0]  # (m, ell)
    Uc, S, Vh = recompress_factors(Q.T @ B, A, rank)  # best rank-k of Qᵀ B A, still factored
    return SVDResult(Q @ Uc, S, Vh)


@torch.no_grad()
def squeeze_lora(
    adapter: LoRA,
    target_rank: int,
    *,
    alpha: float | None = None,
    randomized: bool = False,
    oversample: int = 10,
    n_iter: int = 2,
    seed: int | None = None,
) -> LoRA:
    r"""Compress a LoRA to rank ``target_rank``: :math:`s'B'A' = [s\,BA]_{r_{tgt}}`.

    Parameters
    ----------
    adapter : LoRA
        The source (a :class:`LoRA` or subclass such as PiSSA/MiLoRA) of rank :math:`r_{src}`.
    target_rank : int
        :math:`r_{tgt}`, ``1 <= target_rank <= r_src``.
    alpha : float, default ``target_rank``
        Scale numerator of the result, :math:`s' = \alpha/r_{tgt}` (default :math:`s' = 1`),
        positive.  The factors absorb it, so :math:`s'B'A'` does not depend on it.
    randomized : bool
        Use a randomized range finder on the implicit :math:`BA` (the paper's RSVD) instead of
        the exact factored SVD.  Exact anyway when ``target_rank + oversample >= r_src``.
    oversample, n_iter : int
        Sketch oversampling :math:`p` and power iterations :math:`q` (randomized only).
    seed : int, optional
        Seed of the Gaussian sketch (drawn on the host by NumPy, then moved).

    Returns
    -------
    LoRA
        A new adapter, rank :math:`r_{tgt}`, same device, dtype and dropout as the source.

    Raises
    ------
    TypeError
        If ``adapter`` is not a LoRA.
    ValueError
        If ``target_rank`` is out of range, ``alpha`` is not positive, or the factors hold NaN/Inf.

    Notes
    -----
    Exact path: :func:`~lowrank_theory.linalg.recompress_factors` on :math:`(sB, A)` -- thin QRs
    :math:`sB = Q_BR_B`, :math:`A^\top = Q_AR_A`, SVD of the :math:`r\times r` core
    :math:`R_BR_A^\top` -- gives :math:`U\Sigma V^\top = [s\,BA]_{r_{tgt}}`, the Eckart--Young
    optimum, in :math:`O((m+n)r^2)`, never forming the :math:`m\times n` product.  Randomized
    path: :math:`Q = \operatorname{qr}(B(A\Omega))` with :math:`q` power iterations through
    :math:`B`, :math:`A` only, then the factored SVD of :math:`(Q^\top B)A`;
    :math:`O((m+n)r\ell)`, :math:`\ell = r_{tgt} + p`.  Split:
    :math:`B' = U(\Sigma/s')^{1/2}`, :math:`A' = (\Sigma/s')^{1/2}V^\top` (balanced factors,
    the source scale folded in).  Computed in float32 or better, cast back.

    References
    ----------
    I. Vulić, A. Grycner, Q. de Laroussilhe, J. Pfeiffer, "LoRA-Squeeze: Simple and Effective
    Post-Tuning and In-Tuning Compression of LoRA Modules", arXiv:2602.10993.
    N. Halko, P.-G. Martinsson, J. A. Tropp, arXiv:0909.4061 (randomized range finder).
    """
    if not isinstance(adapter, LoRA):
        raise TypeError(f"adapter must be a LoRA, got {type(adapter).__name__}")
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or not 1 <= target_rank <= adapter.rank:
        raise ValueError(
            f"target_rank must satisfy 1 <= target_rank <= source rank {adapter.rank}, got {target_rank!r}"
        )
    alpha = float(target_rank if alpha is None else alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be finite and positive, got {alpha}")
    if not isinstance(randomized, bool):
        raise TypeError(f"randomized must be a bool, got {type(randomized).__name__}")
    for name, v in (("oversample", oversample), ("n_iter", n_iter)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    dtype = adapter.B.dtype
    acc = torch.promote_types(dtype, torch.float32)
    B = adapter.scale * adapter.B.detach().to(acc)
    A = adapter.A.detach().to(acc)
    for name, t in (("adapter.B", B), ("adapter.A", A)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
    if randomized:
        U, S, Vh = _randomized_factored_svd(B, A, target_rank, oversample, n_iter, seed)
    else:
        U, S, Vh = recompress_factors(B, A, target_rank)
    dropout = float(adapter.config().get("dropout", 0.0))
    out = LoRA(adapter.d_out, adapter.d_in, rank=target_rank, alpha=alpha, dropout=dropout)
    out = out.to(device=adapter.B.device, dtype=dtype)
    root = torch.sqrt(S / out.scale)
    out.B.copy_((U * root).to(dtype))
    out.A.copy_((root[:, None] * Vh).to(dtype))
    return out


def squeeze_schedule(r_src: int, r_tgt: int, steps: int, *, kind: str = "linear") -> list[int]:
    r"""Ranks of the in-tuning (annealed) LoRA-Squeeze: one target rank per squeeze event.

    Parameters
    ----------
    r_src, r_tgt : int
        Source and final rank, ``1 <= r_tgt <= r_src``.
    steps : int
        Number of squeeze events :math:`N \ge 1`.
    kind : {"linear", "geometric"}
        Interpolate the rank linearly, :math:`r_i = r_{src} + (r_{tgt} - r_{src})\,i/N`, or
        geometrically, :math:`r_i = r_{src}(r_{tgt}/r_{src})^{i/N}`, rounded to the nearest int.

    Returns
    -------
    list of int
        :math:`[r_1, \dots, r_N]`, non-increasing, :math:`r_N = r_{tgt}`, every
        :math:`r_i \le r_{src}`; consecutive entries repeat when :math:`N > r_{src} - r_{tgt}`
        (a repeated rank is a no-op squeeze).

    Notes
    -----
    The paper's annealed variant trains at :math:`r_{src}` and squeezes step by step towards
    :math:`r_{tgt}` during training, fine-tuning between events; the exact spacing of its
    events is a training-loop choice that we could not check beyond the abstract, so both
    common interpolations are offered.  Apply each event with :func:`squeeze_lora` and rebuild
    the optimizer.

    References
    ----------
    I. Vulić et al., arXiv:2602.10993.
    """
    _check_pos_int(r_src, "r_src")
    _check_pos_int(r_tgt, "r_tgt")
    _check_pos_int(steps, "steps")
    if r_tgt > r_src:
        raise ValueError(f"r_tgt must be <= r_src, got r_tgt={r_tgt} > r_src={r_src}")
    frac = np.arange(1, steps + 1) / steps
    if kind == "linear":
        ranks = r_src + (r_tgt - r_src) * frac
    elif kind == "geometric":
        ranks = r_src * (r_tgt / r_src) ** frac
    else:
        raise ValueError(f"kind must be 'linear' or 'geometric', got {kind!r}")
    out = [int(v) for v in np.rint(ranks)]
    out[-1] = r_tgt
    return out
