r"""LoLDU: an adapter on the frozen factors of the LDU decomposition of the pretrained weight.

:func:`lowrank_theory.linalg.ldu` gives :math:`W_0 = P L \operatorname{diag}(D) U`; LoLDU keeps
r columns of :math:`PL` and r rows of :math:`U` frozen and trains only a diagonal and a scalar,
:math:`\Delta W = \sigma\,(PL_r)\operatorname{diag}(z)\,U_r` -- :math:`r + 1` numbers per layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..linalg import derive_seed, ldu, random_basis
from ..method_index import Paper, adapter_entry
from .base import Adapter, check_rank, check_sizes
from .params import Float, Int, Seed, schema
from .registry import register
from .svd_based import check_matrix_weight

__all__ = ["LOLDU_INITS", "LoLDU"]

#: ``"ldu"``: z = D_r and the base becomes the residual (the paper's default); ``"zeros"``: z = 0.
LOLDU_INITS = ("ldu", "zeros")


def _leading_ldu(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P L[:, :r], D[:r], U[:r])`` of the pivoted LDU of W, computed in float32 or better."""
    acc = torch.promote_types(W.dtype, torch.float32)
    P, L, D, U = ldu(W.detach().to(acc))
    return P @ L[:, :rank], D[:rank], U[:rank]


@register
class LoLDU(Adapter):
    r"""LoLDU: :math:`\Delta W = \sigma\,(PL_r)\operatorname{diag}(z)\,U_r` with frozen LDU factors of :math:`W_0`.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int, default 8
        r, ``1 <= r <= min(m, n)``.
    alpha : float, default 1.0
        Initial scale :math:`\sigma_0 = \alpha / r` (the reference code's ``lora_alpha / rank``
        with its default ``lora_alpha = 1``); :math:`\sigma` is then trained.
    seed : int, default 0
        Without a weight (``create``), the frozen factors are those of the LDU of a seeded
        Gaussian matrix and z = 0; :meth:`from_weight` replaces them by :math:`W_0`'s.

    Notes
    -----
    With the partially pivoted :math:`W_0 = P L \operatorname{diag}(D) U`
    (:math:`L` unit lower-trapezoidal, :math:`|L_{ij}| \le 1`, :math:`U` unit upper-trapezoidal,
    k = min(m, n)):

    .. math:: \Delta W = \sigma \,(P L_{:, :r}) \operatorname{diag}(z)\, U_{:r, :},
       \qquad \text{trainable } z \in \mathbb R^r,\ \sigma \in \mathbb R .

    **Reading of the paper, checked against the authors' code** (``minloldu/loldu.py``):

    * *which slice* -- the **first** r columns of L and first r rows of U, in the elimination
      (pivot) order of ``torch.linalg.lu``; there is no re-ordering by pivot magnitude;
    * *init of z* -- ``init_method="lu"`` (the default) sets :math:`z = D_{:r}`, the leading
      pivots; ``"zeros"``, ``"ones"``, uniform and normal variants are ablations;
    * *scale* -- :math:`\sigma` is a trainable scalar initialised to ``lora_alpha / rank``;
    * *identity at init* -- the pretrained weight is re-expressed: the base becomes the residual
      :math:`W_{\mathrm{res}} = W_0 - \sigma_0 P L_r \operatorname{diag}(D_r) U_r`, so
      :math:`W_{\mathrm{res}} + \Delta W = W_0` at init although :math:`\Delta W \ne 0`.

    :meth:`from_weight` does exactly that with ``init="ldu"``; ``init="zeros"`` keeps :math:`W_0`
    and starts from :math:`z = 0` (then :math:`\Delta W = 0`; the gradient of z is
    :math:`\sigma\operatorname{diag}((PL_r)^\top G U_r^\top) \ne 0`, that of :math:`\sigma` is zero
    until z moves).  :math:`PL_r` is stored as one m×r matrix (the rows of :math:`L_r` permuted),
    never the m×m permutation.

    Forward: :math:`x \mapsto \sigma\,((xU_r^\top)\odot z)(PL_r)^\top`, :math:`O(r(m+n))` per token.
    Trainable: :math:`r + 1`.  Frozen factors are persistent buffers (they encode :math:`W_0`).

    References
    ----------
    Y. Shi, J. Wei, Y. Wu, R. Ran, C. Sun, S. He, Y. Yang, "LoLDU: Low-Rank Adaptation via
    Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning", arXiv:2410.13618.
    """

    index_entry = adapter_entry(
        "loldu",
        Paper(
            "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning",
            "2410.13618"),
        "rank + 1",
        ("tests/adapters/test_ldu_adapter.py",),
        proofs=("proofs/12-ldu-leading-minors.md",),
        notebooks=("notebooks/01_expressivity.py",),
    )

    name = "loldu"
    params = schema(rank=Int(1), alpha=Float(doc="sigma starts at alpha / rank"),
              seed=Seed(doc="seed of the frozen Gaussian factored by create() without a weight"))

    def __init__(self, d_out: int, d_in: int, rank: int = 8, alpha: float = 1.0, seed: int = 0) -> None:
        check_rank(rank, *check_sizes(d_out, d_in))
        super().__init__(d_out, d_in)
        self.rank = rank
        G = torch.from_numpy(random_basis((d_out, d_in), "gaussian", seed=derive_seed(seed, "loldu")))
        PL, _, U = _leading_ldu(G, rank)
        dt = torch.get_default_dtype()
        self.register_buffer("PL", PL.to(dt))  # (m, r): P @ L[:, :r]
        self.register_buffer("U", U.to(dt))  # (r, n)
        self.z = nn.Parameter(torch.zeros(rank))
        self.sigma = nn.Parameter(torch.tensor(alpha / rank))

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 8, **_: Any) -> int:
        return rank + 1

    @classmethod
    def from_weight(
        cls, W: torch.Tensor, rank: int = 8, alpha: float = 1.0, init: str = "ldu", seed: int = 0
    ) -> tuple[LoLDU, torch.Tensor]:
        r"""LoLDU for the frozen weight ``W``.

        Parameters
        ----------
        W : torch.Tensor, shape (d_out, d_in)
            The frozen weight, finite, floating (factored in float32 or better).
        rank, alpha, seed
            As in the class.
        init : {"ldu", "zeros"}, default "ldu"
            ``"ldu"``: :math:`z = D_{:r}` and the returned base is the residual
            :math:`W - \sigma_0 PL_r\operatorname{diag}(D_r)U_r` (the paper); ``"zeros"``:
            :math:`z = 0` and ``W`` is returned unchanged.

        Returns
        -------
        adapter : LoLDU
            In ``W``'s dtype and device.
        base_weight : torch.Tensor, shape (d_out, d_in)
            The weight the adapter is added to; base + ΔW equals ``W`` at init in both modes.

        Raises
        ------
        TypeError, ValueError
            If ``W`` is not a finite floating 2-D tensor, ``rank`` is out of range, ``init`` is
            unknown, or ``W`` has no LDU factorization (see :func:`lowrank_theory.linalg.ldu`).
        """
        check_matrix_weight(W, "W")
        if init not in LOLDU_INITS:
            raise ValueError(f"init must be one of {LOLDU_INITS}, got {init!r}")
        ad = cls(W.shape[0], W.shape[1], rank=rank, alpha=alpha, seed=seed).to(device=W.device, dtype=W.dtype)
        PL, D, U = _leading_ldu(W, rank)
        with torch.no_grad():
            ad.sigma.fill_(float(alpha) / rank)  # exact in W's dtype (not a rounded default-dtype value)
            ad.PL = PL.to(W.dtype).contiguous()
            ad.U = U.to(W.dtype).contiguous()
            if init == "zeros":
                return ad, W
            ad.z.copy_(D.to(W.dtype))
            acc = torch.promote_types(W.dtype, torch.float32)
            residual = W.detach().to(acc) - float(ad.sigma) * (PL * D) @ U
        return ad, residual.to(W.dtype)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.sigma * ((self.PL * self.z) @ self.U)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return self.sigma * (((x @ self.U.T) * self.z) @ self.PL.T)
