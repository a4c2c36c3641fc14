"""Registry of adapter classes by name: ``create("lora", d_out, d_in, rank=8)``."""

from __future__ import annotations

from typing import Any

from .base import Adapter

__all__ = ["create", "get", "names", "register"]

_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: register ``cls`` under ``cls.name`` (unique, lower-case)."""
    key = cls.name
    if not key or key != key.lower():
        raise ValueError(f"adapter class {cls.__name__} needs a lower-case name, got {key!r}")
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
