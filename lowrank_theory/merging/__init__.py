r"""Merging task vectors: pure functions on weight deltas :math:`\tau_t = \theta_t - \theta_0` of one shape.

One file per idea:

* :mod:`.arithmetic` -- task arithmetic (``linear``): :math:`\sum_t w_t\tau_t`;
* :mod:`.prune` -- magnitude trim and the magnitude-prune merge;
* :mod:`.ties_merging` -- TIES-Merging (trim, sign election, disjoint mean);
* :mod:`.drop_and_rescale` -- DARE / DAREx drop-and-rescale, DARE-linear and DARE-TIES;
* :mod:`.pcb_merging` -- PCB-Merging (intra/inter-balancing, drop, rescale);
* :mod:`.factored` -- ``cat`` and ``svd`` of LoRA factors :math:`(B_t, A_t)`, never forming m×n;
* :mod:`.lora` -- PEFT's ``add_weighted_adapter`` combination types on one layer's factors;
* :mod:`.state` -- whole models as parameter dicts (flatten / merge per tensor or globally);
* :mod:`.natural_niches` -- M2N2, evolutionary merging driven by a per-example score function;
* :mod:`.surgery` -- Model Surgery: a probe direction added to the rows that oppose it most (a rank-one delta each).

Every merge takes arrays of one backend (NumPy, torch, CuPy), shape and dtype, validates them before
any work (``TypeError`` / ``ValueError`` naming the argument), computes half-precision torch inputs in
float32 and returns the input's dtype.
"""

from __future__ import annotations

from .arithmetic import linear, task_arithmetic
from .drop_and_rescale import dare, dare_keep_mask, dare_linear, dare_merge, dare_optimal_rescale, dare_ties
from .factored import cat, svd
from .lora import COMBINATION_TYPES, combine_lora
from .natural_niches import M2N2Result, m2n2, niche_fitness
from .pcb_merging import pcb
from .prune import magnitude_prune, trim
from .state import flatten, merge_state_dicts, unflatten
from .surgery import model_surgery, model_surgery_deltas
from .ties_merging import elect_sign, ties

__all__ = [
    "COMBINATION_TYPES",
    "M2N2Result",
    "cat",
    "combine_lora",
    "dare",
    "dare_keep_mask",
    "dare_linear",
    "dare_merge",
    "dare_optimal_rescale",
    "dare_ties",
    "elect_sign",
    "flatten",
    "linear",
    "m2n2",
    "magnitude_prune",
    "merge_state_dicts",
    "model_surgery",
    "model_surgery_deltas",
    "niche_fitness",
    "pcb",
    "svd",
    "task_arithmetic",
    "ties",
    "trim",
    "unflatten",
]
