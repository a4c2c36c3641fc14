r"""Tensor-decomposed adapters: FLoRA (Tucker updates of linear weights and conv kernels) and TLoRA.

* **FLoRA** -- :math:`\Delta\mathcal W = s\,\mathcal G \times_1 U_1 \cdots \times_N U_N`, a Tucker
  tensor of the weight's own shape: :math:`\Delta W = s\,U_1 G U_2^\top` for a linear weight,
  a 4-D Tucker kernel for a convolution (:class:`FLoRA`, :class:`FLoRAConv2d`).
* **TLoRA** -- :math:`W' = (I + \Delta T)\,W_0 + R` with the transform :math:`\Delta T` and the
  residual :math:`R` in tensor-train (matrix-product-operator) form (:class:`TLoRA`).

Forward passes go through the factors (mode products on the activations, a chain of small
convolutions, TT contractions); dense tensors are built only by ``delta_weight`` (via
:func:`lowrank_theory.linalg.tucker.tucker_to_tensor`) and for merging.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg.tucker import tucker_to_tensor
from ..method_index import Paper, adapter_entry
from .base import Adapter, check_sizes
from .conv import ConvGeometry, conv2d_delta
from .params import Float, Int, IntOrInts, Seed, schema
from .registry import register

_SEED = Seed(none_ok=True, doc="seed of the trainable init; None uses torch's global RNG")

__all__ = ["FLoRA", "FLoRAConv2d", "TLoRA", "balanced_factors", "tt_apply", "tt_core_shapes", "tt_dense"]


# ----------------------------------------------------------------------------- validation
def _check_int(value: Any, name: str, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value}")
    return int(value)


def _check_ranks(ranks: Any, dims: tuple[int, ...], labels: tuple[str, ...]) -> tuple[int, ...]:
    """An int (same rank on every mode) or one int per mode, ``1 <= ranks[i] <= dims[i]``."""
    if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
        ranks = tuple(min(int(ranks), d) for d in dims) if ranks >= 1 else (int(ranks),) * len(dims)
    if not isinstance(ranks, Sequence) or isinstance(ranks, str) or len(ranks) != len(dims):
        raise ValueError(f"ranks must be an int or {len(dims)} ints ({', '.join(labels)}), got {ranks!r}")
    out = tuple(_check_int(r, f"ranks[{i}]") for i, r in enumerate(ranks))
    for i, (r, d, lab) in enumerate(zip(out, dims, labels)):
        if r > d:
            raise ValueError(f"ranks[{i}] ({lab}) must be <= {d}, got {r}")
    return out


def _generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator for a seed validated by ``params`` (None: torch's global RNG)."""
    return None if seed is None else torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- tensor trains
def balanced_factors(size: int, parts: int) -> tuple[int, ...]:
    """Split ``size`` into ``parts`` positive factors (product ``size``) as evenly as its primes allow.

    Prime factors, largest first, go to the currently smallest part; the result is sorted in
    descending order and padded with 1s (a prime ``size`` gives ``(size, 1, ..., 1)``).
    """
    size, parts = _check_int(size, "size"), _check_int(parts, "parts")
    primes, k, rest = [], 2, size
    while k * k <= rest:
        while rest % k == 0:
            primes.append(k)
            rest //= k
        k += 1
    if rest > 1:
        primes.append(rest)
    out = [1] * parts
    for p in sorted(primes, reverse=True):
        out[out.index(min(out))] *= p
    return tuple(sorted(out, reverse=True))


def tt_core_shapes(rows: Sequence[int], cols: Sequence[int], rank: int) -> list[tuple[int, int, int, int]]:
    r"""Core shapes :math:`(r_{k-1}, a_k, b_k, r_k)` of a TT matrix with row/column factors ``rows``/``cols``.

    The bond rank :math:`r_k` is ``rank`` clipped to :math:`\min(\prod_{j\le k} a_jb_j, \prod_{j>k} a_jb_j)`,
    the largest rank an unfolding at that bond can have; :math:`r_0 = r_d = 1`.
    """
    sizes = [a * b for a, b in zip(rows, cols)]
    bonds = [1] + [min(rank, math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)] + [1]
    return [(bonds[k], rows[k], cols[k], bonds[k + 1]) for k in range(len(sizes))]


def tt_dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""The matrix :math:`M[(i_1..i_d),(j_1..j_d)] = \mathcal G_1[:, i_1, j_1, :]\cdots\mathcal G_d[:, i_d, j_d, :]`.

    Row and column multi-indices in C order (:math:`i_1` slowest); cost :math:`O(mn\,r^2)` at most.
    """
    _, a, b, r = cores[0].shape
    M = cores[0].reshape(a, b, r)
    for G in cores[1:]:
        A, B, _ = M.shape
        _, a, b, r = G.shape
        M = torch.einsum("ABr,rabs->AaBbs", M, G).reshape(A * a, B * b, r)
    return M.reshape(M.shape[0], M.shape[1])


def tt_apply(cores: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    r"""``x @ M.T`` for the TT matrix ``M`` of ``cores`` and x (..., n), without forming ``M``.

    One core at a time: the running tensor :math:`(N\,a_1\cdots a_{k-1},\ r_{k-1},\ b_k\cdots b_d)` is
    contracted with :math:`\mathcal G_k` over :math:`(r_{k-1}, b_k)`; cost
    :math:`\sum_k N\,(a_1\cdots a_k)\,r_{k-1}r_k\,(b_k\cdots b_d)` per batch of N rows.
    """
    m = math.prod(G.shape[1] for G in cores)
    n = math.prod(G.shape[2] for G in cores)
    lead = x.shape[:-1]
    t = x.reshape(-1, 1, n)
    for G in cores:
        r, a, b, s = G.shape
        P, _, rest = t.shape
        t = torch.einsum("prbq,rabs->pasq", t.reshape(P, r, b, rest // b), G).reshape(P * a, s, rest // b)
    return t.reshape(*lead, m)


# ----------------------------------------------------------------------------- FLoRA
class _TuckerUpdate(Adapter):
    r"""Shared FLoRA machinery: zero core, Kaiming-normal factors, dense ΔW via ``tucker_to_tensor``."""

    _labels: tuple[str, ...] = ()

    def _init_tucker(self, dims: tuple[int, ...], ranks: Any, scale: Any, seed: int | None) -> None:
        self.ranks = _check_ranks(ranks, dims, self._labels)
        self.scale = scale
        g = _generator(seed)
        self.core = nn.Parameter(torch.zeros(self.ranks))
        # kaiming_normal_(a=sqrt(3)) on a (dim, r) factor, as the reference code: std = 1/sqrt(2 r)
        self.factors = nn.ParameterList(
            nn.Parameter(torch.randn(d, r, generator=g) / math.sqrt(2 * r)) for d, r in zip(dims, self.ranks)
        )

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        acc = torch.promote_types(self.core.dtype, torch.float32)  # tucker_to_tensor refuses half
        full = tucker_to_tensor(self.core.to(acc), [U.to(acc) for U in self.factors])
        return (self.scale * full).to(self.core.dtype)


@register
class FLoRA(_TuckerUpdate):
    r"""FLoRA on a linear weight: :math:`\Delta W = s\,\mathcal G \times_1 U_1 \times_2 U_2 = s\,U_1 G U_2^\top`.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    ranks : int or (int, int), default 8
        Core shape :math:`(r_1, r_2)`, :math:`r_1 \le m`, :math:`r_2 \le n` (an int is clipped to each).
    scale : float, default 1.0
        :math:`s` (the reference code's ``scale``).
    seed : int, optional
        Seed of the factors' initialisation.

    Notes
    -----
    **Init, checked against the authors' code** (``FLoRALayer.init_parameters``): the core
    :math:`\mathcal G` is zero and every factor is Kaiming-normal with :math:`a = \sqrt 3` on its
    (dim, r) shape, i.e. :math:`\mathcal N(0, 1/(2r_i))`; so :math:`\Delta W = 0` at init and the
    first gradient reaches the core, :math:`\partial_G = s\,U_1^\top (\partial_W) U_2`.  For N = 2
    FLoRA is LoRA with an extra :math:`r_1\times r_2` mixing core (``B G A``).

    Forward: :math:`x \mapsto s\,((xU_2)G^\top)U_1^\top`, :math:`O(mr_1 + nr_2 + r_1r_2)` per token
    (the reference code rebuilds the dense ΔW in every forward; we do not).
    Trainable: :math:`r_1 r_2 + m r_1 + n r_2`.

    References
    ----------
    C. Si, X. Wang, X. Yang, Z. Xu, Q. Li, J. Dai, Y. Qiao, X. Yang, W. Shen, "FLoRA: Low-Rank Core
    Space for N-dimension" (also "Maintaining Structural Integrity in Parameter Spaces for
    Parameter Efficient Fine-tuning"), arXiv:2405.14739.
    """

    index_entry = adapter_entry(
        "flora",
        Paper("FLoRA: Low-Rank Core Space for N-dimension", "2405.14739"),
        "r1 * r2 + d_out * r1 + d_in * r2",
        ("tests/adapters/test_tensor.py",),
        where=(("r1", "min(ranks, d_out)"), ("r2", "min(ranks, d_in)")),
        proofs=("proofs/11-hosvd-quasi-optimality.md",),
        notebooks=("notebooks/01_expressivity.py",),
    )

    name = "flora"
    _labels = ("d_out", "d_in")
    params = schema(ranks=IntOrInts(1, doc="core shape (r1, r2), an int is clipped to each side"),
              scale=Float(doc="s"), seed=_SEED)

    def __init__(self, d_out: int, d_in: int, ranks: int | Sequence[int] = 8, scale: float = 1.0,
                 seed: int | None = 0) -> None:
        super().__init__(d_out, d_in)
        self._init_tucker((d_out, d_in), ranks, scale, seed)

    @classmethod
    def param_count(cls, d_out: int, d_in: int, ranks: int | Sequence[int] = 8, **_: Any) -> int:
        r1, r2 = _check_ranks(ranks, check_sizes(d_out, d_in), cls._labels)
        return r1 * r2 + d_out * r1 + d_in * r2

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        U1, U2 = self.factors
        return self.scale * (((x @ U2) @ self.core.T) @ U1.T)


@register
class FLoRAConv2d(_TuckerUpdate):
    r"""FLoRA kernel: :math:`\Delta\mathcal K = s\,\mathcal G \times_1 U_o \times_2 U_i \times_3 U_h \times_4 U_w`.

    Parameters
    ----------
    d_out, d_in : int
        Output channels and input channels per group (the kernel is (d_out, d_in, kh, kw)).
    kernel_size : int or (int, int), default 3
        (kh, kw).
    ranks : int or 4 ints, default 4
        Core shape :math:`(r_{out}, r_{in}, r_h, r_w)`, each at most its mode's size (an int is
        clipped to each mode).
    scale : float, default 1.0
        :math:`s`.
    seed : int, optional
        Seed of the factors' initialisation (core zero, factors :math:`\mathcal N(0, 1/(2r_i))`).

    Notes
    -----
    The kernel keeps its 4-D topology (the point of FLoRA: reshaping it to a matrix for LoRA
    separates spatial neighbours).  :meth:`conv_forward` never forms :math:`\Delta\mathcal K`:
    for groups = 1,

    .. math:: \operatorname{conv}(x, \Delta\mathcal K) = s\; U_{out} \star
       \operatorname{conv}\big(U_{in}^\top \star x,\ \mathcal C\big),
       \qquad \mathcal C = \mathcal G \times_3 U_h \times_4 U_w
       \in \mathbb R^{r_{out}\times r_{in}\times k_h\times k_w},

    where :math:`U \star` is a 1×1 convolution (a per-pixel channel map) and the middle convolution
    has the base layer's stride, padding and dilation.  It is exact because per-pixel linear maps
    commute with padding (zeros stay zeros; reflected/replicated/circular pixels are mapped like
    the pixels they copy) and with the spatial sum.  Cost per output pixel
    :math:`O(r_{out} r_{in} k_h k_w + d_{out} r_{out}) + O(d_{in} r_{in})` per input pixel, instead
    of :math:`O(d_{out} d_{in} k_h k_w)`.  Grouped convolutions (groups > 1) use one convolution
    with the dense kernel (a channel map across groups would break the block structure).

    Trainable: :math:`r_{out}r_{in}r_hr_w + d_{out}r_{out} + d_{in}r_{in} + k_hr_h + k_wr_w`.

    References
    ----------
    C. Si et al., "FLoRA: Low-Rank Core Space for N-dimension", arXiv:2405.14739.
    """

    index_entry = adapter_entry(
        "flora_conv2d",
        Paper("FLoRA: Low-Rank Core Space for N-dimension", "2405.14739"),
        "ro * ri * rh * rw + d_out * ro + d_in * ri + kernel_size * (rh + rw)",
        ("tests/adapters/test_tensor.py",),
        where=(
            ("ro", "min(ranks, d_out)"),
            ("ri", "min(ranks, d_in)"),
            ("rh", "min(ranks, kernel_size)"),
            ("rw", "min(ranks, kernel_size)"),
        ),
        proofs=("proofs/11-hosvd-quasi-optimality.md",),
        note="for nn.Conv2d; kernel_size is one int here",
    )

    name = "flora_conv2d"
    _labels = ("d_out", "d_in", "kh", "kw")
    params = schema(kernel_size=IntOrInts(1, doc="(kh, kw), or one int for both"),
              ranks=IntOrInts(1, doc="core shape (r_out, r_in, r_h, r_w), an int is clipped to each mode"),
              scale=Float(doc="s"), seed=_SEED)

    def __init__(self, d_out: int, d_in: int, kernel_size: int | Sequence[int] = 3,
                 ranks: int | Sequence[int] = 4, scale: float = 1.0, seed: int | None = 0) -> None:
        super().__init__(d_out, d_in)
        self.kernel_size = self._check_kernel_size(kernel_size)
        self._init_tucker((d_out, d_in, *self.kernel_size), ranks, scale, seed)

    @staticmethod
    def _check_kernel_size(kernel_size: Any) -> tuple[int, int]:
        if isinstance(kernel_size, numbers.Integral) and not isinstance(kernel_size, bool):
            kernel_size = (kernel_size, kernel_size)
        if not isinstance(kernel_size, Sequence) or len(kernel_size) != 2:
            raise ValueError(f"kernel_size must be an int or a pair (kh, kw), got {kernel_size!r}")
        return (_check_int(kernel_size[0], "kernel_size[0]"), _check_int(kernel_size[1], "kernel_size[1]"))

    @classmethod
    def param_count(cls, d_out: int, d_in: int, kernel_size: int | Sequence[int] = 3,
                    ranks: int | Sequence[int] = 4, **_: Any) -> int:
        dims = (*check_sizes(d_out, d_in), *cls._check_kernel_size(kernel_size))
        r = _check_ranks(ranks, dims, cls._labels)
        return math.prod(r) + sum(d * ri for d, ri in zip(dims, r))

    def _check_input(self, x: torch.Tensor, groups: int = 1) -> None:
        if x.ndim not in (3, 4) or x.shape[-3] != self.d_in * groups:
            raise ValueError(
                f"x must be an image batch (N, C, H, W) or (C, H, W) with C = d_in * groups = {self.d_in * groups}, "
                f"got shape {tuple(x.shape)}"
            )

    def conv_forward(self, x: torch.Tensor, geometry: nn.Conv2d | ConvGeometry | None = None) -> torch.Tensor:
        r"""``conv2d(x, ΔK)`` (no bias) under ``geometry`` (an ``nn.Conv2d``, a :class:`ConvGeometry`,
        or None for stride 1 without padding), through the factors when groups = 1."""
        geo = ConvGeometry.of(geometry)
        self._check_input(x, geo.groups)
        if geo.groups != 1:
            return conv2d_delta(x, self.delta_weight().to(x.dtype), geo)
        U_out, U_in, U_h, U_w = (U.to(x.dtype) for U in self.factors)
        core = torch.einsum("pqcd,ac,bd->pqab", self.core.to(x.dtype), U_h, U_w)  # (r_out, r_in, kh, kw)
        z = F.conv2d(x, U_in.T[:, :, None, None])  # (N, r_in, H, W)
        # a 1x1 channel map commutes with every padding mode (it acts per pixel), so pad after it
        z, padding = geo.pad(z, tuple(core.shape[-2:]))
        z = F.conv2d(z, core, None, geo.stride, padding, geo.dilation)
        return self.scale * F.conv2d(z, U_out[:, :, None, None])

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``conv2d(x, ΔK)`` with stride 1 and no padding (use :meth:`conv_forward` for a layer's geometry)."""
        return self.conv_forward(x)


# ----------------------------------------------------------------------------- TLoRA
@register
class TLoRA(Adapter):
    r"""TLoRA (Transformed LoRA): :math:`W' = (I + \Delta T)\,W_0 + R` with tensor-train :math:`\Delta T` and :math:`R`.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    transform_rank : int, default 2
        TT rank of the transform update :math:`\Delta T \in \mathbb R^{m\times m}`.
    residual_rank : int, default 2
        TT rank of the residual :math:`R \in \mathbb R^{m\times n}`.
    n_cores : int, default 2
        Number of TT cores; :math:`m` and :math:`n` are split into that many balanced factors
        (:func:`balanced_factors`; a prime size gives a
        factor 1, so its operator is dense in that mode).
    seed : int, optional
        Seed of the cores' initialisation.

    Notes
    -----
    **Reading of the paper.**  The TLoRA paper (Tao, Takida, Murata, Zhao, Mitsufuji 2025;
    arXiv:2501.08727, the project's seed paper) combines a *transform* adaptation -- a full-rank,
    dense, learnable matrix applied to the pretrained weight, meant to align it with the target
    so that what is left has low rank -- with a *residual* adaptation, both parametrized by tensor
    decompositions for parameter efficiency (DoRA being a diagonal-transform special case).
    Only the abstract could be retrieved here, so the formats are our choice, following
    ``methods.md``: the transform acts on the output side,

    .. math:: W' = T W_0 + R, \qquad T = I_m + \Delta T ,

    with :math:`\Delta T` and :math:`R` tensor-train matrices (MPOs): for row factors
    :math:`m = \prod_k a_k`, column factors :math:`n = \prod_k b_k` and cores
    :math:`\mathcal G_k \in \mathbb R^{r_{k-1}\times a_k\times b_k\times r_k}` (:math:`r_0 = r_d = 1`),
    :math:`M[(i_1..i_d),(j_1..j_d)] = \mathcal G_1[:, i_1, j_1, :] \cdots \mathcal G_d[:, i_d, j_d, :]`.
    The last core of each train starts at zero and the others Gaussian
    (:math:`\mathcal N(0, 1/(r_{k-1}b_k))`), so :math:`T = I`, :math:`R = 0` at init and the
    first gradients reach the last cores (as LoRA's zero B).  :math:`T` stays full rank near init,
    and :math:`\Delta T` is dense for d = 1 (one core).

    **Apply.**  :math:`y = W'x = T(W_0x) + Rx`: the layer adds :math:`\Delta T (W_0x)` and
    :math:`Rx` to the frozen output, each by a TT contraction
    (:func:`tt_apply`), never forming :math:`T` or :math:`R`.

    **Merge / unmerge.**  ``merged_weight`` :math:`= W_0 + \Delta T W_0 + R` (float32 or better);
    ``unmerged_weight`` solves :math:`T W_0 = W' - R` by LU (``torch.linalg.solve``), exact to
    :math:`O(\kappa(T)\,\varepsilon)` relative (``ValueError`` if :math:`T` is singular).
    ``delta_weight(W0)`` :math:`= \Delta T W_0 + R`.

    Trainable: :math:`\sum_k r_{k-1}a_k^2 r_k + \sum_k s_{k-1}a_kb_ks_k` (TT ranks clipped to
    the largest useful value at each bond).

    References
    ----------
    Z. Tao, Y. Takida, N. Murata, Q. Zhao, Y. Mitsufuji, "Transformed Low-rank Adaptation via
    Tensor Decomposition and Its Applications to Text-to-image Models", arXiv:2501.08727.
    I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33 (2011) 2295–2317.
    """

    index_entry = adapter_entry(
        "tlora",
        Paper(
            "Transformed Low-rank Adaptation via Tensor Decomposition and Its Applications to Text-to-image Models",
            "2501.08727"),
        "",
        ("tests/adapters/test_tensor.py",),
        note=("parameters: the sizes of the tensor-train cores of ΔT (bond rank transform_rank) and R (bond rank "
              "residual_rank), n_cores each (adapters.tensor.tt_core_shapes)"),
    )

    name = "tlora"
    needs_base = True
    multiplicative = True
    params = schema(transform_rank=Int(1, doc="TT rank of the transform's update"),
              residual_rank=Int(1, doc="TT rank of the residual"),
              n_cores=Int(1, doc="number of TT cores"), seed=_SEED)

    def __init__(self, d_out: int, d_in: int, transform_rank: int = 2, residual_rank: int = 2,
                 n_cores: int = 2, seed: int | None = 0) -> None:
        super().__init__(d_out, d_in)
        shapes_t, shapes_r = self._core_shapes(d_out, d_in, transform_rank, residual_rank, n_cores)
        g = _generator(seed)
        self.transform_cores = nn.ParameterList(self._init_cores(shapes_t, g))
        self.residual_cores = nn.ParameterList(self._init_cores(shapes_r, g))

    @staticmethod
    def _core_shapes(d_out: int, d_in: int, transform_rank: int, residual_rank: int, n_cores: int):
        check_sizes(d_out, d_in)
        n_cores = _check_int(n_cores, "n_cores")
        rows, cols = balanced_factors(d_out, n_cores), balanced_factors(d_in, n_cores)
        shapes_t = tt_core_shapes(rows, rows, _check_int(transform_rank, "transform_rank"))
        shapes_r = tt_core_shapes(rows, cols, _check_int(residual_rank, "residual_rank"))
        return shapes_t, shapes_r

    @staticmethod
    def _init_cores(shapes: list[tuple[int, int, int, int]], g: torch.Generator | None) -> list[nn.Parameter]:
        cores = [nn.Parameter(torch.randn(s, generator=g) / math.sqrt(s[0] * s[2])) for s in shapes[:-1]]
        return [*cores, nn.Parameter(torch.zeros(shapes[-1]))]

    @classmethod
    def param_count(cls, d_out: int, d_in: int, transform_rank: int = 2, residual_rank: int = 2,
                    n_cores: int = 2, **_: Any) -> int:
        shapes_t, shapes_r = cls._core_shapes(d_out, d_in, transform_rank, residual_rank, n_cores)
        return sum(math.prod(s) for s in shapes_t + shapes_r)

    # ------------------------------------------------------------------ structured
    def layer_output(self, x, base_out, base_weight, base_bias):
        self._check_input(x)
        W0x = base_out if base_bias is None else base_out - base_bias
        dt = self.residual_cores[0].dtype
        extra = tt_apply(list(self.transform_cores), W0x.to(dt)) + tt_apply(list(self.residual_cores), x.to(dt))
        return base_out + extra.to(base_out.dtype)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x ΔWᵀ = ΔT (W0 x) + R x`` for x (..., d_in)."""
        self._check_input(x)
        W0 = self._require_base(base_weight)
        return tt_apply(list(self.transform_cores), x @ W0.T) + tt_apply(list(self.residual_cores), x)

    # ------------------------------------------------------------------ dense
    def transform_update(self) -> torch.Tensor:
        """Dense :math:`\\Delta T` (m, m)."""
        return tt_dense(list(self.transform_cores))

    def residual(self) -> torch.Tensor:
        """Dense :math:`R` (m, n)."""
        return tt_dense(list(self.residual_cores))

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        W0 = self._require_base(base_weight)
        return self.transform_update() @ W0.to(self.residual_cores[0].dtype) + self.residual()

    def _merge(self, base_weight: torch.Tensor) -> torch.Tensor:
        W = self._require_base(base_weight)
        return W + self.transform_update() @ W + self.residual()

    def _unmerge(self, merged_weight: torch.Tensor) -> torch.Tensor:
        T = torch.eye(self.d_out, dtype=merged_weight.dtype, device=merged_weight.device) + self.transform_update()
        W0, info = torch.linalg.solve_ex(T, merged_weight - self.residual())
        if int(info) != 0:
            raise ValueError("the transform T = I + ΔT is singular: W0 cannot be recovered (cannot unmerge)")
        return W0
