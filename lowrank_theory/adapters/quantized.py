r"""Quantized-base adapters: LQ-LoRA, :math:`W_0 \approx Q + L_1L_2` with only :math:`L_1, L_2` trained."""

from __future__ import annotations

from typing import Any

import torch

from ..linalg import lowrank_plus_quantized
from ..method_index import Paper, adapter_entry
from .base import check_weight
from .lowrank import LoRA
from .params import Choice, Float, Int, Seed, schema
from .registry import register

__all__ = ["LQLoRA"]

_QUANTIZERS = ("nf4", "uniform")


@register
class LQLoRA(LoRA):
    r"""LQ-LoRA: the frozen weight is replaced by a quantized :math:`Q`, and the LoRA factors start
    at the low-rank part of :math:`W_0 \approx Q + L_1 L_2`.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int
        r, ``1 <= r <= min(m, n)``.
    bits : int, default 4
        Bits of the quantizer (must be 4 for ``"nf4"``; 2..8 for ``"uniform"``).
    quantizer : {"nf4", "uniform"}, default "nf4"
        Blockwise NormalFloat-4 (the paper's NF code book) or symmetric uniform absmax.
    iters : int, default 10
        Maximum alternations of the decomposition.
    block_size : int, default 64
        Entries per quantization block.
    dropout : float
        Dropout on the input of the update.
    seed : int, optional
        Seed of A's random init when the adapter is built by ``create`` (no weight): then
        :math:`L_1 = 0` and the adapter is a LoRA with scale 1.

    Raises
    ------
    TypeError, ValueError
        If ``quantizer`` is unknown, ``bits`` does not fit it, or ``iters``/``block_size``/``rank``
        are out of range.

    Notes
    -----
    :math:`\Delta W = L_1 L_2` with :math:`L_1 = B` (m×r), :math:`L_2 = A` (r×n), scale 1.
    :meth:`from_weight` runs :func:`lowrank_theory.linalg.lowrank_plus_quantized` (Guo et al.,
    Alg. 1: :math:`L \leftarrow \operatorname{SVD}_r(W_0 - Q)`,
    :math:`Q \leftarrow \operatorname{quantize}(W_0 - L)`, keeping the best iterate), sets
    :math:`L_1 = U_r\Sigma_r^{1/2}`, :math:`L_2 = \Sigma_r^{1/2}V_r^\top`, and returns the
    dequantized :math:`Q` as the new base weight.  The adapted layer then computes
    :math:`(Q + L_1L_2)x + b_0`, which differs from the original layer by
    :math:`\|E\|_F = \|W_0 - Q - L_1L_2\|_F` = ``decomposition_errors[-1]`` at most per unit input.

    :meth:`from_weight` returns ``Q`` dequantized (the values are exactly the code book times the block
    scales).  ``inject(..., "lq_lora", quantize_base="nf4")`` stores it packed, as the
    :class:`~lowrank_theory.adapters.quantized_base.QuantizedLinear` base of the layer (the same codes:
    the packing reproduces ``Q`` bit for bit in float32/float64), so the factors correct exactly the
    quantization error of the stored base; with ``quantize_base="int8"`` use ``quantizer="uniform",
    bits=8``.  ``identity_at_init`` is False: after :meth:`from_weight`, :math:`\Delta W = L_1L_2 \ne 0`
    (the *layer* is unchanged up to :math:`E`).  Not done: the paper's Fisher-weighted decomposition and
    its mixed-precision (ILP) bit allocation.  Trainable: :math:`r(m+n)`.

    References
    ----------
    H. Guo, P. Greengard, E. P. Xing, Y. Kim, "LQ-LoRA: Low-rank plus Quantized Matrix
    Decomposition for Efficient Language Model Finetuning", arXiv:2311.12023.
    """

    index_entry = adapter_entry(
        "lq_lora",
        Paper(
            "LQ-LoRA: Low-rank plus Quantized Matrix Decomposition for Efficient Language Model Finetuning",
            "2311.12023"),
        "rank * (d_out + d_in)",
        ("tests/adapters/test_sparse_quantized.py",),
        proofs=("proofs/02-randomized-range-finder.md",),
        peft="none (peft.LoftQConfig is a related, different initialization)",
    )

    name = "lq_lora"
    identity_at_init = False
    #: The base weight from_weight returns is already quantized (inject packs it without a second rounding).
    quantizes_base = True
    params = schema(
        rank=Int(1),
        bits=Int(2, 8, doc="bits of the quantized part (4 for nf4)"),
        quantizer=Choice(*_QUANTIZERS, doc="NF4 code book or uniform levels"),
        iters=Int(1, doc="alternating iterations of the decomposition"),
        block_size=Int(1, doc="entries per absmax block"),
        dropout=Float(0.0, 1.0, high_open=True),
        seed=Seed(none_ok=True, doc="seed of the trainable init of create() without a weight"),
    )

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        bits: int = 4,
        quantizer: str = "nf4",
        iters: int = 10,
        block_size: int = 64,
        dropout: float = 0.0,
        seed: int | None = 0,
    ) -> None:
        if quantizer == "nf4" and bits != 4:
            raise ValueError(f"bits must be 4 for quantizer='nf4', got {bits}")
        super().__init__(d_out, d_in, rank=rank, alpha=float(rank), dropout=dropout, seed=seed)
        #: Frobenius errors of the decomposition's iterates (set by :meth:`from_weight`).
        self.decomposition_errors: tuple[float, ...] = ()

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 8, **_: Any) -> int:
        return rank * (d_out + d_in)

    @classmethod
    def from_weight(cls, W: torch.Tensor, rank: int = 8, **cfg: Any) -> tuple[LQLoRA, torch.Tensor]:
        r"""Split ``W`` (m, n) as :math:`Q + L_1L_2`; return ``(adapter, Q)``.

        Parameters
        ----------
        W : Tensor, shape (m, n)
            The frozen weight (finite; half precision is decomposed in float32).
        rank : int
            r.
        **cfg
            ``bits``, ``quantizer``, ``iters``, ``block_size``, ``dropout`` as in the class.

        Returns
        -------
        adapter : LQLoRA
            With :math:`L_1, L_2` set, in ``W``'s dtype and device, and ``decomposition_errors``.
        Q : Tensor, shape (m, n)
            Dequantized base weight to write into the layer, ``W``'s dtype.

        Raises
        ------
        TypeError, ValueError
            If ``W`` is not a finite floating 2-D tensor or a config value is invalid.
        """
        check_weight(W, "W")
        if W.ndim != 2:
            raise ValueError(f"W must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
        m, n = W.shape
        ad = cls(m, n, rank=rank, **cfg)
        c = ad._config
        work = W.detach() if W.dtype in (torch.float32, torch.float64) else W.detach().float()
        res = lowrank_plus_quantized(
            work, rank, c["bits"], c["iters"], quantizer=c["quantizer"], block_size=c["block_size"]
        )
        ad = ad.to(device=W.device, dtype=W.dtype)
        with torch.no_grad():
            ad.B.copy_(res.B)
            ad.A.copy_(res.A)
        ad.decomposition_errors = tuple(float(e) for e in res.errors)
        return ad, res.Q.to(W.dtype)
