r"""Timing adapted layers on the current device, and the device's roofline constants.

:func:`measure` times one ``AdaptedLinear`` (``AdaptedConv2d`` for ``flora_conv2d``) the way
:func:`~.complexity.cost` models it -- unmerged or merged, structured or dense path, forward
(under ``torch.no_grad``, as inference runs) or forward + backward (gradients set to ``None``
before each step, as ``zero_grad`` does).  On CUDA each repeat is timed with CUDA events after
warm-up; on CPU with ``time.perf_counter`` or, with one intra-op thread, with the thread's CPU
time (``clock="thread"``), which other processes on a shared machine cannot inflate by taking the
core away.  It reports the minimum and the median of the repeats: the minimum is the least
disturbed run, the robust statistic of the two.

:func:`measure_peak` estimates, in the same process, the matrix peak (a large square product),
the memory bandwidth (a large copy: read + write) and the time per kernel launch (a one-element
in-place add), which give the :class:`~.complexity.Roofline`.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdaptedLinear, create
from ..adapters.conv import AdaptedConv2d
from .adapter_costs import conv_layout

__all__ = ["PeakProbes", "Step", "Timing", "measure", "measure_interleaved", "measure_peak", "peak_probes", "prepare"]


@dataclass(frozen=True)
class Timing:
    """Seconds per call: ``min_s``, ``median_s`` and all ``samples``."""

    min_s: float
    median_s: float
    samples: tuple[float, ...]


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


CLOCKS = ("wall", "thread")


def _clock(clock: str, dev: torch.device) -> Callable[[], float]:
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock == "thread":
        if dev.type == "cuda":
            raise ValueError("clock='thread' measures host CPU time; CUDA steps are timed with CUDA events "
                             "(use clock='wall')")
        if torch.get_num_threads() != 1:
            raise ValueError(f"clock='thread' needs torch.get_num_threads() == 1 (the work must run in the calling "
                             f"thread), got {torch.get_num_threads()} threads")
        return time.thread_time
    return time.perf_counter


def _time(fn: Callable[[], Any], dev: torch.device, *, repeats: int, warmup: int, before: Callable[[], Any],
          clock: str = "wall") -> Timing:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    now = _clock(clock, dev)
    for _ in range(warmup):
        before()
        fn()
    samples = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        for _ in range(repeats):
            before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            before()
            t0 = now()
            fn()
            samples.append(now() - t0)
    return Timing(min(samples), statistics.median(samples), tuple(samples))


#: Methods whose layer has its own ``path="dense"`` (HUT, HiRA: ``x (W0 ⊙ BA)ᵀ``; FourierFT and LoCA: one
#: product with ``W0 + ΔW``, :mod:`lowrank_theory.adapters.spectral_dense`); the others get
#: :class:`_DenseDelta`.
OWN_DENSE_PATH = ("hut", "hira", "fourierft", "loca")


class _DenseDelta(nn.Module):
    """``base(x) + x ΔWᵀ`` with ΔW from ``delta_weight`` every call (the cost model's dense path)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ad, base = self.layer.adapter, self.layer.base
        dw = ad.delta_weight(self.layer.weight) if ad.needs_base else ad.delta_weight()
        dw = dw.to(x.dtype)
        if isinstance(base, nn.Conv2d):
            return base(x) + F.conv2d(x, dw, padding=base.padding)
        return base(x) + x @ dw.T


def build_layer(method: str | None, d_in: int, d_out: int, *, merged: bool = False, path: str = "structured",
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, bias: bool = False,
                seed: int = 0, **cfg: Any) -> nn.Module:
    """The layer :func:`measure` times (``method=None``: the frozen base alone)."""
    if path not in ("structured", "dense"):
        raise ValueError(f"path must be 'structured' or 'dense', got {path!r}")
    torch.manual_seed(seed)
    if method == "flora_conv2d":
        k = cfg.get("kernel_size", 3)
        base: nn.Module = nn.Conv2d(d_in, d_out, k, padding="same", bias=bias)
    elif method is None and cfg.get("kernel_size") is not None:
        return nn.Conv2d(d_in, d_out, cfg["kernel_size"], padding="same", bias=bias).to(_device(device), dtype)
    else:
        base = nn.Linear(d_in, d_out, bias=bias)
    if method is None:
        layer: nn.Module = base
        base.requires_grad_(False)
    else:
        adapter = create(method, d_out, d_in, **({k: v for k, v in cfg.items() if k != "path"}))
        if method in OWN_DENSE_PATH:
            adapter.path = path
        layer = AdaptedConv2d(base, adapter) if method == "flora_conv2d" else AdaptedLinear(base, adapter)
    layer = layer.to(_device(device), dtype)
    if method is not None:
        with torch.no_grad():  # DoRA fixes its magnitude on the first call that sees W0
            layer(_input(method, 1, d_in, _device(device), dtype, False))
        if merged:
            layer.merge()
        elif path == "dense" and method not in OWN_DENSE_PATH:
            layer = _DenseDelta(layer)
    return layer


def _input(method: str | None, tokens: int, d_in: int, dev: torch.device, dtype: torch.dtype, grad: bool,
           conv: bool = False) -> torch.Tensor:
    if method == "flora_conv2d" or conv:
        H, W = conv_layout(tokens)
        x = torch.randn(1, d_in, H, W, device=dev, dtype=dtype)
    else:
        x = torch.randn(tokens, d_in, device=dev, dtype=dtype)
    return x.requires_grad_(grad)


@dataclass
class Step:
    """One prepared layer call: ``before()`` clears gradients, ``run()`` is the timed call."""

    run: Callable[[], Any]
    before: Callable[[], Any]
    device: torch.device


def prepare(method: str | None, tokens: int, d_in: int, d_out: int, *, pass_: str = "fwd+bwd", merged: bool = False,
            path: str = "structured", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            input_grad: bool = True, bias: bool = False, seed: int = 0, **cfg: Any) -> Step:
    """Build the layer and its input once; return the :class:`Step` that :func:`measure` times.

    Parameters are those of :func:`measure` (without ``repeats``/``warmup``).
    """
    if pass_ not in ("fwd", "fwd+bwd"):
        raise ValueError(f"pass_ must be 'fwd' or 'fwd+bwd' for a measurement, got {pass_!r}")
    for name, v in (("tokens", tokens), ("d_in", d_in), ("d_out", d_out)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    dev = _device(device)
    layer = build_layer(method, d_in, d_out, merged=merged, path=path, device=dev, dtype=dtype, bias=bias,
                        seed=seed, **cfg)
    conv = method is None and cfg.get("kernel_size") is not None
    x = _input(method, tokens, d_in, dev, dtype, input_grad and pass_ != "fwd", conv)
    params = [p for p in layer.parameters() if p.requires_grad]
    with torch.no_grad():
        dy = torch.randn_like(layer(x))

    def clear() -> None:
        x.grad = None
        for p in params:
            p.grad = None

    if pass_ == "fwd":
        def run() -> None:
            with torch.no_grad():
                layer(x)
    else:
        def run() -> None:
            layer(x).backward(dy)
    return Step(run, clear, dev)


def measure(method: str | None, tokens: int, d_in: int, d_out: int, *, pass_: str = "fwd+bwd", merged: bool = False,
            path: str = "structured", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            input_grad: bool = True, bias: bool = False, repeats: int = 10, warmup: int = 3, seed: int = 0,
            clock: str = "wall", **cfg: Any) -> Timing:
    """Time one adapted layer on ``tokens`` rows (``method=None``: the frozen base layer alone).

    Parameters
    ----------
    method : str or None
        A registered adapter, or None for the base ``nn.Linear`` (``nn.Conv2d`` with
        ``kernel_size`` in ``cfg``).
    tokens, d_in, d_out : int
        x has shape (tokens, d_in); the weight (d_out, d_in).
    pass_ : {"fwd", "fwd+bwd"}
        Forward under ``no_grad``, or forward + backward from a fixed random output gradient.
    merged, path, input_grad, bias, **cfg
        As in :func:`~.complexity.cost`.
    device, dtype
        Where and in what precision (``bfloat16`` on a GPU, as issue #8's benchmark).
    repeats, warmup : int
        Timed and untimed calls.
    seed : int
        Seed of the weights and inputs.
    clock : {"wall", "thread"}
        CPU only: ``"wall"`` (``time.perf_counter``) or ``"thread"`` (``time.thread_time``: the CPU
        time of the calling thread, which a descheduling by other processes does not inflate; valid
        with one intra-op thread, where every kernel runs in the calling thread).  CUDA: events.

    Returns
    -------
    Timing
        ``min_s``, ``median_s`` and the samples, seconds per call.

    Raises
    ------
    ValueError
        Bad ``pass_``/``path``/``repeats``/``clock``, CUDA requested without a GPU, or the
        adapter's own config errors.

    Notes
    -----
    The CPU thread count is the caller's (``torch.set_num_threads``).  To compare many layers on
    a machine whose load changes, :func:`prepare` them and use :func:`measure_interleaved`.
    """
    step = prepare(method, tokens, d_in, d_out, pass_=pass_, merged=merged, path=path, device=device, dtype=dtype,
                   input_grad=input_grad, bias=bias, seed=seed, **cfg)
    return _time(step.run, step.device, repeats=repeats, warmup=warmup, before=step.before, clock=clock)


def measure_interleaved(steps: list[Step], *, repeats: int = 5, warmup: int = 2, clock: str = "wall",
                        seed: int | None = 0, rewarm: int = 1) -> list[Timing]:
    """Time several prepared steps in rounds (each round calls every step once); one Timing each.

    Interleaving spreads every step's samples over the whole run, so a burst of load from another
    process lands on all steps alike instead of on the few measured during it; with the minimum
    over rounds each step keeps its least disturbed call.  Each round visits the steps in a new
    random order (from ``seed``; ``None`` keeps the given order).  At each visit ``rewarm``
    untimed calls precede the timed one: after other steps have run, the first call of a step
    pays for page faults (the allocator hands back freed memory and maps it again: 2000 faults,
    +30% for SLTrain's 8 MB temporaries at d=512) and cold caches, which are not its kernels'
    cost.  ``clock`` as in :func:`measure`.
    """
    if isinstance(rewarm, bool) or not isinstance(rewarm, int) or rewarm < 0:
        raise ValueError(f"rewarm must be a non-negative int, got {rewarm!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    for st in steps:
        if not isinstance(st, Step):
            raise TypeError(f"steps must hold Step objects from prepare(), got {type(st).__name__}")
        for _ in range(warmup):
            st.before()
            st.run()
    samples: list[list[float]] = [[] for _ in steps]
    rng = random.Random(seed)
    for _ in range(repeats):
        order = list(range(len(steps)))
        if seed is not None:
            rng.shuffle(order)
        for i in order:
            st = steps[i]
            for _ in range(rewarm):
                st.before()
                st.run()
            samples[i].append(_time(st.run, st.device, repeats=1, warmup=0, before=st.before, clock=clock).min_s)
    return [Timing(min(s), statistics.median(s), tuple(s)) for s in samples]


@dataclass
class PeakProbes:
    """The three probes of the roofline as :class:`Step` objects (a square product, a copy, 200 tiny adds).

    Time them with :func:`measure_interleaved` -- alone or among the layers being measured, so the
    probes and the layers see the same load -- and turn the timings into a Roofline with :meth:`roofline`.
    """

    steps: list[Step]
    flops: float  # of one product
    nbytes: float  # read + written by one copy
    launches: int  # kernels per launch probe
    device: str
    dtype: str

    def roofline(self, timings: list[Timing]):
        """``Roofline(2n^3/t_mm, 2·bytes/t_copy, t_launch/200)`` from the minimum times of the three probes."""
        from .complexity import Roofline

        if len(timings) != 3 or not all(isinstance(t, Timing) for t in timings):
            raise ValueError(f"timings must be the 3 Timings of the probes' steps, got {len(timings)} items")
        t_mm, t_cp, t_launch = (t.min_s for t in timings)
        return Roofline(self.flops / t_mm, self.nbytes / t_cp, t_launch / self.launches, self.device, self.dtype)


def peak_probes(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *, size: int | None = None,
                copy_bytes: int | None = None) -> PeakProbes:
    """Prepare the probes of :func:`measure_peak` (sizes as there)."""
    dev = _device(device)
    cuda = dev.type == "cuda"
    n = size or (8192 if cuda else 1024)
    nbytes = copy_bytes or ((1 << 30) if cuda else (64 << 20))
    for name, v in (("size", n), ("copy_bytes", nbytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    out = torch.empty(n, n, device=dev, dtype=dtype)
    src = torch.empty(max(1, nbytes // 4), device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    one = torch.zeros(1, device=dev, dtype=dtype)
    k = 200

    def launches() -> None:  # back-to-back tiny kernels: the dispatch rate, not the device's time per add
        for _ in range(k):
            one.add_(1)

    def nothing() -> None:
        return None

    steps = [Step(lambda: torch.mm(a, b, out=out), nothing, dev), Step(lambda: dst.copy_(src), nothing, dev),
             Step(launches, nothing, dev)]
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    return PeakProbes(steps, 2.0 * n**3, 2.0 * src.numel() * 4, k, name, str(dtype).rsplit(".", 1)[-1])


def measure_peak(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *, size: int | None = None,
                 copy_bytes: int | None = None, repeats: int = 5, clock: str = "wall"):
    """Matrix peak FLOP/s, memory bandwidth and launch time on ``device`` (best of ``repeats``).

    Parameters
    ----------
    device, dtype
        Where, and the product's precision.
    size : int, optional
        Side of the square product (default 1024 on CPU, 8192 on CUDA).
    copy_bytes : int, optional
        Bytes of the copied tensor (default 64 MiB on CPU, 1 GiB on CUDA: beyond the caches).
    repeats : int
        Timed repeats of each probe.
    clock : {"wall", "thread"}
        As in :func:`measure`.

    Returns
    -------
    Roofline
        ``peak_flops`` = :math:`2n^3/t`, ``bandwidth`` = :math:`2\\,\\text{bytes}/t` (read + write),
        ``launch_s`` = time per one-element in-place add launched back to back; each from the best
        (minimum) time of its probe.
    """
    probes = peak_probes(device, dtype, size=size, copy_bytes=copy_bytes)
    return probes.roofline(measure_interleaved(probes.steps, repeats=repeats, warmup=1, clock=clock))
