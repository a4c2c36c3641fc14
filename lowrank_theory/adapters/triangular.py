r"""TriAdaptLoRA: :math:`\Delta W = s\,B\,C\,A` with the core split into block-triangular parts, grown block by block.

:class:`TriAdaptLoRA` holds :math:`A \in \mathbb{R}^{r\times n}`, :math:`B \in \mathbb{R}^{m\times r}` and an
:math:`r\times r` core :math:`C = L + U`, :math:`L` block-lower- and :math:`U` block-upper-triangular (both
including the diagonal blocks).  Growing the rank by a block of :math:`k` adds :math:`k` rows of A, :math:`k`
columns of B, one block row of L (:math:`k\times r'`) and one block column of U (:math:`r'\times k`),
:math:`r' = r + k`; the old entries are untouched, so the optimizer state carries over.  The growth rule
(normalized-Frobenius-norm importance, linear threshold) is
:class:`~lowrank_theory.training.gated_schedules.TriAdaptLoRASchedule`.

What was read, and from where
-----------------------------
* The abstract of arXiv:2501.08008 (arxiv.org HTML v1 and the Hugging Face papers page, ``search`` pages
  corpus): "a triangular split of transformation matrices into lower and upper triangular components",
  "a parameter importance metric based on normalized Frobenius norms", "an adaptive rank-growth strategy
  governed by dynamic thresholds", best "under linear threshold-driven rank growth".  The method section was
  not reachable (stored pages hold the opening only).
* A PEFT-style implementation (``TriAdaptLoraConfig`` / ``TriAdaptLoraLayer`` / ``RankAllocator``; found with
  ``find_string``, repository not named by the index, docstring cites arXiv:2501.08008).  As read there:
  the update is ``B_cat @ (C @ A_cat) * alpha / (r + 1e-5)``; each growth appends ``C_row`` (k x r') and
  ``C_col`` (r' x k), zero-padded and summed into ``C``; the layer score is
  ``||C||_F / (number of blocks)`` minus its value at the previous evaluation; the growth event every
  ``incre_interval`` steps after ``init_warmup`` grows every layer whose score reaches the
  ``K``-th largest, ``K = max(1, int((R_target - R_now) * (t - t_w) / (T - t_w)))`` ("linear") or
  ``int(exp(mul * log(R_target - R_now)))`` ("non-linear"), by ``incre_rank_num`` (default half the
  reference rank); A's first block ~ N(0, 0.02^2), every other new tensor zero.

Our choices, and why
--------------------
* Init: that stored init leaves B = 0 and C = 0, where every gradient of A, B and C is zero (each is a
  product with a zero factor: :math:`\nabla_B = G A^\top C^\top`, :math:`\nabla_C = B^\top G A^\top`,
  :math:`\nabla_A = C^\top B^\top G`), so training could not start.  We set the new diagonal block of L
  to the identity (:math:`C = I` at init: the update starts as LoRA's :math:`sBA`) and keep B's new
  columns zero, so :math:`\Delta W` is unchanged by a growth and the new columns of B get the gradient
  :math:`G A_{new}^\top` at once.  A's new rows ~ N(0, 0.02^2), as the stored code's first block.
* Scale: :math:`s = \alpha/r_0` fixed at construction (the stored :math:`\alpha/r` shrinks every
  existing rank at each growth); so a growth is exactly function-preserving.

Parameter count with blocks :math:`b_1, \dots, b_N` (:math:`r = \sum b_i`, :math:`s_i = b_1 + \dots + b_i`):
:math:`r(m+n) + \sum_i 2 b_i s_i = r(m + n) + r^2 + \sum_i b_i^2`, since
:math:`2 b_i s_i = s_i^2 - s_{i-1}^2 + b_i^2`; one block gives :math:`r(m + n + 2r)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..method_index import Paper, adapter_entry
from .base import Adapter, check_rank
from .lowrank import LORA_PARAMS, _check_dropout, _generator
from .params import Param, schema
from .registry import register

__all__ = ["TriAdaptLoRA", "triangular_indices"]

_STD = 0.02  # the stored code's N(0, 0.02^2) for A


def triangular_indices(blocks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Flat positions in the :math:`r\times r` core of the packed L and U entries, block by block.

    Block :math:`i` (rows/columns :math:`[s_{i-1}, s_i)`) owns, in L, rows :math:`[s_{i-1}, s_i)` ×
    columns :math:`[0, s_i)` (row-major) and, in U, rows :math:`[0, s_i)` × columns :math:`[s_{i-1}, s_i)`
    (row-major).  Appending a block appends positions, so packed vectors grow at their end.

    Returns
    -------
    (idx_L, idx_U) : torch.Tensor of int64, each of length :math:`(r^2 + \sum b_i^2)/2`
    """
    blocks = tuple(int(b) for b in blocks)
    if not blocks or min(blocks) < 1:
        raise ValueError(f"blocks must be a non-empty sequence of positive ints, got {blocks}")
    r = sum(blocks)
    lo, idx_l, idx_u = 0, [], []
    for b in blocks:
        hi = lo + b
        rows = torch.arange(lo, hi)
        idx_l.append((rows[:, None] * r + torch.arange(hi)[None, :]).flatten())
        idx_u.append((torch.arange(hi)[:, None] * r + rows[None, :]).flatten())
        lo = hi
    return torch.cat(idx_l), torch.cat(idx_u)


def _packed_len(blocks: Sequence[int]) -> int:
    r = sum(blocks)
    return (r * r + sum(b * b for b in blocks)) // 2


def _identity_block_rows(blocks: Sequence[int]) -> torch.Tensor:
    """The packed L that makes :math:`L = I` (each block row is ``[0 | I_b]``)."""
    out, s = [], 0
    for b in blocks:
        s += b
        row = torch.zeros(b, s)
        row[:, s - b:] = torch.eye(b)
        out.append(row.flatten())
    return torch.cat(out)


@register
class TriAdaptLoRA(Adapter):
    r"""TriAdaptLoRA: :math:`\Delta W = s\,B\,(L + U)\,A`, block-triangular core, rank grown by blocks.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int
        Current rank :math:`r = \sum_i b_i`, ``1 <= r <= min(m, n)``.
    alpha : float, default ``rank``
        Scale numerator; :math:`s = \alpha/r` at construction, kept by :meth:`grow_`.
    dropout : float
        Dropout on the update's input.
    blocks : sequence of int, optional
        Block sizes :math:`b_1, \dots, b_N` summing to ``rank`` (default one block, ``(rank,)``); a grown
        adapter's ``config()`` records them so that it can be rebuilt.
    seed : int, optional
        Seed of A's init (and, through :meth:`grow_`'s own seed, of later blocks).

    Notes
    -----
    Trainable: ``A`` (r×n), ``B`` (m×r), ``L`` and ``U`` packed (each :math:`(r^2 + \sum b_i^2)/2`
    entries); count :math:`r(m+n) + r^2 + \sum b_i^2`.  Forward
    :math:`s\,((xA^\top)C^\top)B^\top`, :math:`r(m+n) + r^2` per token, never the m×n product.  At
    construction :math:`C = I`, :math:`B = 0` (so :math:`\Delta W = 0`), :math:`A \sim \mathcal N(0, 0.02^2)`.
    :meth:`normalized_core_norm` is the importance's :math:`\|C\|_F / N`.

    References
    ----------
    Y. Liang, Y. Wang, Y. Zeng, "TriAdaptLoRA: Brain-Inspired Triangular Adaptive Low-Rank Adaptation for
    Parameter-Efficient Fine-Tuning", arXiv:2501.08008 (abstract and a stored implementation; see the module
    docstring).
    """

    index_entry = adapter_entry(
        "triadaptlora",
        Paper("TriAdaptLoRA: Brain-Inspired Triangular Adaptive Low-Rank Adaptation for Parameter-Efficient "
              "Fine-Tuning", "2501.08008"),
        "rank * (d_out + d_in + 2 * rank)",
        ("tests/adapters/test_gated_rank.py", "tests/training/test_rank_budget.py"),
        note="grown by its TriAdaptLoRASchedule (lowrank_theory.training.gated_schedules)",
    )

    name = "triadaptlora"
    params = schema(LORA_PARAMS, without=["rslora"],
                    blocks=Param("ints", low=1, none_ok=True, doc="block sizes summing to rank; None: (rank,)"))

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        blocks: Sequence[int] | int | None = None,
        seed: int | None = 0,
    ) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        blocks = (rank,) if blocks is None else ((blocks,) if isinstance(blocks, int) else tuple(blocks))
        if sum(blocks) != rank:
            raise ValueError(f"blocks must sum to rank={rank}, got {blocks} (sum {sum(blocks)})")
        alpha = float(rank if alpha is None else alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        self.scale = alpha / rank
        self.blocks = blocks
        self.dropout = _check_dropout(dropout)
        g = _generator(seed)
        self.A = nn.Parameter(_STD * torch.randn(rank, d_in, generator=g))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.L = nn.Parameter(_identity_block_rows(blocks))
        self.U = nn.Parameter(torch.zeros(_packed_len(blocks)))
        self._set_indices()

    def _set_indices(self) -> None:
        il, iu = triangular_indices(self.blocks)
        dev = self.A.device
        self.register_buffer("idx_L", il.to(dev), persistent=False)
        self.register_buffer("idx_U", iu.to(dev), persistent=False)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 8, blocks: Sequence[int] | int | None = None,
                    **_: Any) -> int:
        bl = (rank,) if blocks is None else ((blocks,) if isinstance(blocks, int) else tuple(blocks))
        return rank * (d_out + d_in) + rank * rank + sum(b * b for b in bl)

    def core(self) -> torch.Tensor:
        r"""The :math:`r\times r` core :math:`C = L + U` (differentiable)."""
        r, kw = self.rank, dict(dtype=self.L.dtype, device=self.L.device)
        low = torch.zeros(r * r, **kw).index_add_(0, self.idx_L, self.L)
        up = torch.zeros(r * r, **kw).index_add_(0, self.idx_U, self.U)
        return (low + up).view(r, r)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * (self.B @ (self.core() @ self.A))

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return self.scale * (((self.dropout(x) @ self.A.T) @ self.core().T) @ self.B.T)

    @torch.no_grad()
    def normalized_core_norm(self) -> float:
        r""":math:`\|C\|_F / N`, N the number of blocks (the stored code's normalized Frobenius norm)."""
        return float(torch.linalg.matrix_norm(self.core().double())) / len(self.blocks)

    @torch.no_grad()
    def grow_(self, add: int, *, seed: int | None = None) -> list:
        r"""Append a block of ``add`` ranks; :math:`\Delta W` is unchanged (new columns of B are zero).

        Returns
        -------
        list of :class:`~lowrank_theory.training.rank_change.ParamRemap`-shaped tuples
            ``(old, new, dim, index)`` for A (dim 0), B (dim 1), L and U (dim 0), new positions ``-1``;
            the schedule wraps them in ``ParamRemap`` so the optimizer state of old entries carries over.
        """
        if isinstance(add, bool) or not isinstance(add, int) or add < 1:
            raise ValueError(f"add must be an int >= 1, got {add!r}")
        r = self.rank
        if r + add > min(self.d_out, self.d_in):
            raise ValueError(f"add={add} would exceed min(d_out, d_in)={min(self.d_out, self.d_in)} (rank {r})")
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        new_blocks = (*self.blocks, add)
        dt, dev = self.A.dtype, self.A.device
        a_new = (_STD * torch.randn(add, self.d_in, generator=g, dtype=torch.float64)).to(dt).to(dev)
        l_new = torch.zeros(add, r + add, dtype=dt, device=dev)
        l_new[:, r:] = torch.eye(add, dtype=dt, device=dev)
        u_new = torch.zeros((r + add) * add, dtype=dt, device=dev)
        values = {
            "A": (torch.cat([self.A.detach(), a_new], 0), 0, r),
            "B": (torch.cat([self.B.detach(), self.B.new_zeros(self.d_out, add)], 1), 1, r),
            "L": (torch.cat([self.L.detach(), l_new.flatten()]), 0, self.L.numel()),
            "U": (torch.cat([self.U.detach(), u_new]), 0, self.U.numel()),
        }
        out = []
        for name, (value, dim, old_len) in values.items():
            old = getattr(self, name)
            new = nn.Parameter(value, requires_grad=old.requires_grad)
            setattr(self, name, new)
            index = torch.cat([torch.arange(old_len), torch.full((value.shape[dim] - old_len,), -1)])
            out.append((old, new, dim, index))
        self.blocks = new_blocks
        self._set_indices()
        self._config.update(rank=self.rank, alpha=self.scale * self.rank, blocks=new_blocks)
        return out
