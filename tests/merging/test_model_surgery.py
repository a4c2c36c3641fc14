"""Model Surgery against a dense reference written with Python loops in float64, on NumPy and torch.

Tolerances: the reference and the library compute the same sums in float64, so the edited weights agree to
1e-12 relative; half-precision torch weights are compared with a reference rounded once to their dtype (exact).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_theory.merging.surgery import (
    model_surgery,
    model_surgery_deltas,
    probe_cosines,
    surgery_rows,
)


def reference(weights, probe, k, alpha, select="negative"):
    """Loops: the cosine of every row, a global sort of (score, matrix, row), the first k get + alpha * probe."""
    v = [float(t) for t in probe]
    nv = math.sqrt(sum(t * t for t in v))
    scored = []
    for li, W in enumerate(weights):
        for j, row in enumerate(W):
            nr = math.sqrt(sum(float(t) ** 2 for t in row))
            c = sum(float(a) * b for a, b in zip(row, v, strict=True)) / (nr * nv) if nr > 0 else 0.0
            scored.append((c if select == "negative" else -c, li, j))
    scored.sort()
    out = [np.array(W, dtype=np.float64, copy=True) for W in weights]
    for _, li, j in scored[:k]:
        out[li][j] += alpha * np.asarray(v)
    return out, {(li, j) for _, li, j in scored[:k]}


def _problem(seed, shapes=((5, 4), (3, 4), (6, 4))):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes], rng.standard_normal(shapes[0][1])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(0, 14), alpha=st.floats(-3, 3),
       select=st.sampled_from(["negative", "positive"]), backend=st.sampled_from(["numpy", "torch"]))
def test_matches_the_loop_reference(seed, k, alpha, select, backend):
    ws, v = _problem(seed)
    ws[1][2] = 0.0  # a zero row: cosine 0
    ref, chosen = reference(ws, v, k, alpha, select)
    conv = (lambda a: a) if backend == "numpy" else torch.from_numpy
    out = model_surgery([conv(w) for w in ws], conv(v), k, alpha, select=select)
    rows = surgery_rows([conv(w) for w in ws], conv(v), k, select=select)
    assert {(li, int(j)) for li, r in enumerate(rows) for j in r} == chosen
    for o, r in zip(out, ref, strict=True):
        o = o.numpy() if backend == "torch" else o
        np.testing.assert_allclose(o, r, rtol=1e-12, atol=1e-12)
        assert type(o) is np.ndarray
    deltas = model_surgery_deltas([conv(w) for w in ws], conv(v), k, alpha, select=select)
    for dlt, r, w in zip(deltas, ref, ws, strict=True):
        d = np.asarray(dlt)
        np.testing.assert_allclose(d, r - w, rtol=1e-12, atol=1e-12)
        assert np.linalg.matrix_rank(d) == (1 if (d != 0).any() else 0)  # alpha * 1_S v^T is rank one


def test_cosines_and_ties_by_matrix_then_row():
    v = np.array([1.0, 0.0])
    W1 = np.array([[-1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])  # cosines -1, 0, -1
    W2 = np.array([[-2.0, 0.0], [1.0, 1.0]])  # -1, 1/sqrt 2
    cos = probe_cosines([W1, W2], v)
    np.testing.assert_allclose(cos[0], [-1, 0, -1])
    np.testing.assert_allclose(cos[1], [-1, 1 / np.sqrt(2)])
    rows = surgery_rows([W1, W2], v, 2)
    assert rows[0].tolist() == [0, 2] and rows[1].tolist() == []  # three ties at -1: matrix 0 first
    rows = surgery_rows([W1, W2], v, 3)
    assert rows[0].tolist() == [0, 2] and rows[1].tolist() == [0]
    single = surgery_rows(W1, v, 1)
    assert isinstance(single, np.ndarray) and single.tolist() == [0]


def test_single_matrix_half_precision_and_inputs_untouched():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 5, generator=g).to(torch.bfloat16)
    v = torch.randn(5, generator=g)
    W_copy = W.clone()
    out = model_surgery(W, v, 3, 0.5)
    assert out.dtype == torch.bfloat16 and torch.equal(W, W_copy)
    _, chosen = reference([W.float().numpy()], v.numpy(), 3, 0.5)
    expect = W.float().clone()
    for _, j in chosen:
        expect[j] += 0.5 * v
    assert torch.equal(out, expect.to(torch.bfloat16))  # the edit in float32, rounded once to bfloat16


def test_edit_moves_the_selected_neurons_response_by_alpha_times_the_probe_response():
    ws, v = _problem(3, shapes=((7, 6),))
    x = np.random.default_rng(4).standard_normal((10, 6))
    out = model_surgery(ws, v, 3, 0.7)
    rows = surgery_rows(ws, v, 3)[0]
    diff = x @ out[0].T - x @ ws[0].T
    np.testing.assert_allclose(diff[:, rows], 0.7 * (x @ v)[:, None] * np.ones((1, 3)), atol=1e-12)
    others = np.setdiff1d(np.arange(7), rows)
    assert np.abs(diff[:, others]).max() == 0.0


def test_torch_keeps_autograd_through_the_probe():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 4, generator=g, dtype=torch.float64)
    v = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    model_surgery(W, v, 2, 2.0).sum().backward()
    np.testing.assert_allclose(v.grad.numpy(), 2.0 * 2 * np.ones(4))  # d/dv sum(alpha * 1_S v^T) = alpha * |S|


def test_validation():
    W, v = np.ones((3, 4)), np.ones(4)
    with pytest.raises(ValueError, match="k must be"):
        model_surgery(W, v, 4, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        model_surgery(W, v, 1, float("nan"))
    with pytest.raises(ValueError, match="non-zero"):
        model_surgery(W, np.zeros(4), 1, 1.0)
    with pytest.raises(ValueError, match="probe must have shape"):
        model_surgery(W, np.ones(3), 1, 1.0)
    with pytest.raises(ValueError, match="select"):
        model_surgery(W, v, 1, 1.0, select="both")
    with pytest.raises(ValueError, match="2-D"):
        model_surgery(np.ones(4), v, 1, 1.0)
    with pytest.raises(ValueError, match="columns"):
        model_surgery([W, np.ones((2, 5))], v, 1, 1.0)
    with pytest.raises(TypeError, match="torch"):
        model_surgery([W, torch.ones(2, 4, dtype=torch.float64)], v, 1, 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        model_surgery([], v, 1, 1.0)
    with pytest.raises(ValueError, match=r"NaN|finite"):
        model_surgery(np.full((3, 4), np.nan), v, 1, 1.0)
