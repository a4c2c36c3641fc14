r"""Cost models of the codebook, given-support and kernelized-sparse adapters (SketchTune, SPT's sparse part,
SNELLA), registered into :data:`~lowrank_theory.theory.adapter_costs.MODELS` on import.

Each model lists the kernels the adapter's forward runs, in order, with the derivative kernels autograd runs
for them (checked against the dispatched ops and ``FlopCounterMode`` by ``tests/theory/test_complexity.py``).
"""

from __future__ import annotations

import math

from ..adapters.sparse_support import dense_is_cheaper
from .adapter_costs import _entries_dense, _entries_matmul, _register, _tr
from .cost_graph import CostGraph

__all__: list[str] = []

_IDX = CostGraph.INDEX_BYTES


# ----------------------------------------------------------------------------- sparse_delta
def _sparse_setup(c):
    idx = c.cfg.get("indices")
    nnz = c.m * c.n if idx is None else int(idx.numel())
    return {"values": c.g.param((nnz,), name="values")}


def _sparse_fwd(c, P, x):
    g = c.g
    nnz = P["values"].shape[0]
    if dense_is_cheaper(nnz, c.m, c.n):  # x @ delta_weight().to(x.dtype).T
        return g.mm(x, _tr(g, g.cast(_sparse_dw(c, P, None), c.eb)))
    return _entries_matmul(c, x, P["values"])


def _sparse_dw(c, P, W0):
    return _entries_dense(c, P["values"])


_register("sparse_delta", setup=_sparse_setup, forward=_sparse_fwd, delta=_sparse_dw)


# ----------------------------------------------------------------------------- sketchtune
def _sketch_setup(c):
    G, K = c.int("groups", 1, c.n), 2 ** c.int("bits", 1, 8)
    g = c.g
    return {"S": g.param((c.m, G, K), name="codebook"), "S0": g.buffer((c.m, G, K), name="codebook0")}


def _flat_index(g):
    for name in ("index_mul", "codes_to_long", "index_add"):  # col_group * K + codes.long()
        g.launch(name)


def _sketch_delta_codebook(c, P):
    return c.g.ew("sub", P["S"], P["S0"], grads="sub")


def _sketch_fwd(c, P, x):
    """``_SketchMatmul``: forward gathers Ŵ (m n) and multiplies; backward scatter-adds gᵀx, re-gathers for dx."""
    g = c.g
    D = _sketch_delta_codebook(c, P)
    _flat_index(g)
    e, T, n, m = c.eb, c.tokens, c.n, c.m
    cb = D.nbytes
    gather = ("gather", 0.0, cb + _IDX * m * n + e * m * n)
    mm = ("mm", 2 * T * n * m, e * (T * n + m * n + T * m), 2 * T * n * m)
    small = [(k, 0.0, 0.0) for k in ("index_mul", "codes_to_long", "index_add")]
    bwd = {0: [*small, gather, ("mm_grad_x", 2 * T * m * n, e * (T * m + m * n + T * n), 2 * T * m * n)],
           1: [("mm_grad_w", 2 * m * T * n, e * (T * m + T * n + m * n), 2 * m * T * n), ("zeros", 0.0, cb), *small,
               ("scatter_add_", m * n, e * m * n + _IDX * m * n + 2 * cb)]}
    return g.custom("sketch_matmul", [x, D], (T, m), [gather, mm], bwd)


def _sketch_dw(c, P, W0):
    g = c.g
    D = _sketch_delta_codebook(c, P)
    _flat_index(g)
    m, n, e = c.m, c.n, c.eb
    return g.custom("gather", [D], (m, n), [("gather", 0.0, D.nbytes + (_IDX + e) * m * n)],
                    {0: [("gather_grad_zeros", 0.0, D.nbytes), ("gather_grad_scatter_add", m * n,
                                                                 (e + _IDX) * m * n + 2 * D.nbytes)]})


_register("sketchtune", setup=_sketch_setup, forward=_sketch_fwd, delta=_sketch_dw)


# ----------------------------------------------------------------------------- snella
def _snella_setup(c):
    r, H = c.rank(), c.int("heads")
    if r % H:
        raise ValueError(f"rank must be a multiple of heads={H}, got rank={r}")
    g = c.g
    P = {"A": g.param((H, c.n, r // H), name="A"), "B": g.param((H, c.m, r // H), name="B")}
    if c.cfg.get("kernel", "mixed") == "mixed":
        P.update(a=g.param((), name="a"), gamma=g.param((), name="gamma"), b=g.param((), name="b"))
    return P


def _factor_tail(which: str, size: int) -> list[tuple[str, float, float]]:
    """The sum, mul and sub kernels that follow each bmm in the backward of ``_euclidean_dist``."""
    return [(f"{k}_grad_{which}", size, 0.0) for k in ("sum", "mul", "sub")]


def _snella_dw(c, P, W0):
    g = c.g
    A, B = P["A"], P["B"]
    H, n, d = A.shape
    m = c.m
    e = c.acc
    mixed = c.cfg.get("kernel", "mixed") == "mixed"
    if not mixed:
        g.launch("zeros_scalars")  # the a, gamma, b placeholders of the distance kernel
    signs = g.buffer((H,), name="signs")
    g.launch("head_signs")  # coeff * [(-1)^h]
    mn = H * m * n
    dist = g.custom("euclidean_dist", [B, A], (H, m, n), [("euclidean_dist", 3 * mn * d, e * (mn + H * (m + n) * d))],
                    {"shared": [("dist_grad_div", mn, 3 * e * mn), ("dist_grad_eq", mn, 2 * e * mn),
                                ("dist_grad_masked_fill_", mn, 2 * e * mn)],
                     0: [("bmm_grad_b", 2 * mn * d, e * (mn + H * n * d + H * m * d), 2 * mn * d),
                         *_factor_tail("b", H * m * d)],
                     1: [("bmm_grad_a", 2 * mn * d, e * (mn + H * m * d + H * n * d), 2 * mn * d),
                         *_factor_tail("a", H * n * d)]},
                    eb=e)
    K = g.reduce("sum_heads", g.ew("mul", dist, g.view(signs, (H, 1, 1))), (m, n))
    M = K
    if mixed:
        Kg = g.custom("div", [K, P["gamma"]], (m, n), [("div", m * n, 3 * e * m * n)],
                      {0: [("div_grad_x", m * n, 3 * e * m * n)],
                       1: [("div_grad_y", m * n, 3 * e * m * n), ("neg", m * n, 2 * e * m * n),
                           ("mul", m * n, 3 * e * m * n), ("div", m * n, 3 * e * m * n), ("sum", m * n, e * m * n)]},
                      eb=e)
        S = g.custom("softmax", [Kg], (m, n), [("softmax", 3 * m * n, 2 * e * m * n)],
                     {0: [("softmax_backward", 3 * m * n, 3 * e * m * n)]}, eb=e)
        M = g.ew("add", g.ew("add", K, g.ew("mul", P["a"], S), grads="add"), P["b"], grads="add")
    with g.no_grad():
        # SNELLA.keep_mask: |M|, the k-th largest by selection, above / tied, the first tied ones by a cumsum
        N = m * n
        g.launch("abs", N, 2 * e * N)
        g.launch("kthvalue", N * math.log2(max(N, 2)), 2 * e * N)  # a copy, then introselect (a few passes)
        for name in ("gt", "eq"):
            g.launch(name, N, e * N + N)
        g.launch("sum")
        g.launch("rsub")
        g.launch("cumsum", N, N + _IDX * N)
        g.launch("le", N, _IDX * N + N)
        g.launch("bitwise_and", N, 3 * N)
        mask = g.fill("bitwise_or", (m, n), eb=1.0)
    dw = g.ew("mul", M, mask)
    if c.cfg.get("weighting", "mask") == "magnitude":
        g.launch("abs_weight")
        dw = g.ew("mul", dw, g.buffer((m, n), name="abs_M"))
    return dw


def _snella_fwd(c, P, x):
    g = c.g
    return g.mm(x, _tr(g, g.cast(_snella_dw(c, P, None), c.eb)))


_register("snella", setup=_snella_setup, forward=_snella_fwd, delta=_snella_dw)
