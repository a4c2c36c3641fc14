r"""SNELLA's adaptive bi-level sparsity allocation: layers compete for a global count of kept entries.

Inside a layer the :class:`~lowrank_theory.adapters.kernel_sparse.SNELLA` adapter keeps its k entries of largest
:math:`|M|`; across layers this rule decides each layer's k from an importance score, end to end during training:

* **Importance** (after each backward, :meth:`BilevelAllocator.update_importance`): for every factor entry
  :math:`I = |\theta \odot \nabla_\theta L|`, smoothed :math:`\bar I \leftarrow \beta_1 \bar I + (1-\beta_1) I` and its
  uncertainty :math:`\bar U \leftarrow \beta_2 \bar U + (1-\beta_2)|I - \bar I|` (AdaLoRA's sensitivity × uncertainty);
  the layer score is :math:`s_l = \operatorname{mean}(\bar I_A \bar U_A) + \operatorname{mean}(\bar I_B \bar U_B)`.
* **Volume** (:func:`cubic_volume`): the total kept count falls from ``init_volume`` to ``target_volume`` on a
  cubic schedule between ``warmup`` and ``total_steps - final_warmup`` (AdaLoRA's budget schedule, as the
  authors' ``schedule_threshold``), and a re-allocation happens every ``interval`` steps.
* **Allocation** (:func:`allocate_volume`): split the volume over the layers in proportion to :math:`s_l`, capped
  at each layer's m·n, the excess of capped layers shared again among the others.

The authors' allocator does the proportional split in floating point and truncates, so its sum can fall short
of the volume; :func:`allocate_volume` is the integer version (water-filling then largest remainders) whose
counts sum to the volume exactly.

The authors parametrize by *sparsity* (fraction dropped): ``init_thres`` and ``target_ratio`` are this
module's ``1 - init_density`` and ``1 - target_density`` (their scripts: VTAB CIFAR 0.01 -> 0.8, FGVC CUB 0 -> 0.3,
no warm-up, a re-allocation every step of their schedule, which counts epochs; ``beta1 = beta2 = 0.85``).

What was read: the authors' ``sparse_allocator.py`` (github.com/ssfgunner/SNELL: ``Allocator.schedule_threshold``,
``update_ipt``, ``calculate_score``, ``param_alloc``, ``mask_to_target_ratio``) and the abstract and opening of
arXiv:2510.24037.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..adapters.kernel_sparse import SNELLA

__all__ = ["BilevelAllocator", "allocate_volume", "cubic_volume"]


def allocate_volume(scores: Sequence[float], volume: int, capacities: Sequence[int]) -> list[int]:
    r"""Integer counts :math:`k_l \le c_l` with :math:`\sum_l k_l = \min(V, \sum_l c_l)`, proportional to the scores.

    Water-filling: a layer whose proportional share :math:`V' s_l / \sum s` (over the uncapped layers, with
    :math:`V'` the volume they still share) reaches its capacity is capped and the rest re-shared; the uncapped
    shares are floored and the leftover units go to the largest fractional parts (ties: the lower index).
    Layers of score 0 get nothing until the positive-score layers are full; then (or when every score is 0) they
    share the rest equally.  Each count is within 1 of the real-valued water-fill.  (The authors' loop gives
    zero-score layers nothing and does not end when the others are full.)

    Raises
    ------
    TypeError, ValueError
        Lengths differ or are 0, a negative or non-finite score, a negative capacity or volume.
    """
    s = [float(v) for v in scores]
    caps = [int(c) for c in capacities]
    if not s or len(s) != len(caps):
        raise ValueError(f"scores and capacities must have the same non-zero length, got {len(s)} and {len(caps)}")
    if any(not math.isfinite(v) or v < 0 for v in s):
        raise ValueError("scores must be finite and non-negative")
    if any(c < 0 for c in caps):
        raise ValueError("capacities must be >= 0")
    if isinstance(volume, bool) or not isinstance(volume, int) or volume < 0:
        raise ValueError(f"volume must be an int >= 0, got {volume!r}")
    if sum(s) == 0:
        s = [1.0] * len(s)
    V = min(volume, sum(caps))
    out = [0] * len(s)
    free = [i for i in range(len(s)) if caps[i] > 0]
    left = V
    while True:
        tot = sum(s[i] for i in free)
        if tot == 0:  # only zero-score layers left: share uniformly among them
            weights = {i: 1.0 for i in free}
            tot = float(len(free))
        else:
            weights = {i: s[i] for i in free}
        capped = [i for i in free if left * weights[i] / tot >= caps[i]]
        if not capped:
            break
        for i in capped:
            out[i] = caps[i]
            left -= caps[i]
        free = [i for i in free if i not in capped]
        if not free:
            break
    if free and left > 0:
        tot = sum(weights[i] for i in free)
        exact = {i: left * weights[i] / tot for i in free}
        for i in free:
            out[i] = math.floor(exact[i])
        rest = left - sum(out[i] for i in free)
        for i in sorted(free, key=lambda i: (-(exact[i] - math.floor(exact[i])), i))[:rest]:
            out[i] += 1
    return out


def cubic_volume(step: int, init_volume: int, target_volume: int, warmup: int, final_warmup: int,
                 total_steps: int) -> int:
    r"""The kept-entry volume at ``step``: ``init_volume`` up to ``warmup``, ``target_volume`` after
    ``total_steps - final_warmup``, and :math:`V_T + (V_0 - V_T)(1 - \frac{t - t_w}{T - t_f - t_w})^3` between."""
    if total_steps <= warmup + final_warmup:
        raise ValueError(f"total_steps={total_steps} must exceed warmup + final_warmup = {warmup + final_warmup}")
    if step <= warmup:
        return int(init_volume)
    if step > total_steps - final_warmup:
        return int(target_volume)
    frac = 1 - (step - warmup) / (total_steps - final_warmup - warmup)
    return int(target_volume + (init_volume - target_volume) * frac ** 3)


class BilevelAllocator:
    """SNELLA's allocation across the :class:`~lowrank_theory.adapters.kernel_sparse.SNELLA` adapters of a model.

    Parameters
    ----------
    model : nn.Module
        Holds the SNELLA adapters (found by type; order: ``named_modules``).
    target_density : float in [0, 1]
        Final mean kept fraction :math:`V_T / \\sum_l m_l n_l`.
    init_density : float in [0, 1], optional
        Kept fraction before and during warm-up; default each adapter's current one.
    warmup, final_warmup, total_steps, interval : int
        The cubic schedule (see :func:`cubic_volume`); re-allocate every ``interval`` steps in the decay, every
        step of the final phase (the authors' ``mask_ind``).
    beta1, beta2 : float in (0, 1)
        EMA factors of the importance and of its uncertainty (0.85 and 0.85 in the authors' scripts).

    Use: ``loss.backward(); alloc.update_importance(); opt.step(); alloc.step(t)``.
    """

    def __init__(self, model: nn.Module, target_density: float, *, init_density: float | None = None,
                 warmup: int = 0, final_warmup: int = 0, total_steps: int = 100, interval: int = 1,
                 beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.adapters: dict[str, SNELLA] = {n: m for n, m in model.named_modules() if isinstance(m, SNELLA)}
        if not self.adapters:
            raise ValueError("model holds no SNELLA adapter")
        for name, v in (("target_density", target_density), ("init_density", init_density)):
            if v is not None and not (isinstance(v, int | float) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        for name, v in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 < v < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {v!r}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.capacities = [a.d_out * a.d_in for a in self.adapters.values()]
        total = sum(self.capacities)
        self.init_volume = (sum(a.keep for a in self.adapters.values()) if init_density is None
                            else round(init_density * total))
        self.target_volume = round(target_density * total)
        self.warmup, self.final_warmup, self.total_steps, self.interval = warmup, final_warmup, total_steps, interval
        cubic_volume(0, 1, 0, warmup, final_warmup, total_steps)  # validates the schedule
        self.beta1, self.beta2 = beta1, beta2
        self.ema: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update_importance(self) -> None:
        """Fold the current :math:`|\\theta \\odot \\nabla\\theta|` of every factor into the EMAs (after backward)."""
        for name, ad in self.adapters.items():
            for key, ipt in ad.importance().items():
                k = f"{name}.{key}"
                if k not in self.ema:
                    self.ema[k] = torch.zeros_like(ipt)
                    self.unc[k] = torch.zeros_like(ipt)
                self.ema[k] = self.beta1 * self.ema[k] + (1 - self.beta1) * ipt
                self.unc[k] = self.beta2 * self.unc[k] + (1 - self.beta2) * (ipt - self.ema[k]).abs()

    def scores(self) -> dict[str, float]:
        """Layer scores :math:`s_l` (0 for a layer with no importance yet)."""
        out = {}
        for name in self.adapters:
            out[name] = sum(float((self.ema[k] * self.unc[k]).mean()) for k in (f"{name}.A", f"{name}.B")
                            if k in self.ema)
        return out

    def volume(self, step: int) -> int:
        return cubic_volume(step, self.init_volume, self.target_volume, self.warmup, self.final_warmup,
                            self.total_steps)

    def allocate(self, volume: int) -> dict[str, int]:
        """Split ``volume`` over the layers by their scores and set each adapter's k; return the counts."""
        counts = allocate_volume(list(self.scores().values()), volume, self.capacities)
        for ad, k in zip(self.adapters.values(), counts):
            ad.set_keep(k)
        return dict(zip(self.adapters, counts))

    def step(self, step: int) -> dict[str, int] | None:
        """Re-allocate when the schedule says so (warm-up: never; decay: every ``interval``; final: always)."""
        if step <= self.warmup:
            return None
        if step <= self.total_steps - self.final_warmup and step % self.interval:
            return None
        return self.allocate(self.volume(step))

    def densities(self) -> Mapping[str, float]:
        return {n: a.keep / (a.d_out * a.d_in) for n, a in self.adapters.items()}
