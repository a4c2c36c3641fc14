r"""Real weight updates and real gradients of MiniLM, for the theory experiments.

* :func:`real_finetune_delta` -- a short *full* fine-tune of all-MiniLM-L6-v2 (every weight
  trainable, plus a linear head) on the docstring task; returns
  :math:`\Delta W = W_{\text{after}} - W_{\text{before}}` of chosen linear layers.  These are the
  updates whose spectra and DCT spectra the expressivity experiments compare with the adapters'
  structures.
* :func:`real_layer_gradients` -- full-weight gradients :math:`G = \partial L/\partial W` of
  chosen linear layers on real text batches, at the pretrained weights or along a short LoRA run
  (then :math:`G` is the gradient at the merged weight :math:`W_0 + sBA`, and the LoRA factors at
  that moment are returned too) -- the input of the gradient-approximation experiment.

Runtime (2 CPU cores, shared; ``max_length=24``): loading MiniLM about 2--5 s; one full
fine-tuning step with ``batch_size=8`` about 0.3--0.6 s, so the default 30 steps take
roughly 10--25 s; one gradient batch about 0.2--0.4 s.  Both are deterministic given ``seed``
(dropout is off: the model stays in eval mode, as is usual for such probes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .data import docstring_dataset, load_model
from .injection import adapted_layers, inject
from .tasks import Task, classification_task

__all__ = ["DEFAULT_LAYERS", "GradientTrace", "real_finetune_delta", "real_layer_gradients"]

#: Query and value of the first and last block (384 x 384 each).
DEFAULT_LAYERS = (
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.attention.self.value",
    "encoder.layer.5.attention.self.query",
    "encoder.layer.5.attention.self.value",
)


def _task(model: nn.Module | None, tokenizer: Any, max_length: int, seed: int) -> Task:
    if model is None:
        model, tokenizer = load_model("minilm")
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    return classification_task(model, tokenizer, docstring_dataset(), max_length=max_length, seed=seed)


def _check_layers(backbone: nn.Module, layers: Sequence[str]) -> list[str]:
    names = list(layers)
    if not names:
        raise ValueError("layers must name at least one linear layer")
    for n in names:
        try:
            mod = backbone.get_submodule(n)
        except AttributeError:
            raise ValueError(f"layer {n!r} is not a module of the model") from None
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"layer {n!r} is {type(mod).__name__}, not nn.Linear")
    return names


def _check_int(v: Any, name: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _batch(task: Task, step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    n = task.train["labels"].shape[0]
    g = torch.Generator().manual_seed(seed * 7919 + step // max(1, n // batch_size))
    perm = torch.randperm(n, generator=g)
    k = step % max(1, n // batch_size)
    idx = perm[k * batch_size : (k + 1) * batch_size]
    return {key: v[idx] for key, v in task.train.items()}


def real_finetune_delta(
    layers: Sequence[str] = DEFAULT_LAYERS,
    *,
    steps: int = 30,
    lr: float = 1e-4,
    batch_size: int = 8,
    max_length: int = 24,
    optimizer: str = "adamw",
    seed: int = 0,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    with_info: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, Any]]:
    r"""Fully fine-tune MiniLM briefly on the docstring task; return :math:`\Delta W` of ``layers``.

    Parameters
    ----------
    layers : sequence of str
        ``nn.Linear`` module names of the backbone (``encoder.layer.<i>.attention.self.query``, ...).
    steps : int
        Optimizer steps (each on a fresh batch of the fixed training split).
    lr : float
        Learning rate (AdamW with no weight decay, or SGD).
    batch_size, max_length : int
        Examples per step and tokens per example.
    optimizer : {"adamw", "sgd"}
    seed : int
        Head init and batch order.
    model, tokenizer : optional
        A loaded backbone to use instead of MiniLM (it is changed in place).
    with_info : bool
        Also return ``{"losses", "weights_before", "accuracy_before", "accuracy_after", "seconds"}``.

    Returns
    -------
    dict of str to Tensor
        ``{layer: ΔW}``, float64 on the CPU, shape (d_out, d_in) -- and the info dict when asked.

    Notes
    -----
    Every parameter of the backbone and the head is trained (a real full fine-tune, not a
    low-rank one); :math:`\Delta W` is computed in float64 from float32 weights.  With AdamW the
    update after :math:`t` steps is roughly :math:`\eta t` per entry in sign-like directions (Adam
    normalizes per coordinate), so it is typically far from low rank -- the point of measuring it.
    """
    _check_int(steps, "steps")
    _check_int(batch_size, "batch_size")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    if not (isinstance(lr, int | float) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    t0 = time.perf_counter()
    task = _task(model, tokenizer, max_length, seed)
    backbone = task.model.backbone
    names = _check_layers(backbone, layers)
    before = {n: backbone.get_submodule(n).weight.detach().double().clone() for n in names}
    task.model.requires_grad_(True)
    params = list(task.model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if optimizer == "adamw" else torch.optim.SGD(params, lr=lr)
    acc_before = task.eval_fn(task.model, task.test)["accuracy"] if with_info else None
    losses = []
    for t in range(steps):
        loss = task.loss_fn(task.model, _batch(task, t, batch_size, seed))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    deltas = {n: backbone.get_submodule(n).weight.detach().double().cpu() - before[n].cpu() for n in names}
    if not with_info:
        return deltas
    info = {"losses": losses, "weights_before": before, "accuracy_before": acc_before,
            "accuracy_after": task.eval_fn(task.model, task.test)["accuracy"], "seconds": time.perf_counter() - t0}
    return deltas, info


@dataclass
class GradientTrace:
    """Full-weight gradients of some layers over a sequence of real batches.

    Attributes
    ----------
    layers : list of str
    grads : dict of str to Tensor
        ``{layer: G}`` with ``G`` of shape (n_batches, d_out, d_in), float64, CPU:
        :math:`\\partial L_t/\\partial W` on batch ``t``.
    weights : dict of str to Tensor
        The pretrained :math:`W_0` (d_out, d_in), float64.
    losses : list of float
    factors : dict of str to list of dict, or None
        Along a LoRA run: per layer and batch, ``{"A": (r, d_in), "B": (d_out, r), "scale": s}``
        at the moment the gradient was taken (float64).
    """

    layers: list[str]
    grads: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    losses: list[float]
    factors: dict[str, list[dict[str, Any]]] | None = field(default=None)


def real_layer_gradients(
    layers: Sequence[str] = DEFAULT_LAYERS,
    *,
    n_batches: int = 4,
    batch_size: int = 8,
    max_length: int = 24,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_lr: float = 1e-3,
    seed: int = 0,
    model: nn.Module | None = None,
    tokenizer: Any = None,
) -> GradientTrace:
    r"""Gradients :math:`\partial L/\partial W` of MiniLM linear layers on real docstring batches.

    Parameters
    ----------
    layers : sequence of str
        ``nn.Linear`` module names of the backbone.
    n_batches : int
        Number of batches (and, with LoRA, of LoRA steps).
    batch_size, max_length : int
    lora_rank : int, optional
        None: every gradient is taken at the pretrained weights (with a fixed random head).
        An int: LoRA of this rank is injected into ``layers`` and trained with AdamW (``lora_lr``,
        head trained too); gradient ``t`` is taken at the weights after ``t`` LoRA steps.
    lora_alpha : float, optional
        LoRA's :math:`\alpha` (default: the rank, i.e. :math:`s = 1`).
    lora_lr : float
    seed : int
        Head init, LoRA init and batch order.
    model, tokenizer : optional
        A loaded backbone instead of MiniLM.

    Returns
    -------
    GradientTrace

    Notes
    -----
    The loss is the docstring task's cross-entropy through a linear head on mean-pooled states.
    With adapters the base weight is frozen, so its gradient is obtained by switching
    ``requires_grad`` on for the backward only: for an additive adapter
    :math:`\partial L/\partial W_0 = \partial L/\partial (W_0 + sBA)`, the full-weight gradient that
    LoRA's factor gradients :math:`g_A = sB^\top G`, :math:`g_B = sGA^\top` compress.
    """
    _check_int(n_batches, "n_batches")
    _check_int(batch_size, "batch_size")
    if lora_rank is not None:
        _check_int(lora_rank, "lora_rank")
    task = _task(model, tokenizer, max_length, seed)
    backbone = task.model.backbone
    names = _check_layers(backbone, layers)
    weights = {n: backbone.get_submodule(n).weight.detach().double().cpu().clone() for n in names}
    task.model.requires_grad_(False)
    opt = None
    if lora_rank is not None:
        inject(task.model, "lora", [f"backbone.{n}" for n in names], rank=lora_rank, alpha=lora_alpha,
               layer_seeds=True, seed=seed)
        task.unfreeze_head()
        opt = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=lora_lr)
    layers_w = {}
    for n in names:
        mod = task.model.backbone.get_submodule(n)
        layers_w[n] = mod.base.weight if hasattr(mod, "base") else mod.weight
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    factors: dict[str, list[dict[str, Any]]] | None = {n: [] for n in names} if opt is not None else None
    adapters = {n.removeprefix("backbone."): m.adapter for n, m in adapted_layers(task.model).items()}
    losses = []
    for t in range(n_batches):
        for w in layers_w.values():
            w.requires_grad_(True)
        loss = task.loss_fn(task.model, _batch(task, t, batch_size, seed))
        loss.backward()
        for n, w in layers_w.items():
            grads[n].append(w.grad.detach().double().cpu().clone())
            w.grad = None
            w.requires_grad_(False)
            if factors is not None:
                ad = adapters[n]
                factors[n].append({"A": ad.A.detach().double().cpu().clone(), "B": ad.B.detach().double().cpu().clone(),
                                   "scale": float(ad.scale)})
        losses.append(float(loss.detach()))
        if opt is not None:
            opt.step()
        task.model.zero_grad(set_to_none=True)
    return GradientTrace(names, {n: torch.stack(g) for n, g in grads.items()}, weights, losses, factors)
