r"""Typed constructor parameters: each adapter class declares its knobs once, and every path validates them.

An adapter class lists its constructor keywords in ``params``, a ``{name: Param}`` mapping, the way
PEFT's per-method config dataclasses hold every knob with its type in one place.  The defaults stay in
the constructor's signature (Python's own declaration); the schema adds the type and the range.
:class:`~lowrank_theory.adapters.base.Adapter` wraps every subclass constructor so that the bound
arguments are validated against the schema *before* any tensor is built, whichever way the adapter is
constructed (``LoRA(...)``, ``adapters.create("lora", ...)``, ``inject(model, "lora", ...)``, a checkpoint
replay, the CLI's ``--cfg``), and the validated, normalized arguments become :meth:`Adapter.config`, so
``create(name, d_out, d_in, **adapter.config())`` rebuilds the adapter exactly.

Types are strict, with one message everywhere: a string is never parsed as a number, ``True`` is not an
int, ``2`` is not a bool; NumPy scalars are accepted and normalized to Python ``int`` / ``float`` (so
configs stay JSON-able).  Cross-parameter constraints that need the layer size (``rank <= min(m, n)``,
``num_blocks`` divides ``rank``) stay in the constructors, next to the math they protect.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

__all__ = [
    "SEED_MAX",
    "Bool",
    "Choice",
    "Float",
    "Instance",
    "Int",
    "IntOrInts",
    "Param",
    "Seed",
    "Shape2",
    "Tensor",
    "schema",
    "validate_params",
]

#: Largest seed accepted: ``torch.Generator.manual_seed`` and NumPy's ``default_rng`` both take [0, 2**63 - 1].
SEED_MAX = 2**63 - 1
#: Largest magnitude of a float knob: it must be representable in float32, the dtype most adapters run in
#: (``alpha = 1e39`` would turn every float32 output into inf).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _as_int(name: str, value: Any) -> int:
    """A Python int from an int or a NumPy integer; ``TypeError`` for bool, float, str, ..."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_type_name(value)} {value!r}")
    return operator.index(value)


def _as_float(name: str, value: Any) -> float:
    """A Python float from an int/float/NumPy real; ``TypeError`` for bool, str, None, complex, ..."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_type_name(value)} {value!r}")
    return float(value)


@dataclass(frozen=True)
class Param:
    """One constructor keyword: its kind and range.  Use the helpers (:func:`Int`, :func:`Float`, ...)."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    none_ok: bool = False
    cls: type | tuple[type, ...] | None = None
    doc: str = ""

    # ------------------------------------------------------------------ range text
    def range_text(self) -> str:
        """The accepted values in words, e.g. ``'an int >= 1'`` (used in messages and docs)."""
        if self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "bool":
            text = "a bool"
        elif self.kind == "seed":
            text = f"an int in [0, {SEED_MAX}]"
        elif self.kind == "tensor":
            text = "a torch.Tensor"
        elif self.kind == "instance":
            names = self.cls if isinstance(self.cls, tuple) else (self.cls,)
            text = "a " + " or ".join(c.__name__ for c in names if c is not None)
        elif self.kind == "shape2":
            text = "a pair (d_out, d_in) of ints >= 1"
        else:
            base = {"int": "an int", "float": "a finite real", "ints": "an int or a sequence of ints"}[self.kind]
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
            if self.high is not None:
                bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
            text = base + (" " + " and ".join(bounds) if bounds else "")
        return text + (" or None" if self.none_ok else "")

    # ------------------------------------------------------------------ checks
    def _check_range(self, name: str, v: float) -> None:
        lo_bad = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        hi_bad = self.high is not None and (v >= self.high if self.high_open else v > self.high)
        if lo_bad or hi_bad:
            raise ValueError(f"{name} must be {self.range_text()}, got {v!r}")

    def validate(self, name: str, value: Any) -> Any:
        """Return the normalized value, or raise ``TypeError`` (wrong type) / ``ValueError`` (out of range)."""
        if value is None:
            if self.none_ok:
                return None
            raise TypeError(f"{name} must be {self.range_text()}, got None")
        kind = self.kind
        if kind == "int":
            v = _as_int(name, value)
            self._check_range(name, v)
            return v
        if kind == "float":
            v = _as_float(name, value)
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v!r}")
            if abs(v) > FLOAT32_MAX:
                raise ValueError(f"{name} must be representable in float32 (|{name}| <= {FLOAT32_MAX:.3g}), got {v!r}")
            self._check_range(name, v)
            return v
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, np.bool_):
                return bool(value)
            raise TypeError(f"{name} must be a bool, got {_type_name(value)} {value!r}")
        if kind == "seed":
            v = _as_int(name, value)
            if not 0 <= v <= SEED_MAX:
                raise ValueError(f"{name} must be {self.range_text()}, got {v}")
            return v
        if kind == "choice":
            if not isinstance(value, str):
                raise TypeError(f"{name} must be {self.range_text()}, got {_type_name(value)} {value!r}")
            if value not in self.choices:
                raise ValueError(f"{name} must be {self.range_text()}, got {value!r}")
            return value
        if kind == "ints":
            if isinstance(value, Sequence) and not isinstance(value, str):
                out = tuple(_as_int(f"{name}[{i}]", v) for i, v in enumerate(value))
                if not out:
                    raise ValueError(f"{name} must not be empty")
                for v in out:
                    self._check_range(name, v)
                return out
            v = _as_int(name, value)
            self._check_range(name, v)
            return v
        if kind == "shape2":
            if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
                raise TypeError(f"{name} must be {self.range_text()}, got {value!r}")
            out = tuple(_as_int(f"{name}[{i}]", v) for i, v in enumerate(value))
            if min(out) < 1:
                raise ValueError(f"{name} must be {self.range_text()}, got {value!r}")
            return out
        if kind == "tensor":
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be {self.range_text()}, got {_type_name(value)}")
            return value
        if kind == "instance":
            if not isinstance(value, self.cls):  # type: ignore[arg-type]
                raise TypeError(f"{name} must be {self.range_text()}, got {_type_name(value)}")
            return value
        raise AssertionError(f"unknown parameter kind {kind!r}")  # a schema bug, not a user error


def Int(low: int | None = None, high: int | None = None, *, none_ok: bool = False, doc: str = "") -> Param:
    """An int in ``[low, high]`` (either bound optional)."""
    return Param("int", low=low, high=high, none_ok=none_ok, doc=doc)


def Float(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    none_ok: bool = False,
    doc: str = "",
) -> Param:
    """A finite real (representable in float32) in the given range; ``low_open``/``high_open`` exclude the bound."""
    return Param("float", low=low, high=high, low_open=low_open, high_open=high_open, none_ok=none_ok, doc=doc)


def Bool(doc: str = "") -> Param:
    """A bool (``True``/``False``; NumPy's ``bool_`` too, nothing else)."""
    return Param("bool", doc=doc)


def Seed(*, none_ok: bool = False, doc: str = "") -> Param:
    """A seed: an int in ``[0, 2**63 - 1]`` (``None`` only where the class allows torch's global RNG)."""
    return Param("seed", none_ok=none_ok, doc=doc)


def Choice(*choices: str, doc: str = "") -> Param:
    """One of the given strings."""
    return Param("choice", choices=tuple(choices), doc=doc)


def IntOrInts(low: int | None = None, *, doc: str = "") -> Param:
    """An int, or a non-empty sequence of ints (normalized to a tuple), each ``>= low``."""
    return Param("ints", low=low, doc=doc)


def Shape2(*, none_ok: bool = True, doc: str = "") -> Param:
    """A pair of positive ints (normalized to a tuple), e.g. a shared basis shape."""
    return Param("shape2", none_ok=none_ok, doc=doc)


def Tensor(*, none_ok: bool = True, doc: str = "") -> Param:
    """A torch tensor (its shape and values are checked by the constructor, which knows the layer size)."""
    return Param("tensor", none_ok=none_ok, doc=doc)


def Instance(cls: type | tuple[type, ...], *, none_ok: bool = True, doc: str = "") -> Param:
    """An instance of ``cls`` (e.g. a model-level shared module)."""
    return Param("instance", cls=cls, none_ok=none_ok, doc=doc)


def schema(*bases: Mapping[str, Param], without: Iterable[str] = (), **params: Param) -> Mapping[str, Param]:
    """A read-only ``{name: Param}`` for an adapter class: ``bases`` merged in order, then ``params``.

    ``without`` drops inherited names (``schema(LORA_PARAMS, without=["rslora"], num_blocks=Int(1))``).
    The mapping is immutable, so a shared base schema cannot be changed through one class.
    """
    out: dict[str, Param] = {}
    for b in bases:
        out.update(b)
    for name in without:
        if name not in out:
            raise KeyError(f"schema(without=...): {name!r} is not in the base schemas")
        del out[name]
    for name, p in params.items():
        if not isinstance(p, Param):
            raise TypeError(f"schema: {name} must be a Param, got {type(p).__name__}")
        out[name] = p
    return MappingProxyType(out)


def validate_params(owner: str, schema: Mapping[str, Param], values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``values`` against ``schema``; return the normalized values in the same order.

    Parameters
    ----------
    owner : str
        The class name, for messages (``"LoRA: rank must be an int, got str '3'"``).
    schema : mapping of str to Param
    values : mapping of str to object
        Every key must be in ``schema`` (the caller binds the constructor signature first).

    Raises
    ------
    TypeError, ValueError
        The first invalid value, naming the class, the argument and what was expected.
    """
    out: dict[str, Any] = {}
    for name, value in values.items():
        spec = schema.get(name)
        if spec is None:
            raise TypeError(f"{owner}: unexpected keyword argument {name!r}; known: {', '.join(schema)}")
        try:
            out[name] = spec.validate(name, value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{owner}: {exc}") from None
    return out
