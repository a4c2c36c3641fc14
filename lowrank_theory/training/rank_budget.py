r"""Rank budgets: a global rank budget split over layers by contribution (CoLoRA); TriAdaptLoRA's growth threshold.

* :func:`allocate_ranks` -- integer ranks :math:`r_l` with :math:`\sum_l r_l = R` **exactly**, each in
  :math:`[r_{min}, r_{max,l}]`, chosen greedily by marginal gain :math:`c_l\,w(k)` (layer score times a
  non-increasing weight of the :math:`k`-th rank).  For every non-increasing :math:`w` this greedy choice
  maximises :math:`\sum_l c_l \sum_{k \le r_l} w(k)` under the budget (``proofs/25-budget-greedy.md``);
  :math:`w = 1` is the top-score-first ("linear") rule, :math:`w(k) = 1/k` is D'Hondt's divisor method
  (ranks nearly proportional to :math:`c_l`), :math:`w(k) = 1/(2k-1)` is Sainte-Laguë's.
* :func:`ablation_contributions` -- a contribution score per adapted layer: the loss increase when that
  layer's update alone is switched off (leave-one-out attribution from a pilot run).
* :func:`colora_ranks` / :func:`apply_ranks` -- scores → ranks → fresh adapters of those ranks.
* :func:`triadapt_growth_count` / :func:`triadapt_threshold` -- TriAdaptLoRA's linear (or exponential)
  growth threshold, as read in the stored implementation
  (:mod:`lowrank_theory.adapters.triangular`'s docstring).

What was read for CoLoRA (arXiv:2408.01099), and from where: **nothing of that paper** -- the id and the
name "contribution-based LoRA" are the issue's (#17); neither was found in the stored corpora (pages, docs,
code).  The nearest paper found is COBRA, "Contribution-Based Bayesian Rank Allocation for
Parameter-Efficient Fine-Tuning" (ICML 2026 poster page, abstract only): layer conductance attribution, then
a Bayesian rank allocation.  What is built here is therefore the issue's description -- per-layer rank
from a contribution score under a global budget -- with the allocation rule stated and proved, and an
ablation score (ALoRA's idea, arXiv:2403.16187, abstract only) in place of an attribution we could not read.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import adapters
from .injection import adapted_layers

__all__ = [
    "GAINS",
    "ablation_contributions",
    "allocate_ranks",
    "apply_ranks",
    "colora_ranks",
    "triadapt_growth_count",
    "triadapt_threshold",
]

#: Named rank weights :math:`w(k)`, :math:`k = 1, 2, \dots` (each non-increasing in k).
GAINS: dict[str, Callable[[int], float]] = {
    "linear": lambda k: 1.0,
    "dhondt": lambda k: 1.0 / k,
    "sainte_lague": lambda k: 1.0 / (2 * k - 1),
}


def _check_int(value: Any, name: str, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def _per_layer(value: int | Sequence[int] | None, n: int, name: str, default: int) -> list[int]:
    if value is None:
        return [default] * n
    if isinstance(value, int) and not isinstance(value, bool):
        return [_check_int(value, name)] * n
    vals = list(value)
    if len(vals) != n:
        raise ValueError(f"{name} must be an int or one int per layer ({n}), got {len(vals)} values")
    return [_check_int(v, f"{name}[{i}]") for i, v in enumerate(vals)]


def allocate_ranks(
    scores: Sequence[float],
    budget: int,
    *,
    min_rank: int | Sequence[int] = 0,
    max_rank: int | Sequence[int] | None = None,
    gain: str | Callable[[int], float] = "dhondt",
) -> list[int]:
    r"""Integer ranks summing exactly to ``budget``, by greedy marginal gain :math:`c_l\,w(k)`.

    Parameters
    ----------
    scores : sequence of float, length L >= 1
        Contribution scores :math:`c_l \ge 0` (finite).
    budget : int
        :math:`R`, with :math:`\sum_l r_{min,l} \le R \le \sum_l r_{max,l}`.
    min_rank, max_rank : int or sequence of int
        Bounds per layer (``max_rank`` None: no upper bound beyond ``budget``).
    gain : {"dhondt", "linear", "sainte_lague"} or callable
        :math:`w(k)`, positive and non-increasing for :math:`k \ge 1` (a callable is checked on
        :math:`k = 1..R`).

    Returns
    -------
    list of int
        :math:`r_l`; :math:`\sum r_l = R` exactly.

    Notes
    -----
    Every layer first receives :math:`r_{min,l}`; the remaining :math:`R - \sum r_{min}` ranks go one at a
    time to the layer whose next rank has the largest gain :math:`c_l\,w(r_l + 1)` among those below their
    cap (ties: the lower layer index).  Cost :math:`O(R \log L)`.  The result maximises
    :math:`F(r) = \sum_l c_l \sum_{k = r_{min,l}+1}^{r_l} w(k)` over all feasible integer vectors
    (separable concave objective; exchange argument in ``proofs/25-budget-greedy.md``).

    Raises
    ------
    ValueError
        Empty or non-finite/negative scores, a bad budget or bound (named), an infeasible budget, an
        unknown or increasing ``gain``.
    """
    scores = [float(s) for s in scores]
    if not scores:
        raise ValueError("scores must hold at least one layer score")
    for i, s in enumerate(scores):
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"scores[{i}] must be finite and >= 0, got {s!r}")
    n = len(scores)
    _check_int(budget, "budget")
    lo = _per_layer(min_rank, n, "min_rank", 0)
    hi = _per_layer(max_rank, n, "max_rank", budget)
    for i, (a, b) in enumerate(zip(lo, hi)):
        if a > b:
            raise ValueError(f"min_rank[{i}]={a} exceeds max_rank[{i}]={b}")
    if not sum(lo) <= budget <= sum(hi):
        raise ValueError(f"budget must lie in [sum(min_rank), sum(max_rank)] = [{sum(lo)}, {sum(hi)}], got {budget}")
    if isinstance(gain, str):
        if gain not in GAINS:
            raise ValueError(f"gain must be one of {sorted(GAINS)} or a callable, got {gain!r}")
        w = GAINS[gain]
    elif callable(gain):
        w = gain
    else:
        raise ValueError(f"gain must be one of {sorted(GAINS)} or a callable, got {type(gain).__name__}")
    top = max(hi) if hi else 0
    ws = [float(w(k)) for k in range(1, top + 2)]
    if any(not math.isfinite(v) or v <= 0 for v in ws) or any(b > a for a, b in zip(ws, ws[1:])):
        raise ValueError("gain must give positive, finite, non-increasing weights w(1) >= w(2) >= ...")
    ranks = list(lo)
    heap = [(-scores[i] * ws[ranks[i]], i) for i in range(n) if ranks[i] < hi[i]]
    heapq.heapify(heap)
    for _ in range(budget - sum(lo)):
        _, i = heapq.heappop(heap)
        ranks[i] += 1
        if ranks[i] < hi[i]:
            heapq.heappush(heap, (-scores[i] * ws[ranks[i]], i))
    return ranks


def ablation_contributions(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> dict[str, float]:
    r"""Per adapted layer, the loss increase when its update alone is switched off.

    Parameters
    ----------
    model : nn.Module
        With adapters injected (any method), typically after a short pilot training.
    loss_fn : callable
        ``loss_fn(model) -> scalar tensor`` on a fixed batch (it must be deterministic).

    Returns
    -------
    dict of str to float
        :math:`c_l = L(\text{layer } l \text{ off}) - L(\text{all on})`; negative where the layer's update
        hurts.  ``L + 1`` forward passes under ``torch.no_grad``.
    """
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("model has no adapted layer; inject() adapters first")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model), got {type(loss_fn).__name__}")
    with torch.no_grad():
        full = float(loss_fn(model))
        out = {}
        for name, layer in layers.items():
            with layer.disable_adapter():
                out[name] = float(loss_fn(model)) - full
    return out


def colora_ranks(
    scores: Mapping[str, float],
    budget: int,
    *,
    min_rank: int = 0,
    max_rank: int | None = None,
    gain: str | Callable[[int], float] = "dhondt",
) -> dict[str, int]:
    """``{layer: rank}`` from ``{layer: contribution}``: negative ones count as 0, then :func:`allocate_ranks`."""
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty mapping {layer name: contribution}")
    names = list(scores)
    ranks = allocate_ranks([max(0.0, float(scores[k])) for k in names], budget, min_rank=min_rank,
                           max_rank=max_rank, gain=gain)
    return dict(zip(names, ranks))


def apply_ranks(model: nn.Module, ranks: Mapping[str, int], method: str = "lora", *,
                seed: int | None = 0, **cfg: Any) -> dict[str, nn.Module]:
    """Give every adapted layer named in ``ranks`` a fresh ``method`` adapter of that rank; return the new adapters.

    The new adapters are on the old ones' device and dtype; the optimizer must be built afterwards.  A rank
    of 0 is passed to the method, which refuses it unless it allows empty adapters (``codyra``, ``sora``).
    """
    layers = adapted_layers(model)
    unknown = sorted(set(ranks) - set(layers))
    if unknown:
        raise ValueError(f"ranks names layers that are not adapted: {unknown[:4]}")
    out = {}
    for name, r in ranks.items():
        _check_int(r, f"ranks[{name!r}]")
        layer = layers[name]
        old = layer.adapter
        p = next(old.parameters(), None)
        new = adapters.create(method, old.d_out, old.d_in, rank=r, seed=seed, **cfg)
        if p is not None:
            new = new.to(device=p.device, dtype=p.dtype)
        layer.adapter = new
        out[name] = new
    return out


# ============================================================================ TriAdaptLoRA threshold
def triadapt_growth_count(step: int, *, init_warmup: int, total_steps: int, target_total_rank: int,
                          current_total_rank: int, num_matrices: int, mode: str = "linear") -> int:
    r"""How many layers reach TriAdaptLoRA's growth threshold at ``step``: :math:`K \in [1, L]`.

    Parameters
    ----------
    step : int
        :math:`t`, with ``init_warmup < t <= total_steps``.
    init_warmup, total_steps : int
        :math:`t_w < T`.
    target_total_rank, current_total_rank : int
        :math:`R_{target} > R_t \ge 0`.
    num_matrices : int
        :math:`L \ge 1` adapted matrices.
    mode : {"linear", "non-linear"}
        :math:`K = \lfloor (R_{target} - R_t)\,\mu \rfloor` or
        :math:`\lfloor \exp(\mu \log(R_{target} - R_t)) \rfloor`, :math:`\mu = (t - t_w)/(T - t_w)`.

    Returns
    -------
    int
        :math:`\min(\max(K, 1), L)`, as the stored implementation clips it.
    """
    for name, v, low in (("step", step, 0), ("init_warmup", init_warmup, 0), ("total_steps", total_steps, 1),
                         ("target_total_rank", target_total_rank, 1), ("current_total_rank", current_total_rank, 0),
                         ("num_matrices", num_matrices, 1)):
        _check_int(v, name, low)
    if not init_warmup < total_steps:
        raise ValueError(f"init_warmup must be < total_steps, got {init_warmup} >= {total_steps}")
    if not init_warmup < step <= total_steps:
        raise ValueError(f"step must satisfy init_warmup < step <= total_steps, got {step}")
    if current_total_rank >= target_total_rank:
        raise ValueError(f"current_total_rank must be < target_total_rank, got {current_total_rank} >= "
                         f"{target_total_rank}")
    if mode not in ("linear", "non-linear"):
        raise ValueError(f"mode must be 'linear' or 'non-linear', got {mode!r}")
    mu = (step - init_warmup) / (total_steps - init_warmup)
    gap = target_total_rank - current_total_rank
    k = int(gap * mu) if mode == "linear" else int(math.exp(mu * math.log(gap)))
    return min(max(k, 1), num_matrices)


def triadapt_threshold(scores: Sequence[float], k: int) -> float:
    r"""The :math:`k`-th largest score: the layers with a score :math:`\ge` it grow (ties included)."""
    vals = [float(s) for s in scores]
    if not vals or any(not math.isfinite(v) for v in vals):
        raise ValueError("scores must be a non-empty sequence of finite numbers")
    _check_int(k, "k", 1)
    if k > len(vals):
        raise ValueError(f"k must be <= the number of scores ({len(vals)}), got {k}")
    return sorted(vals, reverse=True)[k - 1]
