"""The README's code example runs and its commented claims hold."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_and_its_claims_hold():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    ns: dict = {}
    exec(compile(blocks[0], str(README), "exec"), ns)
    torch, adapters = ns["torch"], ns["adapters"]
    assert type(ns["U"]).__module__.startswith("numpy") and isinstance(ns["Ut"], torch.Tensor)
    assert torch.equal(ns["layer"](ns["x"]), ns["base"](ns["x"]))  # unmerge restored identity (ΔW = 0)
    assert ns["layer"].adapter.num_trainable == adapters.get("loca").param_count(512, 256, n_frequency=64)


def test_readme_quick_start_matches_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "lowrank-theory reproduce --quick" in text
    test_cmd = re.search(r'pip install -e "\.\[test\]" && (.+)$', text, flags=re.M).group(1).strip()
    assert test_cmd in ci.splitlines()


def _block(start: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if start in b]
    assert len(found) == 1, f"README must have one python block containing {start!r}"
    return found[0]


def test_readme_checker_example_passes_every_check(capsys):
    code = _block("from lowrank_theory.testing import check_adapter")
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("check_adapter(<lambda>): 0 failed, 15 passed, 1 skipped"), out
    shown = re.search(r"```\n(check_adapter\(<lambda>\).*?)```", README.read_text(), flags=re.S).group(1)
    for line in shown.splitlines():  # every line the README shows is what the code prints
        if line.strip() != "...":
            assert line in out, line


def test_readme_named_adapter_example_gives_back_the_plain_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ns: dict = {}
    exec(compile(_block("merge_and_unload"), str(README), "exec"), ns)
    assert list(ns["plain"].state_dict()) == ns["keys"]
    assert (tmp_path / "runs/adapters/adapter_config.json").is_file()
    assert (tmp_path / "runs/adapters/style/adapter_config.json").is_file()
    out = capsys.readouterr().out
    shown = re.search(r"```\n(layer\s+adapter\s+method.*?)```", README.read_text(), flags=re.S).group(1)
    for line in shown.splitlines():
        if line.strip() != "...":
            assert line in out, line
