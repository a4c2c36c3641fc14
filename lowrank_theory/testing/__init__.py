"""The adapter invariants as a public checker: run them on your own adapter, as we run them on ours and on PEFT's.

Check your adapter in a few lines::

    from lowrank_theory.testing import check_adapter

    def factory(d_out, d_in, dtype):          # called many times; same arguments -> same layer
        return MyAdapter(d_out, d_in, rank=4).to(dtype)

    print(check_adapter(factory, raise_on_failure=False))   # every check, pass / fail with its numbers

or, in a pytest file, one test per check::

    from lowrank_theory.testing import parametrize_with_checks

    @parametrize_with_checks({"my_adapter": factory})
    def test_my_adapter(check):
        check()

The checks (:data:`~lowrank_theory.testing.checks.CHECKS`): identity at init where the class says so;
structured forward equals the dense :math:`x W'^\\top + b'` in float64; merge equals the unmerged output;
merge is idempotent; unmerge restores :math:`W_0` and refuses when the adapter changed since the merge;
disable gives the base output, merged or not, nested or not; a safe merge refuses a non-finite update and
leaves the weights bit-identical; fp16/bf16 merges within 1 ulp of the float32-accumulated result (also a
float32 adapter on a half base); safetensors state round trip; ``create(name, **config())`` round trip;
deterministic defaults; only adapter tensors train; the closed-form parameter count; gradcheck; bad
forward inputs give ``TypeError``/``ValueError`` naming ``x`` and an empty batch works.

:mod:`~lowrank_theory.testing.strategies` has hypothesis strategies for the inputs these checks and the
theory use; :mod:`~lowrank_theory.testing.peft_view` presents PEFT's tuners to the same checks.  The library
never imports this package; it is for tests (ours and yours).
"""

from __future__ import annotations

from .checks import CHECKS, CheckFailed, CheckSkipped, Subject, relerr
from .runner import (
    AdapterCheckError,
    CheckReport,
    CheckResult,
    check_adapter,
    parametrize_with_checks,
    registered_factory,
)
from .tolerances import MERGE_ULPS, TOL, tol, ulp_distance
from .views import AdaptedLinearView, LayerView, as_view, seeded_linear

__all__ = [
    "CHECKS",
    "MERGE_ULPS",
    "TOL",
    "AdaptedLinearView",
    "AdapterCheckError",
    "CheckFailed",
    "CheckReport",
    "CheckResult",
    "CheckSkipped",
    "LayerView",
    "Subject",
    "as_view",
    "check_adapter",
    "parametrize_with_checks",
    "registered_factory",
    "relerr",
    "seeded_linear",
    "tol",
    "ulp_distance",
]
