r"""PEFT's LoRA-shaped methods and ours: LoRA / rsLoRA / DoRA, AdaLoRA, HiRA <-> HUT.

**LoRA, rsLoRA, DoRA** (``peft_type: "LORA"``).  Keys ``lora_A.weight`` (r, d_in),
``lora_B.weight`` (d_out, r), DoRA's ``lora_magnitude_vector`` (d_out,) -- the same orientation
as ours for Linear and Conv1D (PEFT's ``fan_in_fan_out`` only says the *base* weight is stored
transposed).  :math:`s = \alpha/r` (``use_rslora``: :math:`\alpha/\sqrt r`) with a global
``lora_alpha`` / ``r`` and per-layer ``alpha_pattern`` / ``rank_pattern``.  Export writes the most
common rank and alpha globally and the escaped full names of the other layers as pattern keys;
layers whose rsLoRA flag differs from the global one get the alpha that gives their scale under
the global rule.  DoRA matches PEFT's :math:`y = (g/\nu)\odot(W_0x + sBAx) + b_0` with the
detached row norm (our ``DoRA(detach_norm=True)``, the default).

**AdaLoRA** (``"ADALORA"``).  PEFT: :math:`\Delta W = B\,(A \odot E)\,\alpha/(\rho + 10^{-5})`
with ``lora_A`` (r, d_in) = our Q, ``lora_B`` (d_out, r) = our P, ``lora_E`` (r, 1) = our
:math:`\lambda`, and :math:`\rho` = ``ranknum`` = ``init_r`` (not saved; kept through pruning, as
our scale is).  A pruned layer is listed in ``rank_pattern`` as ``{"<module>.lora_E": mask}``
with a mask of length ``init_r``; its tensors are stored already cut.  Export: ``init_r`` = the
largest current rank, ``lora_alpha`` = :math:`s(\text{init\_r} + 10^{-5})` for the most common
scale s, and any other layer's scale ratio folded into its :math:`\lambda` (ΔW is linear in it).
The training-schedule fields (``total_step``, ``target_r``, ``tinit``, ...) are not part of the
adapter: export writes ``total_step = 1`` and ``target_r = init_r``; set them before training on
in PEFT.

**HiRA** (``"HIRA"``) is our HUT.  PEFT:
:math:`y = W_0x + b_0 + (W_0 \odot B'A')x = (W_0 \odot (\mathbf 1\mathbf 1^\top + B'A'))x + b_0`;
HUT: :math:`y = (W_0 \odot BA)x + b_0`.  So HiRA of rank r is HUT of rank r + 1 with
:math:`B = [\mathbf 1, B']`, :math:`A = [\mathbf 1; A']`, and HUT of rank r is HiRA of rank r + 1
with :math:`B' = [B, -\mathbf 1]`, :math:`A' = [A; \mathbf 1]` (:math:`B'A' = BA - \mathbf 1\mathbf 1^\top`).
Both directions are exact; each conversion adds one to the rank.  PEFT 0.21 builds every HiRA
layer with the global ``r`` (its dispatcher ignores ``rank_pattern``), so export needs one HUT
rank for all layers.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from .injection import InjectionPlan
from .peft_common import (
    PREFIX,
    Copies,
    Layers,
    PeftFile,
    PeftMethod,
    check_shape,
    detached,
    dropout_of,
    fold,
    global_and_pattern,
    grouped,
    layer_configs,
    most_common,
    one_value,
    per_layer,
    plan,
)

__all__ = ["ADALORA", "HIRA", "LORA"]

logger = logging.getLogger(__name__)

ADALORA_EPS = 1e-5  # PEFT's ranknum + 1e-5 in the AdaLoRA scale


def _rank_alpha_scale(alpha: float, rank: int, rslora: bool, global_rslora: bool) -> float:
    if rslora == global_rslora:
        return alpha
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    return scale * (math.sqrt(rank) if global_rslora else rank)


def _ab(name: str, parts: dict[str, torch.Tensor], a: str, b: str) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = parts[a], parts[b]
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"import_peft: layer {name!r}: {a} {tuple(A.shape)} and {b} {tuple(B.shape)} disagree")
    return A, B


# ============================================================================ LoRA / rsLoRA / DoRA
def _export_lora(layers: Layers) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    methods = {type(layer.adapter).name for layer in layers.values()}
    if len(methods) > 1:
        raise ValueError("PEFT's use_dora is global: export LoRA and DoRA layers separately")
    use_dora = methods == {"dora"}
    cfgs = layer_configs(layers)
    dropout = dropout_of(layers, "lora_dropout") if not use_dora else 0.0
    global_rs = most_common([bool(c["rslora"]) for c in cfgs.values()])
    ranks = {n: int(c["rank"]) for n, c in cfgs.items()}
    alphas = {
        n: _rank_alpha_scale(float(ranks[n] if c["alpha"] is None else c["alpha"]), ranks[n], bool(c["rslora"]),
                             global_rs)
        for n, c in cfgs.items()
    }
    r, rank_pattern = global_and_pattern(ranks)
    alpha, alpha_pattern = global_and_pattern(alphas)
    tensors: dict[str, torch.Tensor] = {}
    for n, layer in layers.items():
        ad = layer.adapter
        tensors[f"{PREFIX}{n}.lora_A.weight"] = detached(ad.A)
        tensors[f"{PREFIX}{n}.lora_B.weight"] = detached(ad.B)
        if use_dora:
            tensors[f"{PREFIX}{n}.lora_magnitude_vector"] = detached(ad.magnitude)
    config = {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": global_rs,
        "use_dora": use_dora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
    }
    return config, tensors


#: LoRA inits that change PEFT's *base* weight: the saved factors are relative to a residual model.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _prepare_lora(model: nn.Module, f: PeftFile) -> tuple[list[InjectionPlan], Copies]:
    init = f.config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ValueError(
            f"import_peft: init_lora_weights={init!r} adapters are relative to PEFT's modified base weight, "
            "not to the original model; convert the adapter to a plain LoRA in PEFT first"
        )
    use_dora = bool(f.get("use_dora", False))
    needed = {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if use_dora else set())
    rslora = bool(f.get("use_rslora", False))
    keys: dict[str, tuple[int, float]] = {}
    for name, parts in f.layers.items():
        if set(parts) != needed:
            raise ValueError(f"import_peft: layer {name!r} has tensors {sorted(parts)}, expected {sorted(needed)}")
        A, _ = _ab(name, parts, "lora_A.weight", "lora_B.weight")
        rank = int(A.shape[0])
        want = int(per_layer(f, name, "r", "rank_pattern", 8))
        if rank != want:
            raise ValueError(f"import_peft: layer {name!r} has rank {rank}, the config says {want}")
        keys[name] = (rank, float(per_layer(f, name, "lora_alpha", "alpha_pattern", 8)))
    method = "dora" if use_dora else "lora"
    cfg: dict[str, Any] = {"rslora": rslora}
    dropout = float(f.get("lora_dropout", 0.0))
    if not use_dora:
        cfg["dropout"] = dropout
    elif dropout:
        logger.warning("import_peft: our DoRA has no dropout; lora_dropout=%s is ignored", dropout)
    plans = [plan(model, method, names, rank=r, alpha=a, **cfg) for (r, a), names in grouped(keys).items()]
    copies: Copies = []
    names = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "magnitude"}
    for p in plans:
        for n, ad in p.adapters.items():
            for suffix, src in f.layers[n].items():
                dst = getattr(ad, names[suffix])
                copies.append((dst, check_shape(n, suffix, src, tuple(dst.shape))))
    return plans, copies


LORA = PeftMethod(
    peft_type="LORA",
    methods=("lora", "dora"),
    suffixes=("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    export=_export_lora,
    prepare=_prepare_lora,
    unsupported=(
        "lora_bias",
        "layer_replication",
        "use_qalora",
        "target_parameters",
        "use_bdlora",
        "alora_invocation_tokens",
        "arrow_config",
    ),
    required=("lora_A.weight", "lora_B.weight"),
)


# ============================================================================ AdaLoRA
def _export_adalora(layers: Layers) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    ranks = {n: layer.adapter.rank for n, layer in layers.items()}
    init_r = max(ranks.values())
    if init_r == 0:
        raise ValueError("every AdaLoRA layer is pruned to rank 0; nothing to export")
    scales = {n: float(layer.adapter.scale) for n, layer in layers.items() if ranks[n] > 0}
    positive = [s for s in scales.values() if s > 0]
    ref = most_common(positive) if positive else 1.0
    tensors: dict[str, torch.Tensor] = {}
    for n, layer in layers.items():
        ad = layer.adapter
        lam = ad.lam.detach()
        if ranks[n] > 0 and scales[n] != ref:
            lam = lam * fold(scales[n], ref)
        tensors[f"{PREFIX}{n}.lora_A"] = detached(ad.Q)
        tensors[f"{PREFIX}{n}.lora_B"] = detached(ad.P)
        tensors[f"{PREFIX}{n}.lora_E"] = detached(lam[:, None])
    pattern = {f"{n}.lora_E": [True] * r + [False] * (init_r - r) for n, r in ranks.items() if r != init_r}
    config = {
        "init_r": init_r,
        "target_r": init_r,
        "r": 8,  # LoraConfig's default; AdaLoRA ignores r (and warns when it is set)
        "lora_alpha": ref * (init_r + ADALORA_EPS),
        "lora_dropout": dropout_of(layers, "lora_dropout"),
        "rank_pattern": pattern or None,
        "total_step": 1,
        "init_lora_weights": True,
    }
    return config, tensors


def _prepare_adalora(model: nn.Module, f: PeftFile) -> tuple[list[InjectionPlan], Copies]:
    init_r = int(f.get("init_r", 12))
    lora_alpha = float(f.get("lora_alpha", 8))
    numerator = lora_alpha if lora_alpha > 0 else float(init_r)  # PEFT: lora_alpha if > 0 else r
    pattern = f.get("rank_pattern", {})
    ranks: dict[str, tuple[int, float]] = {}
    for name, parts in f.layers.items():
        A, _ = _ab(name, parts, "lora_A", "lora_B")
        rank = int(A.shape[0])
        check_shape(name, "lora_E", parts["lora_E"], (rank, 1))
        mask = pattern.get(f"{name}.lora_E")
        if mask is not None and len(mask) != init_r:
            raise ValueError(f"import_peft: rank_pattern of {name!r} has length {len(mask)}, init_r is {init_r}")
        want = int(sum(bool(v) for v in mask)) if mask is not None else init_r
        if rank != want:
            raise ValueError(f"import_peft: layer {name!r} has rank {rank}, the config says {want}")
        ranknum = float(parts["ranknum"].reshape(-1)[0]) if "ranknum" in parts else float(init_r)
        scale = numerator / (ranknum + ADALORA_EPS)
        ranks[name] = (rank, scale)
    dropout = float(f.get("lora_dropout", 0.0))
    plans = [
        plan(model, "adalora", names, rank=r, alpha=s * r, dropout=dropout) for (r, s), names in grouped(ranks).items()
    ]
    copies: Copies = []
    for p in plans:
        for n, ad in p.adapters.items():
            parts = f.layers[n]
            copies.append((ad.Q, check_shape(n, "lora_A", parts["lora_A"], tuple(ad.Q.shape))))
            copies.append((ad.P, check_shape(n, "lora_B", parts["lora_B"], tuple(ad.P.shape))))
            copies.append((ad.lam, parts["lora_E"][:, 0]))
    return plans, copies


ADALORA = PeftMethod(
    peft_type="ADALORA",
    methods=("adalora",),
    suffixes=("lora_A", "lora_B", "lora_E", "ranknum"),
    export=_export_adalora,
    prepare=_prepare_adalora,
    unsupported=("lora_bias", "use_dora", "use_rslora", "layer_replication", "target_parameters"),
    required=("lora_A", "lora_B", "lora_E"),
)


# ============================================================================ HiRA <-> HUT
def _export_hira(layers: Layers) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    ranks = {}
    for n, layer in layers.items():
        ad = layer.adapter
        B, A = ad.B.detach(), ad.A.detach()
        tensors[f"{PREFIX}{n}.hira_B"] = detached(torch.cat([B, -torch.ones_like(B[:, :1])], dim=1))
        tensors[f"{PREFIX}{n}.hira_A"] = detached(torch.cat([A, torch.ones_like(A[:1])], dim=0))
        ranks[n] = ad.rank + 1
    # PEFT 0.21 builds every new HiRA layer with the global r (its dispatcher ignores rank_pattern)
    r = one_value(ranks, "HiRA rank r (PEFT 0.21 ignores HiRA's rank_pattern; give every HUT layer one rank)")
    return {"r": r, "rank_pattern": {}, "hira_dropout": 0.0, "init_weights": True}, tensors


def _prepare_hira(model: nn.Module, f: PeftFile) -> tuple[list[InjectionPlan], Copies]:
    ranks: dict[str, int] = {}
    for name, parts in f.layers.items():
        A, _ = _ab(name, parts, "hira_A", "hira_B")
        rank = int(A.shape[0])
        # PEFT 0.21 creates HiRA layers with the global r whatever rank_pattern says; accept either
        want = {int(f.get("r", 32)), int(per_layer(f, name, "r", "rank_pattern", 32))}
        if rank not in want:
            raise ValueError(f"import_peft: layer {name!r} has rank {rank}, the config says {min(want)}")
        ranks[name] = rank + 1  # HUT's extra all-ones component carries HiRA's identity term
    if float(f.get("hira_dropout", 0.0)):
        logger.warning("import_peft: HUT has no dropout; hira_dropout=%s is ignored", f.get("hira_dropout", 0.0))
    plans = [plan(model, "hut", names, rank=r) for r, names in grouped(ranks).items()]
    copies: Copies = []
    for p in plans:
        for n, ad in p.adapters.items():
            A, B = f.layers[n]["hira_A"], f.layers[n]["hira_B"]
            check_shape(n, "hira_A", A, (ad.rank - 1, ad.d_in))
            check_shape(n, "hira_B", B, (ad.d_out, ad.rank - 1))
            copies.append((ad.A, torch.cat([torch.ones_like(A[:1]), A], dim=0)))
            copies.append((ad.B, torch.cat([torch.ones_like(B[:, :1]), B], dim=1)))
    return plans, copies


HIRA = PeftMethod(
    peft_type="HIRA",
    methods=("hut",),
    suffixes=("hira_A", "hira_B"),
    export=_export_hira,
    prepare=_prepare_hira,
)
