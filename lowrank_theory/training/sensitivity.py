r"""SPT: sensitivity-aware placement of trainable parameters -- sparse tuning plus LoRA, within a budget.

SPT (He et al., ICCV 2023) runs in two stages.

1. **Sensitivity** (:func:`parameter_sensitivity`).  For a weight entry :math:`w` with gradient :math:`g` on a
   batch, moving it alone by one SGD step :math:`-\epsilon g` changes the loss by
   :math:`\Delta L = -\epsilon g^2 + O(\epsilon^2)` (first-order Taylor; ``proofs/27-spt-first-order.md``), so
   :math:`s = g^2` ranks the entries by the loss decrease one step of each would buy.  The scores are summed
   over the batches given (the authors accumulate ``param.grad ** 2`` over ``sensitivity_batch_num`` batches).
2. **Allocation** (:func:`spt_allocate`).  Take the τ entries of largest score over all target matrices.  A
   matrix holding :math:`c_l` of them gets LoRA of rank r -- cost :math:`r(m_l + n_l)`, its entries not tuned
   on their own -- when :math:`c_l \ge r(m_l + n_l)/\alpha` (the authors' ``grad_sum >=
   cur_structured_param_num / alpha``); otherwise its :math:`c_l` entries are tuned unstructured (cost
   :math:`c_l`).  The authors sweep τ over a grid and keep the configuration whose count is *nearest* the
   budget (which may exceed it); here τ is the largest with cost :math:`\le` budget (the cost is
   non-decreasing in τ for :math:`\alpha \ge 1`, so a bisection finds it), and the remainder is filled with the
   next most sensitive entries of unstructured matrices that do not tip them over the LoRA threshold.  The
   result is exactly within budget: ``cost <= budget``, with ``cost == budget`` unless only threshold
   crossings remain.

:func:`apply_spt` injects the selection: ``lora`` (rank r) into the chosen matrices, and
:class:`~lowrank_theory.adapters.sparse_support.SparseDelta` on each other matrix's selected entries.

What was read, and from where: the abstract (arXiv:2303.08566, via the search tool) and the authors' code
(github.com/ziplab/SPT, ``engine.py:get_sensitivity`` and ``train_spt.py``): squared gradients accumulated over
batches, one global top-τ over the matrices and vectors outside the head/embeddings, the per-matrix test
against ``r(m+n)/alpha`` with ``alpha = 10`` and ``r = 8`` in their configs, structured matrices tuned by
LoRA/adapter only, a sweep of τ to hit 0.05--1.0 M parameters.  Left out: the bias/LayerNorm vectors (the
authors also rank them and may tune whole vectors, their ``beta`` rule) -- only 2-D weights of the target
linear layers are scored here; and their fully tuned head.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .injection import inject
from .targets import Targets, find_targets

__all__ = ["SPTSelection", "apply_spt", "parameter_sensitivity", "spt_allocate", "spt_select"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def _linear_weight(mod: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) weight parameter of a Linear (or the (d_in, d_out) one of a GPT-2 Conv1D)."""
    return mod.weight


def _as_2d(name: str, mod: nn.Module, t: torch.Tensor) -> torch.Tensor:
    return t if isinstance(mod, nn.Linear) else t.T  # Conv1D stores (d_in, d_out)


def parameter_sensitivity(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], *,
                          targets: Targets = "all-linear", exclude: Targets | None = None) -> dict[str, torch.Tensor]:
    r"""SPT's sensitivity :math:`s = \sum_{\text{batches}} g^2` of every entry of every target linear weight.

    Parameters
    ----------
    model : nn.Module
        Not changed (its ``requires_grad`` flags and ``.grad`` fields are restored).
    loss_fn : callable
        ``loss_fn(model, batch)`` returns a scalar loss tensor.
    batches : iterable
        At least one batch.
    targets, exclude
        Which linear layers to score (as :func:`~lowrank_theory.training.inject`).

    Returns
    -------
    dict
        layer name -> float64 tensor (d_out, d_in) of summed squared gradients.

    Raises
    ------
    TypeError, ValueError
        ``loss_fn`` not callable, no batch, a loss that is not a finite scalar tensor.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    names = find_targets(model, targets, exclude)
    mods = {n: model.get_submodule(n) for n in names}
    weights = {n: _linear_weight(m) for n, m in mods.items()}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    scores = {n: torch.zeros(tuple(_as_2d(n, mods[n], w).shape), dtype=torch.float64, device=w.device)
              for n, w in weights.items()}
    seen = 0
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
            if not bool(torch.isfinite(loss.detach())):
                raise ValueError(f"loss_fn returned a non-finite loss {float(loss):.3g} on batch {seen}")
            g = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for (n, _), gi in zip(weights.items(), g):
                if gi is not None:
                    scores[n] += _as_2d(n, mods[n], gi).double() ** 2
            seen += 1
    finally:
        for p, f, gr in zip(params, flags, grads):
            p.requires_grad_(f)
            p.grad = gr
    if seen == 0:
        raise ValueError("batches must hold at least one batch")
    return scores


@dataclass
class SPTSelection:
    """Where SPT puts trainable parameters.

    ``lora``: layer name -> rank; ``sparse``: layer name -> sorted flat row-major indices (int64) of the
    unstructured entries; ``shapes``: layer name -> (d_out, d_in) of every scored matrix; ``cost``: trainable
    parameters of the selection (:math:`\\sum_{lora} r(m+n) + \\sum_{sparse} |\\Omega_l|`), ``cost <= budget``;
    ``tau``: entries of the global top-τ (before the fill); ``filled``: entries added by the fill.
    """

    lora: dict[str, int]
    sparse: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]
    budget: int
    cost: int
    tau: int
    filled: int
    alpha: float
    rank: int
    thresholds: dict[str, float] = field(default_factory=dict)

    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean (d_out, d_in) masks of the unstructured entries, one per sparse layer."""
        out = {}
        for n, idx in self.sparse.items():
            m, k = self.shapes[n]
            mask = torch.zeros(m * k, dtype=torch.bool)
            mask[idx] = True
            out[n] = mask.view(m, k)
        return out


def _check_budget(budget: Any) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be an int (trainable parameters), got {type(budget).__name__}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    return budget


def spt_allocate(scores: Mapping[str, torch.Tensor], budget: int, *, rank: int = 8, alpha: float = 10.0,
                 fill: bool = True) -> SPTSelection:
    r"""SPT's split of ``budget`` trainable parameters between LoRA (rank ``rank``) and unstructured entries.

    Parameters
    ----------
    scores : mapping
        layer name -> (d_out, d_in) non-negative sensitivities (:func:`parameter_sensitivity`).
    budget : int
        Trainable parameters allowed, >= 0.
    rank : int, default 8
        r of every LoRA (the authors' ``low_rank_dim``); a matrix with ``min(m, n) < r`` never gets LoRA.
    alpha : float, default 10
        α >= 1: a matrix gets LoRA when it holds at least :math:`r(m+n)/\alpha` of the top-τ entries.
    fill : bool, default True
        Spend the remainder ``budget - cost(τ)`` on the next entries of unstructured matrices (see the module
        docstring); False stops at the top-τ.

    Returns
    -------
    SPTSelection

    Raises
    ------
    TypeError, ValueError
        Bad ``budget``/``rank``/``alpha``, an empty or non-2-D or negative or non-finite score.

    Notes
    -----
    Ties in the scores are broken by the order of ``scores`` then row-major position (a stable sort), so
    the selection is deterministic.  For :math:`\alpha \ge 1` the cost of the top-τ is non-decreasing in τ:
    one more entry adds 1 (unstructured, stays below the threshold :math:`T_l`), 0 (already a LoRA matrix), or
    :math:`r(m+n) - (c-1) > 0` when the count reaches :math:`c = \lceil T_l \rceil` (since
    :math:`c - 1 < T_l \le \alpha T_l = r(m+n)`).
    """
    budget = _check_budget(budget)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 1.0 or alpha != alpha:
        raise ValueError(f"alpha must be a real >= 1 (the cost is then monotone in tau), got {alpha!r}")
    if not isinstance(fill, bool):
        raise TypeError(f"fill must be a bool, got {type(fill).__name__}")
    if not scores:
        raise ValueError("scores must name at least one matrix")
    names = list(scores)
    flat, mat, shapes = [], [], {}
    for li, n in enumerate(names):
        s = scores[n]
        if not isinstance(s, torch.Tensor) or s.ndim != 2:
            raise ValueError(f"scores[{n!r}] must be a 2-D tensor (d_out, d_in)")
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError(f"scores[{n!r}] must be finite and non-negative")
        shapes[n] = (int(s.shape[0]), int(s.shape[1]))
        flat.append(s.detach().reshape(-1).double().cpu())
        mat.append(torch.full((s.numel(),), li, dtype=torch.long))
    flat_t, mat_t = torch.cat(flat), torch.cat(mat)
    offsets = torch.tensor([0] + [s.numel() for s in flat]).cumsum(0)
    order = torch.sort(flat_t, descending=True, stable=True).indices
    mat_of = mat_t[order]
    L = len(names)
    lora_cost = torch.tensor([rank * (m + k) for m, k in shapes.values()], dtype=torch.long)
    can_lora = torch.tensor([min(m, k) >= rank for m, k in shapes.values()])
    thresh = torch.where(can_lora, lora_cost.double() / alpha, torch.tensor(float("inf")))

    def cost(tau: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        counts = torch.bincount(mat_of[:tau], minlength=L)
        is_lora = counts.double() >= thresh
        return int(torch.where(is_lora, lora_cost, counts).sum()), counts, is_lora

    lo, hi = 0, flat_t.numel()  # cost(lo) <= budget; find the largest such tau
    if cost(hi)[0] <= budget:
        lo = hi
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cost(mid)[0] <= budget:
                lo = mid
            else:
                hi = mid
    tau = lo
    total, counts, is_lora = cost(tau)
    chosen = torch.zeros(flat_t.numel(), dtype=torch.bool)
    chosen[:tau] = True
    filled = 0
    left = budget - total
    if fill and left > 0 and tau < flat_t.numel():
        # room each unstructured matrix has before its count reaches the LoRA threshold
        room = torch.where(is_lora, torch.zeros(L, dtype=torch.long),
                           (torch.ceil(thresh).clamp(max=float(flat_t.numel())) - 1).long() - counts)
        room = torch.where(torch.isinf(thresh), torch.full((L,), flat_t.numel(), dtype=torch.long), room).clamp(min=0)
        rest = mat_of[tau:]
        # position of each remaining entry among its own matrix's remaining entries (rank order kept)
        perm = torch.sort(rest, stable=True).indices
        per = torch.bincount(rest, minlength=L)
        starts = per.cumsum(0) - per
        pos = torch.empty(rest.numel(), dtype=torch.long)
        pos[perm] = torch.arange(rest.numel()) - starts[rest[perm]]
        ok = pos < room[rest]
        ok_pos = torch.nonzero(ok).squeeze(-1)[:left]
        chosen[tau + ok_pos] = True
        filled = int(ok_pos.numel())
        counts = counts + torch.bincount(rest[ok_pos], minlength=L)
        total += filled
    lora = {names[li]: rank for li in range(L) if bool(is_lora[li])}
    sparse = {}
    picked = order[chosen]
    for li, n in enumerate(names):
        if n in lora:
            continue
        mine = picked[mat_t[picked] == li]
        if mine.numel():
            sparse[n] = torch.sort(mine - offsets[li]).values
    return SPTSelection(lora, sparse, shapes, budget, total, tau, filled, float(alpha), rank,
                        {n: float(thresh[i]) for i, n in enumerate(names)})


def spt_select(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], budget: int, *, rank: int = 8,
               alpha: float = 10.0, targets: Targets = "all-linear", exclude: Targets | None = None,
               fill: bool = True) -> SPTSelection:
    """:func:`parameter_sensitivity` then :func:`spt_allocate` (arguments as there)."""
    budget = _check_budget(budget)
    scores = parameter_sensitivity(model, loss_fn, batches, targets=targets, exclude=exclude)
    return spt_allocate(scores, budget, rank=rank, alpha=alpha, fill=fill)


def _exact(name: str) -> str:
    return "re:" + re.escape(name)


def apply_spt(model: nn.Module, selection: SPTSelection, *, lora_alpha: float | None = None, seed: int = 0,
              dropout: float = 0.0) -> nn.Module:
    """Inject ``selection`` into ``model``: ``lora`` into its LoRA matrices, ``sparse_delta`` on the others' entries.

    Every adapter starts at ΔW = 0 (LoRA's B = 0, sparse values 0), so the model computes what it computed
    before; everything else is frozen.  The number of trainable parameters is ``selection.cost``.
    ``lora_alpha`` (default: the rank, scale 1), ``seed`` (A's init; each layer gets the same seed) and
    ``dropout`` go to every LoRA.

    Checkpoints: :func:`~lowrank_theory.training.save_adapters` writes every adapter's state (the supports
    included), but the per-layer ``indices`` are tensors, not JSON, so ``load_adapters(..., inject=True)`` cannot
    rebuild the layers; keep the selection (``torch.save`` it), call ``apply_spt(model, selection)`` on the fresh
    model, then ``load_adapters(model, path)``.
    """
    if not isinstance(selection, SPTSelection):
        raise TypeError(f"selection must be an SPTSelection, got {type(selection).__name__}")
    for n in (*selection.lora, *selection.sparse):
        mod = model.get_submodule(n)
        w = _as_2d(n, mod, _linear_weight(mod))
        if tuple(w.shape) != selection.shapes[n]:
            raise ValueError(f"layer {n!r} has weight shape {tuple(w.shape)}, the selection was made for "
                             f"{selection.shapes[n]}")
    if selection.lora:
        inject(model, "lora", [_exact(n) for n in selection.lora], rank=selection.rank,
               alpha=lora_alpha, seed=seed, dropout=dropout)
    for n, idx in selection.sparse.items():
        inject(model, "sparse_delta", [_exact(n)], indices=idx)
    return model
