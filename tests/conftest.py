"""Shared fixtures: backends, hypothesis profiles; the named tolerances come from the package.

Tolerances are named per dtype in :mod:`lowrank_theory.testing.tolerances` (the public checker's and
our tests' one definition, with why each has its size) and re-exported here as ``TOL`` / ``tol``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

from lowrank_theory import backend as B
from lowrank_theory.testing.tolerances import TOL, tol

__all__ = ["TOL", "tol"]

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("LRT_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("ci")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _gpu_params():
    cuda = B.torch_cuda_available()
    cupy = B.cupy_available()
    skip_cuda = pytest.mark.skipif(not cuda, reason="no CUDA device")
    skip_cupy = pytest.mark.skipif(not cupy, reason="no CuPy GPU backend")
    return [
        pytest.param("torch-cuda", marks=[pytest.mark.gpu, skip_cuda]),
        pytest.param("cupy", marks=[pytest.mark.gpu, skip_cupy]),
    ]


BACKENDS = ["numpy", "torch", *_gpu_params()]


class Backend:
    """Moves host NumPy data to one backend; ``bk.asarray(np_array)``, ``bk.to_numpy(x)``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def asarray(self, a: np.ndarray):
        a = np.asarray(a)
        if self.name == "numpy":
            return a
        if self.name == "torch":
            return torch.from_numpy(np.ascontiguousarray(a))
        if self.name == "torch-cuda":
            return torch.from_numpy(np.ascontiguousarray(a)).cuda()
        import cupy

        return cupy.asarray(a)

    @staticmethod
    def to_numpy(x) -> np.ndarray:
        return B.to_numpy(x)

    def __repr__(self) -> str:
        return f"Backend({self.name})"


@pytest.fixture(params=BACKENDS)
def bk(request) -> Backend:
    """Parametrize a test over numpy, torch (CPU) and, under the gpu marker, CUDA/CuPy."""
    return Backend(request.param)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
