"""Check of proofs/07-loca-idct-vs-idft.md: under an isotropic (i.i.d. Gaussian) model of ΔW, the optimal
B-parameter iDCT adaptation and the optimal B-parameter iDFT adaptation have the same expected error.

Library objects: ``dct2``/``idct2`` and ``dft2`` (via their coefficients), ``best_error("dct")`` and
``best_error("fourierft")``.  The real Fourier coordinates are built from ``dft2``'s output here.
"""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_theory.linalg import dct2, dft2, idct2
from lowrank_theory.theory.expressivity import Target, best_error

M, N = 8, 6
TRIALS = 400


def _real_fourier_coords(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of real X in the orthonormal real Fourier basis, from the unitary DFT.

    Returns (coords, class_energy): for a self-conjugate frequency the coordinate F_kl (real); for each
    conjugate pair {(k,l), (−k,−l)} the two coordinates √2·Re F_kl and √2·Im F_kl; ``class_energy`` is
    the energy of each conjugate class (what one complex coefficient and its mirror carry).
    """
    F = dft2(X)
    m, n = X.shape
    coords, energy = [], []
    for k in range(m):
        for l_ in range(n):
            ck, cl = (-k) % m, (-l_) % n
            if (ck, cl) == (k, l_):
                coords.append(F[k, l_].real)
                energy.append(F[k, l_].real ** 2)
            elif k * n + l_ < ck * n + cl:  # one representative per pair
                coords += [np.sqrt(2) * F[k, l_].real, np.sqrt(2) * F[k, l_].imag]
                energy.append(2 * abs(F[k, l_]) ** 2)
    return np.array(coords), np.array(energy)


def _tail(coeffs: np.ndarray, B: int) -> float:
    """Squared error of the best B-term approximation in an orthonormal basis (Theorem 6)."""
    e2 = np.sort(coeffs.ravel() ** 2)
    return float(np.sum(e2[: max(0, e2.size - B)]))


def test_real_fourier_coordinates_are_orthonormal():
    """Parseval for the real Fourier coordinates (so Theorem 6 applies to them)."""
    X = np.random.default_rng(0).standard_normal((M, N))
    coords, energy = _real_fourier_coords(X)
    assert coords.size == M * N
    assert np.sum(coords**2) == pytest.approx(np.sum(X**2), rel=1e-12)
    assert np.sum(energy) == pytest.approx(np.sum(X**2), rel=1e-12)


@pytest.mark.parametrize("B", [6, 16, 30])
def test_equal_expected_error_under_isotropic_gaussian_model(B):
    rng = np.random.default_rng(B)
    dct_err, dft_err, iid_err = np.empty(TRIALS), np.empty(TRIALS), np.empty(TRIALS)
    for t in range(TRIALS):
        X = rng.standard_normal((M, N))
        C = dct2(X)
        dct_err[t] = _tail(C, B)
        # the library's own best-DCT error agrees with the coefficient tail
        if t < 5:
            e = best_error("dct", Target("x", X), B).error
            assert e**2 * np.sum(X**2) == pytest.approx(dct_err[t], rel=1e-9)
        dft_err[t] = _tail(_real_fourier_coords(X)[0], B)
        iid_err[t] = _tail(rng.standard_normal(M * N), B)  # same law as any orthonormal coordinates
    # Monte-Carlo tolerance: the means of independent samples differ by less than 4 standard errors
    for a, b in ((dct_err, dft_err), (dct_err, iid_err)):
        se = np.sqrt(a.var(ddof=1) / TRIALS + b.var(ddof=1) / TRIALS)
        assert abs(a.mean() - b.mean()) < 4 * se


def test_pair_idft_never_beats_coordinatewise_selection():
    """Deterministic part: c complex coefficients (conjugate pairs, 2c reals) ≤ best 2c real coordinates."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        X = rng.standard_normal((M, N))
        coords, energy = _real_fourier_coords(X)
        for c in (2, 5, 9):
            pair_err = np.sum(X**2) - np.sum(np.sort(energy)[::-1][:c])
            assert pair_err >= _tail(coords, 2 * c) - 1e-12


def test_negative_control_non_isotropic_target_separates_the_bases():
    """Drop the isotropy assumption: a DCT-sparse ΔW is exact for the iDCT and not for the iDFT."""
    rng = np.random.default_rng(2)
    B = 6
    gaps = []
    for _ in range(20):
        F = np.zeros(M * N)
        F[rng.choice(M * N, size=B, replace=False)] = rng.standard_normal(B)
        X = idct2(F.reshape(M, N))
        assert _tail(dct2(X), B) < 1e-20
        gaps.append(_tail(_real_fourier_coords(X)[0], B) / np.sum(X**2))
    assert np.mean(gaps) > 0.1
    # FourierFT (real coefficients, Re(iDFT)) reaches only the even part: never exact on a generic target
    X = rng.standard_normal((M, N))
    assert best_error("fourierft", Target("x", X), M * N).error > 0.3
