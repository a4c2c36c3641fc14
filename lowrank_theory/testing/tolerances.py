"""The tolerances of the checks and of the project's tests, named per dtype in one place.

Why these sizes:

* **float64** -- unit round-off 1.1e-16.  Every adapter path is a short chain of products, FFTs and
  reductions of O(1) numbers over at most a few hundred terms, so round-off stays near 1e-14
  relative; ``1e-10`` leaves four orders of margin and still fails on any algorithmic error (a
  dropped term or a wrong scale shows at 1e-3 or larger).
* **float32** -- unit round-off 6e-8; the same argument gives ~1e-5 with margin; ``2e-4`` relative
  because FFT-based paths and randomized methods chain several products.
* **float16 / bfloat16** (11 and 8 significant bits) -- outputs compared to the float32 result at
  2e-2 / 5e-2 relative: one rounding of the output dominates.  Merges are held to a sharper rule,
  :data:`MERGE_ULPS`: the merged half-precision weight may differ from the float32-accumulated
  :math:`W_0 + \\Delta W` (ΔW and the sum computed in float32 from the same half-precision tensors,
  rounded once) by at most one unit in the last place.  Not the float64 result: where ΔW nearly cancels
  W0, float32's own round-off of ΔW can exceed one half-precision ulp of the small sum (measured: 3 bf16
  ulp for LQ-LoRA, whose ΔW is built to cancel the quantization error).
"""

from __future__ import annotations

import torch

__all__ = ["MERGE_ULPS", "TOL", "tol", "ulp_distance"]

TOL = {
    "float64": dict(rtol=1e-10, atol=1e-10),
    "float32": dict(rtol=2e-4, atol=2e-5),
    "float16": dict(rtol=2e-2, atol=2e-3),
    "bfloat16": dict(rtol=5e-2, atol=1e-2),
}

#: Largest allowed distance, in units in the last place, of a half-precision merge from the correctly
#: rounded result.
MERGE_ULPS = 1


def tol(dtype) -> dict:
    """The named tolerance for ``dtype`` (a numpy/torch dtype or its name): ``dict(rtol=..., atol=...)``."""
    return TOL[str(dtype).rsplit(".", 1)[-1]]


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Entrywise distance in units in the last place between two tensors of one 16-bit float dtype.

    The bit patterns are mapped to integers that are ordered like the values (negative numbers
    mirrored, ``+0 == -0``), so the distance counts the representable numbers between ``a`` and ``b``;
    it is exact at every magnitude, subnormals included.  Returns an int32 tensor.
    """
    if a.dtype != b.dtype or a.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"a and b must share a 16-bit float dtype, got {a.dtype} and {b.dtype}")

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()
