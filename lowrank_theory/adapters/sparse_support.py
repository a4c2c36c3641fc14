r"""Unstructured sparse tuning on a given support: :math:`\Delta W = \sum_{(i,j) \in \Omega} v_{ij} e_i e_j^\top`.

The support Ω is chosen outside the adapter (SPT's most sensitive weights,
:func:`~lowrank_theory.training.sensitivity.spt_allocate`); the adapter trains one value per entry of Ω and
applies them by gather / scatter-add, :math:`O(|\Omega|)` per token, never a dense m×n update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..method_index import Paper, adapter_entry
from .base import Adapter
from .params import Tensor, schema
from .registry import register
from .sparse import sparse_entries_dense, sparse_entries_matmul

__all__ = ["DENSE_DENSITY", "SparseDelta", "check_support", "dense_is_cheaper"]


def check_support(indices: torch.Tensor | None, d_out: int, d_in: int) -> torch.Tensor:
    """Validate flat row-major indices of a support (1-D, integer, distinct, in [0, m·n)); return them sorted.

    ``None`` means the full support ``arange(m·n)``.
    """
    if indices is None:
        return torch.arange(d_out * d_in)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor of flat row-major indices, got {type(indices).__name__}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D (flat row-major positions), got shape {tuple(indices.shape)}")
    idx = torch.sort(indices.detach().to(device="cpu", dtype=torch.long)).values
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= d_out * d_in):
        raise ValueError(f"indices must lie in [0, {d_out * d_in}) for a {d_out}x{d_in} weight, "
                         f"got range [{int(idx[0])}, {int(idx[-1])}]")
    if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):
        raise ValueError("indices must be distinct")
    return idx


#: Above this density the gather / scatter-add forward costs more than forming ΔW and one matmul: the gather
#: moves T·|Ω| entries through an irregular index_add, the dense path 2·T·m·n FLOPs of a cache-friendly GEMM.
#: Measured on one CPU core (m = n = 512, T = 256, forward + backward): the sparse path is 0.3x the dense one at
#: density 0.5 %, 1.6x at 2 %, 4.3x at 5 %, 8.7x at 10 %, 186x at 100 %; so the cross-over is near 1/64 ≈ 1.6 %.
DENSE_DENSITY = 1 / 64


def dense_is_cheaper(nnz: int, d_out: int, d_in: int) -> bool:
    r"""Whether :class:`SparseDelta` applies ΔW densely: :math:`|\Omega| > m n / 64` (see :data:`DENSE_DENSITY`)."""
    return nnz > DENSE_DENSITY * d_out * d_in


@register
class SparseDelta(Adapter):
    r"""Sparse tuning of chosen entries: :math:`\Delta W_{ij} = v_{ij}` on Ω, 0 elsewhere (values start at 0).

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    indices : Tensor, optional
        Flat row-major positions :math:`i n + j` of Ω (1-D, integer, distinct); default all m·n entries
        (a dense update).  SPT's unstructured part passes the most sensitive weights of the matrix.

    Raises
    ------
    TypeError, ValueError
        ``indices`` not a 1-D integer tensor of distinct positions in [0, m·n).

    Notes
    -----
    Forward: ``zeros(..., m).index_add_(-1, rows, x.index_select(-1, cols) * values)`` (as SLTrain's sparse
    part) while the support is sparse, :math:`|\Omega| \le mn/64`; denser supports (the default, all entries)
    form ΔW and multiply, which is then cheaper (:func:`dense_is_cheaper`).  Identity at init (values 0).
    The support is a persistent buffer (``rows``, ``cols``), so a checkpoint holds it with the values;
    ``config()`` holds ``indices`` too.  SPT itself masks the gradient of the dense weight instead (its
    optimizer sees all m·n entries); the update is the same, this form keeps only :math:`|\Omega|`
    trainable numbers.  Trainable: :math:`|\Omega|`.

    References
    ----------
    H. He, J. Cai, J. Zhang, D. Tao, B. Zhuang, "Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning",
    ICCV 2023, arXiv:2303.08566 (the unstructured tuning of SPT).
    """

    index_entry = adapter_entry(
        "sparse_delta",
        Paper("Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning", "2303.08566"),
        "d_out * d_in if indices is None else int(indices.numel())",
        ("tests/training/test_sensitivity.py",),
        proofs=("proofs/27-spt-first-order.md",),
        peft="none",
    )

    name = "sparse_delta"
    params = schema(indices=Tensor(doc="flat row-major positions i*d_in + j of the tuned entries; None: all"))

    def __init__(self, d_out: int, d_in: int, indices: torch.Tensor | None = None) -> None:
        super().__init__(d_out, d_in)
        idx = check_support(indices, d_out, d_in)
        self.nnz = int(idx.numel())
        self.register_buffer("rows", idx // d_in)
        self.register_buffer("cols", idx % d_in)
        self.values = nn.Parameter(torch.zeros(self.nnz))

    @classmethod
    def param_count(cls, d_out: int, d_in: int, indices: torch.Tensor | None = None, **_: Any) -> int:
        return d_out * d_in if indices is None else int(indices.numel())

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return sparse_entries_dense(self.rows, self.cols, self.values, self.d_out, self.d_in)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        if dense_is_cheaper(self.nnz, self.d_out, self.d_in):
            return x @ self.delta_weight().to(x.dtype).T
        return sparse_entries_matmul(x, self.rows, self.cols, self.values, self.d_out)
