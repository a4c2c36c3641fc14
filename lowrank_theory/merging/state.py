r"""Whole models: flatten parameter dicts into one vector and back, and merge dicts of task vectors.

The merges of this package take arrays of one shape.  A model is a mapping ``name -> array``;
:func:`merge_state_dicts` applies a merge either **per tensor** (each name separately, as PEFT's
``add_weighted_adapter`` does layer by layer) or **globally** (all names flattened into one vector,
as the TIES and PCB authors rank and normalize over the whole model).  The two differ for every merge
with a ranking or a normalization (TIES's trim, magnitude pruning, PCB); they agree for task
arithmetic, and for DARE in distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from ..backend import namespace
from ..linalg import derive_seed
from ._validate import check_array, check_seed

__all__ = ["FlatSpec", "check_state_dicts", "flatten", "merge_state_dicts", "unflatten"]

SCOPES = ("global", "per_tensor")


class FlatSpec(NamedTuple):
    """Where each named array lives in a flat vector: ``names``, ``shapes`` and start ``offsets``."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]

    @property
    def size(self) -> int:
        if not self.names:
            return 0
        last = self.shapes[-1]
        n = 1
        for d in last:
            n *= d
        return self.offsets[-1] + n


def check_state_dicts(dicts: Any, name: str = "task_dicts") -> list[Mapping[str, Any]]:
    """A non-empty sequence of mappings with the same keys (in one order) and, per key, one shape.

    Raises
    ------
    TypeError
        If ``dicts`` is not a sequence of mappings, or a value is not a float array.
    ValueError
        If it is empty, a mapping is empty, the keys or a key's shapes differ, or a value is not finite.
    """
    if isinstance(dicts, (Mapping, str)) or not isinstance(dicts, Sequence):
        raise TypeError(f"{name} must be a non-empty sequence of mappings name -> array, got {type(dicts).__name__}")
    out = list(dicts)
    if not out:
        raise ValueError(f"{name} must hold at least one mapping, got an empty sequence")
    for i, d in enumerate(out):
        if not isinstance(d, Mapping):
            raise TypeError(f"{name}[{i}] must be a mapping name -> array, got {type(d).__name__}")
        if not d:
            raise ValueError(f"{name}[{i}] is empty")
    keys = list(out[0])
    for i, d in enumerate(out):
        if list(d) != keys:
            missing, extra = sorted(set(keys) - set(d)), sorted(set(d) - set(keys))
            raise ValueError(f"{name}[{i}] must have the keys of {name}[0] in the same order; missing {missing}, "
                             f"extra {extra}" + ("" if missing or extra else " (same keys, another order)"))
        for k in keys:
            check_array(d[k], f"{name}[{i}][{k!r}]")
            if tuple(d[k].shape) != tuple(out[0][k].shape):
                raise ValueError(f"{name}[{i}][{k!r}] must have shape {tuple(out[0][k].shape)}, "
                                 f"got {tuple(d[k].shape)}")
    return out


def flatten(state: Mapping[str, Any]) -> tuple[Any, FlatSpec]:
    """Concatenate the arrays of ``state`` (in its key order) into one 1-D array.

    Returns
    -------
    vector : array, shape (sum of sizes,)
        On the arrays' backend (all must share backend and dtype).
    spec : FlatSpec
        What :func:`unflatten` needs to rebuild the mapping.
    """
    check_state_dicts([state], "state")
    names = tuple(state)
    xp = namespace(*[state[k] for k in names])
    parts, shapes, offsets, pos = [], [], [], 0
    for k in names:
        x = state[k]
        shapes.append(tuple(x.shape))
        offsets.append(pos)
        flat = xp.reshape(x, (-1,))
        pos += int(flat.shape[0])
        parts.append(flat)
    return xp.concat(parts), FlatSpec(names, tuple(shapes), tuple(offsets))


def unflatten(vector: Any, spec: FlatSpec) -> dict[str, Any]:
    """The mapping ``name -> array`` of :func:`flatten`'s ``vector`` (views into it where the backend allows)."""
    if tuple(vector.shape) != (spec.size,):
        raise ValueError(f"vector must have shape ({spec.size},) to match the spec, got {tuple(vector.shape)}")
    xp = namespace(vector)
    out = {}
    for k, shape, start in zip(spec.names, spec.shapes, spec.offsets):
        n = 1
        for d in shape:
            n *= d
        out[k] = xp.reshape(vector[start : start + n], shape)
    return out


def merge_state_dicts(merge: Callable[..., Any], task_dicts: Sequence[Mapping[str, Any]], *args: Any,
                      scope: str = "global", **kwargs: Any) -> dict[str, Any]:
    r"""Apply a task-vector merge to whole models given as mappings ``name -> task vector``.

    Parameters
    ----------
    merge : callable ``merge(task_vectors, *args, **kwargs) -> array``
        Any merge of this package (``task_arithmetic``, ``ties``, ``dare_linear``, ``pcb``, ...).
    task_dicts : sequence of mappings
        One mapping per task with the same keys (in one order) and shapes
        (:func:`check_state_dicts`).
    *args, **kwargs
        Passed to ``merge`` (weights, density, ...).
    scope : {"global", "per_tensor"}
        ``"global"``: flatten each task's mapping into one vector (:func:`flatten`), merge once,
        split back -- rankings and normalizations see the whole model.  ``"per_tensor"``: merge each
        key separately; a ``seed`` keyword becomes ``derive_seed(seed, key)`` for key ``key``, so keys
        draw independent masks.

    Returns
    -------
    dict
        ``name -> merged task vector``.

    Raises
    ------
    TypeError, ValueError
        On bad mappings or an unknown scope; the merge's own errors otherwise.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    dicts = check_state_dicts(task_dicts)
    if scope == "global":
        flats = [flatten(d) for d in dicts]
        return unflatten(merge([v for v, _ in flats], *args, **kwargs), flats[0][1])
    seed = kwargs.pop("seed", None)
    seed = check_seed(seed)
    out = {}
    for k in dicts[0]:
        kw = dict(kwargs) if seed is None else dict(kwargs, seed=derive_seed(seed, str(k)))
        out[k] = merge([d[k] for d in dicts], *args, **kw)
    return out
