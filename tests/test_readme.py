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
