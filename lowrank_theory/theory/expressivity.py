r"""Expressivity: the best relative error each method can reach for a target ΔW⋆ at a budget.

For a target :math:`\Delta W^\star\in\mathbb{R}^{m\times n}` and a method with trainable
parameters :math:`\theta` (at most ``budget`` scalars), we report

.. math:: e(\text{method}, p) = \min_{\theta,\ |\theta|\le p}
          \frac{\|\Delta W(\theta) - \Delta W^\star\|_F}{\|\Delta W^\star\|_F}.

Closed forms where they exist:

* ``lora`` -- Eckart–Young–Mirsky: rank :math:`r=\lfloor p/(m+n)\rfloor`, error² = tail
  :math:`\sum_{i>r}\sigma_i^2`.  ``flora`` (2-D Tucker, ``r(m+n)+r^2`` parameters) has the same optimum.
* ``dct`` / ``wht`` -- orthonormal bases: keep the c = p largest coefficients.
* ``fourierft`` -- c real coefficients under ``Re(IDFT2)``: the reachable set is the span of
  :math:`\cos(2\pi(ki/m+lj/n))`, orthogonal per conjugate class :math:`\{(k,l),(-k,-l)\}`;
  a class captures energy :math:`2\,\mathrm{Re}(\hat T_{kl})^2` (or :math:`\mathrm{Re}(\hat T_{kl})^2` if
  self-conjugate), so the best c classes are kept.  The odd part of the target is unreachable.
* ``svfit``, ``lora_xs``, ``loldu`` -- bases fixed by the frozen weight W0, linear least squares.

Bilinear methods use alternating least squares (each half-step an exact linear least-squares
solve, so the error is non-increasing): ``vera`` (b | d), ``nola`` (α | β), ``randlora``
(λ | γ), ``sltrain`` (low rank | sparse values on a fixed support).  ``unilora`` is quadratic in
its one vector and uses L-BFGS.  Every iterative result reports ``n_iter``, ``converged``
and its error history.

References: Eckart & Young 1936; Hu et al. arXiv:2106.09685 (LoRA); Gao et al.
arXiv:2405.03003 (FourierFT); Du et al. arXiv:2502.06820 (LoCA); Kopiczko et al.
arXiv:2310.11454 (VeRA); Koohpayegani et al. arXiv:2310.02556 (NOLA); Albert et al.
arXiv:2502.00987 (RandLoRA); arXiv:2506.00799 (Uni-LoRA); arXiv:2406.02214 (SLTrain);
arXiv:2409.05926 (SVFit); arXiv:2405.17604 (LoRA-XS); arXiv:2410.13618 (LoLDU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import to_numpy
from ..linalg import dct2, idct2, isometric_projection, ldu, random_basis, truncated_svd, wht

__all__ = [
    "METHODS",
    "ExpressivityResult",
    "Target",
    "best_error",
    "expressivity_table",
]


@dataclass
class Target:
    """A target update ``delta`` (m×n) and the frozen weight ``W0`` it is added to."""

    name: str
    delta: np.ndarray
    W0: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.delta = np.asarray(to_numpy(self.delta), dtype=np.float64)
        if self.delta.ndim != 2 or min(self.delta.shape) == 0:
            raise ValueError(f"delta must be a non-empty 2-D matrix, got shape {self.delta.shape}")
        if not np.isfinite(self.delta).all():
            raise ValueError("delta contains NaN or Inf values")
        if not np.any(self.delta):
            raise ValueError("delta must be non-zero (relative error is undefined)")
        if self.W0 is not None:
            self.W0 = np.asarray(to_numpy(self.W0), dtype=np.float64)
            if self.W0.shape != self.delta.shape:
                raise ValueError(f"W0 must have the target's shape {self.delta.shape}, got {self.W0.shape}")


@dataclass
class ExpressivityResult:
    """Best relative error found, with the parameters actually used and convergence data."""

    error: float
    params: int
    config: dict[str, Any] = field(default_factory=dict)
    n_iter: int = 0
    converged: bool = True
    history: list[float] = field(default_factory=list)


def _rel(approx: np.ndarray, T: np.ndarray) -> float:
    return float(np.linalg.norm(approx - T) / np.linalg.norm(T))


def _infeasible(reason: str) -> ExpressivityResult:
    # Zero parameters: ΔW = 0, relative error exactly 1.
    return ExpressivityResult(1.0, 0, {"note": reason})


def _lstsq(G: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve the normal equations G x = rhs in the least-squares sense (G may be singular).

    LAPACK's complete-orthogonal-factorization driver (``gelsy``) is several times faster than the
    SVD-based default on these small dense systems and equally exact for the minimum-norm solution.
    """
    import scipy.linalg

    return scipy.linalg.lstsq(G, rhs, lapack_driver="gelsy", check_finite=False)[0]


# ----------------------------------------------------------------------------- closed forms
def _lora(t: Target, p: int, **_: Any) -> ExpressivityResult:
    m, n = t.delta.shape
    r = min(p // (m + n), min(m, n))
    if r < 1:
        return _infeasible("budget below one rank-1 term")
    U, S, Vh = truncated_svd(t.delta, r)
    return ExpressivityResult(_rel((U * S) @ Vh, t.delta), r * (m + n), {"rank": r})


def _flora(t: Target, p: int, **_: Any) -> ExpressivityResult:
    m, n = t.delta.shape
    # largest r with r(m+n) + r² <= p
    r = int((-(m + n) + math.sqrt((m + n) ** 2 + 4 * p)) // 2)
    r = min(r, min(m, n))
    if r < 1:
        return _infeasible("budget below a rank-1 Tucker term")
    U, S, Vh = truncated_svd(t.delta, r)
    return ExpressivityResult(_rel((U * S) @ Vh, t.delta), r * (m + n) + r * r, {"rank": r})


def _top_c(coeffs: np.ndarray, c: int) -> np.ndarray:
    """Keep the c largest-|.| entries of ``coeffs`` (others zeroed)."""
    flat = np.abs(coeffs).ravel()
    if c >= flat.size:
        return coeffs.copy()
    keep = np.argpartition(flat, -c)[-c:]
    out = np.zeros_like(coeffs).ravel()
    out[keep] = coeffs.ravel()[keep]
    return out.reshape(coeffs.shape)


def _dct(t: Target, p: int, **_: Any) -> ExpressivityResult:
    c = min(p, t.delta.size)
    C = dct2(t.delta)
    return ExpressivityResult(_rel(idct2(_top_c(C, c)), t.delta), c, {"n_coefficients": c})


def _next_pow2(k: int) -> int:
    return 1 << (k - 1).bit_length()


def _wht(t: Target, p: int, **_: Any) -> ExpressivityResult:
    m, n = t.delta.shape
    M, N = _next_pow2(m), _next_pow2(n)
    pad = np.zeros((M, N))
    pad[:m, :n] = t.delta
    coeffs = wht(wht(pad, axis=-1), axis=0)
    c = min(p, coeffs.size)
    kept = _top_c(coeffs, c)
    approx = wht(wht(kept, axis=-1), axis=0)[:m, :n]  # orthonormal WHT is its own inverse
    return ExpressivityResult(_rel(approx, t.delta), c, {"n_coefficients": c, "padded": (M, N)})


def _fourierft(t: Target, p: int, **_: Any) -> ExpressivityResult:
    m, n = t.delta.shape
    T = np.fft.fft2(t.delta, norm="ortho")
    k = np.arange(m)[:, None]
    l_ = np.arange(n)[None, :]
    ck, cl = (-k) % m, (-l_) % n
    self_conj = (ck == k) & (cl == l_)
    # one representative per conjugate class: the lexicographically smaller index
    rep = (k * n + l_) <= (ck * n + cl)
    energy = np.where(self_conj, 1.0, 2.0) * np.real(T) ** 2
    energy = np.where(rep, energy, 0.0).ravel()
    c = min(p, int(rep.sum()))
    kept = np.sort(energy)[::-1][:c].sum()
    err2 = max(0.0, float(np.sum(t.delta**2)) - float(kept))
    return ExpressivityResult(math.sqrt(err2 / float(np.sum(t.delta**2))), c, {"n_coefficients": c})


def _need_W0(t: Target, method: str) -> np.ndarray:
    if t.W0 is None:
        raise ValueError(f"{method} builds its bases from the frozen weight: the target needs W0")
    return t.W0


def _svfit(t: Target, p: int, **_: Any) -> ExpressivityResult:
    W0 = _need_W0(t, "svfit")
    r = min(p, min(W0.shape))
    U, _, Vh = truncated_svd(W0, r)
    delta = np.einsum("ir,ij,rj->r", U, t.delta, Vh)  # δ_i = u_iᵀ T v_i (orthonormal rank-1 terms)
    return ExpressivityResult(_rel((U * delta) @ Vh, t.delta), r, {"rank": r})


def _lora_xs(t: Target, p: int, **_: Any) -> ExpressivityResult:
    W0 = _need_W0(t, "lora_xs")
    r = min(math.isqrt(p), min(W0.shape))
    if r < 1:
        return _infeasible("budget below one core entry")
    U, _, Vh = truncated_svd(W0, r)
    R = U.T @ t.delta @ Vh.T
    return ExpressivityResult(_rel(U @ R @ Vh, t.delta), r * r, {"rank": r})


def _loldu(t: Target, p: int, **_: Any) -> ExpressivityResult:
    W0 = _need_W0(t, "loldu")
    P, L, _, U = ldu(W0)
    r = min(p, L.shape[1])
    Lr, Ur = (P @ L)[:, :r], U[:r]
    # ΔW = Σ z_i l_i u_iᵀ: Gram (l_iᵀl_j)(u_iᵀu_j), rhs l_iᵀ T u_i
    G = (Lr.T @ Lr) * (Ur @ Ur.T)
    z = _lstsq(G, np.einsum("ir,ij,rj->r", Lr, t.delta, Ur))
    return ExpressivityResult(_rel((Lr * z) @ Ur, t.delta), r, {"rank": r, "slice": "first r"})


# ----------------------------------------------------------------------------- ALS methods
def _als(step, init_err: float, n_iter: int, tol: float) -> tuple[list[float], bool]:
    """Run ``step()`` (returns the current error) until the relative decrease is below ``tol``."""
    hist = [init_err]
    for _ in range(n_iter):
        hist.append(step())
        if hist[-2] - hist[-1] <= tol * max(hist[-2], 1e-300):
            return hist, True
    return hist, False


def _vera(t: Target, p: int, *, seed: int = 0, n_iter: int = 50, tol: float = 1e-6, **_: Any):
    m, n = t.delta.shape
    r = p - m
    if r < 1:
        return _infeasible("VeRA needs budget > d_out (b has d_out entries)")
    B = random_basis((m, r), "gaussian", seed=seed) / math.sqrt(r)
    A = random_basis((r, n), "gaussian", seed=seed + 1) / math.sqrt(n)
    T = t.delta
    d = np.ones(r)
    b = np.zeros(m)

    def step() -> float:
        nonlocal b, d
        M = (B * d) @ A  # fix d: b_i = <T_i, M_i> / ‖M_i‖²
        b = np.einsum("ij,ij->i", T, M) / np.maximum(np.einsum("ij,ij->i", M, M), 1e-300)
        Bb = B * b[:, None]  # fix b: ΔW = Σ_k d_k (b ⊙ B_k) A_kᵀ
        d = _lstsq((Bb.T @ Bb) * (A @ A.T), np.einsum("ik,ij,kj->k", Bb, T, A))
        return _rel((Bb * d) @ A, T)

    hist, conv = _als(step, 1.0, n_iter, tol)
    return ExpressivityResult(hist[-1], m + r, {"rank": r}, len(hist) - 1, conv, hist)


def _nola(t: Target, p: int, *, rank: int = 8, seed: int = 0, n_iter: int = 50, tol: float = 1e-6, **_: Any):
    m, n = t.delta.shape
    k = p // 2
    l_ = p - k
    r = min(rank, min(m, n))
    if k < 1 or l_ < 1:
        return _infeasible("NOLA needs at least one coefficient per factor")
    As = random_basis((k, r, n), "gaussian", seed=seed) / math.sqrt(n)
    Bs = random_basis((l_, m, r), "gaussian", seed=seed + 1) / math.sqrt(r)
    T = t.delta
    beta = random_basis((l_,), "gaussian", seed=seed + 2)
    alpha = np.zeros(k)

    def step() -> float:
        nonlocal alpha, beta
        Bm = np.einsum("j,jmr->mr", beta, Bs)
        C = np.einsum("rs,isn->irn", Bm.T @ Bm, As)
        alpha = _lstsq(np.einsum("irn,jrn->ij", C, As), np.einsum("rn,irn->i", Bm.T @ T, As))
        Am = np.einsum("i,irn->rn", alpha, As)
        C2 = np.einsum("jmr,rs->jms", Bs, Am @ Am.T)
        beta = _lstsq(np.einsum("jms,lms->jl", C2, Bs), np.einsum("mr,jmr->j", T @ Am.T, Bs))
        return _rel(np.einsum("j,jmr->mr", beta, Bs) @ Am, T)

    hist, conv = _als(step, 1.0, n_iter, tol)
    return ExpressivityResult(hist[-1], k + l_, {"rank": r, "k": k, "l": l_}, len(hist) - 1, conv, hist)


def _randlora(t: Target, p: int, *, seed: int = 0, n_iter: int = 50, tol: float = 1e-6, **_: Any):
    """Σ_i B_i diag(λ_i) A_i diag(γ_i): the smallest basis rank r that fits N(r+n) <= p with
    N = ⌈min(m,n)/r⌉ (so the update can be full rank)."""
    m, n = t.delta.shape
    q = min(m, n)
    if p <= q:
        return _infeasible("RandLoRA needs budget > min(d_out, d_in) to reach full rank")
    r = max(1, math.ceil(q * n / (p - q)))
    while r <= q and math.ceil(q / r) * (r + n) > p:
        r += 1
    if r > q:
        return _infeasible("budget too small for a full-rank RandLoRA")
    N = math.ceil(q / r)
    Bs = random_basis((N, m, r), "gaussian", seed=seed) / math.sqrt(r)
    As = random_basis((N, r, n), "gaussian", seed=seed + 1) / math.sqrt(n)
    T = t.delta
    lam = np.ones((N, r))
    gam = np.zeros((N, n))

    def current() -> np.ndarray:
        return np.einsum("imr,ir,irn,in->mn", Bs, lam, As, gam)

    def step() -> float:
        nonlocal lam, gam
        # fix λ: column j of ΔW is Σ_i γ_ij M_i[:, j]; one N-unknown least squares per column
        Ms = np.einsum("imr,ir,irn->imn", Bs, lam, As)
        for j in range(n):
            gam[:, j] = _lstsq(Ms[:, :, j] @ Ms[:, :, j].T, Ms[:, :, j] @ T[:, j])
        # fix γ: rank-1 terms B_i[:,k] (A_i[k,:] ⊙ γ_i), Gram by Khatri–Rao products
        At = As * gam[:, None, :]
        Bf = Bs.transpose(0, 2, 1).reshape(N * r, m)
        Af = At.reshape(N * r, n)
        lam = _lstsq((Bf @ Bf.T) * (Af @ Af.T), np.einsum("km,mn,kn->k", Bf, T, Af)).reshape(N, r)
        return _rel(current(), T)

    hist, conv = _als(step, 1.0, n_iter, tol)
    return ExpressivityResult(hist[-1], N * (r + n), {"rank": r, "n_bases": N}, len(hist) - 1, conv, hist)


def _sltrain(t: Target, p: int, *, seed: int = 0, n_iter: int = 50, tol: float = 1e-6, **_: Any):
    m, n = t.delta.shape
    r = min((p // 2) // (m + n), min(m, n))
    s = min(p - r * (m + n), m * n)
    if r < 1 or s < 1:
        return _infeasible("SLTrain needs room for rank >= 1 and one sparse entry")
    rng = np.random.default_rng(seed)
    support = rng.choice(m * n, size=s, replace=False)
    T = t.delta
    S = np.zeros(m * n)

    def step() -> float:
        nonlocal S
        U, Sv, Vh = truncated_svd(T - S.reshape(m, n), r)
        L = (U * Sv) @ Vh
        S = np.zeros(m * n)
        S[support] = (T - L).ravel()[support]
        return _rel(L + S.reshape(m, n), T)

    hist, conv = _als(step, 1.0, n_iter, tol)
    return ExpressivityResult(hist[-1], r * (m + n) + s, {"rank": r, "n_sparse": s}, len(hist) - 1, conv, hist)


def _unilora(t: Target, p: int, *, rank: int = 4, seed: int = 0, n_iter: int = 300, tol: float = 1e-9, **_: Any):
    """θ_D = P θ_d (P: one entry ±1/√n_j per row, PᵀP = I) reshaped into LoRA's B, A; L-BFGS on θ_d."""
    import torch

    m, n = t.delta.shape
    r = min(rank, min(m, n))
    D = r * (m + n)
    d = min(p, D)
    if d < 1:
        return _infeasible("empty budget")
    P = isometric_projection(D, d, seed)
    T = torch.from_numpy(t.delta)
    theta = torch.from_numpy(random_basis((d,), "gaussian", seed=seed + 1) * 0.1).requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=20, line_search_fn="strong_wolfe")
    tn = float(T.norm())

    def dense() -> torch.Tensor:
        full = P.apply(theta)
        return full[: m * r].reshape(m, r) @ full[m * r:].reshape(r, n)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((dense() - T) ** 2).sum()
        loss.backward()
        return loss

    def step() -> float:
        opt.step(closure)
        with torch.no_grad():
            return float((dense() - T).norm()) / tn

    hist, conv = _als(step, 1.0, max(1, n_iter // 20), tol)
    return ExpressivityResult(hist[-1], d, {"rank": r, "D": D}, len(hist) - 1, conv, hist)


METHODS = {
    "lora": _lora,
    "flora": _flora,
    "dct": _dct,
    "wht": _wht,
    "fourierft": _fourierft,
    "svfit": _svfit,
    "lora_xs": _lora_xs,
    "loldu": _loldu,
    "vera": _vera,
    "nola": _nola,
    "randlora": _randlora,
    "sltrain": _sltrain,
    "unilora": _unilora,
}


def best_error(method: str, target: Target, budget: int, **opts: Any) -> ExpressivityResult:
    """Best relative Frobenius error of ``method`` for ``target`` with at most ``budget`` parameters.

    Parameters
    ----------
    method : str
        One of :data:`METHODS`.
    target : Target
        ΔW⋆ (m×n) and, for svfit / lora_xs / loldu, the frozen weight W0.
    budget : int
        Maximum number of trainable scalars (>= 1).
    **opts
        Method options: ``seed`` (random bases), ``n_iter``/``tol`` (iterative methods), ``rank``
        (inner rank of nola / unilora).

    Returns
    -------
    ExpressivityResult
        ``error`` in [0, 1] (1 = no better than ΔW = 0), ``params`` actually used, ``config``,
        and for iterative methods ``n_iter``, ``converged`` and the error ``history``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    if not isinstance(target, Target):
        raise TypeError(f"target must be a Target, got {type(target).__name__}")
    return METHODS[method](target, int(budget), **opts)


def expressivity_table(targets: list[Target], methods: list[str], budgets: list[int], **opts: Any) -> list[dict]:
    """Tidy rows ``(target, method, budget, params, error, n_iter, converged)`` for every combination.

    Methods that need W0 are skipped (no row) for targets without one.
    """
    rows = []
    for t in targets:
        for meth in methods:
            if meth in ("svfit", "lora_xs", "loldu") and t.W0 is None:
                continue
            for p in budgets:
                res = best_error(meth, t, p, **opts)
                rows.append(dict(target=t.name, method=meth, budget=int(p), params=res.params,
                                 error=res.error, n_iter=res.n_iter, converged=res.converged))
    return rows
