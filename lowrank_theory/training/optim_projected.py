r"""Projected training rules for LoRA: LoRA-Pro (joint tangent step) and AltLoRA (alternating steps).

Both start from LoRA's factor gradients :math:`g_A = s\,B^\top G` and :math:`g_B = s\,GA^\top`
(:math:`G = \partial L/\partial W` is never formed by autograd: only :math:`B^\top G` and
:math:`GA^\top` are available) and choose a step whose weight change is a projection of the full
gradient:

* LoRA-Pro moves :math:`W` by (minus the rate times) the orthogonal projection of :math:`G` on the
  tangent space :math:`\mathcal T = \{BX + YA\}` of the rank-r manifold,
  :math:`\Pi_{\mathcal T}(G) = P_BG + GP_A - P_BGP_A`;
* AltLoRA alternates an exact least-squares step on A with B fixed (weight change
  :math:`-\eta P_B G`) and one on B with A fixed (:math:`-\eta GP_A`), keeping its momentum in
  the r-dimensional factor space.

Here :math:`P_B = B(B^\top B)^{+}B^\top`, :math:`P_A = A^\top(AA^\top)^{+}A`.  The factor-space
math of LoRA-Pro (the Sylvester-fixed free matrix) is
:func:`lowrank_theory.theory.gradients.lorapro_gradients`; this module turns it into an optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..theory.gradients import lorapro_gradients
from .optim import _check_model_has_lora, adamw_direction, adamw_update_group, check_hparams, other_parameters

__all__ = ["AltLoRA", "LoRAPro", "equivalent_gradient", "lorapro_factor_steps"]


def _pair_groups(model: nn.Module, rule: str, kind: str) -> list[dict]:
    """One param group ``[A, B]`` per LoRA layer with both trainable (tagged ``kind``), then the rest."""
    groups, used = [], []
    for name, ad in _check_model_has_lora(model, rule).items():
        if not (ad.A.requires_grad and ad.B.requires_grad):
            continue
        groups.append({"params": [ad.A, ad.B], "kind": kind, "name": name, "scale": float(ad.scale)})
        used += [ad.A, ad.B]
    if not groups:
        raise ValueError(f"{rule} found no LoRA adapter with trainable A and B")
    rest = other_parameters(model, used)
    if rest:
        groups.append({"params": rest, "kind": "other", "name": "other"})
    return groups

def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _full_rank(M: torch.Tensor) -> bool:
    """r×r Gram matrix has rank r (in float64, NumPy's default relative cut-off)."""
    return int(torch.linalg.matrix_rank(M.double())) == M.shape[0]


def equivalent_gradient(g_A: torch.Tensor, g_B: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float):
    r"""The tangent projection :math:`\Pi_{\mathcal T}(G)` recovered from LoRA's factor gradients.

    Parameters
    ----------
    g_A : Tensor (r, n)
        :math:`s\,B^\top G`.
    g_B : Tensor (m, r)
        :math:`s\,GA^\top`.
    B : Tensor (m, r)
    A : Tensor (r, n)
    scale : float
        s.

    Returns
    -------
    Tensor (m, n)
        :math:`P_BG + GP_A - P_BGP_A` with :math:`P_BG = B(B^\top B)^{+}g_A/s`,
        :math:`GP_A = g_B(AA^\top)^{+}A/s`, :math:`P_BGP_A = B(B^\top B)^{+}g_AA^\top(AA^\top)^{+}A/s`.

    Notes
    -----
    This is the minimum-norm matrix :math:`\tilde G` with :math:`B^\top\tilde G = B^\top G` and
    :math:`\tilde GA^\top = GA^\top`, so every quantity of LoRA-Pro (which only sees G through
    these two products) is the same for :math:`\tilde G` as for :math:`G`.  It is LoRA-Pro's
    "equivalent gradient" (the weight change of its adjusted step), the matrix its AdamW variant
    keeps moments of.  Pseudo-inverses make it valid when B (e.g. zero at init) or A is rank
    deficient.
    """
    BtB_pinv = torch.linalg.pinv(B.T @ B)
    AAt_pinv = torch.linalg.pinv(A @ A.T)
    left = B @ (BtB_pinv @ g_A) / scale  # P_B G, (m, n)
    right = (g_B @ AAt_pinv) @ A / scale  # G P_A
    both = B @ (BtB_pinv @ (g_A @ A.T) @ AAt_pinv) @ A / scale  # P_B G P_A
    return left + right - both


def lorapro_factor_steps(D: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float):
    r"""Factor directions :math:`(d_A, d_B)` whose weight change :math:`s(Bd_A + d_BA)` is :math:`\Pi_{\mathcal T}(D)`.

    With B and A of full rank r this is LoRA-Pro's optimal pair
    (:func:`~lowrank_theory.theory.gradients.lorapro_gradients`, free matrix X from the Sylvester
    equation that keeps the pair closest to LoRA's own gradients).  Otherwise the pseudo-inverse
    solution with :math:`X = 0`: :math:`d_A = (B^\top B)^{+}B^\top D/s`,
    :math:`d_B = (I-P_B)DA^\top(AA^\top)^{+}/s` (the official code's fallback, which regularizes
    the Gram matrices instead).
    """
    if _full_rank(B.T @ B) and _full_rank(A @ A.T):
        res = lorapro_gradients(D, B, A, scale)
        return res.g_A, res.g_B
    BtB_pinv = torch.linalg.pinv(B.T @ B)
    d_A = BtB_pinv @ (B.T @ D) / scale
    DAt = D @ A.T
    d_B = (DAt - B @ (BtB_pinv @ (B.T @ DAt))) @ torch.linalg.pinv(A @ A.T) / scale
    return d_A, d_B


# ============================================================================ LoRA-Pro
class LoRAPro(torch.optim.Optimizer):
    r"""LoRA-Pro: steps on A, B whose weight change is the tangent projection of the (AdamW) gradient.

    Parameters
    ----------
    model : nn.Module
        With LoRA adapters injected; every other trainable parameter gets plain AdamW.
    lr : float
        :math:`\eta`.
    mode : {"adamw", "sgd"}
        ``"sgd"``: the weight moves by :math:`-\eta\,\Pi_{\mathcal T}(G)` (first order).
        ``"adamw"``: the paper's Algorithm with AdamW -- moments of the equivalent gradient
        :math:`\tilde G` (m×n per layer, as in the paper's full mode), step
        :math:`-\eta\,\Pi_{\mathcal T}(\hat m/(\sqrt{\hat v}+\epsilon))`.
    betas, eps : AdamW's.
    weight_decay : float
        Decoupled, applied as in the official code: :math:`A, B \leftarrow \sqrt{1-\eta\lambda}\,(A, B)`
        so that :math:`BA` shrinks by :math:`1-\eta\lambda` (the frozen base is not decayed).

    Raises
    ------
    ValueError
        No LoRA adapter in ``model``; bad hyper-parameters.

    Notes
    -----
    Per layer, from :math:`g_A, g_B`: (1) the equivalent gradient
    :math:`\tilde G = \Pi_{\mathcal T}(G)` (:func:`equivalent_gradient`); (2) the weight-space
    direction :math:`D = \tilde G` (SGD) or Adam's direction of :math:`\tilde G` (AdamW); (3) the
    factor directions :math:`d_A, d_B` with :math:`s(Bd_A + d_BA) = \Pi_{\mathcal T}(D)`, fixed by
    the Sylvester equation of Thm 2.2 (:func:`lorapro_factor_steps`); (4)
    :math:`A \leftarrow A - \eta d_A`, :math:`B \leftarrow B - \eta d_B`.  Cost per layer: one
    m×n matrix (and two m×n moments in AdamW mode -- the memory LoRA-Pro's paper reports), an
    r×r Sylvester solve on the host.  State for a layer lives in the state of its B.

    References
    ----------
    Z. Wang, J. Liang, R. He, Z. Wang, T. Tan, "LoRA-Pro: Are Low-Rank Adapters Properly
    Optimized?", arXiv:2407.18242 (Thms 2.1–2.2, Alg. 1); official code ``mrflogs/LoRA-Pro``
    (``peta/optim.py``), read to check the AdamW variant and the weight decay.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        mode: str = "adamw",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        check_hparams(lr, betas, eps, weight_decay)
        if mode not in ("adamw", "sgd"):
            raise ValueError(f"mode must be 'adamw' or 'sgd', got {mode!r}")
        groups = _pair_groups(model, "LoRA-Pro", "lorapro")
        super().__init__(groups, dict(lr=lr, mode=mode, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] != "lorapro":
                adamw_update_group(self, group)
                continue
            A, B = group["params"]
            if A.grad is None and B.grad is None:
                continue
            acc = _acc(A)
            Af, Bf = A.detach().to(acc), B.detach().to(acc)
            gA = torch.zeros_like(Af) if A.grad is None else A.grad.detach().to(acc)
            gB = torch.zeros_like(Bf) if B.grad is None else B.grad.detach().to(acc)
            s = group["scale"]
            G_eq = equivalent_gradient(gA, gB, Bf, Af, s)
            D = G_eq if group["mode"] == "sgd" else adamw_direction(G_eq, self.state[B], group["betas"], group["eps"])
            dA, dB = lorapro_factor_steps(D, Bf, Af, s)
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                shrink = math.sqrt(max(0.0, 1.0 - lr * wd))
                A.mul_(shrink)
                B.mul_(shrink)
            A.add_(dA.to(A.dtype), alpha=-lr)
            B.add_(dB.to(B.dtype), alpha=-lr)
        return loss


# ============================================================================ AltLoRA
class AltLoRA(torch.optim.Optimizer):
    r"""AltLoRA: alternating exact projected steps on A and on B, momentum kept in factor space.

    Parameters
    ----------
    model : nn.Module
        With LoRA adapters injected; every other trainable parameter gets plain AdamW.
    lr : float
        :math:`\eta` (a rate in weight space: the A-step moves W by :math:`-\eta P_BG`).
    beta : float, default 0.9
        Momentum coefficient (0 disables momentum).
    delta : float, default 1e-6
        Ridge :math:`\delta` added to the r×r Gram matrices before solving.
    switch_every : int, default 1
        Optimizer steps spent on one factor before switching to the other.
    first : {"B", "A"}, default "B"
        Factor of the first phase.  With LoRA's init (B = 0) an A-step is a no-op
        (:math:`g_A = sB^\top G = 0`), so we start with B.
    betas, eps, weight_decay : AdamW's, for the non-LoRA parameters; ``weight_decay`` is also
        applied (decoupled) to the factor being stepped.

    Raises
    ------
    ValueError
        No LoRA adapter in ``model``; bad hyper-parameters.

    Notes
    -----
    A-phase (B fixed).  The exact least-squares step of A, :math:`\arg\min_{d}\lVert s\,Bd - G\rVert_F`,
    is :math:`d = (B^\top B)^{-1}B^\top G/s = (B^\top B)^{-1}g_A/s^2`; we use
    :math:`\tilde g_A = (B^\top B + \delta I)^{-1}g_A/s^2`, so :math:`s\,B\tilde g_A \to P_BG`.
    The momentum :math:`M_A` (r×n) represents the weight-space momentum :math:`B_{\mathrm{old}}M_A`;
    when B has changed it is transported to the closest element of :math:`\{BX\}`,

    .. math:: M_A \leftarrow \beta\,(B^\top B+\delta I)^{-1}B^\top B_{\mathrm{old}}\,M_A
              + (1-\beta)\,\tilde g_A,\qquad
              A \leftarrow A - \eta\,\frac{M_A}{1-\beta^{t_A}},

    (:math:`B\,(B^\top B)^{-1}B^\top B_{\mathrm{old}}M_A = P_B(B_{\mathrm{old}}M_A)`).  B-phase is the
    mirror image: :math:`\tilde g_B = g_B(AA^\top+\delta I)^{-1}/s^2`,
    :math:`M_B \leftarrow \beta\,M_BA_{\mathrm{old}}A^\top(AA^\top+\delta I)^{-1} + (1-\beta)\tilde g_B`.
    Memory per layer: the two momenta (the size of A and B) and the factor each was last
    transported with -- no m×n state, the paper's point against LoRA-Pro.  Both gradients are
    computed every step (the inactive one is ignored), which keeps DDP's bucket set fixed.

    Verified against the authors' code (``LucasXinYu/AltLoRA``, ``optimizer_new.py`` class
    ``altlora`` and ``logtrainer.py``'s alternating freeze of A / B): the preconditioned gradient,
    the momentum transport and the bias correction above are theirs; they fold :math:`1/s^2` into
    the rate and use :math:`\delta = 10^{-3}`; we keep :math:`1/s^2` so the step does not depend on α.

    References
    ----------
    X. Yu, Y. Wang, J. Chen, L. Xue, "AltLoRA: Towards Better Gradient Approximation in Low-Rank
    Adaptation with Alternating Projections", arXiv:2505.12455.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        beta: float = 0.9,
        delta: float = 1e-6,
        switch_every: int = 1,
        first: str = "B",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        check_hparams(lr, betas, eps, weight_decay)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not (math.isfinite(delta) and delta >= 0):
            raise ValueError(f"delta must be finite and >= 0, got {delta!r}")
        if isinstance(switch_every, bool) or not isinstance(switch_every, int) or switch_every < 1:
            raise ValueError(f"switch_every must be an int >= 1, got {switch_every!r}")
        if first not in ("A", "B"):
            raise ValueError(f"first must be 'A' or 'B', got {first!r}")
        groups = _pair_groups(model, "AltLoRA", "altlora")
        defaults = dict(lr=lr, beta=beta, delta=delta, switch_every=switch_every, first=first, betas=betas,
                        eps=eps, weight_decay=weight_decay, steps_done=0)
        super().__init__(groups, defaults)

    def phase(self, group: dict[str, Any] | None = None) -> str:
        """The factor (``"A"`` or ``"B"``) the next :meth:`step` moves."""
        group = group or next(g for g in self.param_groups if g["kind"] == "altlora")
        k = group["steps_done"] // group["switch_every"]
        other = "A" if group["first"] == "B" else "B"
        return group["first"] if k % 2 == 0 else other

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] != "altlora":
                adamw_update_group(self, group)
                continue
            A, B = group["params"]
            if self.phase(group) == "A":
                self._step_factor(group, A, other=B, left=True)
            else:
                self._step_factor(group, B, other=A, left=False)
            group["steps_done"] += 1
        return loss

    def _step_factor(self, group: dict[str, Any], p: nn.Parameter, other: nn.Parameter, left: bool) -> None:
        if p.grad is None:
            return
        acc = _acc(p)
        g = p.grad.detach().to(acc)
        F = other.detach().to(acc)  # B (m, r) in the A-phase, A (r, n) in the B-phase
        s, beta, delta = group["scale"], group["beta"], group["delta"]
        r = p.shape[0] if left else p.shape[1]
        eye = torch.eye(r, dtype=acc, device=g.device)
        H = (F.T @ F if left else F @ F.T) + delta * eye
        g_t = torch.linalg.solve(H, g) / s**2 if left else torch.linalg.solve(H, g.T).T / s**2
        state = self.state[p]
        if "momentum" not in state or beta == 0.0:
            M = (1 - beta) * g_t
            state["t"] = 0
        else:
            F_old = state["transported_with"].to(acc)
            M_old = state["momentum"].to(acc)
            if left:
                M = beta * torch.linalg.solve(H, F.T @ F_old) @ M_old + (1 - beta) * g_t
            else:
                M = beta * (torch.linalg.solve(H, (M_old @ F_old @ F.T).T).T) + (1 - beta) * g_t
        state["t"] = int(state.get("t", 0)) + 1
        state["momentum"] = M
        state["transported_with"] = F.clone()
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            p.mul_(1 - lr * wd)
        bias = 1 - beta ** state["t"] if beta > 0 else 1.0
        p.add_((M / bias).to(p.dtype), alpha=-lr)
