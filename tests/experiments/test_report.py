"""The report: deciding numbers (Evidence), provenance, links, statuses, fallbacks, and no lost work."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowrank_theory import experiments
from lowrank_theory.backend import cupy_available
from lowrank_theory.cli import main
from lowrank_theory.experiments import EXPERIMENTS, load
from lowrank_theory.experiments._evidence import OPS, Evidence, problems, status, worst_per_part
from lowrank_theory.experiments._plot import plt, save
from lowrank_theory.experiments._provenance import experiment_settings
from lowrank_theory.experiments._render import fmt
from lowrank_theory.experiments.report import run_experiments
from lowrank_theory.preflight import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]


# ============================================================================ Evidence
@pytest.mark.parametrize("v, op, r, tol, holds", [
    (1.0, "<", 2.0, 0.0, True), (2.0, "<", 2.0, 0.0, False), (2.0, "<", 2.0, 1e-9, True),
    (2.0, "<=", 2.0, 0.0, True), (2.1, "<=", 2.0, 0.05, False), (2.1, "<=", 2.0, 0.1, True),
    (3.0, ">", 2.0, 0.0, True), (2.0, ">", 2.0, 0.0, False), (1.95, ">=", 2.0, 0.1, True),
    (1.0, "==", 1.0 + 1e-9, 1e-8, True), (1.0, "==", 1.0 + 1e-7, 1e-8, False),
    (math.nan, "<=", 1.0, 1.0, False), (0.0, ">=", math.nan, 1.0, False),
])
def test_evidence_relation_and_tolerance(v, op, r, tol, holds):
    e = Evidence("part", "case", v, op, r, tol)
    assert e.holds is holds
    assert (e.margin >= 0 if op not in ("<", ">") else e.margin > 0) is holds or math.isnan(v) or math.isnan(r)


@given(v=st.floats(-1e30, 1e30), r=st.floats(-1e30, 1e30), tol=st.floats(0, 1e30), op=st.sampled_from(OPS))
def test_margin_sign_agrees_with_holds(v, r, tol, op):
    """``margin`` (used to pick the deciding case) says "holds" exactly when the comparison holds,
    at any magnitude: non-strict relations hold iff margin >= 0, strict ones iff margin > 0 (up to the
    one rounding of r + tol)."""
    e = Evidence("p", "c", v, op, r, tol)
    m = e.margin
    if op in ("<", ">"):
        assert e.holds == (m > 0) or abs(m) <= 1e-15
    else:
        assert e.holds == (m >= 0) or abs(m) <= 1e-15


def test_evidence_rejects_bad_input():
    with pytest.raises(ValueError, match="op"):
        Evidence("p", "c", 1.0, "=<", 1.0)
    with pytest.raises(ValueError, match="tol"):
        Evidence("p", "c", 1.0, "<", 1.0, -1.0)


def test_status_problems_and_the_deciding_case():
    ev = [Evidence("a", "x", 1.0, "<", 2.0), Evidence("a", "y", 1.9, "<", 2.0),  # y is closest to failing
          Evidence("b", "z", 5.0, "<", 2.0, asserted=False, message="b fails")]
    assert problems(ev) == [] and status(ev) == "partly"
    worst = worst_per_part(ev)
    assert [(w.case, k, n) for w, k, n in worst] == [("y", 2, 2), ("z", 0, 1)]
    ev.append(Evidence("a", "w", 2.5, "<", 2.0, message="a fails at w"))
    assert problems(ev) == ["a fails at w"] and status(ev) == "fails"
    assert worst_per_part(ev)[0][0].case == "w"  # a failing case decides
    assert status(ev[:2]) == "holds"


# ============================================================================ every experiment declares its hooks
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_declares_evidence_papers_notebook_and_proofs(name):
    mod = load(name)
    assert callable(mod.evidence) and callable(mod.check) and callable(mod.plot)
    assert mod.PAPERS and all(re.fullmatch(r"\d{4}\.\d{4,5}", arxiv) for _, arxiv in mod.PAPERS)
    assert (ROOT / mod.NOTEBOOK).is_file()
    nb = (ROOT / mod.NOTEBOOK).read_text()
    assert f"experiments import {name}" in nb
    assert "# **Reading" in nb, f"{mod.NOTEBOOK} has no Reading cell (where we agree with the paper, where not)"
    assert all((ROOT / p).is_file() for p in mod.PROOFS)
    assert hasattr(mod, "ENGINE") or hasattr(mod, "BACKENDS")


@pytest.mark.parametrize("name", ["regimes", "limits"])
def test_check_is_the_failing_asserted_evidence(name):
    mod = load(name)
    rows = mod.run("quick")
    ev = mod.evidence(rows)
    assert mod.check(rows) == problems(ev) == []
    # break one row: the check and the evidence agree on what fails
    key = "ratio" if name == "regimes" else "lowrank_entry_error"
    bad = [dict(r) for r in rows]
    for r in bad:
        r[key] = 1e9 if name == "limits" or r["target"] == "frequency_sparse" else r[key]
    assert mod.check(bad) == problems(mod.evidence(bad)) != []


# ============================================================================ the rendered report
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "out"
    entries = run_experiments(["regimes", "limits"], out, progress=False, argv=["lowrank-theory", "test"])
    return out, entries


def test_report_shows_the_deciding_numbers_with_tolerance_and_paper(report):
    out, entries = report
    html = (out / "index.html").read_text()
    md = (out / "report.md").read_text()
    regimes = load("regimes")
    rows = json.loads((out / "regimes.json").read_text())
    # an independent look at the table: the flat-spectrum ratio at the smaller budget is the worst (largest) one
    flat = max(r["ratio"] for r in rows if r["alpha"] == 0.0)
    for text in (html, md):
        assert fmt(flat) in text and "DCT wins on a flat spectrum" in text
        assert "float64 round-off" in text  # the tolerance says how it was chosen
        assert "https://arxiv.org/abs/2502.06820" in text and regimes.PAPER[:30] in text
        assert "claim holds" in text
    with open(out / "regimes_evidence.csv") as f:
        ev = list(csv.DictReader(f))
    assert len(ev) == len(regimes.evidence(rows)) and all(e["holds"] == "True" for e in ev)
    e = next(x for x in entries if x["name"] == "regimes")
    assert e["status"] == "holds" and all(d["cases_holding"] == d["cases"] for d in e["deciding"])


def test_report_links_resolve_to_files(report):
    out, _ = report
    html = (out / "index.html").read_text()
    hrefs = re.findall(r"href='([^']+)'", html) + re.findall(r"src='([^']+)'", html)
    local = [h for h in hrefs if not h.startswith(("http", "#"))]
    assert any("notebooks/02_loca_regimes.py" in h for h in local)
    assert any("proofs/08-frequency-vs-lowrank-regimes.md" in h for h in local)
    assert any("lowrank_theory/experiments/limits.py" in h for h in local)
    for h in local:
        assert (out / h).resolve().is_file(), h


def test_report_provenance(report):
    out, entries = report
    summary = json.loads((out / "summary.json").read_text())
    prov = summary["provenance"]
    import numpy

    assert prov["versions"]["numpy"] == numpy.__version__ and prov["versions"]["python"] == sys.version.split()[0]
    assert prov["command"] == "lowrank-theory test" and prov["scale"] == "quick" and prov["seed"] == 0
    assert prov["machine"]["logical_cpus"] >= 1 and prov["device"]["requested"] == "cpu"
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", prov["git"]["commit"])
    html = (out / "index.html").read_text()
    for e in entries:
        assert e["settings"]["seeds"] == [0] and "NumPy" in e["settings"]["engine"]
        assert f"{e['seconds']:.1f}" in html
    assert "Provenance" in html and numpy.__version__ in html and "logical CPUs" in html


# ============================================================================ fallbacks, partly, failures, errors
def _fake_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(f"lowrank_theory.experiments._test_{name}")
    mod.NAME, mod.TITLE, mod.CLAIM = name, f"Fake {name}", "x is below 1"
    x = attrs.pop("x", 0.7)
    mod.run = lambda scale="quick", *, backend="numpy", device="cpu", seed=0: [dict(x=0.5), dict(x=x)]

    def plot(rows, path):
        fig, ax = plt.subplots()
        ax.plot([r["x"] for r in rows])
        return save(fig, path)

    mod.plot = plot
    mod.check = lambda rows: [f"x = {r['x']} not below 1" for r in rows if not r["x"] < 1]
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


@pytest.fixture
def fakes(monkeypatch):
    def add(name, **attrs):
        mod = _fake_module(name, **attrs)
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        monkeypatch.setitem(EXPERIMENTS, name, "." + mod.__name__.rsplit(".", 1)[1])
        return mod
    return add


def test_a_module_without_the_new_hooks_still_renders(fakes, tmp_path, capsys):
    fakes("plain")
    assert main(["reproduce", "plain", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    html = (tmp_path / "o" / "index.html").read_text()
    assert "declares no deciding numbers" in html and "claim holds" in html
    assert "(requested)" in html  # the backend it used is not known: say so
    assert "holds" in capsys.readouterr().out


def test_a_failing_claim_is_shown_and_exits_1(fakes, tmp_path, capsys):
    fakes("bad", x=1.5)
    assert main(["reproduce", "bad", "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    html = (tmp_path / "o" / "index.html").read_text()
    assert "CLAIM DOES NOT HOLD" in html and "x = 1.5 not below 1" in html
    assert "DOES NOT HOLD" in capsys.readouterr().out


def test_a_partly_holding_claim_is_shown_as_partly_and_exits_0(fakes, tmp_path, capsys):
    def evidence(rows):
        return [Evidence("x is below 1", f"row {i}", r["x"], "<", 1.0) for i, r in enumerate(rows)] + [
            Evidence("x is below 0.6 as the paper reports", "row 1", rows[1]["x"], "<", 0.6, asserted=False,
                     paper="Fake et al.: 0.55")]

    fakes("part", evidence=evidence, PAPERS=(("Fake", "2501.00001"),))
    assert main(["reproduce", "part", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    html = (tmp_path / "o" / "index.html").read_text()
    md = (tmp_path / "o" / "report.md").read_text()
    assert "claim holds partly" in html and "claim holds partly" in md
    assert "Fake et al.: 0.55" in html and "✗" in html and "0.7" in html
    assert "holds partly" in capsys.readouterr().out


def test_an_error_keeps_the_finished_work(fakes, tmp_path, monkeypatch):
    def explode(*a, **k):
        raise RuntimeError("disk on fire")

    fakes("first")
    fakes("second", run=explode)
    fakes("third")
    out = tmp_path / "o"
    assert main(["reproduce", "first", "second", "third", "--out", str(out), "--no-progress"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [e["status"] for e in summary["experiments"]] == ["holds", "error", "holds"]
    assert "disk on fire" in summary["experiments"][1]["error"] and summary["complete"]
    assert (out / "first.png").is_file() and (out / "third.png").is_file()
    assert "ERROR" in (out / "index.html").read_text()


def test_report_is_current_after_each_experiment(fakes, tmp_path, monkeypatch):
    """A run stopped mid-way (Ctrl-C) leaves a report of what finished, marked incomplete."""
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    fakes("done")
    fakes("stopped", run=interrupt)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        run_experiments(["done", "stopped"], out, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and [e["name"] for e in summary["experiments"]] == ["done"]
    assert "Incomplete" in (out / "index.html").read_text()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    import os

    f = tmp_path / "index.html"
    atomic_write_text(f, "old")

    def fail(src, dst):
        raise OSError("no space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_text(f, "new")
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]


def test_run_experiments_checks_out_before_running(tmp_path, fakes):
    called = []
    fakes("watched", run=lambda *a, **k: called.append(1) or [dict(x=0.1)])
    f = tmp_path / "f"
    f.write_text("keep")
    with pytest.raises(ValueError, match="is a file"):
        run_experiments(["watched"], f, progress=False)
    assert called == [] and f.read_text() == "keep"
    assert experiments.names()  # the registry is intact after the fakes


# ============================================================================ GPU: the backend named is the one used
@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="no CuPy GPU backend")
def test_gradients_really_run_on_cupy(tmp_path, monkeypatch):
    """``--backend cupy`` computes the synthetic steps on CuPy (not NumPy under a "cupy" label), with the
    same numbers as NumPy to float64 round-off."""
    import cupy

    from lowrank_theory.experiments import gradients
    from lowrank_theory.theory import gradients as theory

    seen = []
    real = theory.compare_steps

    def spy(G, *a, **k):
        seen.append(type(G).__module__.split(".")[0])
        return real(G, *a, **k)

    monkeypatch.setattr(gradients, "compare_steps", spy)
    monkeypatch.setitem(gradients.SCALES, "tiny", dict(m=12, n=8, ranks=[1, 2], trials=1, real_ranks=[],
                                                       real_batches=2))
    rows = gradients.run("tiny", backend="cupy")
    ref = gradients.run("tiny", backend="numpy")
    assert set(seen[: len(seen) // 2]) == {"cupy"} and cupy.cuda.runtime.getDeviceCount() > 0
    for a, b in zip(rows, ref):
        # float64 on both sides from the same host-drawn inputs: only the order of reductions differs
        assert a["method"] == b["method"] and a["rel_error"] == pytest.approx(b["rel_error"], rel=1e-10, abs=1e-12)
    assert gradients.check(rows) == []
    assert experiment_settings(gradients, "quick", backend="cupy", device="cpu", seed=0)["engine"] == "cupy"
