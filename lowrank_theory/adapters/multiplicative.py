r"""Multiplicative adapters: the method defines the merged weight from :math:`W_0`.

* :class:`DoRA` -- :math:`W' = \operatorname{diag}(g / \|W_0 + sBA\|_{\text{row}})\,(W_0 + sBA)`;
* :class:`SSF` -- :math:`y = \gamma \odot (W_0 x + b_0) + \beta`;
* :class:`HUT` -- :math:`W' = W_0 \odot (BA)`.

All three set ``needs_base = multiplicative = True``: :meth:`~Adapter.delta_weight` takes
:math:`W_0` and returns :math:`W' - W_0`; :meth:`~Adapter.forward` returns
:math:`x (W' - W_0)^\top`; :meth:`~Adapter.layer_output` gives the adapted layer's output
through the structure; merge and unmerge are exact inverses (up to round-off).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from .. import backend
from ..method_index import Paper, adapter_entry
from .base import Adapter, check_rank, check_weight
from .fused import fusable, lora_linear
from .lowrank import _SEED_DOC, LORA_PARAMS, lora_scale
from .params import Bool, Choice, Float, Int, Seed, Tensor, schema
from .registry import register
from .row_norms import lowrank_row_norms, row_norm_dtype, scaled_row_norms

__all__ = ["HUT", "SSF", "DoRA", "lowrank_row_norms", "row_norm_dtype"]


def _kaiming_rows(rows: int, d_in: int, seed: int | None) -> torch.Tensor:
    """U(-1/sqrt(d_in), 1/sqrt(d_in)) -- PEFT's kaiming_uniform_(a=sqrt(5)) on a (rows, d_in) weight."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    bound = 1.0 / math.sqrt(d_in)
    return torch.rand(rows, d_in, generator=g) * 2 * bound - bound


# ============================================================================= DoRA
@register
class DoRA(Adapter):
    r"""DoRA: weight-decomposed low-rank adaptation (magnitude × direction, per output row).

    .. math::
        W' = \operatorname{diag}\!\Big(\frac{g}{\max(\nu, \epsilon)}\Big)(W_0 + sBA), \qquad
        \nu_i = \|(W_0 + sBA)_{i,:}\|_2 .

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int
        r, ``1 <= r <= min(m, n)``.
    alpha : float, default ``rank``
        :math:`s = \alpha/r` (:math:`\alpha/\sqrt r` with ``rslora``), as in LoRA.
    rslora : bool
        Rank-stabilized scale.
    detach_norm : bool, default True
        Treat :math:`\nu` as a constant in backward (DoRA §4.3; PEFT always does this).  The
        forward value is the same; gradients of A and B then omit the term through
        :math:`\nu`.  ``False`` gives the exact gradient of the forward map.
    eps : float, default 1e-8
        Lower clamp of :math:`\nu` (see Notes).
    seed : int, optional
        Seed of A's Kaiming-uniform init (as LoRA/PEFT); B = 0.
    magnitude : Tensor, shape (m,), optional
        Initial :math:`g`.  Without it :math:`g` is *pending* (NaN) and is set on the first call
        that sees :math:`W_0` to :math:`\nu(W_0)`, which makes :math:`W' = W_0` there.  Prefer
        :meth:`from_weight`, which sets it eagerly.

    Raises
    ------
    ValueError
        If ``rank`` is out of range, ``eps`` is not in (0, 1), or ``magnitude`` is not a finite (m,)
        tensor; later, if ``base_weight`` is missing or not (m, n), or :meth:`unmerged_weight` runs
        without a preceding merge or with a zero entry of g.

    Notes
    -----
    Trainable: A (r×n), B (m×r), g (m): :math:`r(m+n) + m`.

    Norm per **output row** (dimension 1 of the (m, n) weight), PEFT's convention
    (``torch.linalg.norm(weight, dim=1)`` in ``peft/tuners/lora/dora.py``), and it is computed by
    :func:`lowrank_row_norms`, never through the dense :math:`BA`.

    Adapted layer: :math:`y = (g/\nu) \odot (W_0x + s\,B(Ax)) + b_0`; the bias is not scaled.

    Zero rows: if :math:`(W_0 + sBA)_{i,:} = 0` the direction is undefined; the clamp
    :math:`\max(\nu_i, \epsilon)` makes row i of :math:`W'` zero (and continuous in the weights,
    shrinking linearly below :math:`\epsilon`), never Inf/NaN.

    Merge caches :math:`\nu` (like PEFT), since it cannot be recovered from :math:`W'`
    (:math:`\|W'_{i,:}\| = |g_i|`); unmerge is :math:`W_0 = \operatorname{diag}(\nu/g)W' - sBA`.

    No dropout: PEFT's dropout variant recomputes the base term on the dropped input.

    References
    ----------
    S.-Y. Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353.
    """

    index_entry = adapter_entry(
        "dora",
        Paper("DoRA: Weight-Decomposed Low-Rank Adaptation", "2402.09353"),
        "rank * (d_out + d_in) + d_out",
        ("tests/adapters/test_multiplicative.py", "tests/adapters/test_peft_dora.py", "tests/adapters/test_fused.py"),
        proofs=("proofs/14-dora-row-norm.md",),
        notebooks=("notebooks/08_lr_sensitivity.py",),
        peft="peft.LoraConfig(use_dora=True)",
        peft_test="tests/adapters/test_peft_dora.py",
    )

    name = "dora"
    needs_base = True
    multiplicative = True
    params = schema(
        LORA_PARAMS, without=["dropout"],
        detach_norm=Bool(doc="treat the row norm as a constant in backward (the paper's Sec. 4.3)"),
        eps=Float(0.0, 1.0, low_open=True, high_open=True, doc="floor of the row norm"),
        magnitude=Tensor(doc="(d_out,) initial magnitude g; default ||W0 + sBA|| on first use"),
    )

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        alpha: float | None = None,
        rslora: bool = False,
        detach_norm: bool = True,
        eps: float = 1e-8,
        seed: int | None = 0,
        magnitude: torch.Tensor | None = None,
    ) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        self.rank = rank
        self.scale = lora_scale(alpha, rank, rslora)
        self.detach_norm = detach_norm
        self.eps = eps
        self.exact_gradient = not detach_norm  # a detached norm is a constant in backward, by design
        self.A = nn.Parameter(_kaiming_rows(rank, d_in, seed))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        if magnitude is None:
            self.magnitude = nn.Parameter(torch.full((d_out,), float("nan")))
            self._magnitude_ready = False
        else:
            check_weight(magnitude, "magnitude", (d_out,))
            self.magnitude = nn.Parameter(magnitude.detach().clone())
            self._magnitude_ready = True
        self._merge_norm: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, W: torch.Tensor, rank: int = 8, **cfg: Any) -> tuple[DoRA, torch.Tensor]:
        """Build for the frozen ``W`` (m, n) with :math:`g = \\|W\\|_{\\text{row}}`; returns ``(adapter, W)``."""
        check_weight(W, "W")
        if W.ndim != 2:
            raise ValueError(f"W must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
        m, n = W.shape
        ad = cls(m, n, rank=rank, **cfg).to(device=W.device, dtype=W.dtype)
        with torch.no_grad():
            ad.magnitude.copy_(scaled_row_norms(W.detach()).to(W.dtype))
        ad._magnitude_ready = True
        return ad, W

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 8, **_: Any) -> int:
        return rank * (d_out + d_in) + d_out

    # ------------------------------------------------------------------ pieces
    def _ensure_magnitude(self, W0: torch.Tensor) -> None:
        if self._magnitude_ready:
            return
        if bool(torch.isnan(self.magnitude).any()):
            with torch.no_grad():
                nu = lowrank_row_norms(W0.detach(), self.B.detach(), self.A.detach(), self.scale)
                self.magnitude.copy_(nu.to(self.magnitude.dtype))
        self._magnitude_ready = True

    def weight_norm(self, base_weight: torch.Tensor) -> torch.Tensor:
        r""":math:`\nu = \|W_0 + sBA\|_{\text{row}}` (m,), detached if ``detach_norm``."""
        W0 = self._require_base(base_weight)
        if self.detach_norm:
            with torch.no_grad():
                return lowrank_row_norms(W0.detach(), self.B.detach(), self.A.detach(), self.scale,
                                         w0_sq=self._w0_sq(W0))
        return lowrank_row_norms(W0, self.B, self.A, self.scale, w0_sq=self._w0_sq(W0))

    def _w0_sq(self, W0: torch.Tensor) -> torch.Tensor | None:
        r""":math:`\|w_i\|^2` of the frozen W0, cached until W0 changes (in-place writes bump its version).

        None (recomputed with the cross term, from the same converted blocks of W0) when W0 needs a
        gradient, inside ``torch.compile`` (a graph cannot guard on a data pointer, and the compiled
        graph fuses the recomputation into the conversion it does anyway), and in a shape-only run
        (a fake tensor must not be cached for later real calls).
        """
        stored = isinstance(W0, nn.Parameter) or isinstance(W0._base, nn.Parameter)
        if not stored or W0.requires_grad or torch.compiler.is_compiling() or backend.fake_mode_active():
            return None  # a transient W0 (dequantized from a packed base) may reuse a freed address
        key = (W0.data_ptr(), W0._version, tuple(W0.shape), W0.dtype, W0.device)
        cached = getattr(self, "_w0_sq_cache", None)
        if cached is None or cached[0] != key:
            W = W0.detach().to(row_norm_dtype(W0))
            cached = (key, (W * W).sum(dim=1))
            self._w0_sq_cache = cached
        return cached[1]

    def row_scale(self, base_weight: torch.Tensor) -> torch.Tensor:
        r""":math:`g / \max(\nu, \epsilon)` (m,) in the accumulation dtype."""
        self._ensure_magnitude(base_weight)
        nu = self.weight_norm(base_weight)
        return self.magnitude.to(nu.dtype) / nu.clamp_min(self.eps)

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * ((x @ self.A.T) @ self.B.T)

    # ------------------------------------------------------------------ contract
    def layer_output(self, x, base_out, base_weight, base_bias):
        self._check_input(x)
        c = self.row_scale(base_weight).to(base_out.dtype)
        pre = base_out if base_bias is None else base_out - base_bias
        out = c * (pre + self._lora(x).to(base_out.dtype))
        return out if base_bias is None else out + base_bias

    def fused_output(self, x, base_weight, base_bias):
        r"""``c ⊙ (x W0ᵀ + s (x Aᵀ) Bᵀ) + b`` through the fused LoRA node (:mod:`.fused`), c = g / ν.

        The rank-r term is accumulated into the base GEMM's output in place, then one ``addcmul``
        applies the row scale and the bias.  None (the unfused path runs) when the frozen weight or
        bias needs a gradient or the tensors do not share one dtype and device.
        """
        if not fusable(x, base_weight, base_bias, self.A, self.B):
            return None
        self._check_input(x)
        c = self.row_scale(self._require_base(base_weight)).to(x.dtype)
        z = lora_linear(x, base_weight, None, self.A, self.B, self.scale)
        return z * c if base_bias is None else torch.addcmul(base_bias, z, c)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        W0 = self._require_base(base_weight)
        c = self.row_scale(W0).to(x.dtype)
        base = x @ W0.T
        return c * (base + self._lora(x)) - base

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        W0 = self._require_base(base_weight)
        c = self.row_scale(W0)
        V = W0.to(c.dtype) + self.scale * (self.B.to(c.dtype) @ self.A.to(c.dtype))
        return (c[:, None] * V - W0.to(c.dtype)).to(W0.dtype)

    def _merge(self, base_weight: torch.Tensor) -> torch.Tensor:
        W0 = self._require_base(base_weight)
        self._ensure_magnitude(W0)
        nu = lowrank_row_norms(W0, self.B, self.A, self.scale, precise=True).clamp_min(self.eps)
        self._merge_norm = nu
        acc = nu.dtype
        V = W0.to(acc) + self.scale * (self.B.to(acc) @ self.A.to(acc))
        return (self.magnitude.to(acc) / nu)[:, None] * V

    def _unmerge(self, merged_weight: torch.Tensor) -> torch.Tensor:
        if self._merge_norm is None:
            raise ValueError("unmerged_weight needs the row norm cached by merged_weight; merge first")
        g = self.magnitude.to(self._merge_norm.dtype)
        if bool((g == 0).any()):
            raise ValueError("magnitude has zero entries: those rows of the merged weight are 0 and W0 is lost")
        acc = self._merge_norm.dtype
        V = (self._merge_norm / g)[:, None] * merged_weight.to(acc)
        return V - self.scale * (self.B.to(acc) @ self.A.to(acc))


# ============================================================================= SSF
@register
class SSF(Adapter):
    r"""SSF: scale and shift the layer's output features, :math:`y = \gamma\odot(W_0x + b_0) + \beta`.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    init_std : float, default 0
        :math:`\gamma \sim \mathcal N(1, \sigma^2)`, :math:`\beta \sim \mathcal N(0, \sigma^2)`.  The
        default 0 gives :math:`\gamma = 1, \beta = 0` (exact identity); the authors' code uses
        :math:`\sigma = 0.02`.
    seed : int, optional
        Seed of that draw.

    Raises
    ------
    ValueError
        If ``init_std`` is negative or not finite; at unmerge, if an entry of :math:`\gamma` is 0; at
        merge into a layer without bias, if :math:`\beta \ne 0`.

    Notes
    -----
    Merged: :math:`W' = \operatorname{diag}(\gamma) W_0`, :math:`b' = \gamma \odot b_0 + \beta`
    (:math:`\Delta W = \operatorname{diag}(\gamma - 1) W_0`).  Unmerge divides by :math:`\gamma`
    (``ValueError`` if an entry is 0).  A layer without bias can be merged only while
    :math:`\beta = 0` (there is no bias to hold it).  Trainable: :math:`2m`.

    References
    ----------
    D. Lian, D. Zhou, J. Feng, X. Wang, "Scaling & Shifting Your Features: A New Baseline for
    Efficient Model Tuning", arXiv:2210.08823.
    """

    index_entry = adapter_entry(
        "ssf",
        Paper("Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning", "2210.08823"),
        "2 * d_out",
        ("tests/adapters/test_multiplicative.py",),
    )

    name = "ssf"
    needs_base = True
    multiplicative = True
    params = schema(init_std=Float(0.0, doc="sigma of the N(1, s^2) / N(0, s^2) init"),
                    seed=Seed(none_ok=True, doc=_SEED_DOC))

    def __init__(self, d_out: int, d_in: int, init_std: float = 0.0, seed: int | None = 0) -> None:
        super().__init__(d_out, d_in)
        self.identity_at_init = init_std == 0.0
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        self.gamma = nn.Parameter(1.0 + init_std * torch.randn(d_out, generator=g))
        self.beta = nn.Parameter(init_std * torch.randn(d_out, generator=g))

    @classmethod
    def param_count(cls, d_out: int, d_in: int, **_: Any) -> int:
        return 2 * d_out

    def layer_output(self, x, base_out, base_weight, base_bias):
        self._check_input(x)
        return base_out * self.gamma.to(base_out.dtype) + self.beta.to(base_out.dtype)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        W0 = self._require_base(base_weight)
        return (x @ W0.T) * (self.gamma.to(x.dtype) - 1)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        W0 = self._require_base(base_weight)
        return (self.gamma.to(W0.dtype) - 1)[:, None] * W0

    def _invertible_gamma(self) -> torch.Tensor:
        if bool((self.gamma == 0).any()):
            raise ValueError("gamma has zero entries: SSF's merge is not invertible (cannot unmerge)")
        return self.gamma

    def _merge(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.gamma[:, None] * self._require_base(base_weight)

    def _unmerge(self, merged_weight: torch.Tensor) -> torch.Tensor:
        return merged_weight / self._invertible_gamma()[:, None]

    def _merge_bias(self, base_bias: torch.Tensor | None) -> torch.Tensor | None:
        if base_bias is None:
            if bool((self.beta != 0).any()):
                raise ValueError("base_bias is None but beta != 0: SSF's shift cannot merge into a layer without bias")
            return None
        return self.gamma * base_bias + self.beta

    def _unmerge_bias(self, merged_bias: torch.Tensor | None) -> torch.Tensor | None:
        if merged_bias is None:
            return None
        return (merged_bias - self.beta) / self._invertible_gamma()


# ============================================================================= HUT
@register
class HUT(Adapter):
    r"""HUT: Hadamard updated transformation, :math:`W' = W_0 \odot (BA)`.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int, default 4
        r, ``1 <= r <= min(m, n)``.
    seed : int, optional
        Seed of rows 1..r-1 of A (Kaiming-uniform).
    path : {"auto", "structured", "dense"}
        How :math:`x \mapsto (W_0 \odot BA)x` is applied (see Notes).

    Raises
    ------
    ValueError
        If ``rank`` or ``path`` is invalid; at unmerge, if an entry of :math:`BA` is 0.

    Notes
    -----
    **Reading of the paper.**  The abstract of arXiv:2409.13501 states the method: the
    "updated transformation" maps :math:`W_0` directly to the updated weight (instead of adding an
    increment) through a Hadamard product with two low-rank matrices.  The paper's body could not
    be retrieved here, so the exact formula is our reading, not a transcription:
    :math:`W' = W_0 \odot M`, :math:`M = BA`, :math:`B \in \mathbb R^{m\times r}`,
    :math:`A \in \mathbb R^{r\times n}` (no additive term).  Identity at init needs
    :math:`M = \mathbf 1\mathbf 1^\top`: :math:`B_{:,0} = \mathbf 1`, :math:`A_{0,:} = \mathbf 1`,
    :math:`B_{:,1:} = 0`, :math:`A_{1:,:}` random (so the r components are not symmetric and all
    receive gradients once :math:`B_{:,1:}` moves).  The additive "residual" form
    :math:`W_0 + W_0 \odot (sB'A')` is the special case whose first component stays at
    :math:`(\mathbf 1, \mathbf 1)`.  For r = 1, :math:`W' = \operatorname{diag}(b) W_0 \operatorname{diag}(a)`.

    Re-checked (2026-12-04): the HUT body was again not retrievable (arXiv abstract, the arXiv listing and two
    summaries only: "a Hadamard product with two low-rank matrices"), so this stays our reading.  The
    additive residual form is HiRA (ICLR 2025, PEFT ``HiraConfig``: :math:`W_0 + W_0\odot B'A'`, B' = 0 at
    init), now registered separately as ``"hira"`` (:class:`~lowrank_theory.adapters.hira.HiRA`, a thin
    subclass): HiRA of rank r is this class at rank r + 1 with its first component frozen, so a plain alias
    would change the function class; ``tests/adapters/test_hira.py`` checks both maps and PEFT's layer.

    **Structured forward.**  :math:`(W_0 \odot \sum_k b_k a_k^\top)x = \sum_k b_k \odot W_0(a_k \odot x)`:
    r products with :math:`W_0` per token, no m×n temporary.  The dense path forms
    :math:`W_0 \odot BA` once per call (:math:`O(rmn)`) and then one product per token.  For T tokens
    the structured path costs :math:`rTmn`, the dense one :math:`(r + T)mn`; ``"auto"`` picks the
    structured path exactly when :math:`(r-1)(T-1) = 0` (r = 1 or one token), where it is not
    more expensive.

    Merge :math:`W' = W_0 \odot M`; unmerge :math:`W_0 = W' \oslash M` (``ValueError`` if an
    entry of M is 0).  Trainable: :math:`r(m+n)`.

    References
    ----------
    G. Zhang, X. Zhou, C. Chen, "HUT: A More Computation Efficient Fine-Tuning Method With
    Hadamard Updated Transformation", arXiv:2409.13501.
    """

    index_entry = adapter_entry(
        "hut",
        Paper(
            "HUT: A More Computation Efficient Fine-Tuning Method With Hadamard Updated Transformation",
            "2409.13501"),
        "rank * (d_out + d_in)",
        ("tests/adapters/test_multiplicative.py",),
    )

    name = "hut"
    execution_keys: ClassVar[tuple[str, ...]] = ("path",)
    needs_base = True
    multiplicative = True
    params = schema(rank=Int(1), seed=Seed(none_ok=True, doc=_SEED_DOC),
              path=Choice("auto", "structured", "dense", doc="how the update is computed (not what it is)"))

    def __init__(self, d_out: int, d_in: int, rank: int = 4, seed: int | None = 0, path: str = "auto") -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        self.rank = rank
        self.path = path
        B = torch.zeros(d_out, rank)
        B[:, 0] = 1.0
        A = torch.ones(rank, d_in)
        if rank > 1:
            A[1:] = _kaiming_rows(rank - 1, d_in, seed)
        self.B = nn.Parameter(B)
        self.A = nn.Parameter(A)

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 4, **_: Any) -> int:
        return rank * (d_out + d_in)

    def transform(self) -> torch.Tensor:
        """The dense Hadamard factor :math:`M = BA` (m, n) (for merging and tests)."""
        return self.B @ self.A

    def _use_structured(self, x: torch.Tensor) -> bool:
        if self.path != "auto":
            return self.path == "structured"
        tokens = x.numel() // self.d_in
        return self.rank == 1 or tokens == 1

    def apply_transformed(self, x: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
        r""":math:`x (W_0 \odot BA)^\top` for x (..., n) -> (..., m), by the chosen path."""
        self._check_input(x)
        W0 = self._require_base(base_weight).to(x.dtype)  # a no-op unless the adapter's dtype differs from W0's
        A, B = self.A.to(x.dtype), self.B.to(x.dtype)
        if self._use_structured(x):
            z = (x.unsqueeze(-2) * A) @ W0.T  # (..., r, m): W0 (a_k ⊙ x) for each k
            return (z * B.T).sum(dim=-2)
        return x @ (W0 * (B @ A)).T

    def layer_output(self, x, base_out, base_weight, base_bias):
        y = self.apply_transformed(x, base_weight).to(base_out.dtype)
        return y if base_bias is None else y + base_bias

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        W0 = self._require_base(base_weight)
        return self.apply_transformed(x, W0) - x @ W0.T

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        W0 = self._require_base(base_weight)
        return W0 * (self.transform().to(W0.dtype) - 1.0)

    def _merge(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self._require_base(base_weight) * (self.B @ self.A)

    def _unmerge(self, merged_weight: torch.Tensor) -> torch.Tensor:
        M = self.B @ self.A
        if bool((M == 0).any()):
            raise ValueError("the Hadamard factor B @ A has zero entries: W0 cannot be recovered (cannot unmerge)")
        return merged_weight / M
