"""Adaptive-rank low-rank adapters: AdaLoRA and SoRA, with their rank-allocation rules.

* :class:`AdaLoRA` -- :math:`\\Delta W = s\\,P\\operatorname{diag}(\\lambda)Q`, an SVD-shaped update
  whose triplets are pruned by an importance score (:class:`AdaLoRAImportance`) down to a
  global budget that follows a cubic schedule (:func:`adalora_budget`).
* :class:`SoRA` -- :math:`\\Delta W = s\\,B\\operatorname{diag}(g)A`, a gated LoRA whose gate is
  sparsified by a proximal step (:func:`sora_proximal_step`); zero gates are cut.

Pruning here **really shrinks** the tensors (new, smaller ``nn.Parameter`` objects), so
``num_trainable`` drops.  Rebuild the optimizer after a prune: it holds the old tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..method_index import Paper, adapter_entry
from .base import Adapter, check_weight
from .lowrank import LORA_PARAMS, LoRA, _check_dropout, _generator, _kaiming_rows
from .params import Choice, Int, schema
from .registry import register

#: AdaLoRA's and SoRA's keywords: LoRA's without rsLoRA, and a rank that may be 0 after pruning.
_ADAPTIVE_PARAMS = schema(LORA_PARAMS, without=["rslora"],
                    rank=Int(0, doc="r, 0 <= r <= min(d_out, d_in) (0 after every triplet was pruned)"))

__all__ = [
    "AdaLoRA",
    "AdaLoRAImportance",
    "SoRA",
    "adalora_budget",
    "soft_threshold",
    "sora_lambda_schedule",
    "sora_proximal_step",
]


def _check_rank0(rank: int, d_out: int, d_in: int) -> int:
    """``0 <= rank <= min(d_out, d_in)``: a pruned adapter may keep no triplet at all (type checked by ``params``)."""
    if not 0 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank must satisfy 0 <= rank <= {min(d_out, d_in)} for a {d_out}x{d_in} weight, got {rank}")
    return rank


def _scale(alpha: float | None, rank: int) -> tuple[float, float]:
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return alpha, (alpha / rank if rank > 0 else 0.0)


def _keep_index(keep: torch.Tensor | int, rank: int, scores: torch.Tensor) -> torch.Tensor:
    """Sorted indices kept by a boolean mask of length ``rank`` or by an int budget (top ``scores``)."""
    if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool:
        if tuple(keep.shape) != (rank,):
            raise ValueError(f"keep mask must have shape ({rank},), got {tuple(keep.shape)}")
        return torch.nonzero(keep.detach().cpu(), as_tuple=False).flatten()
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be a boolean mask or an int budget, got {type(keep).__name__}")
    if not 0 <= keep <= rank:
        raise ValueError(f"keep (budget) must satisfy 0 <= keep <= rank={rank}, got {keep}")
    order = torch.argsort(scores.detach().cpu(), descending=True, stable=True)
    return torch.sort(order[:keep]).values


def _shrink_(module: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    """Replace parameter ``name`` by a new Parameter holding only ``index`` along ``dim``."""
    old = getattr(module, name)
    new = old.detach().index_select(dim, index.to(old.device)).clone()
    setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))


# ----------------------------------------------------------------------------- AdaLoRA
@register
class AdaLoRA(Adapter):
    r"""AdaLoRA: :math:`\Delta W = s\,P\,\operatorname{diag}(\lambda)\,Q`, an SVD-shaped update with prunable triplets.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int
        Initial number of triplets r, ``0 <= r <= min(m, n)`` (0 only for a fully pruned adapter).
    alpha : float, default ``rank``
        Scale :math:`s = \alpha/r`, fixed at construction: pruning keeps :math:`s`, so the kept
        triplets' contribution is unchanged.
    dropout : float
        Dropout on the update's input.
    seed : int, optional
        Seed of the init :math:`P, Q \sim \mathcal N(0, 0.02^2)`, :math:`\lambda = 0` (PEFT's init).

    Notes
    -----
    Trainable: :math:`P \in \mathbb{R}^{m\times r}` (left "singular vectors", PEFT's
    ``lora_B``), :math:`\lambda \in \mathbb{R}^r` (``lora_E``), :math:`Q \in \mathbb{R}^{r\times n}`
    (``lora_A``); count :math:`r(m+n+1)`.  :math:`\lambda = 0` at init, so :math:`\Delta W = 0`.
    :meth:`orthogonal_penalty` is the paper's regularizer
    :math:`R(P,Q) = \|P^\top P - I\|_F^2 + \|QQ^\top - I\|_F^2` (Eq. 4), which keeps
    :math:`P, Q` near-orthogonal so that :math:`\lambda` behaves like singular values and
    dropping a triplet is a cheap, stable rank cut.  (PEFT adds the *unsquared* norms, averaged
    over matrices -- ``squared=False`` gives the unaveraged sum of those.)  Forward:
    :math:`s\,((xQ^\top)\odot\lambda)P^\top`, :math:`r(m+n)` per token.  PEFT's scaling is
    ``lora_alpha / (r + 1e-5)``; ours is exactly :math:`\alpha/r`.

    References
    ----------
    Q. Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
    ICLR 2023, arXiv:2303.10512.
    """

    index_entry = adapter_entry(
        "adalora",
        Paper("AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", "2303.10512"),
        "rank * (d_out + d_in + 1)",
        ("tests/adapters/test_adaptive_rank.py", "tests/training/test_schedules.py"),
        notebooks=("notebooks/10_rank_allocation.py",),
        peft="peft.AdaLoraConfig",
        peft_test="tests/adapters/test_adaptive_rank.py",
        note="trained with its AdaLoRASchedule by default",
    )

    name = "adalora"
    params = _ADAPTIVE_PARAMS

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        seed: int | None = 0,
    ) -> None:
        super().__init__(d_out, d_in)
        _check_rank0(rank, d_out, d_in)
        alpha, self.scale = _scale(alpha, rank)
        self.dropout = _check_dropout(dropout)
        g = _generator(seed)
        self.Q = nn.Parameter(0.02 * torch.randn(rank, d_in, generator=g))
        self.lam = nn.Parameter(torch.zeros(rank))
        self.P = nn.Parameter(0.02 * torch.randn(d_out, rank, generator=g))

    @property
    def rank(self) -> int:
        """Current number of triplets."""
        return int(self.lam.shape[0])

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 8, **_: Any) -> int:
        return rank * (d_out + d_in + 1)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * ((self.P * self.lam) @ self.Q)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return self.scale * (((self.dropout(x) @ self.Q.T) * self.lam) @ self.P.T)

    def orthogonal_penalty(self, squared: bool = True) -> torch.Tensor:
        r""":math:`\|P^\top P - I_r\|_F^2 + \|QQ^\top - I_r\|_F^2` (or the unsquared norms' sum).

        Cost :math:`O(r^2(m+n))`; differentiable.  Zero for a rank-0 adapter.
        """
        eye = torch.eye(self.rank, dtype=self.P.dtype, device=self.P.device)
        dp = torch.linalg.matrix_norm(self.P.T @ self.P - eye)
        dq = torch.linalg.matrix_norm(self.Q @ self.Q.T - eye)
        return dp**2 + dq**2 if squared else dp + dq

    @torch.no_grad()
    def prune_to(self, keep: torch.Tensor | int, scores: torch.Tensor | None = None) -> torch.Tensor:
        r"""Cut triplets for good: new, smaller ``P``, ``lam``, ``Q`` Parameters.

        Parameters
        ----------
        keep : torch.Tensor of bool, shape (r,), or int
            A mask of the triplets to keep, or a budget: keep the ``keep`` triplets of largest
            ``scores``.
        scores : torch.Tensor, shape (r,), optional
            Ranking for an int budget (e.g. :meth:`AdaLoRAImportance.triplet_scores`); default
            :math:`|\lambda_i|`.

        Returns
        -------
        torch.Tensor of int64
            The kept (old) indices, ascending -- use them to slice optimizer or importance state.

        Notes
        -----
        The scale :math:`s` is kept, so :math:`\Delta W` after the cut equals
        :math:`\Delta W` before it with the dropped :math:`\lambda_i` set to zero.  The
        optimizer must be rebuilt (it references the old tensors); ``config()`` then rebuilds
        the pruned shape with the same :math:`s`.
        """
        if scores is None:
            scores = self.lam.abs()
        elif tuple(scores.shape) != (self.rank,):
            raise ValueError(f"scores must have shape ({self.rank},), got {tuple(scores.shape)}")
        idx = _keep_index(keep, self.rank, scores)
        _shrink_(self, "P", idx, 1)
        _shrink_(self, "lam", idx, 0)
        _shrink_(self, "Q", idx, 0)
        self._config.update(rank=self.rank, alpha=self.scale * self.rank)
        return idx


def adalora_budget(
    step: int, *, initial_budget: int, target_budget: int, total_steps: int, t_init: int = 0, t_final: int = 0
) -> int:
    r"""AdaLoRA's cubic budget schedule: total number of triplets kept at ``step``.

    Parameters
    ----------
    step : int
        Training step :math:`t \ge 0`.
    initial_budget, target_budget : int
        :math:`b^{(0)}` (the sum of initial ranks) and :math:`b^{(T)}`, ``0 <= b(T) <= b(0)``.
    total_steps : int
        :math:`T`, with ``t_init + t_final < total_steps``.
    t_init, t_final : int
        Warm-up steps at the full budget and final steps at the target budget.

    Returns
    -------
    int

    Notes
    -----
    Paper Eq. (12):

    .. math::
        b^{(t)} = \begin{cases} b^{(0)} & t \le t_i \\
        b^{(T)} + (b^{(0)} - b^{(T)})\big(1 - \frac{t - t_i}{T - t_i - t_f}\big)^3 & t_i < t \le T - t_f \\
        b^{(T)} & t > T - t_f \end{cases}

    truncated to an int as PEFT's ``RankAllocator.budget_schedule`` does (the test checks
    every step against it).  Masking every :math:`\Delta_T` steps is the training loop's job.

    References
    ----------
    Q. Zhang et al., arXiv:2303.10512, Sec. 3.3.
    """
    for name, v in (("step", step), ("initial_budget", initial_budget), ("target_budget", target_budget),
                    ("t_init", t_init), ("t_final", t_final), ("total_steps", total_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if target_budget > initial_budget:
        raise ValueError(f"target_budget must be <= initial_budget, got {target_budget} > {initial_budget}")
    if t_init + t_final >= total_steps:
        raise ValueError(f"total_steps must exceed t_init + t_final, got {total_steps} <= {t_init} + {t_final}")
    if step <= t_init:
        return initial_budget
    if step > total_steps - t_final:
        return target_budget
    mul = 1 - (step - t_init) / (total_steps - t_final - t_init)
    return int((initial_budget - target_budget) * (mul**3) + target_budget)


class AdaLoRAImportance:
    r"""AdaLoRA's smoothed sensitivity × uncertainty scores, and the global budget cut.

    Parameters
    ----------
    adapters : sequence of AdaLoRA
        All adapters that share one budget (typically every AdaLoRA layer of a model).
    beta1, beta2 : float in (0, 1)
        EMA factors of sensitivity and uncertainty (paper and PEFT default 0.85).

    Notes
    -----
    Call :meth:`update` after ``loss.backward()`` (PEFT calls it after ``optimizer.step()``;
    it reads each parameter :math:`w` and its ``.grad``).  For every entry (paper Eqs. 8--10):

    .. math::
        I^{(t)} = |w\,\nabla_w L|, \quad
        \bar I^{(t)} = \beta_1 \bar I^{(t-1)} + (1-\beta_1) I^{(t)}, \quad
        \bar U^{(t)} = \beta_2 \bar U^{(t-1)} + (1-\beta_2)\,|I^{(t)} - \bar I^{(t)}|,

    :math:`s(w) = \bar I^{(t)}\bar U^{(t)}`, from zero state.  The score of triplet :math:`i`
    (Eq. 11) is

    .. math:: S_i = s(\lambda_i) + \frac1{m}\sum_j s(P_{ji}) + \frac1{n}\sum_j s(Q_{ij}).

    :meth:`masks` keeps the ``budget`` best triplets over all adapters with PEFT's rule
    (drop every score :math:`\le` the :math:`(N - b)`-th smallest, :math:`N` the current
    total); :meth:`allocate` also cuts them (``prune_to``) and slices this state.
    Checked against PEFT's ``RankAllocator`` step by step in the tests.

    References
    ----------
    Q. Zhang et al., arXiv:2303.10512, Sec. 3.2.
    """

    _names = ("P", "lam", "Q")

    def __init__(self, adapters: Sequence[AdaLoRA], beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.adapters = list(adapters)
        if not self.adapters:
            raise ValueError("adapters must hold at least one AdaLoRA module")
        for ad in self.adapters:
            if not isinstance(ad, AdaLoRA):
                raise TypeError(f"adapters must hold AdaLoRA modules, got {type(ad).__name__}")
        for name, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 < float(b) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {b}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.ipt_bar: list[dict[str, torch.Tensor]] = [{} for _ in self.adapters]
        self.unc_bar: list[dict[str, torch.Tensor]] = [{} for _ in self.adapters]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current ``|w · grad|`` of every P, λ, Q into the EMAs."""
        for ad, ib, ub in zip(self.adapters, self.ipt_bar, self.unc_bar):
            for name in self._names:
                p = getattr(ad, name)
                if name in ib and ib[name].shape != p.shape:
                    raise ValueError(f"{name} changed shape outside allocate(); importance state no longer matches")
                if p.grad is None:
                    raise ValueError(f"{name}.grad is None: call loss.backward() before update()")
                ipt = (p * p.grad).abs()
                ib[name] = self.beta1 * ib.get(name, torch.zeros_like(p)) + (1 - self.beta1) * ipt
                ub[name] = self.beta2 * ub.get(name, torch.zeros_like(p)) + (1 - self.beta2) * (ipt - ib[name]).abs()

    @torch.no_grad()
    def triplet_scores(self) -> list[torch.Tensor]:
        """Per adapter, the scores :math:`S_i` of its triplets, shape (r_l,)."""
        out = []
        for ib, ub in zip(self.ipt_bar, self.unc_bar):
            if not ib:
                raise ValueError("no importance yet: call update() after a backward pass first")
            s = {k: ib[k] * ub[k] for k in self._names}
            out.append(s["lam"] + (s["Q"].mean(dim=1) + s["P"].mean(dim=0)))
        return out

    @torch.no_grad()
    def masks(self, budget: int) -> list[torch.Tensor]:
        """Boolean keep-masks, one per adapter, keeping the ``budget`` best triplets overall."""
        scores = self.triplet_scores()
        total = sum(int(s.numel()) for s in scores)
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"budget must be a non-negative int, got {budget!r}")
        if budget >= total:
            return [torch.ones(s.shape, dtype=torch.bool, device=s.device) for s in scores]
        flat = torch.cat([s.flatten() for s in scores])
        threshold = torch.kthvalue(flat, total - budget).values
        return [s > threshold for s in scores]

    @torch.no_grad()
    def allocate(self, budget: int) -> list[torch.Tensor]:
        """Cut every adapter to its share of ``budget`` and slice the EMAs; return kept indices."""
        kept = []
        for ad, mask, ib, ub in zip(self.adapters, self.masks(budget), self.ipt_bar, self.unc_bar):
            idx = ad.prune_to(mask)
            for state in (ib, ub):
                state["P"] = state["P"][:, idx.to(state["P"].device)]
                state["lam"] = state["lam"][idx.to(state["lam"].device)]
                state["Q"] = state["Q"][idx.to(state["Q"].device)]
            kept.append(idx)
        return kept


# ----------------------------------------------------------------------------- gated low rank
class GatedLowRank(Adapter):
    r"""What SoRA and CoDyRA share: :math:`\Delta W = s\,B\,\operatorname{diag}(g)\,A`, ranks cut at zero gates.

    A (r, n) has LoRA's Kaiming-uniform rows, B (m, r) is zero (so :math:`\Delta W = 0` whatever g), g (r,) is
    set by the subclass; count :math:`r(m+n+1)`; forward :math:`s\,((xA^\top)\odot g)B^\top`, r(m+n) per
    token.  Rank i contributes :math:`s\,g_i\,b_i a_i^\top`, so :meth:`prune_zero_gates` leaves
    :math:`\Delta W` unchanged in exact arithmetic (in floating point up to the re-association of the r-term
    sum by the matrix kernel).  Not registered: the subclasses differ in their gate's init and training rule.
    """

    def _init_factors(self, d_out: int, d_in: int, rank: int, alpha: float | None, dropout: float,
                      seed: int | None) -> torch.Generator | None:
        """A, B, scale and dropout; returns the generator (after A's draw) for the subclass's gate."""
        _check_rank0(rank, d_out, d_in)
        alpha, self.scale = _scale(alpha, rank)
        self.dropout = _check_dropout(dropout)
        g = _generator(seed)
        self.A = nn.Parameter(_kaiming_rows(rank, d_in, g))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        return g

    @property
    def rank(self) -> int:
        """Current rank (number of gates, zero ones included until they are pruned)."""
        return int(self.gate.shape[0])

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 8, **_: Any) -> int:
        return rank * (d_out + d_in + 1)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * ((self.B * self.gate) @ self.A)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return self.scale * (((self.dropout(x) @ self.A.T) * self.gate) @ self.B.T)

    @torch.no_grad()
    def prune_zero_gates(self) -> torch.Tensor:
        r"""Cut the ranks whose gate is exactly zero (new, smaller Parameters); return the kept indices.

        :math:`\Delta W` is unchanged (a zero gate contributes nothing; see the class docstring for round-off).
        Rebuild the optimizer afterwards.
        """
        idx = _keep_index(self.gate.detach() != 0, self.rank, self.gate)
        _shrink_(self, "A", idx, 0)
        _shrink_(self, "B", idx, 1)
        _shrink_(self, "gate", idx, 0)
        self._config.update(rank=self.rank, alpha=self.scale * self.rank)
        return idx


# ----------------------------------------------------------------------------- SoRA
@register
class SoRA(GatedLowRank):
    r"""SoRA: a gated LoRA, :math:`\Delta W = s\,B\,\operatorname{diag}(g)\,A`, whose zero gates are cut.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int
        Initial (maximal) rank r, ``0 <= r <= min(m, n)``.
    alpha : float, default ``rank``
        Scale :math:`s = \alpha/r`, kept when gates are cut.
    dropout : float
        Dropout on the update's input.
    gate_init : {"normal", "ones"}
        ``"normal"``: :math:`g \sim \mathcal N(0, 1)`, as the authors' code
        (``TsinghuaC3I/SoRA``, ``src/lora.py``); ``"ones"``: plain LoRA at start.
    seed : int, optional
        Seed of A's LoRA init and of the gate.

    Notes
    -----
    As in the authors' code, :math:`B = 0` at init (so :math:`\Delta W = 0` whatever
    :math:`g`), A has LoRA's uniform init.  The gate is trained by the proximal step
    :func:`sora_proximal_step` on :math:`\lambda\|g\|_1` (not by the plain optimizer), with
    :math:`\lambda` raised by :func:`sora_lambda_schedule`; at the end
    :meth:`prune_zero_gates` removes the zero ranks and :meth:`to_lora` folds :math:`g` into
    :math:`B`.  Forward: :math:`s\,((xA^\top)\odot g)B^\top`.  Count: :math:`r(m+n+1)`.

    References
    ----------
    N. Ding et al., "Sparse Low-rank Adaptation of Pre-trained Language Models", EMNLP 2023,
    arXiv:2311.11696.
    """

    index_entry = adapter_entry(
        "sora",
        Paper("Sparse Low-rank Adaptation of Pre-trained Language Models", "2311.11696"),
        "rank * (d_out + d_in + 1)",
        ("tests/adapters/test_adaptive_rank.py", "tests/training/test_schedules.py"),
        proofs=("proofs/15-sora-proximal-step.md",),
        notebooks=("notebooks/10_rank_allocation.py",),
        note="trained with its SoRASchedule by default",
    )

    name = "sora"
    params = schema(_ADAPTIVE_PARAMS, gate_init=Choice("normal", "ones", doc="gate init: N(0, 1) draws or ones"))

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        gate_init: str = "normal",
        seed: int | None = 0,
    ) -> None:
        super().__init__(d_out, d_in)
        g = self._init_factors(d_out, d_in, rank, alpha, dropout, seed)
        self.gate = nn.Parameter(torch.randn(rank, generator=g) if gate_init == "normal" else torch.ones(rank))

    @torch.no_grad()
    def to_lora(self) -> LoRA:
        """The equivalent :class:`~lowrank_theory.adapters.lowrank.LoRA`: ``B ← B diag(g)``, same A and scale."""
        if self.rank == 0:
            raise ValueError("rank must be >= 1 to build a LoRA; every gate was cut (ΔW = 0)")
        cfg = self._config
        lora = LoRA(self.d_out, self.d_in, rank=self.rank, alpha=self.scale * self.rank, dropout=cfg["dropout"])
        lora = lora.to(device=self.A.device, dtype=self.A.dtype)
        lora.A.copy_(self.A)
        lora.B.copy_(self.B * self.gate)
        return lora


def soft_threshold(x: torch.Tensor, tau: float) -> torch.Tensor:
    r"""Soft thresholding :math:`T_\tau(x) = \operatorname{sign}(x)\max(|x| - \tau, 0)`.

    The proximal operator of :math:`\tau\|\cdot\|_1`, elementwise.

    Raises
    ------
    ValueError
        If ``tau`` is negative or not finite, or ``x`` holds NaN/Inf.
    """
    check_weight(x, "x")
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be finite and >= 0, got {tau}")
    return torch.sign(x) * torch.clamp(x.abs() - tau, min=0.0)


def sora_proximal_step(g: torch.Tensor, grad: torch.Tensor, lr: float, lam: float) -> torch.Tensor:
    r"""SoRA's gate update :math:`g \leftarrow T_{\eta\lambda}(g - \eta\nabla_g L_0)`.

    Parameters
    ----------
    g : torch.Tensor, shape (r,)
        Current gate.
    grad : torch.Tensor, shape (r,)
        :math:`\nabla_g L_0`, the gradient of the loss *without* the L1 term.
    lr : float
        Step size :math:`\eta > 0`.
    lam : float
        Sparsity weight :math:`\lambda \ge 0`.

    Returns
    -------
    torch.Tensor, shape (r,)
        The new gate (a new tensor; copy it into ``adapter.gate`` under ``no_grad``).

    Notes
    -----
    One proximal-gradient step on :math:`L_0(g) + \lambda\|g\|_1` (paper Eq. 5): a gradient
    step on the smooth part, then the prox of :math:`\eta\lambda\|\cdot\|_1`.  Entries with
    :math:`|g - \eta\nabla| \le \eta\lambda` become exactly zero, which
    :meth:`SoRA.prune_zero_gates` cuts.  The authors' ``sparse_optimizer_multiply_lr.py``
    applies the same threshold :math:`\eta\lambda` after an Adam step; here the smooth step is
    plain SGD so the update is the textbook proximal-gradient one (pass an Adam direction as
    ``grad`` for theirs, as :class:`~lowrank_theory.training.schedules.SoRASchedule` does with
    ``gate_step="adam"``).

    References
    ----------
    N. Ding et al., arXiv:2311.11696, Sec. 3.2; N. Parikh, S. Boyd, "Proximal Algorithms" (2014), §6.5.2.
    """
    check_weight(g, "g")
    check_weight(grad, "grad", shape=tuple(g.shape))
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be finite and > 0, got {lr}")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be finite and >= 0, got {lam}")
    return soft_threshold(g.detach() - lr * grad.detach(), lr * lam)


def sora_lambda_schedule(lam0: float, lam_max: float, num: int, kind: str = "linear") -> list[float]:
    r"""SoRA's sparsifying scheduler: ``num`` increasing values of :math:`\lambda` from ``lam0`` to ``lam_max``.

    Parameters
    ----------
    lam0, lam_max : float
        First and last :math:`\lambda`, ``0 < lam0 <= lam_max`` (``lam0 >= 0`` for "linear").
    num : int
        Number of stages, ``>= 1`` (``num = 1`` gives ``[lam0]``).
    kind : {"linear", "exp_linear", "log_linear"}
        Evenly spaced in :math:`\lambda`, in :math:`\log\lambda` (geometric), or in
        :math:`e^\lambda`, the three schedules of the authors' ``sparse_optimizer.py``.

    Returns
    -------
    list of float
        Non-decreasing; the training loop moves to the next value after each stage
        (Algorithm 1 of the paper prunes and evaluates between stages).
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if not (math.isfinite(lam0) and math.isfinite(lam_max) and 0 <= lam0 <= lam_max):
        raise ValueError(f"need finite 0 <= lam0 <= lam_max, got lam0={lam0}, lam_max={lam_max}")
    if kind == "linear":
        vals = np.linspace(lam0, lam_max, num)
    elif kind == "exp_linear":
        if lam0 <= 0:
            raise ValueError(f"lam0 must be > 0 for kind='exp_linear', got {lam0}")
        vals = np.exp(np.linspace(np.log(lam0), np.log(lam_max), num))
    elif kind == "log_linear":
        vals = np.log(np.linspace(np.exp(lam0), np.exp(lam_max), num))
    else:
        raise ValueError(f"kind must be 'linear', 'exp_linear' or 'log_linear', got {kind!r}")
    vals[0], vals[-1] = lam0, (lam_max if num > 1 else lam0)
    return [float(v) for v in vals]
