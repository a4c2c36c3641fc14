r"""CoDyRA: a rank-gated LoRA whose gates are sparsified by a rising soft threshold, then pruned and merged.

:class:`CoDyRA` is :math:`\Delta W = s\,B\operatorname{diag}(g)A` (the same form as SoRA, a different rule):
the gate :math:`g` (the paper's "per-component importance weights") is trained by the ordinary optimizer on
the task loss plus :math:`\lambda\|g\|_1`, and after each step a threshold :math:`\kappa_t` that rises
linearly after a dense warm-up (:func:`codyra_threshold`) is applied to it (:func:`codyra_gate_update`).
At the end of a task the zero-gate ranks are cut (:meth:`CoDyRA.prune_zero_gates`, exact) and the rest is
merged into the frozen weight; the next task starts a fresh adapter on the updated weight
(:class:`~lowrank_theory.training.codyra.CoDyRASchedule` does both).

What was read, and from where
-----------------------------
* The abstract of arXiv:2412.01004 in its versions v4, v6, v7 and v8 (arxiv.org HTML and abstract pages,
  ``search`` pages corpus); v8 is retitled "Take Only What You Need: Rank Minimization as an Implicit
  Forgetting Regularizer in Continual Learning".  It says: LoRA on all parameters, "adaptive rank
  minimization via sparsity-promoting regularization on per-component importance weights", merged into the
  pre-trained model (no inference overhead), one LoRA per task, no replay.  The method section itself was
  not reachable (the stored pages hold the opening only), nor was the authors' repository
  (``jeff024/codyra``: no snapshot here).
* Two third-party projects that embed a CoDyRA layer (found by ``find_string``; not the authors' repo,
  apparently copied from it): per component :math:`x \mapsto ((xA^\top)\odot w)B^\top`, A Kaiming-uniform,
  B = 0, w = 1 (or :math:`\mathcal U(\pm 10\kappa_{max})`); loss term ``lambda_reg * ||w||_1`` with
  ``lambda_reg = 1e-4``; after the optimizer step, during the sparse epochs only, ``w <- where(|w| > kappa,
  w + sign(w) * kappa, 0)`` with ``kappa = max_kappa * min(e / E_sparse, 1)``, ``max_kappa = 5e-3``, the first
  ``int(dense_ratio * E)`` epochs dense (``dense_ratio = 0.5``); merge adds
  :math:`B_S\operatorname{diag}(w_S)A_S` over the nonzero gates S to the weight and freezes the layer.

Our choice, and why: that stored update *adds* :math:`\kappa` to the surviving gates (a hard threshold that
pushes survivors outward); it is not the proximal step of any multiple of :math:`\|w\|_1`, and it works
against the L1 term.  We take the textbook proximal step of :math:`\kappa\|g\|_1`, soft thresholding
(``rule="soft"``, the default; proof in ``proofs/24-codyra-prune-exact.md``), and keep the stored one as
``rule="hard_push"`` so that the two can be compared.  Pruning after either rule is exact, since a gate that
is exactly zero contributes nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..method_index import Paper, adapter_entry
from .adaptive_rank import _ADAPTIVE_PARAMS, GatedLowRank, soft_threshold
from .base import check_weight
from .params import Choice, schema
from .registry import register

__all__ = ["CODYRA_GATE_RULES", "CoDyRA", "codyra_gate_update", "codyra_threshold"]

#: The gate updates :func:`codyra_gate_update` knows: the proximal step, and the stored code's variant.
CODYRA_GATE_RULES = ("soft", "hard_push")
#: Bound of the ``gate_init="uniform"`` draw: ``10 * max_kappa`` with the stored code's ``max_kappa = 5e-3``.
_UNIFORM_GATE = 0.05


@register
class CoDyRA(GatedLowRank):
    r"""CoDyRA: :math:`\Delta W = s\,B\,\operatorname{diag}(g)\,A`, gates sparsified by a rising threshold.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int
        Initial (maximal) rank r, ``0 <= r <= min(m, n)`` (0 only after every gate was cut).
    alpha : float, default ``rank``
        Scale :math:`s = \alpha/r`, fixed at construction and kept when ranks are cut (so :math:`s = 1` by
        default, the stored code's unscaled update).
    dropout : float
        Dropout on the update's input.
    gate_init : {"ones", "uniform"}
        :math:`g = 1` (every rank on, plain LoRA at the start), or :math:`g \sim \mathcal U(-0.05, 0.05)`
        (the stored code's model-level init, :math:`\pm 10\kappa_{max}`).
    seed : int, optional
        Seed of A's init and of a uniform gate.

    Notes
    -----
    Trainable: :math:`A \in \mathbb{R}^{r\times n}` (Kaiming-uniform rows, as LoRA), :math:`B \in
    \mathbb{R}^{m\times r}` (zero, so :math:`\Delta W = 0` at init), :math:`g \in \mathbb{R}^r`; count
    :math:`r(m+n+1)`.  Forward :math:`s\,((xA^\top)\odot g)B^\top`, :math:`r(m+n)` per token.

    Rank :math:`i` contributes :math:`s\,g_i\,b_i a_i^\top`; with :math:`S = \{i : g_i \ne 0\}`,
    :math:`\Delta W = s\,B_S\operatorname{diag}(g_S)A_S` exactly, which is why :meth:`prune_zero_gates`
    leaves every output unchanged (up to the re-association of an r-term sum).
    :meth:`sparsity_penalty` is :math:`\|g\|_1`; the training rule is
    :func:`codyra_gate_update` with :func:`codyra_threshold`.

    References
    ----------
    H. Lu, C. Zhao, J. Xue, L. Yao, K. Moore, D. Gong, "Adaptive Rank, Reduced Forgetting: Knowledge Retention
    in Continual Learning Vision-Language Models with Dynamic Rank-Selective LoRA", arXiv:2412.01004 (abstract
    only; see the module docstring for what else was read).
    """

    index_entry = adapter_entry(
        "codyra",
        Paper("Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models "
              "with Dynamic Rank-Selective LoRA", "2412.01004"),
        "rank * (d_out + d_in + 1)",
        ("tests/adapters/test_gated_rank.py", "tests/training/test_rank_budget.py"),
        proofs=("proofs/24-codyra-prune-exact.md",),
        notebooks=("notebooks/13_rank_selection.py",),
        note="trained with its CoDyRASchedule (lowrank_theory.training.codyra)",
    )

    name = "codyra"
    params = schema(_ADAPTIVE_PARAMS, gate_init=Choice("ones", "uniform", doc="gate init: ones, or U(-0.05, 0.05)"))

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        gate_init: str = "ones",
        seed: int | None = 0,
    ) -> None:
        super().__init__(d_out, d_in)
        g = self._init_factors(d_out, d_in, rank, alpha, dropout, seed)
        if gate_init == "ones":
            gate = torch.ones(rank)
        else:
            gate = (2.0 * torch.rand(rank, generator=g) - 1.0) * _UNIFORM_GATE
        self.gate = nn.Parameter(gate)

    @property
    def active_rank(self) -> int:
        """Number of nonzero gates: the rank the update really has at most."""
        return int((self.gate.detach() != 0).sum())

    def sparsity_penalty(self) -> torch.Tensor:
        r""":math:`\|g\|_1` (differentiable; the schedule multiplies it by :math:`\lambda`)."""
        return self.gate.abs().sum()

    @torch.no_grad()
    def threshold_(self, kappa: float, rule: str = "soft") -> int:
        """Apply :func:`codyra_gate_update` to the gate in place; return the number of zero gates after it."""
        self.gate.copy_(codyra_gate_update(self.gate, kappa, rule))
        return self.rank - self.active_rank


def codyra_gate_update(g: torch.Tensor, kappa: float, rule: str = "soft") -> torch.Tensor:
    r"""CoDyRA's gate threshold after an optimizer step.

    Parameters
    ----------
    g : torch.Tensor, shape (r,)
        The gate.
    kappa : float
        Threshold :math:`\kappa \ge 0` (from :func:`codyra_threshold`).
    rule : {"soft", "hard_push"}
        ``"soft"``: :math:`T_\kappa(g) = \operatorname{sign}(g)\max(|g| - \kappa, 0)`, the proximal map of
        :math:`\kappa\|\cdot\|_1`.  ``"hard_push"``: the stored code's
        :math:`g_i + \operatorname{sign}(g_i)\kappa` where :math:`|g_i| > \kappa`, else 0.

    Returns
    -------
    torch.Tensor, shape (r,)
        A new tensor; ``|g_i| <= kappa`` gives exactly 0 under both rules.

    Raises
    ------
    ValueError
        ``g`` not finite or not 1-D, ``kappa`` negative or not finite, or an unknown ``rule``.
    """
    check_weight(g, "g")
    if g.ndim != 1:
        raise ValueError(f"g must be a 1-D gate vector, got shape {tuple(g.shape)}")
    if isinstance(kappa, bool) or not isinstance(kappa, int | float) or not math.isfinite(kappa) or kappa < 0:
        raise ValueError(f"kappa must be a finite number >= 0, got {kappa!r}")
    if rule not in CODYRA_GATE_RULES:
        raise ValueError(f"rule must be one of {CODYRA_GATE_RULES}, got {rule!r}")
    g = g.detach()
    if rule == "soft":
        return soft_threshold(g, float(kappa))
    return torch.where(g.abs() > kappa, g + torch.sign(g) * kappa, torch.zeros_like(g))


def codyra_threshold(t: int, total: int, max_kappa: float, dense_ratio: float = 0.5) -> float:
    r"""CoDyRA's threshold :math:`\kappa_t` at period ``t`` of ``total`` (an epoch in the stored code, or a step).

    Parameters
    ----------
    t : int
        Period index, ``0 <= t < total``.
    total : int
        :math:`E \ge 1` periods in the task.
    max_kappa : float
        :math:`\kappa_{max} \ge 0` (stored code: 5e-3).
    dense_ratio : float
        :math:`\rho \in [0, 1)`: the first :math:`D = \lfloor\rho E\rfloor` periods are dense (no threshold).

    Returns
    -------
    float
        0 for :math:`t < D`; else :math:`\kappa_{max}\min\big((t - D)/S, 1\big)` with :math:`S = E - D - 1`
        (:math:`\kappa_{max}` when :math:`S \le 0`), so the last period uses :math:`\kappa_{max}`.

    Notes
    -----
    The stored code's schedule, as read: a dense phase, then a threshold rising linearly from 0 to
    :math:`\kappa_{max}` over the sparse periods (its first sparse period uses :math:`\kappa = 0`).
    """
    for name, v, lo in (("t", t, 0), ("total", total, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if t >= total:
        raise ValueError(f"t must be < total={total}, got {t}")
    if isinstance(max_kappa, bool) or not isinstance(max_kappa, int | float) or not math.isfinite(max_kappa) \
            or max_kappa < 0:
        raise ValueError(f"max_kappa must be a finite number >= 0, got {max_kappa!r}")
    if isinstance(dense_ratio, bool) or not isinstance(dense_ratio, int | float) or not 0 <= dense_ratio < 1:
        raise ValueError(f"dense_ratio must be a number in [0, 1), got {dense_ratio!r}")
    dense = int(total * dense_ratio)
    if t < dense:
        return 0.0
    sparse = total - dense - 1
    if sparse <= 0:
        return float(max_kappa)
    return float(max_kappa) * min((t - dense) / sparse, 1.0)
