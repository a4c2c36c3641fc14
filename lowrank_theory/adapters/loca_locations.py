r"""LoCA and the sparse spectra of the frequency adapters: locations, product, location learning.

Frequency adapters (:mod:`lowrank_theory.adapters.frequency`) write the update as
:math:`\Delta W = s\,T_m^{-1} F\, T_n` for an orthonormal (or unitary) transform pair and a
spectrum :math:`F \in \mathbb{R}^{m \times n}` with :math:`c` nonzeros
:math:`F_{k_i l_i} = a_i`.  Applied to a batch of transformed inputs
:math:`\hat x = T_n x` the middle factor is a *sparse* matrix product,

.. math::  z_k = \sum_{i:\,k_i = k} a_i\, \hat x_{l_i},

computed here by one gather (the :math:`c` needed input coefficients), one multiply and
one scatter-add -- :math:`O(c)` per token, never an :math:`m \times n` array.  Its
backward pass gives, from the transformed output gradient :math:`\hat g = \partial L /
\partial z` (one row per token :math:`t`), the spectrum gradient at any cell

.. math::  G_{kl} = \frac{\partial L}{\partial F_{kl}} = \sum_t \hat g_{t k}\, \hat x_{t l},

so the coefficient gradient is :math:`c` dot products (:math:`G` at the :math:`c` support
cells) and LoCA's location estimate needs :math:`G` at :math:`4c` neighbouring cells only.

LoCA (Du et al., arXiv:2502.06820, Sec. 4) learns the discrete locations with a
finite-difference estimate of :math:`\partial L / \partial k_i` on the DCT spectrum:
:func:`loca_location_scores` computes it, :func:`loca_update_locations` takes a step on
the (rounded) real positions, as the authors do.  Verified against the authors'
code (``TL-UESTC/LoCA``, ``peft/src/peft/tuners/loca/layer.py``, class
``IdctWithIndexGrad``): their row gradient is
:math:`\tfrac12 a_i (K_{k+1,l} - K_{k-1,l})` with :math:`K = \mathrm{DCT2}(\partial L/\partial
\Delta W)` -- the spectrum gradient :math:`G` -- clipped to :math:`[-1, 1]`, indices clamped
to the border, followed by an optimizer step on real-valued locations that are rounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .. import backend
from ..method_index import Paper, adapter_entry
from .base import Adapter
from .params import Choice, Float, Int, Seed, Tensor, schema
from .registry import register
from .spectral_dense import PATHS, SpectralPaths

__all__ = [
    "LoCA",
    "SparseSpectrumMatmul",
    "check_locations",
    "check_n_frequency",
    "compute_dtype",
    "dense_spectrum",
    "loca_location_scores",
    "loca_update_locations",
    "random_locations",
]


def check_n_frequency(n_frequency: int, rows: int, cols: int) -> int:
    """Validate the number of spectrum entries ``1 <= n_frequency <= rows * cols``."""
    if isinstance(n_frequency, bool) or not isinstance(n_frequency, int):
        raise TypeError(f"n_frequency must be an int, got {type(n_frequency).__name__}")
    if not 1 <= n_frequency <= rows * cols:
        raise ValueError(
            f"n_frequency must satisfy 1 <= n_frequency <= {rows * cols} (= {rows} x {cols} spectrum cells), "
            f"got {n_frequency}"
        )
    return n_frequency


def random_locations(rows: int, cols: int, n_frequency: int, seed: int) -> torch.Tensor:
    """``n_frequency`` distinct cells of a ``rows x cols`` spectrum drawn from ``seed``, shape (c, 2).

    The same draw as PEFT's FourierFT: ``torch.randperm(rows * cols,
    generator=torch.Generator().manual_seed(seed))[:c]`` read row-major (``idx // cols``,
    ``idx % cols``), so every layer of one shape gets the same cells, and PEFT's indices can be
    compared to ours entry by entry.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"random_loc_seed must be an int, got {type(seed).__name__}")
    idx = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(seed))[:n_frequency]
    return torch.stack([idx // cols, idx % cols], dim=1)


def dense_spectrum(values: torch.Tensor, locations: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The (rows, cols) spectrum with ``values`` at ``locations``; duplicates add."""
    F = values.new_zeros(shape)
    return F.index_put((locations[:, 0], locations[:, 1]), values, accumulate=True)


def compute_dtype(x: torch.Tensor, p: torch.Tensor) -> torch.dtype:
    """The dtype the transforms run in: float32 or better."""
    # FFTs on CPU accept float32/float64 only (and half is too coarse for them anyway):
    # half inputs are transformed in float32 and the result cast back.
    return torch.promote_types(torch.promote_types(x.dtype, p.dtype), torch.float32)


def check_locations(locations: Any, shape: tuple[int, int], name: str = "locations") -> torch.Tensor:
    """Validate a (c, 2) integer tensor of (row, col) cells inside ``shape``; return it as int64.

    Raises
    ------
    TypeError
        If ``locations`` is not an integer torch tensor.
    ValueError
        If it is not of shape (c, 2) with c >= 1, or a cell lies outside ``shape``.
    """
    if not isinstance(locations, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (c, 2), got {type(locations).__name__}")
    if locations.is_floating_point() or locations.is_complex() or locations.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers (row, col), got dtype {locations.dtype}")
    if locations.ndim != 2 or locations.shape[1] != 2 or locations.shape[0] < 1:
        raise ValueError(f"{name} must have shape (c, 2) with c >= 1, got {tuple(locations.shape)}")
    m, n = shape
    rows, cols = locations[:, 0], locations[:, 1]
    if bool((rows < 0).any() | (rows >= m).any() | (cols < 0).any() | (cols >= n).any()):
        raise ValueError(f"{name} must lie in [0, {m}) x [0, {n}), got rows in "
                         f"[{int(rows.min())}, {int(rows.max())}] and cols in [{int(cols.min())}, {int(cols.max())}]")
    return locations.to(torch.int64)


def _finite_difference(coefficients, locations, G: Callable, shape) -> torch.Tensor:
    m, n = shape
    rows, cols = locations[:, 0], locations[:, 1]
    out = []
    for axis, size in ((0, m), (1, n)):
        idx = locations[:, axis]
        hi = (idx + 1).clamp(max=size - 1)
        lo = (idx - 1).clamp(min=0)
        width = (hi - lo).clamp(min=1).to(coefficients.dtype)  # 2 inside, 1 at a border, (0 -> 1) if size 1
        if axis == 0:
            diff = G(hi, cols) - G(lo, cols)
        else:
            diff = G(rows, hi) - G(rows, lo)
        out.append(coefficients * diff / width)
    return torch.stack(out, dim=1)


def loca_location_scores(
    coefficients: torch.Tensor,
    locations: torch.Tensor,
    spectrum_grad: torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    r"""LoCA's finite-difference estimate of the loss gradient with respect to each location.

    Parameters
    ----------
    coefficients : Tensor, shape (c,)
        The spectrum values :math:`a_i`.
    locations : Tensor of int, shape (c, 2)
        Their cells :math:`(k_i, l_i)` in the :math:`m \times n` spectrum.
    spectrum_grad : Tensor of shape (m, n), or callable ``(rows, cols) -> values``
        The spectrum gradient :math:`G = \partial L / \partial F`, dense, or as a function that
        evaluates it at index arrays (what the sparse backward pass supplies, so no dense
        :math:`G` is needed).
    shape : (int, int), optional
        :math:`(m, n)`; taken from ``spectrum_grad`` when it is a tensor.

    Returns
    -------
    Tensor, shape (c, 2)
        Column 0 estimates :math:`\partial L/\partial k_i`, column 1 :math:`\partial L/\partial l_i`.

    Raises
    ------
    ValueError
        On shape mismatches, out-of-range locations, or NaN/Inf in the inputs.

    Notes
    -----
    Moving coefficient :math:`i` from :math:`(k, l)` to :math:`(k', l')` changes :math:`F` by
    :math:`a_i (e_{k'l'} - e_{kl})`, so to first order :math:`\Delta L \approx a_i (G_{k'l'} -
    G_{kl})`.  Treating the row index as continuous, the central difference gives

    .. math::  \frac{\partial L}{\partial k_i} \approx \frac{a_i}{2}\bigl(G_{k+1,l} - G_{k-1,l}\bigr),

    and likewise for :math:`l_i` -- the estimator of the paper and of the authors' code.  At a
    border (:math:`k = 0` or :math:`m - 1`) we use the one-sided quotient
    :math:`a_i (G_{1,l} - G_{0,l})` (the authors clamp the index and keep the factor
    :math:`\tfrac12`, which halves the estimate there).  Clipping to :math:`[-1, 1]` is left to
    :func:`loca_update_locations`.

    The estimate is proportional to :math:`a_i`: a coefficient at zero never moves, which is
    why LoCA alternates, letting coefficient steps make :math:`a_i \ne 0` first.

    References
    ----------
    Z. Du et al., "LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient
    Fine-Tuning", ICLR 2025, arXiv:2502.06820 (Sec. 4.3-4.4).
    """
    if not isinstance(coefficients, torch.Tensor) or coefficients.ndim != 1:
        raise ValueError(f"coefficients must be a 1-D tensor of length c, got {getattr(coefficients, 'shape', None)}")
    if isinstance(spectrum_grad, torch.Tensor):
        if spectrum_grad.ndim != 2:
            raise ValueError(f"spectrum_grad must have shape (m, n), got {tuple(spectrum_grad.shape)}")
        if shape is not None and tuple(shape) != tuple(spectrum_grad.shape):
            raise ValueError(f"shape={tuple(shape)} disagrees with spectrum_grad of shape {tuple(spectrum_grad.shape)}")
        if not bool(torch.isfinite(spectrum_grad).all()):
            raise ValueError("spectrum_grad contains NaN or Inf values")
        shape = (spectrum_grad.shape[0], spectrum_grad.shape[1])
        dense = spectrum_grad

        def G(r, c):
            return dense[r, c]
    elif callable(spectrum_grad):
        if shape is None:
            raise ValueError("shape=(m, n) is required when spectrum_grad is a callable")
        G = spectrum_grad
    else:
        raise TypeError(f"spectrum_grad must be a tensor or a callable, got {type(spectrum_grad).__name__}")
    locations = check_locations(locations, shape)
    if locations.shape[0] != coefficients.shape[0]:
        raise ValueError(f"locations has {locations.shape[0]} rows but coefficients has length {coefficients.shape[0]}")
    if not bool(torch.isfinite(coefficients).all()):
        raise ValueError("coefficients contains NaN or Inf values")
    locations = locations.to(coefficients.device)
    return _finite_difference(coefficients.detach(), locations, G, shape)


@torch.no_grad()
def loca_update_locations(
    adapter: Any,
    scores: torch.Tensor | None = None,
    *,
    lr: float = 1.0,
    clip: float = 1.0,
    reset: bool = True,
) -> torch.Tensor:
    r"""One location step of LoCA: move coefficients along their estimated location gradient.

    Parameters
    ----------
    adapter : LoCA
        The adapter; its ``locations`` buffer (c, 2) and ``location_residual`` buffer (c, 2)
        are updated in place.
    scores : Tensor, shape (c, 2), optional
        Location-gradient estimates (:func:`loca_location_scores`).  Default: the adapter's
        ``location_grad``, accumulated by backward passes run with ``adapter.learn_locations = True``.
    lr : float
        Step size, in cells per unit of (clipped) estimate.
    clip : float
        Each estimate is clipped to ``[-clip, clip]`` first (the authors clip to [-1, 1]).
    reset : bool
        Zero ``adapter.location_grad`` afterwards (start the next accumulation).

    Returns
    -------
    Tensor of bool, shape (c,)
        Which coefficients changed cell.

    Raises
    ------
    ValueError
        If ``scores`` has the wrong shape or contains NaN/Inf, or ``lr``/``clip`` are not positive.

    Notes
    -----
    As in the authors' code, a location is a real position updated by gradient descent and
    rounded: with :math:`r_i \in \mathbb{R}^2` the sub-cell residual,

    .. math::  r_i \leftarrow r_i - \eta\,\mathrm{clip}(\widehat{\partial L/\partial(k_i, l_i)}),
       \qquad (k_i, l_i) \leftarrow (k_i, l_i) + [r_i], \qquad r_i \leftarrow r_i - [r_i],

    where :math:`[\cdot]` rounds half away from zero, and a coordinate pushed past the border
    is clamped (its residual dropped).  Estimates at round-off level therefore never move a
    coefficient, while a consistent estimate moves it after :math:`pprox 1/(2\eta)` steps.
    The authors keep normalized positions in [0, 1) (learning rate 1e-4 on them); we keep
    integer cells plus a residual, which is the same rule in cell units.  Two coefficients may
    land on one cell; they then add (the dense formula and the fast path both sum duplicates).

    References
    ----------
    Z. Du et al., arXiv:2502.06820, Sec. 4.4 (alternating coefficient/location steps).
    """
    for name, v in (("lr", lr), ("clip", clip)):
        if not (math.isfinite(float(v)) and float(v) > 0.0):
            raise ValueError(f"{name} must be a positive finite number, got {v}")
    locs = adapter.locations
    if scores is None:
        scores = adapter.location_grad
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(locs.shape):
        raise ValueError(f"scores must have shape {tuple(locs.shape)}, got {tuple(getattr(scores, 'shape', ()))}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contains NaN or Inf values")
    res = adapter.location_residual
    r = res.to(torch.float64) - float(lr) * scores.to(device=res.device, dtype=torch.float64).clamp(-clip, clip)
    step = torch.sign(r) * torch.floor(r.abs() + 0.5)
    limits = torch.tensor([adapter.d_out - 1, adapter.d_in - 1], device=locs.device)
    new = torch.minimum((locs + step.to(torch.int64)).clamp(min=0), limits)
    r = r - step
    r[(locs + step.to(torch.int64)) != new] = 0.0  # clamped at a border: drop the push
    moved = (new != locs).any(dim=1)
    locs.copy_(new)
    res.copy_(r.to(res.dtype))
    if reset:
        adapter.location_grad.zero_()
    return moved


class SparseSpectrumMatmul(torch.autograd.Function):
    r"""``z = S(a, k, l) x̂``: gather ``x̂[:, l]``, scale by ``a``, scatter-add into ``z[:, k]``.

    ``forward(xhat, coefficients, rows, cols, m, sink, probe)`` with ``xhat`` (N, n),
    ``coefficients`` (c,), ``rows``/``cols`` (c,) int64 and output ``z`` (N, m) -- the sparse
    spectrum applied to transformed inputs, :math:`O(Nc)`.

    Backward, from :math:`\hat g = \partial L/\partial z`:

    * :math:`\partial L/\partial a_i = \sum_t \hat g_{t k_i} \hat x_{t l_i}` (c dot products);
    * :math:`\partial L/\partial \hat x_{t l} = \sum_{i: l_i = l} a_i \hat g_{t k_i}` (a scatter);
    * if ``sink`` is a (c, 2) tensor, :func:`loca_location_scores` evaluated with
      :math:`G_{kl} = \sum_t \hat g_{tk}\hat x_{tl}` at the neighbour cells is *added* to it
      (side effect, like a gradient hook).  ``probe`` is a scalar that requires grad, passed
      only so that the backward runs when the coefficients are frozen (LoCA's location phase);
      it receives no gradient.
    """

    @staticmethod
    def forward(ctx, xhat, coefficients, rows, cols, m, sink=None, probe=None):
        vals = xhat.index_select(-1, cols) * coefficients
        z = xhat.new_zeros((*xhat.shape[:-1], m)).index_add_(-1, rows, vals)
        ctx.save_for_backward(xhat, coefficients, rows, cols)
        ctx.m = m
        ctx.sink = sink
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, gz):
        xhat, coefficients, rows, cols = ctx.saved_tensors
        g_rows = gz.index_select(-1, rows)  # (N, c)
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(xhat).index_add_(-1, cols, g_rows * coefficients)
        if ctx.needs_input_grad[1]:
            grad_a = (g_rows * xhat.index_select(-1, cols)).sum(dim=0)
        if ctx.sink is not None:
            def G(r, c):
                return (gz.index_select(-1, r) * xhat.index_select(-1, c)).sum(dim=0)

            locs = torch.stack([rows, cols], dim=1)
            est = _finite_difference(coefficients, locs, G, (ctx.m, xhat.shape[-1]))
            ctx.sink.add_(est.to(ctx.sink.dtype))
        return grad_x, grad_a, None, None, None, None, None


# ----------------------------------------------------------------------------- LoCA
@register
class LoCA(SpectralPaths, Adapter):
    r"""LoCA: :math:`\Delta W = s\,\mathrm{IDCT2}(F) = s\,C_m^\top F\, C_n` with learnable locations.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    n_frequency : int
        c, the number of spectral coefficients, ``1 <= c <= m n``.
    scale : float
        s (the authors' ``scale``, default 1).
    random_loc_seed : int
        Seed of the initial locations (c distinct cells drawn uniformly).
    locations : Tensor of int, shape (c, 2), optional
        Explicit initial (row, col) cells instead of the seeded draw.
    path : {"auto", "structured", "dense"}
        Per-token DCTs (``"structured"``, below), one product with the merged weight and the
        coefficient gradient from DCTs of x and of the output gradient (``"dense"``,
        :mod:`lowrank_theory.adapters.spectral_dense`), or whichever
        :func:`~lowrank_theory.adapters.spectral_dense.prefers_dense` finds cheaper for the
        call's token count (``"auto"``).  Same function, gradients and location estimates.

    Attributes
    ----------
    coefficients : Parameter (c,)
        :math:`a`, zero at init, so :math:`\Delta W = 0` (identity at init, as in the paper
        and the authors' code).
    locations : buffer int64 (c, 2)
        :math:`(k_i, l_i)`; persistent (in ``state_dict``) since they are learned.
    learn_locations : bool
        While ``True``, every backward pass adds the finite-difference location-gradient
        estimate to the ``location_grad`` buffer (c, 2) (see :func:`loca_location_scores`);
        then :func:`loca_update_locations` moves the coefficients (keeping the sub-cell
        part of each step in the ``location_residual`` buffer, not saved in ``state_dict``).

    Notes
    -----
    :math:`C_N` is the orthonormal DCT-II matrix, :math:`(C_N)_{kj} = \sigma_k \cos(\pi k
    (2j+1)/2N)`, :math:`\sigma_0 = \sqrt{1/N}`, :math:`\sigma_k = \sqrt{2/N}`, so
    ``scipy.fft.idctn(F, norm="ortho")`` :math:`= C_m^\top F C_n` -- the paper's
    :math:`W' = W_0 + \alpha\, C^\top \mathcal S(a, l, 1)\, D` and the authors' ``ori_idct2d``.

    Fast path: :math:`y = s\, C_m^\top z`, :math:`z = \mathcal S(a, l)\,(C_n x)` with
    :class:`SparseSpectrumMatmul`; one DCT of length n and one inverse DCT of length m per
    token (FFT-based, :func:`lowrank_theory.backend.dct`).  The coefficient gradient is then
    :math:`\partial L/\partial a_i = \sum_t \hat g_{t k_i} \hat x_{t l_i}` with
    :math:`\hat g = s\,C_m\, \partial L/\partial y` (the adjoint of the inverse DCT is the DCT):
    c dot products of the transformed input and output gradient, never a dense
    :math:`\partial L/\partial \Delta W`.

    Training alternates (Sec. 4.4; authors: 10 coefficient steps, then 20 location steps,
    for the first ~10% of training, then coefficients only): coefficient steps with
    ``learn_locations = False``; location phases with ``learn_locations = True``
    (coefficients may be frozen) followed by :func:`loca_update_locations`.

    Initial locations: the authors draw uniform reals in [0, 1), scale by (m−1, n−1) and
    round (duplicates possible, border cells half as likely); we draw c *distinct* cells
    uniformly.  Trainable count: c (as in the paper; locations are buffers).

    References
    ----------
    Z. Du et al., "LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient
    Fine-Tuning", ICLR 2025, arXiv:2502.06820.
    """

    index_entry = adapter_entry(
        "loca",
        Paper("LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient Fine-Tuning", "2502.06820"),
        "n_frequency",
        (
            "tests/adapters/test_loca_locations.py",
            "tests/adapters/test_frequency.py",
            "tests/adapters/test_spectral_dense.py",
        ),
        proofs=(
            "proofs/07-loca-idct-vs-idft.md",
            "proofs/08-frequency-vs-lowrank-regimes.md",
            "proofs/06-best-c-term.md",
            "proofs/17-dct-orthonormal.md",
            "proofs/18-spectral-coefficient-gradient.md",
        ),
        notebooks=("notebooks/01_expressivity.py", "notebooks/02_loca_regimes.py"),
        peft="none (its PEFT peer in benchmarks and tests is peft.FourierFTConfig at the same budget)",
    )

    name = "loca"
    execution_keys: ClassVar[tuple[str, ...]] = ("path",)
    params = schema(
        n_frequency=Int(1, doc="c, the number of trained DCT coefficients"),
        scale=Float(doc="alpha, the scale of the update"),
        random_loc_seed=Seed(doc="seed of the initial locations"),
        locations=Tensor(doc="(c, 2) initial locations instead of random ones"),
        path=Choice(*PATHS, doc="how the update is computed (not what it is)"),
    )

    def __init__(
        self,
        d_out: int,
        d_in: int,
        n_frequency: int = 1000,
        scale: float = 1.0,
        random_loc_seed: int = 777,
        locations: torch.Tensor | None = None,
        path: str = "auto",
    ) -> None:
        super().__init__(d_out, d_in)
        check_n_frequency(n_frequency, d_out, d_in)
        self.scale = scale
        self.n_frequency = n_frequency
        self.path = path
        if locations is None:
            locs = random_locations(d_out, d_in, n_frequency, random_loc_seed)
        else:
            locs = check_locations(locations, (d_out, d_in)).cpu()
            if locs.shape[0] != n_frequency:
                raise ValueError(f"locations must have n_frequency={n_frequency} rows, got {locs.shape[0]}")
        self.coefficients = nn.Parameter(torch.zeros(n_frequency))
        self.register_buffer("locations", locs.clone())
        self.register_buffer("location_grad", torch.zeros(n_frequency, 2), persistent=False)
        self.register_buffer("location_residual", torch.zeros(n_frequency, 2), persistent=False)
        self.learn_locations = False

    @classmethod
    def param_count(cls, d_out: int, d_in: int, n_frequency: int = 1000, **_: Any) -> int:
        return n_frequency

    def set_locations(self, locations: torch.Tensor) -> None:
        """Replace the (c, 2) locations (validated; ``ValueError`` naming ``locations``)."""
        locs = check_locations(locations, (self.d_out, self.d_in))
        if locs.shape[0] != self.n_frequency:
            raise ValueError(f"locations must have n_frequency={self.n_frequency} rows, got {locs.shape[0]}")
        with torch.no_grad():
            self.locations.copy_(locs.to(self.locations.device))
            self.location_residual.zero_()

    def spectrum(self) -> torch.Tensor:
        """Dense (m, n) spectrum F (duplicates add) -- for tests and location analysis."""
        return dense_spectrum(self.coefficients, self.locations, (self.d_out, self.d_in))

    def _delta(self, values: torch.Tensor) -> torch.Tensor:
        cdt = torch.promote_types(values.dtype, torch.float32)
        # the scale on the c values, not on the m×n result; no name holds the spectrum, so it is
        # freed before the second transform runs (one weight-sized tensor fewer at the peak)
        return backend.idct(backend.idct(
            dense_spectrum(values.to(cdt) * self.scale, self.locations, (self.d_out, self.d_in)), axis=0), axis=1)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Dense :math:`s\\,C_m^\\top F C_n` (inverse DCT along both axes)."""
        return self._delta(self.coefficients).to(self.coefficients.dtype)

    def dense_delta(self, coefficients: torch.Tensor) -> torch.Tensor:
        """:math:`\\Delta W` for the dense path: float32 or better, no autograd."""
        return self._delta(coefficients.detach())

    def coefficient_grad(self, x2, g2, coefficients, need, probed):
        r""":math:`\partial L/\partial a_i = \sum_t \hat g_{t k_i}\hat x_{t l_i}`.

        Here :math:`\hat x = C_n x_t` and :math:`\hat g = s\,C_m g_t`; :math:`\hat g` is the
        gradient of the structured path's :math:`z` (the adjoint of the orthonormal inverse DCT is
        the DCT), so with ``learn_locations`` the location estimate added to ``location_grad`` is
        the structured path's, from the same :math:`\hat x, \hat g`.
        """
        sink = self.location_grad if probed else None
        if not need and sink is None:
            return None
        cdt = compute_dtype(x2, coefficients)
        xhat = backend.dct(x2.to(cdt), axis=-1).T.contiguous()  # (n, T): the gathers below copy rows
        ghat = (backend.dct(g2.to(cdt), axis=-1) * self.scale).T.contiguous()  # (m, T)

        def G(r, c):
            return (ghat.index_select(0, r) * xhat.index_select(0, c)).sum(dim=1)

        if sink is not None:
            est = _finite_difference(coefficients.to(cdt), self.locations, G, (self.d_out, self.d_in))
            sink.add_(est.to(sink.dtype))
        return G(self.locations[:, 0], self.locations[:, 1]) if need else None

    def _values(self) -> torch.Tensor:
        return self.coefficients

    def _probe(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.learn_locations and torch.is_grad_enabled():
            return torch.ones((), dtype=compute_dtype(x, self.coefficients), device=x.device, requires_grad=True)
        return None

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        if self._use_dense(x):
            return self._dense(x)
        cdt = compute_dtype(x, self.coefficients)
        xhat = backend.dct(x.reshape(-1, self.d_in).to(cdt), axis=-1)
        probe = self._probe(x)
        sink = self.location_grad if probe is not None else None
        z = SparseSpectrumMatmul.apply(
            xhat, self.coefficients.to(cdt), self.locations[:, 0], self.locations[:, 1], self.d_out, sink, probe
        )
        y = backend.idct(z, axis=-1) * self.scale
        return y.reshape(*x.shape[:-1], self.d_out).to(x.dtype)
