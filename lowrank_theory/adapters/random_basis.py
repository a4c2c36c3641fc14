r"""Random-basis adapters: VeRA, NOLA and RandLoRA.

All three freeze seeded random matrices and train only a few coefficients on them:

* **VeRA** -- :math:`\Delta W = \operatorname{diag}(b)\,B\,\operatorname{diag}(d)\,A`, one pair
  :math:`(A, B)` shared by every layer; trains :math:`m + r` numbers per layer.
* **NOLA** -- :math:`\Delta W = s\,BA` with :math:`A = A_0 + \sum_i \alpha_i A_i`,
  :math:`B = \sum_j \beta_j B_j`; trains :math:`k + l` numbers per layer.
* **RandLoRA** -- :math:`\Delta W = s\sum_{i=1}^N B_i \operatorname{diag}(\lambda_i)\,A\,
  \operatorname{diag}(\gamma_i)`, :math:`N = \lceil \min(m,n)/r\rceil`, so the sum reaches full rank.

The frozen matrices are **non-persistent buffers** regenerated from the seed kept in
``config()``: a state dict holds only the trainable vectors.  VeRA and RandLoRA also take
``persistent_basis=True`` for a frozen basis that no seed reproduces (one read from a PEFT
adapter): the same init, but the buffers are the layer's own copies and are kept in the state
dict, so a checkpoint stores them and ``load_state_dict`` overwrites them.  Every forward applies the factors
to the activations and never forms the :math:`m \times n` update.

Sources of randomness.  VeRA uses PEFT's own recipe (a seeded ``torch.Generator``, Kaiming-uniform
draws, ``A`` first), so ``seed`` means the same as PEFT's ``projection_prng_key`` and our bases
equal PEFT's bit for bit: a PEFT checkpoint saved without its projection loads here.  NOLA and
RandLoRA draw through :func:`lowrank_theory.linalg.random_basis` (NumPy PCG64 on the host, the
same numbers on every backend), with one child seed per matrix from
:func:`~lowrank_theory.linalg.random.derive_seed`.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import torch
from torch import nn

from ..linalg.random import derive_seed, random_basis
from ..method_index import Paper, adapter_entry
from .base import Adapter, check_rank
from .params import Bool, Choice, Float, Int, Seed, Shape2, schema
from .registry import register

__all__ = ["NOLA", "RandLoRA", "VeRA", "randlora_basis", "vera_basis"]

RANDLORA_BASES = ("dense", "sparse", "very_sparse")


# ----------------------------------------------------------------------------- validation
def _check_int(value: Any, name: str, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value}")
    return int(value)


def _check_basis_shape(basis_shape: tuple[int, int] | None, d_out: int, d_in: int) -> tuple[int, int]:
    """``basis_shape`` (a validated pair or None) = the largest (d_out, d_in) over the layers sharing a basis."""
    if basis_shape is None:
        return d_out, d_in
    mo, mi = basis_shape
    if mo < d_out or mi < d_in:
        raise ValueError(
            f"basis_shape must be at least the layer's shape ({d_out}, {d_in}) in each axis, got ({mo}, {mi})"
        )
    return mo, mi


def _as_default_float(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.get_default_dtype())


def _register_basis(module: nn.Module, name: str, tensor: torch.Tensor, persistent: bool) -> None:
    # A persistent basis is written in place by load_state_dict: give the layer its own copy,
    # never a view of the cached shared tensors.
    module.register_buffer(name, tensor.clone() if persistent else tensor, persistent=persistent)


# ----------------------------------------------------------------------------- shared bases
@functools.lru_cache(maxsize=32)
def vera_basis(seed: int, rank: int, basis_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    r"""VeRA's shared frozen pair, drawn exactly as PEFT draws it.

    Parameters
    ----------
    seed : int
        Seed of ``torch.Generator("cpu")`` (PEFT's ``projection_prng_key``).
    rank : int
        r, the inner dimension.
    basis_shape : (int, int)
        The largest ``(d_out, d_in)`` over all layers sharing the pair.

    Returns
    -------
    A : torch.Tensor, shape (rank, max_d_in), float32
        Kaiming-uniform, :math:`U(-\sqrt{6/\text{max\_d\_in}}, \sqrt{6/\text{max\_d\_in}})`, drawn first.
    B : torch.Tensor, shape (max_d_out, rank), float32
        Kaiming-uniform with fan-in r, :math:`U(-\sqrt{6/r}, \sqrt{6/r})`, drawn second.

    Notes
    -----
    Cached per ``(seed, rank, basis_shape)``: layers slice the top-left corner of one pair
    (``A[:, :d_in]``, ``B[:d_out, :]``) as PEFT does.  The tensors are shared; never modify them
    in place.
    """
    seed = _check_int(seed, "seed", lo=0)
    g = torch.Generator(device="cpu").manual_seed(seed)
    max_out, max_in = basis_shape

    def kaiming(shape: tuple[int, int]) -> torch.Tensor:
        bound = math.sqrt(6.0 / shape[1])  # gain sqrt(2) times sqrt(3 / fan_in)
        return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=g)

    A = kaiming((rank, max_in))
    B = kaiming((max_out, rank))
    return A, B


@functools.lru_cache(maxsize=32)
def randlora_basis(
    seed: int, rank: int, basis_shape: tuple[int, int], basis: str, shared_a: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""RandLoRA's shared frozen bases for every layer up to ``basis_shape``.

    Parameters
    ----------
    seed : int
        Root seed; A and B get the children ``derive_seed(seed, "randlora/A" | "randlora/B")``.
    rank : int
        r, the rank of each basis.
    basis_shape : (int, int)
        The largest ``(d_out, d_in)`` over the layers sharing the bases; with
        :math:`p = \min`, :math:`q = \max` of it and :math:`N = \lceil p / r \rceil`:
    basis : {"dense", "sparse", "very_sparse"}
        ``"dense"``: Gaussian entries of unit variance.  ``"sparse"``: ternary
        :math:`\sqrt3\{-1, 0, 1\}` with probabilities :math:`1/6, 2/3, 1/6`.  ``"very_sparse"``:
        ternary with non-zero probability :math:`1/\sqrt p`.  All have unit variance.
    shared_a : bool
        One A for all bases (the paper and PEFT) or one per basis.

    Returns
    -------
    A : torch.Tensor, shape (1, rank, p) or (N, rank, p), float64
    B : torch.Tensor, shape (q, N, rank), float64
        ``B[:, i, :]`` is :math:`B_i`.
    """
    max_out, max_in = basis_shape
    p, q = min(max_out, max_in), max(max_out, max_in)
    n_bases = -(-p // rank)
    if basis == "dense":
        kind, density = "gaussian", 1.0
    else:
        kind, density = "sparse_ternary", (1.0 / 3.0 if basis == "sparse" else 1.0 / math.sqrt(p))
    a_shape = (1 if shared_a else n_bases, rank, p)
    A = random_basis(a_shape, kind, seed=derive_seed(seed, "randlora/A"), density=density)
    B = random_basis((q, n_bases, rank), kind, seed=derive_seed(seed, "randlora/B"), density=density)
    return torch.from_numpy(A), torch.from_numpy(B)


@functools.lru_cache(maxsize=8)
def _randlora_basis_as(seed: int, rank: int, basis_shape: tuple[int, int], basis: str, shared_a: bool,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`randlora_basis` converted to ``dtype`` once, so the layers' slices are views of one shared copy."""
    A, B = randlora_basis(seed, rank, basis_shape, basis, shared_a)
    return A.to(dtype), B.to(dtype)


class _ScaledBasis(torch.autograd.Function):
    r""":math:`\tilde A_n = \operatorname{diag}(\lambda_n) A_n \operatorname{diag}(\gamma_n)`, (N, r, p), saving only
    :math:`\lambda, A, \gamma` for the backward (which recomputes the products): autograd's two multiplies would
    also keep the (N, r, p) intermediate :math:`\lambda A`, one more p×p-sized tensor per layer for the whole step
    (5 GiB on Llama-3-8B at 2048 tokens, ``lowrank_theory.theory.llm_memory``).  PEFT's ``UniqueBaseGrad`` does
    the same.  First derivatives only."""

    @staticmethod
    def forward(ctx, lam: torch.Tensor, A: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(lam, A, gamma)
        return lam[:, :, None] * A * gamma[:, None, :]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        lam, A, gamma = ctx.saved_tensors
        gA = g * A.to(g.dtype)  # (N, r, p), a temporary of the backward only
        g_lam = g_gamma = None
        if ctx.needs_input_grad[0]:  # dL/dλ_nr = Σ_p g_nrp A_nrp γ_np
            g_lam = (gA * gamma.to(g.dtype)[:, None, :]).sum(-1).to(lam.dtype)
        if ctx.needs_input_grad[2]:  # dL/dγ_np = Σ_r g_nrp A_nrp λ_nr
            g_gamma = (gA * lam.to(g.dtype)[:, :, None]).sum(1).to(gamma.dtype)
        return g_lam, None, g_gamma


# ============================================================================= VeRA
@register
class VeRA(Adapter):
    r"""VeRA: :math:`\Delta W = \operatorname{diag}(b)\,B\,\operatorname{diag}(d)\,A` with a frozen shared pair.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int
        r, the inner dimension of the shared pair, ``r >= 1`` (VeRA uses large r, e.g. 256,
        since r costs only r trainable numbers per layer; r may exceed min(m, n)).
    d_initial : float, default 0.1
        Initial value of every entry of d.
    seed : int, default 0
        Seed of the shared pair (PEFT's ``projection_prng_key``).
    basis_shape : (int, int), optional
        The largest ``(d_out, d_in)`` over all layers sharing the pair; default this layer's.
        Layers slice ``A[:, :n]`` and ``B[:m, :]`` from one pair of that size.
    dropout : float
        Dropout on the update's input.
    persistent_basis : bool, default False
        Keep this layer's slice of the pair as persistent buffers (in the state dict), for a
        pair that ``seed`` does not reproduce.

    Notes
    -----
    Frozen :math:`A \in \mathbb R^{r\times n}`, :math:`B \in \mathbb R^{m \times r}` (see
    :func:`vera_basis`); trainable :math:`b \in \mathbb R^m`, :math:`d \in \mathbb R^r`, so
    :math:`m + r` numbers per layer.  Init (paper §3.2 and PEFT): :math:`b = 0` and
    :math:`d = d_\text{initial}`, so :math:`\Delta W = 0` while :math:`\partial L/\partial b \neq 0`.
    No extra scale.  Forward :math:`x \mapsto (((x A^\top) \odot d) B^\top) \odot b` in
    :math:`O(r(m + n))` per token.

    References
    ----------
    D. J. Kopiczko, T. Blankevoort, Y. M. Asano, "VeRA: Vector-based Random Matrix Adaptation",
    arXiv:2310.11454.
    """

    index_entry = adapter_entry(
        "vera",
        Paper("VeRA: Vector-based Random Matrix Adaptation", "2310.11454"),
        "d_out + rank",
        ("tests/adapters/test_random_basis.py", "tests/adapters/test_peft_random.py"),
        notebooks=("notebooks/01_expressivity.py", "notebooks/07_random_bases.py"),
        peft="peft.VeraConfig",
        peft_test="tests/adapters/test_peft_random.py",
    )

    name = "vera"
    params = schema(
        rank=Int(1, doc="r, the inner dimension of the shared pair (may exceed min(d_out, d_in))"),
        d_initial=Float(doc="initial value of every entry of d"),
        seed=Seed(doc="seed of the frozen shared pair"),
        basis_shape=Shape2(doc="the largest (d_out, d_in) of the layers sharing the pair"),
        dropout=Float(0.0, 1.0, high_open=True),
        persistent_basis=Bool(doc="keep the frozen basis in the state dict (one no seed reproduces, e.g. from PEFT)"),
    )

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 256,
        d_initial: float = 0.1,
        seed: int = 0,
        basis_shape: tuple[int, int] | None = None,
        dropout: float = 0.0,
        persistent_basis: bool = False,
    ) -> None:
        super().__init__(d_out, d_in)
        shape = _check_basis_shape(basis_shape, d_out, d_in)
        persistent = persistent_basis
        self.rank = rank
        A, B = vera_basis(seed, rank, shape)
        _register_basis(self, "vera_A", _as_default_float(A[:, :d_in]), persistent)
        _register_basis(self, "vera_B", _as_default_float(B[:d_out, :]), persistent)
        self.b = nn.Parameter(torch.zeros(d_out))
        self.d = nn.Parameter(torch.full((rank,), d_initial))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 256, **_: Any) -> int:
        return d_out + rank

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return (self.b[:, None] * self.vera_B) @ (self.d[:, None] * self.vera_A)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return (((self.dropout(x) @ self.vera_A.T) * self.d) @ self.vera_B.T) * self.b


# ============================================================================= NOLA
@register
class NOLA(Adapter):
    r"""NOLA: LoRA whose factors are linear combinations of seeded random bases.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int
        r, with ``1 <= r <= min(m, n)``.
    num_basis_a, num_basis_b : int
        k and l, the numbers of random bases of A and of B (the trainable count is k + l).
    alpha : float, default ``rank``
        Scale numerator, :math:`s = \alpha / r` (as LoRA and the NOLA code).
    seed : int, default 0
        Root seed of this layer's bases (each layer should get its own, e.g. with
        :func:`~lowrank_theory.linalg.random.derive_seed`).
    dropout : float
        Dropout on the update's input.

    Notes
    -----
    .. math::

        \Delta W = s\,BA, \qquad A = A_0 + \sum_{i=1}^{k}\alpha_i A_i, \qquad
        B = \sum_{j=1}^{l}\beta_j B_j,

    :math:`A_i \in \mathbb R^{r\times n}`, :math:`B_j \in \mathbb R^{m \times r}` i.i.d. Gaussian
    scaled by :math:`1/\sqrt k` and :math:`1/\sqrt l` (the NOLA code draws :math:`U(-1,1)/\sqrt k`;
    only the variance matters), :math:`A_0` Gaussian with standard deviation :math:`1/\sqrt n` (the
    authors use LoRA's Kaiming-uniform init of A, :math:`U(\pm 1/\sqrt n)`).

    Init, checked against the authors' GPT-2/LLaMA code (``LoRA.reset_lora_parameters``): both
    coefficient vectors are zero, and A carries a frozen random offset :math:`A_0` (their
    ``NOLALinear`` adds its frozen Kaiming-initialized ``weight`` to the generated matrix).  So
    :math:`B = 0` and :math:`\Delta W = 0` at init while :math:`\partial L/\partial\beta \neq 0` --
    LoRA's own init, one level down.  Without :math:`A_0`, :math:`\alpha = \beta = 0` would be a
    saddle with zero gradient for both.  :math:`A_0` comes from the seed, so the storage is still
    the seed plus :math:`k + l` numbers.

    Forward: build :math:`A` (cost :math:`k r n`) and :math:`B` (cost :math:`l m r`) once per call,
    then :math:`x \mapsto s\,(x A^\top) B^\top` in :math:`O(r(m+n))` per token.

    References
    ----------
    S. A. Koohpayegani, K. L. Navaneet, P. Nooralinejad, S. Kolouri, H. Pirsiavash,
    "NOLA: Compressing LoRA using Linear Combination of Random Basis", arXiv:2310.02556.
    """

    index_entry = adapter_entry(
        "nola",
        Paper("NOLA: Compressing LoRA using Linear Combination of Random Basis", "2310.02556"),
        "num_basis_a + num_basis_b",
        ("tests/adapters/test_random_basis.py",),
        notebooks=("notebooks/01_expressivity.py", "notebooks/07_random_bases.py"),
    )

    name = "nola"
    params = schema(
        rank=Int(1),
        num_basis_a=Int(1, doc="k, random bases of A"),
        num_basis_b=Int(1, doc="l, random bases of B"),
        alpha=Float(none_ok=True, doc="scale numerator; None means alpha = rank"),
        seed=Seed(doc="root seed of this layer's frozen bases"),
        dropout=Float(0.0, 1.0, high_open=True),
    )

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 8,
        num_basis_a: int = 256,
        num_basis_b: int = 256,
        alpha: float | None = None,
        seed: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        k, l_ = num_basis_a, num_basis_b
        self.rank = rank
        self.scale = float(rank if alpha is None else alpha) / rank
        bases_a = random_basis((k, rank, d_in), "gaussian", seed=derive_seed(seed, "nola/A"), scale=1 / math.sqrt(k))
        bases_b = random_basis((l_, d_out, rank), "gaussian", seed=derive_seed(seed, "nola/B"), scale=1 / math.sqrt(l_))
        a0 = random_basis((rank, d_in), "gaussian", seed=derive_seed(seed, "nola/A0"), scale="fan_in")
        self.register_buffer("bases_a", _as_default_float(torch.from_numpy(bases_a)), persistent=False)
        self.register_buffer("bases_b", _as_default_float(torch.from_numpy(bases_b)), persistent=False)
        self.register_buffer("a0", _as_default_float(torch.from_numpy(a0)), persistent=False)
        self.alpha = nn.Parameter(torch.zeros(k))
        self.beta = nn.Parameter(torch.zeros(l_))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def param_count(cls, d_out: int, d_in: int, num_basis_a: int = 256, num_basis_b: int = 256, **_: Any) -> int:
        return num_basis_a + num_basis_b

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` of shapes (m, r), (r, n), built from the coefficients (cost k·r·n + l·m·r)."""
        A = self.a0 + torch.tensordot(self.alpha, self.bases_a, dims=1)
        B = torch.tensordot(self.beta, self.bases_b, dims=1)
        return B, A

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        B, A = self.factors()
        return self.scale * (B @ A)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        B, A = self.factors()
        return self.scale * ((self.dropout(x) @ A.T) @ B.T)


# ============================================================================= RandLoRA
@register
class RandLoRA(Adapter):
    r"""RandLoRA: a full-rank update from N frozen random rank-r bases and trained diagonal scalings.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight; :math:`p = \min(m, n)`, :math:`q = \max(m, n)`.
    rank : int
        r, the rank of each basis, ``1 <= r <= p``; :math:`N = \lceil p / r\rceil` bases.
    alpha : float, default ``20 * rank``
        Scale numerator, :math:`s = \alpha / r` (PEFT's ``randlora_alpha``, "typically 20 times
        the rank", whose default 640 at r = 32 gives s = 20).
    seed : int, default 0
        Root seed of the shared bases (see :func:`randlora_basis`).
    basis : {"dense", "sparse", "very_sparse"}
        Distribution of the bases (sparse ternary: the paper's matmul-free variant).
    shared_a : bool, default True
        One A for all bases (paper, PEFT) or one :math:`A_i` per basis.
    basis_shape : (int, int), optional
        The largest ``(d_out, d_in)`` over the layers sharing the bases; default this layer's.
    dropout : float
        Dropout on the update's input.
    persistent_basis : bool, default False
        Keep this layer's bases as persistent buffers (in the state dict), for bases that
        ``seed`` does not reproduce (PEFT's, drawn by its own generator).

    Notes
    -----
    With :math:`B_i \in \mathbb R^{q \times r}` and :math:`A \in \mathbb R^{r \times p}` frozen,
    :math:`\lambda_i \in \mathbb R^r` and :math:`\gamma_i \in \mathbb R^p` trained,

    .. math::

        M = s\sum_{i=1}^{N} B_i \operatorname{diag}(\lambda_i)\, A \operatorname{diag}(\gamma_i)
        \in \mathbb R^{q\times p}, \qquad \Delta W = M \ (m \ge n), \quad \Delta W = M^\top\ (m < n).

    What we checked.  The paper (§4) writes :math:`\Delta W = \sum_n B_n \Lambda_n A \Gamma_n`
    with a *different* :math:`B_n` per term and *one shared* :math:`A`, :math:`\Lambda_n` (r×r) and
    :math:`\Gamma_n` diagonal; PEFT 0.21 (``tuners/randlora``) stores ``randlora_A`` as
    (r, 1, p) -- shared -- and ``randlora_B`` as (q, N, r), trains ``randlora_lambda`` (r, N) and
    ``randlora_gamma`` (N, p), puts :math:`\gamma` on the **smaller** side (A's), transposes the
    product when :math:`m < n`, scales by ``alpha / r``, and initializes :math:`\lambda = 0`
    (so :math:`\Delta W = 0`) and :math:`\gamma = 1/p`.  We follow that; ``shared_a=False`` is our
    option.  One detail: PEFT flattens ``B`` basis-major (column :math:`i r + k`) but
    :math:`\lambda A \gamma` rank-major (row :math:`k N + i`), so its term :math:`i` pairs a
    re-indexed set of B columns; the columns are i.i.d., so the family of updates is the same,
    and ``tests/adapters/test_peft_random.py`` maps PEFT's tensors onto ours exactly.

    Trainable count :math:`N(r + p)`.  Forward batches the N bases as one :math:`Nr`-wide
    product: :math:`\tilde A = [\lambda_i \odot A \odot \gamma_i]_i \in \mathbb R^{Nr \times p}`
    (cost :math:`Nrp`, once per call), then :math:`x \mapsto s\,(x\tilde A^\top)B_\text{cat}^\top`
    (or :math:`s\,(x B_\text{cat})\tilde A` when :math:`m < n`), :math:`O(Nr(p + q))` per token,
    with :math:`B_\text{cat} = [B_1 \cdots B_N] \in \mathbb R^{q \times Nr}`; the :math:`q\times p`
    update is never formed.

    References
    ----------
    P. Albert, F. Z. Zhang, H. Saratchandran, C. Rodriguez-Opazo, A. van den Hengel,
    E. Abbasnejad, "RandLoRA: Full-rank parameter-efficient fine-tuning of large models",
    arXiv:2502.00987.
    """

    index_entry = adapter_entry(
        "randlora",
        Paper("RandLoRA: Full-rank parameter-efficient fine-tuning of large models", "2502.00987"),
        "ceil(min(d_out, d_in) / rank) * (rank + min(d_out, d_in))",
        ("tests/adapters/test_random_basis.py", "tests/adapters/test_peft_random.py"),
        proofs=("proofs/10-randlora-full-rank.md",),
        notebooks=("notebooks/01_expressivity.py", "notebooks/07_random_bases.py"),
        peft="peft.RandLoraConfig",
        peft_test="tests/adapters/test_peft_random.py",
    )

    name = "randlora"
    params = schema(
        rank=Int(1, doc="r, the rank of each basis"),
        alpha=Float(none_ok=True, doc="scale numerator; None means 20 * rank"),
        seed=Seed(doc="root seed of the frozen shared bases"),
        basis=Choice(*RANDLORA_BASES, doc="distribution of the bases"),
        shared_a=Bool(doc="one A for all bases (paper, PEFT) or one per basis"),
        basis_shape=Shape2(doc="the largest (d_out, d_in) of the layers sharing the bases"),
        dropout=Float(0.0, 1.0, high_open=True),
        persistent_basis=Bool(doc="keep the frozen basis in the state dict (one no seed reproduces, e.g. from PEFT)"),
    )

    def __init__(
        self,
        d_out: int,
        d_in: int,
        rank: int = 32,
        alpha: float | None = None,
        seed: int = 0,
        basis: str = "dense",
        shared_a: bool = True,
        basis_shape: tuple[int, int] | None = None,
        dropout: float = 0.0,
        persistent_basis: bool = False,
    ) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        alpha = 20.0 * rank if alpha is None else alpha
        shape = _check_basis_shape(basis_shape, d_out, d_in)
        persistent = persistent_basis
        p, q = min(d_out, d_in), max(d_out, d_in)
        self.rank, self.num_bases = rank, -(-p // rank)
        self.scale = alpha / rank
        self.transposed = d_out < d_in  # M is (q, p); ΔW = Mᵀ when the output side is the smaller
        # slices (views) of one cached copy in the default dtype: every layer shares it, on any device
        # after injection (training.injection converts the shared tensor once), as PEFT shares its pair
        A, B = _randlora_basis_as(seed, rank, shape, basis, shared_a, torch.get_default_dtype())
        n = self.num_bases
        _register_basis(self, "randlora_A", A[: 1 if shared_a else n, :, :p], persistent)
        _register_basis(self, "randlora_B", B[:q, :n, :], persistent)
        self.lam = nn.Parameter(torch.zeros(n, rank))
        self.gamma = nn.Parameter(torch.full((n, p), 1.0 / p))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 32, **_: Any) -> int:
        p = min(d_out, d_in)
        return -(-p // rank) * (rank + p)

    def scaled_bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(B_cat, A_tilde)``: (q, N·r) and (N·r, p), with :math:`M = s\,B_\text{cat}\tilde A`."""
        a_tilde = _ScaledBasis.apply(self.lam, self.randlora_A, self.gamma)  # (N, r, p)
        return self.randlora_B.reshape(self.randlora_B.shape[0], -1), a_tilde.reshape(-1, a_tilde.shape[-1])

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        b_cat, a_tilde = self.scaled_bases()
        M = self.scale * (b_cat @ a_tilde)
        return M.T if self.transposed else M

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        b_cat, a_tilde = self.scaled_bases()
        x = self.dropout(x)
        if self.transposed:  # ΔW = ã^T b_catᵀ: x ΔWᵀ = (x b_cat) ã
            return self.scale * ((x @ b_cat) @ a_tilde)
        return self.scale * ((x @ a_tilde.T) @ b_cat.T)
