r"""Sparse-plus-low-rank adapters: :math:`\Delta W = sBA + S` with S on a fixed random support.

The sparse part is applied by a gather of the input columns it reads and a scatter-add into the
output rows it writes (``index_select`` + ``index_add``): :math:`O(\text{nnz})` per token, never a
dense m×n S.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..linalg import derive_seed
from ..method_index import Paper, adapter_entry
from .lowrank import LORA_PARAMS, LoRA
from .params import Choice, Float, Seed, schema
from .registry import register

__all__ = ["SLTrain", "sparse_entries_dense", "sparse_entries_matmul", "sparse_support_size"]


def sparse_support_size(d_out: int, d_in: int, density: float) -> int:
    r"""Number of stored entries :math:`\lfloor \delta\, m n \rfloor` (as in SLTrain's code).

    A relative slack of 1e-12 keeps products such as 0.29·100 = 28.999999999999996 at 29.
    """
    return math.floor(density * d_out * d_in * (1.0 + 1e-12))


def sparse_entries_dense(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, d_out: int,
                         d_in: int) -> torch.Tensor:
    r"""The dense (m, n) matrix :math:`S = \sum_t v_t e_{r_t} e_{c_t}^\top` of distinct entries (rows, cols) (k,),
    values (k,): one scatter-add into fresh zeros (differentiable in ``values``).  Shared by SLTrain's sparse
    part, SaRA and ``sparse_delta``."""
    S = torch.zeros(d_out * d_in, dtype=values.dtype, device=values.device)
    return S.index_add_(0, rows * d_in + cols, values).view(d_out, d_in)


def sparse_entries_matmul(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                          d_out: int) -> torch.Tensor:
    r""":math:`x S^\top` for x (..., n) -> (..., m) without forming S: gather the columns ``cols`` of x, scale by
    ``values`` (cast to x's dtype), scatter-add into the rows ``rows`` of fresh zeros; :math:`O(k)` per token and
    no m×n tensor in the forward or the backward."""
    gathered = x.index_select(-1, cols) * values.to(x.dtype)
    out = torch.zeros(*x.shape[:-1], d_out, dtype=x.dtype, device=x.device)
    return out.index_add_(-1, rows, gathered)  # in place into fresh zeros: no copy


@register
class SLTrain(LoRA):
    r"""SLTrain: :math:`\Delta W = s\,BA + S`, S sparse on a fixed random support.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int
        r of the low-rank part, ``1 <= r <= min(m, n)``.
    alpha : float, default ``rank``
        :math:`s = \alpha/r` (SLTrain's code uses ``lora_alpha / r`` too).
    density : float, default 0.03
        :math:`\delta`, fraction of the m·n entries in the support of S, in (0, 1];
        :math:`\text{nnz} = \lfloor\delta mn\rfloor \ge 1` is required.
    seed : int, default 0
        Root seed of the support and of A's init.  Deterministic by default, so two models built
        alike have the same support and a checkpoint loads into a fresh injection.
    sparse_init : {"zero", "uniform"}, default "zero"
        Initial values of S: ``"zero"`` gives :math:`\Delta W = 0` at init (fine-tuning);
        ``"uniform"`` is the paper's pretraining init :math:`U(-1/\sqrt n, 1/\sqrt n)` (then
        :math:`\Delta W \ne 0` at init).
    dropout : float
        Dropout on the input of the low-rank branch only.

    Raises
    ------
    TypeError, ValueError
        If ``density`` is not in (0, 1] or gives no entry, ``sparse_init`` is unknown, ``seed`` is
        not a non-negative int, or ``rank``/``dropout`` are invalid (as for LoRA).

    Notes
    -----
    Support: ``numpy.random.default_rng(derive_seed(seed, "sltrain-support")).choice(m*n, nnz,
    replace=False)``, sorted, as flat row-major indices -- uniform without replacement like the
    authors' ``torch.randperm(mn)[:nnz]``.  It is **regenerated from the seed** (non-persistent
    buffers ``rows``, ``cols``), so ``state_dict`` holds only A, B and the nnz values; rebuild with
    the same ``config()`` before loading.

    Init: A Kaiming-uniform (PEFT's LoRA init), B = 0, as in the authors' ``SpLoRaLinear``;
    values per ``sparse_init``.  The paper pretrains :math:`W = BA + S` itself; here the same
    parametrization is the update of a frozen :math:`W_0`.

    Forward: :math:`s\,(xA^\top)B^\top` plus
    ``zeros(..., m).index_add(-1, rows, x.index_select(-1, cols) * values)``.
    Trainable: :math:`r(m+n) + \lfloor\delta mn\rfloor`.

    References
    ----------
    A. Han, J. Li, W. Huang, M. Hong, A. Takeda, P. Jawanpuria, B. Mishra, "SLTrain: a sparse plus
    low-rank approach for parameter and memory efficient pretraining", arXiv:2406.02214.
    """

    index_entry = adapter_entry(
        "sltrain",
        Paper(
            "SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining",
            "2406.02214"),
        "rank * (d_out + d_in) + floor(density * d_out * d_in * (1 + 1e-12))",
        ("tests/adapters/test_sparse_quantized.py",),
        notebooks=("notebooks/01_expressivity.py",),
    )

    name = "sltrain"
    params = schema(
        LORA_PARAMS, without=["rslora"],
        density=Float(0.0, 1.0, low_open=True, doc="delta, the fraction of W's entries in the sparse support"),
        seed=Seed(doc="seed of the frozen sparse support (and of A's init)"),
        sparse_init=Choice("zero", "uniform", doc="init of the sparse values"),
    )

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        alpha: float | None = None,
        density: float = 0.03,
        seed: int = 0,
        sparse_init: str = "zero",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(d_out, d_in, rank=rank, alpha=alpha, dropout=dropout, seed=seed)
        nnz = sparse_support_size(d_out, d_in, density)
        if nnz < 1:
            raise ValueError(
                f"density={density} gives no sparse entries for a {d_out}x{d_in} weight; need density*m*n >= 1"
            )
        self.density = density
        self.nnz = nnz
        rng = np.random.default_rng(derive_seed(seed, "sltrain-support"))
        flat = np.sort(rng.choice(d_out * d_in, size=nnz, replace=False))
        self.register_buffer("rows", torch.from_numpy(flat // d_in), persistent=False)
        self.register_buffer("cols", torch.from_numpy(flat % d_in), persistent=False)
        values = torch.zeros(nnz)
        if sparse_init == "uniform":
            bound = 1.0 / math.sqrt(d_in)
            values = torch.from_numpy(rng.uniform(-bound, bound, size=nnz)).float()
        self.values = nn.Parameter(values)

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 8, density: float = 0.03, **_: Any) -> int:
        return rank * (d_out + d_in) + sparse_support_size(d_out, d_in, density)

    def sparse_dense(self) -> torch.Tensor:
        """S as a dense (m, n) tensor (for merging and tests)."""
        return sparse_entries_dense(self.rows, self.cols, self.values, self.d_out, self.d_in)

    def sparse_apply(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`x S^\top` for x (..., n) -> (..., m) by gather / scatter-add, :math:`O(\text{nnz})` per token."""
        self._check_input(x)
        return sparse_entries_matmul(x, self.rows, self.cols, self.values, self.d_out)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return super().delta_weight() + self.sparse_dense()

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x) + self.sparse_apply(x)
