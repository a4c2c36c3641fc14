"""Complexity model: product FLOPs against torch's FlopCounterMode, hand counts, properties, timing, the experiment.

The independent reference for the model's matrix-product FLOPs is
``torch.utils.flop_counter.FlopCounterMode`` run on the *real* adapted layer's forward and backward
(it counts ``mm``/``bmm``/``addmm``/convolutions from the dispatched aten ops, so it sees exactly the
products the code launches, including those hidden in the WHT and in einsums).  The equality is
exact: both count 2 FLOPs per multiply-add on integer shapes.  Element-wise and FFT FLOPs, bytes
and launches are the model's own estimates; they are checked by hand for LoRA, by properties, and
against measured time by the experiment.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import lowrank_theory.adapters as ad
from lowrank_theory.experiments import complexity as experiment
from lowrank_theory.linalg.transforms import _block_bits
from lowrank_theory.theory import complexity as cx
from lowrank_theory.theory.adapter_costs import conv_layout
from lowrank_theory.theory.timing import build_layer

# small configs so that every method fits a tiny layer (defaults are for real layers)
SMALL = dict(fourierft=dict(n_frequency=50), loca=dict(n_frequency=50), qwha=dict(n_frequency=50),
             vera=dict(rank=16), nola=dict(num_basis_a=16, num_basis_b=16), randlora=dict(rank=8))
METHODS = ad.names()
# (tokens, d_in, d_out): d_out > d_in, and d_out < d_in with sizes that are not powers of two
# (RandLoRA's transposed form, QWHA's padding, FourierFT's odd half-spectrum)
SHAPES = [(12, 32, 48), (10, 40, 24)]


def _x(method: str, tokens: int, d_in: int) -> torch.Tensor:
    if method == "flora_conv2d":
        return torch.randn(1, d_in, *conv_layout(tokens), requires_grad=True)
    return torch.randn(tokens, d_in, requires_grad=True)


def _addmm_inplace(*args, **kwargs):
    # torch's own addmm formula, applied to the in-place addmm_ (which its registry omits) that the
    # fused LoRA path uses to accumulate the rank-r term into the base GEMM's output
    return flop_registry[torch.ops.aten.addmm](*args, **kwargs)


_addmm_inplace._get_raw = True  # already shape-wrapped: do not wrap again


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace})


def _counted(layer, x) -> tuple[int, int]:
    with _counter() as fc:
        y = layer(x)
    fwd = fc.get_total_flops()
    with _counter() as fc:
        y.backward(torch.randn_like(y))
    return fwd, fc.get_total_flops()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", ["structured", "dense"])
@pytest.mark.parametrize("method", METHODS)
def test_product_flops_equal_flop_counter(method, path, shape):
    T, n, m = shape
    cfg = SMALL.get(method, {})
    torch.manual_seed(0)
    layer = build_layer(method, n, m, path=path, **cfg)
    fwd, bwd = _counted(layer, _x(method, T, n))
    assert fwd > 0 and bwd > 0
    assert cx.cost(method, T, n, m, pass_="fwd", path=path, **cfg).matmul_flops == fwd
    assert cx.cost(method, T, n, m, pass_="bwd", path=path, **cfg).matmul_flops == bwd


class _OpCount(TorchDispatchMode):
    """Counts the aten ops that compute (not views, not dtype queries) -- one or more kernels each."""

    SKIP = ("detach.default", "_unsafe_view.default", "promote_types.default")

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        self.n += not view and func.__name__ not in self.SKIP
        return func(*args, **(kwargs or {}))


# The model counts kernels, the dispatcher counts ops, and they differ for these methods: an
# out-of-place index_add, index_put or a slice's backward is one op but two kernels (FourierFT,
# SLTrain, UniLoRA, QWHA, LoCA); a convolution_backward is one op for two gradients (FLoRA-conv);
# autograd adds layout copies for leaf gradients of transposed or expanded views (Block-LoRA's
# summed blocks, HUT's and HiRA's Bᵀ, FLoRA-conv's factor views, SSF's dense ΔW); einsum's permute copies are
# modelled only roughly (TLoRA, FLoRA-conv) and so are the DCT's twiddle and slice kernels (LoCA).
# Every other method's model launches exactly the ops its code dispatches.
APPROX_LAUNCHES = {"block_lora", "flora_conv2d", "fourierft", "hira", "hut", "loca", "qwha", "sltrain", "ssf", "tlora",
                   "unilora"}


@pytest.mark.parametrize("path", ["structured", "dense"])
@pytest.mark.parametrize("method", METHODS)
def test_launches_track_the_dispatched_ops(method, path):
    T, n, m = SHAPES[0]
    cfg = SMALL.get(method, {})
    layer = build_layer(method, n, m, path=path, **cfg)
    x = _x(method, T, n)
    with _OpCount() as fwd:
        y = layer(x)
    gy = torch.randn_like(y)
    with _OpCount() as bwd:
        y.backward(gy)
    for pass_, real in (("fwd", fwd.n), ("bwd", bwd.n)):
        modelled = cx.cost(method, T, n, m, pass_=pass_, path=path, **cfg).launches
        slack = max(2, 0.3 * real) if method in APPROX_LAUNCHES else 0
        assert abs(modelled - real) <= slack, (pass_, modelled, real)


@pytest.mark.parametrize("method", ["lora", "dora", "fourierft", "hut", "tlora", "ssf"])
def test_merged_layer_costs_the_base(method):
    T, n, m = SHAPES[0]
    cfg = SMALL.get(method, {})
    layer = build_layer(method, n, m, merged=True, **cfg)
    fwd, bwd = _counted(layer, _x(method, T, n))
    merged = cx.cost(method, T, n, m, pass_="fwd+bwd", merged=True, **cfg)
    assert merged.matmul_flops == fwd + bwd == 2 * (2 * T * n * m)  # y = x W'ᵀ and dx = dy W'
    assert merged == cx.base_cost(T, n, m, pass_="fwd+bwd")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", METHODS)
def test_modelled_trainable_count_matches_the_module(method, shape):
    _, n, m = shape
    cfg = SMALL.get(method, {})
    held = ad.create(method, m, n, **cfg).num_trainable
    assert cx.num_trainable(method, n, m, **cfg) == held == ad.get(method).param_count(m, n, **cfg)


def test_lora_counts_by_hand():
    T, n, m, r = 7, 24, 40, 4
    e = 4
    # AdaptedLinear runs LoRA through the fused node: x Aᵀ, the base GEMM, then addmm_ of the rank-r
    # term into the base output (its add counted as T·m non-product flops)
    fwd = cx.cost("lora", T, n, m, rank=r)
    assert fwd.matmul_flops == 2 * T * (n * m + n * r + r * m)
    assert fwd.flops == fwd.matmul_flops + T * m
    assert fwd.launches == 3
    assert fwd.bytes == e * ((T * n + r * n + T * r) + (T * n + m * n + T * m) + (T * r + r * m + 2 * T * m))
    assert fwd.select(part="base").matmul_flops == 2 * T * n * m
    bwd = cx.cost("lora", T, n, m, pass_="bwd", rank=r)
    # g B; dx = g W0 + s (g B) A in place; dA = s (g B)ᵀ x and dB = s gᵀ (x Aᵀ), each then scaled
    assert bwd.matmul_flops == 2 * T * m * r + 2 * T * m * n + 2 * T * r * n + 2 * r * T * n + 2 * m * T * r
    assert bwd.flops == bwd.matmul_flops + T * n + r * n + m * r
    assert bwd.launches == 7
    no_x = cx.cost("lora", T, n, m, pass_="bwd", rank=r, input_grad=False)
    assert no_x.matmul_flops == 2 * T * m * r + 2 * r * T * n + 2 * m * T * r  # no dx
    # with dropout the fused node does not apply: dropout, x Aᵀ, (.) Bᵀ, the scale, the base GEMM, the sum
    un = cx.cost("lora", T, n, m, rank=r, dropout=0.1)
    assert un.matmul_flops == fwd.matmul_flops and un.launches == 6
    assert un.flops == un.matmul_flops + 2 * T * n + 2 * T * m  # dropout (2/elt), scale, add
    unb = cx.cost("lora", T, n, m, pass_="bwd", rank=r, dropout=0.1)
    # base dx, dA, dB, two activation grads; the scale's and dropout's grads; the sum of x's two grads
    assert unb.matmul_flops == 2 * T * n * m + 2 * (2 * T * r * m) + 2 * (2 * T * r * n)
    assert unb.flops == unb.matmul_flops + T * m + T * n + T * n
    assert unb.launches == 1 + 4 + 1 + 1 + 1


def test_base_cost_by_hand():
    T, n, m = 5, 16, 8
    c = cx.base_cost(T, n, m, pass_="fwd+bwd", dtype_bytes=2)
    assert c.matmul_flops == c.flops == 4 * T * n * m
    assert c.bytes == 2 * 2 * (T * n + n * m + T * m)
    conv = cx.base_cost(16, 3, 4, kernel_size=3)
    assert conv.matmul_flops == 2 * 16 * 4 * 3 * 9  # 'same' padding: one output per pixel


def test_transform_paths_grow_subquadratically():
    # The structured FFT/DCT adapters cost O(T (n log n + c)): x4 in d gives about x4.8.  The WHT runs
    # dense H_{2^c} blocks (c <= 6), n·sum(2^c) flops per vector: 2^10 splits as 5+5 bits and 2^12 as
    # 6+6, so x4 in d gives x8 there.  A dense ΔW path is O(n^2 log n) per call on top of the per-token
    # work: x16 and more; at T = 256 and d = 4096 that per-call part is over 5x the structured path's.
    for method, most in (("fourierft", 5.5), ("loca", 5.5), ("qwha", 8.5)):
        small, big = (cx.cost(method, 256, d, d, pass_="fwd+bwd").select(part="adapter") for d in (1024, 4096))
        dense_small, dense_big = (cx.cost(method, 256, d, d, pass_="fwd+bwd", path="dense").select(part="adapter")
                                  for d in (1024, 4096))
        assert 4 < big.flops / small.flops < most < 15 < dense_big.flops / dense_small.flops
        assert big.flops < dense_big.flops / 5


def test_hut_structured_costs_r_base_products_dense_costs_one():
    T, n, m, r = 64, 32, 48, 3
    s = cx.cost("hut", T, n, m, rank=r).select(part="adapter")
    d = cx.cost("hut", T, n, m, rank=r, path="dense").select(part="adapter")
    assert s.matmul_flops == r * 2 * T * n * m
    assert d.matmul_flops == 2 * m * r * n + 2 * T * n * m


# ----------------------------------------------------------------------------- properties
_methods = st.sampled_from([m for m in METHODS if m not in ("qwha",)])  # QWHA pads to powers of two: tested below
_dims = st.integers(16, 96)


@given(method=_methods, n=_dims, m=_dims, t=st.integers(2, 64), pass_=st.sampled_from(["fwd", "fwd+bwd"]))
def test_product_flops_are_affine_and_increasing_in_tokens(method, n, m, t, pass_):
    cfg = SMALL.get(method, {})
    f = [cx.cost(method, T, n, m, pass_=pass_, **cfg) for T in (t, t + 1, t + 2)]
    assert f[0].matmul_flops + f[2].matmul_flops == 2 * f[1].matmul_flops
    assert f[0].flops < f[1].flops < f[2].flops
    assert f[0].bytes < f[1].bytes < f[2].bytes


@given(method=st.sampled_from(METHODS), n=_dims, m=_dims, t=st.integers(1, 64), eb=st.sampled_from([2, 4]))
def test_passes_add_up_and_layer_costs_at_least_the_base(method, n, m, t, eb):
    cfg = SMALL.get(method, {})
    fwd, bwd, both = (cx.cost(method, t, n, m, pass_=p, dtype_bytes=eb, **cfg) for p in ("fwd", "bwd", "fwd+bwd"))
    assert math.isclose(both.flops, fwd.flops + bwd.flops) and math.isclose(both.bytes, fwd.bytes + bwd.bytes)
    assert both.launches == fwd.launches + bwd.launches
    kernel = 3 if method == "flora_conv2d" else None
    base = cx.base_cost(t, n, m, pass_="fwd+bwd", dtype_bytes=eb, kernel_size=kernel)
    assert both.matmul_flops >= base.matmul_flops and both.bytes > base.bytes
    if method == "hut":  # HUT drops the frozen output (apply_transformed recomputes the layer): no base backward
        assert both.select(part="base").matmul_flops == cx.base_cost(t, n, m, pass_="fwd", dtype_bytes=eb).matmul_flops
    else:
        assert both.select(part="base").matmul_flops == base.matmul_flops
    half = cx.cost(method, t, n, m, pass_="fwd+bwd", dtype_bytes=2, **cfg)
    full = cx.cost(method, t, n, m, pass_="fwd+bwd", dtype_bytes=4, **cfg)
    # same arithmetic; the frozen layer moves half the bytes; transform/norm paths add float32 casts
    assert half.flops == full.flops and half.launches >= full.launches
    assert 2 * half.select(part="base").bytes == full.select(part="base").bytes


@given(n=_dims, m=_dims, t=st.integers(1, 64), r=st.integers(1, 15))
def test_more_rank_costs_more(n, m, t, r):
    for method in ("lora", "adalora", "vera", "loldu"):
        a, b = (cx.cost(method, t, n, m, pass_="fwd+bwd", rank=k) for k in (r, r + 1))
        assert a.matmul_flops < b.matmul_flops and a.bytes < b.bytes
    # half precision halves every byte LoRA moves (no float32 accumulation on its path)
    assert cx.cost("lora", t, n, m, rank=r, dtype_bytes=2).bytes * 2 == cx.cost("lora", t, n, m, rank=r).bytes


@given(n=st.sampled_from([16, 24, 32, 40, 64]), m=st.sampled_from([16, 24, 32, 48]), t=st.integers(1, 40))
def test_qwha_pads_to_powers_of_two(n, m, t):
    c = cx.cost("qwha", t, n, m, n_frequency=20).select(part="adapter")
    N, M = 1 << (n - 1).bit_length(), 1 << (m - 1).bit_length()

    def blocks(length: int) -> list[int]:  # the WHT's dense H_{2^c} block sizes, c <= 6 (linalg.transforms)
        return [1 << b for b in _block_bits(length.bit_length() - 1)]

    assert c.matmul_flops == sum(2 * t * N * b for b in blocks(N)) + sum(2 * t * M * b for b in blocks(M))


@given(f=st.lists(st.floats(0, 1e9), min_size=1, max_size=6), b=st.lists(st.floats(0, 1e9), min_size=1, max_size=6),
       P=st.floats(1e6, 1e12), B=st.floats(1e6, 1e12))
def test_roofline_floor_between_max_and_sum(f, b, P, B):
    ops = [cx.Op("k", fi, fi, bi) for fi, bi in zip(f, b)]
    c = cx.Cost.from_ops(ops)
    roof = cx.Roofline(P, B, 1e-6)
    floor = roof.floor(c)
    assert max(c.flops / P, c.bytes / B) <= floor * (1 + 1e-12)
    assert floor <= (c.flops / P + c.bytes / B) * (1 + 1e-12)
    assert roof.time(c) == pytest.approx(floor + len(ops) * 1e-6)


def test_fit_recovers_known_constants():
    rng = np.random.default_rng(0)
    picks = [str(rng.choice(METHODS)) for _ in range(30)]
    costs = [cx.cost(m, int(rng.integers(8, 300)), int(rng.integers(16, 200)), int(rng.integers(16, 200)),
                     pass_="fwd+bwd", **SMALL.get(m, {})) for m in picks]
    theta = np.array([2e-11, 3e-10, 1e-10, 5e-6])
    t = [float(np.array([c.matmul_flops, c.other_flops, c.bytes, c.launches]) @ theta) for c in costs]
    res = cx.fit(zip(costs, t))
    assert res.kind == "linear" and res.n == len(costs)
    np.testing.assert_allclose(list(res.coef.values()), theta, rtol=1e-6)
    assert res.worst_rel_err < 1e-8 and res.worst_factor < 1 + 1e-8 and res.r2_log > 1 - 1e-12
    assert res.predict(costs[0]) == pytest.approx(t[0], rel=1e-9)
    # noisy times: the fit is still within the noise, and the worst row is reported
    noisy = [ti * (1.3 if i == 3 else 1.0) for i, ti in enumerate(t)]
    res = cx.fit(zip(costs, noisy))
    assert res.worst_index == 3 and 1.05 < res.worst_factor < 1.35
    roof = cx.Roofline(1e11, 2e10, 3e-6)
    t = [2 * roof.floor(c) + 7e-6 * c.launches for c in costs]
    res = cx.fit(zip(costs, t), roofline=roof)
    assert res.kind == "roofline"
    np.testing.assert_allclose([res.coef["floor_multiplier"], res.coef["s_per_launch"]], [2, 7e-6], rtol=1e-6)


def test_merge_cost_is_the_delta_weight_build():
    n, m, r = 32, 48, 4
    c = cx.merge_cost("lora", n, m, rank=r)
    assert c.matmul_flops == 2 * m * r * n
    layer = build_layer("fourierft", n, m, n_frequency=20)
    with _counter() as fc:
        layer.merge()
    assert cx.merge_cost("fourierft", n, m, n_frequency=20).matmul_flops == fc.get_total_flops() == 0
    layer = build_layer("qwha", n, m, n_frequency=20)
    with _counter() as fc:
        layer.merge()
    assert cx.merge_cost("qwha", n, m, n_frequency=20).matmul_flops == fc.get_total_flops() > 0


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="unknown method"):
        cx.cost("nope", 4, 8, 8)
    with pytest.raises(ValueError, match="tokens"):
        cx.cost("lora", 0, 8, 8)
    with pytest.raises(TypeError, match="d_in"):
        cx.cost("lora", 4, 8.0, 8)
    with pytest.raises(ValueError, match="pass_"):
        cx.cost("lora", 4, 8, 8, pass_="backward")
    with pytest.raises(ValueError, match="path"):
        cx.cost("lora", 4, 8, 8, path="sparse")
    with pytest.raises(ValueError, match="dtype_bytes"):
        cx.cost("lora", 4, 8, 8, dtype_bytes=0)
    with pytest.raises(ValueError, match="rank"):
        cx.cost("lora", 4, 8, 8, rank=9)
    with pytest.raises(ValueError, match="unknown config key"):
        cx.cost("lora", 4, 8, 8, rnak=2)
    with pytest.raises(ValueError, match="n_frequency"):
        cx.cost("fourierft", 4, 8, 8, n_frequency=65)
    with pytest.raises(ValueError, match="num_blocks"):
        cx.cost("block_lora", 4, 8, 8, rank=4, num_blocks=3)
    with pytest.raises(ValueError, match="k must"):
        cx.cost("comp_lora", 4, 8, 8, rank=4, k=5)
    with pytest.raises(ValueError, match="measurements"):
        cx.fit([])
    c = cx.cost("lora", 4, 8, 8, rank=2)
    with pytest.raises(ValueError, match="positive finite"):
        cx.fit([(c, 1.0)] * 4 + [(c, -1.0)])
    with pytest.raises(ValueError, match="positive finite"):
        cx.fit([(c, 1.0)] * 4 + [(c, float("nan"))])
    with pytest.raises(TypeError, match=r"measurements\[0\]"):
        cx.fit([("cost", 1.0)])
    with pytest.raises(ValueError, match="peak_flops"):
        cx.Roofline(0.0, 1.0)
    with pytest.raises(ValueError, match="launch_s"):
        cx.Roofline(1.0, 1.0, float("inf"))
    with pytest.raises(ValueError, match="pass_"):
        cx.measure("lora", 4, 8, 8, pass_="bwd")
    with pytest.raises(ValueError, match="repeats"):
        cx.measure("lora", 4, 8, 8, repeats=0, rank=2)
    with pytest.raises(ValueError, match="tokens"):
        cx.measure("lora", 0, 8, 8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            cx.measure("lora", 4, 8, 8, device="cuda", rank=2)


# ----------------------------------------------------------------------------- timing
def test_measure_and_peak_return_positive_times():
    t = cx.measure("lora", 16, 32, 32, repeats=3, warmup=1, rank=4)
    assert len(t.samples) == 3 and 0 < t.min_s <= t.median_s
    t = cx.measure(None, 16, 32, 32, pass_="fwd", repeats=2)
    assert len(t.samples) == 2 and t.min_s > 0
    steps = [cx.prepare(m, 16, 32, 32, **SMALL.get(m, {})) for m in ("lora", "fourierft")]
    ts = cx.measure_interleaved(steps, repeats=2, warmup=0)
    assert [len(x.samples) for x in ts] == [2, 2]
    roof = cx.measure_peak(size=128, copy_bytes=1 << 20, repeats=2)
    assert roof.peak_flops > 1e6 and roof.bandwidth > 1e6 and 0 < roof.launch_s < 1e-2 and roof.device == "cpu"


def test_thread_clock_needs_one_thread():
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match="num_threads"):
            cx.measure("lora", 8, 16, 16, clock="thread", repeats=1, rank=2)
        torch.set_num_threads(1)
        t = cx.measure("lora", 8, 16, 16, clock="thread", repeats=2, rank=2)
        assert len(t.samples) == 2 and t.min_s > 0
        with pytest.raises(ValueError, match="clock"):
            cx.measure("lora", 8, 16, 16, clock="cpu", repeats=1, rank=2)
    finally:
        torch.set_num_threads(prev)


def test_experiment_claim_holds_at_tiny_size(tmp_path):
    # Timings on a shared CPU are noisy: the experiment times on one thread, in interleaved rounds,
    # and keeps the minimum of 7 rounds; its factors (3x for the fit, 2.5x for growth, 0.5 of the
    # floor) are wide enough for a loaded machine and far below what a wrong model gives (see the
    # module's constants).  Sizes are tiny so the whole test takes about a second.
    methods = [None, "lora", "vera", "fourierft", "dora", "hut", "loca", "sltrain"]
    rows = experiment.measure_table(methods, [64, 256], [128], repeats=7, warmup=1,
                                    extra=[("lora", "dense", False), ("lora", "structured", True)])
    assert len(rows) == 2 * (len(methods) + 2)
    assert experiment.check(rows) == []
    lora = [r for r in rows if r["method"] == "lora" and r["path"] == "structured" and not r["merged"]]
    assert all(r["ratio_to_base"] > 1 for r in lora)
    s = experiment.summary(rows)
    assert s["fit_worst_factor"] <= experiment.FIT_FACTOR and s["rows"] == len(rows)
    files = experiment.plot(rows, tmp_path / "complexity")
    assert all(f.exists() and f.stat().st_size > 0 for f in files)


def test_check_flags_a_wrong_model():
    rows = [dict(method="x", size=d, tokens=8, pass_="fwd+bwd", path="structured", merged=False,
                 measured_s=t, predicted_s=p, floor_s=f)
            for d, t, p, f in ((64, 1e-3, 1e-3, 1e-4), (256, 4e-3, 1.6e-2, 1e-4))]
    problems = experiment.check(rows)
    assert any("factor 4.00 > 3.0" in p for p in problems)  # 16 ms predicted for 4 ms measured
    assert any("grows x4.00" in p for p in problems)  # model x16 vs measured x4
    rows[0]["floor_s"] = 1e-2
    assert any("below 0.5 x roofline floor" in p for p in experiment.check(rows))


@pytest.mark.parametrize("method", ["fourierft", "loca"])
@pytest.mark.parametrize("m,n,c", [(384, 384, 1000), (1024, 1024, 1000), (4096, 4096, 1000), (768, 3072, 500)])
def test_auto_path_rule_agrees_with_the_op_model(method, m, n, c):
    """``prefers_dense`` (the adapters' ``path="auto"``) picks the path with fewer modelled FLOPs
    (fwd+bwd, base included) at half and at twice its threshold token count."""
    from lowrank_theory.adapters.spectral_dense import prefers_dense

    threshold = next(t for t in (2 ** k for k in range(20)) if prefers_dense(t, m, n, c))
    for T in (threshold // 4, threshold * 2):
        s = cx.cost(method, T, n, m, pass_="fwd+bwd", path="structured", n_frequency=c)
        d = cx.cost(method, T, n, m, pass_="fwd+bwd", path="dense", n_frequency=c)
        assert (d.flops < s.flops) == prefers_dense(T, m, n, c), (T, d.flops / s.flops)


@pytest.mark.parametrize(("method", "path"), [("fourierft", "structured"), ("loca", "structured"),
                                              ("fourierft", "dense")])
def test_fft_flops_are_absolute_not_only_ratios(method, path):
    """The model's FFT kernels cost 5 N log2 N per complex transform of length N and half that per real one.

    Checked as absolute numbers: a real FFT costed as a complex one (2x its flops) fails here, where a
    ratio between two methods that share the mistake would not.
    """
    T, n, m = 8, 32, 16
    ops = {o.name: o.flops for o in cx.cost(method, T, n, m, n_frequency=10, path=path).ops
           if "fft" in o.name}
    real = lambda N, rows: 2.5 * N * math.log2(N) * rows  # noqa: E731 - the formula, written once
    if path == "structured":  # x -> rfft (length n, T rows); z -> irfft (length m, T rows)
        assert ops == {"rfft": real(n, T), "irfft": real(m, T)}
    else:  # irfft2 of the (m, n/2+1) half spectrum: complex ifft down the columns, then real irfft of the rows
        assert ops == {"irfft2_cols": 2 * real(m, n // 2 + 1), "irfft2_rows": real(n, m)}
