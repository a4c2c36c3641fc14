"""Run experiments and write their tables, figures and one report (``index.html`` + ``report.md``)."""

from __future__ import annotations

import csv
import html
import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import load, names

__all__ = ["run_experiments", "write_table"]

log = logging.getLogger(__name__)


def write_table(rows: list[dict], stem: Path) -> list[Path]:
    """Write ``rows`` as ``stem.csv`` and ``stem.json``; return both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=float))
    return [stem.with_suffix(".csv"), stem.with_suffix(".json")]


def run_experiments(selected: list[str] | None, out: str | Path, *, scale: str = "quick", backend: str = "numpy",
                    device: str = "cpu", seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Run the ``selected`` experiments (all when None) and write everything under ``out``.

    Returns one summary dict per experiment: name, seconds, number of rows, the files written,
    and ``problems`` -- the claim's check on the numbers (empty when the claim holds).
    """
    if scale not in ("quick", "full"):
        raise ValueError(f"scale must be 'quick' or 'full', got {scale!r}")
    out = Path(out)
    todo = selected or names()
    mods = [load(n) for n in todo]
    summaries = []
    bar = tqdm(mods, desc="reproduce", unit="experiment", disable=not progress)
    for mod in bar:
        bar.set_postfix_str(mod.NAME)
        t0 = time.perf_counter()
        try:
            rows = mod.run(scale, backend=backend, device=device, seed=seed)
        except ImportError as exc:  # an optional extra (e.g. `train`: transformers + MiniLM) is missing
            log.warning("%s skipped: %s", mod.NAME, exc)
            summaries.append(dict(name=mod.NAME, title=mod.TITLE, claim=mod.CLAIM, seconds=time.perf_counter() - t0,
                                  rows=0, files=[], problems=[], skipped=str(exc)))
            continue
        secs = time.perf_counter() - t0
        stem = out / mod.NAME
        files = write_table(rows, stem) + mod.plot(rows, stem)
        problems = mod.check(rows)
        for p in problems:
            log.warning("%s: %s", mod.NAME, p)
        summaries.append(dict(name=mod.NAME, title=mod.TITLE, claim=mod.CLAIM, seconds=secs, rows=len(rows),
                              files=[str(f.relative_to(out)) for f in files], problems=problems))
    _write_report(out, summaries, scale=scale, backend=backend, device=device)
    return summaries


def _write_report(out: Path, summaries: list[dict], **meta: Any) -> None:
    from .. import __version__

    (out / "summary.json").write_text(json.dumps(dict(meta=meta, experiments=summaries), indent=1))
    md = [f"# lowrank_theory {__version__} — reproduced figures", "",
          f"scale `{meta['scale']}`, backend `{meta['backend']}`, device `{meta['device']}`", ""]
    parts = [f"<h1>lowrank_theory {html.escape(__version__)} — reproduced figures</h1>",
             f"<p>scale <code>{meta['scale']}</code>, backend <code>{meta['backend']}</code>, "
             f"device <code>{meta['device']}</code></p>"]
    for s in summaries:
        if s.get("skipped"):
            md += [f"## {s['title']}", "", f"*Skipped:* {s['skipped']}", ""]
            parts += [f"<h2>{html.escape(s['title'])}</h2>", f"<p><em>Skipped:</em> {html.escape(s['skipped'])}</p>"]
            continue
        status = "claim holds" if not s["problems"] else "CLAIM FAILS: " + "; ".join(s["problems"])
        png = next(f for f in s["files"] if f.endswith(".png"))
        md += [f"## {s['title']}", "", f"*Claim:* {s['claim']}", "", f"**{status}** ({s['seconds']:.1f} s, "
               f"{s['rows']} rows: [{s['name']}.csv]({s['name']}.csv))", "", f"![{s['name']}]({png})", ""]
        parts += [f"<h2>{html.escape(s['title'])}</h2>", f"<p><em>Claim:</em> {html.escape(s['claim'])}</p>",
                  f"<p><strong>{html.escape(status)}</strong> ({s['seconds']:.1f} s, {s['rows']} rows: "
                  f"<a href='{s['name']}.csv'>{s['name']}.csv</a>)</p>",
                  f"<img src='{png}' style='max-width:100%'>"]
    (out / "report.md").write_text("\n".join(md))
    (out / "index.html").write_text("<!doctype html><meta charset='utf-8'><title>lowrank_theory report</title>"
                                    "<body style='font-family:sans-serif;max-width:1100px;margin:auto'>"
                                    + "\n".join(parts) + "</body>")
