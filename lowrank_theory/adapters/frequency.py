r"""Frequency / transform-domain adapters: FourierFT, LoCA and a QWHA-style WHT adapter.

Each parametrizes :math:`\Delta W = s\, T_m^{*} F\, T_n` -- an inverse 2-D transform of a
spectrum :math:`F \in \mathbb{R}^{m \times n}` that is zero except :math:`c` entries
:math:`F_{k_i l_i} = a_i`.  The forward pass never builds :math:`F` or :math:`\Delta W`:

1. transform the input along its feature axis, :math:`\hat x = T_n x` (rFFT, DCT or WHT:
   :math:`O(n \log n)` per token);
2. :math:`z_k = \sum_{i:\,k_i = k} a_i \hat x_{l_i}` -- gather the :math:`c` needed input
   coefficients, multiply, scatter-add into an :math:`m`-vector (:math:`O(c)`);
3. inverse-transform along the output axis, :math:`y = s\, T_m^{*} z` (:math:`O(m\log m)`).

Cost :math:`O(n\log n + c + m \log m)` per token instead of the :math:`O(mn)` of a dense
product (and the :math:`O(mn \log(mn))` per step of building :math:`\Delta W` by a 2-D
inverse FFT, as PEFT's FourierFT does in every forward).

LoCA lives in :mod:`lowrank_theory.adapters.loca_locations` beside its location learning and
the shared sparse-spectrum product; this module re-exports it, so importing the family
registers all three.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..linalg import wht
from ..method_index import Paper, adapter_entry
from .base import Adapter
from .loca_locations import (
    LoCA,
    SparseSpectrumMatmul,
    check_n_frequency,
    compute_dtype,
    dense_spectrum,
    loca_location_scores,
    loca_update_locations,
    random_locations,
)
from .params import Bool, Choice, Float, Int, Seed, schema
from .registry import register
from .spectral_dense import PATHS, SpectralPaths, gather_columns

__all__ = [
    "QWHA",
    "FourierFT",
    "LoCA",  # defined in loca_locations.py with its location learning; registered on import
    "check_n_frequency",
    "loca_location_scores",
    "loca_update_locations",
    "random_locations",
]


# ----------------------------------------------------------------------------- FourierFT
@register
class FourierFT(SpectralPaths, Adapter):
    r"""FourierFT: :math:`\Delta W = s\,\mathrm{Re}\,\mathrm{IDFT2}(F)` with :math:`c` fixed random frequencies.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    n_frequency : int
        c, the number of trainable spectral entries, ``1 <= c <= m n``.
    scaling : float
        s (PEFT's ``scaling``; its default 150).
    random_loc_seed : int
        Seed of the frequency locations (PEFT's ``random_loc_seed``, default 777); layers of
        one shape share them.
    init_weights : bool
        ``False`` (PEFT's default and the paper's code): spectrum :math:`\sim \mathcal N(0, 1)`,
        so :math:`\Delta W \neq 0` at init.  ``True``: spectrum 0 (identity at init).
    seed : int, optional
        Seed of the Gaussian spectrum init (PEFT draws from the global RNG; ``None`` does too).
    path : {"auto", "structured", "dense"}
        How the layer applies the update: per-token transforms (``"structured"``, below), one
        product with the merged weight :math:`W_0 + \Delta W` and the coefficient gradient from
        transforms of x and of the output gradient (``"dense"``,
        :mod:`lowrank_theory.adapters.spectral_dense`), or whichever
        :func:`~lowrank_theory.adapters.spectral_dense.prefers_dense` finds cheaper for the
        call's token count (``"auto"``).  All three compute the same function and gradients.

    Notes
    -----
    **Convention** (PEFT's, so its spectra load unchanged): ``torch.fft.ifft2`` with the
    "backward" norm,

    .. math::
        \Delta W_{pq} = \frac{s}{mn}\,\mathrm{Re}\sum_{i=1}^{c} a_i\,
        \omega_m^{k_i p}\,\omega_n^{l_i q}, \qquad \omega_N = e^{2\pi \mathrm{i}/N},

    i.e. :math:`\Delta W = \tfrac{s}{mn}\mathrm{Re}(\Omega_m F \Omega_n)` with the symmetric
    :math:`\Omega_N = [\omega_N^{pk}]`.

    **Fast path.**  For real :math:`x`, :math:`\mathrm{Re}(\cdot)` commutes with the real
    product, so :math:`\Delta W x = s\,\mathrm{Re}\bigl(\tfrac1m\Omega_m\, F\, \tfrac1n\Omega_n x\bigr)`:

    * :math:`u = \tfrac1n \Omega_n x = \mathrm{ifft}_n(x) = \overline{\mathrm{fft}_n(x)}/n`; from the
      real FFT :math:`X = \mathrm{rfft}(x)` (length :math:`\lfloor n/2\rfloor + 1`),
      :math:`u_l = \overline{X_l}/n` for :math:`l \le n/2` and :math:`u_l = X_{n-l}/n` otherwise;
    * :math:`z_k = \sum_{i: k_i = k} a_i u_{l_i}` (gather, multiply, ``index_add``);
    * :math:`y = s\,\mathrm{Re}(\mathrm{ifft}_m(z)) = s\,\mathrm{irfft}_m(h)` with the Hermitian part
      :math:`h_k = \tfrac12 (z_k + \overline{z_{-k \bmod m}})`, :math:`k \le m/2`, since
      :math:`\mathrm{ifft}(\overline{z_{-\cdot}}) = \overline{\mathrm{ifft}(z)}`.

    Cost per token: one rFFT of length n, 2c gathered products, one irFFT of length m.
    Trainable count: c.

    **Init.**  PEFT (``init_weights=False`` default) and the paper's code draw the spectrum
    from :math:`\mathcal N(0, 1)`: the update is *not* zero at init, so the class sets
    ``identity_at_init = False`` (the contract's identity test is skipped); pass
    ``init_weights=True`` for a zero spectrum.

    References
    ----------
    Z. Gao et al., "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform",
    ICML 2024, arXiv:2405.03003.  PEFT: ``src/peft/tuners/fourierft/layer.py``.
    """

    index_entry = adapter_entry(
        "fourierft",
        Paper("Parameter-Efficient Fine-Tuning with Discrete Fourier Transform", "2405.03003"),
        "n_frequency",
        (
            "tests/adapters/test_frequency.py",
            "tests/adapters/test_peft_fourierft.py",
            "tests/adapters/test_spectral_dense.py",
        ),
        proofs=("proofs/07-loca-idct-vs-idft.md", "proofs/18-spectral-coefficient-gradient.md"),
        notebooks=("notebooks/01_expressivity.py",),
        peft="peft.FourierFTConfig",
        peft_test="tests/adapters/test_peft_fourierft.py",
    )

    name = "fourierft"
    execution_keys: ClassVar[tuple[str, ...]] = ("path",)
    identity_at_init = False  # per instance: True with init_weights=True
    params = schema(
        n_frequency=Int(1, doc="c, the number of trained spectrum entries"),
        scaling=Float(doc="s, the scale of the update"),
        random_loc_seed=Seed(doc="seed of the fixed locations (PEFT's random_loc_seed)"),
        init_weights=Bool(doc="zero spectrum (True) or N(0, 1) draws (False, PEFT's default)"),
        seed=Seed(none_ok=True, doc="seed of the N(0, 1) spectrum draw; None uses torch's global RNG"),
        path=Choice(*PATHS, doc="how the update is computed (not what it is)"),
    )

    def __init__(
        self,
        d_out: int,
        d_in: int,
        n_frequency: int = 1000,
        scaling: float = 150.0,
        random_loc_seed: int = 777,
        init_weights: bool = False,
        seed: int | None = 0,
        path: str = "auto",
    ) -> None:
        super().__init__(d_out, d_in)
        check_n_frequency(n_frequency, d_out, d_in)
        self.scaling = scaling
        self.n_frequency = n_frequency
        self.path = path
        self.identity_at_init = init_weights
        locs = random_locations(d_out, d_in, n_frequency, random_loc_seed)
        cols = locs[:, 1]
        self.register_buffer("locations", locs, persistent=False)
        # u_l from the rFFT: index min(l, n - l), conjugated when l <= n/2
        self.register_buffer("_rfft_index", torch.where(cols <= d_in // 2, cols, d_in - cols), persistent=False)
        self.register_buffer("_conj", cols <= d_in // 2, persistent=False)
        self.register_buffer("_neg_index", (-torch.arange(d_out // 2 + 1)) % d_out, persistent=False)
        rows = locs[:, 0]
        # ΔW's half spectrum (see _delta): the cells (k, l) and (-k, -l) that fall in columns <= n/2
        both_r, both_c = torch.cat([rows, (-rows) % d_out]), torch.cat([cols, (-cols) % d_in])
        keep = both_c <= d_in // 2
        # which coefficient each kept cell takes (an index, not a mask: no host sync on CUDA)
        self.register_buffer("_half_src", torch.nonzero(keep).squeeze(1) % n_frequency, persistent=False)
        self.register_buffer("_half_rows", both_r[keep], persistent=False)
        self.register_buffer("_half_cols", both_c[keep], persistent=False)
        # the dense path's backward reads fft(g)_k and fft(x)_l from rFFTs: past the middle the
        # entry is the conjugate of the mirrored one, so the product of the two imaginary parts
        # changes sign when exactly one of k, l is past the middle
        self.register_buffer("_row_rfft_index", torch.where(rows <= d_out // 2, rows, d_out - rows), persistent=False)
        flips = (rows > d_out // 2) ^ (cols > d_in // 2)
        self.register_buffer("_imag_sign", 1.0 - 2.0 * flips.to(torch.float32), persistent=False)
        if init_weights:
            values = torch.zeros(n_frequency)
        else:
            g = torch.Generator().manual_seed(seed) if seed is not None else None
            values = torch.randn(n_frequency, generator=g)
        self.spectrum = nn.Parameter(values)

    @classmethod
    def param_count(cls, d_out: int, d_in: int, n_frequency: int = 1000, **_: Any) -> int:
        return n_frequency

    def _delta(self, values: torch.Tensor) -> torch.Tensor:
        r""":math:`s\,\mathrm{Re}\,\mathrm{ifft2}(F)` by a half-size inverse real FFT.

        For real :math:`F`, :math:`\mathrm{Re}\,\mathrm{ifft2}(F) = \mathrm{ifft2}(H)` with the
        Hermitian part :math:`H_{kl} = \tfrac12(F_{kl} + F_{-k,-l})` (the cosine sums agree, the
        sine sums cancel), and ``irfft2`` needs only the columns :math:`l \le n/2` of :math:`H`:
        each coefficient puts :math:`a_i/2` at :math:`(k_i, l_i)` and at :math:`(-k_i, -l_i)`
        (indices mod m, n), those that land in that half are kept.  Half the transform work and
        memory of ``ifft2(F).real`` (PEFT's formula), same result to round-off.
        """
        cdt = torch.promote_types(values.dtype, torch.float32)
        m, n = self.d_out, self.d_in
        v = values.to(cdt) * 0.5
        H = v.new_zeros(m, n // 2 + 1).index_put(
            (self._half_rows, self._half_cols), v.index_select(0, self._half_src), accumulate=True
        )
        return torch.fft.irfft2(torch.complex(H, torch.zeros_like(H)), s=(m, n)) * self.scaling

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Dense :math:`s\\,\\mathrm{Re}(\\mathrm{ifft2}(F))` (for merging and tests; PEFT's formula)."""
        return self._delta(self.spectrum).to(self.spectrum.dtype)

    def _values(self) -> torch.Tensor:
        return self.spectrum

    def dense_delta(self, coefficients: torch.Tensor) -> torch.Tensor:
        """:math:`\\Delta W` for the dense path: float32 or better, no autograd."""
        return self._delta(coefficients.detach())

    def coefficient_grad(self, x2, g2, coefficients, need, probed=False):
        r""":math:`\partial L/\partial a_i = \tfrac{s}{mn}\sum_t \mathrm{Re}(\hat G_{t k_i}\hat X_{t l_i})`.

        With :math:`\hat X = \mathrm{fft}(x_t)`, :math:`\hat G = \mathrm{fft}(g_t)`: since
        :math:`\Delta W_{pq} = \tfrac{s}{mn}\sum_i a_i \cos 2\pi(k_i p/m + l_i q/n)` and
        :math:`\sum_p g_p e^{2\pi\mathrm{i}kp/m} = \overline{\hat G_k}` for real g,
        :math:`\sum_{pq} g_p x_q\,\partial \Delta W_{pq}/\partial a_i = \tfrac{s}{mn}
        \mathrm{Re}(\overline{\hat G_{k_i}}\,\overline{\hat X_{l_i}})
        = \tfrac{s}{mn}(\hat G^r \hat X^r - \hat G^i \hat X^i)`.  Both come from rFFTs
        (:math:`\hat X_l = \overline{\hat X_{n-l}}` for :math:`l > n/2`).
        """
        if not need:
            return None
        cdt = compute_dtype(x2, coefficients)
        X = gather_columns(torch.fft.rfft(x2.to(cdt), dim=-1), self._rfft_index)  # (c, T)
        G = gather_columns(torch.fft.rfft(g2.to(cdt), dim=-1), self._row_rfft_index)
        rr, ii = (torch.view_as_real(G) * torch.view_as_real(X)).sum(dim=1).unbind(-1)  # (c,), (c,)
        dot = rr - self._imag_sign.to(cdt) * ii
        return dot * (self.scaling / (self.d_out * self.d_in))

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        if self._use_dense(x):
            return self._dense(x)
        m, n = self.d_out, self.d_in
        cdt = compute_dtype(x, self.spectrum)
        xf = x.reshape(-1, n).to(cdt)
        X = torch.fft.rfft(xf, dim=-1).index_select(-1, self._rfft_index)  # (N, c)
        ur = X.real / n
        ui = torch.where(self._conj, -X.imag, X.imag) / n
        a = self.spectrum.to(cdt)
        rows = self.locations[:, 0]
        zr = xf.new_zeros(xf.shape[0], m).index_add(-1, rows, ur * a)
        zi = xf.new_zeros(xf.shape[0], m).index_add(-1, rows, ui * a)
        half = m // 2 + 1
        hr = 0.5 * (zr[:, :half] + zr.index_select(-1, self._neg_index))
        hi = 0.5 * (zi[:, :half] - zi.index_select(-1, self._neg_index))
        y = torch.fft.irfft(torch.complex(hr, hi), n=m, dim=-1) * self.scaling
        return y.reshape(*x.shape[:-1], m).to(x.dtype)


# ----------------------------------------------------------------------------- QWHA
def _next_pow2(k: int) -> int:
    return 1 << (k - 1).bit_length()


def _wht(x: torch.Tensor, axis: int = -1) -> torch.Tensor:
    # orthonormal, natural (Sylvester) order, O(n log n); inputs here are finite by construction
    return wht(x, axis=axis, check_finite=False)


_AXES = ("both", "input")


@register
class QWHA(Adapter):
    r"""QWHA-style Walsh–Hadamard adapter: :math:`\Delta W = s\,[H_M^\top F H_N]_{:m,\,:n}`.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight; any sizes (see *Padding*).
    n_frequency : int
        c, the number of spectral values, ``1 <= c <= M N``.
    scale : float
        s.
    axes : {"both", "input"}
        ``"both"`` (default, as in ``methods.md``): the 2-D transform above.  ``"input"``: the
        paper's own form :math:`\Delta W = F H^{-1}` (its Fig. 1; ``H^{-1} = H`` here), a
        transform along the input axis only, :math:`\Delta W = s\,[F H_N]_{:, :n}` with F of
        shape (m, N) -- cheaper (no output transform) and what the released code does.
    random_loc_seed : int
        Seed of the initial locations (c distinct cells) for a plain construction;
        :meth:`from_weight` replaces them.

    Notes
    -----
    :math:`H_N` is the orthonormal Sylvester–Hadamard matrix
    (:math:`H_1 = 1`, :math:`H_{2N} = \tfrac{1}{\sqrt 2}\begin{bmatrix}H_N & H_N\\ H_N & -H_N\end{bmatrix}`),
    symmetric and involutory, applied by the fast transform :func:`lowrank_theory.linalg.wht`.

    **Padding.**  :math:`M, N` are the next powers of two :math:`\ge m, n`.  The input is
    zero-padded to length N and the output cropped to its first m entries, so
    :math:`\Delta W` is the top-left :math:`m \times n` block of the :math:`M \times N` matrix
    :math:`s H_M^\top F H_N`.  (Powers of two give the plain formula.)  The cropped basis is no
    longer orthonormal, which is why :meth:`from_weight` refines the values by least squares.

    **Fast path.**  :math:`y = s\,[H_M^\top z]_{:m}`, :math:`z = \mathcal S(a, k, l)\,
    H_N \begin{bmatrix}x\\0\end{bmatrix}` -- two fast WHTs (:math:`O(N \log N + M \log M)`) and
    a c-term gather/scatter (:class:`SparseSpectrumMatmul`).

    **Init.**  A plain construction has F = 0 (identity).  :meth:`from_weight` reads the
    frozen weight: it quantizes :math:`W_0`, takes the quantization error
    :math:`E = W_0 - Q(W_0)`, picks the c largest-magnitude entries of
    :math:`\hat E = H_M \,\mathrm{pad}(E)\, H_N^\top` (the minimum-norm exact spectrum of E),
    refines their values by least squares, and returns ``(adapter, Q(W0))`` so that
    :math:`Q(W_0) + \Delta W \approx W_0` at the start of fine-tuning.

    What we checked in the paper and its code (``vantaa89/qwha``, ``src/init/initialize.py``):
    the paper writes :math:`\Delta W = F H^{-1}` (``axes="input"``); its initialization
    ("adaptive parameter selection and value refinement") allots the budget to output
    channels in proportion to their error norm, picks per channel the largest coefficients of
    the least-squares solution, and refines the values by least squares weighted by calibration
    activations (:math:`(X^\top X)^{1/2}`).  Here the budget is global (the best c-term choice
    for the unweighted error) and no calibration data is used.

    References
    ----------
    H. Jeon et al., "QWHA: Quantization-Aware Walsh-Hadamard Adaptation for Parameter-Efficient
    Fine-Tuning on Large Language Models", arXiv:2509.17428 (2025); code github.com/vantaa89/qwha.
    """

    index_entry = adapter_entry(
        "qwha",
        Paper(("QWHA: Quantization-Aware Walsh-Hadamard Adaptation for Parameter-Efficient Fine-Tuning on Large "
               "Language Models"), "2509.17428"),
        "n_frequency",
        ("tests/adapters/test_frequency.py",),
        proofs=("proofs/13-walsh-hadamard.md", "proofs/06-best-c-term.md"),
        notebooks=("notebooks/01_expressivity.py",),
    )

    name = "qwha"
    #: The base weight from_weight returns is already quantized (inject packs it without a second rounding).
    quantizes_base = True
    params = schema(
        n_frequency=Int(1, doc="c, the number of trained Walsh-Hadamard coefficients"),
        scale=Float(doc="s, the scale of the update"),
        axes=Choice(*_AXES, doc="transform both axes, or the input axis only (the paper's F H^-1)"),
        random_loc_seed=Seed(doc="seed of the locations of create() without a weight"),
    )

    def __init__(
        self,
        d_out: int,
        d_in: int,
        n_frequency: int = 1000,
        scale: float = 1.0,
        axes: str = "both",
        random_loc_seed: int = 777,
    ) -> None:
        super().__init__(d_out, d_in)
        self.axes = axes
        self.M = _next_pow2(d_out) if axes == "both" else d_out
        self.N = _next_pow2(d_in)
        check_n_frequency(n_frequency, self.M, self.N)
        self.scale = scale
        self.n_frequency = n_frequency
        self.values = nn.Parameter(torch.zeros(n_frequency))
        self.register_buffer("locations", random_locations(self.M, self.N, n_frequency, random_loc_seed))

    @classmethod
    def param_count(cls, d_out: int, d_in: int, n_frequency: int = 1000, **_: Any) -> int:
        return n_frequency

    def _synthesis(self, F: torch.Tensor) -> torch.Tensor:
        """Dense ``s [H_M^T F H_N]_{:m,:n}`` of an (M, N) spectrum."""
        out = _wht(F, axis=-1)  # F H_N^T = F H_N (symmetric)
        if self.axes == "both":
            out = _wht(out, axis=0)  # H_M (F H_N) = H_M^T F H_N
        return out[: self.d_out, : self.d_in] * self.scale

    def _analysis(self, R: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`_synthesis`: ``s H_M pad(R) H_N^T`` as an (M, N) array."""
        P = R.new_zeros(self.M, self.N)
        P[: self.d_out, : self.d_in] = R
        out = _wht(P, axis=-1)
        if self.axes == "both":
            out = _wht(out, axis=0)
        return out * self.scale

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        cdt = torch.promote_types(self.values.dtype, torch.float32)
        F = dense_spectrum(self.values.to(cdt), self.locations, (self.M, self.N))
        return self._synthesis(F).to(self.values.dtype)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        cdt = compute_dtype(x, self.values)
        xf = x.reshape(-1, self.d_in).to(cdt)
        if self.N != self.d_in:
            xf = torch.nn.functional.pad(xf, (0, self.N - self.d_in))
        xhat = _wht(xf, axis=-1)
        z = SparseSpectrumMatmul.apply(xhat, self.values.to(cdt), self.locations[:, 0], self.locations[:, 1], self.M)
        if self.axes == "both":
            z = _wht(z, axis=-1)[:, : self.d_out]
        return (z * self.scale).reshape(*x.shape[:-1], self.d_out).to(x.dtype)

    @classmethod
    def from_weight(
        cls,
        W: torch.Tensor,
        n_frequency: int,
        *,
        quantizer: str | Any = "nf4",
        scale: float = 1.0,
        axes: str = "both",
        refine: bool = True,
        max_iter: int = 200,
        **quant_kwargs: Any,
    ) -> tuple[QWHA, torch.Tensor]:
        r"""Initialize from a frozen weight so that :math:`Q(W_0) + \Delta W \approx W_0`.

        Parameters
        ----------
        W : Tensor, shape (m, n)
            The frozen full-precision weight :math:`W_0` (finite floating tensor).
        n_frequency : int
            c, the number of spectral values.
        quantizer : {"nf4", "uniform"} or callable
            ``"nf4"`` (default) / ``"uniform"``: :func:`lowrank_theory.linalg.quantize_nf4` /
            :func:`~lowrank_theory.linalg.quantize_uniform` (the latter needs ``bits=``); a
            callable ``W -> Q(W)`` (same shape) is used as is.  ``quant_kwargs`` are passed on
            (``bits``, ``block_size``, ...).
        scale : float
            s.
        axes : {"both", "input"}
            See the class.
        refine : bool
            Refine the selected values by least squares (``scipy.sparse.linalg.lsqr`` on the
            structured operator; never a dense design matrix).  Without padding the selected
            values are already optimal and this changes nothing.
        max_iter : int
            Iteration cap of the refinement.

        Returns
        -------
        adapter : QWHA
            On ``W``'s device and dtype.
        base : Tensor, shape (m, n)
            :math:`Q(W_0)`, the new frozen weight (dequantized values; ``inject(..., quantize_base="nf4")``
            stores it packed as a :class:`~lowrank_theory.adapters.quantized_base.QuantizedLinear`,
            the same codes, so E is exactly the stored base's error).

        Raises
        ------
        TypeError, ValueError
            Bad ``W`` (not a finite 2-D floating tensor), ``n_frequency`` out of range, an
            unknown ``quantizer`` or one returning the wrong shape / non-finite values.

        Notes
        -----
        With :math:`\mathcal A(F) = s\,[H_M^\top F H_N]_{:m,:n}` (so :math:`\mathcal A \mathcal A^* =
        s^2 I`), the minimum-norm spectrum reproducing :math:`E` exactly is
        :math:`\hat E = \mathcal A^*(E)/s^2`.  We keep its c largest :math:`|\hat E_{kl}|`
        (for powers of two :math:`\mathcal A` is orthogonal up to s, so this is the best
        c-term approximation by Parseval) and then solve
        :math:`\min_{f \in \mathbb R^c} \|E - \mathcal A(P_S f)\|_F` on that support.
        """
        import numpy as np
        import scipy.sparse.linalg as spla

        if not isinstance(W, torch.Tensor) or not W.is_floating_point():
            raise TypeError(f"W must be a floating torch.Tensor, got {type(W).__name__}")
        if W.ndim != 2:
            raise ValueError(f"W must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
        if not bool(torch.isfinite(W).all()):
            raise ValueError("W contains NaN or Inf values")
        Q = _quantize(W, quantizer, quant_kwargs)
        m, n = W.shape
        ad = cls(m, n, n_frequency=n_frequency, scale=scale, axes=axes).double()
        E = (W.detach().double() - Q.double()).cpu()
        s2 = ad.scale**2
        Ehat = ad._analysis(E) / s2
        idx = torch.topk(Ehat.abs().flatten(), n_frequency).indices
        locs = torch.stack([idx // ad.N, idx % ad.N], dim=1)
        f = Ehat.flatten()[idx]
        if refine and (ad.M, ad.N) != (m, n):
            rows, cols = locs[:, 0], locs[:, 1]

            def matvec(v):
                F = dense_spectrum(torch.from_numpy(np.asarray(v, dtype=np.float64).ravel()), locs, (ad.M, ad.N))
                return ad._synthesis(F).flatten().numpy()

            def rmatvec(r):
                R = torch.from_numpy(np.asarray(r, dtype=np.float64).ravel()).reshape(m, n)
                return ad._analysis(R)[rows, cols].numpy()

            op = spla.LinearOperator((m * n, n_frequency), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
            sol = spla.lsqr(op, E.flatten().numpy(), x0=f.numpy(), atol=1e-14, btol=1e-14, iter_lim=max_iter)
            f = torch.from_numpy(sol[0])
        with torch.no_grad():
            ad.locations.copy_(locs)
            ad.values.copy_(f)
        ad.identity_at_init = False  # Q(W0) + ΔW approximates W0; equal only where c covers the error
        return ad.to(device=W.device, dtype=W.dtype), Q.to(device=W.device, dtype=W.dtype)


def _quantize(W: torch.Tensor, quantizer: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """Apply the named linalg quantizer or a callable; validate its output."""
    if isinstance(quantizer, str):
        from .. import linalg

        names = {"uniform": "quantize_uniform", "nf4": "quantize_nf4"}
        if quantizer not in names:
            raise ValueError(f"quantizer must be 'uniform', 'nf4' or a callable, got {quantizer!r}")
        fn = getattr(linalg, names[quantizer])
    elif callable(quantizer):
        fn = quantizer
    else:
        raise TypeError(f"quantizer must be 'uniform', 'nf4' or a callable, got {type(quantizer).__name__}")
    with torch.no_grad():
        Q = fn(W.detach(), **kwargs)
    if not isinstance(Q, torch.Tensor) or tuple(Q.shape) != tuple(W.shape):
        raise ValueError(f"quantizer must return a tensor of shape {tuple(W.shape)}, got {type(Q).__name__} "
                         f"of shape {tuple(getattr(Q, 'shape', ()))}")
    if not bool(torch.isfinite(Q).all()):
        raise ValueError("quantizer returned NaN or Inf values")
    return Q
