"""Low-rank family: ΔW = s·B·A and the methods that keep that factored form.

This module holds LoRA (and rsLoRA's scale), the SVD-initialised PiSSA and MiLoRA,
Block-LoRA (one shared down-projection), Comp-LoRA (update kept in the complement of
W0's top singular subspace) and S2-LoRA (factors shared by all layers, per-layer
coefficients).  Each class documents its math; the forward pass always applies the
factors to the activations (``(x Aᵀ) Bᵀ``, cost ``r(m+n)`` per token) and never forms
the m×n product.  The adaptive-rank methods (AdaLoRA, SoRA) live in
:mod:`.adaptive_rank`, LoRA-Squeeze in :mod:`.squeeze`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..linalg import complement_projector, randomized_svd, truncated_svd
from .base import Adapter, check_rank, check_weight
from .fused import lora_linear
from .registry import register

__all__ = ["BlockLoRA", "CompLoRA", "LoRA", "MiLoRA", "PiSSA", "S2LoRA", "S2LoRAShared", "coefficient_l1_penalty"]


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """LoRA's scale ``α/r`` (Hu et al. 2021) or rsLoRA's ``α/√r`` (Kalajdzievski 2023)."""
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@register
class LoRA(Adapter):
    r"""LoRA: :math:`\Delta W = s\,BA`, :math:`B \in \mathbb{R}^{m\times r}`, :math:`A \in \mathbb{R}^{r\times n}`.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int
        r, with ``1 <= r <= min(m, n)``.
    alpha : float, default ``rank``
        Scale numerator; :math:`s = \alpha / r` (or :math:`\alpha/\sqrt r` with ``rslora``).
    rslora : bool
        Use rsLoRA's rank-stabilized scale.
    dropout : float
        Dropout probability applied to the input of the update only (as in the paper's code).
    seed : int, optional
        Seed of A's init (Kaiming-uniform, as in PEFT); B = 0 so ΔW = 0 at init.

    Notes
    -----
    Forward: :math:`x \mapsto s\,(x A^\top) B^\top` in :math:`O(r(m+n))` per token.
    Trainable count: :math:`r(m+n)`.

    References
    ----------
    E. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
    D. Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv:2312.03732.
    """

    name = "lora"

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        alpha: float | None = None,
        rslora: bool = False,
        dropout: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        alpha = float(rank if alpha is None else alpha)
        self.rank = rank
        self.scale = lora_scale(alpha, rank, rslora)
        self._config = dict(rank=rank, alpha=alpha, rslora=rslora, dropout=dropout, seed=seed)
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on (r, n) gives U(-1/sqrt(n), 1/sqrt(n))
        with torch.no_grad():
            self.A.copy_(torch.rand(rank, d_in, generator=g) * 2 * bound - bound)

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 8, **_: Any) -> int:
        return rank * (d_out + d_in)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * (self.B @ self.A)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return self.scale * ((self.dropout(x) @ self.A.T) @ self.B.T)

    def fused_output(
        self, x: torch.Tensor, base_weight: torch.Tensor, base_bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """``x W0ᵀ + b + s (x Aᵀ) Bᵀ`` by :func:`~lowrank_theory.adapters.fused.lora_linear`.

        Used when the update is plain ``s·B·A`` (this class, not a subclass that changes
        :meth:`forward`), dropout is inactive, the frozen weight and bias need no gradient and every
        tensor shares one dtype and device; None otherwise (the unfused path runs).
        """
        if type(self).forward is not LoRA.forward or (self.training and not isinstance(self.dropout, nn.Identity)):
            return None
        tensors = [x, base_weight, self.A, self.B] + ([base_bias] if base_bias is not None else [])
        if base_weight.requires_grad or (base_bias is not None and base_bias.requires_grad):
            return None
        if len({(t.dtype, t.device) for t in tensors}) != 1:
            return None
        self._check_input(x)
        return lora_linear(x, base_weight, base_bias, self.A, self.B, self.scale)


# ----------------------------------------------------------------------------- helpers
def _check_dropout(dropout: float) -> nn.Module:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return nn.Dropout(dropout) if dropout > 0 else nn.Identity()


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


def _kaiming_rows(rows: int, d_in: int, g: torch.Generator | None) -> torch.Tensor:
    """LoRA's down-projection init: U(−1/√n, 1/√n), what ``kaiming_uniform_(a=√5)`` gives for (r, n)."""
    bound = 1.0 / math.sqrt(d_in)
    return torch.rand(rows, d_in, generator=g) * 2 * bound - bound


def _check_matrix_weight(W: torch.Tensor, name: str = "W") -> tuple[int, int]:
    check_weight(W, name)
    if W.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (d_out, d_in) weight, got shape {tuple(W.shape)}")
    return int(W.shape[0]), int(W.shape[1])


# ----------------------------------------------------------------------------- PiSSA / MiLoRA
@register
class PiSSA(LoRA):
    r"""PiSSA: a LoRA whose factors start as the *principal* singular pairs of :math:`W_0`.

    Build it with :meth:`from_weight`; the constructor alone (``create("pissa", ...)``) gives
    an empty shell with LoRA's init (:math:`B = 0`, so :math:`\Delta W = 0`), meant to receive
    a checkpoint by ``load_state_dict`` -- the residual base weight then comes from the same
    checkpoint.  Parameters are those of :class:`LoRA`.

    Notes
    -----
    With the SVD :math:`W_0 = \sum_i \sigma_i u_i v_i^\top` and the kept index set
    :math:`K` (the top :math:`r` for PiSSA),

    .. math::
        B = U_K (\Sigma_K / s)^{1/2}, \qquad A = (\Sigma_K / s)^{1/2} V_K^\top, \qquad
        W_{\mathrm{res}} = W_0 - s\,BA = \sum_{i \notin K} \sigma_i u_i v_i^\top ,

    so :math:`s\,BA = U_K\Sigma_K V_K^\top` and the adapted layer equals the original one at
    init although :math:`\Delta W \ne 0`.  The paper writes :math:`B = U_r S_r^{1/2}`,
    :math:`A = S_r^{1/2}V_r^\top` (scale 1); dividing :math:`\Sigma_K` by the LoRA scale
    :math:`s` is what PEFT's ``init_lora_weights="pissa"`` does (checked in its source) and
    keeps the residual equal to the discarded singular components for every ``alpha``.
    The residual is computed as :math:`W_0 - s\,BA` in float32 or better, so the layer output
    is preserved to round-off, then cast to :math:`W_0`'s dtype.

    References
    ----------
    F. Meng, Z. Wang, M. Zhang, "PiSSA: Principal Singular Values and Singular Vectors
    Adaptation of Large Language Models", arXiv:2404.02948.
    """

    name = "pissa"

    @classmethod
    def _triplets(cls, W: torch.Tensor, rank: int, n_iter: int | None, seed: int | None):
        if n_iter is None:
            return truncated_svd(W, rank)
        return randomized_svd(W, rank, n_iter=n_iter, seed=seed)

    @classmethod
    def from_weight(
        cls,
        W: torch.Tensor,
        rank: int = 8,
        alpha: float | None = None,
        rslora: bool = False,
        dropout: float = 0.0,
        *,
        n_iter: int | None = None,
        seed: int | None = None,
    ) -> tuple[LoRA, torch.Tensor]:
        """Initialise from the frozen weight; return ``(adapter, residual_base_weight)``.

        Parameters
        ----------
        W : torch.Tensor, shape (d_out, d_in)
            The frozen weight :math:`W_0` (finite, floating).
        rank, alpha, rslora, dropout
            As for :class:`LoRA`; the scale :math:`s` must be positive.
        n_iter : int, optional
            PiSSA only: use :func:`~lowrank_theory.linalg.randomized_svd` with this many power
            iterations (PEFT's ``pissa_niter_k``) instead of the exact truncated SVD.
        seed : int, optional
            Seed of the randomized SVD's sketch.

        Returns
        -------
        adapter : PiSSA or MiLoRA
            On ``W``'s device, in float32 or better (``W``'s dtype promoted with float32).
        residual : torch.Tensor, shape (d_out, d_in)
            :math:`W_0 - s\\,BA`, in ``W``'s dtype: the new frozen base weight.

        Raises
        ------
        TypeError
            If ``W`` is not a floating tensor.
        ValueError
            If ``W`` is not 2-D or holds NaN/Inf, ``rank`` is out of range, or the scale is not positive.
        """
        d_out, d_in = _check_matrix_weight(W)
        adapter = cls(d_out, d_in, rank=rank, alpha=alpha, rslora=rslora, dropout=dropout, seed=seed)
        if not adapter.scale > 0:
            raise ValueError(f"alpha must be positive to split singular values into B and A, got {alpha}")
        acc = torch.promote_types(W.dtype, torch.float32)
        W_acc = W.detach().to(acc)
        U, S, Vh = cls._triplets(W_acc, rank, n_iter, seed)
        root = torch.sqrt(S / adapter.scale)
        adapter = adapter.to(device=W.device, dtype=acc)
        with torch.no_grad():
            adapter.B.copy_(U * root)
            adapter.A.copy_(root[:, None] * Vh)
            residual = (W_acc - adapter.scale * (adapter.B @ adapter.A)).to(W.dtype)
        return adapter, residual


@register
class MiLoRA(PiSSA):
    r"""MiLoRA: like :class:`PiSSA` but with the *minor* (smallest) :math:`r` singular pairs.

    The factors start as :math:`B = U_K(\Sigma_K/s)^{1/2}`, :math:`A = (\Sigma_K/s)^{1/2}V_K^\top`
    with :math:`K` the indices of the :math:`r` smallest singular values, and the frozen base
    becomes :math:`W_0 - s\,BA`, the principal part.  The idea: fine-tuning in the minor
    directions disturbs the pretrained knowledge, held by the principal ones, the least.
    ``n_iter`` is refused: a randomized range finder captures the largest singular values,
    not the smallest, so the full SVD (:func:`~lowrank_theory.linalg.truncated_svd` at full
    rank) is used.

    References
    ----------
    H. Wang et al., "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient
    LLM Finetuning", arXiv:2406.09044.
    """

    name = "milora"

    @classmethod
    def _triplets(cls, W: torch.Tensor, rank: int, n_iter: int | None, seed: int | None):
        if n_iter is not None:
            raise ValueError("n_iter must be None for MiLoRA: randomized SVD finds the largest singular values")
        U, S, Vh = truncated_svd(W, min(W.shape))
        return U[:, -rank:], S[-rank:], Vh[-rank:]


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

    name = "block_lora"

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        num_blocks: int = 2,
        alpha: float | None = None,
        dropout: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if rank % num_blocks:
            raise ValueError(f"num_blocks must divide rank, got rank={rank}, num_blocks={num_blocks}")
        alpha = float(rank if alpha is None else alpha)
        self.rank, self.num_blocks, self.block_rank = rank, num_blocks, rank // num_blocks
        self.scale = lora_scale(alpha, rank, False)
        self.dropout = _check_dropout(dropout)
        self._config = dict(rank=rank, num_blocks=num_blocks, alpha=alpha, dropout=dropout, seed=seed)
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

    name = "comp_lora"

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        alpha: float | None = None,
        rslora: bool = False,
        dropout: float = 0.0,
        seed: int | None = None,
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
        alpha = float(rank if alpha is None else alpha)
        self.rank, self.k = rank, int(basis.shape[1])
        self.scale = lora_scale(alpha, rank, rslora)
        self.dropout = _check_dropout(dropout)
        self._config = dict(rank=rank, alpha=alpha, rslora=rslora, dropout=dropout, seed=seed)
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

    def __init__(self, d_out: int, d_in: int, rank: int = 8, seed: int | None = None) -> None:
        super().__init__()
        check_rank(rank, d_out, d_in)
        g = _generator(seed)
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

    name = "s2_lora"

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        shared: S2LoRAShared | None = None,
        alpha: float | None = None,
        dropout: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        if shared is None:
            shared = S2LoRAShared(d_out, d_in, rank, seed)
        elif not isinstance(shared, S2LoRAShared):
            raise TypeError(f"shared must be an S2LoRAShared, got {type(shared).__name__}")
        elif (shared.d_out, shared.d_in, shared.rank) != (d_out, d_in, rank):
            raise ValueError(
                f"shared must be sized (d_out, d_in, rank)=({d_out}, {d_in}, {rank}), "
                f"got ({shared.d_out}, {shared.d_in}, {shared.rank})"
            )
        alpha = float(rank if alpha is None else alpha)
        self.rank = rank
        self.scale = lora_scale(alpha, rank, False)
        self.dropout = _check_dropout(dropout)
        self._config = dict(rank=rank, alpha=alpha, dropout=dropout, seed=seed)
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
