r"""Training rules for LoRA factors: LoRA+, ALLoRA, and the factory for every rule.

Setting.  An adapted layer computes :math:`y = (W_0 + s\,BA)x` with :math:`B\in\mathbb{R}^{m\times r}`,
:math:`A\in\mathbb{R}^{r\times n}`.  With :math:`G = \partial L/\partial W` the gradient of the
merged weight, autograd gives :math:`g_A = s\,B^\top G` and :math:`g_B = s\,G A^\top`, and a plain
step :math:`A \leftarrow A - \eta g_A`, :math:`B \leftarrow B - \eta g_B` moves the weight by
:math:`-\eta\,s^2(BB^\top G + GA^\top A)` to first order (:func:`lowrank_theory.theory.gradients.lora_step`).
The rules here change how the factor gradients become a step:

* :func:`lora_plus_param_groups` -- LoRA+ (arXiv:2402.12354): B's learning rate is
  :math:`\lambda` times A's (param groups for any torch optimizer);
* :class:`ALLoRA` -- ALLoRA (arXiv:2410.09692): each row's step is scaled by
  :math:`1/\sqrt{\lVert\theta_{i,:}\rVert^2 + 1/\eta_{\mathrm{row}}^2}`, no dropout, no α;
* :class:`~lowrank_theory.training.optim_projected.LoRAPro` and
  :class:`~lowrank_theory.training.optim_projected.AltLoRA` -- projected steps (other module);
* :class:`~lowrank_theory.training.perturb.GGPO` -- gradient-guided weight perturbation (a
  trainer callback, combined with any optimizer);
* :func:`make_optimizer` -- one entry point by name, used by the trainer and the CLI.

Every rule acts on the adapters that are (subclasses of) :class:`~lowrank_theory.adapters.lowrank.LoRA`
-- the update :math:`s\,BA`; all other trainable parameters (other adapters, a classifier head)
get a plain AdamW step inside the same optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..adapters.lowrank import LoRA
from .injection import adapted_layers

__all__ = [
    "RULES",
    "ALLoRA",
    "adamw_direction",
    "check_hparams",
    "lora_adapters",
    "lora_plus_param_groups",
    "make_optimizer",
    "other_parameters",
    "prepare_allora",
]


# ============================================================================ plumbing
def lora_adapters(model: nn.Module) -> dict[str, LoRA]:
    """``{layer name: adapter}`` for every adapted layer whose adapter is a :class:`LoRA` (ΔW = s·B·A).

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return {n: layer.adapter for n, layer in adapted_layers(model).items() if isinstance(layer.adapter, LoRA)}


def other_parameters(model: nn.Module, exclude: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Trainable parameters of ``model`` not in ``exclude`` (each shared tensor once)."""
    skip = {id(p) for p in exclude}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in skip]


def check_hparams(lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
    """Validate the usual optimizer hyper-parameters (``ValueError`` naming the argument)."""
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay!r}")


def adamw_direction(grad: torch.Tensor, state: dict[str, Any], betas: tuple[float, float], eps: float) -> torch.Tensor:
    r"""Adam's bias-corrected direction :math:`\hat m/(\sqrt{\hat v}+\epsilon)`, updating ``state`` in place.

    ``state`` holds ``step`` (int), ``exp_avg`` and ``exp_avg_sq`` (created on first use, shape of
    ``grad``).  Same arithmetic as ``torch.optim.AdamW`` (Loshchilov & Hutter, arXiv:1711.05101).
    """
    b1, b2 = betas
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
    state["step"] += 1
    t = state["step"]
    state["exp_avg"].lerp_(grad, 1 - b1)
    state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(eps)
    return (state["exp_avg"] / (1 - b1**t)) / denom


def adamw_update_group(opt: torch.optim.Optimizer, group: dict[str, Any]) -> None:
    """One AdamW step (decoupled weight decay) for every parameter of ``group`` that has a grad."""
    for p in group["params"]:
        if p.grad is None:
            continue
        d = adamw_direction(p.grad.detach(), opt.state[p], group["betas"], group["eps"])
        if group["weight_decay"]:
            p.data.mul_(1 - group["lr"] * group["weight_decay"])
        p.data.add_(d.to(p.dtype), alpha=-group["lr"])


def _check_model_has_lora(model: nn.Module, rule: str) -> dict[str, LoRA]:
    layers = lora_adapters(model)
    if not layers:
        raise ValueError(f"{rule} needs LoRA adapters (ΔW = s·B·A) in the model; inject(model, 'lora', ...) first")
    return layers


# ============================================================================ LoRA+
def lora_plus_param_groups(
    model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    r"""LoRA+ parameter groups: every B at rate :math:`\lambda\eta`, every A (and the rest) at :math:`\eta`.

    Parameters
    ----------
    model : nn.Module
        With LoRA adapters injected.
    lr : float
        :math:`\eta`, the learning rate of A and of the other trainable parameters.
    ratio : float, default 16
        :math:`\lambda = \eta_B/\eta_A` (the paper recommends :math:`\lambda \approx 2^4`).
    weight_decay : float
        Put in every group.

    Returns
    -------
    list of dict
        Groups ``{"params", "lr", "weight_decay", "name"}`` with names ``"lora_A"``, ``"lora_B"``,
        ``"other"`` (empty groups omitted) -- for ``torch.optim.AdamW(groups)`` or any optimizer.
        An LR scheduler multiplies each group's rate by the same factor, so the ratio holds.

    Raises
    ------
    ValueError
        No LoRA adapter in the model, or ``ratio``/``lr`` not finite and positive.

    Notes
    -----
    With SGD the first-order weight change is :math:`-\eta\,s^2(BB^\top G + \lambda\,GA^\top A)`
    (:func:`lowrank_theory.theory.gradients.lora_plus_step`).  Hayou et al. show that for width
    :math:`n\to\infty` equal rates cannot learn features efficiently and :math:`\eta_B/\eta_A =
    \Theta(n)` is needed.

    References
    ----------
    S. Hayou, N. Ghosh, B. Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv:2402.12354.
    """
    check_hparams(lr, weight_decay=weight_decay)
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"ratio must be finite and > 0, got {ratio!r}")
    layers = _check_model_has_lora(model, "LoRA+")
    As = [ad.A for ad in layers.values() if ad.A.requires_grad]
    Bs = [ad.B for ad in layers.values() if ad.B.requires_grad]
    rest = other_parameters(model, As + Bs)
    groups = [
        {"params": As, "lr": lr, "weight_decay": weight_decay, "name": "lora_A"},
        {"params": Bs, "lr": lr * ratio, "weight_decay": weight_decay, "name": "lora_B"},
        {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "other"},
    ]
    return [g for g in groups if g["params"]]


# ============================================================================ ALLoRA
def prepare_allora(model: nn.Module) -> dict[str, LoRA]:
    r"""Put every LoRA adapter in ALLoRA's form: scale :math:`s = 1` (no α) and no dropout.

    Must be called before training (while :math:`\Delta W = 0`): changing s would change ΔW.
    The adapter's recorded config is updated (``alpha = rank``, ``rslora = False``,
    ``dropout = 0``) so checkpoints rebuild the same adapters.

    Raises
    ------
    ValueError
        No LoRA adapter, or an adapter whose B is already non-zero.
    """
    layers = _check_model_has_lora(model, "ALLoRA")
    for name, ad in layers.items():
        if bool(ad.B.detach().ne(0).any()):
            raise ValueError(f"prepare_allora must run before training: layer {name!r} already has ΔW != 0")
    for ad in layers.values():
        ad.scale = 1.0
        ad.dropout = nn.Identity()
        cfg = getattr(ad, "_config", None)
        if isinstance(cfg, dict):
            cfg.update(alpha=float(ad.rank), rslora=False, dropout=0.0)
    return layers


class ALLoRA(torch.optim.Optimizer):
    r"""ALLoRA: a per-row learning rate :math:`\eta / \sqrt{\lVert\theta_{i,:}\rVert^2 + 1/\eta_{\mathrm{row}}^2}`.

    Parameters
    ----------
    model : nn.Module
        With LoRA adapters injected (call :func:`prepare_allora` first to drop α and dropout,
        as the paper does).
    lr : float
        Base rate :math:`\eta`.
    eta_row : float, default 1
        :math:`\eta_{\mathrm{row}}`: a row at zero norm (B at init) moves with rate
        :math:`\eta\,\eta_{\mathrm{row}}`; a row of norm :math:`\gg 1/\eta_{\mathrm{row}}` with
        rate :math:`\approx \eta/\lVert\theta_{i,:}\rVert` (a step relative to its size).
    base : {"adamw", "sgd"}
        The direction :math:`u` each row is moved along: Adam's :math:`\hat m/(\sqrt{\hat v}+\epsilon)`
        or the raw gradient.
    betas, eps, weight_decay : AdamW's (decoupled decay); the non-LoRA parameters get plain AdamW.

    Raises
    ------
    ValueError
        No LoRA adapter, bad hyper-parameters.

    Notes
    -----
    For each LoRA factor :math:`\theta \in \{A\ (r\times n),\ B\ (m\times r)\}` and each row
    :math:`i` of it as stored (A: one rank component; B: one output unit),

    .. math:: \theta_{i,:} \leftarrow \theta_{i,:} - \frac{\eta}{\sqrt{\lVert\theta_{i,:}\rVert_2^2
              + 1/\eta_{\mathrm{row}}^2}}\; u_{i,:},

    with the coefficient computed from the parameters *before* the step.  The paper scales the
    per-parameter gradients by a coefficient inversely proportional to the parameter's
    :math:`\ell_2` norm, which removes LoRA's slow escape from :math:`B = 0` and its dependence on
    the scale α (so α and dropout are dropped).  With ``base="sgd"`` scaling the gradient and
    scaling the rate are the same; with Adam a constant factor on the gradient would be undone by
    Adam's normalization, so we scale the *step* -- our choice, stated here.  What we verified:
    the abstract (coefficient inversely proportional to the parameters' norm, no dropout, no
    scaling factor) and methods.md's :math:`1/\sqrt{\lVert row\rVert^2+\epsilon}`; a third-party
    optimizer with an ``allora`` option (``eta`` hyper-parameter, ``1/sqrt(row_norm + 1/eta**2)``)
    also works per row of the stored matrices.  We could not read the paper's full text here.

    Checked (tests/training/test_paper_formulas.py; abstract re-read from arXiv and OpenReview): the
    SGD step equals the dense :math:`\theta_i - \eta\,g_i/\sqrt{\lVert\theta_i\rVert^2 + 1/\eta_{\mathrm{row}}^2}`
    on both factors; "per sample" scaling equals the batch step (the coefficient depends on the parameters
    only, so it commutes with averaging over samples); the coefficient is inversely proportional to the
    :math:`\ell_2` norm for large rows (:math:`c\lVert\theta_i\rVert \to 1`) and equals
    :math:`\eta_{\mathrm{row}}` at :math:`\theta_i = 0`; after :func:`prepare_allora` training does not depend
    on α.  No deviation found.  A third-party optimizer's ``allora`` option uses
    ``1/sqrt(||row|| + 1/eta**2)`` (unsquared norm, averaged over rows): that is *not* inversely proportional to
    the norm (:math:`c\lVert\theta\rVert = \sqrt{\lVert\theta\rVert}` for large rows), so it does not
    match the abstract; we keep the squared norm.

    References
    ----------
    H. Huang, R. Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
    arXiv:2410.09692.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        eta_row: float = 1.0,
        base: str = "adamw",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        check_hparams(lr, betas, eps, weight_decay)
        if not (math.isfinite(eta_row) and eta_row > 0):
            raise ValueError(f"eta_row must be finite and > 0, got {eta_row!r}")
        if base not in ("adamw", "sgd"):
            raise ValueError(f"base must be 'adamw' or 'sgd', got {base!r}")
        layers = _check_model_has_lora(model, "ALLoRA")
        factors = [p for ad in layers.values() for p in (ad.A, ad.B) if p.requires_grad]
        rest = other_parameters(model, factors)
        groups = [{"params": factors, "allora": True, "name": "lora"}]
        if rest:
            groups.append({"params": rest, "allora": False, "name": "other"})
        defaults = dict(lr=lr, eta_row=eta_row, base=base, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)

    @staticmethod
    def row_coefficients(theta: torch.Tensor, eta_row: float) -> torch.Tensor:
        r""":math:`1/\sqrt{\lVert\theta_{i,:}\rVert^2 + 1/\eta_{\mathrm{row}}^2}` per row, shape (rows, 1)."""
        t = theta.detach().to(torch.promote_types(theta.dtype, torch.float32))
        return torch.rsqrt(t.square().sum(dim=1, keepdim=True) + 1.0 / eta_row**2)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["allora"]:
                adamw_update_group(self, group)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                acc = torch.promote_types(p.dtype, torch.float32)
                g = p.grad.detach().to(acc)
                u = g if group["base"] == "sgd" else adamw_direction(g, self.state[p], group["betas"], group["eps"])
                c = self.row_coefficients(p, group["eta_row"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((c * u).to(p.dtype), alpha=-group["lr"])
        return loss


# ============================================================================ factory
#: Names accepted by :func:`make_optimizer` (``"lora+"`` and ``"loraplus"`` are the same rule).
RULES = ("adamw", "sgd", "lora+", "lorapro", "altlora", "allora")


def make_optimizer(
    model: nn.Module,
    rule: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    **kw: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer of a training rule for the trainable parameters of ``model``.

    Parameters
    ----------
    model : nn.Module
        With adapters injected (LoRA for the LoRA-specific rules).
    rule : str
        ``"adamw"``, ``"sgd"``, ``"lora+"`` (kw: ``ratio``), ``"lorapro"`` (kw: ``mode``, ``betas``,
        ``eps``), ``"altlora"`` (kw: ``beta``, ``delta``, ``switch_every``), ``"allora"`` (kw:
        ``eta_row``, ``base``).  GGPO is a perturbation, not an optimizer: see
        :class:`~lowrank_theory.training.perturb.GGPO`.
    lr, weight_decay : float
    **kw
        Extra keywords of the rule.

    Returns
    -------
    torch.optim.Optimizer

    Raises
    ------
    ValueError
        Unknown rule, bad hyper-parameters, or no trainable parameter.
    """
    from .optim_projected import AltLoRA, LoRAPro

    key = rule.lower().replace("_", "").replace("-", "")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameter; inject() adapters first")
    if key == "adamw":
        check_hparams(lr, weight_decay=weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kw)
    if key == "sgd":
        check_hparams(lr, weight_decay=weight_decay)
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, **kw)
    if key in ("lora+", "loraplus"):
        ratio = kw.pop("ratio", 16.0)
        return torch.optim.AdamW(lora_plus_param_groups(model, lr, ratio, weight_decay), lr=lr, **kw)
    if key == "lorapro":
        return LoRAPro(model, lr=lr, weight_decay=weight_decay, **kw)
    if key == "altlora":
        return AltLoRA(model, lr=lr, weight_decay=weight_decay, **kw)
    if key == "allora":
        return ALLoRA(model, lr=lr, weight_decay=weight_decay, **kw)
    raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
