"""Low-rank family: ΔW = s·B·A and the methods that keep that factored form.

This module holds LoRA (and rsLoRA's scale) and the SVD-initialised PiSSA and MiLoRA, plus
the helpers the factored family shares.  Block-LoRA, Comp-LoRA and S2-LoRA live in
:mod:`.lowrank_variants`, the adaptive-rank methods (AdaLoRA, SoRA) in :mod:`.adaptive_rank`,
LoRA-Squeeze in :mod:`.squeeze`.  The forward pass always applies the factors to the
activations (``(x Aᵀ) Bᵀ``, cost ``r(m+n)`` per token) and never forms the m×n product.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..linalg import randomized_svd, truncated_svd
from ..method_index import Paper, adapter_entry
from .base import Adapter, check_rank, check_weight
from .fused import fusable, lora_linear
from .params import Bool, Float, Int, Seed, schema
from .registry import register

__all__ = ["LoRA", "MiLoRA", "PiSSA", "lora_scale"]


_SEED_DOC = "seed of the trainable init; None draws from torch's global RNG"
#: The keywords LoRA-like classes share (rank, scale numerator, dropout, init seed).
LORA_PARAMS = schema(
    rank=Int(1, doc="r, 1 <= r <= min(d_out, d_in)"),
    alpha=Float(none_ok=True, doc="scale numerator; None means alpha = rank"),
    rslora=Bool(doc="rsLoRA's scale alpha / sqrt(r) instead of alpha / r"),
    dropout=Float(0.0, 1.0, high_open=True, doc="dropout probability on the update's input"),
    seed=Seed(none_ok=True, doc=_SEED_DOC),
)


def lora_scale(alpha: float | None, rank: int, rslora: bool) -> float:
    """LoRA's scale ``α/r`` (Hu et al. 2021) or rsLoRA's ``α/√r`` (Kalajdzievski 2023); ``α = r`` when None."""
    alpha = float(rank if alpha is None else alpha)
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
    seed : int or None, default 0
        Seed of A's init (Kaiming-uniform, as in PEFT); B = 0 so ΔW = 0 at init.  The default makes
        two constructions equal; None draws from torch's global generator (``torch.manual_seed``).

    Notes
    -----
    Forward: :math:`x \mapsto s\,(x A^\top) B^\top` in :math:`O(r(m+n))` per token.
    Trainable count: :math:`r(m+n)`.

    References
    ----------
    E. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
    D. Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv:2312.03732.
    """

    index_entry = adapter_entry(
        "lora",
        Paper("LoRA: Low-Rank Adaptation of Large Language Models", "2106.09685"),
        "rank * (d_out + d_in)",
        ("tests/adapters/test_lora.py", "tests/adapters/test_fused.py", "tests/training/test_peft_format.py"),
        proofs=("proofs/01-eckart-young-mirsky.md",),
        notebooks=(
            "notebooks/01_expressivity.py",
            "notebooks/02_loca_regimes.py",
            "notebooks/03_gradient_approximation.py",
            "notebooks/05_computational_limits.py",
            "notebooks/06_lora_squeeze.py",
            "notebooks/07_random_bases.py",
            "notebooks/08_lr_sensitivity.py",
        ),
        peft="peft.LoraConfig (rsLoRA: use_rslora=True)",
        peft_test="tests/training/test_peft_format.py",
        note="rslora=True scales by alpha/sqrt(rank) (rsLoRA, arXiv:2312.03732)",
    )

    name = "lora"
    params = LORA_PARAMS

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        alpha: float | None = None,
        rslora: bool = False,
        dropout: float = 0.0,
        seed: int | None = 0,
    ) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        self.rank = rank
        self.scale = lora_scale(alpha, rank, rslora)
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
        if not fusable(x, base_weight, base_bias, self.A, self.B):
            return None
        self._check_input(x)
        return lora_linear(x, base_weight, base_bias, self.A, self.B, self.scale)


# ----------------------------------------------------------------------------- helpers
def _check_dropout(dropout: float) -> nn.Module:
    """The update's input dropout module (``dropout`` already validated by the class's ``params``)."""
    return nn.Dropout(dropout) if dropout > 0 else nn.Identity()


def _generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with ``seed`` (validated by ``params``), or None for torch's global one."""
    return None if seed is None else torch.Generator().manual_seed(seed)


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

    index_entry = adapter_entry(
        "pissa",
        Paper(
            "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models",
            "2404.02948"),
        "rank * (d_out + d_in)",
        ("tests/adapters/test_lowrank_family.py",),
        proofs=("proofs/01-eckart-young-mirsky.md", "proofs/02-randomized-range-finder.md"),
        notebooks=("notebooks/08_lr_sensitivity.py",),
        peft="peft.LoraConfig(init_lora_weights='pissa')",
        peft_test="tests/adapters/test_lowrank_family.py",
    )

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
        seed: int | None = 0,
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

    index_entry = adapter_entry(
        "milora",
        Paper("MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM Finetuning", "2406.09044"),
        "rank * (d_out + d_in)",
        ("tests/adapters/test_lowrank_family.py",),
        proofs=("proofs/01-eckart-young-mirsky.md", "proofs/02-randomized-range-finder.md"),
    )

    name = "milora"

    @classmethod
    def _triplets(cls, W: torch.Tensor, rank: int, n_iter: int | None, seed: int | None):
        if n_iter is not None:
            raise ValueError("n_iter must be None for MiLoRA: randomized SVD finds the largest singular values")
        U, S, Vh = truncated_svd(W, min(W.shape))
        return U[:, -rank:], S[-rank:], Vh[-rank:]
