r"""Model Surgery: edit the rows of a few weight matrices along a behaviour-probe direction.

A delta operation, like DARE: given weight matrices :math:`W_1, \dots, W_L` whose **rows** live in the hidden-state
space (:math:`W_l \in \mathbb R^{m_l\times d}`, e.g. the gate projections of an LLM's MLPs) and a probe direction
:math:`v \in \mathbb R^d` (the weight row of a linear "behaviour probe" trained on hidden states), score every row by
its cosine with the probe,

.. math:: c_{l,j} = \frac{\langle w_{l,j}, v\rangle}{\|w_{l,j}\|\,\|v\|} \quad (0 \text{ for a zero row}),

select the k rows with the **most negative** cosine over all matrices together (``select="negative"``, what the
authors' code does; ``"positive"`` takes the most aligned ones), and shift each selected row by :math:`\alpha v`:

.. math:: \Delta_l = \alpha\, \mathbb 1_{S_l} v^\top, \qquad W_l' = W_l + \Delta_l,

where :math:`\mathbb 1_{S_l}\in\{0,1\}^{m_l}` marks the selected rows of matrix l.  Each delta is rank one (or zero),
touches k rows in total, and moves row j's response to a hidden state x by :math:`\alpha\langle v, x\rangle`, i.e.
the edited neurons now fire more on states that the probe classifies as the behaviour (α > 0: "towards the probe").

Pure functions on NumPy, torch and CuPy arrays (the selection is computed on the host in float64 from the scores;
ties are broken by matrix, then row index).  Half-precision torch inputs are scored and edited in float32.

References
----------
H. Wang, Y. Yue, R. Lu, J. Shi, A. Zhao, S. Wang, S. Song, G. Huang, "Model Surgery: Modulating LLM's Behavior
Via Simple Parameter Editing", NAACL 2025, arXiv:2407.08770 (seed paper).  Read: the abstract (``shared/seeds/``)
and the authors' code github.com/lucywang720/model-surgery (``modification/modify.py``: cosine of every
``mlp.gate_proj`` row with the probe's row for the behaviour class, negated, a global ranking over the 32 layers, the
top 4096·4 rows get ``+= alpha * probe``, with alpha from the command line; the probe is trained by
``train/run_pplm_discrim_train.py``).  The paper's text beyond the abstract was
not read; which sign of alpha the paper uses per task is left to the caller.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ..backend import backend_name, from_numpy_like, namespace, to_numpy
from ._validate import check_array, working

__all__ = ["SELECT", "model_surgery", "model_surgery_deltas", "probe_cosines", "surgery_rows"]

SELECT = ("negative", "positive")


def _weights(weights: Any) -> tuple[list, bool]:
    single = not isinstance(weights, (list, tuple))
    ws = [weights] if single else list(weights)
    if not ws:
        raise ValueError("weights must be a 2-D array or a non-empty sequence of 2-D arrays")
    kind = None
    for i, w in enumerate(ws):
        name = "weights" if single else f"weights[{i}]"
        check_array(w, name)
        if w.ndim != 2:
            raise ValueError(f"{name} must be a 2-D (rows, d) matrix, got shape {tuple(w.shape)}")
        if kind is None:
            kind = backend_name(w)
        elif backend_name(w) != kind:
            raise TypeError(f"weights must all be {kind} arrays, but {name} is {backend_name(w)}")
    return ws, single


def _probe(probe: Any, d: int, like: Any):
    check_array(probe, "probe")
    if tuple(probe.shape) != (d,):
        raise ValueError(f"probe must have shape ({d},) (the rows' width), got {tuple(probe.shape)}")
    if backend_name(probe) != backend_name(like):
        raise TypeError(f"probe must be a {backend_name(like)} array like the weights, got {backend_name(probe)}")
    if not float(np.linalg.norm(to_numpy(working(probe)).astype(np.float64))) > 0:
        raise ValueError("probe must be a non-zero direction")
    return probe


def probe_cosines(weights: Any, probe: Any) -> list[np.ndarray] | np.ndarray:
    r"""Cosine of every row with the probe, :math:`c_{l,j}`, as float64 NumPy arrays (0 for a zero row).

    Parameters
    ----------
    weights : 2-D array or sequence of 2-D arrays
        :math:`W_l` of shapes :math:`(m_l, d)`, one backend.
    probe : array, shape (d,)
        :math:`v \ne 0`, same backend.

    Returns
    -------
    numpy.ndarray of shape (m,), or a list of them (one per matrix)

    Raises
    ------
    TypeError, ValueError
        Non-float or non-finite arrays, wrong shapes, mixed backends, a zero probe.
    """
    ws, single = _weights(weights)
    d = ws[0].shape[1]
    for i, w in enumerate(ws):
        if w.shape[1] != d:
            raise ValueError(f"weights[{i}] must have {d} columns like weights[0], got shape {tuple(w.shape)}")
    v = to_numpy(working(_probe(probe, d, ws[0]))).astype(np.float64)
    out = []
    for w in ws:
        W = to_numpy(working(w)).astype(np.float64)
        norms = np.linalg.norm(W, axis=1) * np.linalg.norm(v)
        dots = W @ v
        out.append(np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0))
    return out[0] if single else out


def surgery_rows(weights: Any, probe: Any, k: int, *, select: str = "negative") -> list[np.ndarray] | np.ndarray:
    """The selected rows: for each matrix, the sorted row indices among the global k of :func:`probe_cosines`.

    ``select="negative"``: the k smallest cosines (most anti-aligned with the probe); ``"positive"``: the k largest.
    Ties are broken by matrix index, then row index.  Returns one int64 array (a single matrix) or a list.

    Raises
    ------
    TypeError, ValueError
        As :func:`probe_cosines`; ``k`` not an int in [0, total rows]; unknown ``select``.
    """
    if select not in SELECT:
        raise ValueError(f"select must be one of {SELECT}, got {select!r}")
    cos = probe_cosines(weights, probe)
    single = isinstance(cos, np.ndarray)
    cos = [cos] if single else cos
    total = sum(c.size for c in cos)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= total:
        raise ValueError(f"k must be an int in [0, {total}] (the total number of rows), got {k!r}")
    flat = np.concatenate(cos)
    key = flat if select == "negative" else -flat
    chosen = np.argsort(key, kind="stable")[: int(k)]
    out, offset = [], 0
    for c in cos:
        sel = chosen[(chosen >= offset) & (chosen < offset + c.size)] - offset
        out.append(np.sort(sel).astype(np.int64))
        offset += c.size
    return out[0] if single else out


def model_surgery_deltas(weights: Any, probe: Any, k: int, alpha: float, *, select: str = "negative"):
    r"""The deltas :math:`\Delta_l = \alpha\,\mathbb 1_{S_l} v^\top` (module docstring), like the weights.

    Parameters
    ----------
    weights : 2-D array or sequence of 2-D arrays
        :math:`W_l`, rows of width d, one backend and (for a sequence) any float dtypes.
    probe : array, shape (d,)
        The probe direction v (not normalized: the shift is exactly :math:`\alpha v`, as in the authors' code).
    k : int
        Rows edited in total, over all matrices.
    alpha : float
        Finite step along the probe.
    select : {"negative", "positive"}
        Which end of the cosine ranking is edited (see :func:`surgery_rows`).

    Returns
    -------
    array or list of arrays
        Like ``weights``; torch inputs keep autograd through ``probe``.

    Raises
    ------
    TypeError, ValueError
        As :func:`surgery_rows`; ``alpha`` not a finite real.
    """
    return _deltas(weights, probe, k, alpha, select, cast=True)


def _deltas(weights: Any, probe: Any, k: int, alpha: float, select: str, *, cast: bool):
    """The deltas in the working dtype (``cast``: then in each weight's dtype)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite real number, got {alpha!r}")
    rows = surgery_rows(weights, probe, k, select=select)
    ws, single = _weights(weights)
    rows = [rows] if single else rows
    out = []
    for w, r in zip(ws, rows, strict=True):
        xp = namespace(w)
        ind = np.zeros((w.shape[0], 1))
        ind[r, 0] = 1.0
        wk = working(w)
        col = from_numpy_like(ind, like=wk)
        v = xp.astype(working(probe), wk.dtype)
        delta = float(alpha) * (col * xp.reshape(v, (1, -1)))
        out.append(delta if not cast or delta.dtype == w.dtype else xp.astype(delta, w.dtype))
    return out[0] if single else out


def model_surgery(weights: Any, probe: Any, k: int, alpha: float, *, select: str = "negative"):
    r"""The edited weights :math:`W_l + \alpha\,\mathbb 1_{S_l} v^\top` (see :func:`model_surgery_deltas`).

    Returns arrays like ``weights`` (new arrays; the inputs are not modified).  Half-precision torch weights are
    edited in float32 and rounded once.
    """
    deltas = _deltas(weights, probe, k, alpha, select, cast=False)  # added in float32 for half weights: one rounding
    ws, single = _weights(weights)
    ds = [deltas] if single else deltas
    out = []
    for w, dlt in zip(ws, ds, strict=True):
        r = working(w) + working(dlt)
        out.append(r if r.dtype == w.dtype else namespace(r).astype(r, w.dtype))
    return out[0] if single else out
