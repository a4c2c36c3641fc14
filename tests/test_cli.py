"""The console script end to end: ``info`` and ``reproduce --quick`` on a subset of experiments."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from lowrank_theory import adapters
from lowrank_theory.cli import main
from lowrank_theory.experiments import names


def test_info_json_lists_backends_and_every_registered_method(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["adapters"] == adapters.names()
    assert "numpy" in json.dumps(data) and "torch" in json.dumps(data)
    assert "truncated_svd" in data["linalg"]


def test_reproduce_quick_subset_writes_every_promised_file(tmp_path, capsys):
    out = tmp_path / "report"
    subset = ["regimes", "limits"]
    assert main(["reproduce", *subset, "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [e["name"] for e in summary["experiments"]] == subset
    assert summary["meta"]["scale"] == "quick"
    for e in summary["experiments"]:
        assert e["problems"] == [] and e["rows"] > 0
        assert f"{e['name']}" in printed and "ok" in printed
        for suffix in (".csv", ".json", ".png", ".svg"):
            f = out / f"{e['name']}{suffix}"
            assert f.is_file() and f.stat().st_size > 0, f
        rows = json.loads((out / f"{e['name']}.json").read_text())
        assert len(rows) == e["rows"]
    html = (out / "index.html").read_text()
    md = (out / "report.md").read_text()
    for e in subset:
        assert f"{e}.png" in html and f"{e}.png" in md


def test_reproduce_unknown_experiment_is_refused(tmp_path, capsys):
    assert main(["reproduce", "no-such-figure", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no-such-figure" in err and all(n in err for n in names())
    assert not any(tmp_path.iterdir())


def test_bad_option_exits_with_usage_error():
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--backend", "jax"])
    assert e.value.code == 2


def test_console_script_is_installed():
    exe = shutil.which("lowrank-theory")
    cmd = [exe] if exe else [sys.executable, "-m", "lowrank_theory.cli"]
    res = subprocess.run([*cmd, "info"], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "lowrank_theory" in res.stdout and "lora" in res.stdout


def test_experiment_needing_a_missing_extra_is_skipped_not_crashed(tmp_path, capsys, monkeypatch):
    from lowrank_theory.experiments import load

    mod = load("regimes")

    def missing(*args, **kwargs):
        raise ImportError("needs `pip install lowrank_theory[train]`")

    monkeypatch.setattr(mod, "run", missing)
    out = tmp_path / "r"
    assert main(["reproduce", "regimes", "limits", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "lowrank_theory[train]" in printed
    summary = json.loads((out / "summary.json").read_text())
    reg, lim = summary["experiments"]
    assert reg["skipped"] and reg["rows"] == 0 and not (out / "regimes.png").exists()
    assert lim["rows"] > 0 and (out / "limits.png").is_file()
    assert "Skipped" in (out / "report.md").read_text()
