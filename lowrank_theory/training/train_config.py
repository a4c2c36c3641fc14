r"""Settings and plumbing of :class:`~lowrank_theory.training.trainer.Trainer`.

:class:`TrainConfig` (every field JSON-able, saved with checkpoints), :func:`lr_factor` (warm-up
then linear / cosine / constant), :func:`init_distributed` (join the ``torchrun`` process group:
NCCL on CUDA, gloo otherwise), and the optimizer state as safetensors tensors plus a JSON skeleton
(never pickle).
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "TrainConfig",
    "init_distributed",
    "lr_factor",
    "optimizer_from_safetensors",
    "optimizer_to_safetensors",
    "peak_memory_mb",
]


@dataclass
class TrainConfig:
    r"""Settings of a :class:`Trainer` run (all JSON-able; saved with checkpoints).

    Attributes
    ----------
    steps : int
        Optimizer steps.
    batch_size : int
        Global batch (all ranks, all micro-batches); divisible by ``grad_accum * world_size``.
    grad_accum : int
        Micro-batches per step.
    lr, weight_decay : float
    rule : str
        Optimizer rule for :func:`~lowrank_theory.training.optim.make_optimizer`
        (``"adamw"``, ``"sgd"``, ``"lora+"``, ``"lorapro"``, ``"altlora"``, ``"allora"``).
    rule_kwargs : dict
        Extra keywords of the rule.
    lr_schedule : {"linear", "cosine", "constant"}
        Decay after ``warmup_steps`` of linear warm-up.
    warmup_steps : int
    max_grad_norm : float or None
        Clip the global gradient norm.
    eval_every : int
        Evaluate every this many steps (0: only at the end).
    early_stop_patience : int
        Stop after this many evaluations without improvement (0: never).
    early_stop_metric, early_stop_mode : str
        Metric of ``eval_fn`` and ``"min"`` / ``"max"``.
    mixed_precision : {"auto", "bf16", "no"}
        ``"auto"``/``"bf16"``: ``torch.autocast(bfloat16)`` on CUDA; the CPU always runs float32.
    log_every : int
    save_every : int
        Checkpoint every this many steps (0: only at the end, when ``out_dir`` is set).
    out_dir : str or None
        Where metrics and checkpoints go.
    seed : int
        Data order and torch RNG.
    progress : bool
        ``tqdm`` bar on rank 0.
    device : str or None
        Default ``cuda:<local_rank>`` when CUDA is available, else ``cpu``.
    train_mode : bool
        Put the model in ``train()`` mode (dropout on) while training.
    fsdp : bool
        Shard the model with FSDP2 (:func:`~lowrank_theory.training.fsdp.shard_model`) instead of
        wrapping it in DDP; needs ``torchrun`` (any ``--nproc_per_node``, 1 included).  On CUDA with
        ``mixed_precision`` ``"auto"``/``"bf16"`` FSDP computes in bf16 and reduces in fp32.
    fsdp_gather_eval : bool
        Under FSDP, run ``eval_fn`` with the parameters gathered whole
        (:func:`~lowrank_theory.training.fsdp.gathered`), so evaluations that read weights
        directly (the teacher task's :math:`\Delta W` error) work; every rank then holds the whole
        model during evaluation.  ``False`` evaluates sharded: enough for an ``eval_fn`` that only
        runs forwards, and what a model too large for one device needs.
    """

    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    rule: str = "adamw"
    rule_kwargs: dict[str, Any] = field(default_factory=dict)
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    eval_every: int = 0
    early_stop_patience: int = 0
    early_stop_metric: str = "loss"
    early_stop_mode: str = "min"
    mixed_precision: str = "auto"
    log_every: int = 1
    save_every: int = 0
    out_dir: str | None = None
    seed: int = 0
    progress: bool = True
    device: str | None = None
    train_mode: bool = True
    fsdp: bool = False
    fsdp_gather_eval: bool = True

    def validate(self) -> TrainConfig:
        """Check every field (``ValueError`` naming it)."""
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("warmup_steps", "eval_every", "early_stop_patience", "save_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be finite and > 0, got {self.lr!r}")
        if self.lr_schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'linear', 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"mixed_precision must be 'auto', 'bf16' or 'no', got {self.mixed_precision!r}")
        if self.early_stop_mode not in ("min", "max"):
            raise ValueError(f"early_stop_mode must be 'min' or 'max', got {self.early_stop_mode!r}")
        for name in ("fsdp", "fsdp_gather_eval"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be finite and > 0 or None, got {self.max_grad_norm!r}")
        return self


def lr_factor(step: int, steps: int, warmup: int, kind: str) -> float:
    r"""Multiplier of the base learning rate for (0-based) step ``step`` of ``steps``.

    Linear warm-up :math:`(t+1)/w` for :math:`t < w`, then ``"constant"`` 1, ``"linear"``
    :math:`1 - (t-w)/(T-w)`, or ``"cosine"`` :math:`\tfrac12(1+\cos(\pi (t-w)/(T-w)))`.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or steps <= warmup:
        return 1.0
    frac = (step - warmup) / (steps - warmup)
    return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


def init_distributed(*, require: bool = False) -> tuple[int, int, int]:
    """Join the process group ``torchrun`` describes; return ``(rank, world, local_rank)``.

    Uses NCCL when CUDA is available, gloo otherwise; does nothing when already initialized or
    when not launched by ``torchrun``.  Without ``require`` a group is made only for
    ``WORLD_SIZE`` > 1; with it (FSDP) also for one process, and its absence is an error.

    Raises
    ------
    ValueError
        ``require`` and neither a process group nor ``torchrun``'s environment.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    launched = "MASTER_ADDR" in os.environ and "RANK" in os.environ
    if require and not (dist.is_available() and (dist.is_initialized() or launched)):
        raise ValueError("fsdp=True needs torch.distributed: launch with torchrun (even --nproc_per_node 1) "
                         "or call init_process_group first")
    if (world > 1 or (require and launched)) and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local
    return 0, 1, 0


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory of ``device``, or (CPU) the process's peak RSS so far, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ============================================================================ optimizer state <-> safetensors
def optimizer_to_safetensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``opt.state_dict()`` split into tensors (``"<param id>.<key>"``, for safetensors) and a JSON skeleton.

    State of sharded (``DTensor``) parameters is gathered whole: then a collective, called by every rank.
    """
    from .fsdp import full_tensor

    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_json: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        state_json[str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = full_tensor(v.detach()).cpu().contiguous()
            else:
                state_json[str(pid)][k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"state": state_json, "param_groups": groups}


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], skeleton: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_safetensors`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {int(pid): dict(st) for pid, st in skeleton.get("state", {}).items()}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = []
    for g in skeleton.get("param_groups", []):
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}
