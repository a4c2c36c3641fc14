r"""Rank schedules that really change the rank: AdaLoRA, SoRA, IncreLoRA and LoRA-Squeeze.

Every schedule here replaces adapter tensors by *new, smaller or larger* ``nn.Parameter``
objects (or replaces a whole adapter), so ``num_trainable`` and the cost of the forward change
-- nothing is merely masked.  The four rules:

* :class:`AdaLoRASchedule` -- AdaLoRA's importance-driven pruning of SVD triplets down to a
  cubic budget (:class:`~lowrank_theory.adapters.adaptive_rank.AdaLoRAImportance`,
  :func:`~lowrank_theory.adapters.adaptive_rank.adalora_budget`); arXiv:2303.10512.
* :class:`SoRASchedule` -- SoRA's proximal step on the gate with an increasing
  :math:`\lambda`, and the zero gates cut; arXiv:2311.11696.
* :class:`~lowrank_theory.training.increlora.IncreLoRASchedule` -- IncreLoRA: add rank-1
  triplets to the modules of highest importance; arXiv:2308.12043 (own module, re-exported).
* :class:`LoRASqueezeSchedule` (in-tuning annealing) and :func:`squeeze_model` (post-hoc) --
  LoRA-Squeeze, the best lower-rank approximation of :math:`sBA` computed from the factors;
  arXiv:2602.10993.

Optimizers.  An optimizer holds references to the old tensors (in ``param_groups`` and as the
keys of ``optimizer.state``).  After a rank change call :func:`remap_optimizer` with the
:class:`ParamRemap` list of the returned :class:`RankChange` -- every schedule does it itself
when given the optimizer -- which swaps the new tensors into the *same* optimizer object (so an
LR scheduler bound to it keeps working) and carries the state over: tensors shaped like the old
parameter are sliced along the changed axis (a pruned coordinate's moments go with it, a new
coordinate starts at zero), scalars such as Adam's ``step`` are kept, and any other state (e.g.
LoRA-Pro's weight-space moments, or anything of a replaced basis) is dropped so that the rule
restarts cleanly for that tensor (:mod:`~lowrank_theory.training.rank_change`).  A
:class:`~torch.nn.parallel.DistributedDataParallel` wrapper must also be rebuilt
(:class:`~lowrank_theory.training.trainer.Trainer` does both).

Use by hand::

    sched = AdaLoRASchedule(model, target_rank=2, total_steps=T)
    for t in range(1, T + 1):
        loss = loss_fn(model)
        reg = sched.extra_loss()      # AdaLoRA's orthogonality penalty (None for some rules)
        (loss if reg is None else loss + reg).backward()
        sched.update()                # after backward, before optimizer.step()
        opt.step()
        sched.step(t, optimizer=opt)  # may change ranks; opt is remapped in place
        opt.zero_grad()

Under DDP every decision is taken from all-reduced quantities (parameter gradients, or
explicitly all-reduced scores), so all ranks change the same tensors the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..adapters import AdaptedLinear
from ..adapters.adaptive_rank import (
    AdaLoRA,
    AdaLoRAImportance,
    SoRA,
    adalora_budget,
    sora_lambda_schedule,
    sora_proximal_step,
)
from ..adapters.lowrank import LoRA
from ..adapters.squeeze import squeeze_lora, squeeze_schedule
from ..linalg.random import derive_seed
from .increlora import IncreLoRASchedule, grow_adalora
from .injection import adapted_layers
from .rank_change import ParamRemap, RankChange, RankSchedule, _check_int, _check_pos, remap_optimizer

__all__ = [
    "SCHEDULES",
    "AdaLoRASchedule",
    "IncreLoRASchedule",
    "LoRASqueezeSchedule",
    "ParamRemap",
    "RankChange",
    "RankSchedule",
    "SoRASchedule",
    "grow_adalora",
    "make_schedule",
    "remap_optimizer",
    "squeeze_model",
]


# ============================================================================ AdaLoRA
class AdaLoRASchedule(RankSchedule):
    r"""AdaLoRA: prune SVD triplets by importance down to a cubic budget schedule.

    Parameters
    ----------
    model : nn.Module
        With :class:`~lowrank_theory.adapters.adaptive_rank.AdaLoRA` adapters injected.
    total_steps : int
        :math:`T`.
    target_rank : float, optional
        Average final rank per layer; the target budget is ``round(target_rank * L)``.
    target_budget : int, optional
        The final total number of triplets :math:`b^{(T)}` (instead of ``target_rank``).
    t_init, t_final : int
        Steps at the full budget first, and at the target budget last (paper's :math:`t_i, t_f`).
    delta_t : int
        Prune every ``delta_t`` steps (:math:`\Delta_T`).
    beta1, beta2 : float
        EMA factors of the sensitivity and uncertainty.
    orth_reg : float
        Weight :math:`\gamma` of the orthogonality penalty returned by :meth:`extra_loss`.

    Notes
    -----
    After step :math:`t` (gradients still present, as PEFT's ``update_and_allocate`` after
    ``optimizer.step()``) the importance EMAs are updated; when :math:`t > t_i` and
    :math:`t \equiv 0 \bmod \Delta_T` (or :math:`t > T - t_f`) and the budget
    :math:`b^{(t)}` (Eq. 12) is below the current number of triplets, the globally least
    important triplets are **cut** (``prune_to``: smaller P, λ, Q), where PEFT only zeroes λ.
    The loss gets :math:`\gamma \sum_l R(P_l, Q_l)` (Eq. 4).

    References
    ----------
    Q. Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
    arXiv:2303.10512.
    """

    adapter_type = AdaLoRA

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        target_rank: float | None = None,
        *,
        target_budget: int | None = None,
        t_init: int = 0,
        t_final: int = 0,
        delta_t: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg: float = 0.1,
    ) -> None:
        super().__init__(model)
        self.total_steps = _check_int(total_steps, "total_steps", 1)
        self.t_init, self.t_final = _check_int(t_init, "t_init"), _check_int(t_final, "t_final")
        self.delta_t = _check_int(delta_t, "delta_t", 1)
        if t_init + t_final >= total_steps:
            raise ValueError(f"total_steps must exceed t_init + t_final, got {total_steps} <= {t_init} + {t_final}")
        self.orth_reg = _check_pos(orth_reg, "orth_reg", allow_zero=True)
        self.initial_budget = sum(self.ranks().values())
        if (target_rank is None) == (target_budget is None):
            raise ValueError("give exactly one of target_rank and target_budget")
        if target_budget is None:
            _check_pos(target_rank, "target_rank", allow_zero=True)
            target_budget = round(float(target_rank) * len(self.layers()))
        _check_int(target_budget, "target_budget")
        if target_budget > self.initial_budget:
            raise ValueError(
                f"target_budget must be <= the initial total rank {self.initial_budget}, got {target_budget}"
            )
        self.target_budget = target_budget
        self.beta1, self.beta2 = beta1, beta2
        self.importance = AdaLoRAImportance([m.adapter for m in self.layers().values()], beta1, beta2)

    def budget(self, step: int) -> int:
        """:math:`b^{(t)}` at ``step``."""
        return adalora_budget(step, initial_budget=self.initial_budget, target_budget=self.target_budget,
                              total_steps=self.total_steps, t_init=self.t_init, t_final=self.t_final)

    def extra_loss(self, trainer: Any = None) -> torch.Tensor | None:
        if not self.orth_reg:
            return None
        terms = [m.adapter.orthogonal_penalty() for m in self.layers().values() if m.adapter.rank > 0]
        return self.orth_reg * torch.stack(terms).sum() if terms else None

    def _sync_importance(self) -> None:
        ads = [m.adapter for m in self.layers().values()]
        if [id(a) for a in ads] != [id(a) for a in self.importance.adapters]:
            raise ValueError("the AdaLoRA adapters were replaced outside this schedule; load_state_dict() again")

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> RankChange | None:
        _check_int(step, "step")
        self._sync_importance()
        if any(getattr(a, n).grad is None for a in self.importance.adapters for n in ("P", "lam", "Q")):
            return None  # no backward since the last step (e.g. evaluation only)
        self.importance.update()
        current = sum(self.ranks().values())
        due = step > self.t_init and (step % self.delta_t == 0 or step > self.total_steps - self.t_final)
        budget = self.budget(min(step, self.total_steps))
        if not due or budget >= current:
            return None
        names = list(self.layers())
        before = self.ranks()
        olds = [(a.P, a.lam, a.Q) for a in self.importance.adapters]
        kept = self.importance.allocate(budget)
        change = RankChange(step)
        for name, ad, (P, lam, Q), idx in zip(names, self.importance.adapters, olds, kept):
            if ad.P is not P:  # prune_to makes new tensors even when it keeps every triplet
                change.remaps += [ParamRemap(P, ad.P, 1, idx), ParamRemap(lam, ad.lam, 0, idx),
                                  ParamRemap(Q, ad.Q, 0, idx)]
            if idx.numel() != before[name]:
                change.ranks[name] = (before[name], ad.rank)
        return self._finish(change, optimizer)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, ib, ub in zip(self.layers(), self.importance.ipt_bar, self.importance.unc_bar):
            for k, v in ib.items():
                out[f"ipt.{name}.{k}"] = v.detach().clone()
            for k, v in ub.items():
                out[f"unc.{name}.{k}"] = v.detach().clone()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the importance tracker on the current adapters and fill its EMAs."""
        layers = self.layers()
        self.importance = AdaLoRAImportance([m.adapter for m in layers.values()], self.beta1, self.beta2)
        for i, (name, layer) in enumerate(layers.items()):
            for which, store in (("ipt", self.importance.ipt_bar[i]), ("unc", self.importance.unc_bar[i])):
                for k in AdaLoRAImportance._names:
                    key = f"{which}.{name}.{k}"
                    if key in state:
                        want = tuple(getattr(layer.adapter, k).shape)
                        if tuple(state[key].shape) != want:
                            raise ValueError(f"schedule state {key!r} has shape {tuple(state[key].shape)}, want {want}")
                        store[k] = state[key].to(getattr(layer.adapter, k))


# ============================================================================ SoRA
class SoRASchedule(RankSchedule):
    r"""SoRA: proximal-gradient steps on the gates with a rising :math:`\lambda`; zero gates cut.

    Parameters
    ----------
    model : nn.Module
        With :class:`~lowrank_theory.adapters.adaptive_rank.SoRA` adapters injected.
    total_steps : int
        :math:`T`; split into ``num_stages`` equal stages.
    lr : float
        Gate step size :math:`\eta`.
    lam0, lam_max : float
        First and last sparsity weight (:func:`~lowrank_theory.adapters.adaptive_rank.sora_lambda_schedule`).
    num_stages : int
        Number of :math:`\lambda` values; zero gates are cut at the end of every stage.
    kind : {"linear", "exp_linear", "log_linear"}
        Spacing of the :math:`\lambda` values.
    gate_step : {"adam", "sgd"}
        The smooth part of the gate update.  ``"sgd"``: :math:`d = \nabla_g L_0` (paper Eq. 5, the
        textbook proximal-gradient step).  ``"adam"`` (default, the authors' ``SparseAdamW``):
        :math:`d = \hat m / (\sqrt{v} + \epsilon)\cdot\sqrt{1-\beta_2^t}/(1-\beta_1^t)` from Adam's
        moments of :math:`\nabla_g L_0` (:math:`\beta = (0.9, 0.999)`, :math:`\epsilon = 10^{-6}`,
        the Hugging Face AdamW form the authors subclass), so a gate moves by about :math:`\eta`
        per step whatever the scale of its gradient.
    betas, eps : tuple of float, float
        Adam's constants for ``gate_step="adam"``.

    Notes
    -----
    :meth:`update` (after backward) takes each gate's gradient :math:`\nabla_g L_0` and sets
    ``gate.grad = None``, so the ordinary optimizer (AdamW skips tensors without a gradient)
    leaves the gate alone; :meth:`step` then applies
    :math:`g \leftarrow T_{\eta\lambda_k}(g - \eta\, d)` and, at the end of stage :math:`k`,
    :meth:`~lowrank_theory.adapters.adaptive_rank.SoRA.prune_zero_gates` (the Adam moments of
    the kept gates are kept).  The threshold :math:`\eta\lambda_k` is the paper's and that of the
    authors' ``sparse_optimizer_multiply_lr.py``; their ``sparse_optimizer.py`` thresholds by
    :math:`\lambda_k` alone, which is this schedule with :math:`\lambda_k / \eta`.
    Why Adam matters: on MiniLM the gate gradients are about :math:`10^{-3}`, so plain SGD steps
    at the paper's :math:`\eta` barely move the gates and the ranks kept are those of the initial
    gates under the threshold.  Any regularizer added to the loss would be outside the proximal
    step; SoRA needs none.

    References
    ----------
    N. Ding et al., "Sparse Low-rank Adaptation of Pre-trained Language Models", arXiv:2311.11696.
    """

    adapter_type = SoRA

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        lr: float = 1e-2,
        lam0: float = 1e-3,
        lam_max: float = 1e-2,
        *,
        num_stages: int = 1,
        kind: str = "linear",
        gate_step: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
    ) -> None:
        super().__init__(model)
        self.total_steps = _check_int(total_steps, "total_steps", 1)
        self.lr = _check_pos(lr, "lr")
        self.num_stages = _check_int(num_stages, "num_stages", 1)
        if num_stages > total_steps:
            raise ValueError(f"num_stages must be <= total_steps={total_steps}, got {num_stages}")
        if gate_step not in ("adam", "sgd"):
            raise ValueError(f"gate_step must be 'adam' or 'sgd', got {gate_step!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.gate_step = gate_step
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _check_pos(eps, "eps")
        self.lambdas = sora_lambda_schedule(lam0, lam_max, num_stages, kind)
        self._grads: dict[str, torch.Tensor] = {}
        self._moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # Adam's (m, v) per layer
        self._adam_steps = 0

    def stage(self, step: int) -> int:
        """Index of the stage that step ``step`` (1-based) belongs to."""
        return min((max(step, 1) - 1) * self.num_stages // self.total_steps, self.num_stages - 1)

    def stage_end(self, step: int) -> bool:
        """True when ``step`` is the last step of a stage."""
        return step >= self.total_steps or self.stage(step + 1) != self.stage(step)

    def update(self) -> None:
        for name, layer in self.layers().items():
            gate = layer.adapter.gate
            grad = torch.zeros_like(gate) if gate.grad is None else gate.grad.detach().clone()
            self._grads[name] = grad
            gate.grad = None

    def _direction(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The smooth step's direction d for one layer's gate (see ``gate_step``)."""
        if self.gate_step == "sgd":
            return grad
        b1, b2 = self.betas
        m, v = self._moments.get(name) or (torch.zeros_like(grad), torch.zeros_like(grad))
        m = m.mul(b1).add_(grad, alpha=1.0 - b1)
        v = v.mul(b2).addcmul_(grad, grad, value=1.0 - b2)
        self._moments[name] = (m, v)
        t = self._adam_steps
        return m / (v.sqrt() + self.eps) * (math.sqrt(1.0 - b2**t) / (1.0 - b1**t))

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"adam_steps": self._adam_steps}
        for name, (m, v) in self._moments.items():
            out[f"m.{name}"], out[f"v.{name}"] = m.detach().clone(), v.detach().clone()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._adam_steps = int(state.get("adam_steps", 0))
        self._moments = {}
        for name, layer in self.layers().items():
            if f"m.{name}" in state:
                want = tuple(layer.adapter.gate.shape)
                m, v = state[f"m.{name}"], state[f"v.{name}"]
                if tuple(m.shape) != want or tuple(v.shape) != want:
                    raise ValueError(f"schedule state for {name!r} has shape {tuple(m.shape)}, want {want}")
                self._moments[name] = (m.to(layer.adapter.gate), v.to(layer.adapter.gate))

    @torch.no_grad()
    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> RankChange | None:
        _check_int(step, "step")
        lam = self.lambdas[self.stage(step)]
        layers = self.layers()
        if self._grads:
            self._adam_steps += 1
            for name, layer in layers.items():
                gate = layer.adapter.gate
                grad = self._grads.get(name, torch.zeros_like(gate)).to(gate)
                gate.copy_(sora_proximal_step(gate, self._direction(name, grad), self.lr, lam))
            self._grads = {}
        if not self.stage_end(step):
            return None
        change = RankChange(step)
        for name, layer in layers.items():
            ad = layer.adapter
            before = ad.rank
            old = (ad.A, ad.B, ad.gate)
            idx = ad.prune_zero_gates()
            if name in self._moments:
                self._moments[name] = tuple(t[idx.to(t.device)] for t in self._moments[name])
            if ad.A is not old[0]:  # new tensors even when no gate is zero
                change.remaps += [ParamRemap(old[0], ad.A, 0, idx), ParamRemap(old[1], ad.B, 1, idx),
                                  ParamRemap(old[2], ad.gate, 0, idx)]
            if idx.numel() != before:
                change.ranks[name] = (before, ad.rank)
        return self._finish(change, optimizer)


# ============================================================================ LoRA-Squeeze
def _squeeze_layer(name: str, layer: AdaptedLinear, rank: int, randomized: bool, seed: int | None) -> list[ParamRemap]:
    ad = layer.adapter
    new = squeeze_lora(ad, rank, alpha=ad.scale * rank, randomized=randomized, seed=seed)
    new.A.requires_grad_(ad.A.requires_grad)
    new.B.requires_grad_(ad.B.requires_grad)
    new.train(ad.training)
    layer.adapter = new
    return [ParamRemap(ad.A, new.A), ParamRemap(ad.B, new.B)]


def squeeze_model(
    model: nn.Module,
    target_rank: int,
    *,
    randomized: bool = False,
    seed: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
) -> RankChange:
    r"""Post-hoc LoRA-Squeeze: replace every LoRA adapter of rank :math:`> r` by its best rank-:math:`r` version.

    Parameters
    ----------
    model : nn.Module
        With :class:`~lowrank_theory.adapters.lowrank.LoRA` adapters (or subclasses).
    target_rank : int
        :math:`r \ge 1`; adapters already at or below it are left alone.
    randomized : bool
        Randomized range finder instead of the exact factored SVD.
    seed : int, optional
        Layer ``name`` uses ``derive_seed(seed, step, name)`` for its sketch.
    optimizer : torch.optim.Optimizer, optional
        Remapped in place (the new factors start with fresh state: they are a new basis).
    step : int
        Recorded in the returned change.

    Returns
    -------
    RankChange

    Notes
    -----
    Each new adapter is a plain LoRA with the *same* scale :math:`s`, whose :math:`sB'A'` is
    the Eckart--Young best rank-:math:`r` approximation of :math:`sBA`
    (:func:`~lowrank_theory.adapters.squeeze.squeeze_lora`, never forming the product).
    """
    _check_int(target_rank, "target_rank", 1)
    layers = {n: m for n, m in adapted_layers(model).items() if isinstance(m.adapter, LoRA)}
    if not layers:
        raise ValueError("squeeze_model needs LoRA adapters in the model; inject(model, 'lora', ...) first")
    change = RankChange(step)
    for name, layer in layers.items():
        before = layer.adapter.rank
        if before <= target_rank:
            continue
        s = None if seed is None else derive_seed(seed, step, name)
        change.remaps += _squeeze_layer(name, layer, target_rank, randomized, s)
        change.ranks[name] = (before, target_rank)
    if optimizer is not None and change:
        remap_optimizer(optimizer, change.remaps)
    return change


class LoRASqueezeSchedule(RankSchedule):
    r"""In-tuning LoRA-Squeeze: train at a high rank, squeeze step by step to ``target_rank``.

    Parameters
    ----------
    model : nn.Module
        With :class:`~lowrank_theory.adapters.lowrank.LoRA` adapters.
    target_rank : int
        Final rank :math:`r_{tgt}` of every layer.
    start_step, end_step : int
        First and last squeeze events are spread over ``(start_step, end_step]``.
    num_events : int
        :math:`N`; event :math:`i` happens after step
        :math:`t_i = t_s + \lfloor i (t_e - t_s) / N \rceil` and squeezes layer :math:`l` to
        ``squeeze_schedule(r_l, r_tgt, N, kind)[i-1]``.
    kind : {"linear", "geometric"}
        Rank interpolation.
    randomized : bool
        Randomized range finder instead of the exact factored SVD.
    seed : int, optional
        Sketch seeds (randomized only).

    Notes
    -----
    Fine-tuning continues between events at the current rank.  See :func:`squeeze_model`.

    References
    ----------
    I. Vulić et al., "LoRA-Squeeze", arXiv:2602.10993.
    """

    adapter_type = LoRA

    def __init__(
        self,
        model: nn.Module,
        target_rank: int,
        start_step: int,
        end_step: int,
        *,
        num_events: int = 1,
        kind: str = "linear",
        randomized: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(model)
        self.target_rank = _check_int(target_rank, "target_rank", 1)
        self.start_step = _check_int(start_step, "start_step")
        self.end_step = _check_int(end_step, "end_step", 1)
        self.num_events = _check_int(num_events, "num_events", 1)
        if end_step - start_step < num_events:
            raise ValueError(f"need end_step - start_step >= num_events, got {end_step} - {start_step} < {num_events}")
        if kind not in ("linear", "geometric"):
            raise ValueError(f"kind must be 'linear' or 'geometric', got {kind!r}")
        self.kind, self.randomized, self.seed = kind, bool(randomized), seed
        self.source_ranks = self.ranks()
        self.events = [start_step + round(i * (end_step - start_step) / num_events) for i in range(1, num_events + 1)]

    def planned_ranks(self, name: str) -> list[int]:
        """Rank of layer ``name`` after each event."""
        r = self.source_ranks[name]
        return squeeze_schedule(r, min(r, self.target_rank), self.num_events, kind=self.kind)

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> RankChange | None:
        _check_int(step, "step")
        if step not in self.events:
            return None
        i = self.events.index(step)
        change = RankChange(step)
        for name, layer in self.layers().items():
            if name not in self.source_ranks:
                continue
            want, before = self.planned_ranks(name)[i], layer.adapter.rank
            if want >= before:
                continue
            s = None if self.seed is None else derive_seed(self.seed, step, name)
            change.remaps += _squeeze_layer(name, layer, want, self.randomized, s)
            change.ranks[name] = (before, want)
        return self._finish(change, optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"source_ranks": dict(self.source_ranks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "source_ranks" in state:
            self.source_ranks = {str(k): int(v) for k, v in dict(state["source_ranks"]).items()}


# ============================================================================ factory
#: Schedule names accepted by :func:`make_schedule`, with the adapter each one needs.
SCHEDULES = {"adalora": "adalora", "sora": "sora", "increlora": "adalora", "squeeze": "lora"}


def make_schedule(name: str, model: nn.Module, total_steps: int, **kw: Any) -> RankSchedule:
    """Build a schedule by name for a run of ``total_steps`` (defaults sized from it).

    ``"adalora"`` (default ``target_rank`` = half the mean initial rank, ``t_init`` = 10%,
    ``t_final`` = 20% of the steps), ``"sora"``, ``"increlora"`` (default budget = twice the
    initial total rank, one growth every 5% of the steps after a 10% warm-up), ``"squeeze"``
    (default ``target_rank`` = half the rank, events spread over 10%--70% of the steps).
    """
    _check_int(total_steps, "total_steps", 1)
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    need = {"adalora": AdaLoRA, "sora": SoRA, "increlora": AdaLoRA, "squeeze": LoRA}[name]
    ranks = {n: int(m.adapter.rank) for n, m in adapted_layers(model).items() if isinstance(m.adapter, need)}
    if not ranks:
        raise ValueError(f"schedule {name!r} needs {need.__name__} adapters in the model; inject() them first")
    if name == "adalora":
        kw.setdefault("t_init", total_steps // 10)
        kw.setdefault("t_final", total_steps // 5)
        if "target_budget" not in kw:
            kw.setdefault("target_rank", max(1.0, sum(ranks.values()) / len(ranks) / 2))
        return AdaLoRASchedule(model, total_steps, **kw)
    if name == "sora":
        return SoRASchedule(model, total_steps, **kw)
    if name == "increlora":
        kw.setdefault("max_total_rank", 2 * sum(ranks.values()))
        kw.setdefault("warmup", total_steps // 10)
        kw.setdefault("interval", max(1, total_steps // 20))
        return IncreLoRASchedule(model, **kw)
    r = max(ranks.values())
    kw.setdefault("target_rank", max(1, r // 2))
    start, end = kw.pop("start_step", total_steps // 10), kw.pop("end_step", (7 * total_steps) // 10)
    kw.setdefault("num_events", max(1, min(r - kw["target_rank"], end - start)))
    return LoRASqueezeSchedule(model, start_step=start, end_step=end, **kw)
