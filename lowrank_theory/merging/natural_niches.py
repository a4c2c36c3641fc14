r"""M2N2 (Model Merging of Natural Niches): evolutionary merging with split points, competition and attraction.

What we read, and where.  J. Abrantes, R. T. Lange, Y. Tang, "Competition and Attraction Improve
Model Fusion", GECCO 2025, arXiv:2508.16204 (the abstract, the Sakana AI summary at sakana.ai/m2n2 and
a write-up of its equations), and the authors' code, github.com/SakanaAI/natural_niches (commit
3b90342: ``natural_niches_fn.py`` and ``helper_fn.py``).  The algorithm keeps an **archive** of
``archive_size`` models with their per-example scores :math:`s(x_j\mid\theta_k)`, and at each step

1. **picks parents by competition and attraction.**  Each data point :math:`j` is a resource shared
   by the archive: with :math:`z_j = \sum_k s(x_j\mid\theta_k)` (1 where it is 0), a model's fitness is
   :math:`f_k = \sum_j s(x_j\mid\theta_k)/z_j^\alpha`, so solving what few others solve is worth more
   ("natural niches"; :math:`\alpha` = 1 in the paper and code, capacity :math:`c_j = 1`).  Parent A is
   drawn with probability :math:`\propto f_k`; parent B with probability proportional to its
   **attraction** to A, :math:`g(A, B) = \sum_j \max\big(0,\ s(x_j\mid\theta_B) - s(x_j\mid\theta_A)\big)/z_j^\alpha`
   (how much B is better where A is weak: a complementary mate);
2. **crosses them over at a split point.**  With the parameters flattened into one vector of length
   :math:`D`, a split point :math:`w_s \sim \mathcal U\{0..D-1\}` and a mixing ratio :math:`w_m \sim \mathcal U(0, 1)`,
   the child is :math:`\mathrm{SLERP}(\theta_A, \theta_B; w_m)` before :math:`w_s` and
   :math:`\mathrm{SLERP}(\theta_A, \theta_B; 1 - w_m)` from :math:`w_s` on, so merging boundaries are
   not fixed layers but evolve;
3. **scores the child and lets it compete** for a place: with the child added, the member of lowest
   fitness (ties: the first, the child last) leaves the archive -- the child itself if it is the worst.

Our choices where the paper leaves one, taken from the authors' code where it has them: SLERP uses
one angle :math:`\Omega` between the *whole* flattened parents (``slerp_w_splitpoint``), with linear
interpolation where :math:`\sin\Omega \le 10^{-6}` (or a parent is zero); without the matchmaker both
parents are drawn by fitness *with* replacement (``jax.random.choice``'s default); the archive starts
empty and is filled by the seed models, then by children while there is room.  Our own: when no
member is attracted to parent A (A is at least as good everywhere) the code's probabilities are 0/0;
we then draw B by fitness.  Mutation (Gaussian noise, which the authors add only when evolving from
scratch) is off by default.  Randomness comes from one ``numpy.random.default_rng(seed)``: a seed and a
deterministic ``score_fn`` give one run.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..backend import device_of, from_numpy_like, namespace, to_numpy
from ._validate import working
from .state import check_state_dicts

__all__ = ["M2N2Result", "m2n2", "niche_fitness"]

log = logging.getLogger(__name__)

INTERPOLATIONS = ("slerp", "linear")


class M2N2Result(NamedTuple):
    """Outcome of :func:`m2n2`.

    Attributes
    ----------
    best : dict
        The archive member with the highest mean score (ties: the lowest index).
    best_index : int
    archive : list of dict
        The final archive (at most ``archive_size`` parameter dicts).
    scores : numpy.ndarray, shape (len(archive), N)
        Their per-example scores.
    fitness : numpy.ndarray, shape (len(archive),)
        Their resource-shared fitness (:func:`niche_fitness`).
    history : list of dict
        One record per step: ``parents`` (archive indices), ``split`` (flat index), ``mix``
        (:math:`w_m`), ``score`` (the child's mean score) and ``slot`` (its archive index, or None
        when it lost).
    """

    best: dict
    best_index: int
    archive: list
    scores: np.ndarray
    fitness: np.ndarray
    history: list


def niche_fitness(scores: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    r"""Fitness under competition for data points, :math:`f_k = \sum_j s_{kj} / z_j^\alpha`.

    :math:`z_j = \sum_k s_{kj}` is how much of data point j the K models take together.

    Parameters
    ----------
    scores : array, shape (K, N)
        Non-negative per-example scores of K models.
    alpha : float
        Competition exponent (0: plain total score; 1: each data point shares one unit of reward).

    Returns
    -------
    numpy.ndarray, shape (K,)
        A data point nobody scores on (:math:`z_j = 0`) counts with :math:`z_j = 1` (it adds nothing).
    """
    s = np.asarray(scores, dtype=np.float64)
    z = s.sum(axis=0)
    z = np.where(z > 0, z, 1.0) ** alpha
    return (s / z[None, :]).sum(axis=1)


def _attraction(scores: np.ndarray, a: int, alpha: float) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    z = s.sum(axis=0)
    z = np.where(z > 0, z, 1.0) ** alpha
    f = s / z[None, :]
    return np.maximum(0.0, f - f[a][None, :]).sum(axis=1)


def _draw(rng: np.random.Generator, weights: np.ndarray) -> int:
    total = float(weights.sum())
    if not total > 0:
        return int(rng.integers(weights.shape[0]))
    return int(rng.choice(weights.shape[0], p=weights / total))


def _coefficients(t: float, omega: float | None) -> tuple[float, float]:
    """Weights of parents A and B at interpolation ``t`` (SLERP at angle omega, or linear when None)."""
    if omega is None or not math.sin(omega) > 1e-6:
        return 1.0 - t, t
    s = math.sin(omega)
    return math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s


def _angle(x: Mapping[str, Any], y: Mapping[str, Any]) -> float | None:
    """The angle between two flattened parameter dicts (None when one of them is zero)."""
    dot = nx = ny = 0.0
    for k in x:
        xp = namespace(x[k])
        a, b = working(x[k]), working(y[k])
        dot += float(to_numpy(xp.sum(a * b)))
        nx += float(to_numpy(xp.sum(a * a)))
        ny += float(to_numpy(xp.sum(b * b)))
    if nx == 0.0 or ny == 0.0:
        return None
    return math.acos(max(-1.0, min(1.0, dot / math.sqrt(nx * ny))))


def _crossover(x: Mapping[str, Any], y: Mapping[str, Any], split: int, mix: float, interpolation: str) -> dict:
    omega = _angle(x, y) if interpolation == "slerp" else None
    head, tail = _coefficients(mix, omega), _coefficients(1.0 - mix, omega)
    out, pos = {}, 0
    for k in x:
        xp = namespace(x[k])
        a, b = working(x[k]), working(y[k])
        n = int(math.prod(a.shape))
        if split >= pos + n:
            c = head[0] * a + head[1] * b
        elif split <= pos:
            c = tail[0] * a + tail[1] * b
        else:
            idx = xp.reshape(xp.arange(n, device=device_of(a)), tuple(a.shape))
            c = xp.where(idx < (split - pos), head[0] * a + head[1] * b, tail[0] * a + tail[1] * b)
        out[k] = xp.astype(c, x[k].dtype) if c.dtype != x[k].dtype else c
        pos += n
    return out


def _scores(score_fn: Callable[[dict], Any], params: dict, n: int | None) -> np.ndarray:
    raw = score_fn(params)
    try:
        s = np.asarray(to_numpy(raw) if not isinstance(raw, (list, tuple, np.ndarray)) else raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"score_fn must return a 1-D array of per-example scores, got {type(raw).__name__}") from None
    if s.ndim != 1 or s.shape[0] == 0:
        raise ValueError(f"score_fn must return a non-empty 1-D array (one score per example), got shape {s.shape}")
    if n is not None and s.shape[0] != n:
        raise ValueError(f"score_fn must return {n} scores every time, got {s.shape[0]}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("score_fn must return finite, non-negative scores (e.g. 1/0 correctness or the "
                         "probability of the right answer)")
    return s


def _insert(archive: list, scores: list, child: dict, s: np.ndarray, size: int, alpha: float) -> int | None:
    if len(archive) < size:
        archive.append(child)
        scores.append(s)
        return len(archive) - 1
    worst = int(np.argmin(niche_fitness(np.stack([*scores, s]), alpha)))
    if worst == len(archive):
        return None
    archive[worst], scores[worst] = child, s
    return worst


def _check_int(v: Any, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


def m2n2(models: Sequence[Mapping[str, Any]], score_fn: Callable[[dict], Any], *, steps: int,
         archive_size: int | None = None, alpha: float = 1.0, seed: int = 0, matchmaker: bool = True,
         split_point: bool = True, interpolation: str = "slerp", mutation_std: float = 0.0) -> M2N2Result:
    r"""Evolve merges of ``models`` with M2N2 (see the module docstring for the algorithm and our choices).

    Parameters
    ----------
    models : sequence of mappings ``name -> array``
        The seed models (whole parameter dicts, or dicts of task vectors), with the same keys, order
        and shapes; at least one.
    score_fn : callable ``params -> array (N,)``
        Per-example scores of a parameter dict (finite, non-negative, the same N every call; e.g.
        1/0 correctness on N training examples).  Called once per seed model and once per step.
    steps : int
        Children to create and score (the budget of forward passes beyond the seeds).
    archive_size : int, optional
        Archive capacity, at least ``len(models)`` and 2 (default ``max(2, 2 * len(models))``).
    alpha : float
        Competition exponent of :func:`niche_fitness` (1 in the paper).
    seed : int
        Seed of ``numpy.random.default_rng``; with a deterministic ``score_fn`` the run is reproducible.
    matchmaker : bool
        Draw parent B by attraction to A (True) or by fitness like A (False, an ablation in the paper).
    split_point : bool
        Cross over with a random split point (True) or interpolate every parameter at :math:`w_m`.
    interpolation : {"slerp", "linear"}
        SLERP on the flattened parents (the paper's) or linear interpolation.
    mutation_std : float
        Standard deviation of Gaussian noise added to each child (0: none, the authors' setting when
        merging pre-trained models).

    Returns
    -------
    M2N2Result

    Raises
    ------
    TypeError, ValueError
        On bad models (:func:`~lowrank_theory.merging.state.check_state_dicts`), a non-callable
        ``score_fn`` or one returning bad scores, or out-of-range settings.

    References
    ----------
    J. Abrantes, R. T. Lange, Y. Tang, "Competition and Attraction Improve Model Fusion", GECCO 2025,
    arXiv:2508.16204; code github.com/SakanaAI/natural_niches.
    """
    seeds = check_state_dicts(models, "models")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable (params -> per-example scores), got {type(score_fn).__name__}")
    steps = _check_int(steps, "steps", 0)
    size = max(2, 2 * len(seeds)) if archive_size is None else _check_int(archive_size, "archive_size", 2)
    if size < len(seeds):
        raise ValueError(f"archive_size must be at least the number of seed models ({len(seeds)}), got {size}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite real number >= 0, got {alpha!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if not (isinstance(mutation_std, numbers.Real) and math.isfinite(mutation_std) and mutation_std >= 0):
        raise ValueError(f"mutation_std must be a finite real number >= 0, got {mutation_std!r}")
    seed = _check_int(seed, "seed", 0)
    rng = np.random.default_rng(seed)
    total = sum(int(math.prod(v.shape)) for v in seeds[0].values())

    archive: list[dict] = []
    scores: list[np.ndarray] = []
    n = None
    for model in seeds:
        s = _scores(score_fn, dict(model), n)
        n = s.shape[0]
        _insert(archive, scores, dict(model), s, size, float(alpha))
    history = []
    for step in range(steps):
        S = np.stack(scores)
        fit = niche_fitness(S, float(alpha))
        if matchmaker:
            a = _draw(rng, fit)
            attr = _attraction(S, a, float(alpha))
            b = _draw(rng, attr) if attr.sum() > 0 else _draw(rng, fit)
        else:
            a, b = _draw(rng, fit), _draw(rng, fit)
        split = int(rng.integers(total)) if split_point else total
        mix = float(rng.uniform())
        child = _crossover(archive[a], archive[b], split, mix, interpolation)
        if mutation_std > 0:
            child = {k: v + from_numpy_like(rng.normal(0.0, mutation_std, size=tuple(v.shape)), like=v)
                     for k, v in child.items()}
        s = _scores(score_fn, child, n)
        slot = _insert(archive, scores, child, s, size, float(alpha))
        history.append(dict(step=step, parents=(a, b), split=split, mix=mix, score=float(s.mean()), slot=slot))
        log.debug("m2n2 step %d: parents %s, split %d, mix %.3f, score %.4f, slot %s", step, (a, b), split, mix,
                  s.mean(), slot)
    S = np.stack(scores)
    best = int(np.argmax(S.mean(axis=1)))
    return M2N2Result(archive[best], best, archive, S, niche_fitness(S, float(alpha)), history)
