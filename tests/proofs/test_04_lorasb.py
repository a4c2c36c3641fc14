"""Check of proofs/04-lorasb-subspace.md: LoRA-SB's init is the best rank-r approximation of the first
update, and training R alone keeps ΔW in {B X A}.

Library objects: ``truncated_svd`` (the init) and ``theory.gradients.lorasb_step`` (the weight-space
step of training R).  References: NumPy SVD, projectors from NumPy QR, torch autograd for g_R.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory.linalg import truncated_svd
from lowrank_theory.theory.gradients import lora_step, lorasb_step
from tests.conftest import tol

TOL = tol("float64")


def _proj(M: np.ndarray) -> np.ndarray:
    Q = np.linalg.qr(M)[0]
    return Q @ Q.T


@given(seed=st.integers(0, 2**31 - 1), m=st.integers(4, 9), n=st.integers(4, 9), data=st.data())
def test_init_is_best_rank_r_and_steps_stay_in_the_subspace(seed, m, n, data):
    r = data.draw(st.integers(1, min(m, n) - 1))
    rng = np.random.default_rng(seed)
    G1 = rng.standard_normal((m, n))  # the first (full fine-tuning) update
    U, S, Vh = truncated_svd(G1, r)
    B, R, A = U, np.diag(S), Vh  # LoRA-SB: B, A frozen, R trainable
    sigma = np.linalg.svd(G1, compute_uv=False)
    assert np.isclose(np.linalg.norm(G1 - B @ R @ A) ** 2, np.sum(sigma[r:] ** 2), rtol=1e-10, atol=1e-12)
    PB, PA = _proj(B), _proj(A.T)
    dW = B @ R @ A
    for _ in range(4):  # later steps, arbitrary gradients
        G = rng.standard_normal((m, n))
        step = lorasb_step(G, B, A)
        # with orthonormal B, A the step is P_B G P_A, the orthogonal projection of G on {B X A}
        np.testing.assert_allclose(step, PB @ G @ PA, **TOL)
        resid = G - step
        X = rng.standard_normal((r, r))
        assert abs(np.sum(resid * (B @ X @ A))) <= 1e-9 * np.linalg.norm(G) * np.linalg.norm(X)
        dW = dW - 0.1 * step
        np.testing.assert_allclose(PB @ dW @ PA, dW, **TOL)  # ΔW never leaves {B X A}


def test_gradient_of_R_by_autograd():
    """Chain rule: for ΔW = B R A, ∂L/∂R = Bᵀ G Aᵀ, and the weight change B g_R A is lorasb_step."""
    rng = np.random.default_rng(0)
    m, n, r = 7, 5, 3
    B, A = rng.standard_normal((m, r)), rng.standard_normal((r, n))
    T = rng.standard_normal((m, n))
    R = torch.tensor(rng.standard_normal((r, r)), requires_grad=True)
    Bt, At, Tt = map(torch.from_numpy, (B, A, T))
    loss = 0.5 * ((Bt @ R @ At - Tt) ** 2).sum()
    loss.backward()
    G = (B @ R.detach().numpy() @ A - T)  # ∂L/∂W at W = BRA
    np.testing.assert_allclose(R.grad.numpy(), B.T @ G @ A.T, **TOL)
    np.testing.assert_allclose(B @ R.grad.numpy() @ A, lorasb_step(G, B, A), **TOL)


def test_negative_control_basis_from_another_matrix_is_not_optimal():
    """Weaken 'B, A from G1's top-r SVD': with W0's singular vectors (LoRA-XS) even the best R is worse."""
    rng = np.random.default_rng(2)
    m, n, r = 9, 7, 2
    G1, W0 = rng.standard_normal((m, n)), rng.standard_normal((m, n))
    sigma = np.linalg.svd(G1, compute_uv=False)
    U, _, Vh = truncated_svd(W0, r)
    R_best = U.T @ G1 @ Vh.T  # optimal core for these frozen factors (orthonormal)
    err = np.linalg.norm(G1 - U @ R_best @ Vh) ** 2
    assert err > np.sum(sigma[r:] ** 2) * 1.05


def test_negative_control_non_orthonormal_factors_break_the_projection():
    """Weaken 'orthonormal B, A': BBᵀGAᵀA is still in {BXA} but is not the projection P_B G P_A."""
    rng = np.random.default_rng(3)
    G = rng.standard_normal((6, 5))
    B = rng.standard_normal((6, 2))
    A = rng.standard_normal((2, 5))
    step = lorasb_step(G, B, A)
    PB, PA = _proj(B), _proj(A.T)
    np.testing.assert_allclose(PB @ step @ PA, step, **TOL)  # in the subspace
    assert np.linalg.norm(step - PB @ G @ PA) > 1e-2 * np.linalg.norm(PB @ G @ PA)  # not the projection


def test_negative_control_full_lora_step_leaves_the_subspace():
    """Training B and A too (plain LoRA) moves ΔW out of {B X A}: the confinement comes from freezing."""
    rng = np.random.default_rng(4)
    G1 = rng.standard_normal((8, 6))
    U, S, Vh = truncated_svd(G1, 2)
    G = rng.standard_normal((8, 6))
    step = lora_step(G, U * np.sqrt(S), np.sqrt(S)[:, None] * Vh)
    PB, PA = _proj(U), _proj(Vh.T)
    assert np.linalg.norm(step - PB @ step @ PA) > 1e-2 * np.linalg.norm(step)
