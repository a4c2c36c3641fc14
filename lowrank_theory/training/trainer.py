r"""A small training loop for users who do not bring their own.

:class:`Trainer` runs AdamW (or any rule of :func:`~lowrank_theory.training.optim.make_optimizer`)
with a warm-up + linear/cosine/constant learning-rate schedule, gradient accumulation, gradient
clipping, bf16 autocast on CUDA (float32 on the CPU), periodic evaluation with early stopping,
``tqdm`` progress, metrics to ``metrics.jsonl`` and ``metrics.csv``, checkpoints and exact resume,
and callbacks (rank schedules, GGPO).  Under ``torchrun`` or ``accelerate launch`` it wraps the
model in ``DistributedDataParallel`` (gloo on the CPU, NCCL on CUDA) -- or, with
``TrainConfig(fsdp=True)``, shards it with FSDP2 (:mod:`~lowrank_theory.training.fsdp`) -- and
splits every global batch evenly over the ranks; a process group that already exists (an ``Accelerator`` built first, or
the user's own ``init_process_group``) is joined, not re-created.

Batching.  ``train_data`` is a dict of tensors with a common first dimension :math:`N`.  Step
:math:`t` (0-based) of epoch :math:`e = \lfloor t / \lfloor N/B \rfloor \rfloor` takes the
:math:`B` examples ``perm_e[k B:(k+1) B]`` (``perm_e`` a permutation seeded by ``(seed, e)``),
cut into ``grad_accum`` micro-batches, each split over the ``world_size`` ranks.  The loss of
each micro-batch is divided by ``grad_accum`` and DDP averages over ranks, so for a loss that
is a mean over examples the step's gradient is that of the global batch mean whatever the
number of ranks and micro-batches (up to summation order).

Checkpoints (``<out_dir>/checkpoint``, never pickle): the adapters through
:func:`~lowrank_theory.training.checkpoint.save_adapters` (safetensors + JSON), other trainable
tensors (a classifier head) in ``trainable.safetensors``, the optimizer state as tensors in
``optimizer.safetensors`` plus its JSON skeleton, the callbacks' state, every rank's RNG state,
and the step in ``trainer_state.json``.  :meth:`Trainer.fit` with ``resume=True`` continues bit for bit
(on the same device and world size) from there; adapters whose rank a schedule changed are
rebuilt at the saved rank first (``plan_load(..., resize=True)``).  Every file is validated against
the run before anything changes, so a bad checkpoint raises ``ValueError`` naming the file and
leaves model, optimizer, callbacks and RNG as they were
(:mod:`~lowrank_theory.training.trainer_checkpoint`).

Under DDP every rank evaluates the same data (so early-stopping decisions agree without
communication) and only rank 0 writes files; each rank's RNG state is saved and restored.

Callbacks are objects with any of ``on_train_begin(trainer)``, ``extra_loss(trainer)`` (added to
each micro-batch loss), ``after_backward(trainer)`` (after the last micro-batch of a step),
``after_step(trainer)`` (after ``optimizer.step()``, gradients still present),
``on_train_end(trainer)``, ``state_dict()`` and ``load_state_dict(state)``.  A callback that
replaces parameters calls :meth:`Trainer.parameters_changed`.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .fsdp import clip_grad_norm_ as fsdp_clip_grad_norm_
from .fsdp import gathered, is_sharded, shard_model
from .injection import adapted_layers
from .optim import make_optimizer
from .rank_change import RankSchedule
from .train_config import (
    TrainConfig,
    init_distributed,
    lr_factor,
    peak_memory_mb,
)
from .trainer_checkpoint import load_trainer_checkpoint, save_trainer_checkpoint

__all__ = ["TrainConfig", "Trainer", "init_distributed", "lr_factor"]

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
EvalFn = Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, float]]


class Trainer:
    """Train the trainable parameters of ``model`` on ``train_data`` (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        With adapters injected (and any head unfrozen); moved to ``config.device``.
    train_data : dict of str to Tensor
        Common first dimension :math:`N \\ge` ``batch_size``.
    loss_fn : callable ``(model, batch) -> scalar Tensor``
        A mean over the batch's examples (see Batching).
    eval_data : dict of str to Tensor, optional
    eval_fn : callable ``(model, data) -> dict of str to float``, optional
        Run in ``eval()`` mode under ``no_grad`` on the unwrapped model.
    config : TrainConfig, optional
    callbacks : sequence, optional
        Rank schedules (:mod:`~lowrank_theory.training.schedules`), GGPO, or your own.
    optimizer_factory : callable ``(model) -> Optimizer``, optional
        Instead of ``make_optimizer(model, config.rule, ...)``.

    Attributes
    ----------
    step : int
        Completed optimizer steps.
    optimizer : torch.optim.Optimizer
    history : list of dict
        Every logged row.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: dict[str, torch.Tensor],
        loss_fn: LossFn,
        *,
        eval_data: dict[str, torch.Tensor] | None = None,
        eval_fn: EvalFn | None = None,
        config: TrainConfig | None = None,
        callbacks: Sequence[Any] = (),
        optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.config = (config or TrainConfig()).validate()
        if not isinstance(train_data, dict) or not train_data:
            raise ValueError("train_data must be a non-empty dict of tensors")
        sizes = {k: v.shape[0] for k, v in train_data.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"train_data tensors must share their first dimension, got {sizes}")
        self.n_train = next(iter(sizes.values()))
        cfg = self.config
        self.rank, self.world, local = init_distributed(require=cfg.fsdp)
        if cfg.batch_size % (cfg.grad_accum * self.world):
            raise ValueError(
                f"batch_size={cfg.batch_size} must be divisible by grad_accum*world_size={cfg.grad_accum * self.world}"
            )
        if self.n_train < cfg.batch_size:
            raise ValueError(f"train_data has {self.n_train} examples, fewer than batch_size={cfg.batch_size}")
        if eval_fn is not None and eval_data is None:
            raise ValueError("eval_fn needs eval_data")
        dev = cfg.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        self.model = model.to(self.device)
        self.train_data, self.eval_data = train_data, eval_data
        self.loss_fn, self.eval_fn = loss_fn, eval_fn
        self.callbacks = list(callbacks)
        self.optimizer_factory = optimizer_factory
        self.optimizer: torch.optim.Optimizer | None = None
        self.net: nn.Module = self.model
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best: float | None = None
        self.bad_evals = 0
        self.stopped_early = False
        self._rows_file: Path | None = None

    # ------------------------------------------------------------------ plumbing
    @property
    def out_dir(self) -> Path | None:
        return Path(self.config.out_dir) if self.config.out_dir else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def trainable_parameters(self) -> int:
        """Number of trainable scalars (each shared tensor once)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        if self.optimizer_factory is not None:
            opt = self.optimizer_factory(self.model)
        else:
            opt = make_optimizer(self.model, cfg.rule, lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.rule_kwargs)
        for g in opt.param_groups:
            g.setdefault("initial_lr", g["lr"])
        return opt

    def _shard(self) -> None:
        """FSDP2 (``config.fsdp``): shard the model once, before the optimizer is built on its shards."""
        if is_sharded(self.model):
            return
        mp = None
        if self.device.type == "cuda" and self.config.mixed_precision in ("auto", "bf16"):
            from torch.distributed.fsdp import MixedPrecisionPolicy

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        schedules = any(isinstance(cb, RankSchedule) for cb in self.callbacks)
        shard_model(self.model, mp_policy=mp, replicate_adapters=schedules)

    def _wrap(self) -> None:
        if self.config.fsdp:
            self.net = self.model  # FSDP2 shards in place (see _shard); nothing to wrap
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # Adapter buffers (LoCA's location estimate, DoRA's cached norms) are rank-local state:
            # equal at wrap time, never re-broadcast from rank 0 in forward.  Newer torch names the
            # switch forward_sync_buffers (and deprecates broadcast_buffers).
            params = inspect.signature(DistributedDataParallel.__init__).parameters
            sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
            self.net = DistributedDataParallel(self.model, device_ids=ids, **sync)
        else:
            self.net = self.model

    def parameters_changed(self) -> None:
        """Call after parameters were replaced (the optimizer must already be remapped): re-wrap DDP."""
        self._wrap()

    def _autocast(self):
        mp = self.config.mixed_precision
        if self.device.type == "cuda" and mp in ("auto", "bf16"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _indices(self, step: int) -> torch.Tensor:
        cfg = self.config
        per_epoch = self.n_train // cfg.batch_size
        epoch, k = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n_train, generator=g)
        idx = perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        return idx.view(cfg.grad_accum, self.world, -1)[:, self.rank]

    def _call(self, hook: str) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if callable(fn):
                fn(self)

    def _extra_loss(self) -> torch.Tensor | None:
        total = None
        for cb in self.callbacks:
            fn = getattr(cb, "extra_loss", None)
            if callable(fn):
                v = fn(self)
                if v is not None:
                    total = v if total is None else total + v
        return total

    def _log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.is_main and self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with (self.out_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def _write_csv(self) -> None:
        if not (self.is_main and self.out_dir is not None and (self.out_dir / "metrics.jsonl").exists()):
            return
        rows = [json.loads(line) for line in (self.out_dir / "metrics.jsonl").read_text().splitlines() if line]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with (self.out_dir / "metrics.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """``eval_fn(model, eval_data)`` in eval mode (empty dict without an ``eval_fn``).

        Under FSDP every rank evaluates, with the parameters gathered whole unless
        ``config.fsdp_gather_eval`` is False.
        """
        if self.eval_fn is None:
            return {}
        was = self.model.training
        self.model.eval()
        whole = self.config.fsdp and self.config.fsdp_gather_eval and is_sharded(self.model)
        try:
            with torch.no_grad(), self._autocast(), gathered(self.model) if whole else contextlib.nullcontext():
                metrics = {k: float(v) for k, v in self.eval_fn(self.model, self.eval_data).items()}
        finally:
            self.model.train(was)
        return metrics

    def _check_early_stop(self, metrics: dict[str, float]) -> bool:
        cfg = self.config
        if cfg.early_stop_metric not in metrics:
            return False
        v = metrics[cfg.early_stop_metric]
        better = self.best is None or (v < self.best if cfg.early_stop_mode == "min" else v > self.best)
        if better:
            self.best, self.bad_evals = v, 0
        else:
            self.bad_evals += 1
        return bool(cfg.early_stop_patience and self.bad_evals >= cfg.early_stop_patience)

    # ------------------------------------------------------------------ checkpoints
    def _extra_trainable(self) -> dict[str, nn.Parameter]:
        in_adapters = {id(p) for layer in adapted_layers(self.model).values() for p in layer.adapter.parameters()}
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in in_adapters}

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write a checkpoint (rank 0; other ranks wait); default ``<out_dir>/checkpoint``.

        The files are described in :mod:`~lowrank_theory.training.trainer_checkpoint`.
        """
        if path is None:
            if self.out_dir is None:
                raise ValueError("save_checkpoint needs a path or config.out_dir")
            path = self.out_dir / "checkpoint"
        return save_trainer_checkpoint(self, path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore model tensors, optimizer, callbacks, RNG and step from ``path`` (see :meth:`fit`).

        Every file is validated against this run before anything changes
        (:func:`~lowrank_theory.training.trainer_checkpoint.load_trainer_checkpoint`).

        Raises
        ------
        ValueError
            A bad or mismatched file, named in the message; the model, optimizer, callbacks and
            RNG are left as they were.
        """
        load_trainer_checkpoint(self, path)

    # ------------------------------------------------------------------ the loop
    def fit(self, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``config.steps`` (or early stop); return a summary.

        Parameters
        ----------
        resume : bool
            Continue from ``<out_dir>/checkpoint`` when it exists.
        stop_after : int, optional
            Stop (and checkpoint, when ``out_dir`` is set) after this many completed steps, as if
            interrupted -- the LR schedule still spans ``config.steps``.

        Returns
        -------
        dict
            ``steps``, ``train_loss`` (last logged), ``eval`` (final metrics), ``best``,
            ``trainable_params``, ``seconds``, ``peak_memory_mb``, ``device``, ``world_size``,
            ``stopped_early``.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed + self.rank)
        if cfg.fsdp:
            self._shard()
        ckpt = self.out_dir / "checkpoint" if self.out_dir is not None else None
        if resume and ckpt is not None and (ckpt / "trainer_state.json").exists():
            self.load_checkpoint(ckpt)
        else:
            self.optimizer = self._make_optimizer()
            if self.is_main and self.out_dir is not None:  # a fresh run starts a fresh log
                for name in ("metrics.jsonl", "metrics.csv"):
                    (self.out_dir / name).unlink(missing_ok=True)
        self._wrap()
        self.model.train(cfg.train_mode)
        self._call("on_train_begin")
        last = stop_after if stop_after is not None else cfg.steps
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.is_main), desc="train")
        train_loss = float("nan")
        try:
            while self.step < min(last, cfg.steps) and not self.stopped_early:
                train_loss = self._one_step()  # increments self.step
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    row = {"step": self.step, "loss": train_loss, "lr": self.optimizer.param_groups[0]["lr"],
                           "trainable": self.trainable_parameters(), "time": round(time.perf_counter() - t0, 4)}
                    self._log(row)
                    bar.set_postfix(loss=f"{train_loss:.4g}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    metrics = self.evaluate()
                    self._log({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
                    self.stopped_early = self._check_early_stop(metrics)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.out_dir is not None:
                    self.save_checkpoint()
        finally:
            bar.close()
        finished = self.step >= cfg.steps or self.stopped_early
        metrics = self.evaluate() if finished else {}
        if metrics:
            self._log({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
            self._check_early_stop(metrics)
        if self.out_dir is not None:
            self.save_checkpoint()
        if finished:
            self._call("on_train_end")
        self._write_csv()
        return {
            "steps": self.step,
            "train_loss": train_loss,
            "eval": metrics,
            "best": self.best,
            "trainable_params": self.trainable_parameters(),
            "seconds": time.perf_counter() - t0,
            "peak_memory_mb": peak_memory_mb(self.device),
            "device": str(self.device),
            "world_size": self.world,
            "stopped_early": self.stopped_early,
        }

    def _one_step(self) -> float:
        cfg = self.config
        factor = lr_factor(self.step, cfg.steps, cfg.warmup_steps, cfg.lr_schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        idx = self._indices(self.step)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for j in range(cfg.grad_accum):
            batch = {k: v[idx[j]].to(self.device) for k, v in self.train_data.items()}
            sync = j == cfg.grad_accum - 1 or self.world == 1 or cfg.fsdp  # FSDP reduces every micro-batch
            ctx = contextlib.nullcontext() if sync else self.net.no_sync()
            with ctx:
                with self._autocast():
                    loss = self.loss_fn(self.net, batch)
                    extra = self._extra_loss()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {float(loss.detach())} at step {self.step + 1}")
                total += loss.detach().double()
                ((loss if extra is None else loss + extra) / cfg.grad_accum).backward()
        self._call("after_backward")
        if cfg.max_grad_norm is not None:
            clip = fsdp_clip_grad_norm_ if cfg.fsdp else torch.nn.utils.clip_grad_norm_
            clip([p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm)
        self.optimizer.step()
        self.step += 1  # callbacks see the number of completed steps
        self._call("after_step")
        self.optimizer.zero_grad(set_to_none=True)
        total /= cfg.grad_accum
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        return float(total)
