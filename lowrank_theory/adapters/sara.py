r"""SaRA: train the smallest-magnitude entries of the frozen weight as a sparse update, with a nuclear-norm
penalty and a progressive re-selection of the trainable entries.

:math:`\Delta W = P_\Omega(v)`: the k trainable values v sit on a support :math:`\Omega` of
:math:`k = \lfloor f\,mn \rfloor` entries, the k entries of :math:`W_0` of smallest :math:`|w|`.  Only v is
stored and trained; the update is applied by a gather of the input columns and a scatter-add into the output
rows (``index_select`` + ``index_add``, :math:`O(k)` per token), so neither a dense :math:`\Delta W` nor a dense
m×n gradient exists in the forward or backward pass -- autograd's gradient of v is
:math:`\partial L/\partial v_t = \sum_{\text{tokens}} g_{r_t} x_{c_t}`, a length-k vector.

Also here: :func:`nuclear_prox` (singular-value soft-thresholding, the proximal map of
:math:`\tau\|\cdot\|_*`, ``proofs/22-sara-nuclear-prox.md``), :meth:`SaRA.nuclear_norm_penalty` (the loss term
SaRA's authors add), :func:`remask_layer_` and :class:`SaRASchedule` (the progressive re-selection).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..linalg import derive_seed
from ..method_index import Paper, adapter_entry
from .base import Adapter, check_sizes, check_weight
from .params import Float, Seed, schema
from .registry import register
from .sparse import sparse_entries_dense, sparse_entries_matmul

__all__ = ["SaRA", "SaRASchedule", "nuclear_prox", "remask_layer_", "sara_support", "sara_support_size"]


def sara_support_size(d_out: int, d_in: int, fraction: float) -> int:
    r"""Number of trainable entries :math:`k = \lfloor f\, m n \rfloor` (a relative slack of 1e-12 keeps
    0.29·100 at 29, as :func:`~lowrank_theory.adapters.sparse.sparse_support_size` does)."""
    return math.floor(fraction * d_out * d_in * (1.0 + 1e-12))


def sara_support(W: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    r"""Flat row-major indices of the k entries of ``W`` with the smallest :math:`|w|`, sorted, and the threshold.

    Parameters
    ----------
    W : torch.Tensor, shape (m, n)
        A finite floating matrix.
    k : int
        ``1 <= k <= m*n``.

    Returns
    -------
    flat : torch.LongTensor, shape (k,)
        Sorted flat indices of the k smallest magnitudes; ties are broken by the flat index (a stable sort of
        :math:`|w|` in float64), so the selection is deterministic.
    theta : float
        The smallest magnitude *outside* the support (``inf`` when k = mn): every selected entry has
        :math:`|w| \le \theta` and, without ties at the boundary, the support is exactly
        :math:`\{|w| < \theta\}` -- the paper's mask :math:`|W_0| < \theta` with θ chosen to make it k entries.
    """
    check_weight(W, "W")
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D (d_out, d_in) matrix, got shape {tuple(W.shape)}")
    numel = W.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= numel:
        raise ValueError(f"k must be an int in [1, {numel}] for a {tuple(W.shape)} weight, got {k!r}")
    mag = W.detach().to(device="cpu", dtype=torch.float64).abs().reshape(-1)
    order = torch.argsort(mag, stable=True)
    flat = torch.sort(order[:k]).values
    theta = float(mag[order[k]]) if k < numel else float("inf")
    return flat, theta


def nuclear_prox(Y: torch.Tensor, tau: float) -> torch.Tensor:
    r"""The proximal map of :math:`\tau\|\cdot\|_*`: singular-value soft-thresholding.

    .. math:: \operatorname{prox}_{\tau\|\cdot\|_*}(Y) = \arg\min_X \tfrac12\|X - Y\|_F^2 + \tau\|X\|_*
              = U \max(\Sigma - \tau, 0) V^\top, \qquad Y = U\Sigma V^\top .

    Parameters
    ----------
    Y : torch.Tensor, shape (m, n)
        Finite floating matrix (half precision is computed in float32 and cast back).
    tau : float
        :math:`\tau \ge 0`.

    Returns
    -------
    torch.Tensor, shape (m, n), Y's dtype
        Rank = number of singular values above τ.  Proof: ``proofs/22-sara-nuclear-prox.md``.

    Raises
    ------
    TypeError, ValueError
        ``Y`` not a finite floating 2-D tensor; ``tau`` not a finite real ``>= 0``.
    """
    check_weight(Y, "Y")
    if Y.ndim != 2:
        raise ValueError(f"Y must be a 2-D matrix, got shape {tuple(Y.shape)}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite real >= 0, got {tau!r}")
    acc = torch.promote_types(Y.dtype, torch.float32)
    U, S, Vh = torch.linalg.svd(Y.to(acc), full_matrices=False)
    return ((U * (S - tau).clamp_min(0.0)) @ Vh).to(Y.dtype)


@register
class SaRA(Adapter):
    r"""SaRA: :math:`\Delta W = P_\Omega(v)`, v trained on the k smallest-magnitude entries of :math:`W_0`.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    fraction : float, default 0.1
        f in (0, 1]: the fraction of W's entries that are trainable, :math:`k = \lfloor f mn\rfloor \ge 1`
        (the paper trains the smallest 10--20 %).
    seed : int, default 0
        Seed of the support used when no weight is given (``create``): then Ω is uniform without replacement
        (``numpy.random.default_rng(derive_seed(seed, "sara-support"))``), as a stand-in; :meth:`from_weight`
        puts Ω on the smallest magnitudes of the weight, which is the method.

    Raises
    ------
    TypeError, ValueError
        ``fraction`` outside (0, 1] or giving no entry; ``seed`` not a non-negative int.

    Notes
    -----
    **Support.** :func:`sara_support`: the k entries of smallest :math:`|w_{ij}|`, ties by flat index; the
    paper's mask :math:`|W_0| < \theta` with :math:`\theta` the (k+1)-th smallest magnitude (attribute
    ``threshold``, not in the state dict).  The authors' code (``optim/adamw.py`` of sjtuplayer/SaRA) uses one
    absolute threshold for every parameter tensor; a per-layer fraction is used here so the parameter count has
    a closed form and every layer gets the same share.  ``rows``/``cols`` are **persistent** buffers (they
    encode :math:`W_0`), so a checkpoint restores Ω.

    **Update and forward.** :math:`(\Delta W)_{r_t c_t} = v_t`, zero elsewhere; v = 0 at init (identity).
    Forward ``zeros(..., m).index_add(-1, rows, x.index_select(-1, cols) * v)``: :math:`O(k)` per token, and
    no m×n tensor in the forward or the backward (the point: SaRA's memory).  The price is speed where k is a
    large fraction of mn: on one CPU core at m = n = 512, 256 tokens, this gather / scatter-add step is 4x a
    dense ``x @ ΔWᵀ`` at 5 % density and 9x at 10 % (``sparse_support.DENSE_DENSITY`` has the measurements;
    ``sparse_delta`` switches to the dense product above 1/64, SaRA keeps the sparse form by design).

    **Nuclear norm.** :meth:`nuclear_norm_penalty` returns :math:`\|\Delta W\|_*` (differentiable; the authors
    add :math:`\lambda\|\Delta W\|_*` of one randomly chosen large matrix to the loss each step).  It forms the
    dense m×n update for the SVD -- the one place a dense matrix appears, and only when the penalty is used.
    :func:`nuclear_prox` is the proximal map of the penalty over *all* m×n matrices (singular-value
    soft-thresholding); :meth:`proximal_step_` applies it and keeps the result on Ω.  That projected step is
    a heuristic: :math:`P_\Omega\circ\operatorname{prox}` is not the prox of
    :math:`\tau\|\cdot\|_* + \iota_{\{\operatorname{supp}\subseteq\Omega\}}`, which has no closed form.

    **Progressive re-selection.** :meth:`remask` (and :func:`remask_layer_` on an adapted layer, scheduled by
    :class:`SaRASchedule`) merges the update into the frozen weight, :math:`W_1 = W_0 + \Delta W`, re-selects Ω as
    the k smallest :math:`|W_1|` and sets v = 0: the layer's output is unchanged, and entries that grew out of
    the small range are frozen at their trained values while entries that are (now) small become trainable --
    what the authors' optimizer does at ``progressive_iter`` (it re-thresholds the current, updated weights).

    Trainable: :math:`\lfloor f mn\rfloor`.

    References
    ----------
    T. Hu, J. Zhang, R. Yi, H. Huang, Y. Wang, L. Ma, "SaRA: High-Efficient Diffusion Model Fine-tuning with
    Progressive Sparse Low-Rank Adaptation", ICLR 2025, arXiv:2409.06633.  Read: the abstract and the start
    of the introduction (arXiv HTML via the pages corpus: ar5iv.labs.arxiv.org/html/2409.06633), and the
    authors' code ``optim/adamw.py`` in github.com/sjtuplayer/SaRA (mask ``param.abs() < threshold``, the
    trained values scattered into the weight by a custom autograd function whose backward returns
    ``grad[mask]``, the nuclear-norm loss ``lambda_rank * ||param * mask||_*`` on one random matrix with
    min side > 64 per step, and the re-selection at ``progressive_iter``).  Sections 3--4 of the paper were
    not read in full.
    """

    index_entry = adapter_entry(
        "sara",
        Paper("SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank Adaptation",
              "2409.06633"),
        "floor(fraction * d_out * d_in * (1 + 1e-12))",
        ("tests/adapters/test_sara.py",),
        proofs=("proofs/22-sara-nuclear-prox.md",),
        notebooks=("notebooks/12_sparse_tuning.py",),
    )

    name = "sara"
    params = schema(
        fraction=Float(0.0, 1.0, low_open=True, doc="f, the fraction of W's entries that are trainable"),
        seed=Seed(doc="seed of the stand-in random support when no weight is given"),
    )

    def __init__(self, d_out: int, d_in: int, fraction: float = 0.1, seed: int = 0) -> None:
        super().__init__(*check_sizes(d_out, d_in))
        k = sara_support_size(d_out, d_in, fraction)
        if k < 1:
            raise ValueError(f"fraction={fraction} gives no trainable entry for a {d_out}x{d_in} weight; "
                             f"need fraction*d_out*d_in >= 1")
        self.fraction, self.k = float(fraction), k
        rng = np.random.default_rng(derive_seed(seed, "sara-support"))
        flat = torch.from_numpy(np.sort(rng.choice(d_out * d_in, size=k, replace=False)))
        self.register_buffer("rows", flat // d_in)
        self.register_buffer("cols", flat % d_in)
        self.threshold = float("nan")
        self.values = nn.Parameter(torch.zeros(k))

    @classmethod
    def param_count(cls, d_out: int, d_in: int, fraction: float = 0.1, **_: Any) -> int:
        return sara_support_size(d_out, d_in, fraction)

    @classmethod
    def from_weight(cls, W: torch.Tensor, fraction: float = 0.1, seed: int = 0) -> tuple[SaRA, torch.Tensor]:
        """SaRA for the frozen weight ``W``: Ω = its k smallest magnitudes; returns ``(adapter, W)`` (base unchanged).

        Raises
        ------
        TypeError, ValueError
            ``W`` not a finite floating 2-D tensor; bad ``fraction``/``seed``.
        """
        check_weight(W, "W")
        if W.ndim != 2:
            raise ValueError(f"W must be a 2-D (d_out, d_in) matrix, got shape {tuple(W.shape)}")
        ad = cls(W.shape[0], W.shape[1], fraction=fraction, seed=seed)
        ad._set_support(W)
        return ad.to(device=W.device), W

    @torch.no_grad()
    def _set_support(self, W: torch.Tensor) -> None:
        flat, theta = sara_support(W, self.k)
        flat = flat.to(self.rows.device)
        self.rows.copy_(flat // self.d_in)
        self.cols.copy_(flat % self.d_in)
        self.threshold = theta

    # ------------------------------------------------------------------ update
    def flat_indices(self) -> torch.Tensor:
        """Row-major flat indices of Ω, shape (k,)."""
        return self.rows * self.d_in + self.cols

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return sparse_entries_dense(self.rows, self.cols, self.values, self.d_out, self.d_in)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return sparse_entries_matmul(x, self.rows, self.cols, self.values, self.d_out)

    # ------------------------------------------------------------------ nuclear norm
    def nuclear_norm_penalty(self) -> torch.Tensor:
        r""":math:`\|\Delta W\|_*` (sum of singular values), differentiable in v; forms the dense m×n update."""
        return torch.linalg.svdvals(self.delta_weight()).sum()

    @torch.no_grad()
    def proximal_step_(self, tau: float) -> SaRA:
        r"""v ← the entries on Ω of :func:`nuclear_prox` (ΔW, τ) -- the projected heuristic of the class Notes.

        After a gradient step with learning rate η on the data loss, ``proximal_step_(eta * lam)`` is the
        proximal-gradient step on :math:`L + \lambda\|\cdot\|_*` *before* the projection onto Ω.
        """
        Y = nuclear_prox(self.delta_weight(), tau)
        self.values.copy_(Y.reshape(-1).index_select(0, self.flat_indices()))
        return self

    # ------------------------------------------------------------------ progressive re-selection
    @torch.no_grad()
    def remask(self, base_weight: torch.Tensor) -> torch.Tensor:
        r"""Merge, re-select and reset: return :math:`W_1 = W_0 + \Delta W`, set Ω = k smallest :math:`|W_1|`, v = 0.

        The caller must write the returned weight into the frozen layer (:func:`remask_layer_` does); then the
        adapted layer computes exactly what it computed before.  Optimizer state of ``values`` is stale
        afterwards (its entries now mean other positions): clear it (:class:`SaRASchedule` does).
        """
        check_weight(base_weight, "base_weight", (self.d_out, self.d_in))
        acc = torch.promote_types(base_weight.dtype, self.values.dtype)
        W1 = (base_weight.to(acc) + self.delta_weight().to(acc)).to(base_weight.dtype)
        self._set_support(W1)
        self.values.zero_()
        return W1


def _active_sara(layer: Any) -> SaRA | None:
    try:
        ad = layer.adapter
    except (AttributeError, ValueError):  # not a host, or several active adapters
        return None
    return ad if isinstance(ad, SaRA) else None


def remask_layer_(layer: Any) -> Any:
    """Progressive re-selection on an adapted layer whose active adapter is :class:`SaRA`, in place.

    The merged update is written into the layer's frozen weight (``W0 ← W0 + ΔW``), Ω is re-selected on it and
    the values reset (:meth:`SaRA.remask`): the layer's output is unchanged.

    Raises
    ------
    TypeError
        If ``layer`` is not an adapted layer with a SaRA adapter.
    ValueError
        If the adapter is merged into the layer (unmerge first).
    """
    from .layer import AdapterHost

    if not isinstance(layer, AdapterHost) or not isinstance(_active_sara(layer), SaRA):
        raise TypeError(f"layer must be an adapted layer whose one active adapter is SaRA, got {type(layer).__name__}")
    if getattr(layer, "quantized", False):
        raise ValueError("layer has a quantized base; SaRA's re-selection writes W0 + dW into the base weight")
    if layer.merged:
        raise ValueError("layer has a merged adapter; unmerge it before remask_layer_")
    with torch.no_grad():
        W1 = layer.adapter.remask(layer._base_weight().detach())
        layer._write_base_weight(W1)
    return layer


class SaRASchedule:
    r"""When to re-select SaRA's supports: after the optimizer steps listed in ``at`` (the authors use one, at
    ``progressive_iter``, about half-way).

    Parameters
    ----------
    at : iterable of int
        Positive step numbers (1-based count of optimizer steps after which to re-select).

    Call :meth:`step` once after every ``optimizer.step()`` with the model and the optimizer: at a listed step it
    applies :func:`remask_layer_` to every adapted layer with a SaRA adapter and drops the optimizer state of
    their ``values`` (Adam's moments belonged to the old positions).  Returns the number of layers re-selected.
    """

    def __init__(self, at: Iterable[int]) -> None:
        steps = list(at) if not isinstance(at, (str, bytes)) else None
        if steps is None or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
            raise ValueError(f"at must be an iterable of positive ints (optimizer step numbers), got {at!r}")
        self.at = frozenset(steps)
        self.count = 0

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
        self.count += 1
        if self.count not in self.at:
            return 0
        from .layer import AdapterHost

        done = 0
        for mod in model.modules():
            if isinstance(mod, AdapterHost) and _active_sara(mod) is not None:
                remask_layer_(mod)
                if optimizer is not None:
                    optimizer.state.pop(mod.adapter.values, None)
                done += 1
        return done
