r"""Op-by-op models of the transform-domain adapters (FourierFT, LoCA, QWHA) and of the
multiplicative ones (DoRA, SSF, HUT), registered into :data:`.adapter_costs.MODELS`.

The transforms follow the code they call: the rFFT/irFFT pair of ``FourierFT.forward``; the
FFT-based DCT-II / DCT-III of ``lowrank_theory.backend`` (Makhoul's reordering, one real FFT
of length n, a twiddle product on its n/2 + 1 outputs, the orthonormal scaling); the Walsh–Hadamard transform of
``lowrank_theory.linalg.wht`` (dense :math:`H_{2^c}` blocks, :math:`c \le 6`, one matrix
product per block -- so its FLOPs are matrix-product FLOPs, :math:`2RL\cdot 2^c` per block);
and the sparse spectrum product ``SparseSpectrumMatmul`` (gather, scale, scatter-add; its
hand-written backward).
"""

from __future__ import annotations

import math

from ..adapters.row_norms import _ROW_BLOCK  # lowrank_row_norms' block of W0 rows
from ..linalg.transforms import _block_bits  # the WHT's split into dense H_64 blocks
from .adapter_costs import Ctx, _lowrank, _register, _tr, lora_linear
from .cost_graph import CostGraph, Op, T

__all__ = ["dct_ii", "idct_iii", "sparse_spectrum_matmul", "wht"]


# ----------------------------------------------------------------------------- transforms
def _twiddle(g: CostGraph, L: int, eb: float) -> T:
    """The L complex twiddles: cached per length by ``backend._torch_dct_constants``, so no kernel."""
    return g.buffer((L,), eb=2 * eb, name="twiddle")


def dct_ii(g: CostGraph, x: T) -> T:
    """Orthonormal DCT-II along the last axis of x (R, L), as ``backend._torch_dct_ii``: reorder,
    one real FFT, the twiddle product on the L/2 + 1 outputs, real and flipped imaginary parts, scale
    (twiddles and scale are cached constants)."""
    R, L = math.prod(x.shape[:-1]), x.shape[-1]
    h = L // 2 + 1
    x = g.view(x, (R, L))
    even = g.view(x, (R, (L + 1) // 2), bwd_kernels=2)
    odd = g.copy("flip", g.view(x, (R, L // 2), bwd_kernels=2))
    v = g.cat("cat", [even, odd], (R, L))
    P = g.ew("cmul", g.fft("rfft", v, "rfft", L), _twiddle(g, h, x.eb), flops=6.0)
    re = g.view(P, (R, h), eb=x.eb, bwd_kernels=1)
    im = g.ew("neg", g.copy("flip", g.view(P, (R, L - h), eb=x.eb, bwd_kernels=2)), grads="linear")
    y = g.cat("cat", [re, im], (R, L))
    return g.ew("mul", y, g.buffer((L,), eb=x.eb, name="scale"))


def idct_iii(g: CostGraph, y: T) -> T:
    """Inverse of :func:`dct_ii` along the last axis (a DCT-III), as ``backend._torch_dct_iii``: scale,
    the L/2 + 1 complex inputs of one inverse real FFT from y and its reversal, the interleave."""
    R, L = math.prod(y.shape[:-1]), y.shape[-1]
    h = L // 2 + 1
    eb = y.eb
    y = g.ew("mul", g.view(y, (R, L)), g.buffer((L,), eb=eb, name="scale"))
    a = g.view(y, (R, h), bwd_kernels=2)
    zeros = g.fill("zeros_like", (R, 1), eb=eb)
    b = g.cat("cat", [zeros, g.copy("flip", g.view(y, (R, h - 1), bwd_kernels=2))], (R, h))
    c, s = g.buffer((h,), eb=eb, name="cos"), g.buffer((h,), eb=eb, name="sin")  # cached constants
    re = g.ew("scale", g.ew("add", g.ew("mul", a, c), g.ew("mul", b, s), grads="add"), grads="linear")
    im = g.ew("scale", g.ew("sub", g.ew("mul", a, s), g.ew("mul", b, c), grads="sub"), grads="linear")
    V = g.ew("complex", re, im, grads="add", out_eb=2 * eb)
    v = g.fft("irfft", V, "irfft", L)
    half, odd = (L + 1) // 2, L // 2
    fwd = [("empty_like", 0.0, 0.0), ("copy_even", 0.0, 2 * eb * R * half), ("flip", 0.0, 2 * eb * R * odd),
           ("copy_odd", 0.0, 2 * eb * R * odd)]
    bwd = {0: [("slice_grad_zeros", 0.0, eb * R * L), ("slice_grad_copy", 0.0, 2 * eb * R * half),
               ("flip_grad", 0.0, 2 * eb * R * odd), ("slice_grad_zeros", 0.0, eb * R * L),
               ("slice_grad_copy", 0.0, 2 * eb * R * odd), ("grad_accumulate", R * L, 3 * eb * R * L)]}
    return g.custom("interleave", [v], (R, L), fwd, bwd, eb=eb)


def wht(g: CostGraph, x: T, rows: int, length: int) -> T:
    """Orthonormal WHT of length ``length`` applied to ``rows`` vectors (any axis): one product per block."""
    k = length.bit_length() - 1
    if 1 << k != length:
        raise ValueError(f"the Walsh–Hadamard length must be a power of two, got {length}")
    y = x
    for bits in _block_bits(k):
        mb = 1 << bits
        H = g.buffer((mb, mb), eb=x.eb, name=f"H{mb}")
        y = g.view(g.mm(g.view(y, (rows * length // mb, mb)), H), x.shape)
    return g.ew("scale", y, grads="linear")


def sparse_spectrum_matmul(g: CostGraph, xhat: T, a: T, size: int) -> T:
    """``SparseSpectrumMatmul``: z (R, size) from xhat (R, L) and c coefficients; O(R c)."""
    R, c, e, ib = math.prod(xhat.shape[:-1]), a.shape[0], xhat.eb, g.INDEX_BYTES
    fwd = [("index_select", 0.0, 2 * e * R * c + ib * c), ("mul", R * c, e * (2 * R * c + c)),
           ("zeros", 0.0, e * R * size), ("index_add_", R * c, 3 * e * R * c + ib * c)]
    bwd = {"shared": [("index_select_grad_rows", 0.0, 2 * e * R * c + ib * c)],
           0: [("zeros_like", 0.0, e * R * xhat.shape[-1]), ("mul", R * c, e * (2 * R * c + c)),
               ("index_add_", R * c, 3 * e * R * c + ib * c)],
           1: [("index_select_cols", 0.0, 2 * e * R * c + ib * c), ("mul", R * c, 3 * e * R * c),
               ("sum", R * c, e * (R * c + c))]}
    return g.custom("sparse_spectrum_matmul", [xhat, a], (R, size), fwd, bwd, eb=e)


def _dense_spectrum(g: CostGraph, a: T, shape: tuple[int, int]) -> T:
    """``values.new_zeros(shape).index_put((rows, cols), values, accumulate=True)``."""
    n, c = math.prod(shape), a.shape[0]
    fwd = [("zeros", 0.0, a.eb * n), ("clone", 0.0, 2 * a.eb * n), ("index_put_", c, 3 * a.eb * c + 16 * c)]
    return g.custom("dense_spectrum", [a], shape, fwd, {0: [("gather", 0.0, 2 * a.eb * c + 16 * c)]}, eb=a.eb)


def _flat(g: CostGraph, x: T, c: Ctx) -> T:
    return g.cast(g.view(x, (c.tokens, c.n)), c.acc)


# ----------------------------------------------------------------------------- FourierFT
def _c_frequency(c: Ctx, rows: int, cols: int) -> int:
    return c.int("n_frequency", 1, rows * cols)


def _fourierft_setup(c):
    _c_frequency(c, c.m, c.n)
    return dict(spectrum=c.g.param((c.cfg["n_frequency"],)))


def _fourierft_fwd(c, P, x):
    g, m, n, acc = c.g, c.m, c.n, c.acc
    T_, k = c.tokens, P["spectrum"].shape[0]
    X = g.index_select(g.fft("rfft", _flat(g, x, c), "rfft", n), k)  # (T, c) complex
    ur = g.ew("div", g.view(X, (T_, k), eb=acc, bwd_kernels=1), grads="linear")
    im = g.view(X, (T_, k), eb=acc, bwd_kernels=1)
    ui = g.ew("div", g.ew("where", g.buffer((k,), eb=1), g.ew("neg", im, grads="linear"), im), grads="linear")
    a = g.cast(P["spectrum"], acc)
    zr = g.index_add(g.ew("mul", ur, a), m)
    zi = g.index_add(g.ew("mul", ui, a), m)
    half = m // 2 + 1
    hr = g.ew("scale", g.ew("add", g.view(zr, (T_, half), bwd_kernels=2), g.index_select(zr, half), grads="add"),
              grads="linear")
    hi = g.ew("scale", g.ew("sub", g.view(zi, (T_, half), bwd_kernels=2), g.index_select(zi, half), grads="sub"),
              grads="linear")
    y = g.fft("irfft", g.ew("complex", hr, hi, grads="add", out_eb=2 * acc), "irfft", m)
    return g.cast(g.ew("scale", y, grads="linear"), c.eb)


def _fourierft_dw(c, P, W0, cast=True):
    """``FourierFT._delta``: halves of the coefficients at (k, l) and (-k, -l), the cells in columns
    <= n/2 kept (about c of the 2c), an inverse complex FFT along the rows, an inverse real FFT
    along the columns."""
    g, m, h, k = c.g, c.m, c.n // 2 + 1, P["spectrum"].shape[0]
    a = g.ew("scale", g.cast(P["spectrum"], c.acc), grads="linear")
    kept = g.index_select(a, k)  # about c of the 2c cells land in the kept half
    H = _dense_spectrum(g, kept, (m, h))
    Hc = g.ew("complex", H, g.fill("zeros_like", (m, h), eb=c.acc), grads="add", out_eb=2 * c.acc)
    Z = g.view(g.fft("irfft2_cols", g.view(Hc, (h, m)), "ifft", m), (m, h))  # along axis 0 (a moved view)
    dw = g.ew("scale", g.fft("irfft2_rows", Z, "irfft", c.n), grads="linear")
    return g.cast(dw, c.eb) if cast else dw


# ----------------------------------------------------------------------------- the dense path
def _kernels(ops: tuple[Op, ...], part: str = "adapter") -> list[tuple]:
    return [(o.name, o.flops, o.bytes, o.matmul_flops, part) for o in ops]


def _gathered_transform(c: Ctx, length: int, transform) -> list[tuple]:
    """Kernels of ``gather_columns(transform(v.to(acc)), idx)`` for v (T, length): cast, transform,
    transposed copy, row gather of the c needed frequencies (traced on a scratch graph)."""
    h = CostGraph(c.eb)
    v = h.cast(h.input((c.tokens, length), grad=False), c.acc)
    X = transform(h, v)
    X = h.copy("transpose_contiguous", X)
    X = h.index_select(X, c.cfg["n_frequency"], name="gather_rows")
    return _kernels(h.cost(X, "fwd").ops)


def _spectral_dense_layer(c: Ctx, P: dict[str, T], x: T, W0: T) -> T:
    """``spectral_dense_linear`` (``path="dense"`` of FourierFT and LoCA).

    Forward: ΔW built as ``delta_weight`` builds it (no grad), ``W' = (W0 + ΔW)`` cast to the
    working dtype, one product ``x W'ᵀ + b`` (the base's own, so part "base").  Backward:
    ``dx = dy W'`` (the base's), and the coefficient gradient from the gathered transforms of
    x and dy: one multiply and one sum over tokens (FourierFT: of the real and imaginary parts,
    then a sign, a subtraction and the scale).
    """
    g, Tn, m, n, e, k = c.g, c.tokens, c.m, c.n, c.eb, c.cfg["n_frequency"]
    fourier = c.method == "fourierft"
    a = P["spectrum"] if fourier else P["coefficients"]
    with g.no_grad():
        dw = (_fourierft_dw if fourier else _loca_dw)(c, P, W0, cast=False)
        Wp = g.cast(g.ew("merge_add", g.cast(W0, c.acc), dw, grads="add"), e)
    bias = c.bias is not None
    fwd = [("linear", 2 * Tn * n * m + (Tn * m if bias else 0),
            e * (Tn * n + m * n + Tn * m + (m if bias else 0)), 2 * Tn * n * m, "base")]
    if fourier:
        def transform(h, v):
            return h.fft("rfft", v, "rfft", v.shape[-1])
        parts = 2  # real and imaginary parts, side by side
    else:
        def transform(h, v):
            return dct_ii(h, v)
        parts = 1
    A = c.acc
    coef = _gathered_transform(c, n, transform) + _gathered_transform(c, m, transform)
    if not fourier:  # ĝ = s · dct(g), scaled before its transposed copy
        coef.insert(len(coef) // 2, ("scale", Tn * m, 2 * A * Tn * m, 0.0, "adapter"))
    coef += [("mul", parts * k * Tn, 3 * A * parts * k * Tn), ("sum", parts * k * Tn, A * parts * (k * Tn + k))]
    if fourier:
        coef += [("mul", k, 3 * A * k), ("sub", k, 3 * A * k), ("scale", k, 2 * A * k)]
    del Wp
    return g.custom("spectral_dense_linear", [x, a], (Tn, m), fwd,
                    {0: [("grad_x", 2 * Tn * m * n, e * (Tn * m + m * n + Tn * n), 2 * Tn * m * n, "base")],
                     1: coef}, eb=e)


def _dense_path(c: Ctx) -> bool:
    """``fused_output`` applies: the layer runs ``path="dense"`` (``"auto"`` resolves per call)."""
    return c.path == "dense"


_register("fourierft", setup=_fourierft_setup, forward=_fourierft_fwd, delta=_fourierft_dw,
          fused=_dense_path, fused_layer=_spectral_dense_layer)


# ----------------------------------------------------------------------------- LoCA
def _loca_setup(c):
    _c_frequency(c, c.m, c.n)
    return dict(coefficients=c.g.param((c.cfg["n_frequency"],)))


def _loca_fwd(c, P, x):
    g = c.g
    z = sparse_spectrum_matmul(g, dct_ii(g, _flat(g, x, c)), g.cast(P["coefficients"], c.acc), c.m)
    return g.cast(g.ew("scale", idct_iii(g, z), grads="linear"), c.eb)


def _loca_dw(c, P, W0, cast=True):
    g = c.g
    values = g.ew("scale", g.cast(P["coefficients"], c.acc), grads="linear")  # the scale on the c values
    F = _dense_spectrum(g, values, (c.m, c.n))
    F = g.view(idct_iii(g, g.view(F, (c.n, c.m))), (c.m, c.n))  # along axis 0 (a moved view)
    dw = idct_iii(g, F)
    return g.cast(dw, c.eb) if cast else dw


_register("loca", setup=_loca_setup, forward=_loca_fwd, delta=_loca_dw, fused=_dense_path,
          fused_layer=_spectral_dense_layer)


# ----------------------------------------------------------------------------- QWHA
def _pow2(k: int) -> int:
    return 1 << (k - 1).bit_length()


def _qwha_sizes(c):
    axes = c.cfg["axes"]
    if axes not in ("both", "input"):
        raise ValueError(f"axes must be 'both' or 'input', got {axes!r}")
    return (_pow2(c.m) if axes == "both" else c.m), _pow2(c.n)


def _qwha_setup(c):
    M, N = _qwha_sizes(c)
    _c_frequency(c, M, N)
    return dict(values=c.g.param((c.cfg["n_frequency"],)))


def _qwha_fwd(c, P, x):
    g = c.g
    M, N = _qwha_sizes(c)
    xf = _flat(g, x, c)
    if N != c.n:
        xf = g.copy("pad", xf, shape=(c.tokens, N))
    z = sparse_spectrum_matmul(g, wht(g, xf, c.tokens, N), g.cast(P["values"], c.acc), M)
    if c.cfg["axes"] == "both":
        z = g.view(wht(g, z, c.tokens, M), (c.tokens, c.m), bwd_kernels=2)
    return g.cast(g.ew("scale", z, grads="linear"), c.eb)


def _qwha_dw(c, P, W0):
    g = c.g
    M, N = _qwha_sizes(c)
    out = wht(g, _dense_spectrum(g, g.cast(P["values"], c.acc), (M, N)), M, N)
    if c.cfg["axes"] == "both":
        out = wht(g, out, N, M)  # along axis 0
    return g.cast(g.ew("scale", g.view(out, (c.m, c.n), bwd_kernels=2), grads="linear"), c.eb)


_register("qwha", setup=_qwha_setup, forward=_qwha_fwd, delta=_qwha_dw)


# ----------------------------------------------------------------------------- DoRA
def _dora_setup(c):
    r, g = c.rank(), c.g
    return dict(A=g.param((r, c.n)), B=g.param((c.m, r)), magnitude=g.param((c.m,)))


def row_norms(g: CostGraph, W0: T, B: T, A: T, eb: float, *, cached_w0_sq: bool = False) -> T:
    """``lowrank_row_norms``: ‖W0 + sBA‖ per row in O(mnr) without the m×n product.

    ``eb`` is the weights' element size.  The working dtype is float32 for 2-byte weights (taken as
    bfloat16) and float64 otherwise; W0 is cast to it in blocks of rows; only float64 weights get
    the dense-refinement test (and its host sync).  ``cached_w0_sq``: ‖w_i‖² comes from DoRA's cache
    (W0 is frozen), not recomputed per call.
    """
    m, n = W0.shape
    r = A.shape[0]
    work = 4.0 if eb == 2 else 8.0
    B, A = g.cast(B, work), g.cast(A, work)
    At = _tr(g, A)
    rows = max(1, _ROW_BLOCK // max(1, n))
    prods, w2_parts = [], []
    for i in range(0, m, rows):
        Wi = g.cast(g.view(W0, (min(rows, m - i), n)), work)
        prods.append(g.mm(Wi, At))
        if not cached_w0_sq:
            w2_parts.append(g.reduce("sum", g.ew("mul", Wi, Wi), (Wi.shape[0],)))
    W0At = g.cat("cat", prods, (m, r)) if len(prods) > 1 else prods[0]
    if cached_w0_sq:
        w2 = g.buffer((m,), eb=work)
    else:
        w2 = g.cat("cat", w2_parts, (m,)) if len(w2_parts) > 1 else w2_parts[0]
    G = g.mm(A, At)
    # add(w2, sum(addmm(W0Aᵀ, B, G, beta=2, alpha=s) * B), alpha=s)
    M = _addmm(g, W0At, B, G)
    sq = g.ew("add", w2, g.reduce("sum", g.ew("mul", M, B), (m,)), grads="add")
    if eb == 8:
        ba2 = g.reduce("sum", g.ew("mul", g.mm(B, G), B), (m,))
        ref = g.ew("scale", g.ew("add", w2, g.ew("scale", ba2, grads="linear"), grads="add"), grads="linear")
        bad = g.ew("lt", sq, ref, grads="none", out_eb=1)
        g.reduce("any", bad, ())
        g.launch("host_sync")  # bool(bad.any())
    # sq.clamp_min(tiny).sqrt() * (sq > 0): a root with derivative 0 at 0
    positive = g.ew("gt", sq, grads="none", out_eb=1)
    root = g.ew("sqrt", g.ew("clamp_min", sq, grads="linear"), grads="linear")
    return g.cast(g.ew("mul", root, positive), max(eb, 4.0))


def _addmm(g: CostGraph, C: T, B: T, G: T) -> T:
    """``torch.addmm(C, B, G, beta, alpha)``: one GEMM with C as its accumulator; backward scales
    the gradient for C and runs one GEMM for each of B and G."""
    (m, r), k = B.shape, G.shape[1]
    f, e = 2.0 * m * r * k, C.eb
    mem = e * (m * r + r * k + 2 * m * k)
    return g.custom("addmm", [C, B, G], (m, k), [("addmm", f + m * k, mem, f)],
                    {0: [("mul", m * k, 2 * e * m * k)], 1: [("mm", f, mem, f)], 2: [("mm", f, mem, f)]}, eb=e)


def _row_scale(c, P, W0):
    """``DoRA.row_scale``: g / max(ν, eps), the norm ν detached when ``detach_norm``."""
    g = c.g
    if c.cfg["detach_norm"]:
        with g.no_grad():
            nu = row_norms(g, W0, P["B"], P["A"], c.eb, cached_w0_sq=True)
    else:
        nu = row_norms(g, W0, P["B"], P["A"], c.eb, cached_w0_sq=True)
    return g.ew("div", g.cast(P["magnitude"], nu.eb), g.ew("clamp_min", nu, grads="linear"))


def _dora_layer(c, P, x, base_out, W0):
    g = c.g
    scale = _row_scale(c, P, W0)
    pre = base_out if c.bias is None else g.ew("sub", base_out, c.bias, grads="sub")
    pre = g.ew("add", pre, g.cast(_lowrank(c, x, P["A"], P["B"]), c.eb), grads="add")
    out = g.ew("mul", g.cast(scale, c.eb), pre)
    return out if c.bias is None else g.ew("add", out, c.bias, grads="add")


def _dora_dw(c, P, W0):
    g = c.g
    scale = _row_scale(c, P, W0)
    Wa = g.cast(W0, c.acc)
    V = g.ew("add", Wa, _scale_mm(g, g.cast(P["B"], c.acc), g.cast(P["A"], c.acc)), grads="add")
    out = g.ew("sub", g.ew("mul", g.view(scale, (c.m, 1)), V), Wa, grads="sub")
    return g.cast(out, c.eb)


def _scale_mm(g, a, b):
    return g.ew("scale", g.mm(a, b), grads="linear")


def _dora_fused_layer(c, P, x, W0):
    """``DoRA.fused_output``: c ⊙ lora_linear(x) (``addcmul`` with the bias when there is one)."""
    g = c.g
    z = lora_linear(c, x, W0, P["A"], P["B"])
    scale = g.cast(_row_scale(c, P, W0), c.eb)
    if c.bias is None:
        return g.ew("mul", z, scale)
    return g.ew("addcmul", c.bias, z, scale, flops=2.0)


_register("dora", setup=_dora_setup, layer=_dora_layer, delta=_dora_dw, fused=lambda c: c.path == "structured",
          fused_layer=_dora_fused_layer)


# ----------------------------------------------------------------------------- SSF
def _ssf_setup(c):
    return dict(gamma=c.g.param((c.m,)), beta=c.g.param((c.m,)))


_register("ssf", setup=_ssf_setup,
          layer=lambda c, P, x, base_out, W0: c.g.ew("add", c.g.ew("mul", base_out, P["gamma"]), P["beta"],
                                                       grads="add"),
          delta=lambda c, P, W0: c.g.ew("mul", c.g.view(c.g.ew("sub1", P["gamma"], grads="linear"), (c.m, 1)), W0))


# ----------------------------------------------------------------------------- HUT
def _hut_setup(c):
    r, g = c.rank(), c.g
    return dict(B=g.param((c.m, r)), A=g.param((r, c.n)))


def _hadamard_term(c, P, x, W0):
    """``HUT.apply_transformed``: x (W0 ⊙ BA)ᵀ, dense or through r products with W0 (HUT and HiRA)."""
    g, r = c.g, P["A"].shape[0]
    if c.path == "dense":
        return g.mm(x, _tr(g, g.ew("mul", W0, g.mm(P["B"], P["A"]))))
    xa = g.ew("mul", g.view(x, (c.tokens, 1, c.n)), P["A"])  # (T, r, n)
    z = g.view(g.mm(g.view(xa, (c.tokens * r, c.n)), _tr(g, W0)), (c.tokens, r, c.m))
    return g.reduce("sum", g.ew("mul", z, _tr(g, P["B"])), (c.tokens, c.m))


def _hut_layer(c, P, x, base_out, W0):
    """``apply_transformed``: the frozen output is recomputed (and ``base_out`` dropped)."""
    y = _hadamard_term(c, P, x, W0)
    return y if c.bias is None else c.g.ew("add", y, c.bias, grads="add")


_register("hut", setup=_hut_setup, layer=_hut_layer,
          delta=lambda c, P, W0: c.g.ew("mul", W0, c.g.ew("sub1", c.g.mm(P["B"], P["A"]), grads="linear")))

# HiRA (adapters.hira): the Hadamard term added to the frozen output, ΔW = W0 ⊙ BA
_register("hira", setup=_hut_setup,
          layer=lambda c, P, x, base_out, W0: c.g.ew("add", base_out, _hadamard_term(c, P, x, W0), grads="add"),
          delta=lambda c, P, W0: c.g.ew("mul", W0, c.g.mm(P["B"], P["A"])))
