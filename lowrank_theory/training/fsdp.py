r"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for models with adapters injected.

:func:`shard_model` shards an injected model over the ranks of the process group, base and
adapters alike: one FSDP group per block (the classes the model lists in Hugging Face's
``_no_split_modules``, e.g. ``GPT2Block``, ``BertLayer``), then the root for the rest.  Each
rank then holds :math:`1/\text{world}` of every sharded tensor as a ``DTensor`` (``Shard(0)``);
FSDP all-gathers a group's parameters before its forward and reduce-scatters (averages) their
gradients after its backward, so a step sees the gradient of the global batch, as under DDP.

What is *not* sharded, and why:

* **Buffers** -- FSDP2 shards parameters only; buffers (persistent or not) stay whole and
  replicated on every rank.  The frozen random bases of VeRA, RandLoRA, NoLA, ... are
  non-persistent buffers regenerated from seeds, LoCA's locations and DCT constants, FourierFT's
  fixed entries, Uni-LoRA's projection indices are buffers too: they survive sharding untouched
  (the tests compare them bit for bit).
* **Parameters shared by several adapted layers** (Uni-LoRA's one vector :math:`\theta_d`,
  S\ :sup:`2`-LoRA's shared pair) -- a parameter belongs to exactly one FSDP group, but a shared
  one is read by every block's group, so it would be resharded under the next block.  They are
  kept out of every group (``ignored_params``): whole, replicated, and their gradient averaged
  over the ranks by a hook after it is accumulated (what DDP does).  They are small by design.
* **0-d parameters** (LoLDU's scale :math:`\sigma`) -- ``fully_shard`` refuses scalars; kept whole
  the same way.
* **All adapter parameters when** ``replicate_adapters=True`` -- needed by rank schedules
  (AdaLoRA, SoRA, IncreLoRA, LoRA-Squeeze): they replace adapter tensors by new ones of another
  shape mid-training, but FSDP2 builds its parameter groups (the flat all-gather layout) once,
  in ``fully_shard``, and cannot follow a parameter that is replaced or changes shape.  The
  frozen base -- nearly all the memory -- is still sharded.  :class:`~lowrank_theory.training.trainer.Trainer`
  sets it when a callback is a :class:`~lowrank_theory.training.rank_change.RankSchedule`.
  Without it, a replaced or reshaped sharded adapter tensor is reported (``RuntimeError``) at
  the next forward instead of silently training the stale one.

Mixed precision: ``mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``
computes in bf16 and reduces gradients in fp32, keeping fp32 sharded parameters for the optimizer.
Replicated parameters stay fp32, so run the forward under ``torch.autocast`` (the trainer does).

Checkpoints: :func:`~lowrank_theory.training.checkpoint.save_adapters` on a sharded model is a
collective -- every rank calls it, the sharded tensors are gathered (:func:`full_tensor`) and rank
0 writes the same files as for an unsharded model; :func:`~lowrank_theory.training.checkpoint_load.load_adapters`
loads such a file into a sharded model (each rank keeps its shard, :func:`shard_like`) or an
unsharded one.

References
----------
PyTorch FSDP2: ``torch.distributed.fsdp.fully_shard`` (per-parameter DTensor sharding);
Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", VLDB 2023.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .injection import adapted_layers, unwrap_model

__all__ = [
    "clip_grad_norm_",
    "full_tensor",
    "gathered",
    "is_dtensor",
    "is_sharded",
    "replicated_parameters",
    "shard_like",
    "shard_model",
]

log = logging.getLogger(__name__)

INFO_ATTR = "_lowrank_theory_fsdp"
HOOK_ATTR = "_lowrank_theory_grad_sync"


# ============================================================================ DTensor helpers
def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (False, at no import cost, when DTensor was never imported)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``t.full_tensor()`` for a ``DTensor`` (a collective: every rank must call), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(src: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``src`` (the whole tensor, on every rank) laid out like ``ref``: this rank's part as a
    ``DTensor`` of ``ref``'s mesh and placements when ``ref`` is one (no communication), else ``src``
    on ``ref``'s device."""
    if not is_dtensor(ref):
        return src.to(ref.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(src.to(ref.device_mesh.device_type), ref.device_mesh, ref.placements, src_data_rank=None)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (sharded by FSDP2 or otherwise distributed)."""
    return any(is_dtensor(p) for p in model.parameters())


# ============================================================================ what stays whole
def replicated_parameters(model: nn.Module, *, replicate_adapters: bool = False) -> list[nn.Parameter]:
    """The parameters :func:`shard_model` keeps whole (see the module docstring), each once.

    Parameters
    ----------
    model : nn.Module
    replicate_adapters : bool
        Every adapter parameter too (for rank schedules).

    Returns
    -------
    list of nn.Parameter
        Parameters read by more than one adapted layer, 0-d parameters, and (with
        ``replicate_adapters``) every adapter parameter.
    """
    layers = adapted_layers(model)
    count: Counter[int] = Counter()
    for layer in layers.values():
        count.update({id(p) for p in layer.adapter.parameters()})
    out: dict[int, nn.Parameter] = {}
    for layer in layers.values():
        for p in layer.adapter.parameters():
            if count[id(p)] > 1 or p.ndim == 0 or replicate_adapters:
                out[id(p)] = p
    for p in model.parameters():
        if p.ndim == 0:
            out[id(p)] = p
    return list(out.values())


def _block_classes(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


@dataclass
class _ShardInfo:
    """What :func:`shard_model` recorded, for the forward-time checks."""

    replicate_adapters: bool
    world: int
    group: Any
    kept: list[nn.Parameter]
    reshard_after_forward: bool | None
    # layer name -> (adapter object, {parameter name: global shape}) of the sharded adapter tensors
    sharded: dict[str, tuple[nn.Module, dict[str, tuple[int, ...]]]] = field(default_factory=dict)


def _average_grad(info: _ShardInfo):
    def hook(p: torch.Tensor) -> None:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=info.group)
            p.grad.div_(info.world)

    return hook


def _attach_grad_sync(model: nn.Module, info: _ShardInfo) -> None:
    """Hook every whole trainable parameter once: its gradient is averaged over the ranks.

    Whole parameters are the ones kept out of FSDP at sharding time and, with
    ``replicate_adapters``, every adapter parameter now in the model (a rank schedule's new
    tensors included).  FSDP's own unsharded views of its parameters are never among them.
    """
    params = list(info.kept)
    if info.replicate_adapters:
        params += [p for layer in adapted_layers(model).values() for p in layer.adapter.parameters()]
    for p in params:  # marked on the tensor itself: an id() could be reused by a rank change's new tensor
        if p.requires_grad and getattr(p, HOOK_ATTR, None) is not info:
            p.register_post_accumulate_grad_hook(_average_grad(info))
            setattr(p, HOOK_ATTR, info)


def _check_adapters(model: nn.Module, info: _ShardInfo) -> None:
    layers = adapted_layers(model)
    for name, (adapter, shapes) in info.sharded.items():
        now = layers[name].adapter if name in layers else None
        if now is not adapter:
            raise RuntimeError(
                f"the adapter of layer {name!r} was replaced after shard_model; FSDP2 fixes its parameter "
                "groups in fully_shard and cannot follow it.  Rank schedules need "
                "shard_model(..., replicate_adapters=True)"
            )
        for pname, shape in shapes.items():
            t = getattr(adapter, pname, None)
            if t is None or tuple(t.shape) != shape:
                raise RuntimeError(
                    f"adapter tensor {name}.adapter.{pname} changed from shape {shape} to "
                    f"{None if t is None else tuple(t.shape)} after shard_model; FSDP2 cannot reshape a sharded "
                    "parameter.  Rank schedules need shard_model(..., replicate_adapters=True)"
                )


def shard_model(
    model: nn.Module,
    *,
    blocks: Sequence[str | type] | None = None,
    mesh: Any = None,
    mp_policy: Any = None,
    replicate_adapters: bool | None = None,
    reshard_after_forward: bool | None = None,
) -> nn.Module:
    r"""Shard ``model`` (adapters injected, on its device) with FSDP2, in place.

    Parameters
    ----------
    model : nn.Module
        An injected model, already on the device it trains on (``fully_shard`` moves sharded
        tensors, never the whole parameters kept out of it).
    blocks : sequence of str or type, optional
        Module classes (or class names) whose instances become their own FSDP group (the
        outermost of nested matches);
        default the model's ``_no_split_modules`` (Hugging Face's list of its repeated blocks);
        ``()`` gives one group for the whole model.
    mesh : DeviceMesh, optional
        Default: a 1-d mesh over the whole process group (gloo on the CPU, NCCL on CUDA).
    mp_policy : MixedPrecisionPolicy, optional
        FSDP2's mixed precision (e.g. bf16 params, fp32 reduce).
    replicate_adapters : bool, optional
        Keep every adapter parameter whole (rank schedules need it; see the module docstring).
        Default: when the model holds AdaLoRA or SoRA adapters, the methods made for a rank
        schedule (AdaLoRA, IncreLoRA, SoRA; their regularizer and gates are also read outside the
        forward, where sharded tensors are not gathered); pass ``True`` for LoRA-Squeeze (plain
        LoRA adapters) in your own loop.
    reshard_after_forward : bool, optional
        FSDP2's switch (default: blocks reshard, the root keeps its parameters until backward).

    Returns
    -------
    nn.Module
        ``model``: its parameters are ``DTensor`` shards except :func:`replicated_parameters`.

    Raises
    ------
    ValueError
        No process group, or the model is already sharded.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("shard_model needs torch.distributed: launch with torchrun (or init_process_group first)")
    model = unwrap_model(model)
    if is_sharded(model) or hasattr(model, INFO_ATTR):
        raise ValueError("model is already sharded")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if replicate_adapters is None:
        from ..adapters.adaptive_rank import AdaLoRA, SoRA

        replicate_adapters = any(isinstance(layer.adapter, AdaLoRA | SoRA) for layer in adapted_layers(model).values())
    kept = replicated_parameters(model, replicate_adapters=replicate_adapters)
    ignored = set(kept) or None
    kw: dict[str, Any] = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(), "ignored_params": ignored}
    if reshard_after_forward is not None:
        kw["reshard_after_forward"] = reshard_after_forward
    want = _block_classes(model) if blocks is None else {b if isinstance(b, str) else b.__name__ for b in blocks}
    units: dict[str, nn.Module] = {}
    for name, m in model.named_modules():  # pre-order: the outermost match of a nest comes first
        if name and type(m).__name__ in want and not any(name.startswith(u + ".") for u in units):
            units[name] = m
    for m in units.values():
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    group = None if mesh is None else mesh.get_group()
    info = _ShardInfo(replicate_adapters, dist.get_world_size(group), group, kept, reshard_after_forward)
    if not replicate_adapters:
        kept_ids = {id(p) for p in kept}
        for lname, layer in adapted_layers(model).items():
            shapes = {k: tuple(p.shape) for k, p in layer.adapter.named_parameters() if id(p) not in kept_ids}
            info.sharded[lname] = (layer.adapter, shapes)
    _attach_grad_sync(model, info)

    def pre_forward(module: nn.Module, args: Any) -> None:
        _check_adapters(module, info)
        _attach_grad_sync(module, info)

    model.register_forward_pre_hook(pre_forward, prepend=True)  # before FSDP's all-gather
    object.__setattr__(model, INFO_ATTR, info)
    log.info("sharded %d blocks + root over %d ranks; %d parameter(s) kept whole", len(units), info.world, len(kept))
    return model


# ============================================================================ gathered parameters
@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    r"""All-gather every FSDP group of ``model`` for the block and keep it whole through forwards;
    reshard at the end.  A collective (every rank enters and leaves together).

    For code that reads parameters outside a forward -- ``delta_weight()``, ``merged_weight()``, an
    evaluation that compares :math:`\Delta W` with a target -- which on a sharded model would
    meet ``DTensor`` shards.  While inside, every rank holds the whole model (no sharding memory
    saving), so use it for evaluation or inspection, not for training steps.
    """
    from torch.distributed.fsdp import FSDPModule

    root = unwrap_model(model)
    info = getattr(root, INFO_ATTR, None)
    mods = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
    blocks = [m for m in mods if m is not root]
    for m in blocks:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        after = True if info is None or info.reshard_after_forward is None else info.reshard_after_forward
        for m in blocks:
            m.set_reshard_after_forward(after, recurse=False)
        for m in mods:
            m.reshard()


# ============================================================================ gradient clipping
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    r"""Scale the gradients so that their global 2-norm is at most ``max_norm``; return the norm before.

    :math:`\lVert g\rVert = \big(\sum_{\text{sharded}} \lVert g_{\text{local}}\rVert^2` (summed over the
    ranks) :math:`+ \sum_{\text{whole}} \lVert g\rVert^2\big)^{1/2}` -- whole (replicated) gradients are
    equal on every rank and counted once -- then every gradient is multiplied by
    :math:`\min(1, \text{max\_norm}/(\lVert g\rVert + 10^{-6}))`, the rule of
    ``torch.nn.utils.clip_grad_norm_``, which refuses a mix of ``DTensor`` and plain gradients.
    A collective when any gradient is sharded.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g.to_local() for g in grads if is_dtensor(g)]
    whole = [g for g in grads if not is_dtensor(g)]
    dev = (sharded or whole)[0].device
    sq = torch.zeros((), dtype=torch.float64, device=dev)
    for g in sharded:
        sq += g.detach().double().pow(2).sum()
    if any(is_dtensor(g) for g in grads):
        mesh = next(g for g in grads if is_dtensor(g)).device_mesh
        dist.all_reduce(sq, group=mesh.get_group())
    for g in whole:
        sq += g.detach().double().pow(2).sum().to(dev)
    total = sq.sqrt()
    coef = min(1.0, max_norm / (float(total) + 1e-6)) if math.isfinite(float(total)) else 1.0
    if coef < 1.0:
        for g in sharded + whole:
            g.mul_(coef)
    return total
