r"""Complexity of every adapter: FLOPs, bytes and kernel launches, and a time model fitted to timings.

:func:`cost` traces one adapted layer -- the frozen base plus the adapter, as
``AdaptedLinear`` (or ``AdaptedConv2d`` for FLoRA's kernels) runs it -- through the op-by-op
model of :mod:`.adapter_costs`, forward, backward or both, unmerged or merged, through the
adapter's structure or through a dense :math:`\Delta W` rebuilt every call.  :func:`base_cost`
is the frozen layer alone, :func:`merge_cost` the one-off cost of folding the update in.

Time models
-----------
* **Roofline** (:class:`Roofline`, constants from :func:`measure_peak`): each kernel takes at
  least :math:`\max(f_i/P, b_i/\beta)` (peak matrix FLOP/s :math:`P`, memory bandwidth
  :math:`\beta`), so :math:`t \ge t_\text{floor} = \sum_i \max(f_i/P, b_i/\beta)`; the model is
  :math:`t \approx t_\text{floor} + L\,t_\text{launch}` for :math:`L` launches.
* **Fitted** (:func:`fit`): :math:`t = a\,f_\text{mm} + a'\,f_\text{other} + b\,\text{bytes} +
  c\,L` with non-negative constants, least squares on the *relative* error (timings span
  orders of magnitude); with a :class:`Roofline` it fits :math:`t = k\,t_\text{floor} + c\,L`
  instead (:math:`1/k` is the fraction of the roofline reached).

Measurement (:func:`measure`, :func:`measure_peak`) lives in :mod:`.timing` and is re-exported.

References
----------
S. Williams, A. Waterman, D. Patterson, "Roofline: an insightful visual performance model for
multicore architectures", Commun. ACM 52(4), 2009.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import nnls

from .adapter_costs import MODELS, Ctx, _kernel_size, _tr, conv_layout, resolve_config
from .cost_graph import Cost, CostGraph, Op

__all__ = ["Cost", "Op", "Roofline", "TimeFit", "base_cost", "cost", "fit", "measure", "measure_interleaved",
           "measure_peak", "merge_cost", "method_names", "num_trainable", "peak_probes", "prepare"]

PASSES = ("fwd", "bwd", "fwd+bwd")
PATHS = ("structured", "dense")


def method_names() -> list[str]:
    """Names of the adapters the cost model knows (all registered adapters)."""
    return sorted(MODELS)


def _check(tokens: int, d_in: int, d_out: int, pass_: str, dtype_bytes: float, path: str = "structured") -> None:
    for name, v in (("tokens", tokens), ("d_in", d_in), ("d_out", d_out)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{name} must be a positive int, got {v}")
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if isinstance(dtype_bytes, bool) or not isinstance(dtype_bytes, (int, float)) or not (
            math.isfinite(dtype_bytes) and dtype_bytes > 0):
        raise ValueError(f"dtype_bytes must be a positive number of bytes per element, got {dtype_bytes!r}")


def _method(method: str) -> None:
    if method not in MODELS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(method_names())}")


def _trace(method: str | None, tokens: int, d_in: int, d_out: int, *, merged: bool, path: str, dtype_bytes: float,
           input_grad: bool, bias: bool, cfg: dict[str, Any]):
    """Build the graph of one layer; return (graph, output, context)."""
    g = CostGraph(dtype_bytes)
    c = None
    if method is not None:
        _method(method)
        c = Ctx(g, method, int(d_out), int(d_in), int(tokens), float(dtype_bytes), resolve_config(method, cfg), path)
        model = MODELS[method]
        if not merged and model.fused is not None and model.fused(c):
            # AdaptedLinear asks the adapter for a fused output first; the base layer is inside it
            x = g.input((tokens, d_in), grad=input_grad)
            W0 = g.buffer((d_out, d_in), name="W0")
            c.bias = g.buffer((d_out,), name="b0") if bias else None
            return g, model.fused_layer(c, model.setup(c), x, W0), c
    conv = method == "flora_conv2d" or (method is None and cfg.get("kernel_size") is not None)
    with g.as_part("base"):
        if conv:
            kh, kw = _kernel_size(c) if c is not None else (
                (cfg["kernel_size"],) * 2 if isinstance(cfg["kernel_size"], int) else tuple(cfg["kernel_size"]))
            H, W = conv_layout(tokens)
            x = g.input((1, d_in, H, W), grad=input_grad)
            W0 = g.buffer((d_out, d_in, kh, kw), name="W0")
            y0 = g.conv2d(x, W0, (H, W), name="base_conv2d")
            b = g.buffer((d_out, 1, 1), name="b0") if bias else None
        else:
            x = g.input((tokens, d_in), grad=input_grad)
            W0 = g.buffer((d_out, d_in), name="W0")
            y0 = g.mm(x, _tr(g, W0), name="base_mm")
            b = g.buffer((d_out,), name="b0") if bias else None
        if b is not None:
            y0 = g.ew("bias_add", y0, b, grads="add")
    if c is None or merged:
        return g, y0, c
    c.bias = b
    model = MODELS[method]
    P = model.setup(c)
    if path == "dense" and method not in ("hut", "hira"):  # HUT's/HiRA's own dense branch: the layer's path
        # (FourierFT's and LoCA's own dense paths are fused layers, returned above)
        dw = g.cast(model.delta(c, P, W0), c.eb)
        d = g.conv2d(x, dw, x.shape[2:]) if conv else g.mm(x, _tr(g, dw))
        return g, g.ew("add", y0, d, grads="add"), c
    if model.layer is not None:
        return g, model.layer(c, P, x, y0, W0), c
    return g, g.ew("add", y0, g.cast(model.forward(c, P, x), c.eb), grads="add"), c


def cost(method: str, tokens: int, d_in: int, d_out: int, *, pass_: str = "fwd", merged: bool = False,
         path: str = "structured", dtype_bytes: float = 4, input_grad: bool = True, bias: bool = False,
         **cfg: Any) -> Cost:
    r"""FLOPs, bytes and launches of one adapted layer (frozen base + adapter) on ``tokens`` rows.

    Parameters
    ----------
    method : str
        A registered adapter name (:func:`method_names`).
    tokens : int
        Rows of the input x, shape (tokens, d_in) (pixels of one image for ``flora_conv2d``).
    d_in, d_out : int
        The frozen weight's shape is (d_out, d_in).
    pass_ : {"fwd", "bwd", "fwd+bwd"}
        Which kernels: the forward, the backward (gradients of the trainable tensors and, with
        ``input_grad``, of x), or both.
    merged : bool
        The update folded into the weight: the layer costs what the base costs.
    path : {"structured", "dense"}
        ``"structured"``: what ``AdaptedLinear`` runs -- the adapter's fused node when one applies
        (``fused_output``: LoRA, PiSSA, MiLoRA, LQ-LoRA without dropout, and DoRA), otherwise
        ``layer_output(x, base(x), ...)`` through the structure.  ``"dense"``: ΔW built by
        ``delta_weight`` every call and applied with one product, ``base(x) + x ΔWᵀ`` (for HUT,
        its own ``path="dense"`` branch, ``x (W_0 \odot BA)^\top``; for FourierFT and LoCA theirs,
        one product with :math:`W_0 + \Delta W` and the coefficient gradient from transforms of x
        and of the output gradient, :mod:`lowrank_theory.adapters.spectral_dense`).
    dtype_bytes : float
        Bytes per element of the activations and weights (4 float32, 2 bfloat16); transforms
        and norms run in float32 or better, as the code does.
    input_grad : bool
        Whether x requires grad (a layer inside a network: yes).
    bias : bool
        Whether the frozen layer has a bias.
    **cfg
        The adapter's constructor arguments (defaults are the constructor's); ``comp_lora``
        also takes ``k`` (protected directions).

    Returns
    -------
    Cost
        Totals and the kernel list; ``.select(part="adapter")`` is what the adapter adds.

    Raises
    ------
    ValueError
        Unknown method or config key, out-of-range sizes or config, bad ``pass_``/``path``.
    TypeError
        Non-integer sizes or ranks.

    Notes
    -----
    For LoRA (rank r, T tokens, m = d_out, n = d_in) the forward adds :math:`2Tr(n+m)` product
    FLOPs to the base's :math:`2Tmn` and the backward twice that (gradients of A, B and x); the
    fused node adds them with 2 extra kernels forward and 5 backward, where the unfused form also
    scales, sums with the base output and sums x's two gradients (test_complexity checks both
    by hand).
    """
    _check(tokens, d_in, d_out, pass_, dtype_bytes, path)
    g, y, _ = _trace(method, tokens, d_in, d_out, merged=merged, path=path, dtype_bytes=dtype_bytes,
                     input_grad=input_grad, bias=bias, cfg=cfg)
    return g.cost(y, pass_)


def base_cost(tokens: int, d_in: int, d_out: int, *, pass_: str = "fwd", dtype_bytes: float = 4,
              input_grad: bool = True, bias: bool = False, kernel_size: int | tuple[int, int] | None = None) -> Cost:
    """The frozen layer alone (``nn.Linear``, or an ``nn.Conv2d`` with 'same' padding when ``kernel_size`` is set).

    Forward :math:`2\\,T\\,d_{in}d_{out}` product FLOPs; backward the same again for x's gradient
    when ``input_grad`` (the frozen weight gets none).  Parameters as in :func:`cost`.
    """
    _check(tokens, d_in, d_out, pass_, dtype_bytes)
    g, y, _ = _trace(None, tokens, d_in, d_out, merged=True, path="structured", dtype_bytes=dtype_bytes,
                     input_grad=input_grad, bias=bias, cfg={"kernel_size": kernel_size})
    return g.cost(y, pass_)


def merge_cost(method: str, d_in: int, d_out: int, *, dtype_bytes: float = 4, **cfg: Any) -> Cost:
    """One merge: ΔW built as ``delta_weight`` builds it, then added to the frozen weight (no grad)."""
    _check(1, d_in, d_out, "fwd", dtype_bytes)
    _method(method)
    g = CostGraph(dtype_bytes)
    c = Ctx(g, method, int(d_out), int(d_in), 1, float(dtype_bytes), resolve_config(method, cfg))
    with g.no_grad():
        shape = (d_out, d_in, *_kernel_size(c)) if method == "flora_conv2d" else (d_out, d_in)
        W0 = g.buffer(shape, name="W0")
        dw = MODELS[method].delta(c, MODELS[method].setup(c), W0)
        out = g.ew("merge_add", g.cast(W0, c.acc), g.cast(dw, c.acc), grads="add")
        out = g.cast(out, c.eb)
    return g.cost(out, "fwd")


def num_trainable(method: str, d_in: int, d_out: int, **cfg: Any) -> int:
    """Trainable scalars of the modelled adapter (checks the model's shapes against ``param_count``)."""
    _check(1, d_in, d_out, "fwd", 4)
    _method(method)
    g = CostGraph(4)
    MODELS[method].setup(Ctx(g, method, int(d_out), int(d_in), 1, 4.0, resolve_config(method, cfg)))
    return sum(t.numel for t in g.params)


# ----------------------------------------------------------------------------- time models
@dataclass(frozen=True)
class Roofline:
    """Machine constants: peak matrix FLOP/s, memory bandwidth (B/s), time per kernel launch (s)."""

    peak_flops: float
    bandwidth: float
    launch_s: float = 0.0
    device: str = ""
    dtype: str = ""

    def __post_init__(self) -> None:
        for name in ("peak_flops", "bandwidth"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v}")
        if not (math.isfinite(self.launch_s) and self.launch_s >= 0):
            raise ValueError(f"launch_s must be a non-negative finite number, got {self.launch_s}")

    def floor(self, c: Cost) -> float:
        r""":math:`\sum_i \max(f_i/P, b_i/\beta)` over the kernels (the totals when ``c`` has none)."""
        ops = c.ops or (Op("total", c.flops, c.matmul_flops, c.bytes),)
        return float(sum(max(o.flops / self.peak_flops, o.bytes / self.bandwidth) for o in ops))

    def time(self, c: Cost) -> float:
        """Floor plus one launch time per kernel."""
        return self.floor(c) + c.launches * self.launch_s


@dataclass(frozen=True)
class TimeFit:
    """A fitted time model and how well it fits.

    Attributes
    ----------
    kind : {"linear", "roofline"}
    coef : dict
        ``linear``: seconds per matrix-product FLOP, per other FLOP, per byte, per launch;
        ``roofline``: ``floor_multiplier`` (k) and seconds per launch.
    n : int
        Number of measurements.
    r2_log : float
        :math:`R^2` of log time (timings span orders of magnitude).
    rms_rel_err, worst_rel_err : float
        Root-mean-square and largest :math:`|t_\\text{pred} - t| / t`.
    worst_factor : float
        Largest :math:`\\max(t_\\text{pred}/t, t/t_\\text{pred})`.
    worst_index : int
        Index of the worst measurement.
    """

    kind: str
    coef: dict[str, float]
    n: int
    r2_log: float
    rms_rel_err: float
    worst_rel_err: float
    worst_factor: float
    worst_index: int
    roofline: Roofline | None = field(default=None, repr=False)

    def features(self, c: Cost) -> np.ndarray:
        return _features(c, self.roofline)

    def predict(self, c: Cost) -> float:
        """Predicted seconds for a cost."""
        return float(self.features(c) @ np.array(list(self.coef.values())))


def _features(c: Cost, roofline: Roofline | None) -> np.ndarray:
    if roofline is None:
        return np.array([c.matmul_flops, c.other_flops, c.bytes, float(c.launches)])
    return np.array([roofline.floor(c), float(c.launches)])


def fit(measurements: Iterable[tuple[Cost, float]], *, roofline: Roofline | None = None) -> TimeFit:
    r"""Fit a time model to ``(cost, seconds)`` pairs by non-negative least squares on relative error.

    Parameters
    ----------
    measurements : iterable of (Cost, float)
        Modelled cost and measured time (seconds, positive) of each configuration.
    roofline : Roofline, optional
        Without it, fit :math:`t = a f_\text{mm} + a' f_\text{other} + b\,\text{bytes} + c L`;
        with it, :math:`t = k\,t_\text{floor} + c L`.

    Returns
    -------
    TimeFit
        Constants, :math:`R^2` of log time, RMS / worst relative error and worst factor.

    Raises
    ------
    ValueError
        Fewer measurements than constants, a non-positive or non-finite time.
    TypeError
        An entry that is not a (Cost, float) pair.

    Notes
    -----
    Minimises :math:`\sum_j ((x_j^\top\theta - t_j)/t_j)^2` over :math:`\theta \ge 0`
    (``scipy.optimize.nnls`` on the rows divided by :math:`t_j`).
    """
    pairs = list(measurements)
    for i, p in enumerate(pairs):
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], Cost)):
            raise TypeError(f"measurements[{i}] must be a (Cost, seconds) pair, got {p!r}")
    t = np.array([float(p[1]) for p in pairs])
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise ValueError("measurements must have positive finite times (seconds)")
    k = 4 if roofline is None else 2
    if len(pairs) < k:
        raise ValueError(f"measurements must hold at least {k} pairs to fit {k} constants, got {len(pairs)}")
    X = np.array([_features(p[0], roofline) for p in pairs])
    scale = X.max(axis=0)
    scale[scale == 0] = 1.0
    theta, _ = nnls((X / scale) / t[:, None], np.ones(len(t)))
    theta = theta / scale
    pred = X @ theta
    rel = np.abs(pred - t) / t
    with np.errstate(divide="ignore"):
        factor = np.maximum(pred / t, t / pred)
    lp, lt = np.log(np.maximum(pred, 1e-300)), np.log(t)
    ss_tot = float(((lt - lt.mean()) ** 2).sum())
    r2 = 1.0 - float(((lt - lp) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    names = (["s_per_matmul_flop", "s_per_other_flop", "s_per_byte", "s_per_launch"] if roofline is None
             else ["floor_multiplier", "s_per_launch"])
    return TimeFit("linear" if roofline is None else "roofline", dict(zip(names, map(float, theta))), len(t), r2,
                   float(np.sqrt(np.mean(rel**2))), float(rel.max()), float(factor.max()), int(np.argmax(factor)),
                   roofline)


from .timing import measure, measure_interleaved, measure_peak, peak_probes, prepare  # noqa: E402  (needs Roofline)
