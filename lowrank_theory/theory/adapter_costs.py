r"""Every registered adapter's forward pass, written op by op on a :class:`~.cost_graph.CostGraph`.

Each entry transcribes the code of one adapter (``lowrank_theory/adapters/*.py``): the same
products in the same order and shapes, the same element-wise ops, casts, gathers, FFTs and
Walsh–Hadamard blocks, on symbolic tensors.  Three pieces per method:

* ``setup`` -- the tensors the module holds (parameters require grad, buffers do not), with the
  shapes the constructor gives them for ``(d_out, d_in, **cfg)``;
* ``forward`` (additive methods) -- ``x ΔWᵀ`` through the structure; the layer adds it to the
  frozen output, or ``layer`` (DoRA, SSF, HUT, TLoRA, FLoRA-conv) -- the adapted layer's output
  from the frozen one, as ``Adapter.layer_output`` computes it;
* ``delta`` -- the dense ΔW as ``delta_weight`` builds it (the *dense path* applies it with one
  product every call; merging builds it once).

Shapes follow the constructors; where an adapter exposes its shape rule as a function
(``TLoRA._core_shapes``, ``sparse_support_size``, the WHT's block split) the model calls it, so
a change there moves the model with it.  The tests compare the matrix-product FLOPs of every
entry with ``torch.utils.flop_counter.FlopCounterMode`` on the real forward and backward, and
the trainable sizes with ``num_trainable``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..adapters import get as get_adapter
from ..adapters.sara import sara_support_size
from ..adapters.sparse import sparse_support_size
from ..adapters.tensor import TLoRA
from .cost_graph import CostGraph, T

__all__ = ["MODELS", "Ctx", "conv_layout", "resolve_config"]


@dataclass
class Ctx:
    """What a method's model needs: the graph, sizes, element sizes and the resolved config."""

    g: CostGraph
    method: str
    m: int  # d_out
    n: int  # d_in
    tokens: int
    eb: float  # working dtype's bytes per element
    cfg: dict[str, Any]
    path: str = "structured"
    bias: T | None = None  # the frozen bias, when the base layer has one

    @property
    def acc(self) -> float:
        """Bytes of the accumulation dtype (float32 or better) used by transforms and norms."""
        return max(self.eb, 4.0)

    def int(self, key: str, lo: int = 1, hi: int | None = None) -> int:
        v = self.cfg[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{key} must be an int, got {type(v).__name__}")
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"{key} must satisfy {lo} <= {key} <= {hi if hi is not None else 'inf'}, got {v}")
        return v

    def rank(self, key: str = "rank", lo: int = 1) -> int:
        return self.int(key, lo, min(self.m, self.n))


@dataclass(frozen=True)
class Model:
    setup: Callable[[Ctx], dict[str, T]]
    forward: Callable[[Ctx, dict[str, T], T], T] | None = None
    layer: Callable[[Ctx, dict[str, T], T, T, T], T] | None = None
    delta: Callable[[Ctx, dict[str, T], T], T] | None = None
    extra_keys: tuple[str, ...] = ()
    #: the whole layer in one fused node (``Adapter.fused_output``), when ``fused(c)`` says it applies
    fused: Callable[[Ctx], bool] | None = None
    fused_layer: Callable[[Ctx, dict[str, T], T, T], T] | None = None


MODELS: dict[str, Model] = {}


def resolve_config(method: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` completed with the constructor's defaults; unknown keys are a ``ValueError``."""
    cls = get_adapter(method)
    sig = inspect.signature(cls.__init__)
    known = {k: p.default for k, p in sig.parameters.items() if k not in ("self", "d_out", "d_in")}
    extra = MODELS[method].extra_keys
    bad = sorted(set(cfg) - set(known) - set(extra))
    if bad:
        raise ValueError(f"unknown config key(s) {bad} for {method!r}; known: {sorted(set(known) | set(extra))}")
    out = {k: v for k, v in known.items() if v is not inspect.Parameter.empty}
    out.update(cfg)
    return out


# ----------------------------------------------------------------------------- shared pieces
def _tr(g: CostGraph, a: T) -> T:
    return g.view(a, a.shape[::-1])


def _scale(g: CostGraph, y: T) -> T:
    return g.ew("scale", y, grads="linear")


def _drop(c: Ctx, x: T) -> T:
    p = c.cfg.get("dropout", 0.0) or 0.0
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    # native_dropout: one kernel writing the output and a 1-byte mask; backward multiplies by it
    return c.g.ew("dropout", x, grads="linear", flops=2.0) if p > 0 else x


def _lowrank(c: Ctx, x: T, A: T, B: T, gate: T | None = None, *, scale: bool = True) -> T:
    """``s · ((x Aᵀ) [⊙ gate]) Bᵀ`` -- LoRA's forward and its gated variants."""
    g = c.g
    h = g.mm(_drop(c, x), _tr(g, A))
    if gate is not None:
        h = g.ew("mul", h, gate)
    y = g.mm(h, _tr(g, B))
    return _scale(g, y) if scale else y


def _ab(c: Ctx, r: int | None = None, rows_a: int | None = None) -> dict[str, T]:
    r = c.rank() if r is None else r
    return dict(A=c.g.param((r if rows_a is None else rows_a, c.n), name="A"), B=c.g.param((c.m, r), name="B"))


def _register(names: str, **kw: Any) -> None:
    for name in names.split():
        MODELS[name] = Model(**kw)


def lora_linear(c: Ctx, x: T, W0: T, A: T, B: T) -> T:
    """``adapters.fused.lora_linear``: x Aᵀ, the base GEMM, the rank-r term added in place (``addmm_``).

    Its hand-written backward: ``g B`` once, then ``dx = g W0 + s (g B) A`` (in place),
    ``dA = s (g B)ᵀ x`` and ``dB = s gᵀ (x Aᵀ)``, each product followed by its scale.
    """
    e, Tn, n, m, r = c.eb, c.tokens, c.n, c.m, A.shape[0]
    bias = c.bias is not None
    base = ("base_linear", 2 * Tn * n * m + (Tn * m if bias else 0), e * (Tn * n + m * n + Tn * m + (m if bias else 0)),
            2 * Tn * n * m, "base")
    fwd = [("mm_xa", 2 * Tn * n * r, e * (Tn * n + r * n + Tn * r), 2 * Tn * n * r), base,
           ("addmm_", 2 * Tn * r * m + Tn * m, e * (Tn * r + r * m + 2 * Tn * m), 2 * Tn * r * m)]
    bwd = {"shared": [("grad_y_B", 2 * Tn * m * r, e * (Tn * m + m * r + Tn * r), 2 * Tn * m * r)],
           0: [("grad_x_base", 2 * Tn * m * n, e * (Tn * m + m * n + Tn * n), 2 * Tn * m * n, "base"),
               ("grad_x_addmm_", 2 * Tn * r * n + Tn * n, e * (Tn * r + r * n + 2 * Tn * n), 2 * Tn * r * n)],
           1: [("grad_A", 2 * r * Tn * n, e * (Tn * r + Tn * n + r * n), 2 * r * Tn * n),
               ("grad_A_scale", r * n, 2 * e * r * n)],
           2: [("grad_B", 2 * m * Tn * r, e * (Tn * m + Tn * r + m * r), 2 * m * Tn * r),
               ("grad_B_scale", m * r, 2 * e * m * r)]}
    del W0
    return c.g.custom("lora_linear", [x, A, B], (Tn, m), fwd, bwd, eb=e)


# ----------------------------------------------------------------------------- LoRA family
def _lora_dw(c, P, W0):
    return _scale(c.g, c.g.mm(P["B"], P["A"]))


def _lora_fused(c: Ctx) -> bool:
    """``LoRA.fused_output`` applies: the class keeps LoRA's forward and dropout is off (training mode)."""
    from ..adapters.lowrank import LoRA

    return (c.path == "structured" and get_adapter(c.method).forward is LoRA.forward
            and not (c.cfg.get("dropout") or 0.0) > 0)


_register("lora pissa milora lq_lora", setup=_ab, forward=lambda c, P, x: _lowrank(c, x, P["A"], P["B"]),
          delta=_lora_dw, fused=_lora_fused, fused_layer=lambda c, P, x, W0: lora_linear(c, x, W0, P["A"], P["B"]))


def _gated_setup(gate: str, a: str = "A", b: str = "B"):
    def setup(c):
        r = c.rank(lo=0)
        g = c.g
        return {a: g.param((r, c.n)), gate: g.param((r,)), b: g.param((c.m, r))}
    return setup


def _gated(gate: str, a: str = "A", b: str = "B"):
    def fwd(c, P, x):
        return _lowrank(c, x, P[a], P[b], P[gate])

    def dw(c, P, W0):
        return _scale(c.g, c.g.mm(c.g.ew("mul", P[b], P[gate]), P[a]))
    return dict(setup=_gated_setup(gate, a, b), forward=fwd, delta=dw)


_register("adalora", **_gated("lam", "Q", "P"))
_register("sora codyra", **_gated("gate"))
_register("s2_lora", **_gated("coef"))


def _triadapt_setup(c):
    """``TriAdaptLoRA``: A (r, n), B (m, r) and the packed block-triangular L, U, (r² + Σ b²)/2 entries each."""
    r = c.rank()
    blocks = c.cfg.get("blocks") or (r,)
    blocks = (blocks,) if isinstance(blocks, int) else tuple(blocks)
    packed = (r * r + sum(b * b for b in blocks)) // 2
    g = c.g
    return dict(A=g.param((r, c.n), name="A"), B=g.param((c.m, r), name="B"), L=g.param((packed,), name="L"),
                U=g.param((packed,), name="U"))


def _triadapt_core(c, P):
    """``TriAdaptLoRA.core``: each packed half scatter-added in place into its own r² zeros, summed, viewed."""
    g, r = c.g, P["A"].shape[0]
    n = P["L"].shape[0]
    low = g.index_add(g.view(P["L"], (1, n)), r * r, "core_L", inplace=True)
    up = g.index_add(g.view(P["U"], (1, n)), r * r, "core_U", inplace=True)
    return g.view(g.ew("add", low, up, grads="add"), (r, r))


def _triadapt_fwd(c, P, x):
    g = c.g
    C = _triadapt_core(c, P)
    h = g.mm(g.mm(_drop(c, x), _tr(g, P["A"])), _tr(g, C))
    return _scale(g, g.mm(h, _tr(g, P["B"])))


def _triadapt_dw(c, P, W0):
    g = c.g
    return _scale(g, g.mm(P["B"], g.mm(_triadapt_core(c, P), P["A"])))


_register("triadaptlora", setup=_triadapt_setup, forward=_triadapt_fwd, delta=_triadapt_dw)


def _block_setup(c):
    r, k = c.rank(), c.int("num_blocks")
    if r % k:
        raise ValueError(f"num_blocks must divide rank, got rank={r}, num_blocks={k}")
    return _ab(c, r, rows_a=r // k)


def _summed_b(c, P):
    B = P["B"]
    k = c.cfg["num_blocks"]
    return c.g.reduce("sum_blocks", c.g.view(B, (c.m, k, B.shape[1] // k)), (c.m, B.shape[1] // k))


_register("block_lora", setup=_block_setup,
          forward=lambda c, P, x: _lowrank(c, x, P["A"], _summed_b(c, P)),
          delta=lambda c, P, W0: _scale(c.g, c.g.mm(_summed_b(c, P), P["A"])))


def _comp_setup(c):
    basis = c.cfg.get("basis")
    k = int(basis.shape[1]) if basis is not None else c.cfg.get("k", 0)
    r = c.rank()
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or k + r > c.m:
        raise ValueError(f"k must be an int with 0 <= k and k + rank <= d_out={c.m}, got k={k}, rank={r}")
    P = _ab(c, r)
    P["U"] = c.g.buffer((c.m, k), name="U")
    return P


def _projected_b(c, P):
    g = c.g
    return g.ew("sub", P["B"], g.mm(P["U"], g.mm(_tr(g, P["U"]), P["B"])), grads="sub")


_register("comp_lora", setup=_comp_setup, extra_keys=("k",),
          forward=lambda c, P, x: _lowrank(c, x, P["A"], _projected_b(c, P)),
          delta=lambda c, P, W0: _scale(c.g, c.g.mm(_projected_b(c, P), P["A"])))


# ----------------------------------------------------------------------------- SVD / LDU frames
def _frames_setup(gate: str, a: str, b: str, core_square: bool = False):
    def setup(c):
        r, g = c.rank(), c.g
        P = {a: g.buffer((r, c.n)), b: g.buffer((c.m, r))}
        P[gate] = g.param((r, r) if core_square else (r,))
        return P
    return setup


def _loldu_setup(c):
    P = _frames_setup("z", "U", "PL")(c)
    P["sigma"] = c.g.param(())
    return P


_register("loldu", setup=_loldu_setup,
          forward=lambda c, P, x: c.g.ew("mul", P["sigma"], _lowrank(c, x, P["U"], P["PL"], P["z"], scale=False)),
          delta=lambda c, P, W0: c.g.ew("mul", P["sigma"], c.g.mm(c.g.ew("mul", P["PL"], P["z"]), P["U"])))
_register("svfit", setup=_frames_setup("delta", "Vh", "U"),
          forward=lambda c, P, x: _lowrank(c, x, P["Vh"], P["U"], P["delta"], scale=False),
          delta=lambda c, P, W0: c.g.mm(c.g.ew("mul", P["U"], P["delta"]), P["Vh"]))


def _xs_fwd(c, P, x):
    g = c.g
    return _scale(g, g.mm(g.mm(g.mm(x, _tr(g, P["A"])), _tr(g, P["R"])), _tr(g, P["B"])))


_register("lora_xs lora_sb", setup=_frames_setup("R", "A", "B", core_square=True), forward=_xs_fwd,
          delta=lambda c, P, W0: _scale(c.g, c.g.mm(c.g.mm(P["B"], P["R"]), P["A"])))


# ----------------------------------------------------------------------------- random bases
def _vera_setup(c):
    r, g = c.int("rank"), c.g
    return dict(vera_A=g.buffer((r, c.n)), d=g.param((r,)), vera_B=g.buffer((c.m, r)), b=g.param((c.m,)))


def _vera_dw(c, P, W0):
    g = c.g
    left = g.ew("mul", g.view(P["b"], (c.m, 1)), P["vera_B"])
    right = g.ew("mul", g.view(P["d"], (P["d"].shape[0], 1)), P["vera_A"])
    return g.mm(left, right)


_register("vera", setup=_vera_setup, delta=_vera_dw,
          forward=lambda c, P, x: c.g.ew("mul", _lowrank(c, x, P["vera_A"], P["vera_B"], P["d"], scale=False),
                                         P["b"]))


def _nola_setup(c):
    r, k, l_, g = c.rank(), c.int("num_basis_a"), c.int("num_basis_b"), c.g
    return dict(alpha=g.param((k,)), beta=g.param((l_,)), bases_a=g.buffer((k, r, c.n)),
                bases_b=g.buffer((l_, c.m, r)), a0=g.buffer((r, c.n)))


def _nola_factors(c, P):
    g, r = c.g, P["a0"].shape[0]
    k, l_ = P["alpha"].shape[0], P["beta"].shape[0]
    combo_a = g.mm(g.view(P["alpha"], (1, k)), g.view(P["bases_a"], (k, r * c.n)))
    A = g.ew("add", P["a0"], g.view(combo_a, (r, c.n)), grads="add")
    B = g.view(g.mm(g.view(P["beta"], (1, l_)), g.view(P["bases_b"], (l_, c.m * r))), (c.m, r))
    return B, A


def _nola_fwd(c, P, x):
    B, A = _nola_factors(c, P)
    return _lowrank(c, x, A, B)


def _nola_dw(c, P, W0):
    B, A = _nola_factors(c, P)
    return _scale(c.g, c.g.mm(B, A))


_register("nola", setup=_nola_setup, forward=_nola_fwd, delta=_nola_dw)


def _unilora_setup(c):
    r, d, g = c.rank(), c.int("d"), c.g
    D = r * (c.m + c.n)
    if d > D:
        raise ValueError(f"d must be at most D = rank*(d_in+d_out) = {D} for a single layer, got {d}")
    return dict(theta_d=g.param((d,)), indices=g.buffer((D,), eb=g.INDEX_BYTES), values=g.buffer((D,)))


def _unilora_factors(c, P):
    g, th = c.g, P["theta_d"]
    D = P["indices"].shape[0]
    r = D // (c.m + c.n)
    # theta_d[idx]: a gather; its backward is zeros(d) then index_put_ with accumulate
    picked = g.custom("index", [th], (D,), [("index", 0.0, 2 * th.eb * D + g.INDEX_BYTES * D)],
                      {0: [("index_grad_zeros", 0.0, th.nbytes),
                           ("index_put_accumulate", D, 3 * th.eb * D + g.INDEX_BYTES * D)]}, eb=th.eb)
    theta = g.ew("mul", picked, P["values"])
    rn = r * c.n
    # theta[rn:] and theta[:rn] are slices: each backward is zeros + a copy into the slice
    return g.view(theta, (c.m, r), bwd_kernels=2), g.view(theta, (r, c.n), bwd_kernels=2), rn


def _unilora_fwd(c, P, x):
    B, A, _ = _unilora_factors(c, P)
    return _lowrank(c, x, A, B)


def _unilora_dw(c, P, W0):
    B, A, _ = _unilora_factors(c, P)
    return _scale(c.g, c.g.mm(B, A))


_register("unilora", setup=_unilora_setup, forward=_unilora_fwd, delta=_unilora_dw)


def _randlora_setup(c):
    r, g = c.rank(), c.g
    p, q = min(c.m, c.n), max(c.m, c.n)
    N = -(-p // r)
    shared = c.cfg.get("shared_a", True)
    return dict(randlora_A=g.buffer((1 if shared else N, r, p)), randlora_B=g.buffer((q, N, r)),
                lam=g.param((N, r)), gamma=g.param((N, p)))


def _randlora_bases(c, P):
    g = c.g
    N, r = P["lam"].shape
    p, q = P["gamma"].shape[1], P["randlora_B"].shape[0]
    # random_basis._ScaledBasis: λ A γ by two multiplies, saving only λ, A, γ; its backward forms g A once,
    # then each gradient by one multiply and one reduction
    n, e = N * r * p, c.eb
    lam_b, a_b, gam_b = P["lam"].nbytes, P["randlora_A"].nbytes, P["gamma"].nbytes
    a = g.custom("scaled_basis", [P["lam"], P["randlora_A"], P["gamma"]], (N, r, p),
                 [("mul", n, lam_b + a_b + e * n), ("mul", n, 2 * e * n + gam_b)],
                 {"shared": [("mul_gA", n, 2 * e * n + a_b)],
                  0: [("mul_lam", n, 2 * e * n + gam_b), ("sum_lam", n, e * n + lam_b)],
                  2: [("mul_gamma", n, 2 * e * n + lam_b), ("sum_gamma", n, e * n + gam_b)]})
    return g.view(P["randlora_B"], (q, N * r)), g.view(a, (N * r, p))


def _randlora_fwd(c, P, x):
    g = c.g
    b_cat, a_tilde = _randlora_bases(c, P)
    x = _drop(c, x)
    if c.m < c.n:  # transposed: ΔW = ã^T b_catᵀ
        return _scale(g, g.mm(g.mm(x, b_cat), a_tilde))
    return _scale(g, g.mm(g.mm(x, _tr(g, a_tilde)), _tr(g, b_cat)))


def _randlora_dw(c, P, W0):
    b_cat, a_tilde = _randlora_bases(c, P)
    M = _scale(c.g, c.g.mm(b_cat, a_tilde))
    return _tr(c.g, M) if c.m < c.n else M


_register("randlora", setup=_randlora_setup, forward=_randlora_fwd, delta=_randlora_dw)


# ----------------------------------------------------------------------------- sparse / quantized
def _entries_matmul(c, x, values):
    """``adapters.sparse.sparse_entries_matmul``: gather k columns of x, scale, scatter-add into fresh zeros."""
    g = c.g
    return g.index_add(g.ew("mul", g.index_select(x, values.shape[0]), values), c.m, inplace=True)


def _entries_dense(c, values):
    """``adapters.sparse.sparse_entries_dense``: rows * d_in + cols on int64, one scatter-add into (m n) zeros."""
    g = c.g
    for name in ("flat_index_mul", "flat_index_add"):
        g.launch(name)
    S = g.index_add(g.view(values, (1, values.shape[0])), c.m * c.n, "sparse_dense", inplace=True)
    return g.view(S, (c.m, c.n))


def _sltrain_setup(c):
    P = _ab(c)
    nnz = sparse_support_size(c.m, c.n, float(c.cfg["density"]))
    if nnz < 1:
        raise ValueError(f"density={c.cfg['density']} gives no sparse entries for a {c.m}x{c.n} weight")
    P["values"] = c.g.param((nnz,))
    return P


def _sltrain_fwd(c, P, x):
    g = c.g
    low = _lowrank(c, x, P["A"], P["B"])
    return g.ew("add", low, _entries_matmul(c, x, P["values"]), grads="add")


def _sltrain_dw(c, P, W0):
    return c.g.ew("add", _lora_dw(c, P, W0), _entries_dense(c, P["values"]), grads="add")


_register("sltrain", setup=_sltrain_setup, forward=_sltrain_fwd, delta=_sltrain_dw)


def _sara_setup(c):
    k = sara_support_size(c.m, c.n, float(c.cfg["fraction"]))
    if k < 1:
        raise ValueError(f"fraction={c.cfg['fraction']} gives no trainable entry for a {c.m}x{c.n} weight")
    return {"values": c.g.param((k,))}


_register("sara", setup=_sara_setup, forward=lambda c, P, x: _entries_matmul(c, x, P["values"]),
          delta=lambda c, P, W0: _entries_dense(c, P["values"]))


# ----------------------------------------------------------------------------- tensor formats
def _flora_ranks(c, dims):
    ranks = c.cfg["ranks"]
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = tuple(min(ranks, d) for d in dims)
    if len(ranks) != len(dims) or any(not 1 <= int(r) <= d for r, d in zip(ranks, dims)):
        raise ValueError(f"ranks must be an int or {len(dims)} ints with 1 <= ranks[i] <= {dims}, got {ranks!r}")
    return tuple(int(r) for r in ranks)


def _flora_setup(c):
    r1, r2 = _flora_ranks(c, (c.m, c.n))
    g = c.g
    return dict(core=g.param((r1, r2)), U1=g.param((c.m, r1)), U2=g.param((c.n, r2)))


def _flora_fwd(c, P, x):
    g = c.g
    return _scale(g, g.mm(g.mm(g.mm(x, P["U2"]), _tr(g, P["core"])), _tr(g, P["U1"])))


def _assert_finite(g: CostGraph, t: T) -> None:
    """``linalg``'s finite check of an input: abs, ne, eq, mul, all, then one host sync."""
    with g.no_grad():
        a = g.ew("abs", t, grads="none")
        ok = g.ew("mul", g.ew("ne", a, grads="none", out_eb=1), g.ew("eq", t, a, grads="none", out_eb=1),
                  grads="none", out_eb=1)
        g.reduce("all", ok, ())
    g.launch("host_sync")


def _flora_dw(c, P, W0):
    g = c.g  # tucker_to_tensor: checks its inputs, then core ×_0 U1, then ×_1 U2 (tensordot, then moveaxis)
    for t in (P["core"], P["U1"], P["U2"]):
        _assert_finite(g, t)
    first = g.mm(P["U1"], P["core"])  # (m, r2)
    full = _tr(g, g.mm(P["U2"], _tr(g, first)))  # (n, m) -> (m, n)
    return _scale(g, full)


_register("flora", setup=_flora_setup, forward=_flora_fwd, delta=_flora_dw)


def conv_layout(tokens: int) -> tuple[int, int]:
    """(H, W) of the one image whose H·W = ``tokens`` pixels, W the largest divisor <= √tokens."""
    w = max(d for d in range(1, math.isqrt(tokens) + 1) if tokens % d == 0)
    return tokens // w, w


def _kernel_size(c):
    k = c.cfg["kernel_size"]
    kh, kw = (k, k) if isinstance(k, int) else tuple(k)
    return int(kh), int(kw)


def _flora_conv_setup(c):
    kh, kw = _kernel_size(c)
    ro, ri, rh, rw = _flora_ranks(c, (c.m, c.n, kh, kw))
    g = c.g
    return dict(core=g.param((ro, ri, rh, rw)), U_out=g.param((c.m, ro)), U_in=g.param((c.n, ri)),
                U_h=g.param((kh, rh)), U_w=g.param((kw, rw)))


def _flora_conv_core(c, P):
    g = c.g  # einsum("pqcd,ac,bd->pqab"), contracted left to right (no opt_einsum)
    ro, ri, rh, rw = P["core"].shape
    kh, kw = P["U_h"].shape[0], P["U_w"].shape[0]
    t = g.mm(g.view(P["core"], (ro, ri, rw, rh)), _tr(g, P["U_h"]))  # contract c: (p,q,d,a)
    t = g.copy("einsum_permute", t, shape=(ro, ri, kh, rw))
    return g.view(g.mm(t, _tr(g, P["U_w"])), (ro, ri, kh, kw))  # contract d: (p,q,a,b)


def _flora_conv_layer(c, P, x, base_out, W0):
    g = c.g
    H, W = x.shape[2:]
    core = _flora_conv_core(c, P)
    z = g.conv2d(x, g.view(_tr(g, P["U_in"]), (P["U_in"].shape[1], c.n, 1, 1)), (H, W))
    z = g.conv2d(z, core, (H, W))
    y = g.conv2d(z, g.view(P["U_out"], (c.m, P["U_out"].shape[1], 1, 1)), (H, W))
    return g.ew("add", base_out, _scale(g, y), grads="add")


def _flora_conv_dw(c, P, W0):
    g = c.g  # tucker_to_tensor over four modes: one tensordot each, the moved mode copied to the front
    ro, ri, rh, rw = P["core"].shape
    kh, kw = P["U_h"].shape[0], P["U_w"].shape[0]
    for name in ("core", "U_out", "U_in", "U_h", "U_w"):
        _assert_finite(g, P[name])
    t = g.mm(P["U_out"], g.view(P["core"], (ro, ri * rh * rw)))
    t = g.mm(P["U_in"], g.view(g.copy("tensordot_permute", t), (ri, c.m * rh * rw)))
    t = g.mm(P["U_h"], g.view(g.copy("tensordot_permute", t), (rh, c.m * c.n * rw)))
    t = g.mm(P["U_w"], g.view(g.copy("tensordot_permute", t), (rw, c.m * c.n * kh)))
    return _scale(g, g.view(t, (c.m, c.n, kh, kw)))


_register("flora_conv2d", setup=_flora_conv_setup, layer=_flora_conv_layer, delta=_flora_conv_dw)


def _tlora_setup(c):
    shapes_t, shapes_r = TLoRA._core_shapes(c.m, c.n, c.cfg["transform_rank"], c.cfg["residual_rank"],
                                            c.cfg["n_cores"])
    g = c.g
    return dict(transform=[g.param(s) for s in shapes_t], residual=[g.param(s) for s in shapes_r])


def _tt_apply(g: CostGraph, cores: list[T], x: T) -> T:
    """``tt_apply``: one einsum ``prbq,rabs->pasq`` per core (permute copies, one product)."""
    lead, n = x.shape[:-1], x.shape[-1]
    P_, rest = math.prod(lead), n
    t = g.view(x, (P_, 1, n))
    for G in cores:
        r, a, b, s = G.shape
        q = rest // b
        if q > 1 and r * b > 1:
            t = g.copy("einsum_permute", t)
        if a > 1 and b > 1:
            G = g.copy("einsum_permute", G)
        out = g.mm(g.view(t, (P_ * q, r * b)), g.view(G, (r * b, a * s)))
        if q > 1 and a * s > 1:
            out = g.copy("einsum_permute", out)
        t = g.view(out, (P_ * a, s, q))
        P_, rest = P_ * a, q
    return g.view(t, (*lead, math.prod(G.shape[1] for G in cores)))


def _tlora_layer(c, P, x, base_out, W0):
    g = c.g
    W0x = base_out if c.bias is None else g.ew("sub", base_out, c.bias, grads="sub")
    extra = g.ew("add", _tt_apply(g, P["transform"], W0x), _tt_apply(g, P["residual"], x), grads="add")
    return g.ew("add", base_out, extra, grads="add")


def _tt_dense(g, cores):
    _, A, B, r = cores[0].shape
    M = g.view(cores[0], (A, B, r))
    for G in cores[1:]:
        _, a, b, s = G.shape
        out = g.mm(g.view(M, (A * B, r)), g.view(G, (r, a * b * s)))
        M = g.copy("einsum_permute", out, shape=(A * a, B * b, s)) if (B > 1 and a > 1) else g.view(
            out, (A * a, B * b, s))
        A, B = A * a, B * b
    return g.view(M, (A, B))


def _tlora_dw(c, P, W0):
    g = c.g
    return g.ew("add", g.mm(_tt_dense(g, P["transform"]), W0), _tt_dense(g, P["residual"]), grads="add")


_register("tlora", setup=_tlora_setup, layer=_tlora_layer, delta=_tlora_dw)

# the transform-domain methods and the multiplicative ones (DoRA, SSF, HUT) register themselves there
from . import adapter_costs_sparse as _sparse  # noqa: E402,F401
from . import adapter_costs_transform as _transform  # noqa: E402,F401
