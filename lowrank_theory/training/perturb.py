r"""LoRA-GGPO: random weight perturbations sized by the weight and gradient norms of each row.

A trainer callback (also usable by hand) that, during training forwards, evaluates every LoRA
layer at a perturbed weight :math:`W + \varepsilon` with

.. math:: \varepsilon_{ij} = \frac{\sigma\,\lVert W_{i,:}\rVert_2
          + \beta\,\lVert \hat G_{i,:}\rVert_2^2}{\sqrt n}\, z_{ij},
          \qquad z_{ij} \sim \mathcal N(0, 1),

where :math:`W = W_0 + s\,BA` is the merged weight (m×n), :math:`\hat G = s(B g_A + g_B A) =
s^2(BB^\top G + GA^\top A)` is the weight change direction of the previous LoRA step (the only
full-size gradient information LoRA has), and :math:`1/\sqrt n` makes
:math:`\mathbb E\lVert\varepsilon_{i,:}\rVert^2 = (\sigma\lVert W_{i,:}\rVert + \beta\lVert\hat G_{i,:}\rVert^2)^2`.
The perturbation adds :math:`x\varepsilon^\top` to the layer output (no gradient flows into ε, but
the gradient does flow through it to x), so the factor gradients of *every* layer are those of
:math:`L(W_0 + sBA + \varepsilon)`: minimizing the
expected loss over a neighbourhood sized by the weights and steered by the gradients, which
favours flat minima (the SAM family) at the cost of one forward per step instead of SAM's two.

Norms without dense products: :math:`\lVert W_{i,:}\rVert^2 = \lVert W_{0,i}\rVert^2 +
2s\,B_{i,:}(AW_{0}^\top)_{:,i} + s^2 B_{i,:}(AA^\top)B_{i,:}^\top` and
:math:`\lVert\hat G_{i,:}\rVert^2/s^2 = B_i(g_Ag_A^\top)B_i^\top + 2B_i(g_AA^\top)g_{B,i}^\top +
g_{B,i}(AA^\top)g_{B,i}^\top` use r×r Gram matrices; only the noise itself is m×n (as in the
method).

What we verified: the abstract (perturbations from gradient and weight norms, flatter minima)
and the ``ggpo_sigma`` / ``ggpo_beta`` implementation merged into ``kohya-ss/sd-scripts``
(``networks/lora_flux.py``, PR #1974, written from the paper): per-row scale
``sigma * ||W_i|| + beta * ||grad_i||**2`` times a norm factor, Gaussian noise on the merged
weight, the gradient estimated as ``scale * (B @ g_A + g_B @ A)``.  Differences, our choices:
exact merged row norms (they use the mean base row norm), and :math:`1/\sqrt{n}` (input size,
Flat-LoRA's convention) where they use :math:`1/\sqrt{\text{out\_features}}`.  The paper's full text
(arXiv:2502.14538) could not be read here; note that its v2/v3 (abstracts read) are retitled LoRA-MGPO and
replace the gradient-norm term by optimizer momentum with EMA-normalized magnitudes -- this module is v1's GGPO.

Checked against the paper's formula (tests/training/test_paper_formulas.py): the per-row
scale :math:`\sigma\lVert W_{i,:}\rVert + \beta\lVert\hat G_{i,:}\rVert^2` (the row energy
:math:`\mathbb E\lVert\varepsilon_{i,:}\rVert^2` is its square), the r×r-Gram norms and the noise's
determinism match dense references.  One deviation was fixed: the hook used to compute
:math:`x\varepsilon^\top` under ``no_grad`` on a detached x (as the kohya code does), which drops
:math:`\varepsilon^\top` from the backward pass into the layers *below*: only the last perturbed layer
then got the gradient of :math:`L(W+\varepsilon)` this docstring states.  Now x keeps its gradient
(one more m×n product per layer in backward, and ε is held until backward).

References
----------
Y. Chang, C. Guo, Y. Chang, Y. Wu, "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via
Gradient-Guided Perturbation Optimization", arXiv:2502.14538.
T. Li et al., "Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape", arXiv:2409.14396.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..adapters import AdaptedLinear
from ..linalg.random import derive_seed
from .injection import adapted_layers
from .optim import _check_model_has_lora

__all__ = ["GGPO", "merged_row_norms", "step_row_norms"]


@torch.no_grad()
def merged_row_norms(W0: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    r"""Row norms of :math:`W_0 + s\,BA` (m,) from r×r and r×m products only."""
    acc = torch.promote_types(W0.dtype, torch.float32)
    W0, B, A = W0.to(acc), B.to(acc), A.to(acc)
    base = W0.square().sum(dim=1)
    cross = 2 * scale * (B * (W0 @ A.T)).sum(dim=1)
    quad = scale**2 * ((B @ (A @ A.T)) * B).sum(dim=1)
    return (base + cross + quad).clamp_min(0).sqrt()


@torch.no_grad()
def step_row_norms(g_A: torch.Tensor, g_B: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float):
    r"""Row norms of :math:`\hat G = s(Bg_A + g_BA)` (m,) from r×r Gram matrices."""
    acc = torch.promote_types(A.dtype, torch.float32)
    g_A, g_B, B, A = g_A.to(acc), g_B.to(acc), B.to(acc), A.to(acc)
    t1 = ((B @ (g_A @ g_A.T)) * B).sum(dim=1)
    t2 = 2 * ((B @ (g_A @ A.T)) * g_B).sum(dim=1)
    t3 = ((g_B @ (A @ A.T)) * g_B).sum(dim=1)
    return abs(scale) * (t1 + t2 + t3).clamp_min(0).sqrt()


class GGPO:
    r"""LoRA-GGPO perturbations for every LoRA layer of a model (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        With LoRA adapters injected.
    sigma : float, default 0.03
        :math:`\sigma`, weight-norm coefficient.
    beta : float, default 0.01
        :math:`\beta`, gradient-norm coefficient.
    seed : int
        Noise of layer ``name`` at perturbation draw ``k`` comes from ``derive_seed(seed, k, name)``
        -- reproducible, and identical on every DDP rank.

    Raises
    ------
    ValueError
        No LoRA adapter in ``model``, or negative / non-finite coefficients.

    Notes
    -----
    Use: ``attach()`` once (registers forward hooks), call :meth:`update` after each backward
    (before ``optimizer.step()``) to refresh the norms from the current weights and gradients;
    before the first update the norms are those of the weights with :math:`\hat G = 0`.  The
    perturbation is active only while the layer is in training mode.  As a trainer callback,
    :class:`~lowrank_theory.training.trainer.Trainer` calls these at the right times.
    """

    def __init__(self, model: nn.Module, sigma: float = 0.03, beta: float = 0.01, seed: int = 0) -> None:
        for name, v in (("sigma", sigma), ("beta", beta)):
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        _check_model_has_lora(model, "GGPO")
        self.model, self.sigma, self.beta, self.seed = model, float(sigma), float(beta), int(seed)
        self.draw = 0
        self._scales: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []

    def layers(self) -> dict[str, AdaptedLinear]:
        from ..adapters.lowrank import LoRA

        return {n: m for n, m in adapted_layers(self.model).items() if isinstance(m.adapter, LoRA)}

    # ------------------------------------------------------------------ norms and noise
    @torch.no_grad()
    def update(self) -> None:
        """Recompute each layer's row scales from its weights and its current factor gradients."""
        for name, layer in self.layers().items():
            ad = layer.adapter
            w = merged_row_norms(layer.weight.detach(), ad.B.detach(), ad.A.detach(), ad.scale)
            if ad.A.grad is not None and ad.B.grad is not None:
                g = step_row_norms(ad.A.grad, ad.B.grad, ad.B.detach(), ad.A.detach(), ad.scale)
            else:
                g = torch.zeros_like(w)
            self._scales[name] = (self.sigma * w + self.beta * g.square()) / math.sqrt(ad.d_in)
        self.draw += 1

    def row_scales(self, name: str) -> torch.Tensor:
        """Per-row standard deviation (m,) of layer ``name``'s perturbation."""
        if name not in self._scales:
            layer = self.layers()[name]
            ad = layer.adapter
            w = merged_row_norms(layer.weight.detach(), ad.B.detach(), ad.A.detach(), ad.scale)
            self._scales[name] = self.sigma * w / math.sqrt(ad.d_in)
        return self._scales[name]

    def perturbation(self, name: str) -> torch.Tensor:
        r"""The current :math:`\varepsilon` (m×n) of layer ``name`` (deterministic given seed, draw, name)."""
        layer = self.layers()[name]
        ad = layer.adapter
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.draw, name))
        z = torch.randn(ad.d_out, ad.d_in, generator=g, dtype=torch.float32)
        scales = self.row_scales(name)
        return (scales.to(torch.float32).cpu()[:, None] * z).to(device=layer.weight.device, dtype=layer.weight.dtype)

    # ------------------------------------------------------------------ hooks
    def attach(self) -> GGPO:
        """Register the forward hooks (idempotent); returns ``self``."""
        if self._hooks:
            return self
        for name, layer in self.layers().items():
            self._hooks.append(layer.register_forward_hook(self._make_hook(name)))
        return self

    def detach(self) -> None:
        """Remove the forward hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if not module.training or not torch.is_grad_enabled():
                return output
            eps = self.perturbation(name)  # a constant: no gradient flows into it
            # x is not detached: the layers below must see the gradient of L at W + ε too (see the module notes)
            extra = inputs[0] @ eps.to(inputs[0].dtype).T
            return output + extra.to(output.dtype)

        return hook

    # ------------------------------------------------------------------ trainer callback protocol
    def on_train_begin(self, trainer: Any) -> None:
        self.attach()

    def after_backward(self, trainer: Any) -> None:
        self.update()

    def on_train_end(self, trainer: Any) -> None:
        self.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"draw": self.draw, "sigma": self.sigma, "beta": self.beta, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draw = int(state["draw"])
