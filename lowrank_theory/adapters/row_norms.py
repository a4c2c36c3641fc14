r"""Row norms :math:`\|W_0 + sBA\|_{i,:}` from r-sized products, the numerics behind DoRA.

:func:`lowrank_row_norms` evaluates the expanded identity (proofs/14, item 1) in a working dtype
(:func:`row_norm_dtype`) wide enough that cancelling rows need no dense recomputation and so no
host sync (item 2).  Used by :class:`~lowrank_theory.adapters.multiplicative.DoRA`.

Reference: S.-Y. Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353.
"""

from __future__ import annotations

import torch

__all__ = ["lowrank_row_norms", "row_norm_dtype", "scaled_row_norms"]


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half inputs, float64 if any input is float64."""
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def scaled_row_norms(W: torch.Tensor) -> torch.Tensor:
    r"""Row norms :math:`\|w_i\|_2 = s_i\,\|w_i / s_i\|_2` with :math:`s_i = \max_j |w_{ij}|`, free of overflow.

    Squaring entries of magnitude ~1e20 overflows float32 and ~1e-30 underflows to 0; dividing
    each row by its largest magnitude first keeps every square in [0, 1], so the result is accurate
    wherever the norm itself is representable (a zero row gives 0).  Computed in float32 or better
    (the dtype of ``W`` promoted with float32); shape (m,) for W of shape (m, n).
    """
    W = W.to(torch.promote_types(W.dtype, torch.float32))
    s = W.abs().amax(dim=1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.linalg.vector_norm(W / safe[:, None], dim=1) * s


def row_norm_dtype(W0: torch.Tensor, precise: bool = False) -> torch.dtype:
    """Working dtype of :func:`lowrank_row_norms`: float32 for a bfloat16 ``W0``, else float64.

    float16 gets float64 too: its 11-bit significand leaves float32 a margin of only 4 (proofs/14,
    item 2).  ``precise`` asks for float64 whatever ``W0`` is (merging).
    """
    return torch.float32 if W0.dtype == torch.bfloat16 and not precise else torch.float64


def lowrank_row_norms(
    W0: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float = 1.0,
    *,
    refine_tol: float = 1e-3,
    w0_sq: torch.Tensor | None = None,
    precise: bool = False,
) -> torch.Tensor:
    r"""Row norms :math:`\|W_0 + sBA\|_{i,:}` without forming the m×n product :math:`BA`.

    Parameters
    ----------
    W0 : Tensor, shape (m, n)
    B : Tensor, shape (m, r)
    A : Tensor, shape (r, n)
    scale : float
        :math:`s`.
    refine_tol : float
        Only for a float64 ``W0``: rows whose squared norm is below ``refine_tol`` times
        :math:`\|w_i\|^2 + s^2\|(BA)_i\|^2` (cancellation) are recomputed densely, one row of
        :math:`W_0 + sBA` each.  That test reads a device flag (a host sync on CUDA); no other
        dtype syncs.
    w0_sq : Tensor of shape (m,), optional
        :math:`\|w_i\|^2` in :func:`row_norm_dtype`, when the caller already has it (W0 is frozen,
        so DoRA caches it instead of re-reading W0 for it every step).
    precise : bool
        Work in float64 even for a half-precision ``W0`` (merging, where no forward rounding
        hides the norm's error).

    Returns
    -------
    Tensor, shape (m,)
        In the promoted accumulation dtype of the inputs (float32, or float64 if any input is
        float64); differentiable.

    Notes
    -----
    .. math::
        \|W_0 + sBA\|_i^2 = \|w_i\|^2 + 2s\sum_j (W_0A^\top)_{ij}B_{ij} + s^2\, b_i^\top (AA^\top) b_i,

    with :math:`w_i, b_i` the i-th rows of :math:`W_0, B`: cost :math:`O(mnr + nr^2 + mr^2)`
    instead of :math:`O(mnr)` time **and** :math:`O(mn)` memory for the dense product.  The
    cross term is bounded by the other two, so with unit round-off :math:`u` of the working dtype
    the squared norm's relative error is :math:`O(u\,\kappa_i)`,
    :math:`\kappa_i = (\|w_i\|^2 + s^2\|(BA)_i\|^2)/\|\cdot\|_i^2`.  The adapted layer's own output
    row :math:`(W_0 + sBA)_i x`, computed in W0's dtype (round-off :math:`u_c`), already errs by
    :math:`O(u_c\sqrt{\kappa_i})`; working in float32 for a bfloat16 W0 and in float64 for a
    float16 or float32 W0 keeps :math:`u\,\kappa_i` below that for every :math:`\kappa_i` at which
    the output row has a correct digit (:math:`u \le u_c^2/32`, proofs/14, item 2), so no row is
    recomputed and no host sync is needed (CUDA graphs, ``torch.compile(fullgraph=True)``).  Only a
    float64 W0 has no wider type; there the rows with :math:`\kappa_i > 1/\text{refine\_tol}` are
    recomputed densely (cost :math:`O(nr)` each), which bounds the relative error by about
    :math:`u/\text{refine\_tol}`.
    W0 is converted to the working dtype in blocks of rows (at most :data:`_ROW_BLOCK` entries),
    so the extra memory stays bounded for large layers.
    """
    out_dtype = _acc_dtype(W0, B, A)
    work = row_norm_dtype(W0, precise)
    Bw, Aw = B.to(work), A.to(work)
    rows = max(1, _ROW_BLOCK // max(1, W0.shape[1]))
    prods, w2_parts = [], []
    for i in range(0, max(W0.shape[0], 1), rows):  # one block of W0 in the working dtype at a time (>= 1)
        Wi = W0[i:i + rows].to(work)  # no copy when W0 already has the working dtype
        prods.append(Wi @ Aw.T)
        if w0_sq is None:
            w2_parts.append((Wi * Wi).sum(dim=1))
    W0At = torch.cat(prods) if len(prods) > 1 else prods[0]
    if w0_sq is None:
        w2 = torch.cat(w2_parts) if len(w2_parts) > 1 else w2_parts[0]
    else:
        w2 = w0_sq.to(work)
    G = Aw @ Aw.T
    # 2s·cross + s²·b_iᵀGb_i = s·Σ_k (2 W0Aᵀ + s·BG)_ik B_ik: one addmm, one product, one sum
    sq = torch.add(w2, (torch.addmm(W0At, Bw, G, beta=2.0, alpha=scale) * Bw).sum(dim=1), alpha=scale)
    if W0.dtype == torch.float64 and refine_tol > 0:
        bad = sq < refine_tol * (w2 + (scale * scale) * ((Bw @ G) * Bw).sum(dim=1))
        if bool(bad.any()):
            idx = bad.nonzero().squeeze(1)
            dense = W0.index_select(0, idx).to(work) + scale * (Bw.index_select(0, idx) @ Aw)
            sq = sq.index_put((idx,), (dense * dense).sum(dim=1))
    # a root whose derivative is 0 (not inf) at 0, so DoRA's clamp_min(eps) gives finite gradients at zero rows
    nu = sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt() * (sq > 0)
    return nu.to(out_dtype)


#: entries of W0 converted to the working dtype at a time by :func:`lowrank_row_norms` (32 MiB in float64)
_ROW_BLOCK = 1 << 22
