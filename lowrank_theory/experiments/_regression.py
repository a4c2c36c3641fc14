r"""Teacher–student regression of one linear layer: the trained-score task of several experiments.

A frozen base :math:`W_0 \in \mathbb R^{m\times n}` (entries :math:`N(0, 1/n)`) and a planted update
:math:`\Delta W^\star` define the teacher :math:`y = (W_0 + \Delta W^\star)x + \varepsilon`, with
:math:`x \sim N(0, I_n)` drawn once from a fixed seed (a train and a test set) and optional label
noise :math:`\varepsilon \sim N(0, \eta^2 \|\Delta W^\star\|_F^2/m\, I_m)` (``noise`` = :math:`\eta`,
relative to the signal of the update).  The student is
:class:`~lowrank_theory.adapters.AdaptedLinear` (frozen :math:`W_0`) plus one adapter, trained by
full-batch Adam on the mean squared error with a cosine learning-rate decay.

Scores reported for a trained adapter:

* ``test_loss`` -- :math:`\|\hat Y - Y\|_F^2 / \|Y - X W_0^\top\|_F^2` on the test set: 1 means "no
  better than :math:`\Delta W = 0`", 0 a perfect fit.  For isotropic inputs and no noise it
  estimates :math:`\|\Delta W - \Delta W^\star\|_F^2/\|\Delta W^\star\|_F^2`.
* ``delta_error`` -- :math:`\|\Delta W - \Delta W^\star\|_F/\|\Delta W^\star\|_F`, exact.

Everything runs in float64 on the requested torch device; the data come from NumPy's PCG64 (same
numbers on every device).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..adapters import AdaptedLinear, Adapter

__all__ = [
    "RegressionTask",
    "best_of",
    "delta_error",
    "intra_op_threads",
    "make_layer",
    "make_task",
    "relative_test_loss",
    "train",
]


@dataclass
class RegressionTask:
    """Frozen base weight, planted update and the train/test data of one teacher–student problem.

    Attributes
    ----------
    W0, delta : torch.Tensor, shape (m, n), float64
        Frozen base weight and planted update :math:`\\Delta W^\\star`.
    X_train, X_test : torch.Tensor, shape (N, n)
    Y_train, Y_test : torch.Tensor, shape (N, m)
        Teacher outputs (with noise on the train set only).
    """

    W0: torch.Tensor
    delta: torch.Tensor
    X_train: torch.Tensor
    Y_train: torch.Tensor
    X_test: torch.Tensor
    Y_test: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W0.shape)


def make_task(delta: np.ndarray, *, n_train: int, n_test: int = 512, noise: float = 0.0, seed: int = 0,
              device: str | torch.device = "cpu") -> RegressionTask:
    """Build the teacher–student problem for a planted update ``delta`` (m×n).

    Parameters
    ----------
    delta : array, shape (m, n)
        The planted :math:`\\Delta W^\\star` (finite, non-zero).
    n_train, n_test : int
        Numbers of training and test inputs (>= 1).
    noise : float
        Relative label noise :math:`\\eta \\ge 0` (train set only).
    seed : int
        Seed of :math:`W_0`, the inputs and the noise.
    device : str or torch.device

    Returns
    -------
    RegressionTask

    Raises
    ------
    ValueError
        If ``delta`` is not a finite non-zero matrix, a size is not positive or ``noise`` is negative.
    """
    delta = np.asarray(delta, dtype=np.float64)
    if delta.ndim != 2 or min(delta.shape) == 0:
        raise ValueError(f"delta must be a non-empty 2-D matrix, got shape {delta.shape}")
    if not np.isfinite(delta).all() or not np.any(delta):
        raise ValueError("delta must be finite and non-zero")
    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be finite and >= 0, got {noise}")
    m, n = delta.shape
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((m, n)) / math.sqrt(n)
    X_train = rng.standard_normal((n_train, n))
    X_test = rng.standard_normal((n_test, n))
    W = W0 + delta
    sigma = noise * np.linalg.norm(delta) / math.sqrt(m)
    Y_train = X_train @ W.T + sigma * rng.standard_normal((n_train, m))
    Y_test = X_test @ W.T

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device=device, dtype=torch.float64)

    return RegressionTask(t(W0), t(delta), t(X_train), t(Y_train), t(X_test), t(Y_test))


def make_layer(task: RegressionTask, adapter: Adapter) -> AdaptedLinear:
    """A frozen ``nn.Linear`` holding :math:`W_0` (no bias) wrapped with ``adapter`` (moved to float64)."""
    m, n = task.shape
    base = nn.Linear(n, m, bias=False).to(device=task.W0.device, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(task.W0)
    return AdaptedLinear(base, adapter.to(device=task.W0.device, dtype=torch.float64))


def _cosine(lr: float, step: int, total: int, floor: float = 0.05) -> float:
    """Cosine decay from ``lr`` to ``floor * lr`` over ``total`` steps."""
    frac = min(step / max(total, 1), 1.0)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(layer: AdaptedLinear, task: RegressionTask, steps: int, lr: float, *, start: int = 0,
          total: int | None = None) -> float:
    """Full-batch Adam on the train MSE for ``steps`` steps; return the final train MSE.

    Parameters
    ----------
    layer : AdaptedLinear
        The student; only ``layer.adapter``'s trainable tensors are optimized (a fresh Adam).
    task : RegressionTask
    steps : int
        Number of Adam steps (>= 0).
    lr : float
        Peak learning rate.
    start, total : int
        The schedule's position: step ``k`` of this call uses the cosine rate at ``start + k`` of
        ``total`` (default ``start + steps``), so a run split into phases (squeeze events rebuild
        the optimizer) follows one schedule.

    Returns
    -------
    float
        Train MSE after the last step.

    Raises
    ------
    ValueError
        If the loss becomes NaN or Inf (a diverged run is reported, not propagated).
    """
    total = start + steps if total is None else total
    params = [p for p in layer.adapter.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    X, Y = task.X_train, task.Y_train
    loss = torch.tensor(float("nan"))
    for k in range(steps):
        for g in opt.param_groups:
            g["lr"] = _cosine(lr, start + k, total)
        opt.zero_grad(set_to_none=True)
        loss = ((layer(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(((layer(X) - Y) ** 2).mean())
    if not math.isfinite(final):
        raise ValueError(f"training diverged (train MSE {final}) at lr={lr}")
    return final


@torch.no_grad()
def relative_test_loss(layer: AdaptedLinear, task: RegressionTask) -> float:
    """Relative test loss :math:`\\|\\hat Y - Y\\|_F^2/\\|Y - XW_0^\\top\\|_F^2` (1 = no better than ΔW = 0)."""
    resid = task.Y_test - task.X_test @ task.W0.T
    return float(((layer(task.X_test) - task.Y_test) ** 2).sum() / (resid**2).sum())


@torch.no_grad()
def delta_error(adapter: Adapter, task: RegressionTask) -> float:
    """Relative Frobenius error :math:`\\|\\Delta W - \\Delta W^\\star\\|_F/\\|\\Delta W^\\star\\|_F`."""
    dw = adapter.delta_weight(task.W0).to(torch.float64)
    return float(torch.linalg.norm(dw - task.delta) / torch.linalg.norm(task.delta))


def best_of(results: Iterable[dict]) -> dict:
    """The result with the smallest ``train_loss`` (model selection on the training data only)."""
    return min(results, key=lambda r: r["train_loss"])


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads and ``n`` BLAS threads, then restore both.

    ``None`` leaves the settings alone.  The matrices here are tiny (tens of rows): on a shared
    CPU, extra threads only add synchronisation (measured on this project's loaded 2-core
    machine: a 32×32 LoRA Adam step 15 ms with 2 torch threads, 1 ms with 1; a VeRA
    alternating-least-squares solve 9.2 s with 2 OpenBLAS threads, 0.17 s with 1).  BLAS threads
    are limited through ``threadpoolctl`` when it is installed (it comes with scikit-learn), and
    left alone otherwise.
    """
    if n is None:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional: only speed depends on it
            yield
        else:
            with threadpool_limits(limits=n):
                yield
    finally:
        torch.set_num_threads(prev)
