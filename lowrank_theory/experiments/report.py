"""Run experiments and write their tables, figures and one report (``index.html`` + ``report.md``).

The output folder is checked before the first experiment runs
(:func:`~lowrank_theory.preflight.check_output_dir`), every file is written atomically, and the
report is rewritten after each experiment, so a run that stops (an error, Ctrl-C, a full disk)
keeps everything finished before it, with a report that says it is incomplete.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm.auto import tqdm

from ..preflight import atomic_write_text, check_output_dir
from . import load, names
from ._evidence import problems as evidence_problems
from ._evidence import status as evidence_status
from ._evidence import worst_per_part
from ._provenance import collect, experiment_settings, repo_root
from ._render import render_html, render_markdown

__all__ = ["run_experiments", "write_table"]

log = logging.getLogger(__name__)


def _csv_text(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_table(rows: list[dict], stem: Path) -> list[Path]:
    """Write ``rows`` as ``stem.csv`` and ``stem.json`` (each atomically); return both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".csv"), _csv_text(rows))
    atomic_write_text(stem.with_suffix(".json"), json.dumps(rows, indent=1, default=float))
    return [stem.with_suffix(".csv"), stem.with_suffix(".json")]


def _links(mod: ModuleType, out: Path, files: list[str]) -> list[tuple[str, str | None]]:
    """(label, href) pairs: notebook, proofs, code, papers, then the run's own files.  Repository files
    are linked relative to ``out`` when this package runs from a checkout, else named without a link."""
    root = repo_root()

    def repo(path: str) -> str | None:
        if root is None or not (root / path).exists():
            return None
        return Path(os.path.relpath(root / path, out.resolve())).as_posix()

    links: list[tuple[str, str | None]] = []
    nb = getattr(mod, "NOTEBOOK", None)
    if nb:
        links.append((f"notebook {Path(nb).name}", repo(nb)))
    for pr in getattr(mod, "PROOFS", ()):
        links.append((f"proof {Path(pr).stem}", repo(pr)))
    code = mod.__name__.replace(".", "/") + ".py"
    links.append((f"code {code}", repo(code)))
    for name, arxiv in getattr(mod, "PAPERS", ()):
        links.append((f"{name} (arXiv:{arxiv})", f"https://arxiv.org/abs/{arxiv}"))
    links += [(f, f) for f in files if not f.endswith(".png")]
    return links


def _entry(mod: ModuleType, **kw: Any) -> dict[str, Any]:
    base = dict(name=mod.NAME, title=mod.TITLE, claim=mod.CLAIM, status="pending", problems=[], seconds=0.0, rows=0,
                files=[], evidence=None, deciding=None, links=[], settings=None, skipped=None, error=None)
    base.update(kw)
    return base


def _judge(mod: ModuleType, rows: list[dict]) -> dict[str, Any]:
    """Status, problems and the deciding numbers, from one call of the module's ``evidence`` hook
    (or, without one, from its ``check``)."""
    if hasattr(mod, "evidence"):
        ev = mod.evidence(rows)
        deciding = [dict(w.to_dict(), cases_holding=k, cases=n) for w, k, n in worst_per_part(ev)]
        return dict(status=evidence_status(ev), problems=evidence_problems(ev),
                    evidence=[e.to_dict() for e in ev], deciding=deciding)
    probs = list(mod.check(rows))
    return dict(status="fails" if probs else "holds", problems=probs, evidence=None, deciding=None)


def run_experiments(selected: list[str] | None, out: str | Path, *, scale: str = "quick", backend: str = "numpy",
                    device: str = "cpu", seed: int = 0, progress: bool = True,
                    argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the ``selected`` experiments (all when None) and write everything under ``out``.

    Parameters
    ----------
    selected : list of str or None
        Experiment names (:func:`~lowrank_theory.experiments.names`), in the order to run.
    out : str or path-like
        Output folder; checked to be writable before anything runs, created when the first file
        is written.
    scale, backend, device, seed
        Passed to every experiment's ``run``.
    progress : bool
        A progress bar over the experiments.
    argv : list of str, optional
        The command line recorded in the provenance (default ``sys.argv``).

    Returns
    -------
    list of dict
        One entry per experiment: ``name, title, claim, status`` (``holds``, ``partly``, ``fails``,
        ``skipped`` or ``error``), ``problems`` (the failing checked comparisons), ``seconds``,
        ``rows``, ``files`` (relative to ``out``), ``evidence`` (every comparison, or None without an
        ``evidence`` hook), ``deciding`` (the deciding case of each part), ``links``, ``settings``
        (sizes, seeds, the backend really used) and ``skipped`` / ``error`` (a reason, or None).

    Raises
    ------
    ValueError
        Unknown scale or experiment, or ``out`` not a writable folder -- before anything runs.
    """
    if scale not in ("quick", "full"):
        raise ValueError(f"scale must be 'quick' or 'full', got {scale!r}")
    out = check_output_dir(out)
    todo = list(selected or names())
    mods = [load(n) for n in todo]
    prov = collect(scale=scale, backend=backend, device=device, seed=seed, argv=argv)
    entries: list[dict[str, Any]] = []
    bar = tqdm(mods, desc="reproduce", unit="experiment", disable=not progress)
    for mod in bar:
        bar.set_postfix_str(mod.NAME)
        settings = experiment_settings(mod, scale, backend=backend, device=device, seed=seed)
        t0 = time.perf_counter()
        secs, rel = None, []
        try:
            rows = mod.run(scale, backend=backend, device=device, seed=seed)
            secs = time.perf_counter() - t0
            stem = out / mod.NAME
            files = write_table(rows, stem)
            rel = [str(f.relative_to(out)) for f in files]
            files += mod.plot(rows, stem)
            judged = _judge(mod, rows)
            if judged["evidence"] is not None:
                ev_path = out / f"{mod.NAME}_evidence.csv"
                atomic_write_text(ev_path, _csv_text(judged["evidence"]))
                files.append(ev_path)
        except ImportError as exc:  # an optional extra (e.g. `train`: transformers + MiniLM) is missing
            log.warning("%s skipped: %s", mod.NAME, exc)
            entries.append(_entry(mod, status="skipped", seconds=time.perf_counter() - t0, skipped=str(exc),
                                  settings=settings, links=_links(mod, out, [])))
            _write_report(out, entries, prov, complete=False)
            continue
        except Exception as exc:  # keep what finished; report this one as an error and go on
            log.error("%s failed:\n%s", mod.NAME, traceback.format_exc())
            entries.append(_entry(mod, status="error", seconds=secs if secs is not None else time.perf_counter() - t0,
                                  error=f"{type(exc).__name__}: {exc}", settings=settings, files=rel,
                                  links=_links(mod, out, rel)))
            _write_report(out, entries, prov, complete=False)
            continue
        for p in judged["problems"]:
            log.warning("%s: %s", mod.NAME, p)
        rel = [str(f.relative_to(out)) for f in files]
        entries.append(_entry(mod, seconds=secs, rows=len(rows), files=rel, settings=settings,
                              links=_links(mod, out, rel), **judged))
        _write_report(out, entries, prov, complete=False)
    _write_report(out, entries, prov, complete=True)
    return entries


def _write_report(out: Path, entries: list[dict], prov: dict, *, complete: bool) -> None:
    from .. import __version__

    out.mkdir(parents=True, exist_ok=True)
    title = f"lowrank_theory {__version__}: reproduced figures"
    meta = dict(scale=prov["scale"], backend=prov["backend"], device=prov["device"]["requested"], seed=prov["seed"])
    atomic_write_text(out / "summary.json", json.dumps(dict(meta=meta, complete=complete, provenance=prov,
                                                            experiments=entries), indent=1, default=str))
    atomic_write_text(out / "report.md", render_markdown(entries, prov, title=title, complete=complete))
    atomic_write_text(out / "index.html", render_html(entries, prov, title=title, complete=complete))

