r"""Adapters on frozen singular frames: LoRA-XS, LoRA-SB and SVFit.

All three freeze two orthonormal (or scaled orthonormal) frames read from a decomposition and
train a tiny core between them:

* **LoRA-XS** -- :math:`\Delta W = s\,B R A`, frames from the truncated SVD of :math:`W_0`,
  :math:`R \in \mathbb R^{r\times r}` trained;
* **LoRA-SB** -- the same architecture, with :math:`B, R, A` read from the truncated SVD of the
  first full-fine-tuning update, so that :math:`BRA` starts as its best rank-r approximation;
* **SVFit** -- :math:`\Delta W = U_r \operatorname{diag}(\delta) V_r^\top`, the top singular
  values of :math:`W_0` made trainable.

The frames are **persistent buffers**: they come from :math:`W_0` or from a gradient, not from
a seed, so a state dict must carry them (``create(...)`` without a weight draws seeded random
orthonormal frames, also kept as buffers so that a checkpoint restores either kind).  The
forward pass applies the factors to the activations (``((x Aᵀ) Rᵀ) Bᵀ``, cost
:math:`O(r(m+n) + r^2)` per token) and never forms the :math:`m\times n` update.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from ..linalg import derive_seed, random_basis, truncated_svd
from ..method_index import Paper, adapter_entry
from .base import Adapter, check_rank, check_sizes, check_weight
from .params import Float, Int, Seed, schema
from .registry import register

__all__ = ["LoRASB", "LoRAXS", "SVFit", "check_matrix_weight", "orthonormal_frames"]


# ----------------------------------------------------------------------------- helpers
def check_matrix_weight(W: Any, name: str = "weight") -> torch.Tensor:
    """A finite floating 2-D torch tensor (``TypeError``/``ValueError`` naming ``name`` otherwise)."""
    check_weight(W, name)
    if W.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (d_out, d_in) matrix, got shape {tuple(W.shape)}")
    return W


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype of a decomposition: float32 for half inputs, else the input's dtype."""
    return torch.promote_types(dtype, torch.float32)


def _svd(W: torch.Tensor, rank: int):
    """Truncated SVD of W in float32 or better (``linalg.truncated_svd``; half inputs are upcast)."""
    return truncated_svd(W.detach().to(_acc(W.dtype)), rank)


def orthonormal_frames(d_out: int, d_in: int, rank: int, seed: int, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Seeded Haar-random frames: ``B`` (d_out, r) with orthonormal columns, ``A`` (r, d_in) with orthonormal rows.

    Drawn by :func:`lowrank_theory.linalg.random_basis` (``"orthogonal"``) from the children
    ``derive_seed(seed, tag + "/B")`` and ``derive_seed(seed, tag + "/A")``, in the default dtype.
    """
    seed = _check_seed(seed)
    dt = torch.get_default_dtype()
    B = torch.from_numpy(random_basis((d_out, rank), "orthogonal", seed=derive_seed(seed, tag + "/B"))).to(dt)
    A = torch.from_numpy(random_basis((rank, d_in), "orthogonal", seed=derive_seed(seed, tag + "/A"))).to(dt)
    return B, A


def _scale(alpha: float | None, rank: int) -> tuple[float, float]:
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return alpha, alpha / rank


# ----------------------------------------------------------------------------- B R A core
class _FrozenFramesCore(Adapter):
    r"""Common machinery of :math:`\Delta W = s\,BRA` with frozen ``B``, ``A`` and a trainable ``R``."""

    def __init__(self, d_out: int, d_in: int, rank: int, scale: float, seed: int, tag: str) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        self.rank = rank
        self.scale = float(scale)
        B, A = orthonormal_frames(d_out, d_in, rank, seed, tag)
        self.register_buffer("B", B)  # persistent: set from W0 / a gradient by the constructors
        self.register_buffer("A", A)
        self.R = nn.Parameter(torch.zeros(rank, rank))

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 8, **_: Any) -> int:
        return rank * rank

    @torch.no_grad()
    def _set_frames(self, B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> None:
        self.B = B.detach().to(dtype).contiguous()
        self.A = A.detach().to(dtype).contiguous()
        self.R.data = self.R.data.to(dtype)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * (self.B @ self.R @ self.A)

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return self.scale * (((x @ self.A.T) @ self.R.T) @ self.B.T)


@register
class LoRAXS(_FrozenFramesCore):
    r"""LoRA-XS: :math:`\Delta W = s\,B R A` with frozen :math:`B, A` from the SVD of :math:`W_0`.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int, default 8
        r, ``1 <= r <= min(m, n)``; the trainable core R is r×r.
    alpha : float, default ``rank``
        Scale numerator, :math:`s = \alpha / r` (PEFT's LoRA scaling, which the reference code keeps).
    seed : int, default 0
        Seed of the random orthonormal frames used when no weight is given (``create``);
        :meth:`from_weight` replaces them by the SVD frames.

    Notes
    -----
    With :math:`W_0 = U \Sigma V^\top` and :math:`U_r, \Sigma_r, V_r` its top-r part,

    .. math:: B = U_r, \qquad A = \Sigma_r V_r^\top, \qquad R_0 = 0,
       \qquad \Delta W = s\, U_r R\, \Sigma_r V_r^\top .

    **Which factor carries** :math:`\Sigma_r`.  The paper writes the layer as :math:`xW` and sets
    its input-side factor to :math:`U_r\Sigma_r` (of :math:`W^\top` in our orientation); the
    authors' code (``get_svd_replacement_module`` applied to ``weight.T``) puts the singular values
    on ``lora_A``, the input side.  In our ``(d_out, d_in)`` orientation that is
    :math:`A = \Sigma_r V_r^\top`, :math:`B = U_r`.  R is zero here (identity at init); the
    reference code draws it from :math:`\mathcal N(0, 10^{-10})`, which is zero to working accuracy.
    The gradient of R is :math:`s\,B^\top G A^\top \ne 0`, so training starts at once.

    Forward: :math:`x \mapsto s\,((xA^\top)R^\top)B^\top`, :math:`O(r(m + n) + r^2)` per token.
    Trainable: :math:`r^2`.  Frames are persistent buffers (they encode :math:`W_0`).

    References
    ----------
    K. Bałazy, M. Banaei, K. Aberer, J. Tabor, "LoRA-XS: Low-Rank Adaptation with Extremely Small
    Number of Parameters", arXiv:2405.17604.
    """

    index_entry = adapter_entry(
        "lora_xs",
        Paper("LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters", "2405.17604"),
        "rank ** 2",
        ("tests/adapters/test_svd_based.py",),
        proofs=("proofs/04-lorasb-subspace.md",),
        notebooks=("notebooks/01_expressivity.py", "notebooks/04_lorasb_init.py"),
    )

    name = "lora_xs"
    params = schema(rank=Int(1), alpha=Float(none_ok=True, doc="scale numerator; None means alpha = rank"),
                    seed=Seed(doc="seed of the frozen orthonormal frames"))

    def __init__(self, d_out: int, d_in: int, rank: int = 8, alpha: float | None = None, seed: int = 0) -> None:
        check_rank(rank, *check_sizes(d_out, d_in))
        alpha, scale = _scale(alpha, rank)
        super().__init__(d_out, d_in, rank, scale, seed, "lora_xs")

    @classmethod
    def from_weight(
        cls, W: torch.Tensor, rank: int = 8, alpha: float | None = None, seed: int = 0
    ) -> tuple[LoRAXS, torch.Tensor]:
        r"""LoRA-XS for the frozen weight ``W``: frames :math:`B = U_r`, :math:`A = \Sigma_r V_r^\top`.

        Parameters
        ----------
        W : torch.Tensor, shape (d_out, d_in)
            The frozen weight, finite, floating (half precision is decomposed in float32).
        rank, alpha, seed
            As in the class.

        Returns
        -------
        adapter : LoRAXS
            In ``W``'s dtype and device, with R = 0.
        base_weight : torch.Tensor
            ``W`` itself (LoRA-XS leaves the frozen weight unchanged).

        Raises
        ------
        TypeError, ValueError
            If ``W`` is not a finite floating 2-D tensor or ``rank`` is out of range.
        """
        check_matrix_weight(W, "W")
        ad = cls(W.shape[0], W.shape[1], rank=rank, alpha=alpha, seed=seed).to(W.device)
        U, S, Vh = _svd(W, rank)
        ad._set_frames(U, S[:, None] * Vh, W.dtype)
        return ad, W


@register
class LoRASB(_FrozenFramesCore):
    r"""LoRA-SB: the LoRA-XS architecture initialised from the first full-fine-tuning update.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int, default 8
        r, ``1 <= r <= min(m, n)``.
    seed : int, default 0
        Seed of the random orthonormal frames used without a gradient (``create``; then R = 0).

    Notes
    -----
    Let :math:`\Delta_1` be the update one step of full fine-tuning would make,
    :math:`\Delta_1 = -\eta\,G` (plain gradient) or :math:`-\eta\operatorname{sign}(G)` (the first
    Adam step, which the authors' code uses), and :math:`\Delta_1 = U\Sigma V^\top`.  Then

    .. math:: B = U_r, \qquad R_0 = \Sigma_r, \qquad A = V_r^\top, \qquad
       B R_0 A = [\Delta_1]_r = \operatorname*{arg\,min}_{\operatorname{rank} X \le r}\|\Delta_1 - X\|_F .

    **Checked against the authors' code** (``find_and_initialize_grad`` +
    ``get_svd_grad``: SVD of the transposed accumulated update, ``lora_A = V_r^T``,
    ``lora_B = U_r``, latent ``R = Σ_r``; the frozen weight is *not* modified, so the model at
    init already carries :math:`[\Delta_1]_r`, i.e. it starts from an approximation of the first
    full-fine-tuning step).  That is our default; ``keep_output=True`` in :meth:`from_gradient`
    instead returns :math:`W_0 - BR_0A` as the new base so the layer is unchanged at init.
    There is no :math:`\alpha/r` scale: the paper's point is that B and A orthonormal make the
    update independent of it (the reference code multiplies by PEFT's scaling, which only
    rescales R's effective learning rate).

    With B, A frozen and orthonormal, the gradient of R is :math:`B^\top G A^\top`, and every
    step :math:`\Delta R` changes the weight by :math:`B\,\Delta R\,A \in \{BXA\}`; for SGD this
    is :math:`-\eta P_B G P_A`, the best step within that space
    (:func:`lowrank_theory.theory.gradients.lorasb_step`).

    Trainable: :math:`r^2`.  Forward as LoRA-XS.

    References
    ----------
    K. Ponkshe, R. Singhal, E. Gorbunov, A. Tumanov, S. Horvath, P. Vepakomma, "Initialization
    using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning",
    arXiv:2411.19557.
    """

    index_entry = adapter_entry(
        "lora_sb",
        Paper(("Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank "
               "Fine-Tuning"), "2411.19557"),
        "rank ** 2",
        ("tests/adapters/test_svd_based.py",),
        proofs=("proofs/04-lorasb-subspace.md", "proofs/01-eckart-young-mirsky.md"),
        notebooks=("notebooks/03_gradient_approximation.py", "notebooks/04_lorasb_init.py"),
    )

    name = "lora_sb"
    params = schema(rank=Int(1), seed=Seed(doc="seed of the frozen orthonormal frames"))

    def __init__(self, d_out: int, d_in: int, rank: int = 8, seed: int = 0) -> None:
        super().__init__(d_out, d_in, rank, 1.0, seed, "lora_sb")

    @classmethod
    def from_gradient(
        cls,
        grad: torch.Tensor,
        rank: int = 8,
        *,
        base_weight: torch.Tensor,
        lr: float = 1.0,
        sign: bool = False,
        keep_output: bool = False,
        seed: int = 0,
    ) -> tuple[LoRASB, torch.Tensor]:
        r"""LoRA-SB from the gradient ``grad`` of the first full-fine-tuning batch.

        Parameters
        ----------
        grad : torch.Tensor, shape (d_out, d_in)
            :math:`G = \partial L / \partial W` at :math:`W_0` (summed or averaged over the batch).
        rank : int, default 8
            r, ``1 <= r <= min(d_out, d_in)``.
        base_weight : torch.Tensor, shape (d_out, d_in)
            The frozen weight :math:`W_0` (returned unchanged unless ``keep_output``).
        lr : float, default 1.0
            :math:`\eta > 0`; the update is :math:`\Delta_1 = -\eta G` (or :math:`-\eta\operatorname{sign} G`).
        sign : bool, default False
            Use the sign of the gradient (the first step of Adam), as the authors' code does.
        keep_output : bool, default False
            Return :math:`W_0 - BR_0A` as the new base, so the adapted layer equals the frozen one
            at init (not the paper's choice; useful to study the adapter from identity).
        seed : int, default 0
            Passed to the constructor (unused frames are overwritten).

        Returns
        -------
        adapter : LoRASB
            With :math:`BR_0A = [\Delta_1]_r`, in ``base_weight``'s dtype and device.
        base_weight : torch.Tensor
            :math:`W_0`, or :math:`W_0 - BR_0A` with ``keep_output``.

        Raises
        ------
        TypeError, ValueError
            If ``grad`` or ``base_weight`` is not a finite floating 2-D tensor, their shapes differ,
            ``lr`` is not a positive finite number, ``rank`` is out of range, or the update is zero.
        """
        check_matrix_weight(grad, "grad")
        check_matrix_weight(base_weight, "base_weight")
        if tuple(grad.shape) != tuple(base_weight.shape):
            raise ValueError(
                f"grad must have base_weight's shape {tuple(base_weight.shape)}, got {tuple(grad.shape)}"
            )
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        update = -float(lr) * (torch.sign(grad) if sign else grad).detach().to(_acc(grad.dtype))
        if not bool(update.any()):
            raise ValueError("grad is identically zero: the first update has no singular directions")
        ad = cls(grad.shape[0], grad.shape[1], rank=rank, seed=seed).to(base_weight.device)
        U, S, Vh = _svd(update, rank)
        ad._set_frames(U, Vh, base_weight.dtype)
        with torch.no_grad():
            ad.R.copy_(torch.diag(S).to(base_weight.dtype))
        ad.identity_at_init = keep_output  # else the layer starts at W0 + [-ηG]_r by design
        if keep_output:
            acc = _acc(base_weight.dtype)
            new_base = (base_weight.to(acc) - ad.delta_weight().detach().to(acc)).to(base_weight.dtype)
            return ad, new_base
        return ad, base_weight


# ----------------------------------------------------------------------------- SVFit
@register
class SVFit(Adapter):
    r"""SVFit: :math:`\Delta W = U_r \operatorname{diag}(\delta)\,V_r^\top`, the top-r singular values made trainable.

    Parameters
    ----------
    d_out, d_in : int
        Shape (m, n) of the frozen weight.
    rank : int, default 8
        r, ``1 <= r <= min(m, n)``.
    seed : int, default 0
        Seed of the random orthonormal frames used when no weight is given (``create``).

    Notes
    -----
    SVFit (arXiv:2409.05926) takes the best rank-r approximation
    :math:`U_r \Sigma_r V_r^\top` of :math:`W_0` and trains its singular values, which "scale the
    fundamental subspaces": :math:`W' = (W_0 - U_r\Sigma_r V_r^\top) + U_r \operatorname{diag}(\sigma)
    V_r^\top` with :math:`\sigma` initialised to :math:`\operatorname{diag}\Sigma_r`.  We store the
    shift :math:`\delta = \sigma - \operatorname{diag}\Sigma_r` instead, so

    .. math:: W' = W_0 + U_r \operatorname{diag}(\delta) V_r^\top, \qquad \delta_0 = 0 ,

    the same weight for every :math:`\sigma` and the same gradients (a constant shift); only
    weight decay, which would pull :math:`\sigma` (not :math:`\delta`) to zero, would differ.
    Joint sign flips :math:`(u_i, v_i) \to (-u_i, -v_i)` leave :math:`\Delta W` unchanged, so
    the update is well defined whenever the top-r singular values are distinct from the rest.

    Forward: :math:`x \mapsto ((xV_r) \odot \delta)\,U_r^\top`, :math:`O(r(m+n))` per token.
    Trainable: :math:`r`.  Frames are persistent buffers.

    References
    ----------
    C. Sun, J. Wei, Y. Wu, Y. Shi, S. He, Z. Ma, N. Xie, Y. Yang, "SVFit: Parameter-Efficient
    Fine-Tuning of Large Pre-Trained Models Using Singular Values", arXiv:2409.05926.
    """

    index_entry = adapter_entry(
        "svfit",
        Paper(
            "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values",
            "2409.05926"),
        "rank",
        ("tests/adapters/test_svd_based.py",),
        proofs=("proofs/01-eckart-young-mirsky.md",),
        notebooks=("notebooks/01_expressivity.py",),
    )

    name = "svfit"
    params = schema(rank=Int(1), seed=Seed(doc="seed of the frozen orthonormal frames"))

    def __init__(self, d_out: int, d_in: int, rank: int = 8, seed: int = 0) -> None:
        super().__init__(d_out, d_in)
        check_rank(rank, d_out, d_in)
        self.rank = rank
        U, Vh = orthonormal_frames(d_out, d_in, rank, seed, "svfit")
        self.register_buffer("U", U)
        self.register_buffer("Vh", Vh)
        self.delta = nn.Parameter(torch.zeros(rank))

    @classmethod
    def param_count(cls, d_out: int, d_in: int, rank: int = 8, **_: Any) -> int:
        return rank

    @classmethod
    def from_weight(cls, W: torch.Tensor, rank: int = 8, seed: int = 0) -> tuple[SVFit, torch.Tensor]:
        r"""SVFit for ``W``: frames :math:`U_r`, :math:`V_r^\top` of its truncated SVD, :math:`\delta = 0`.

        Parameters
        ----------
        W : torch.Tensor, shape (d_out, d_in)
            The frozen weight, finite, floating.
        rank, seed
            As in the class.

        Returns
        -------
        adapter : SVFit
            In ``W``'s dtype and device.
        base_weight : torch.Tensor
            ``W`` unchanged (the residual-plus-top-r split of the paper is the same weight).

        Raises
        ------
        TypeError, ValueError
            If ``W`` is not a finite floating 2-D tensor or ``rank`` is out of range.
        """
        check_matrix_weight(W, "W")
        ad = cls(W.shape[0], W.shape[1], rank=rank, seed=seed).to(W.device)
        U, _, Vh = _svd(W, rank)
        with torch.no_grad():
            ad.U = U.to(W.dtype).contiguous()
            ad.Vh = Vh.to(W.dtype).contiguous()
            ad.delta.data = ad.delta.data.to(W.dtype)
        return ad, W

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return (self.U * self.delta) @ self.Vh

    def forward(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        return ((x @ self.Vh.T) * self.delta) @ self.U.T
