r"""Schedules of the second-wave rank-allocation methods: CoDyRA (prune by gates) and TriAdaptLoRA (grow by blocks).

* :class:`CoDyRASchedule` -- :math:`\lambda\sum_l\|g_l\|_1` added to the loss; after each optimizer step
  the gates get the threshold :math:`\kappa_t` of
  :func:`~lowrank_theory.adapters.gated_rank.codyra_threshold` (dense warm-up, then a linear rise); at the
  last step the zero gates are cut; :meth:`CoDyRASchedule.end_task` merges each update into its frozen
  weight and starts a fresh adapter for the next task (continual learning as a sequence of LoRA tasks).
  arXiv:2412.01004.
* :class:`TriAdaptLoRASchedule` -- every ``interval`` steps after ``warmup`` each layer's score (the
  change of :math:`\|C\|_F/N` since the last event) is compared with the :math:`K`-th largest
  (:func:`~lowrank_theory.training.rank_budget.triadapt_growth_count`); the layers at or above it grow by
  ``add_rank`` (:meth:`~lowrank_theory.adapters.triangular.TriAdaptLoRA.grow_`).  arXiv:2501.08008.

Both follow :class:`~lowrank_theory.training.rank_change.RankSchedule`'s protocol (``extra_loss``,
``update``, ``step``), so :class:`~lowrank_theory.training.trainer.Trainer` can drive them as callbacks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..adapters.gated_rank import CODYRA_GATE_RULES, CoDyRA, codyra_threshold
from ..adapters.triangular import TriAdaptLoRA
from ..linalg.random import derive_seed
from .rank_budget import triadapt_growth_count, triadapt_threshold
from .rank_change import ParamRemap, RankChange, RankSchedule, _check_int, _check_pos

__all__ = ["CoDyRASchedule", "TriAdaptLoRASchedule"]


class CoDyRASchedule(RankSchedule):
    r"""CoDyRA: L1 on the gates, a rising threshold after each step, zero gates cut, merge at task end.

    Parameters
    ----------
    model : nn.Module
        With :class:`~lowrank_theory.adapters.gated_rank.CoDyRA` adapters injected.
    total_steps : int
        Steps of the current task, :math:`E`; the threshold is scheduled per step.
    lam : float
        :math:`\lambda \ge 0` of the loss term :math:`\lambda\sum_l\|g_l\|_1` (stored code: 1e-4).
    max_kappa : float
        :math:`\kappa_{max}` (stored code: 5e-3).
    dense_ratio : float
        Fraction of the task without threshold (stored code: 0.5).
    rule : {"soft", "hard_push"}
        The gate update (:func:`~lowrank_theory.adapters.gated_rank.codyra_gate_update`).
    seed : int
        Fresh adapters of task :math:`k` for layer ``name`` use ``derive_seed(seed, k, name)``.

    Notes
    -----
    :meth:`step` (after ``optimizer.step()``) applies :math:`g \leftarrow T_{\kappa_{t-1}}(g)` with
    ``codyra_threshold(t - 1, total_steps, ...)``; at ``t == total_steps`` it calls
    :meth:`~lowrank_theory.adapters.gated_rank.CoDyRA.prune_zero_gates` on every layer (exact: outputs
    unchanged) and remaps the optimizer.  The gate is also trained by the optimizer (on the loss with the
    L1 term), as in the stored code.
    """

    adapter_type = CoDyRA

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        *,
        lam: float = 1e-4,
        max_kappa: float = 5e-3,
        dense_ratio: float = 0.5,
        rule: str = "soft",
        seed: int = 0,
    ) -> None:
        super().__init__(model)
        self.total_steps = _check_int(total_steps, "total_steps", 1)
        self.lam = _check_pos(lam, "lam", allow_zero=True)
        self.max_kappa = _check_pos(max_kappa, "max_kappa", allow_zero=True)
        if isinstance(dense_ratio, bool) or not isinstance(dense_ratio, int | float) or not 0 <= dense_ratio < 1:
            raise ValueError(f"dense_ratio must be a number in [0, 1), got {dense_ratio!r}")
        self.dense_ratio = float(dense_ratio)
        if rule not in CODYRA_GATE_RULES:
            raise ValueError(f"rule must be one of {CODYRA_GATE_RULES}, got {rule!r}")
        self.rule = rule
        self.seed = _check_int(seed, "seed")
        self.task = 0
        self.initial_ranks = self.ranks()

    def kappa(self, step: int) -> float:
        """:math:`\\kappa` applied after step ``step`` (1-based)."""
        _check_int(step, "step", 1)
        return codyra_threshold(min(step, self.total_steps) - 1, self.total_steps, self.max_kappa, self.dense_ratio)

    def extra_loss(self, trainer: Any = None) -> torch.Tensor | None:
        if not self.lam:
            return None
        terms = [m.adapter.sparsity_penalty() for m in self.layers().values() if m.adapter.rank > 0]
        return self.lam * torch.stack(terms).sum() if terms else None

    def active_ranks(self) -> dict[str, int]:
        """Nonzero gates per layer."""
        return {n: m.adapter.active_rank for n, m in self.layers().items()}

    @torch.no_grad()
    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> RankChange | None:
        _check_int(step, "step", 1)
        kappa = self.kappa(step)
        for layer in self.layers().values():
            if kappa > 0 and layer.adapter.rank > 0:
                layer.adapter.threshold_(kappa, self.rule)
        if step != self.total_steps:
            return None
        return self.prune(optimizer, step)

    @torch.no_grad()
    def prune(self, optimizer: torch.optim.Optimizer | None = None, step: int = 0) -> RankChange | None:
        """Cut the zero gates of every layer now (exact); remap ``optimizer``."""
        change = RankChange(step)
        for name, layer in self.layers().items():
            ad = layer.adapter
            before, old = ad.rank, (ad.A, ad.B, ad.gate)
            idx = ad.prune_zero_gates()
            change.remaps += [ParamRemap(old[0], ad.A, 0, idx), ParamRemap(old[1], ad.B, 1, idx),
                              ParamRemap(old[2], ad.gate, 0, idx)]
            if idx.numel() != before:
                change.ranks[name] = (before, ad.rank)
        return self._finish(change, optimizer)

    @torch.no_grad()
    def end_task(self, total_steps: int | None = None) -> dict[str, int]:
        r"""Merge every layer's (pruned) update into its frozen weight and give it a fresh CoDyRA adapter.

        Returns the ranks that were merged.  The fresh adapters have the initial rank and config, seeds
        ``derive_seed(seed, task, name)``; :math:`\Delta W = 0`, so the model computes what the merged one
        does.  Build a new optimizer for the next task (``total_steps`` resets the threshold schedule).
        """
        merged = {}
        self.task += 1
        for name, layer in self.layers().items():
            ad = layer.adapter
            if ad.rank > 0:
                ad.prune_zero_gates()
            merged[name] = ad.rank
            if layer.merged:
                raise ValueError(f"layer {name!r} is merged already; unmerge() it before end_task()")
            w, b = layer.merged_weights()
            layer._write(w, b)  # the update now lives in the frozen weight
            cfg = {k: v for k, v in ad.config().items() if k not in ("rank", "alpha", "seed")}
            r0 = self.initial_ranks.get(name, ad.rank)
            fresh = CoDyRA(ad.d_out, ad.d_in, rank=r0, alpha=ad.scale * r0,
                           seed=derive_seed(self.seed, self.task, name), **cfg)
            p = next(ad.parameters(), None)
            if p is not None:
                fresh = fresh.to(device=p.device, dtype=p.dtype)
            layer.adapter = fresh
        if total_steps is not None:
            self.total_steps = _check_int(total_steps, "total_steps", 1)
        return merged

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, "initial_ranks": dict(self.initial_ranks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task = int(state.get("task", 0))
        if "initial_ranks" in state:
            self.initial_ranks = {str(k): int(v) for k, v in dict(state["initial_ranks"]).items()}


class TriAdaptLoRASchedule(RankSchedule):
    r"""TriAdaptLoRA: grow the layers whose normalized core norm moved most, under a linear threshold.

    Parameters
    ----------
    model : nn.Module
        With :class:`~lowrank_theory.adapters.triangular.TriAdaptLoRA` adapters.
    total_steps : int
        :math:`T`.
    target_total_rank : int
        :math:`R_{target}`, the summed rank to grow to (stored default: reference rank × layers).
    warmup : int
        :math:`t_w < T`: no growth before.
    interval : int
        A growth event every ``interval`` steps.
    add_rank : int
        Block size of each growth (stored default: half the reference rank).
    mode : {"linear", "non-linear"}
        Threshold rule (:func:`~lowrank_theory.training.rank_budget.triadapt_growth_count`).
    seed : int
        New block of layer ``name`` at step ``t``: ``derive_seed(seed, t, name)``.

    Notes
    -----
    Score of layer :math:`l` at an event: :math:`\|C_l\|_F/N_l` now minus its value right after the previous
    event (or at construction).  Taking the reference *after* a growth (the stored code takes it before) keeps
    the score a measure of training, not of the growth itself.  A growth that would pass
    :math:`R_{target}` is skipped (the stored code may overshoot), so the total never exceeds the target.
    """

    adapter_type = TriAdaptLoRA

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        target_total_rank: int,
        *,
        warmup: int = 0,
        interval: int = 1,
        add_rank: int = 1,
        mode: str = "linear",
        seed: int = 0,
    ) -> None:
        super().__init__(model)
        self.total_steps = _check_int(total_steps, "total_steps", 1)
        self.warmup = _check_int(warmup, "warmup")
        if warmup >= total_steps:
            raise ValueError(f"warmup must be < total_steps, got {warmup} >= {total_steps}")
        self.interval = _check_int(interval, "interval", 1)
        self.add_rank = _check_int(add_rank, "add_rank", 1)
        if mode not in ("linear", "non-linear"):
            raise ValueError(f"mode must be 'linear' or 'non-linear', got {mode!r}")
        self.mode = mode
        self.seed = _check_int(seed, "seed")
        total = sum(self.ranks().values())
        _check_int(target_total_rank, "target_total_rank", 1)
        if target_total_rank < total:
            raise ValueError(f"target_total_rank={target_total_rank} is below the current total rank {total}")
        self.target_total_rank = target_total_rank
        self.reference = {n: m.adapter.normalized_core_norm() for n, m in self.layers().items()}

    def scores(self) -> dict[str, float]:
        """Change of :math:`\\|C\\|_F/N` per layer since the last event."""
        return {n: m.adapter.normalized_core_norm() - self.reference.get(n, 0.0) for n, m in self.layers().items()}

    @torch.no_grad()
    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> RankChange | None:
        _check_int(step, "step")
        total = sum(self.ranks().values())
        if total >= self.target_total_rank or step <= self.warmup or step % self.interval != 0 \
                or step > self.total_steps:
            return None
        layers = self.layers()
        scores = self.scores()
        k = triadapt_growth_count(step, init_warmup=self.warmup, total_steps=self.total_steps,
                                  target_total_rank=self.target_total_rank, current_total_rank=total,
                                  num_matrices=len(layers), mode=self.mode)
        thr = triadapt_threshold(list(scores.values()), k)
        change = RankChange(step)
        room = self.target_total_rank - total
        for name, layer in layers.items():
            ad = layer.adapter
            add = self.add_rank
            if scores[name] < thr or add > room or ad.rank + add > min(ad.d_out, ad.d_in):
                continue
            before = ad.rank
            for old, new, dim, index in ad.grow_(add, seed=derive_seed(self.seed, step, name)):
                change.remaps.append(ParamRemap(old, new, dim, index))
            change.ranks[name] = (before, ad.rank)
            room -= add
        self.reference = {n: m.adapter.normalized_core_norm() for n, m in layers.items()}
        return self._finish(change, optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"reference": dict(self.reference)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = {str(k): float(v) for k, v in dict(state.get("reference", {})).items()}
