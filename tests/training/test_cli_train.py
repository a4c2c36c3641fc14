"""``lowrank-theory train`` end to end through ``lowrank_theory.cli.main`` at a tiny size (tiny GPT-2)."""

from __future__ import annotations

import csv
import json

import pytest
from safetensors.torch import load_file

from lowrank_theory.adapters.adaptive_rank import AdaLoRA
from lowrank_theory.adapters.lowrank import LoRA
from lowrank_theory.cli import main

TINY = ["train", "--model", "tiny-gpt2", "--max-length", "8", "--batch-size", "8", "--no-progress", "--seed", "1"]


def test_single_run_prints_a_summary_and_writes_its_files(tmp_path, capsys):
    out = tmp_path / "run"
    code = main([*TINY, "--task", "teacher-lowrank", "--method", "lora", "--rank", "2", "--steps", "12",
                 "--lr", "0.02", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    row = json.loads((out / "summary.json").read_text())
    for text in ("method lora", "loss:", "trainable params", "time", "peak RSS"):
        assert text in printed
    # the summary's numbers are those of the run: LoRA rank 2 on h.1.attn.c_proj (64x64) and h.1.mlp.c_proj (64x256)
    assert row["trainable_params"] == LoRA.param_count(64, 64, rank=2) + LoRA.param_count(64, 256, rank=2)
    assert row["metric"] == "loss" and row["value"] < row["start_value"] and row["steps"] == 12
    assert len(row["losses"]) == 12 and row["losses"][-1] == pytest.approx(row["train_loss"])
    lines = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in lines if r["loss"]] == list(range(1, 13))
    state = load_file(str(out / "checkpoint" / "adapters.safetensors"))
    assert sum(t.numel() for t in state.values()) == row["trainable_params"]


def test_compare_writes_table_json_and_figure(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main([*TINY, "--task", "docstrings", "--compare", "lora,vera,adalora", "--steps", "6", "--rank", "2",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["lora", "vera", "adalora"]
    data = json.loads((out / "compare.json").read_text())
    assert [d["method"] for d in data] == ["lora", "vera", "adalora"]
    for r, d in zip(rows, data):
        assert r["metric"] == "accuracy" and 0.0 <= float(r["value"]) <= 1.0
        assert float(r["baseline"]) == pytest.approx(d["baseline"]) and int(r["trainable_params"]) > 0
        assert r["method"] in printed
    assert data[2]["schedule"] == "adalora"  # AdaLoRA gets its rank schedule by default
    head = 64 * 5 + 5
    start = sum(AdaLoRA.param_count(m, n, rank=2) for m, n in [(192, 64), (64, 64), (256, 64), (64, 256)] * 2)
    assert data[2]["trainable_params"] < start + head  # ... which really pruned
    assert (out / "compare.png").stat().st_size > 1000
    assert "table:" in printed and "baseline accuracy" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--method", "nope"], "unknown method"), (["--method", "lora", "--cfg", "bogus=1"], "takes no argument"),
     (["--method", "lora", "--cfg", "noequals"], "key=value"), (["--task", "nope"], "task must be one of")],
)
def test_bad_arguments_exit_with_a_message(tmp_path, capsys, args, message):
    base = [*TINY, "--task", "teacher-lowrank", "--steps", "1", "--out", str(tmp_path)]
    assert main(base + args) == 2
    assert message in capsys.readouterr().err
