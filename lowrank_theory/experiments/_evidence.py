r"""The deciding numbers of a claim: one :class:`Evidence` per comparison the check makes.

An experiment's ``evidence(rows)`` returns them; its ``check(rows)`` is :func:`problems` of that
list, and the report draws its table from the same list, so the check and the report can never
disagree about the numbers.

Each comparison is ``value op reference`` with a tolerance ``tol`` (absolute, in the units of
``value``):

============  =====================================
``op``        holds when
============  =====================================
``"<"``       ``value < reference + tol``
``"<="``      ``value <= reference + tol``
``">"``       ``value > reference - tol``
``">="``      ``value >= reference - tol``
``"=="``      ``|value - reference| <= tol``
============  =====================================

``asserted=False`` marks a comparison that is *reported beside the paper* and does not decide
the exit code (a finding of the paper we do or do not reproduce); if one of those does not
hold the claim is shown as holding only partly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["OPS", "Evidence", "problems", "status", "worst_per_part"]

OPS = ("<", "<=", ">", ">=", "==")


@dataclass(frozen=True)
class Evidence:
    """One deciding comparison of an experiment's claim.

    Parameters
    ----------
    part : str
        Which part of the claim (the same for every case of one comparison), e.g.
        ``"DCT beats LoRA on the frequency-sparse target"``.
    case : str
        Where it is evaluated, e.g. ``"budget 56"``.
    value : float
        Our number.
    op : {"<", "<=", ">", ">=", "=="}
        The relation that must hold (see the module docstring).
    reference : float
        What ``value`` is compared with (another of our numbers, a bound or a threshold).
    tol : float
        Absolute slack of the comparison, ``>= 0``.
    quantity, against : str
        What ``value`` and ``reference`` are (``"DCT error"``, ``"LoRA error"``).
    tol_text : str
        How ``tol`` was chosen (``"1e-8 · ‖sBA‖_F"``); shown beside it.
    paper : str
        The paper's own reported value or finding for this quantity, with its source, where it
        gives one (``""`` otherwise).
    asserted : bool
        ``True``: part of the check (a failure fails the claim).  ``False``: reported beside the
        paper only; a failure makes the claim hold *partly*.
    message : str
        The problem text when the comparison fails (default: built from the fields).
    """

    part: str
    case: str
    value: float
    op: str
    reference: float
    tol: float = 0.0
    quantity: str = ""
    against: str = ""
    tol_text: str = ""
    paper: str = ""
    asserted: bool = True
    message: str = ""
    holds: bool = field(init=False)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol!r}")
        object.__setattr__(self, "value", float(self.value))
        object.__setattr__(self, "reference", float(self.reference))
        object.__setattr__(self, "holds", _holds(self.value, self.op, self.reference, self.tol))
        if not self.message:
            object.__setattr__(self, "message", f"{self.part} ({self.case}): {self.quantity or 'value'} "
                                                f"{self.value:.6g} {self.op} {self.against or 'reference'} "
                                                f"{self.reference:.6g} fails (tol {self.tol:.3g})")

    @property
    def margin(self) -> float:
        """How far from failing, relative to ``max(|reference|, tol)``: ``>= 0`` holds, ``< 0`` fails.

        ``-inf`` when ``value`` or ``reference`` is NaN.  Used to pick the closest case of a part.
        """
        v, r, t = self.value, self.reference, self.tol
        if math.isnan(v) or math.isnan(r):
            return -math.inf
        if self.op in ("<", "<="):
            m = r + t - v
        elif self.op in (">", ">="):
            m = v - (r - t)
        else:
            m = t - abs(v - r)
        if math.isinf(m) or math.isnan(m):
            return -math.inf if (math.isnan(m) or m < 0) else math.inf
        scale = max(abs(r), t)
        if math.isinf(scale):
            return 0.0
        return m / scale if scale > 0 else (math.inf if m > 0 else (0.0 if m == 0 else -math.inf))

    def to_dict(self) -> dict[str, Any]:
        """The fields (and ``holds``) as a plain dict, for JSON/CSV."""
        return asdict(self)


def _holds(v: float, op: str, r: float, t: float) -> bool:
    if math.isnan(v) or math.isnan(r):
        return False
    if op == "<":
        return v < r + t
    if op == "<=":
        return v <= r + t
    if op == ">":
        return v > r - t
    if op == ">=":
        return v >= r - t
    return abs(v - r) <= t


def problems(evidence: list[Evidence]) -> list[str]:
    """The messages of the asserted comparisons that fail (an empty list: the claim holds)."""
    return [e.message for e in evidence if e.asserted and not e.holds]


def status(evidence: list[Evidence]) -> str:
    """``"fails"`` (an asserted comparison fails), ``"partly"`` (only a reported one does) or ``"holds"``."""
    if any(e.asserted and not e.holds for e in evidence):
        return "fails"
    if any(not e.holds for e in evidence):
        return "partly"
    return "holds"


def worst_per_part(evidence: list[Evidence]) -> list[tuple[Evidence, int, int]]:
    """Per part, in first-seen order: ``(deciding case, cases that hold, cases)``.

    The deciding case is the failing one with the smallest margin, or, when every case holds,
    the one closest to failing (smallest :attr:`Evidence.margin`): the number a reader needs to
    see how much room the claim has.
    """
    parts: dict[str, list[Evidence]] = {}
    for e in evidence:
        parts.setdefault(e.part, []).append(e)
    out = []
    for es in parts.values():
        worst = min(es, key=lambda e: (e.holds, e.margin))
        out.append((worst, sum(e.holds for e in es), len(es)))
    return out
