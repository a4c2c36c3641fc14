"""``check_adapter`` and ``parametrize_with_checks``: every invariant run on a user's adapter, every failure reported.

The scikit-learn ``check_estimator`` idea for adapters: each invariant is a small named function
(:data:`~lowrank_theory.testing.checks.CHECKS`); :func:`check_adapter` runs them all on layers built by a
factory and returns a :class:`CheckReport` naming every failing check with its numbers (it raises
:class:`AdapterCheckError` at the end when asked to, not at the first failure);
:func:`parametrize_with_checks` turns the same checks into pytest parameters, one test per check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .checks import CHECKS, CheckFailed, CheckSkipped, Subject

__all__ = ["AdapterCheckError", "CheckReport", "CheckResult", "check_adapter", "parametrize_with_checks",
           "registered_factory"]

Factory = Callable[[int, int, torch.dtype], Any]


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: ``status`` is ``"passed"``, ``"failed"`` or ``"skipped"``."""

    check: str
    status: str
    message: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)


class AdapterCheckError(AssertionError):
    """Raised by :meth:`CheckReport.raise_if_failed` (and ``check_adapter(..., raise_on_failure=True)``)."""

    def __init__(self, report: CheckReport) -> None:
        super().__init__(str(report))
        self.report = report


@dataclass
class CheckReport:
    """All results of :func:`check_adapter` for one adapter."""

    name: str
    results: list[CheckResult]

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def passed(self) -> bool:
        """True when no check failed (skipped ones do not count against it)."""
        return not self.failures

    def __getitem__(self, check: str) -> CheckResult:
        for r in self.results:
            if r.check == check:
                return r
        raise KeyError(f"no check named {check!r} in this report; ran: {[r.check for r in self.results]}")

    def raise_if_failed(self) -> CheckReport:
        if self.failures:
            raise AdapterCheckError(self)
        return self

    def __str__(self) -> str:
        lines = [f"check_adapter({self.name}): {len(self.failures)} failed, "
                 f"{sum(r.status == 'passed' for r in self.results)} passed, "
                 f"{sum(r.status == 'skipped' for r in self.results)} skipped"]
        width = max(len(r.check) for r in self.results) if self.results else 0
        for r in self.results:
            nums = ", ".join(f"{k}={_fmt(v)}" for k, v in r.numbers.items())
            text = r.message if r.status != "passed" else nums
            lines.append(f"  {r.status.upper():7s} {r.check:<{width}}  {text}")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _run_one(subject: Subject, check: str) -> CheckResult:
    fn = CHECKS[check]
    try:
        numbers = fn(subject) or {}
    except CheckSkipped as exc:
        return CheckResult(check, "skipped", str(exc))
    except CheckFailed as exc:
        return CheckResult(check, "failed", str(exc), dict(exc.numbers))
    except Exception as exc:
        return CheckResult(check, "failed", f"raised {type(exc).__name__}: {exc}")
    return CheckResult(check, "passed", "", numbers)


def _select(checks: Iterable[str] | None, skip: Iterable[str]) -> list[str]:
    names = list(CHECKS) if checks is None else list(checks)
    skip = set(skip)
    unknown = sorted((set(names) | skip) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; known: {', '.join(CHECKS)}")
    return [n for n in names if n not in skip]


def _subject(factory: Factory, *, name: str | None, shapes: Sequence[tuple[int, int]],
             half_dtypes: Sequence[torch.dtype]) -> Subject:
    if not callable(factory):
        raise TypeError(f"factory must be callable as factory(d_out, d_in, dtype), got {type(factory).__name__}")
    shapes = tuple((int(a), int(b)) for a, b in shapes)
    if not shapes or any(a < 1 or b < 1 for a, b in shapes):
        raise ValueError(f"shapes must be a non-empty list of positive (d_out, d_in) pairs, got {shapes}")
    return Subject(factory, shapes=shapes, half_dtypes=tuple(half_dtypes),
                   name=name or getattr(factory, "__name__", "adapter"))


def check_adapter(
    factory: Factory,
    *,
    name: str | None = None,
    checks: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    shapes: Sequence[tuple[int, int]] = ((12, 20), (17, 9)),
    half_dtypes: Sequence[torch.dtype] = (torch.float16, torch.bfloat16),
    raise_on_failure: bool = True,
) -> CheckReport:
    """Run the adapter invariants on layers built by ``factory`` and report every failure.

    Parameters
    ----------
    factory : callable
        ``factory(d_out, d_in, dtype)`` returns an :class:`~lowrank_theory.adapters.Adapter` (wrapped
        over a seeded random ``nn.Linear``), an :class:`~lowrank_theory.adapters.AdaptedLinear`, or a
        :class:`~lowrank_theory.testing.LayerView` of another library's layer.  It is called many times;
        it must build the same layer for the same arguments (that is one of the checks).
    name : str, optional
        For the report (default: the factory's ``__name__``).
    checks, skip : iterable of str, optional
        Which of :data:`~lowrank_theory.testing.checks.CHECKS` to run (default all) and which to leave out.
    shapes : sequence of (d_out, d_in)
        Layer shapes to try; include non-square, non-power-of-two ones.
    half_dtypes : sequence of torch.dtype
        The dtypes of the half-precision merge check.
    raise_on_failure : bool, default True
        Raise :class:`AdapterCheckError` (an ``AssertionError`` listing every failed check) after all
        checks ran; with False just return the report.

    Returns
    -------
    CheckReport

    Examples
    --------
    >>> from lowrank_theory import adapters
    >>> from lowrank_theory.testing import check_adapter
    >>> report = check_adapter(lambda m, n, dtype: adapters.create("lora", m, n, rank=2).to(dtype))
    >>> report.passed
    True
    """
    subject = _subject(factory, name=name, shapes=shapes, half_dtypes=half_dtypes)
    report = CheckReport(subject.name, [_run_one(subject, c) for c in _select(checks, skip)])
    return report.raise_if_failed() if raise_on_failure else report


def registered_factory(method: str, *, from_weight: bool | None = None, **cfg: Any) -> Factory:
    """A factory for a registered method: ``create(method, d_out, d_in, **cfg)`` over a seeded random base.

    With ``from_weight`` (default: when the class has ``from_weight``) the adapter is built from the base
    weight by ``cls.from_weight(W0, **cfg)`` and the base gets the weight it returns (PiSSA's residual,
    LQ-LoRA's quantized part), as :func:`~lowrank_theory.training.inject` does.
    """
    from ..adapters import AdaptedLinear, get
    from ..adapters.conv import AdaptedConv2d
    from .views import AdaptedConv2dView, AdaptedLinearView, seeded_conv2d, seeded_linear

    cls = get(method)
    use_fw = callable(getattr(cls, "from_weight", None)) if from_weight is None else bool(from_weight)

    def factory(d_out: int, d_in: int, dtype: torch.dtype) -> AdaptedLinearView:
        if "kernel_size" in cls.params:  # a kernel adapter: over an nn.Conv2d
            ad = cls(d_out, d_in, **cfg)
            ad._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
            return AdaptedConv2dView(AdaptedConv2d(seeded_conv2d(d_out, d_in, tuple(ad.kernel_size), dtype), ad))
        base = seeded_linear(d_out, d_in, dtype)
        initial = (base.weight.detach().clone(), base.bias.detach().clone())
        if use_fw:
            ad, w = cls.from_weight(base.weight.detach(), **cfg)
            with torch.no_grad():
                base.weight.copy_(w)
        else:
            ad = cls(d_out, d_in, **cfg)
        ad._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
        return AdaptedLinearView(AdaptedLinear(base, ad), initial)

    factory.__name__ = f"{method}{'.from_weight' if use_fw else ''}({', '.join(f'{k}={v!r}' for k, v in cfg.items())})"
    return factory


def parametrize_with_checks(
    factories: Mapping[str, Factory] | Sequence[tuple[str, Factory]],
    *,
    checks: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    shapes: Sequence[tuple[int, int]] = ((12, 20), (17, 9)),
    half_dtypes: Sequence[torch.dtype] = (torch.float16, torch.bfloat16),
):
    """A ``pytest.mark.parametrize`` over (adapter, check): one test per check, named ``<adapter>-<check>``.

    Use it as::

        @parametrize_with_checks({"my_adapter": my_factory})
        def test_my_adapter(check):
            check()

    Each parameter is a callable that runs one check and fails the test with the check's message and
    numbers (``pytest.skip`` where the check does not apply).
    """
    import pytest

    items = list(factories.items()) if isinstance(factories, Mapping) else list(factories)
    if not items:
        raise ValueError("factories must name at least one factory")
    params = []
    for label, factory in items:
        subject = _subject(factory, name=label, shapes=shapes, half_dtypes=half_dtypes)
        for c in _select(checks, skip):
            params.append(pytest.param(_PytestCheck(subject, c), id=f"{label}-{c}"))
    return pytest.mark.parametrize("check", params)


class _PytestCheck:
    def __init__(self, subject: Subject, check: str) -> None:
        self.subject, self.check = subject, check

    def __call__(self) -> CheckResult:
        import pytest

        result = _run_one(self.subject, self.check)
        if result.status == "skipped":
            pytest.skip(result.message)
        if result.status == "failed":
            nums = ", ".join(f"{k}={_fmt(v)}" for k, v in result.numbers.items())
            suffix = f" [{nums}]" if nums else ""
            raise AssertionError(f"{self.subject.name}: {self.check} failed: {result.message}{suffix}")
        return result

    def __repr__(self) -> str:
        return f"{self.subject.name}-{self.check}"
