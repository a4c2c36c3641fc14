"""Registry of adapter classes by name: ``create("lora", d_out, d_in, rank=8)``."""

from __future__ import annotations

import inspect
from typing import Any

from .base import Adapter

__all__ = ["create", "get", "names", "register"]

_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: register ``cls`` under ``cls.name`` (unique, lower-case).

    The class must declare every constructor keyword in its ``params`` schema
    (:mod:`~lowrank_theory.adapters.params`) and nothing else, so that every construction path
    validates the same way and :meth:`Adapter.config` rebuilds it.
    """
    key = cls.name
    if not key or key != key.lower():
        raise ValueError(f"adapter class {cls.__name__} needs a lower-case name, got {key!r}")
    sig = inspect.signature(cls.__init__)
    keywords = {n for n, p in sig.parameters.items()
                if n not in ("self", "d_out", "d_in") and p.kind is not inspect.Parameter.VAR_KEYWORD}
    if keywords != set(cls.params):
        raise TypeError(
            f"adapter class {cls.__name__}: params must declare exactly the constructor keywords; "
            f"undeclared {sorted(keywords - set(cls.params))}, "
            f"not in the constructor {sorted(set(cls.params) - keywords)}"
        )
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise ValueError(f"adapter name {key!r} is already registered by {_REGISTRY[key].__name__}")
    _REGISTRY[key] = cls
    return cls


def get(name: str) -> type[Adapter]:
    """The adapter class registered under ``name`` (``ValueError`` listing the names otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown adapter {name!r}; known: {', '.join(names())}") from None


def names() -> list[str]:
    """Sorted list of registered adapter names."""
    return sorted(_REGISTRY)


def create(name: str, d_out: int, d_in: int, **cfg: Any) -> Adapter:
    """Build the adapter ``name`` for a (d_out, d_in) weight with its config ``cfg``."""
    return get(name)(d_out, d_in, **cfg)
