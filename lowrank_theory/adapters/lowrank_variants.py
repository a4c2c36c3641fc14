r"""Factored variants that share or constrain LoRA's factors.

Block-LoRA (one down-projection shared by k up-projection blocks), Comp-LoRA (the update kept
in the complement of W0's top singular subspace) and S2-LoRA (factors shared by all layers,
sparse per-layer coefficients).  Each class documents its math and paper; the forward pass
applies the factors to the activations and never forms the m×n product.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..linalg import complement_projector, truncated_svd
from ..method_index import Paper, adapter_entry
from .base import Adapter, check_rank, check_weight
from .lowrank import LORA_PARAMS, _check_dropout, _check_matrix_weight, _generator, _kaiming_rows, lora_scale
from .params import Instance, Int, Tensor, schema
from .registry import register

__all__ = ["BlockLoRA", "CompLoRA", "S2LoRA", "S2LoRAShared", "coefficient_l1_penalty"]


# ----------------------------------------------------------------------------- Block-LoRA
@register
class BlockLoRA(Adapter):
    r"""Block-LoRA: :math:`\Delta W = s\,[B_1 \cdots B_k]\,[A; \dots; A] = s\,(\textstyle\sum_i B_i)\,A`.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int
        r, the inner dimension of the partitioned LoRA, ``1 <= r <= min(m, n)``.
    num_blocks : int
        k, the number of blocks; must divide r.  Each block has rank :math:`r_b = r/k`.
    alpha : float, default ``rank``
        Scale :math:`s = \alpha / r`.
    dropout : float
        Dropout on the update's input.
    seed : int, optional
        Seed of A's init (LoRA's uniform init); :math:`B = 0` so :math:`\Delta W = 0`.

    Notes
    -----
    The up-projection :math:`B \in \mathbb{R}^{m \times r}` is split column-wise into
    :math:`k` blocks :math:`B_i \in \mathbb{R}^{m \times r/k}` and the down-projection's
    :math:`k` row blocks are all one shared :math:`A \in \mathbb{R}^{r/k \times n}`, so the
    block product collapses to a sum.  Hence :math:`\Delta W` is exactly a LoRA of rank
    :math:`r/k` with up-projection :math:`\sum_i B_i` (the equivalence used in ``proofs/``);
    what differs is the parametrization (and so the training dynamics).  Forward:
    :math:`x \mapsto s\,(xA^\top)(\sum_i B_i)^\top`, the sum costing :math:`O(mr)` per call
    and :math:`r/k\,(m+n)` per token.  Trainable count: :math:`mr + nr/k`.
    Verified against the paper's abstract (partition the LoRA factors into sub-matrices and
    share all down-projection sub-matrices); the init is LoRA's, which the paper builds on.

    References
    ----------
    C. Zhou et al., "One Head Eight Arms: Block Matrix based Low Rank Adaptation for
    CLIP-based Few-Shot Learning", arXiv:2501.16720.
    """

    index_entry = adapter_entry(
        "block_lora",
        Paper(
            "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning",
            "2501.16720"),
        "rank * d_out + (rank // num_blocks) * d_in",
        ("tests/adapters/test_lowrank_family.py",),
        proofs=("proofs/05-block-lora-rank.md",),
    )

    name = "block_lora"
    params = schema(LORA_PARAMS, without=["rslora"], num_blocks=Int(1, doc="k, the number of blocks; must divide rank"))

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        num_blocks: int = 2,
        alpha: float | None = None,
        dropout: float = 0.0,
        seed: int | None = 0,
    ) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        if rank % num_blocks:
            raise ValueError(f"num_blocks must divide rank, got rank={rank}, num_blocks={num_blocks}")
        self.rank, self.num_blocks, self.block_rank = rank, num_blocks, rank // num_blocks
        self.scale = lora_scale(alpha, rank, False)
        self.dropout = _check_dropout(dropout)
        self.A = nn.Parameter(_kaiming_rows(self.block_rank, d_in, _generator(seed)))
        self.B = nn.Parameter(torch.zeros(d_out, rank))

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 8, num_blocks: int = 2, **_: Any) -> int:
        return rank * d_out + (rank // num_blocks) * d_in

    def summed_B(self) -> torch.Tensor:
        """:math:`\\sum_i B_i`, shape (d_out, r/k)."""
        return self.B.reshape(self.d_out, self.num_blocks, self.block_rank).sum(dim=1)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * (self.summed_B() @ self.A)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return self.scale * ((self.dropout(x) @ self.A.T) @ self.summed_B().T)


# ----------------------------------------------------------------------------- Comp-LoRA
@register
class CompLoRA(Adapter):
    r"""Comp-LoRA: :math:`\Delta W = s\,(I - U_k U_k^\top)\,BA`, the update kept off W0's top-k subspace.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int
        r, ``1 <= r <= min(m, n)`` and ``k + r <= m``.
    alpha, rslora, dropout, seed
        As for :class:`LoRA` (:math:`B = 0` at init, so :math:`\Delta W = 0`).
    basis : torch.Tensor, shape (d_out, k), optional
        Orthonormal columns :math:`U_k` spanning the protected subspace; :meth:`from_weight`
        passes the top-:math:`k` left singular vectors of :math:`W_0`.  ``None`` means
        :math:`k = 0` (a plain LoRA).  Held as a non-persistent buffer: it is a function of
        :math:`W_0`, so ``from_weight`` rebuilds it and ``state_dict`` holds only A and B.

    Raises
    ------
    ValueError
        If ``basis`` is not (d_out, k) with orthonormal columns (checked by
        :func:`~lowrank_theory.linalg.complement_projector`), or ``k + rank > d_out``.

    Notes
    -----
    :math:`U_k^\top \Delta W = 0`: the pretrained top-:math:`k` output directions (the most
    informative, whose disturbance causes forgetting) are untouched.  Forward projects the
    *factor*, :math:`x \mapsto s\,(xA^\top)\,(B - U_k(U_k^\top B))^\top`: :math:`O(mkr)` once
    per call plus :math:`r(m+n)` per token -- never the :math:`m\times m` projector.  Rank of
    :math:`\Delta W` is at most :math:`\min(r, m-k)`, hence the check :math:`k + r \le m`.
    The form is the seed abstract's ("optimize the low rank matrix in the complementary
    subspace"); the projector on the left (output side) is our reading, as in ``methods.md``.

    References
    ----------
    Z. Wang et al., "Complementary Subspace Low-Rank Adaptation of Vision-Language Models for
    Few-Shot Classification" (seed abstract in ``shared/seeds``).
    """

    index_entry = adapter_entry(
        "comp_lora",
        Paper("Complementary Subspace Low-Rank Adaptation of Vision-Language Models for Few-Shot Classification"),
        "rank * (d_out + d_in)",
        ("tests/adapters/test_lowrank_family.py",),
    )

    name = "comp_lora"
    params = schema(LORA_PARAMS, basis=Tensor(doc="orthonormal columns U_k (d_out, k) of the protected subspace"))

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        alpha: float | None = None,
        rslora: bool = False,
        dropout: float = 0.0,
        seed: int | None = 0,
        basis: torch.Tensor | None = None,
    ) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        if basis is None:
            basis = torch.zeros(d_out, 0)
        else:
            check_weight(basis, "basis")
            if basis.ndim != 2 or basis.shape[0] != d_out:
                raise ValueError(f"basis must have shape (d_out={d_out}, k), got {tuple(basis.shape)}")
            if basis.shape[1] + rank > d_out:
                raise ValueError(
                    f"k + rank must be at most d_out={d_out} (basis has k={basis.shape[1]} columns, rank={rank})"
                )
            if basis.shape[1] > 0:
                complement_projector(basis.detach().to(torch.promote_types(basis.dtype, torch.float32)))
        self.rank, self.k = rank, int(basis.shape[1])
        self.scale = lora_scale(alpha, rank, rslora)
        self.dropout = _check_dropout(dropout)
        self.A = nn.Parameter(_kaiming_rows(rank, d_in, _generator(seed)))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.register_buffer("U", basis.detach().clone(), persistent=False)

    @classmethod
    def from_weight(
        cls, W: torch.Tensor, rank: int = 8, k: int = 1, **cfg: Any
    ) -> tuple[CompLoRA, torch.Tensor]:
        """Protect the top-``k`` left singular vectors of ``W``; return ``(adapter, W)`` (base unchanged).

        Parameters
        ----------
        W : torch.Tensor, shape (d_out, d_in)
        rank : int
        k : int
            ``1 <= k <= min(d_out, d_in)`` and ``k + rank <= d_out``.
        **cfg
            ``alpha``, ``rslora``, ``dropout``, ``seed`` as in the constructor.
        """
        d_out, d_in = _check_matrix_weight(W)
        check_rank(k, d_out, d_in, "k")
        acc = torch.promote_types(W.dtype, torch.float32)
        U = truncated_svd(W.detach().to(acc), k).U
        adapter = cls(d_out, d_in, rank=rank, basis=U, **cfg)
        return adapter.to(device=W.device, dtype=acc), W

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 8, **_: Any) -> int:
        return rank * (d_out + d_in)

    def projected_B(self) -> torch.Tensor:
        """:math:`(I - U_kU_k^\\top)B` in :math:`O(mkr)`, shape (d_out, r)."""
        U = self.U.to(self.B.dtype)
        return self.B - U @ (U.T @ self.B)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * (self.projected_B() @ self.A)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return self.scale * ((self.dropout(x) @ self.A.T) @ self.projected_B().T)


# ----------------------------------------------------------------------------- S2-LoRA
class S2LoRAShared(nn.Module):
    r"""The factor pair :math:`(B, A)` that every :class:`S2LoRA` layer of one shape shares.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the weights that share it.
    rank : int
        r, ``1 <= r <= min(m, n)``.
    seed : int, optional
        Seed of the init :math:`B, A \sim \mathcal N(0, 0.02^2)` (AdaLoRA's, whose learnable
        rank coefficient S2-LoRA adopts).

    Notes
    -----
    Pass one instance to several :class:`S2LoRA` adapters: it is a submodule of each, so
    ``model.parameters()`` yields its tensors once and a step on them moves every layer.
    """

    def __init__(self, d_out: int, d_in: int, rank: int = 8, seed: int | None = 0) -> None:
        super().__init__()
        check_rank(rank, d_out, d_in)
        g = _generator(LORA_PARAMS["seed"].validate("seed", seed))
        self.d_out, self.d_in, self.rank = d_out, d_in, rank
        self.B = nn.Parameter(0.02 * torch.randn(d_out, rank, generator=g))
        self.A = nn.Parameter(0.02 * torch.randn(rank, d_in, generator=g))

    def extra_repr(self) -> str:
        return f"d_out={self.d_out}, d_in={self.d_in}, rank={self.rank}"


@register
class S2LoRA(Adapter):
    r"""S2-LoRA: :math:`\Delta W_l = s\,B\,\operatorname{diag}(c_l)\,A` with :math:`(B, A)` shared by all layers.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int
        r, ``1 <= r <= min(m, n)``.
    shared : S2LoRAShared, optional
        The shared pair; created (from ``seed``) when absent.  Must be sized (d_out, d_in, rank).
    alpha : float, default ``rank``
        Scale :math:`s = \alpha/r`.
    dropout : float
        Dropout on the update's input.
    seed : int, optional
        Seed of a newly created ``shared``.

    Notes
    -----
    Per layer only the rank coefficients :math:`c_l \in \mathbb{R}^r` are trained (plus the
    shared pair once per model): :math:`r(m+n) + Lr` numbers for :math:`L` layers.
    :math:`c_l = 0` at init, so :math:`\Delta W_l = 0` while :math:`\partial L/\partial c_l`
    is not zero.  Sparsity of :math:`c_l` (the per-layer rank) comes from an L1 term,
    :func:`coefficient_l1_penalty`, added to the loss.  Forward:
    :math:`s\,((xA^\top)\odot c_l)B^\top`, :math:`r(m+n)` per token.  The shared pair is part
    of each adapter's ``state_dict`` (a checkpoint of the model stores it once per tie).
    Verified against the paper's abstract (globally shared factors, per-weight sparse rank
    coefficients); the zero/Gaussian init and the L1 form are our choices, following AdaLoRA.

    References
    ----------
    W. Liu, Y. Qin, Z. Peng, T. Lee, "Sparsely Shared LoRA on Whisper for Child Speech
    Recognition", arXiv:2309.11756.
    """

    index_entry = adapter_entry(
        "s2_lora",
        Paper("Sparsely Shared LoRA on Whisper for Child Speech Recognition", "2309.11756"),
        "rank * (d_out + d_in) + rank",
        ("tests/adapters/test_lowrank_family.py",),
        note="B, A shared by all layers: the count is per layer as if it owned them",
    )

    name = "s2_lora"
    params = schema(LORA_PARAMS, without=["rslora"],
                    shared=Instance(S2LoRAShared, doc="the factor pair shared by all layers"))

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        shared: S2LoRAShared | None = None,
        alpha: float | None = None,
        dropout: float = 0.0,
        seed: int | None = 0,
    ) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        if shared is None:
            shared = S2LoRAShared(d_out, d_in, rank, seed)
        elif (shared.d_out, shared.d_in, shared.rank) != (d_out, d_in, rank):
            raise ValueError(
                f"shared must be sized (d_out, d_in, rank)=({d_out}, {d_in}, {rank}), "
                f"got ({shared.d_out}, {shared.d_in}, {shared.rank})"
            )
        self.rank = rank
        self.scale = lora_scale(alpha, rank, False)
        self.dropout = _check_dropout(dropout)
        self.shared = shared
        self.coef = nn.Parameter(torch.zeros(rank, dtype=shared.A.dtype))

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 8, **_: Any) -> int:
        """Trainable scalars seen from one adapter: the shared pair plus its own coefficients."""
        return rank * (d_out + d_in) + rank

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * ((self.shared.B * self.coef) @ self.shared.A)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return self.scale * (((self.dropout(x) @ self.shared.A.T) * self.coef) @ self.shared.B.T)


def coefficient_l1_penalty(adapters: Any) -> torch.Tensor:
    r"""S2-LoRA's sparsity term :math:`\sum_l \|c_l\|_1` over the given adapters (differentiable).

    Parameters
    ----------
    adapters : iterable of S2LoRA
        The layers whose coefficients are penalized (typically all S2-LoRA layers of a model).

    Returns
    -------
    torch.Tensor
        A scalar; add ``weight * penalty`` to the loss.

    Raises
    ------
    TypeError
        If an element is not an :class:`S2LoRA`.
    ValueError
        If ``adapters`` is empty.
    """
    terms = []
    for ad in adapters:
        if not isinstance(ad, S2LoRA):
            raise TypeError(f"adapters must hold S2LoRA modules, got {type(ad).__name__}")
        terms.append(ad.coef.abs().sum())
    if not terms:
        raise ValueError("adapters must hold at least one S2LoRA module")
    return torch.stack(terms).sum()
