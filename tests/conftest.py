"""Shared fixtures: backends, named tolerances, hypothesis profiles.

Tolerances are named per dtype here and nowhere else.  Why these sizes:
  * float64: unit round-off 1.1e-16.  Factorizations of well-conditioned n <= 256 matrices
    lose at most ~n·eps·cond in backward error; 1e-10 relative leaves 3+ orders of margin
    while still failing on any genuine algorithmic error (which shows at 1e-3 or larger).
  * float32: unit round-off 6e-8; the same argument gives ~1e-5 with margin; we use 2e-4
    relative because FFT-based paths and randomized methods chain several products.
  * half precision (fp16 / bf16, 3 and 2 significant decimal digits): merges are compared
    to the float32 result at 2e-2 / 5e-2 relative: one rounding of the output dominates.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

from lowrank_theory import backend as B

TOL = {
    "float64": dict(rtol=1e-10, atol=1e-10),
    "float32": dict(rtol=2e-4, atol=2e-5),
    "float16": dict(rtol=2e-2, atol=2e-3),
    "bfloat16": dict(rtol=5e-2, atol=1e-2),
}


def tol(dtype) -> dict:
    """The named tolerance for ``dtype`` (numpy/torch dtype or its name)."""
    return TOL[str(dtype).rsplit(".", 1)[-1]]


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
