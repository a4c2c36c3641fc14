r"""The :class:`~lowrank_theory.training.trainer.Trainer`'s checkpoint directory: written, and read back
validated first.

A checkpoint (never pickle) holds

* ``adapters.safetensors`` + ``adapter_config.json`` -- :func:`~lowrank_theory.training.checkpoint.save_adapters`;
* ``trainable.safetensors`` -- the other trainable tensors (a classifier head) by parameter name;
* ``optimizer.safetensors`` -- the optimizer state's tensors as ``"<param index>.<key>"``; its JSON
  skeleton (non-tensor state, param groups) and class name are in ``trainer_state.json``;
* ``callbacks.safetensors`` -- the callbacks' tensor state as ``"<callback index>.<key>"``; their
  JSON state is in ``trainer_state.json``;
* ``rng.safetensors`` -- every rank's torch RNG states as ``"<kind>.<rank>"``;
* ``trainer_state.json`` -- the step, early-stopping state, world size and config.

:func:`load_trainer_checkpoint` reads and checks every file -- each parses and is finite; the step
and counters are integers; the adapters against the model (:func:`~lowrank_theory.training.checkpoint_load.plan_load`);
the trainable tensors' names, shapes and dtypes; the optimizer against the one this run builds
(class, number and size of the param groups, their keys, every state tensor's shape); the
callbacks' entries; the RNG states (a throw-away generator accepts them) -- before it changes
anything.  The optimizer is built (and the callbacks load their state) with the resized adapters
in place; if that fails, the old adapter modules go back and the callbacks get their previous
state again.  Only then are the tensors copied, the optimizer installed and the RNG set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from .checkpoint import read_json, read_safetensors, save_adapters
from .checkpoint_load import plan_load
from .fsdp import full_tensor, is_sharded, shard_like
from .injection import adapted_layers
from .train_config import optimizer_from_safetensors, optimizer_to_safetensors

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["load_trainer_checkpoint", "save_trainer_checkpoint"]

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
CALLBACKS_NAME = "callbacks.safetensors"
RNG_NAME = "rng.safetensors"


# ============================================================================ RNG
def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch RNG states: ``torch_cpu`` (and ``torch_cuda`` on a CUDA device)."""
    out = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["torch_cuda"] = torch.cuda.get_rng_state(device)
    return out


def gather_rng(device: torch.device, world: int) -> dict[str, torch.Tensor]:
    """Every rank's RNG states as ``{"<kind>.<rank>": state}`` (an all-gather when ``world > 1``)."""
    mine = rng_states(device)
    if world == 1:
        return {f"{k}.0": v for k, v in mine.items()}
    out = {}
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    for k, v in mine.items():
        parts = [torch.empty_like(v, device=on) for _ in range(world)]
        dist.all_gather(parts, v.to(on))
        out.update({f"{k}.{r}": t.cpu() for r, t in enumerate(parts)})
    return out


# ============================================================================ save
def save_trainer_checkpoint(trainer: Trainer, path: str | os.PathLike) -> Path:
    """Write ``trainer``'s checkpoint to ``path`` (every rank takes part, rank 0 writes; atomic rename).

    Under FSDP the sharded adapter, trainable and optimizer tensors are gathered whole first
    (collectives, in the same order on every rank), so the files are those of an unsharded run.
    """
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    rng = gather_rng(trainer.device, trainer.world)  # collective: every rank takes part
    sharded = is_sharded(trainer.model)
    if trainer.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if trainer.is_main or sharded:
        if adapted_layers(trainer.model):
            save_adapters(trainer.model, tmp)  # sharded: a collective, rank 0 writes
        extra = {n: full_tensor(p.detach()).cpu().contiguous() for n, p in trainer._extra_trainable().items()}
        tensors, skeleton = optimizer_to_safetensors(trainer.optimizer)
    if trainer.is_main:
        save_file(extra, str(tmp / TRAINABLE_NAME))
        save_file(tensors, str(tmp / OPTIMIZER_NAME))
        cb_tensors, cb_json = {}, []
        for i, cb in enumerate(trainer.callbacks):
            state = cb.state_dict() if callable(getattr(cb, "state_dict", None)) else {}
            cb_json.append({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)})
            cb_tensors.update(
                {f"{i}.{k}": v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
            )
        save_file(cb_tensors, str(tmp / CALLBACKS_NAME))
        save_file(rng, str(tmp / RNG_NAME))
        state = {"step": trainer.step, "best": trainer.best, "bad_evals": trainer.bad_evals,
                 "world_size": trainer.world, "config": asdict(trainer.config), "optimizer": skeleton,
                 "callbacks": cb_json, "optimizer_class": type(trainer.optimizer).__name__}
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    if trainer.world > 1:
        dist.barrier()
    return final


# ============================================================================ checks of single files
def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _check_state(state: dict[str, Any], file: Path) -> None:
    """``trainer_state.json``: the types of every field the resume reads."""
    for key, lo in (("step", 0), ("bad_evals", 0), ("world_size", 1)):
        if not _is_int(state.get(key), lo):
            raise ValueError(f"{file}: {key!r} must be an int >= {lo}, got {state.get(key)!r}")
    best = state.get("best")
    if best is not None and (isinstance(best, bool) or not isinstance(best, int | float) or math.isnan(best)):
        raise ValueError(f"{file}: 'best' must be a number or null, got {best!r}")
    if not isinstance(state.get("optimizer_class"), str):
        raise ValueError(f"{file}: 'optimizer_class' must be a string, got {state.get('optimizer_class')!r}")
    skel = state.get("optimizer")
    if not (isinstance(skel, dict) and isinstance(skel.get("state"), dict)
            and isinstance(skel.get("param_groups"), list)):
        raise ValueError(f"{file}: 'optimizer' must be an object with 'state' (object) and 'param_groups' (list)")
    for g in skel["param_groups"]:
        if not (isinstance(g, dict) and isinstance(g.get("params"), list) and all(_is_int(i, 0) for i in g["params"])):
            raise ValueError(f"{file}: every optimizer param group needs 'params', a list of ints; got {g!r}")
    for pid, st in skel["state"].items():
        if not (pid.isdigit() and isinstance(st, dict)):
            raise ValueError(f"{file}: optimizer state entry {pid!r} must be '<param index>': object")
    cbs = state.get("callbacks")
    if not (isinstance(cbs, list) and all(isinstance(c, dict) for c in cbs)):
        raise ValueError(f"{file}: 'callbacks' must be a list of objects, got {cbs!r}")


def _indexed(tensors: dict[str, torch.Tensor], file: Path, n: int | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """``{"<i>.<key>": t}`` -> ``{i: {key: t}}``; every ``i`` an int (below ``n`` when given)."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        head, dot, rest = key.partition(".")
        if not (head.isdigit() and dot and rest) or (n is not None and int(head) >= n):
            want = f"'<index below {n}>.<name>'" if n is not None else "'<index>.<name>'"
            raise ValueError(f"{file}: tensor key {key!r} is not {want}")
        out.setdefault(int(head), {})[rest] = t
    return out


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    return a == b or (a.is_floating_point and b.is_floating_point)


def _check_trainable(tensors: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], file: Path) -> None:
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(f"{file}: trainable tensors differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, t in tensors.items():
        p = params[k]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{file}: tensor {k!r} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}")
        if not _same_kind(t.dtype, p.dtype):
            raise ValueError(f"{file}: tensor {k!r} has dtype {t.dtype}, the model's is {p.dtype}")


def _check_rng(rng: dict[str, torch.Tensor], trainer: Trainer, saved_world: int, file: Path) -> dict[str, torch.Tensor]:
    """This rank's states, each accepted by a throw-away generator of its device (the global one is untouched)."""
    out = {}
    for kind, now in rng_states(trainer.device).items():
        key = f"{kind}.{trainer.rank}"
        if key not in rng:
            if saved_world == trainer.world:
                raise ValueError(f"{file}: no {key!r} state (written with world_size={saved_world})")
            continue  # another world size: this rank keeps its seeded RNG (warned above)
        t = rng[key]
        if t.dtype != now.dtype or tuple(t.shape) != tuple(now.shape):
            raise ValueError(f"{file}: {key!r} is {t.dtype} {tuple(t.shape)}, want {now.dtype} {tuple(now.shape)}")
        try:
            torch.Generator(device=trainer.device if kind == "torch_cuda" else "cpu").set_state(t)
        except RuntimeError as exc:
            raise ValueError(f"{file}: {key!r} is not a valid RNG state ({exc})") from None
        out[kind] = t
    return out


# ============================================================================ the optimizer
def _load_optimizer(trainer: Trainer, state: dict[str, Any], tensors: dict[str, torch.Tensor], root: Path):
    """Build this run's optimizer and load the saved state into it, checking it all (the new
    optimizer is the caller's to install; ``trainer.optimizer`` is not touched)."""
    file, state_file = root / OPTIMIZER_NAME, root / STATE_NAME
    opt = trainer._make_optimizer()
    if state["optimizer_class"] != type(opt).__name__:
        raise ValueError(f"{state_file}: the checkpoint's optimizer is {state['optimizer_class']}, "
                         f"this run builds {type(opt).__name__}")
    skel = state["optimizer"]
    saved, groups = skel["param_groups"], opt.param_groups
    sizes = [len(g["params"]) for g in saved], [len(g["params"]) for g in groups]
    if sizes[0] != sizes[1]:
        raise ValueError(f"{state_file}: optimizer param group sizes {sizes[0]}, this run's are {sizes[1]}")
    ids = [i for g in saved for i in g["params"]]
    params = dict(zip(ids, (p for g in groups for p in g["params"]), strict=True))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{state_file}: optimizer param groups list a parameter index twice")
    per_param = _indexed(tensors, file)
    unknown = sorted(({int(k) for k in skel["state"]} | set(per_param)) - set(params))
    if unknown:
        raise ValueError(f"{file}: optimizer state for parameter indices {unknown[:5]} that no param group lists")
    for pid, entries in per_param.items():
        p = params[pid]
        for k, t in entries.items():
            if t.ndim and tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{file}: state {pid}.{k} has shape {tuple(t.shape)}, its parameter {tuple(p.shape)}")
            if k != "step" and p.is_floating_point() and not t.is_floating_point():
                raise ValueError(f"{file}: state {pid}.{k} has dtype {t.dtype}, its parameter {p.dtype}")
    fresh_keys = [set(g) - {"params", "param_names"} for g in groups]
    # the state of a sharded parameter is sharded like it (this rank's part of the whole tensor)
    tensors = {k: shard_like(t, params[int(k.split(".", 1)[0])]) if t.ndim else t for k, t in tensors.items()}
    try:
        opt.load_state_dict(optimizer_from_safetensors(tensors, skel))
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{file}: the optimizer refused the saved state ({exc})") from None
    for i, (g, want) in enumerate(zip(opt.param_groups, fresh_keys, strict=True)):
        lost = sorted(want - set(g))
        if lost:
            raise ValueError(f"{state_file}: optimizer param group {i} lacks {lost}")
    return opt


# ============================================================================ load
def load_trainer_checkpoint(trainer: Trainer, path: str | os.PathLike) -> None:
    """Restore model tensors, optimizer, callbacks, RNG and step from ``path``; validate everything first.

    Raises
    ------
    ValueError
        A missing, truncated or non-safetensors file, NaN/Inf tensors, a field of the wrong type,
        adapters, trainable tensors, optimizer (class, groups, state shapes), callback state or
        RNG state that do not fit this run.  The message names the file.  Model, optimizer,
        callbacks and RNG are left as they were.
    """
    root = Path(path)
    state = read_json(root / STATE_NAME, "load_checkpoint")
    _check_state(state, root / STATE_NAME)
    if state["world_size"] != trainer.world:
        log.warning("checkpoint written with world_size=%s, resuming with %s: the data order differs",
                    state["world_size"], trainer.world)
    plan = plan_load(trainer.model, root, resize=True) if adapted_layers(trainer.model) else None
    params = trainer._extra_trainable()
    extra = read_safetensors(root / TRAINABLE_NAME, "load_checkpoint")
    _check_trainable(extra, params, root / TRAINABLE_NAME)
    opt_tensors = read_safetensors(root / OPTIMIZER_NAME, "load_checkpoint")
    cb_tensors = _indexed(read_safetensors(root / CALLBACKS_NAME, "load_checkpoint"), root / CALLBACKS_NAME,
                          len(trainer.callbacks))
    if len(state["callbacks"]) != len(trainer.callbacks):
        raise ValueError(f"{root / STATE_NAME}: state for {len(state['callbacks'])} callbacks, "
                         f"this trainer has {len(trainer.callbacks)}")
    rng = _check_rng(read_safetensors(root / RNG_NAME, "load_checkpoint"), trainer, state["world_size"],
                     root / RNG_NAME)

    loaded: list[tuple[Any, dict[str, Any]]] = []  # (callback, its state before) for the undo
    try:
        with plan.applying() if plan is not None else contextlib.nullcontext():
            opt = _load_optimizer(trainer, state, opt_tensors, root)
            for i, cb in enumerate(trainer.callbacks):
                if not callable(getattr(cb, "load_state_dict", None)):
                    continue
                if callable(getattr(cb, "state_dict", None)):  # a refusal may leave it half-loaded: undo that too
                    loaded.append((cb, cb.state_dict()))
                try:
                    cb.load_state_dict({**state["callbacks"][i], **cb_tensors.get(i, {})})
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{root / CALLBACKS_NAME}: callback {i} ({type(cb).__name__}) refused "
                                     f"its saved state ({exc})") from None
    except BaseException:
        for cb, before in reversed(loaded):  # the old adapters are back in place: restore against them
            cb.load_state_dict(before)
        raise
    with torch.no_grad():
        for k, v in extra.items():
            params[k].copy_(shard_like(v.to(params[k].dtype), params[k]))
    trainer.optimizer = opt
    if "torch_cpu" in rng:
        torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng:
        torch.cuda.set_rng_state(rng["torch_cuda"], trainer.device)
    trainer.step, trainer.best, trainer.bad_evals = state["step"], state["best"], state["bad_evals"]

