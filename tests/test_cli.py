"""The console script end to end: ``info``, ``reproduce --quick`` on a subset, the help texts, and every
option mistake refused with one ``error:`` line and exit status 2 before anything is computed or written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowrank_theory import adapters
from lowrank_theory.cli import main
from lowrank_theory.experiments import EXPERIMENTS, names
from lowrank_theory.training import cli_train


def test_info_json_lists_backends_and_every_registered_method(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["adapters"] == adapters.names()
    assert "numpy" in json.dumps(data) and "torch" in json.dumps(data)
    assert "truncated_svd" in data["linalg"]


def test_info_lists_every_name_train_method_accepts(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"increlora", "squeeze"} <= set(data["methods"])
    assert set(adapters.names()) | set(cli_train.METHOD_DEFAULTS) == set(data["methods"])
    for m in data["methods"]:  # each listed name is accepted by train's own check
        assert cli_train._method_spec(m)["adapter"] in adapters.names()
    assert "lorapro" in data["rules"]


def test_reproduce_quick_subset_writes_every_promised_file(tmp_path, capsys):
    out = tmp_path / "report"
    subset = ["regimes", "limits"]
    assert main(["reproduce", *subset, "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [e["name"] for e in summary["experiments"]] == subset
    assert summary["meta"]["scale"] == "quick" and summary["complete"] is True
    for e in summary["experiments"]:
        assert e["problems"] == [] and e["rows"] > 0 and e["status"] == "holds"
        assert any(line.startswith(e["name"]) and line.endswith("holds") for line in printed.splitlines())
        for suffix in (".csv", ".json", ".png", ".svg", "_evidence.csv"):
            f = out / f"{e['name']}{suffix}"
            assert f.is_file() and f.stat().st_size > 0, f
        rows = json.loads((out / f"{e['name']}.json").read_text())
        assert len(rows) == e["rows"]
    html = (out / "index.html").read_text()
    md = (out / "report.md").read_text()
    for e in subset:
        assert f"{e}.png" in html and f"{e}.png" in md
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporary files


def test_reproduce_unknown_experiment_is_refused(tmp_path, capsys):
    assert main(["reproduce", "no-such-figure", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no-such-figure" in err and all(n in err for n in names())
    assert not any(tmp_path.iterdir())


def test_bad_option_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--backend", "jax"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "jax" in err[0]


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
    assert reg["skipped"] and reg["status"] == "skipped" and reg["rows"] == 0 and not (out / "regimes.png").exists()
    assert lim["rows"] > 0 and (out / "limits.png").is_file()
    assert "skipped" in (out / "report.md").read_text()


# ============================================================================ help texts
def test_help_lists_the_experiments_and_only_real_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = capsys.readouterr().out
    assert all(n in text for n in EXPERIMENTS)
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "bench" not in top and all(c in top for c in ("info", "reproduce", "train"))
    with pytest.raises(SystemExit) as e:
        main(["bench"])
    assert e.value.code == 2


def test_train_help_has_no_sphinx_markup_and_lists_the_methods(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for markup in ("``", ":data:", ":func:", ":class:", "::\n"):
        assert markup not in text, markup
    assert "increlora" in text and "squeeze" in text and "METHOD_DEFAULTS" in text


# ============================================================================ mistakes: exit 2 before any work
def _no_work(monkeypatch):
    """Make every entry point of real work fail loudly, so a test proves nothing was computed."""
    def boom(*a, **k):
        raise AssertionError("work started despite a bad option")

    import lowrank_theory.experiments.report as report

    monkeypatch.setattr(report, "run_experiments", boom)
    monkeypatch.setattr(cli_train, "run_one", boom)
    monkeypatch.setattr(cli_train, "compare", boom)


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits: use /sys there)."""
    if os.geteuid() == 0:
        return Path("/sys/lrt-no-write")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    return d / "out"


def _cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, a phrase the error line must contain)."""
    f = tmp_path / "a-file"
    f.write_text("finished work\n")
    ro = _unwritable(tmp_path)
    new = str(tmp_path / "never-created")
    nocfg = tmp_path / "empty-model"
    nocfg.mkdir()
    return {
        "reproduce --out is a file": (["reproduce", "regimes", "--out", str(f)], "is a file"),
        "reproduce --out below a file": (["reproduce", "regimes", "--out", str(f / "sub")], "is a file"),
        "reproduce --out not writable": (["reproduce", "regimes", "--out", str(ro)], "not writable"),
        "reproduce --device cuda": (["reproduce", "regimes", "--device", "cuda", "--out", new], "no CUDA device"),
        "reproduce --device nonsense": (["reproduce", "regimes", "--device", "tpu9", "--out", new], "--device"),
        "reproduce --backend cupy": (["reproduce", "gradients", "--backend", "cupy", "--out", new], "CuPy"),
        "reproduce duplicated name": (["reproduce", "regimes", "regimes", "--out", new], "more than once"),
        "train --out is a file": (["train", "--out", str(f)], "is a file"),
        "train --out not writable": (["train", "--out", str(ro)], "not writable"),
        "train --device cuda": (["train", "--device", "cuda", "--out", new], "no CUDA device"),
        "train --model not found": (["train", "--model", "no-such-org/no-such-model", "--out", new],
                                    "not found offline"),
        "train --model folder without config": (["train", "--model", str(nocfg), "--out", new], "config.json"),
        "train --compare empty": (["train", "--compare", "", "--out", new], "--compare needs"),
        "train --compare only commas": (["train", "--compare", " , ", "--out", new], "--compare"),
        "train --compare duplicated": (["train", "--compare", "lora,dora,lora", "--out", new], "more than once"),
        "train --method with --compare": (["train", "--method", "lora", "--compare", "lora,dora", "--out", new],
                                          "not both"),
        "train unknown method": (["train", "--method", "no-such-method", "--out", new], "increlora"),
        "train unknown rule": (["train", "--rule", "adam2", "--out", new], "--rule"),
        "train unknown task": (["train", "--task", "no-such-task", "--out", new], "--task"),
        "train --steps 0": (["train", "--steps", "0", "--out", new], "steps"),
        "train --resume without checkpoint": (["train", "--resume", "--out", new], "--resume"),
    }


CASE_NAMES = ["reproduce --out is a file", "reproduce --out below a file", "reproduce --out not writable",
              "reproduce --device cuda", "reproduce --device nonsense", "reproduce --backend cupy",
              "reproduce duplicated name", "train --out is a file", "train --out not writable", "train --device cuda",
              "train --model not found", "train --model folder without config", "train --compare empty",
              "train --compare only commas", "train --compare duplicated", "train --method with --compare",
              "train unknown method", "train unknown rule", "train unknown task", "train --steps 0",
              "train --resume without checkpoint"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_mistake_is_one_error_line_exit_2_and_nothing_done(case, tmp_path, monkeypatch, capsys):
    import lowrank_theory.backend as backend

    _no_work(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    monkeypatch.setattr(backend, "cupy_available", lambda: False)
    argv, phrase = _cases(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    file_text = (tmp_path / "a-file").read_text()
    assert main(argv) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith(f"lowrank-theory {argv[0]}: error: ") and phrase in lines[0], lines[0]
    assert cap.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder, no stray file
    assert (tmp_path / "a-file").read_text() == file_text  # the file given as --out is untouched


def test_every_case_is_tested(tmp_path):
    assert sorted(_cases(tmp_path)) == sorted(CASE_NAMES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real `--device cuda` error needs a machine without CUDA")
def test_subprocess_exit_code_of_mistakes(tmp_path):
    """The console script's exit status and stderr, as a shell sees them (one run per subcommand)."""
    f = tmp_path / "a-file"
    f.write_text("x")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for argv, phrase in ((["reproduce", "--out", str(f)], "is a file"),
                         (["train", "--compare", "lora,lora", "--out", str(tmp_path / "o")], "more than once"),
                         (["train", "--device", "cuda", "--out", str(tmp_path / "o")], "no CUDA device")):
        res = subprocess.run([sys.executable, "-m", "lowrank_theory.cli", *argv], capture_output=True, text=True,
                             timeout=120, check=False, env=env)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and phrase in lines[0], res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_model_check_accepts_what_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cli_train.check_model("tiny-gpt2")
    (tmp_path / "config.json").write_text("{}")
    cli_train.check_model(str(tmp_path))  # a local model folder
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(cli_train, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ValueError, match="the hub is unreachable"):
        cli_train.check_model("no-such-org/no-such-model")


# ============================================================================ torchrun: rank 0 prints
FAKE_ROW = dict(task="docstrings", model="minilm", method="lora", schedule="", metric="accuracy", value=0.9,
                start_value=0.2, baseline=0.19, eval_loss=0.3, train_loss=0.2, trainable_params=100, steps=1,
                seconds=0.1, peak_memory_mb=1.0, device="cpu")


@pytest.mark.parametrize("rank, prints", [("0", True), ("1", False), ("3", False)])
def test_only_rank_0_prints_the_summary(rank, prints, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(cli_train, "check_model", lambda name: None)
    monkeypatch.setattr(cli_train, "run_one", lambda method, args, out: dict(FAKE_ROW, method=method))
    monkeypatch.setattr(cli_train, "compare", lambda methods, args, out: [dict(FAKE_ROW, method=m) for m in methods])
    assert main(["train", "--out", str(tmp_path / "a")]) == 0
    assert main(["train", "--compare", "lora,dora", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert ("accuracy" in out and "dora" in out) is prints
    assert (out == "") is not prints


def test_only_rank_0_prints_the_reproduce_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert main(["reproduce", "regimes", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert capsys.readouterr().out == ""
    assert (tmp_path / "r" / "index.html").is_file()  # every rank still writes (the same) files


# ============================================================================ compare: budgets
def test_compare_table_says_when_budgets_differ(capsys):
    rows = [dict(FAKE_ROW, method="lora", trainable_params=333_701), dict(FAKE_ROW, method="loca",
                                                                          trainable_params=37_925)]
    note = cli_train.budget_note(rows)
    assert "333,701" in note and "37,925" in note and f"{333_701 / 37_925:.1f}x" in note
    assert cli_train.budget_note([dict(FAKE_ROW, trainable_params=1000), dict(FAKE_ROW, trainable_params=1050)]) is None
    cli_train._print_table(rows)
    assert "budgets differ" in capsys.readouterr().out
