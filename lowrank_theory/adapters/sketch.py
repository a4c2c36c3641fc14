r"""SketchTune: the weight as fixed low-bit codes into trainable per-row-group codebooks.

A sketch of :math:`W_0 \in \mathbb R^{m \times n}` with ``bits`` = b and ``groups`` = G splits the columns into
G contiguous groups (:func:`column_groups`), gives every (row i, group g) a codebook of :math:`K = 2^b` values
:math:`S_{i,g,:}`, and stores every entry as a b-bit code into its row-group's codebook:

.. math::  \hat W_{ij} = S_{i,\,g(j),\,c_{ij}}, \qquad c_{ij} \in \{0, \dots, K-1\}.

Only :math:`S` (m·G·K numbers) is trained; the codes are frozen.  :math:`\hat W` is linear in S, so the
gradient of a loss through the gather is the scatter-add of :math:`\partial L/\partial \hat W` over the codes
(:func:`codebook_gradient`; proved in ``proofs/26-sketch-scatter-add.md``):

.. math::  \frac{\partial L}{\partial S_{i,g,k}}
           = \sum_{j:\ g(j) = g,\ c_{ij} = k} \frac{\partial L}{\partial \hat W_{ij}}.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from ..linalg import derive_seed
from ..method_index import Paper, adapter_entry
from .base import Adapter, check_weight
from .params import Int, Seed, schema
from .registry import register

__all__ = ["SketchResult", "SketchTune", "codebook_gradient", "column_groups", "gather_sketch", "sketch_weight"]

#: Cap on the elements of one (rows, columns, K) distance block of the k-means assignment (float64: 32 MiB).
_BLOCK = 1 << 22


def column_groups(d_in: int, groups: int, device: torch.device | None = None) -> torch.Tensor:
    r"""Group index :math:`g(j) = \lfloor jG/n \rfloor` of every column j (int64, shape (d_in,)).

    Contiguous groups whose sizes differ by at most one; every group is non-empty when ``groups <= d_in``
    (the interval :math:`[gn/G, (g+1)n/G)` has length :math:`n/G \ge 1`).  For G dividing n this is the
    authors' layout: group g holds columns :math:`gc, \dots, gc + c - 1`, :math:`c = n/G`.
    """
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    if not 1 <= groups <= d_in:
        raise ValueError(f"groups must satisfy 1 <= groups <= d_in={d_in}, got {groups}")
    return torch.arange(d_in, device=device) * groups // d_in


def _flat_index(codes: torch.Tensor, col_group: torch.Tensor, levels: int) -> torch.Tensor:
    """(m, n) int64 index of every entry into the row's flattened codebook ``S[i].reshape(G*K)``."""
    return col_group.to(codes.device)[None, :] * levels + codes.long()


def gather_sketch(codebook: torch.Tensor, codes: torch.Tensor, col_group: torch.Tensor) -> torch.Tensor:
    r""":math:`\hat W_{ij} = S_{i, g(j), c_{ij}}` for a codebook (m, G, K), codes (m, n), groups (n,)."""
    m, G, K = codebook.shape
    return codebook.reshape(m, G * K).gather(1, _flat_index(codes, col_group, K))


def codebook_gradient(grad_W: torch.Tensor, codes: torch.Tensor, col_group: torch.Tensor, groups: int,
                      levels: int) -> torch.Tensor:
    r"""The codebook gradient (m, G, K) from the gradient of the sketched weight (m, n): a scatter-add.

    :math:`G_{i,g,k} = \sum_{j:\, g(j)=g,\, c_{ij}=k} (\partial L/\partial \hat W)_{ij}`; entries of a
    codebook that no weight uses get 0.
    """
    m = grad_W.shape[0]
    out = torch.zeros(m, groups * levels, dtype=grad_W.dtype, device=grad_W.device)
    return out.scatter_add_(1, _flat_index(codes, col_group, levels), grad_W).view(m, groups, levels)


class _SketchMatmul(torch.autograd.Function):
    """``x Ŵᵀ`` with Ŵ gathered from the codebook; backward re-gathers Ŵ and scatter-adds ∂L/∂Ŵ (as the
    authors' ``Sub4BitMatMul``), so Ŵ is not kept alive between forward and backward."""

    @staticmethod
    def forward(ctx, codebook, codes, col_group, x):  # type: ignore[override]
        ctx.save_for_backward(codebook, codes, col_group, x)
        W = gather_sketch(codebook, codes, col_group)
        return x @ W.to(x.dtype).T

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        codebook, codes, col_group, x = ctx.saved_tensors
        m, G, K = codebook.shape
        grad_S = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_W = grad_out.reshape(-1, m).T @ x.reshape(-1, x.shape[-1])
            grad_S = codebook_gradient(grad_W.to(codebook.dtype), codes, col_group, G, K)
        if ctx.needs_input_grad[3]:
            grad_x = grad_out @ gather_sketch(codebook, codes, col_group).to(grad_out.dtype)
        return grad_S, None, None, grad_x


class SketchResult(NamedTuple):
    """A sketch of a weight: ``codes`` (m, n) uint8, ``codebook`` (m, G, K), and the squared Frobenius error
    :math:`\\|W - \\hat W\\|_F^2` after each Lloyd iteration (``errors[0]``: the quantile initialisation)."""

    codes: torch.Tensor
    codebook: torch.Tensor
    errors: tuple[float, ...]


def _assign(W: torch.Tensor, C: torch.Tensor, col_group: torch.Tensor) -> torch.Tensor:
    """Nearest codebook entry of every weight (first one on ties), in row blocks of bounded memory."""
    m, n = W.shape
    K = C.shape[-1]
    codes = torch.empty(m, n, dtype=torch.long, device=W.device)
    rows = max(1, _BLOCK // max(1, n * K))
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        centers = C[r0:r1][:, col_group, :]  # (rows, n, K): the codebook of each entry's row-group
        codes[r0:r1] = (W[r0:r1, :, None] - centers).abs().argmin(dim=-1)
    return codes


def sketch_weight(W: torch.Tensor, bits: int = 4, groups: int = 1, iters: int = 20) -> SketchResult:
    r"""Per-row-group 1-D k-means sketch of ``W`` (m, n): codes and codebooks minimising :math:`\|W - \hat W\|_F`.

    Each (row, group) is clustered independently with :math:`K = 2^b` centres by Lloyd's algorithm, started
    at the group's quantiles :math:`(k + 1/2)/K`, :math:`k = 0..K-1` (linear interpolation); an empty cluster
    keeps its centre.  Lloyd's steps never increase the error (assignment: each weight moves to its nearest
    centre; update: the mean minimises the squared error of its cluster), so ``errors`` is non-increasing.
    The loop stops early when no code changes.  Computed in float64.

    Parameters
    ----------
    W : Tensor, shape (m, n)
        Finite floating weight.
    bits : int, 1..8
        b; codes are stored as uint8.
    groups : int, 1..n
        G, column groups per row (the paper's "groups per row").
    iters : int, >= 0
        Maximum Lloyd iterations (0: the quantile codebook with nearest-level codes).

    Returns
    -------
    SketchResult
        ``codebook`` in ``W``'s dtype (rounded once from float64).
    """
    check_weight(W, "W")
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
    for name, v, lo, hi in (("bits", bits, 1, 8), ("iters", iters, 0, None)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"{name} must be {'in [1, 8]' if hi else '>= 0'}, got {v}")
    m, n = W.shape
    col_group = column_groups(n, groups, W.device)
    K = 2 ** bits
    Wd = W.detach().double()
    q = (torch.arange(K, dtype=torch.float64, device=W.device) + 0.5) / K
    C = torch.empty(m, groups, K, dtype=torch.float64, device=W.device)
    for g in range(groups):
        C[:, g, :] = torch.quantile(Wd[:, col_group == g], q, dim=1).T
    codes = _assign(Wd, C, col_group)
    errors = [float(((Wd - gather_sketch(C, codes, col_group)) ** 2).sum())]
    for _ in range(iters):
        idx = _flat_index(codes, col_group, K)
        sums = torch.zeros(m, groups * K, dtype=torch.float64, device=W.device).scatter_add_(1, idx, Wd)
        counts = torch.zeros(m, groups * K, dtype=torch.float64, device=W.device).scatter_add_(
            1, idx, torch.ones_like(Wd))
        flat = C.reshape(m, groups * K)
        C = torch.where(counts > 0, sums / counts.clamp_min(1.0), flat).view(m, groups, K)
        new = _assign(Wd, C, col_group)
        errors.append(float(((Wd - gather_sketch(C, new, col_group)) ** 2).sum()))
        if torch.equal(new, codes):
            break
        codes = new
    return SketchResult(codes.to(torch.uint8), C.to(W.dtype), tuple(errors))


@register
class SketchTune(Adapter):
    r"""SketchTune: :math:`W' = \hat W(S)` with :math:`\hat W_{ij} = S_{i, g(j), c_{ij}}`, codebooks S trained.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    bits : int, default 4
        b, bits per code (1..8); :math:`K = 2^b` codebook entries per row-group.  The paper uses 4 (INT4).
    groups : int, default 1
        G, column groups per row (the paper's GPR: 1, 2, 4, 8), ``1 <= G <= d_in``.
    iters : int, default 20
        Lloyd iterations of :meth:`from_weight`'s sketch (:func:`sketch_weight`).
    seed : int, default 0
        Seed of the codes of a construction without a weight (``create``): row i gets
        :math:`c_{ij} = (o_i + j) \bmod K` with a random offset :math:`o_i`, so every codebook entry of a
        row-group with at least K columns is used.  Unused by :meth:`from_weight`.

    Raises
    ------
    TypeError, ValueError
        ``bits`` not in 1..8, ``groups`` not in 1..d_in, ``iters < 0``, a bad seed.

    Notes
    -----
    In the adapter contract the frozen base holds :math:`\hat W_0 = \hat W(S_0)` (what :meth:`from_weight`
    returns, as LQ-LoRA returns its quantized Q) and the update is

    .. math:: \Delta W = \hat W(S) - \hat W(S_0) = \hat W(S - S_0),

    so the adapted layer computes :math:`x \hat W(S)^\top + b` (the paper's model), with ``codebook`` = S
    trainable and ``codebook0`` = :math:`S_0` and the uint8 ``codes`` frozen (persistent buffers: the state
    holds the whole sketch).  **Identity at init** holds for the sketched layer, not for the original one:
    after :meth:`from_weight` the layer differs from :math:`x W_0^\top + b` by the sketch error
    :math:`\|W_0 - \hat W_0\|_F` (``sketch_error``, relative), so ``identity_at_init`` is False there; a
    ``create`` without a weight (cyclic codes, :math:`S = S_0 = 0`) is an update :math:`\Delta W = 0` on the
    given base and keeps ``identity_at_init`` True.

    Forward: :math:`x \hat W(S - S_0)^\top` by a gather then a matmul, with a backward that scatter-adds
    :math:`\partial L/\partial \hat W` into the codebook (the authors' ``Sub4BitMatMul`` does the same with CUDA
    kernels on packed 4-bit codes).  There is no cheaper structured product: each output still reads all
    m·n entries, the gain of the method is storage (b bits per weight plus m·G·K codebook values) and no
    second (adapter) path.  Here the base is a float :math:`\hat W_0`, so that storage gain is **not**
    realised; the packed layout is left out.  Trainable: :math:`m \cdot G \cdot 2^b`.

    What was read, and from where: the abstract (arXiv:2410.06364, in ``shared/seeds``, and the arXiv / ICML
    2025 pages via the search tool: "compresses LLM weights into compact fine-tunable sketches ... no
    two-path computation"), the reproducibility summary naming "Algorithm 1: Learning to Sketch LLM
    Weights", and the authors' released code (github.com/LeanModels/SketchTune, ``tailor_utils.py``,
    ``kernels/``): a codebook ``quant_grid`` of shape (rows, groups per row, 2^bits) as an ``nn.Parameter``,
    uint8 ``weight_codes`` as a buffer, forward ``x @ gather(quant_grid, codes)ᵀ``, backward
    ``grad_quant_grid = scatter_add(grad_outᵀ x, codes)``, INT4 with GPR 1/2/4/8.  The release ships
    pre-sketched models and not the sketching code, and the method section was not readable here: the
    paper's sketch is learned from calibration data (Algorithm 1), which this class does **not** reproduce.
    :meth:`from_weight` builds a data-free stand-in, per-row-group 1-D k-means on the weights (Lloyd from
    quantiles), i.e. the sketch that minimises :math:`\|W_0 - \hat W\|_F` locally, not the output error on
    calibration inputs.

    References
    ----------
    T. Zhang, J. Su, A. Desai, O. Wu, Z. Xu, A. Shrivastava, "Sketch to Adapt: Fine-Tunable Sketches for
    Efficient LLM Adaptation", ICML 2025, arXiv:2410.06364.
    """

    index_entry = adapter_entry(
        "sketchtune",
        Paper("Sketch to Adapt: Fine-Tunable Sketches for Efficient LLM Adaptation", "2410.06364"),
        "d_out * groups * 2 ** bits",
        ("tests/adapters/test_sketch.py",),
        proofs=("proofs/26-sketch-scatter-add.md",),
        peft="none",
    )

    name = "sketchtune"
    identity_at_init = True  # per instance: False after from_weight (the base is the sketch of W0)
    params = schema(
        bits=Int(1, 8, doc="bits per code; 2**bits codebook entries per row-group"),
        groups=Int(1, doc="column groups per row (GPR), <= d_in"),
        iters=Int(0, doc="Lloyd iterations of the k-means sketch built by from_weight"),
        seed=Seed(doc="seed of the random codes of create() without a weight"),
    )

    def __init__(self, d_out: int, d_in: int, bits: int = 4, groups: int = 1, iters: int = 20,
                 seed: int = 0) -> None:
        super().__init__(d_out, d_in)
        col_group = column_groups(d_in, groups)
        self.bits, self.groups, self.levels = bits, groups, 2 ** bits
        g = torch.Generator().manual_seed(derive_seed(seed, "sketchtune-codes"))
        offset = torch.randint(0, self.levels, (d_out, 1), generator=g)
        codes = ((offset + torch.arange(d_in)) % self.levels).to(torch.uint8)  # a row-group of >= K columns uses all
        self.register_buffer("codes", codes)
        self.register_buffer("col_group", col_group, persistent=False)
        self.register_buffer("codebook0", torch.zeros(d_out, groups, self.levels))
        self.codebook = nn.Parameter(torch.zeros(d_out, groups, self.levels))
        #: Relative sketch error ‖W0 − Ŵ0‖_F / ‖W0‖_F and the k-means errors (set by from_weight).
        self.sketch_error: float = 0.0
        self.sketch_errors: tuple[float, ...] = ()

    @classmethod
    def param_count(cls, d_out: int, d_in: int, bits: int = 4, groups: int = 1, **_: Any) -> int:
        return d_out * groups * 2 ** bits

    @classmethod
    def from_weight(cls, W: torch.Tensor, **cfg: Any) -> tuple[SketchTune, torch.Tensor]:
        r"""Sketch ``W`` (m, n); return ``(adapter, Ŵ0)`` with :math:`S = S_0` the k-means codebooks.

        The adapter is in ``W``'s dtype and device; ``Ŵ0`` (the new base weight) is gathered from the very
        codebook the adapter stores, so base + ΔW is exactly :math:`\hat W(S)` at init.
        """
        check_weight(W, "W")
        if W.ndim != 2:
            raise ValueError(f"W must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
        m, n = W.shape
        ad = cls(m, n, **cfg)
        res = sketch_weight(W.detach().double(), ad.bits, ad.groups, ad._config["iters"])
        ad = ad.to(device=W.device)
        ad._apply(lambda t: t.to(W.dtype) if t.is_floating_point() else t)
        with torch.no_grad():
            ad.codes.copy_(res.codes)
            ad.codebook0.copy_(res.codebook)
            ad.codebook.copy_(ad.codebook0)
        W_hat = gather_sketch(ad.codebook0, ad.codes, ad.col_group)
        ref = float(W.detach().double().norm())
        err = float((W.detach().double() - W_hat.double()).norm())
        ad.sketch_error = err / ref if ref > 0 else err
        ad.sketch_errors = res.errors
        ad.identity_at_init = False
        return ad, W_hat

    def sketched_weight(self) -> torch.Tensor:
        r"""The paper's weight :math:`\hat W(S)` (m, n) (the merged weight over a base :math:`\hat W(S_0)`)."""
        return gather_sketch(self.codebook, self.codes, self.col_group)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return gather_sketch(self.codebook - self.codebook0, self.codes, self.col_group)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return _SketchMatmul.apply(self.codebook - self.codebook0, self.codes, self.col_group, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, groups={self.groups}"

