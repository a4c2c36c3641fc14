r"""HiRA: Hadamard high-rank adaptation, :math:`\Delta W = W_0 \odot (BA)` -- PEFT's ``HiraConfig``.

HiRA and HUT (:class:`~lowrank_theory.adapters.multiplicative.HUT`) both multiply the frozen weight entrywise by a
low-rank matrix, but they are not the same parametrization:

* HUT (as implemented here): :math:`W' = W_0 \odot (B_{\mathrm{hut}}A_{\mathrm{hut}})`, every one of the r components
  trainable, identity at init through a first component :math:`(\mathbf 1, \mathbf 1)`;
* HiRA: :math:`W' = W_0 + W_0 \odot (BA) = W_0 \odot (\mathbf 1\mathbf 1^\top + BA)`, the all-ones term fixed,
  B = 0 at init (so ΔW = 0), A Kaiming-uniform (PEFT's ``init_weights=True``), no scaling factor.

So HiRA of rank r is HUT of rank r + 1 with its first component frozen at :math:`(\mathbf 1,\mathbf 1)`; HUT of rank
r is HiRA of rank r + 1 with :math:`B = [B_{\mathrm{hut}}, -\mathbf 1]`, :math:`A = [A_{\mathrm{hut}}; \mathbf 1]`
(the exact maps :mod:`~lowrank_theory.training.peft_lora` uses for PEFT files).  Same parameter count r(m + n) at the
same r, different function classes (HiRA's update :math:`W_0\odot BA` has rank at most
:math:`\operatorname{rank}(W_0)\cdot r`; HUT's merged weight at rank 1 is
:math:`\operatorname{diag}(b)W_0\operatorname{diag}(a)`).
A registry alias ``hira -> hut`` would therefore be wrong; this thin subclass reuses HUT's structured and dense
Hadamard products and changes the init, the merge and the layer output.

Forward (additive on the frozen output): :math:`y = \mathrm{base}(x) + \sum_k b_k \odot W_0(a_k \odot x)` -- r
products with :math:`W_0` per token on the structured path, or :math:`x (W_0 \odot BA)^\top` after one
:math:`O(rmn)` dense product (``path="dense"``); ``"auto"`` as HUT.  Merge :math:`W' = W_0 \odot (1 + BA)`,
unmerge :math:`W_0 = W' \oslash (1 + BA)` (``ValueError`` where an entry of :math:`1 + BA` is 0).  The method
defines its merged weight from :math:`W_0` (``multiplicative``): it is active alone in a layer.

What we read: the ICLR 2025 abstract (proceedings.iclr.cc and OpenReview TwJrTz9cRS), the authors' code
(github.com/hqsiswiliam/hira, ``hira/tuners/lora.py``: the forward ``F.linear(x, W0 * (BA + 1))``, B zero and A
Kaiming at init, no scaling), and PEFT 0.21.2's ``peft/tuners/hira/layer.py`` (``result + F.linear(x, W0 * (BA))``,
``reset_hira_parameters``).  The paper PDF in the authors' repository could not be rendered here.

References
----------
Q. Huang, T. Ko, Z. Zhuang, L. Tang, Y. Zhang, "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large
Language Models", ICLR 2025 (no arXiv id; OpenReview TwJrTz9cRS).
"""

from __future__ import annotations

import torch
from torch import nn

from ..method_index import Paper, adapter_entry
from .multiplicative import HUT, _kaiming_rows
from .registry import register

__all__ = ["HiRA"]


@register
class HiRA(HUT):
    r"""HiRA: :math:`\Delta W = W_0 \odot (BA)`, B (m×r) zero and A (r×n) Kaiming-uniform at init.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int, default 4
        r, ``1 <= r <= min(m, n)`` (PEFT's ``r``).
    seed : int, optional
        Seed of A's Kaiming-uniform rows, :math:`U(-1/\sqrt n, 1/\sqrt n)` (PEFT's ``kaiming_uniform_(a=sqrt(5))``).
    path : {"auto", "structured", "dense"}
        How :math:`x (W_0 \odot BA)^\top` is applied (HUT's rule).

    Raises
    ------
    ValueError
        Invalid ``rank`` or ``path``; at unmerge, an entry of :math:`1 + BA` equal to 0.

    Notes
    -----
    See the module docstring for the relation to HUT and what was read.  Trainable: :math:`r(m+n)`.
    """

    index_entry = adapter_entry(
        "hira",
        Paper("HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models (ICLR 2025)"),
        "rank * (d_out + d_in)",
        ("tests/adapters/test_hira.py",),
        peft="peft.HiraConfig",
        peft_test="tests/adapters/test_hira.py",
        note="HUT of rank r + 1 with its first component frozen at (1, 1); exact maps in training.peft_lora",
    )

    name = "hira"

    def __init__(self, d_out: int, d_in: int, rank: int = 4, seed: int | None = 0, path: str = "auto") -> None:
        super().__init__(d_out, d_in, rank=rank, seed=seed, path=path)
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.A = nn.Parameter(_kaiming_rows(rank, d_in, seed))

    def transform(self) -> torch.Tensor:
        """The dense Hadamard factor :math:`1 + BA` (m, n) of the merged weight."""
        return 1.0 + self.B @ self.A

    def layer_output(self, x, base_out, base_weight, base_bias):
        return base_out + self.apply_transformed(x, base_weight).to(base_out.dtype)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x (W0 ⊙ BA)ᵀ`` for x (..., d_in), through the chosen path."""
        return self.apply_transformed(x, self._require_base(base_weight))

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        W0 = self._require_base(base_weight)
        return W0 * (self.B @ self.A).to(W0.dtype)

    def _merge(self, base_weight: torch.Tensor) -> torch.Tensor:
        W0 = self._require_base(base_weight)
        return W0 + W0 * (self.B @ self.A)

    def _unmerge(self, merged_weight: torch.Tensor) -> torch.Tensor:
        M = self.transform()
        if bool((M == 0).any()):
            raise ValueError("the Hadamard factor 1 + B @ A has zero entries: W0 cannot be recovered (cannot unmerge)")
        return merged_weight / M
