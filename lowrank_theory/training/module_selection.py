r"""DiffoRA's module selection: a differentiable adaptation matrix decides which layers keep their LoRA.

DiffoRA (arXiv:2502.08905) argues that not every module of a model needs (or is suited to) a low-rank update,
and learns *which* ones do.  Each adapted module :math:`i` gets an entry :math:`\gamma_i` of a Differential
Adaptation Matrix (DAM; one entry per (layer, module) pair, stored here as a vector over the adapted layers
in module order), first relaxed to a continuous gate trained by gradient descent together with the adapters,
then discretized: the top-k modules keep their LoRA, the others lose it, and fine-tuning continues on the kept
adapters with the weights learned during the search (the weight sharing that makes the search cheap).

Relaxation (logits :math:`\alpha\in\mathbb R^L`, temperature :math:`\tau > 0`) of layer :math:`i`'s output

.. math:: y_i = \mathrm{base}_i(x) + w_i\,\big(\mathrm{adapted}_i(x) - \mathrm{base}_i(x)\big)
          \quad (= W_0x + b_0 + w_i\,\Delta W_i x \text{ for an additive adapter}),

* ``"sigmoid"``: :math:`w_i = \sigma(\alpha_i/\tau)` -- each module's binary choice {LoRA, no LoRA} relaxed
  independently (a two-way softmax, DARTS-style, is exactly this sigmoid of the logit difference);
* ``"softmax"``: :math:`w = L\,\operatorname{softmax}(\alpha/\tau)` -- the modules compete for a fixed total
  :math:`\sum_iw_i = L` (uniform logits give :math:`w_i = 1`, plain LoRA everywhere).

Gradient: :math:`\partial\mathcal L/\partial w_i = \langle\partial\mathcal L/\partial y_i,\ \mathrm{adapted}_i(x) -
\mathrm{base}_i(x)\rangle`; through :math:`\alpha` it is multiplied by :math:`w_i(1-w_i)/\tau` (sigmoid) or the
softmax Jacobian.  Search is bi-level in the paper (gates on held-out data, adapters on training data);
:meth:`ModuleGates.gate_parameters` and :func:`adapter_parameters` give the two groups for two optimizers.

Discretization: :func:`top_k` keeps exactly k modules, the k largest gates, ties to the earlier module (a
stable sort), so the selection is deterministic -- the k-hot vector nearest to the gates in Euclidean distance
(``proofs/21-diffora-topk-projection.md``); :func:`keep_only` then puts the original module back in place
of every other adapted layer (merged ones unmerged first) and leaves the kept layers -- their adapters, their
outputs -- untouched; :func:`select_and_prune` does both.

Costs: while the gates are attached, each gated layer runs its base product once more (the interpolation needs
the base output; the fused LoRA path returns only the sum).  Merged layers (no separate update to gate) and
quantized bases are refused at :meth:`ModuleGates.attach`; a disabled or inactive layer passes its base output.

What we read: the arXiv abstract (v1 and v2, "Differential Module Selection") and the opening of the v2 HTML
(title, authors, abstract, start of the introduction); not the method section or code.  So the parametrization
(sigmoid or scaled softmax of one logit per module), the top-k rule with a global k, and the reading of
"weight sharing" as keeping the searched adapter weights are ours, stated here.

References
----------
T. Jiang, H. Wang, C. Yuan, "DiffoRA: Enabling Parameter-Efficient Fine-Tuning via Differential Module
Selection" (v1: "... LLM Fine-Tuning via Differential Low-Rank Matrix Adaptation"), arXiv:2502.08905.
H. Liu, K. Simonyan, Y. Yang, "DARTS: Differentiable Architecture Search", arXiv:1806.09055.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdaptedLinear
from .injection import CONFIG_ATTR, adapted_layers, unwrap_model

__all__ = ["RELAXATIONS", "ModuleGates", "adapter_parameters", "keep_only", "select_and_prune", "top_k"]

RELAXATIONS = ("sigmoid", "softmax")


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= {n} (the number of modules), got {k}")
    return k


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest entries of ``scores`` (1-d), largest first; ties go to the smaller index.

    Raises
    ------
    TypeError, ValueError
        ``scores`` not a real 1-d tensor, with NaN, or ``k`` not an int in ``[1, len(scores)]``.
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim != 1 or not scores.is_floating_point():
        raise TypeError(f"scores must be a real 1-d tensor, got {type(scores).__name__} "
                        f"{tuple(getattr(scores, 'shape', ()))}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores must not contain NaN")
    _check_k(k, scores.numel())
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    return [int(i) for i in order[:k]]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter tensors of every adapted layer (each shared tensor once): the inner-level group."""
    seen: set[int] = set()
    out = []
    for layer in adapted_layers(model).values():
        for ad in layer.adapters.values():
            for p in ad.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


class ModuleGates(nn.Module):
    r"""The relaxed adaptation matrix: one learnable gate per adapted layer of ``model`` (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        With adapters injected (:func:`~lowrank_theory.training.inject`).
    relaxation : {"sigmoid", "softmax"}
        :math:`w_i = \sigma(\alpha_i/\tau)` or :math:`w = L\,\mathrm{softmax}(\alpha/\tau)`.
    temperature : float, default 1
        :math:`\tau > 0`.
    init : float, default 0
        Initial logit of every module (sigmoid: :math:`w = 1/2`; softmax: :math:`w = 1` whatever the value).
    layers : sequence of str, optional
        The adapted layers to gate (default all, in module order).

    Raises
    ------
    ValueError
        No adapted layer, unknown layer names or relaxation, a non-positive or non-finite temperature, a
        non-finite init.
    """

    def __init__(self, model: nn.Module, *, relaxation: str = "sigmoid", temperature: float = 1.0,
                 init: float = 0.0, layers: Sequence[str] | None = None) -> None:
        super().__init__()
        if relaxation not in RELAXATIONS:
            raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {relaxation!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not (
                math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if isinstance(init, bool) or not isinstance(init, int | float) or not math.isfinite(init):
            raise ValueError(f"init must be a finite number, got {init!r}")
        found = adapted_layers(model)
        if not found:
            raise ValueError("model has no adapted layer: inject(model, 'lora', ...) first")
        names = list(found) if layers is None else list(layers)
        unknown = [n for n in names if n not in found]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"layers must be distinct adapted layer names of the model; unknown {unknown[:3]}, "
                             f"known {list(found)[:5]}")
        self.names: tuple[str, ...] = tuple(names)
        self.relaxation, self.temperature = relaxation, float(temperature)
        self.logits = nn.Parameter(torch.full((len(names),), float(init), dtype=torch.float32))
        # not submodules: the gates must not own (or move, or save) the model's layers
        self._layers: dict[str, AdaptedLinear] = {n: found[n] for n in names}
        self._hooks: list[Any] = []

    def weights(self) -> torch.Tensor:
        r"""The relaxed gates :math:`w` (L,), differentiable in the logits."""
        z = self.logits / self.temperature
        if self.relaxation == "sigmoid":
            return torch.sigmoid(z)
        return len(self.names) * torch.softmax(z, dim=0)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The outer-level group: ``[logits]``."""
        return [self.logits]

    def as_dict(self) -> dict[str, float]:
        """``{layer name: gate}`` (detached floats), for logging."""
        return dict(zip(self.names, self.weights().detach().tolist(), strict=True))

    def select(self, k: int) -> list[str]:
        r"""The names of the k modules with the largest gates, largest first.

        Ranked by the logits: both relaxations are strictly increasing in each logit, so this is the top-k of
        the gates in exact arithmetic (``proofs/21-diffora-topk-projection.md``) and stays right where float32
        gates saturate (:math:`\sigma(20) = \sigma(30) = 1` in float32).
        """
        return [self.names[i] for i in top_k(self.logits.detach(), k)]

    # ------------------------------------------------------------------ hooks
    def attach(self) -> ModuleGates:
        """Register the gating forward hooks on the gated layers (idempotent); returns ``self``.

        Raises
        ------
        ValueError
            A gated layer is merged or has a quantized base.
        """
        if self._hooks:
            return self
        for n, layer in self._layers.items():
            if layer.merged or layer.quantized:
                raise ValueError(f"layer {n!r} is merged or has a quantized base: its update cannot be gated")
        for i, (n, layer) in enumerate(self._layers.items()):
            self._hooks.append(layer.register_forward_hook(self._make_hook(i, n)))
        return self

    def detach(self) -> None:
        """Remove the hooks (the layers compute their plain adapted output again)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _make_hook(self, i: int, name: str):
        def hook(module: AdaptedLinear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if module.disabled or not module.active_adapters:
                return output  # the base output: nothing to gate
            if module.merged:
                raise ValueError(f"gated layer {name!r} was merged: its update cannot be gated; detach the gates first")
            x = inputs[0]
            W0, b0 = module.base_weights()
            base = F.linear(x, W0.to(x.dtype), None if b0 is None else b0.to(x.dtype)).to(output.dtype)
            w = self.weights()[i].to(output.dtype)
            return base + w * (output - base)

        return hook


# ============================================================================ discretization
def keep_only(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Keep the adapters of the adapted layers ``names``; put the original module back everywhere else.

    Every other adapted layer is unmerged if merged (checked, as :func:`~lowrank_theory.training.unmerge`)
    and replaced by its frozen base module; the kept layers are not touched, so their outputs are bit-identical.
    The injection records (``lowrank_adapter_config``) keep only the remaining layers, so checkpoints of the
    pruned model rebuild exactly its adapters.  Returns the names of the removed layers.

    Raises
    ------
    ValueError
        ``names`` empty or naming a module that is not an adapted layer (nothing is changed then).
    """
    layers = adapted_layers(model)
    keep = list(dict.fromkeys(names))
    unknown = [n for n in keep if n not in layers]
    if not keep or unknown:
        raise ValueError(f"names must be a non-empty list of adapted layers; unknown {unknown[:3]}")
    drop = [n for n in layers if n not in set(keep)]
    for n in drop:  # validate every unmerge before changing any layer
        if layers[n].merged:
            layers[n].check_unmerge()
    root = unwrap_model(model)
    for n in drop:
        layer = layers[n]
        if layer.merged:
            layer.unmerge()
        parent_name, _, attr = n.rpartition(".")
        setattr(root.get_submodule(parent_name), attr, layer.base)
    records = getattr(root, CONFIG_ATTR, None)
    if records:
        gone = set(drop)
        kept = [dict(r, layers=[n for n in r.get("layers", []) if n not in gone]) for r in records]
        setattr(root, CONFIG_ATTR, [r for r in kept if r["layers"]])
    return drop


def select_and_prune(model: nn.Module, gates: ModuleGates, k: int) -> list[str]:
    """Discretize: detach ``gates`` and drop the adapters of the gated layers outside its top-k (:func:`keep_only`).

    Adapted layers that ``gates`` does not gate are kept.  Returns the chosen names, largest gate first.
    """
    if not isinstance(gates, ModuleGates):
        raise TypeError(f"gates must be a ModuleGates, got {type(gates).__name__}")
    chosen = gates.select(k)
    ungated = [n for n in adapted_layers(model) if n not in set(gates.names)]
    gates.detach()
    keep_only(model, chosen + ungated)
    return chosen
