"""Decompositions on any array backend (NumPy, torch CPU/CUDA, CuPy).

Every function takes arrays of one backend and returns arrays of the same backend,
device and dtype; see each module for the math.
"""

from __future__ import annotations

from .ldu import LDUResult, ldu, ldu_nopivot
from .projections import ComplementProjector, IsometricProjection, complement_projector, isometric_projection
from .random import BASIS_KINDS, derive_seed, random_basis
from .splits import (
    LowRankQuantizedResult,
    SparseLowRankResult,
    lowrank_plus_quantized,
    nf4_codebook,
    quantize_nf4,
    quantize_uniform,
    sparse_plus_lowrank,
)
from .svd import SVDResult, randomized_svd, recompress_factors, truncated_svd
from .transforms import dct, dct2, dct_matrix, dft2, hadamard_matrix, idct, idct2, idft2, wht, wht2
from .tucker import HOOIResult, TuckerResult, fold, hooi, hosvd, mode_product, tucker, tucker_to_tensor, unfold

__all__: list[str] = []
__all__ += ["LDUResult", "SVDResult", "ldu", "ldu_nopivot", "randomized_svd", "recompress_factors", "truncated_svd"]
__all__ += ["BASIS_KINDS", "ComplementProjector", "IsometricProjection", "complement_projector", "derive_seed"]
__all__ += ["isometric_projection", "random_basis"]
__all__ += ["LowRankQuantizedResult", "SparseLowRankResult", "lowrank_plus_quantized", "nf4_codebook"]
__all__ += ["quantize_nf4", "quantize_uniform", "sparse_plus_lowrank"]
__all__ += ["dct", "dct2", "dct_matrix", "dft2", "hadamard_matrix", "idct", "idct2", "idft2", "wht", "wht2"]
__all__ += ["HOOIResult", "TuckerResult", "fold", "hooi", "hosvd", "mode_product", "tucker", "tucker_to_tensor"]
__all__ += ["unfold"]
