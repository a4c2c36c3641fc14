r"""SNELLA: a sparse update taken from a kernelized low-rank merge, :math:`\Delta W = \operatorname{top}_k(M)`.

Two low-rank factors per head h, :math:`B_h \in \mathbb R^{m \times q/H}` (outputs) and
:math:`A_h \in \mathbb R^{n \times q/H}` (inputs), are merged by a non-linear kernel instead of LoRA's inner product:

.. math::
    K_{ij} = \sum_{h=0}^{H-1} c\,(-1)^h\,\|B_{h,i} - A_{h,j}\|_2, \qquad
    M = K + a \cdot \operatorname{softmax}_i(K / \gamma) + b,

(the softmax over the outputs i of each input column j), and only the k entries of largest :math:`|M|` are kept,
:math:`\Delta W = M \odot \mathbb 1[(i,j) \in \operatorname{top}_k |M|]` -- the competition *inside* a layer.  How
many entries each layer keeps is the competition *across* layers,
:mod:`lowrank_theory.training.bilevel_sparsity`.  The Euclidean-distance kernel makes :math:`K` full rank in
general (a matrix of squared distances has rank at most q/H + 2 per head), so the sparse update is not tied
to a rank-q subspace.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..linalg import derive_seed
from ..method_index import Paper, adapter_entry
from .base import Adapter, check_rank
from .params import Choice, Float, Int, Seed, schema
from .registry import register

__all__ = ["SNELLA", "keep_count", "kernel_merge"]


def keep_count(d_out: int, d_in: int, density: float) -> int:
    """Entries a layer keeps: ``round(density * m * n)`` (so ``density = k/(m n)`` gives back k exactly)."""
    return round(density * d_out * d_in)


def kernel_merge(B: torch.Tensor, A: torch.Tensor, coeff: torch.Tensor, a: torch.Tensor, gamma: torch.Tensor,
                 b: torch.Tensor, kernel: str = "mixed") -> torch.Tensor:
    r"""The merged matrix M (m, n) from heads ``B`` (H, m, d), ``A`` (H, n, d) and per-head weights ``coeff`` (H,).

    ``kernel="mixed"`` is SNELLA's :math:`K + a\,\operatorname{softmax}_i(K/\gamma) + b`; ``"distance"`` is
    :math:`K` alone (SNELL's kernelized LoRA).
    """
    dist = torch.cdist(B, A)  # (H, m, n): ||B_{h,i} - A_{h,j}||_2
    K = (coeff.view(-1, 1, 1) * dist).sum(0)
    if kernel == "distance":
        return K
    return K + a * torch.softmax(K / gamma, dim=0) + b


@register
class SNELLA(Adapter):
    r"""SNELLA: :math:`\Delta W = M \odot \mathbb 1[\operatorname{top}_k |M|]`, M a kernel merge of low-rank factors.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int, default 8
        q, the total width of the factors (the authors' ``q_dim``, 8/16/32 in their scripts), split over
        ``heads``; must be a multiple of ``heads`` and at most min(m, n).
    heads : int, default 2
        H (the authors' ``num_Hs``); head h enters K with weight :math:`c(-1)^h`.
    density : float, default 0.1
        Fraction of the m·n entries kept, :math:`k = \operatorname{round}(\text{density} \cdot mn)`; the
        bi-level allocation sets it per layer during training (:meth:`set_keep`).
    coeff : float, default 0.1
        c (the authors' ``SCALE_FACTOR_fc``).
    kernel : {"mixed", "distance"}, default "mixed"
        SNELLA's merge with the softmax term (trainable a, γ, b) or SNELL's distance kernel alone (no a, γ, b).
    weighting : {"mask", "magnitude"}, default "mask"
        ``"mask"``: :math:`\Delta W = M \odot \mathbb 1[\text{kept}]`.  ``"magnitude"``: what the authors' code
        computes, :math:`M \odot \operatorname{sg}(|M|) \odot \mathbb 1[\text{kept}]` (``F.threshold`` of the
        detached :math:`|M|` used as a multiplier); its gradient treats :math:`|M|` as a constant, so the
        instance sets ``exact_gradient = False``.
    seed : int, default 0
        Seed of the factors' init.

    Raises
    ------
    TypeError, ValueError
        ``rank`` not a multiple of ``heads`` or out of range, ``density`` not in [0, 1], unknown choices.

    Notes
    -----
    Init as the authors': :math:`A, B` Kaiming-uniform (PyTorch's ``a = \sqrt 5`` rule, drawn from ``seed``),
    :math:`a = \gamma = 1`, :math:`b = 0`.  So :math:`\Delta W \ne 0` at init and ``identity_at_init`` is False:
    the authors' SNELLA starts off the pre-trained layer (K of random points is not 0).  The top-k is taken on
    the detached :math:`|M|` with ties broken by the lower flat index (a stable sort), so the mask is a constant
    in backward and the gradient flows to the kept entries of M.  Forward: :math:`x \Delta W^\top` with a dense
    ΔW -- the top-k needs every entry of M, so there is no cheaper product; the method's saving is that the
    optimizer holds :math:`q(m+n) + 3` numbers, not a masked m×n weight.  Trainable:
    :math:`q(m+n) + 3` (``kernel="mixed"``) or :math:`q(m+n)`.

    What was read, and from where: the abstract (``shared/seeds``) and the opening of the paper (arXiv:2510.24037,
    its HTML version via the search tool), a third-party summary of its Section 3 (ΔW as a kernel of the rows of
    A and B), and the authors' code (github.com/ssfgunner/SNELL: ``model/vision_transformer_timm.py``, classes
    ``SNELL``/``SNELLA``/``KLoRA``/``MixK``; ``sparse_allocator.py``, the layer allocation).  The formulas above
    are the code's; the paper's full method section was not readable here.

    References
    ----------
    S. Shen, J. Sun, S. Wang, Q. Huang, "Kernelized Sparse Fine-Tuning with Bi-level Parameter Competition for
    Vision Models", arXiv:2510.24037.  S. Shen et al., "Expanding Sparse Tuning for Low Memory Usage" (SNELL),
    NeurIPS 2024, arXiv:2411.01800.
    """

    index_entry = adapter_entry(
        "snella",
        Paper("Kernelized Sparse Fine-Tuning with Bi-level Parameter Competition for Vision Models", "2510.24037"),
        "rank * (d_out + d_in) + 3",
        ("tests/adapters/test_kernel_sparse.py",),
        peft="none",
    )

    name = "snella"
    identity_at_init = False
    params = schema(
        rank=Int(1, doc="q, total width of the factors over all heads"),
        heads=Int(1, doc="H, kernel heads with weights c(-1)^h"),
        density=Float(0.0, 1.0, doc="fraction of the m*n entries kept (top-|M|)"),
        coeff=Float(doc="c, the head weight scale"),
        kernel=Choice("mixed", "distance", doc="SNELLA's softmax-mixed kernel or SNELL's distance kernel"),
        weighting=Choice("mask", "magnitude", doc="kept entries as M, or as M*|M| (the authors' code)"),
        seed=Seed(doc="seed of the factors' init"),
    )

    def __init__(self, d_out: int, d_in: int, rank: int = 8, heads: int = 2, density: float = 0.1,
                 coeff: float = 0.1, kernel: str = "mixed", weighting: str = "mask", seed: int = 0) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        if rank % heads:
            raise ValueError(f"rank must be a multiple of heads={heads}, got rank={rank}")
        self.rank, self.heads, self.kernel, self.weighting = rank, heads, kernel, weighting
        d = rank // heads
        g = torch.Generator().manual_seed(derive_seed(seed, "snella"))
        # Kaiming-uniform with a = sqrt(5) on a (.., fan_in = d) tensor: U(-1/sqrt(d), 1/sqrt(d))
        bound = 1.0 / math.sqrt(d)
        self.A = nn.Parameter((torch.rand(heads, d_in, d, generator=g) * 2 - 1) * bound)
        self.B = nn.Parameter((torch.rand(heads, d_out, d, generator=g) * 2 - 1) * bound)
        self.coeff = coeff
        if kernel == "mixed":
            self.a = nn.Parameter(torch.ones(()))
            self.gamma = nn.Parameter(torch.ones(()))
            self.b = nn.Parameter(torch.zeros(()))
        self.keep = keep_count(d_out, d_in, density)
        self.exact_gradient = weighting == "mask"

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 8, kernel: str = "mixed", **_: Any) -> int:
        return rank * (d_out + d_in) + (3 if kernel == "mixed" else 0)

    def set_keep(self, k: int) -> None:
        """Keep the k entries of largest |M| from now on (``0 <= k <= m n``); ``config()`` follows."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if not 0 <= k <= self.d_out * self.d_in:
            raise ValueError(f"k must be in [0, {self.d_out * self.d_in}], got {k}")
        self.keep = k
        self._config["density"] = k / (self.d_out * self.d_in)

    def merged_matrix(self) -> torch.Tensor:
        """M (m, n) before sparsification, computed in float32 or wider (``cdist`` has no half-precision CPU kernel;
        half-precision factors are used at their exact values)."""
        wd = torch.promote_types(self.A.dtype, torch.float32)
        A, B = self.A.to(wd), self.B.to(wd)
        c = self.coeff * torch.tensor([(-1.0) ** h for h in range(self.heads)], dtype=wd, device=A.device)
        if self.kernel == "mixed":
            return kernel_merge(B, A, c, self.a.to(wd), self.gamma.to(wd), self.b.to(wd), "mixed")
        z = torch.zeros((), dtype=wd, device=A.device)
        return kernel_merge(B, A, c, z, z, z, "distance")

    def keep_mask(self, M: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean (m, n) mask of the k entries of largest |M| (ties: the lower flat index)."""
        M = self.merged_matrix() if M is None else M
        flat = M.detach().abs().reshape(-1)
        N, k = flat.numel(), self.keep
        if k == 0 or k == N:
            return torch.full_like(M, k == N, dtype=torch.bool)
        # The k-th largest |M| by selection (O(N), not a sort): every entry above it is kept, and of the entries
        # equal to it the first (k - #above) in flat order -- the first k of a stable descending sort.
        tau = torch.kthvalue(flat, N - k + 1).values
        above, tied = flat > tau, flat == tau
        need = k - above.sum()
        return (above | (tied & (tied.cumsum(0) <= need))).view_as(M)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        M = self.merged_matrix()
        mask = self.keep_mask(M)
        if self.weighting == "magnitude":
            return M * (M.detach().abs() * mask)
        return M * mask

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return x @ self.delta_weight().to(x.dtype).T

    def importance(self) -> dict[str, torch.Tensor]:
        r""":math:`|\theta \odot \nabla_\theta L|` of the factors A and B (after a backward), the authors' ``ipt``.

        NaNs (the authors guard against them) become 0; a factor without a gradient gives zeros.
        """
        out = {}
        for name in ("A", "B"):
            p = getattr(self, name)
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            out[name] = torch.nan_to_num((p.detach() * g.detach()).abs(), nan=0.0)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keep={self.keep}, kernel={self.kernel}"
