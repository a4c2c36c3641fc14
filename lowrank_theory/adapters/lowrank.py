"""Low-rank family: ΔW = s·B·A and the methods that keep that factored form.

This module holds LoRA (and rsLoRA's scale).  Each class documents its math; the
forward pass always applies the factors to the activations (``(x Aᵀ) Bᵀ``, cost
``r(m+n)`` per token) and never forms the m×n product.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .base import Adapter, check_rank
from .registry import register

__all__ = ["LoRA"]


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
