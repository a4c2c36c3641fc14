r"""``combine_adapters``: a new named adapter from a weighted merge of existing LoRA adapters (PEFT's
``add_weighted_adapter``), and ``merge_adapters``: any task-vector merge of ``lowrank_theory.merging``
written as a new adapter.

:func:`combine_adapters` works on the factors, layer by layer, with
:func:`~lowrank_theory.merging.combine_lora` (the eleven combination types of PEFT 0.21:
``svd``, ``linear``, ``cat``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and their
``_svd`` variants), so the result is again a LoRA: for ``cat`` exactly
:math:`\sum_t w_t s_t B_t A_t` at rank :math:`\sum_t r_t`; for ``svd`` the best rank-``svd_rank``
approximation of that sum (Eckart--Young, from the factors, never the dense product); for the
factor-wise types PEFT's rule, which is *not* the merge of the :math:`\Delta W_t` (see
``proofs/19-merging-factored-merges.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..adapters.lowrank import LoRA
from ..linalg.random import derive_seed
from ..merging import COMBINATION_TYPES, combine_lora
from .adapter_ops import adapter_names
from .injection import CONFIG_ATTR, adapted_layers, unwrap_model

__all__ = ["combine_adapters"]


def _is_plain_lora(ad: Any) -> bool:
    return isinstance(ad, LoRA) and type(ad).forward is LoRA.forward and not ad.needs_base


def combine_adapters(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float],
    *,
    new_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = 0,
) -> nn.Module:
    r"""Add the adapter ``new_name``, a weighted combination of the LoRA adapters ``names``, to every layer.

    Parameters
    ----------
    model : nn.Module
        An injected model whose adapters ``names`` are plain LoRA (``lora``, rsLoRA, PiSSA, MiLoRA shells:
        :math:`\Delta W = s\,BA`).
    names : sequence of str
        The adapters to combine (each held by some layers; a layer combines the ones it holds, as PEFT).
    weights : sequence of float
        :math:`w_t`, one per name.
    new_name : str
        The new adapter's name (not in use).  It is added inactive; :func:`set_adapter` activates it.
    combination_type : str, default ``"svd"``
        One of :data:`~lowrank_theory.merging.COMBINATION_TYPES`.
    svd_rank, density, majority_sign_method
        As :func:`~lowrank_theory.merging.combine_lora` (``density`` for the pruning and DARE types).
    seed : int, optional
        Root seed of the DARE types' masks; layer ``name`` uses ``derive_seed(seed, name)``.

    Returns
    -------
    nn.Module
        ``model``, with ``new_name`` a :class:`~lowrank_theory.adapters.lowrank.LoRA` of scale 1
        (``alpha = rank``) in every layer that holds one of ``names``, in the adapters' dtype and device.

    Raises
    ------
    ValueError, TypeError
        Unknown or non-LoRA adapters, a name in use, weights of the wrong length, bad options; everything
        is computed before the first layer changes, so a failure leaves the model as it was.
    """
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    if not names or any(n not in known for n in names) or len(set(names)) != len(names):
        raise ValueError(f"names must be distinct adapter names of the model, got {names}; known: {known}")
    if not isinstance(new_name, str) or new_name in known:
        raise ValueError(f"new_name must be a new adapter name (a str not in {known}), got {new_name!r}")
    if isinstance(weights, str | bytes) or len(weights) != len(names):
        raise ValueError(f"weights must hold one number per name ({len(names)}), got {weights!r}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    built: dict[str, LoRA] = {}
    for lname, layer in adapted_layers(model).items():
        mine = [(n, w) for n, w in zip(names, weights) if n in layer.adapters]
        if not mine:
            continue
        ads = [layer.adapters[n] for n, _ in mine]
        bad = [n for (n, _), ad in zip(mine, ads) if not _is_plain_lora(ad)]
        if bad:
            raise TypeError(f"layer {lname!r}: adapters {bad} are not plain LoRA (s·B·A); combine_adapters merges "
                            f"LoRA factors (for other methods merge their ΔW with lowrank_theory.merging)")
        with torch.no_grad():
            B, A = combine_lora([(ad.B.detach(), ad.A.detach()) for ad in ads], [w for _, w in mine],
                                combination_type, scalings=[ad.scale for ad in ads], svd_rank=svd_rank,
                                density=density, majority_sign_method=majority_sign_method,
                                seed=None if seed is None else derive_seed(seed, lname))
            r = int(B.shape[1])
            new = LoRA(layer.d_out, layer.d_in, rank=r, alpha=float(r)).to(device=ads[0].B.device,
                                                                         dtype=ads[0].B.dtype)
            new.B.copy_(B.to(new.B.dtype))
            new.A.copy_(A.to(new.A.dtype))
        built[lname] = new
    for lname, new in built.items():
        adapted_layers(model)[lname].add_adapter(new_name, new)
    root = unwrap_model(model)
    records = list(getattr(root, CONFIG_ATTR, None) or [])
    ranks = sorted({ad.rank for ad in built.values()})
    # one rank for all layers (the svd types, or equal input ranks): a checkpoint replays as an injection;
    # per-layer ranks (cat of unequal ranks) load with load_adapters(..., inject=True, resize=True)
    cfg = {"rank": ranks[0], "alpha": float(ranks[0])} if len(ranks) == 1 else {"rank": ranks[-1]}
    records.append({"method": "lora", "cfg": cfg, "layers": list(built), "adapter_name": new_name,
                    "from_weight": False, "combined_from": names, "weights": [float(w) for w in weights],
                    "combination_type": combination_type})
    setattr(root, CONFIG_ATTR, records)
    return model
