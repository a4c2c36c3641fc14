"""Diagnostics and factors at the edges of the float range: results at 1e±30 are the scale-1 results, scaled.

Before these fixes, HOOI's and LQ-LoRA's error diagnostics squared raw entries (inf at 1e30 and 0 at
1e-30 in float32), so the iterations stopped at once or never; LDU returned inf factors; DoRA's magnitude
of a 1e20 weight was inf.  Each test compares the scaled problem with the unscaled one: in exact arithmetic
the relative quantities are identical, so the tolerance is float32 round-off of the algorithm (1e-4).
"""

from __future__ import annotations

import pytest
import torch

from lowrank_theory.adapters.multiplicative import DoRA
from lowrank_theory.adapters.row_norms import scaled_row_norms
from lowrank_theory.linalg import (
    complement_projector,
    hooi,
    ldu,
    ldu_nopivot,
    lowrank_plus_quantized,
    nf4_codebook,
    tucker_to_tensor,
)

SCALES = [1e-30, 1e30]
REL = 1e-4  # float32 round-off of a few dozen sweeps, with margin


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scale", SCALES)
def test_hooi_errors_are_scale_free(scale):
    T = torch.randn(6, 5, 4, generator=_g(0))
    ref = hooi(T, (2, 2, 2), n_iter=6, tol=0.0)  # the same six sweeps at every scale
    got = hooi(T * scale, (2, 2, 2), n_iter=6, tol=0.0)
    assert got.n_iter == ref.n_iter == 6
    assert 0 < got.errors[-1] < 1
    for e, r in zip(got.errors, ref.errors):
        assert e == pytest.approx(r, rel=REL)
    # the core is unique only up to rotations within the factor subspaces; the approximation is unique
    diff = tucker_to_tensor(got.core, got.factors) / scale - tucker_to_tensor(ref.core, ref.factors)
    assert float(diff.norm() / T.norm()) < REL


@pytest.mark.parametrize("scale", SCALES)
def test_lowrank_plus_quantized_errors_are_scale_free(scale):
    W = torch.randn(16, 12, generator=_g(1))
    ref = lowrank_plus_quantized(W, 2, 4, 5)
    got = lowrank_plus_quantized(W * scale, 2, 4, 5)
    assert len(got.errors) == len(ref.errors)
    for e, r in zip(got.errors, ref.errors):
        assert e / scale == pytest.approx(r, rel=REL)


@pytest.mark.parametrize("scale", [1e-30, 1e20])
def test_dora_magnitude_of_extreme_weights(scale):
    W = torch.randn(4, 5, generator=_g(2)) * scale
    ad, _ = DoRA.from_weight(W, rank=2)
    want = torch.linalg.vector_norm(W.double(), dim=1)
    assert torch.isfinite(ad.magnitude).all() and (ad.magnitude > 0).all()
    torch.testing.assert_close(ad.magnitude.detach().double(), want, rtol=1e-6, atol=0)


def test_scaled_row_norms_zero_row_and_float64_reference():
    W = torch.randn(5, 7, generator=_g(3), dtype=torch.float64)
    W[2] = 0
    torch.testing.assert_close(scaled_row_norms(W), torch.linalg.vector_norm(W, dim=1), rtol=1e-14, atol=0)


@pytest.mark.parametrize("factor", [ldu, ldu_nopivot])
def test_ldu_refuses_overflowing_factors(factor):
    # the only pivot candidates of column 0 are ~1e-38, so U's row 0 is 1e30 / 1e-38 = 1e68: not a float32
    A = torch.tensor([[1e-38, 1e30], [1e-38, 2e30]], dtype=torch.float32)
    with pytest.raises(ValueError, match="not finite"):
        factor(A)
    res = factor(A.double())  # representable in float64: factors finite and exact to round-off
    torch.testing.assert_close(res.P @ res.L @ torch.diag(res.D) @ res.U, A.double(), rtol=1e-12, atol=0)


def test_nf4_codebook_refuses_integer_like():
    with pytest.raises(TypeError, match="like"):
        nf4_codebook(torch.zeros(3, dtype=torch.int64))
    assert nf4_codebook(torch.zeros(3, dtype=torch.float32)).dtype == torch.float32


@pytest.mark.parametrize("atol", [float("nan"), float("inf"), -1.0, "0.1", True])
def test_complement_projector_refuses_bad_atol(atol):
    U = torch.linalg.qr(torch.randn(6, 2, generator=_g(4), dtype=torch.float64)).Q
    with pytest.raises(ValueError, match="atol"):
        complement_projector(U, atol=atol)
    with pytest.raises(ValueError, match="orthonormal"):
        complement_projector(U * 1.5)  # the check that atol=nan used to switch off
