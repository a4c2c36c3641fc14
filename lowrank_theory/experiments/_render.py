"""Render a run's summaries and provenance as ``index.html`` and ``report.md``.

Input: the entries :func:`~lowrank_theory.experiments.report.run_experiments` builds (one dict
per experiment, see there) and :func:`._provenance.collect`'s dict.  Pure string building; the
caller writes the files.
"""

from __future__ import annotations

import html
import math
from typing import Any

__all__ = ["STATUS_TEXT", "fmt", "render_html", "render_markdown"]

#: status -> (short label, colour)
STATUS_TEXT = {"holds": ("claim holds", "#1a7f37"), "partly": ("claim holds partly", "#9a6700"),
               "fails": ("CLAIM DOES NOT HOLD", "#cf222e"), "skipped": ("skipped", "#6e7781"),
               "error": ("ERROR", "#cf222e"), "pending": ("not run yet", "#6e7781")}


def fmt(v: Any) -> str:
    """A number for a table: integers as such, floats to 4 significant digits, NaN as ``nan``."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v.is_integer() and abs(v) < 1e6:
            return str(int(v))
        return f"{v:.4g}"
    return str(v)


def _against(d: dict) -> str:
    """What the reference is, unless it is just the number itself."""
    return "" if d["against"] == fmt(d["reference"]) else d["against"]


def _secs(v: float) -> str:
    return f"{v:.1f}"


def _tol(d: dict) -> str:
    t = fmt(float(d["tol"])) if d["tol"] else "0"
    return f"{t} ({d['tol_text']})" if d.get("tol_text") else t


def _status_line(e: dict) -> str:
    label = STATUS_TEXT[e["status"]][0]
    if e["status"] == "fails":
        return f"{label}: {len(e['problems'])} failing comparison(s)"
    if e["status"] == "partly":
        n = sum(1 for d in e["deciding"] or [] if not d["asserted"] and d["cases_holding"] < d["cases"])
        return f"{label}: every checked part holds; {n} reported finding(s) not reproduced (marked ✗ below)"
    if e["status"] == "skipped":
        return f"{label}: {e['skipped']}"
    if e["status"] == "error":
        return f"{label}: {e['error']}"
    return label


def _settings_text(e: dict) -> str:
    s = e.get("settings") or {}
    sizes = ", ".join(f"{k}={v}" for k, v in (s.get("sizes") or {}).items())
    return (f"{_secs(e['seconds'])} s wall, {e['rows']} rows; seeds {s.get('seeds')}; computed with "
            f"{s.get('engine')}; sizes: {sizes or '-'}")


_CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:auto;padding:0 1em;color:#1f2328}
table{border-collapse:collapse;margin:.5em 0;font-size:.86em}td,th{border:1px solid #d0d7de;padding:3px 6px;
vertical-align:top}th{background:#f6f8fa;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;color:#fff;font-weight:600}
.small{font-size:.85em;color:#57606a}section{border-top:1px solid #d0d7de;margin-top:2em}
img{max-width:100%;border:1px solid #eee}code{background:#f6f8fa;padding:0 3px}"""


def _links_html(e: dict) -> str:
    parts = []
    for label, href in e.get("links", []):
        parts.append(f"<a href='{html.escape(href)}'>{html.escape(label)}</a>" if href else html.escape(label))
    return " · ".join(parts)


def _deciding_html(e: dict) -> str:
    if e.get("deciding") is None:
        probs = e["problems"]
        body = "".join(f"<li>{html.escape(p)}</li>" for p in probs) or "<li>none</li>"
        return ("<p class='small'>This experiment declares no deciding numbers (no <code>evidence</code> hook); "
                f"the problems its check reported:</p><ul>{body}</ul>")
    head = ("<tr><th></th><th>part of the claim</th><th>deciding case</th><th>ours</th><th>test</th>"
            "<th>reference</th><th>tolerance</th><th>cases that hold</th><th>the paper</th></tr>")
    rows = []
    for d in e["deciding"]:
        ok = d["cases_holding"] == d["cases"]
        mark = "✓" if ok else "✗"
        kind = "checked" if d["asserted"] else "reported"
        rows.append(
            f"<tr><td title='{kind}'>{mark} <span class='small'>{kind}</span></td><td>{html.escape(d['part'])}</td>"
            f"<td>{html.escape(d['case'])}</td>"
            f"<td class='num'>{html.escape(fmt(d['value']))}<br><span class='small'>{html.escape(d['quantity'])}"
            f"</span></td><td>{html.escape(d['op'])}</td>"
            f"<td class='num'>{html.escape(fmt(d['reference']))}<br><span class='small'>"
            f"{html.escape(_against(d))}</span></td><td>{html.escape(_tol(d))}</td>"
            f"<td class='num'>{d['cases_holding']} / {d['cases']}</td><td>{html.escape(d['paper'] or '—')}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _provenance_html(prov: dict, entries: list[dict]) -> str:
    g, v, m, dev = prov["git"], prov["versions"], prov["machine"], prov["device"]
    commit = g["commit"] or "unknown (not a git checkout)"
    if g.get("dirty"):
        commit += " (with uncommitted changes)"
    items = [("started (UTC)", prov["started"]), ("command", prov["command"]),
             ("commit", f"{commit}" + (f" on {g['branch']}" if g.get("branch") else "")),
             ("scale", prov["scale"]), ("--backend", prov["backend"]), ("--seed", prov["seed"]),
             ("device", f"{dev['requested']}: {dev.get('name')}" + (f", CUDA {dev['cuda']}" if dev.get("cuda") else "")
              + f"; torch threads {dev.get('torch_threads')}"),
             ("machine", f"{m['os']}; {m['cpu']}; {m['logical_cpus']} logical CPUs; {m['memory_gib']} GiB"),
             ("versions", ", ".join(f"{k} {val}" for k, val in v.items() if val is not None)),
             ("not installed", ", ".join(k for k, val in v.items() if val is None) or "-")]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(val))}</td></tr>" for k, val in items)
    per = "".join(f"<tr><td>{html.escape(e['name'])}</td><td class='num'>{_secs(e['seconds'])}</td>"
                  f"<td>{html.escape(str((e.get('settings') or {}).get('seeds')))}</td>"
                  f"<td>{html.escape(str((e.get('settings') or {}).get('engine')))}</td></tr>" for e in entries)
    return (f"<h2 id='provenance'>Provenance</h2><table>{rows}</table>"
            f"<table><tr><th>experiment</th><th>wall s</th><th>seeds</th><th>computed with</th></tr>{per}</table>")


def render_html(entries: list[dict], prov: dict, *, title: str, complete: bool = True) -> str:
    """The whole ``index.html``: overview table, one section per experiment, provenance."""
    over = []
    for e in entries:
        label, colour = STATUS_TEXT[e["status"]]
        over.append(f"<tr><td><a href='#{e['name']}'>{html.escape(e['title'])}</a></td>"
                    f"<td><span class='badge' style='background:{colour}'>{label}</span></td>"
                    f"<td class='num'>{_secs(e['seconds'])}</td></tr>")
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if not complete:
        parts.append("<p><strong>Incomplete:</strong> the run is still going or stopped early; "
                     "the experiments below are those finished so far.</p>")
    parts.append(f"<p class='small'>scale <code>{prov['scale']}</code> · backend <code>{prov['backend']}</code> · "
                 f"device <code>{html.escape(prov['device']['requested'])}</code> · "
                 f"commit <code>{html.escape(str(prov['git']['commit'])[:12])}</code> · "
                 f"<a href='#provenance'>provenance</a> · <a href='summary.json'>summary.json</a></p>")
    parts.append("<table><tr><th>experiment</th><th>status</th><th>wall s</th></tr>" + "".join(over) + "</table>")
    for e in entries:
        label, colour = STATUS_TEXT[e["status"]]
        parts.append(f"<section id='{e['name']}'><h2>{html.escape(e['title'])}</h2>")
        parts.append(f"<p><em>Claim:</em> {html.escape(e['claim'])}</p>")
        parts.append(f"<p><span class='badge' style='background:{colour}'>{label}</span> "
                     f"{html.escape(_status_line(e).removeprefix(label).lstrip(': '))}</p>")
        if e["status"] not in ("skipped", "error"):
            parts.append(_deciding_html(e))
        parts.append(f"<p class='small'>{_links_html(e)}</p>")
        parts.append(f"<p class='small'>{html.escape(_settings_text(e))}</p>")
        png = next((f for f in e["files"] if f.endswith(".png")), None)
        if png:
            parts.append(f"<img src='{html.escape(png)}' alt='{html.escape(e['name'])} figure'>")
        parts.append("</section>")
    parts.append(_provenance_html(prov, entries))
    return ("<!doctype html><html lang='en'><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            f"<style>{_CSS}</style><body>" + "\n".join(parts) + "</body></html>\n")


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(entries: list[dict], prov: dict, *, title: str, complete: bool = True) -> str:
    """The same content as :func:`render_html` in Markdown (``report.md``)."""
    md = [f"# {title}", ""]
    if not complete:
        md += ["**Incomplete:** the run is still going or stopped early.", ""]
    md += [f"scale `{prov['scale']}`, backend `{prov['backend']}`, device `{prov['device']['requested']}`, "
           f"commit `{str(prov['git']['commit'])[:12]}`", "", "| experiment | status | wall s |", "|---|---|---|"]
    md += [f"| [{_md_cell(e['title'])}](#{e['name']}) | {STATUS_TEXT[e['status']][0]} | {_secs(e['seconds'])} |"
           for e in entries]
    for e in entries:
        md += ["", f"## {e['title']}", f"<a id='{e['name']}'></a>", "", f"*Claim:* {e['claim']}", "",
               f"**{_status_line(e)}**", ""]
        if e["status"] not in ("skipped", "error"):
            if e.get("deciding") is None:
                md += ["No deciding numbers declared (no `evidence` hook); problems: "
                       + ("; ".join(e["problems"]) or "none"), ""]
            else:
                md += ["| | part of the claim | deciding case | ours | test | reference | tolerance | hold "
                       "| the paper |",
                       "|---|---|---|---|---|---|---|---|---|"]
                for d in e["deciding"]:
                    mark = ("✓" if d["cases_holding"] == d["cases"] else "✗") + (" checked" if d["asserted"]
                                                                                  else " reported")
                    md.append(f"| {mark} | {_md_cell(d['part'])} | {_md_cell(d['case'])} | {fmt(d['value'])} "
                              f"({_md_cell(d['quantity'])}) | {_md_cell(d['op'])} | {fmt(d['reference'])} "
                              f"({_md_cell(_against(d))}) | {_md_cell(_tol(d))} | {d['cases_holding']}/{d['cases']} "
                              f"| {_md_cell(d['paper'] or '—')} |")
                md.append("")
        md.append(" · ".join(f"[{label}]({href})" if href else label for label, href in e.get("links", [])))
        md += ["", _settings_text(e), ""]
        png = next((f for f in e["files"] if f.endswith(".png")), None)
        if png:
            md += [f"![{e['name']}]({png})", ""]
    g, v, m, dev = prov["git"], prov["versions"], prov["machine"], prov["device"]
    md += ["## Provenance", "", f"- started (UTC): {prov['started']}", f"- command: `{prov['command']}`",
           f"- commit: {g['commit']}{' (with uncommitted changes)' if g.get('dirty') else ''}"
           + (f" on {g['branch']}" if g.get("branch") else ""),
           f"- scale {prov['scale']}, --backend {prov['backend']}, --seed {prov['seed']}",
           f"- device: {dev['requested']}: {dev.get('name')}; torch threads {dev.get('torch_threads')}",
           f"- machine: {m['os']}; {m['cpu']}; {m['logical_cpus']} logical CPUs; {m['memory_gib']} GiB",
           "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None),
           "- not installed: " + (", ".join(k for k, val in v.items() if val is None) or "-"), ""]
    md += ["| experiment | wall s | seeds | computed with |", "|---|---|---|---|"]
    md += [f"| {e['name']} | {_secs(e['seconds'])} | {(e.get('settings') or {}).get('seeds')} | "
           f"{_md_cell((e.get('settings') or {}).get('engine'))} |" for e in entries]
    return "\n".join(md) + "\n"
