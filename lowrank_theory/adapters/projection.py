r"""Projection adapters: Uni-LoRA, every LoRA factor of a model read from one trainable vector.

Uni-LoRA flattens all LoRA parameters of a model, :math:`\theta_D = (\operatorname{vec} A_1,
\operatorname{vec} B_1, \operatorname{vec} A_2, \dots) \in \mathbb R^D`, and ties them to one
:math:`\theta_d \in \mathbb R^d`, :math:`d \ll D`, through a fixed sparse isometry
:math:`\theta_D = P\theta_d` (:func:`lowrank_theory.linalg.isometric_projection`,
:math:`P^\top P = I_d`).  Here :class:`UniLoRAShared` holds :math:`\theta_d` and the index form
of :math:`P`; each :class:`UniLoRA` layer owns the slice ``[offset, offset + r(m + n))`` of
:math:`\theta_D` and gathers its A and B from :math:`\theta_d` by index -- :math:`O(r(m+n))`
per layer and call, never a dense :math:`P` nor the whole :math:`\theta_D`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..linalg.projections import IsometricProjection, isometric_projection
from ..linalg.random import derive_seed
from ..method_index import Paper, adapter_entry
from .base import Adapter, check_rank
from .params import Choice, Float, Instance, Int, Seed, schema
from .registry import register

__all__ = ["INDEX_RULES", "UniLoRA", "UniLoRAShared", "balanced_indices"]

#: How :meth:`UniLoRAShared.finalize` assigns the rows of P to columns when no indices are given.
INDEX_RULES = ("isometric", "balanced")


def balanced_indices(D: int, d: int, seed: int) -> np.ndarray:
    r"""PEFT 0.21's Uni-LoRA column assignment, balanced: each column is used ⌊D/d⌋ or ⌈D/d⌉ times.

    A balanced alternative to :func:`~lowrank_theory.linalg.isometric_projection` (which draws
    columns i.i.d.); both give :math:`P^\top P = I_d` once the rows are scaled by
    :math:`1/\sqrt{n_j}`.

    Parameters
    ----------
    D, d : int
        Rows (the model's LoRA parameter count) and columns (``theta_d_length``), ``1 <= d <= D``.
    seed : int
        PEFT's ``proj_seed``.

    Returns
    -------
    numpy.ndarray of int64, shape (D,)
        :math:`j(i)`: ``repeat(arange(d), D // d)``, then ``D mod d`` distinct extra columns
        drawn without replacement, the whole shuffled, all by ``numpy.random.default_rng(seed)``
        (``UniLoraModel.generate_index``), so a PEFT Uni-LoRA model is rebuilt from its seed.
    """
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(d), D // d)
    if D % d:
        data = np.concatenate([data, rng.choice(d, size=D % d, replace=False)])
    rng.shuffle(data)
    return data.astype(np.int64)


#: The keywords of the shared vector (also UniLoRA's, for a private one).
_UNILORA_VECTOR = schema(
    d=Int(1, doc="length of the trainable vector theta_d"),
    seed=Seed(doc="seed of theta_d's init and of the projection's columns"),
    init_bound=Float(0.0, doc="theta_d ~ U(-b, b)"),
    index_rule=Choice(*INDEX_RULES, doc="column assignment: isometric (paper) or balanced (PEFT 0.21)"),
)


class UniLoRAShared(nn.Module):
    r"""The one trainable vector :math:`\theta_d` of Uni-LoRA and the registry of the layers' slots.

    Parameters
    ----------
    d : int
        Length of :math:`\theta_d`, the whole model's trainable count; ``d <= D`` once all layers
        are attached (an isometry :math:`\mathbb R^d \to \mathbb R^D` needs :math:`D \ge d`).
    seed : int, default 0
        Seed of the projection (``isometric_projection(D, d, seed)``) and, through
        ``derive_seed(seed, "unilora/theta_d")``, of :math:`\theta_d`'s init.
    init_bound : float, default 0.02
        :math:`\theta_d \sim U(-b, b)` (PEFT's ``init_theta_d_bound``; the authors' code draws
        their vector bank the same way).
    index_rule : {"isometric", "balanced"}, default "isometric"
        The column assignment :meth:`finalize` builds without explicit indices:
        :func:`~lowrank_theory.linalg.isometric_projection` or PEFT's :func:`balanced_indices`.

    Notes
    -----
    **How D grows.**  Layers call :meth:`attach` in construction order; each gets the next
    ``r(m + n)`` coordinates of :math:`\theta_D` (A row-major, then B row-major, as PEFT lays
    them out).  The projection is built once, for the final D, by :meth:`finalize` -- called
    explicitly or, lazily, by the first forward / ``delta_weight`` of any attached layer.
    Attaching after that raises ``ValueError``.  This is what the paper and both reference
    codes do: the group sizes :math:`n_j` that normalize :math:`P`'s columns are counted over
    the *whole* model (a per-layer projection with per-layer normalization would give each
    layer its own :math:`P_\ell` with :math:`P_\ell^\top P_\ell = I`, hence
    :math:`P^\top P = L\,I`, not an isometry, unless the counts are global).  A model rebuilt in
    the same order with the same ``(d, seed)`` regenerates the same :math:`P`, so a checkpoint
    holds only :math:`\theta_d` (key ``theta_d``; the index buffers are non-persistent).

    The column assignment is :func:`~lowrank_theory.linalg.isometric_projection`'s (i.i.d.
    uniform columns, as in the paper, plus one guaranteed row per column so that
    :math:`P^\top P = I_d` exactly).  PEFT 0.21 instead deals the columns out evenly
    (each used :math:`\lfloor D/d\rfloor` or :math:`\lceil D/d\rceil` times); ``index_rule="balanced"``
    rebuilds those from the seed, or pass its indices to :meth:`finalize`.

    When a model holds several layers, every :class:`UniLoRA` lists this module as a child, so
    ``model.parameters()`` yields :math:`\theta_d` once, but ``model.state_dict()`` repeats it
    under each layer's prefix (same tensor); save ``shared.state_dict()`` once instead.
    """

    def __init__(self, d: int, seed: int = 0, init_bound: float = 0.02, index_rule: str = "isometric") -> None:
        super().__init__()
        self.d = _UNILORA_VECTOR["d"].validate("d", d)
        self.seed = _UNILORA_VECTOR["seed"].validate("seed", seed)
        self.init_bound = _UNILORA_VECTOR["init_bound"].validate("init_bound", init_bound)
        self.index_rule = _UNILORA_VECTOR["index_rule"].validate("index_rule", index_rule)
        g = torch.Generator().manual_seed(derive_seed(self.seed, "unilora/theta_d"))
        theta = torch.empty(self.d, dtype=torch.float64).uniform_(-self.init_bound, self.init_bound, generator=g)
        self.theta_d = nn.Parameter(theta.to(torch.get_default_dtype()))
        self.register_buffer("indices", None, persistent=False)
        self.register_buffer("values", None, persistent=False)
        self.slots: list[tuple[int, int, int]] = []  # (d_out, d_in, rank) per attached layer
        self.D = 0
        self.projection: IsometricProjection | None = None

    @property
    def finalized(self) -> bool:
        """True once the projection is built (no more layers can attach)."""
        return self.projection is not None

    def attach(self, d_out: int, d_in: int, rank: int) -> int:
        """Reserve ``rank * (d_in + d_out)`` coordinates of θ_D for a layer; return its offset."""
        if self.finalized:
            raise ValueError(
                f"cannot attach a layer: the projection is already built for D={self.D}; "
                "attach every layer before the first forward (or finalize())"
            )
        offset = self.D
        self.slots.append((d_out, d_in, rank))
        self.D += rank * (d_in + d_out)
        return offset

    def finalize(self, indices: Any = None) -> IsometricProjection:
        r"""Build :math:`P` (D × d) for the attached layers; idempotent.

        Parameters
        ----------
        indices : array of int, shape (D,), optional
            Explicit column :math:`j(i)` of every row (e.g. PEFT's ``generate_index``); every
            column must be used.  Default: ``isometric_projection(D, d, seed)``.

        Returns
        -------
        IsometricProjection

        Raises
        ------
        ValueError
            If no layer is attached, ``d > D``, or ``indices`` has the wrong length or leaves a
            column of :math:`P` empty.
        """
        if self.projection is not None:
            if indices is not None:
                raise ValueError("indices given but the projection is already built")
            return self.projection
        if self.D == 0:
            raise ValueError("no layer is attached: attach layers before finalize()")
        if self.d > self.D:
            raise ValueError(
                f"d must be <= D (the total LoRA parameter count of the attached layers), got d={self.d}, D={self.D}"
            )
        if indices is None and self.index_rule == "isometric":
            proj = isometric_projection(self.D, self.d, self.seed)
        elif indices is None:
            proj = IsometricProjection(balanced_indices(self.D, self.d, self.seed), self.d)
        else:
            idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
            if idx.shape != (self.D,):
                raise ValueError(f"indices must have shape ({self.D},), got {idx.shape}")
            proj = IsometricProjection(idx, self.d)
        dev = self.theta_d.device
        self.indices = torch.from_numpy(proj.indices).to(dev)
        self.values = torch.from_numpy(proj.values).to(device=dev, dtype=self.theta_d.dtype)
        self.projection = proj
        return proj

    def gather(self, offset: int, length: int) -> torch.Tensor:
        r"""Entries ``offset : offset + length`` of :math:`\theta_D = P\theta_d` (autograd flows to θ_d)."""
        self.finalize()
        idx = self.indices[offset : offset + length]
        vals = self.values[offset : offset + length]
        return self.theta_d[idx] * vals.to(self.theta_d.dtype)

    def theta_D(self) -> torch.Tensor:
        r"""The whole :math:`\theta_D = P\theta_d` (D,), for tests and theory."""
        return self.gather(0, self.D)

    def extra_repr(self) -> str:
        rule = "" if self.index_rule == "isometric" else f", index_rule={self.index_rule!r}"
        return f"d={self.d}, D={self.D}, layers={len(self.slots)}, finalized={self.finalized}{rule}"


@register
class UniLoRA(Adapter):
    r"""Uni-LoRA layer: :math:`\Delta W = s\,BA`, with A and B read from a slice of :math:`P\theta_d`.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int
        r, with ``1 <= r <= min(m, n)``.
    shared : UniLoRAShared, optional
        The model's shared vector; this layer attaches to it.  Default: a private one built from
        ``d``, ``seed``, ``init_bound`` and finalized at once (a one-layer model; then
        ``num_trainable == d``).
    d : int, default 256
        Length of θ_d for a private ``shared`` (ignored when ``shared`` is given).
    seed : int, default 0
        Seed for a private ``shared``.
    init_bound : float, default 0.02
        θ_d's init bound for a private ``shared``.
    index_rule : {"isometric", "balanced"}, default "isometric"
        Column assignment of a private ``shared`` (see :class:`UniLoRAShared`).
    scale : float, default 1.0
        s (PEFT and the authors' code apply no LoRA scale).
    dropout : float
        Dropout on the update's input.

    Notes
    -----
    Layer :math:`\ell` reads :math:`\theta_D[o_\ell : o_\ell + r(m+n)]`, the first :math:`rn`
    entries as :math:`A` (r×n, row-major) and the next :math:`mr` as :math:`B` (m×r), where
    :math:`(\theta_D)_i = \theta_d[j(i)]/\sqrt{n_{j(i)}}`.  Trainable: :math:`\theta_d` only
    (:math:`d` numbers for the whole model).

    Not identity at init: the paper, the authors' code and PEFT draw
    :math:`\theta_d \sim U(-b, b)`, so :math:`A` and :math:`B` both start non-zero and
    :math:`\Delta W \ne 0` (:math:`\theta_d = 0` would be a saddle: :math:`A = B = 0`, zero
    gradient).  With :math:`b = 0.02` the start is small, :math:`|\Delta W_{ij}| \lesssim r b^2`.

    Forward: gather :math:`r(m+n)` entries (:math:`O(r(m+n))`), then
    :math:`x \mapsto s\,(xA^\top)B^\top`.

    References
    ----------
    K. Li, S. Han, Q. Su, W. Li, Z. Cai, S. Ji, "Uni-LoRA: One Vector is All You Need",
    arXiv:2506.00799.
    """

    index_entry = adapter_entry(
        "unilora",
        Paper("Uni-LoRA: One Vector is All You Need", "2506.00799"),
        "d",
        ("tests/adapters/test_projection.py", "tests/adapters/test_peft_random.py"),
        proofs=("proofs/09-unilora-isometry.md",),
        notebooks=("notebooks/01_expressivity.py", "notebooks/07_random_bases.py"),
        peft="peft.UniLoraConfig",
        peft_test="tests/adapters/test_peft_random.py",
        note="one vector θ_d shared by all layers: d counts it once",
    )

    name = "unilora"
    identity_at_init = False
    params = schema(
        _UNILORA_VECTOR,
        rank=Int(1),
        shared=Instance(UniLoRAShared, doc="the model-wide vector; None makes a private one"),
        scale=Float(doc="s (no LoRA scale in the paper)"),
        dropout=Float(0.0, 1.0, high_open=True),
    )

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 4,
        shared: UniLoRAShared | None = None,
        d: int = 256,
        seed: int = 0,
        init_bound: float = 0.02,
        scale: float = 1.0,
        dropout: float = 0.0,
        index_rule: str = "isometric",
    ) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        self.scale = scale
        private = shared is None
        if private:
            shared = UniLoRAShared(d, seed=seed, init_bound=init_bound, index_rule=index_rule)
        self.rank = rank
        self.shared = shared
        self.offset = shared.attach(d_out, d_in, rank)
        self.numel = rank * (d_in + d_out)
        if private:
            shared.finalize()
        # config() describes the vector, not the object: the private equivalent (JSON-able for checkpoints)
        self._config.pop("shared", None)
        self._config.update(d=shared.d, seed=shared.seed, init_bound=shared.init_bound, index_rule=shared.index_rule)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def param_count(cls, d_out: int, d_in: int, d: int = 256, **_: Any) -> int:
        """θ_d's length: the count for a private shared vector (for the model, d in total)."""
        return d

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` of shapes (m, r), (r, n), gathered from θ_d."""
        theta = self.shared.gather(self.offset, self.numel)
        rn = self.rank * self.d_in
        return theta[rn:].view(self.d_out, self.rank), theta[:rn].view(self.rank, self.d_in)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        B, A = self.factors()
        return self.scale * (B @ A)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        B, A = self.factors()
        return self.scale * ((self.dropout(x) @ A.T) @ B.T)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, offset={self.offset}"
