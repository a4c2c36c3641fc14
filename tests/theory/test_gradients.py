"""Gradient-approximation theory against dense least-squares references (float64).

Tolerance 1e-9 relative: every quantity is a handful of products and r×r solves of
well-conditioned random factors; round-off is ~1e-14, a wrong formula shows at O(1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory.theory import gradients as gr

RTOL = 1e-9


def problem(seed, m=9, n=7, r=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, n)), rng.standard_normal((m, r)), rng.standard_normal((r, n))


def best_tangent_step(G, B, A):
    """Independent reference: least squares over (X, Y) of ‖BX + YA − G‖ via a dense Kronecker system."""
    m, n = G.shape
    # vec(BX) = (I_n ⊗ B) vec(X), vec(YA) = (Aᵀ ⊗ I_m) vec(Y)  (column-major vec)
    M = np.hstack([np.kron(np.eye(n), B), np.kron(A.T, np.eye(m))])
    sol, *_ = np.linalg.lstsq(M, G.flatten(order="F"), rcond=None)
    return (M @ sol).reshape((m, n), order="F")


@given(st.integers(0, 10_000), st.integers(2, 4))
def test_tangent_projection_is_least_squares_optimum(seed, r):
    G, B, A = problem(seed, r=r)
    ref = best_tangent_step(G, B, A)
    np.testing.assert_allclose(gr.tangent_projection(G, B, A), ref, rtol=RTOL, atol=RTOL)
    res = gr.tangent_residual(G, B, A)
    PB, PA = gr.projector(B, "col"), gr.projector(A, "row")
    np.testing.assert_allclose(res, (np.eye(9) - PB) @ G @ (np.eye(7) - PA), atol=1e-10)


@given(st.integers(0, 10_000), st.floats(0.25, 4.0))
def test_lorapro_step_equals_projection_and_sylvester_holds(seed, s):
    G, B, A = problem(seed)
    g = gr.lorapro_gradients(G, B, A, s)
    np.testing.assert_allclose(s * (B @ g.g_A + g.g_B @ A), gr.tangent_projection(G, B, A), rtol=RTOL, atol=RTOL)
    lhs = B.T @ B @ g.X + g.X @ (A @ A.T)
    rhs = -np.linalg.solve(B.T @ B, B.T @ G @ A.T) / s
    np.testing.assert_allclose(lhs, rhs, rtol=1e-8, atol=1e-10)


def test_lorapro_X_minimizes_distance_to_lora_gradients():
    G, B, A = problem(3)
    s = 2.0
    g = gr.lorapro_gradients(G, B, A, s)

    def dist(X):
        gA0 = g.g_A - g.X @ A
        gB0 = g.g_B + B @ g.X
        return np.sum((gA0 + X @ A - s * B.T @ G) ** 2) + np.sum((gB0 - B @ X - s * G @ A.T) ** 2)

    best = dist(g.X)
    rng = np.random.default_rng(0)
    for _ in range(20):  # negative control: any perturbation of X is worse
        assert dist(g.X + 1e-3 * rng.standard_normal(g.X.shape)) > best


@given(st.integers(0, 10_000))
def test_every_step_is_above_the_bound_and_lorapro_attains_it(seed):
    G, B, A = problem(seed)
    rows = {row["method"]: row for row in gr.compare_steps(G, B, A, scale=0.7)}
    bound = rows["bound"]["rel_error"]
    for name in ("lora", "lora_plus", "altlora", "lora_sb", "lorapro"):
        assert rows[name]["rel_error_best_scale"] >= bound - 1e-12
    assert abs(rows["lorapro"]["rel_error"] - bound) < 1e-9
    assert abs(rows["altlora"]["rel_error"] - bound) < 1e-9
    assert rows["lorapro"]["rel_error"] <= rows["lora"]["rel_error_best_scale"] + 1e-12


def test_lora_step_matches_autograd():
    """The closed-form LoRA step equals the first-order change of W from autograd's factor gradients."""
    G, B, A = (torch.from_numpy(t) for t in problem(5))
    s = 1.5
    Bp, Ap = B.clone().requires_grad_(True), A.clone().requires_grad_(True)
    W0 = torch.zeros_like(G)
    loss = ((W0 + s * Bp @ Ap) * G).sum()  # dL/dW = G
    loss.backward()
    step = s * (Bp.grad @ A + B @ Ap.grad)
    torch.testing.assert_close(gr.lora_step(G, B, A, s), step, rtol=RTOL, atol=RTOL)


def test_lorasb_step_is_projection_for_orthonormal_factors():
    G, B, A = problem(7)
    Bq, _ = np.linalg.qr(B)
    Aq, _ = np.linalg.qr(A.T)
    step = gr.lorasb_step(G, Bq, Aq.T)
    np.testing.assert_allclose(step, Bq @ Bq.T @ G @ Aq @ Aq.T, atol=1e-12)


def test_backends_agree():
    G, B, A = problem(11)
    a = gr.tangent_projection(G, B, A)
    b = gr.tangent_projection(*(torch.from_numpy(t) for t in (G, B, A)))
    assert isinstance(b, torch.Tensor)
    np.testing.assert_allclose(a, b.numpy(), atol=1e-12)


def test_bad_shapes_and_rank():
    G, B, A = problem(1)
    with pytest.raises(ValueError, match="B"):
        gr.lora_step(G, B[:-1], A)
    with pytest.raises(ValueError, match="A"):
        gr.lora_step(G, B, A[:, :-1])
    Bdef = B.copy()
    Bdef[:, 2] = Bdef[:, 1]
    with pytest.raises(ValueError, match="full rank"):
        gr.lorapro_gradients(G, Bdef, A)
    with pytest.raises(ValueError, match="NaN"):
        gr.lora_step(G * np.nan, B, A)
