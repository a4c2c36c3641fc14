r"""IncreLoRA: grow the rank of the most important modules during training (arXiv:2308.12043).

:func:`grow_adalora` appends rank-1 triplets to an AdaLoRA-form adapter without changing its
update; :class:`IncreLoRASchedule` decides where, from the authors' module importance score.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..adapters.adaptive_rank import AdaLoRA
from ..linalg.random import derive_seed
from .rank_change import ParamRemap, RankChange, RankSchedule, _all_reduce_mean, _check_int, _check_pos, _replace

__all__ = ["IncreLoRASchedule", "grow_adalora"]


# ============================================================================ IncreLoRA
@torch.no_grad()
def grow_adalora(adapter: AdaLoRA, add: int, *, seed: int | None = None, std: float = 0.02) -> list[ParamRemap]:
    r"""Append ``add`` triplets to an AdaLoRA adapter: new, larger P, λ, Q; :math:`\Delta W` unchanged.

    Parameters
    ----------
    adapter : AdaLoRA
        Rank :math:`r \ge 1` (its scale :math:`s` is kept; a rank-0 adapter has no scale to keep).
    add : int
        Number of triplets, ``r + add <= min(d_out, d_in)``.
    seed : int, optional
        Seed of the new columns of P and rows of Q, :math:`\mathcal N(0, \text{std}^2)`.
    std : float
        Their standard deviation (AdaLoRA's and IncreLoRA's init: 0.02).

    Returns
    -------
    list of ParamRemap
        For P (axis 1), λ (axis 0), Q (axis 0); new positions have index ``-1``.

    Notes
    -----
    The new :math:`\lambda` entries are zero, so :math:`\Delta W = s P\,\mathrm{diag}(\lambda) Q`
    is exactly unchanged; at the next backward only the new :math:`\lambda_k` get a gradient
    (:math:`s\,p_k^\top G q_k`), after which :math:`p_k, q_k` start to move -- as for a fresh
    AdaLoRA triplet.
    """
    if not isinstance(adapter, AdaLoRA):
        raise TypeError(f"adapter must be an AdaLoRA, got {type(adapter).__name__}")
    r = adapter.rank
    if r == 0:
        raise ValueError("cannot grow a rank-0 AdaLoRA adapter: its scale s = alpha/r is undefined")
    _check_int(add, "add", 1)
    if r + add > min(adapter.d_out, adapter.d_in):
        raise ValueError(f"add={add} would exceed min(d_out, d_in)={min(adapter.d_out, adapter.d_in)} (rank {r})")
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    P, lam, Q = adapter.P, adapter.lam, adapter.Q
    newP = std * torch.randn(adapter.d_out, add, generator=g, dtype=torch.float64)
    newQ = std * torch.randn(add, adapter.d_in, generator=g, dtype=torch.float64)
    index = torch.cat([torch.arange(r), torch.full((add,), -1)])
    remaps = [
        _replace(adapter, "P", torch.cat([P.detach(), newP.to(P)], dim=1), 1, index),
        _replace(adapter, "lam", torch.cat([lam.detach(), lam.new_zeros(add)]), 0, index),
        _replace(adapter, "Q", torch.cat([Q.detach(), newQ.to(Q)], dim=0), 0, index),
    ]
    adapter._config.update(rank=adapter.rank, alpha=adapter.scale * adapter.rank)
    return remaps


class IncreLoRASchedule(RankSchedule):
    r"""IncreLoRA: grow the rank of the most important modules, rank-1 triplets at a time.

    Parameters
    ----------
    model : nn.Module
        With :class:`~lowrank_theory.adapters.adaptive_rank.AdaLoRA` adapters (IncreLoRA uses the
        same SVD-like form :math:`sP\,\mathrm{diag}(\lambda)Q`), each of rank :math:`\ge 1`.
    max_total_rank : int
        Stop growing when the summed rank reaches this budget.
    interval : int
        Grow every ``interval`` steps ...
    warmup : int
        ... after the first ``warmup`` steps.
    top_h : int
        Number of modules that grow at each event.
    add_rank : int
        Triplets added to each chosen module.
    beta1, beta2 : float
        EMA factors of the sensitivity and uncertainty of the module scores.
    orth_reg : float
        Weight of AdaLoRA's orthogonality penalty (:meth:`extra_loss`).
    seed : int
        New triplet of layer ``name`` at step ``t`` is drawn with ``derive_seed(seed, t, name)``.

    Notes
    -----
    Module score (the authors' ``SVDLinear.backward_hook``): with :math:`G = \partial L/\partial
    \Delta W = \sum_t \delta_t x_t^\top` (output gradient times input, summed over the tokens of
    the backward passes since the last step),

    .. math:: S = \frac{1}{\sqrt{mn}} \sum_{ij} |\Delta W_{ij}|\,|G_{ij}|,

    smoothed as in AdaLoRA, :math:`\bar I \leftarrow \beta_1\bar I + (1-\beta_1)S`,
    :math:`\bar U \leftarrow \beta_2\bar U + (1-\beta_2)|S - \bar I|`, score
    :math:`\bar I\,\bar U`.  Every ``interval`` steps after ``warmup`` the ``top_h`` modules of
    highest score get ``add_rank`` new triplets (:func:`grow_adalora`).  :math:`G` is formed
    densely in forward/backward hooks (cost :math:`O(mnT)` per layer, like a full weight
    gradient).  Under DDP the per-rank scores are all-reduced before the EMA.

    Differences from the authors' code (``FeiyuZhang98/IncreLoRA``, ``loralib/increlora.py``),
    our choices: their scale is :math:`\alpha/\text{rank}`, so adding a triplet shrinks every
    existing one; we keep :math:`s` fixed so that :math:`\Delta W` is continuous at a growth
    event.  Their "advance learning" trains reserve triplets with :math:`\lambda = 10^{-5}`
    before they are switched on; ours start at :math:`\lambda = 0` (exactly function-preserving)
    and are learned from then on.

    References
    ----------
    F. Zhang et al., "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient
    Fine-tuning", arXiv:2308.12043.
    """

    adapter_type = AdaLoRA

    def __init__(
        self,
        model: nn.Module,
        max_total_rank: int,
        *,
        interval: int = 10,
        warmup: int = 0,
        top_h: int = 1,
        add_rank: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(model)
        for name, r in self.ranks().items():
            if r < 1:
                raise ValueError(f"IncreLoRA needs every adapter at rank >= 1; layer {name!r} has rank {r}")
        self.max_total_rank = _check_int(max_total_rank, "max_total_rank", 1)
        total = sum(self.ranks().values())
        if max_total_rank < total:
            raise ValueError(f"max_total_rank={max_total_rank} is below the current total rank {total}")
        self.interval = _check_int(interval, "interval", 1)
        self.warmup = _check_int(warmup, "warmup")
        self.top_h = _check_int(top_h, "top_h", 1)
        self.add_rank = _check_int(add_rank, "add_rank", 1)
        for name, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 < float(b) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {b}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.orth_reg = _check_pos(orth_reg, "orth_reg", allow_zero=True)
        self.seed = _check_int(seed, "seed")
        self.ipt: dict[str, float] = {}
        self.unc: dict[str, float] = {}
        self._acc: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self.attach()

    # ------------------------------------------------------------------ scores
    def attach(self) -> IncreLoRASchedule:
        """Register the forward hooks that accumulate the module scores (idempotent)."""
        if not self._hooks:
            for layer in self.layers().values():
                self._hooks.append(layer.register_forward_hook(self._hook))
        return self

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _name_of(self, module: nn.Module) -> str:
        for n, m in self.layers().items():
            if m is module:
                return n
        raise ValueError("hooked module is no longer an adapted layer of the model")

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not (module.training and torch.is_grad_enabled() and output.requires_grad):
            return
        x = inputs[0].detach()
        name = self._name_of(module)

        def on_grad(g: torch.Tensor) -> None:
            ad = module.adapter
            acc = torch.promote_types(g.dtype, torch.float32)
            G = g.detach().reshape(-1, ad.d_out).to(acc).T @ x.reshape(-1, ad.d_in).to(acc)
            with torch.no_grad():
                dW = ad.delta_weight().detach().to(acc)
                s = (dW.abs() * G.abs()).sum() / math.sqrt(ad.d_out * ad.d_in)
            self._acc[name] = self._acc.get(name, torch.zeros((), dtype=acc, device=s.device)) + s

        output.register_hook(on_grad)

    def scores(self) -> dict[str, float]:
        """Current smoothed scores :math:`\\bar I \\bar U` per layer (0 before any update)."""
        return {n: self.ipt.get(n, 0.0) * self.unc.get(n, 0.0) for n in self.layers()}

    def update(self) -> None:
        """Fold the raw scores accumulated since the last call into the EMAs (all-reduced under DDP)."""
        names = list(self.layers())
        if not self._acc:
            return
        raw = torch.stack([self._acc.get(n, torch.zeros(())).double().cpu() for n in names])
        raw = _all_reduce_mean(raw.to(next(iter(self._acc.values())).device)).cpu()
        self._acc = {}
        for n, s in zip(names, raw.tolist()):
            ib = self.beta1 * self.ipt.get(n, 0.0) + (1 - self.beta1) * s
            self.unc[n] = self.beta2 * self.unc.get(n, 0.0) + (1 - self.beta2) * abs(s - ib)
            self.ipt[n] = ib

    def extra_loss(self, trainer: Any = None) -> torch.Tensor | None:
        if not self.orth_reg:
            return None
        terms = [m.adapter.orthogonal_penalty() for m in self.layers().values()]
        return self.orth_reg * torch.stack(terms).sum()

    # ------------------------------------------------------------------ growth
    def after_backward(self, trainer: Any) -> None:
        pass  # scores are folded in step(), after optimizer.step(), as the authors do

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> RankChange | None:
        _check_int(step, "step")
        self.update()
        total = sum(self.ranks().values())
        if step <= self.warmup or step % self.interval != 0 or total >= self.max_total_rank:
            return None
        layers = self.layers()
        scores = self.scores()
        order = sorted(range(len(layers)), key=lambda i: -scores[list(layers)[i]])
        change = RankChange(step)
        room = self.max_total_rank - total
        grown = 0
        for i in order:
            if grown >= self.top_h or room <= 0:
                break
            name = list(layers)[i]
            ad = layers[name].adapter
            add = min(self.add_rank, room, min(ad.d_out, ad.d_in) - ad.rank)
            if add <= 0:
                continue
            before = ad.rank
            change.remaps += grow_adalora(ad, add, seed=derive_seed(self.seed, step, name))
            change.ranks[name] = (before, ad.rank)
            room -= add
            grown += 1
        return self._finish(change, optimizer)

    def on_train_end(self, trainer: Any) -> None:
        self.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"ipt": dict(self.ipt), "unc": dict(self.unc)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ipt = {str(k): float(v) for k, v in dict(state.get("ipt", {})).items()}
        self.unc = {str(k): float(v) for k, v in dict(state.get("unc", {})).items()}
        self.detach()
        self.attach()
