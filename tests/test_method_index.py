"""The per-method index (``lowrank_theory.method_index``): complete, true to the code, and ``docs/methods.md``
current.  Each declared fact is checked against an independent source: the registry, ``param_count``, the
files on disk, the installed PEFT, ``export_peft``."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank_theory import adapters, method_index
from lowrank_theory.cli import main
from lowrank_theory.training.cli_train import method_names
from lowrank_theory.training.optim import RULES

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methods.md"


def test_docs_methods_md_is_current():
    """CI's check that the checked-in page is what the index generates."""
    assert DOC.read_text(encoding="utf-8") == method_index.methods_markdown(), (
        "docs/methods.md is stale: run `python -m lowrank_theory.method_index docs/methods.md`")


def test_index_covers_every_adapter_method_and_rule():
    assert set(method_index.names("adapter")) == set(adapters.names())
    assert set(method_names()) <= set(method_index.names())  # every `train --method` name
    assert set(RULES) == set(method_index.names("rule"))  # every `train --rule` name


@pytest.mark.parametrize("name", method_index.names())
def test_declared_files_exist_and_are_about_the_method(name):
    e = method_index.entry(name)
    assert e.tests, f"{name} names no test"
    aliases = {name, {"lora+": "lora_plus", "loca": "dct", "qwha": "wht"}.get(name, name)}
    if e.kind == "adapter":
        aliases.add(adapters.get(name).__name__)
    if e.kind in ("rule", "tool"):
        aliases.add(e.extra["impl"].rsplit(".", 1)[1])
    for path in (*e.tests, *e.proofs, *e.notebooks):
        assert (ROOT / path).is_file(), path
    for path in e.tests:
        text = (ROOT / path).read_text()
        assert any(a in text for a in aliases), f"{path} does not mention {name}"
    for path in e.notebooks:
        if path == method_index.NB_COMPLEXITY:
            continue  # measures every registered adapter by name from the registry
        text = (ROOT / path).read_text()
        exp = re.search(r"experiments import (\w+)", text).group(1)
        text += (ROOT / "lowrank_theory" / "experiments" / f"{exp}.py").read_text()
        assert any(a in text for a in aliases), f"{path} does not use {name}"
    if e.paper.arxiv:
        assert re.fullmatch(r"\d{4}\.\d{4,5}", e.paper.arxiv)


@pytest.mark.parametrize("name", [n for n in method_index.names("adapter") if method_index.entry(n).params])
@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(4, 700), d_in=st.integers(4, 700), k=st.integers(1, 4))
def test_declared_parameter_count_formula_matches_param_count(name, d_out, d_in, k):
    """The formula ``info`` prints is the one ``param_count`` computes, at the defaults and with the size
    argument scaled by ``k``."""
    cls = adapters.get(name)
    assert method_index.param_count_from_formula(name, d_out, d_in) == cls.param_count(d_out, d_in)
    sig = inspect.signature(cls.param_count).parameters
    size = next((a for a in ("rank", "ranks", "n_frequency", "num_basis_a", "d") if a in sig), None)
    if size is not None:
        v = max(1, sig[size].default // k) if size != "ranks" else k
        assert method_index.param_count_from_formula(name, d_out, d_in, **{size: v}) == \
            cls.param_count(d_out, d_in, **{size: v})


def test_peft_counterparts_exist_in_the_installed_peft():
    peft = pytest.importorskip("peft")
    for name in method_index.names():
        e = method_index.entry(name)
        if not e.peft.startswith("peft."):
            continue
        head = e.peft.split(" ")[0]
        dotted, _, call = head.partition("(")
        obj = peft
        for part in dotted.split(".")[1:]:  # a submodule (peft.optimizers) is imported on the way
            obj = getattr(obj, part, None) or importlib.import_module(f"{obj.__name__}.{part}")
        if call:  # e.g. LoraConfig(use_dora=True): the keyword is a field of the config
            key, _, value = call.rstrip(")").partition("=")
            assert key in {f.name for f in dataclasses.fields(obj)}, e.peft
            obj(**{key: eval(value)}, target_modules=["q"])  # the value is accepted
        assert e.peft_test or e.kind == "rule", f"{name}: a PEFT counterpart of an adapter names its test"
        if e.peft_test:
            text = (ROOT / e.peft_test).read_text()
            assert "peft" in text and dotted.split(".")[-1] in text, (name, e.peft_test)


@pytest.mark.parametrize("name, exports", [("lora", True), ("dora", True), ("vera", True), ("loca", False)])
def test_export_column_matches_export_peft(name, exports, tmp_path):
    from lowrank_theory.training.injection import inject
    from lowrank_theory.training.peft_format import export_peft

    model = nn.Sequential()
    model.add_module("q", nn.Linear(16, 16))
    torch.manual_seed(0)
    cfg = {"n_frequency": 8} if name == "loca" else {"rank": 2}
    inject(model, name, ["q"], **cfg)
    said = "PEFT's format, peft_type" in method_index.describe(name)["export"]
    assert said is exports
    if exports:
        assert (export_peft(model, tmp_path / name) / "adapter_config.json").is_file()
    else:
        with pytest.raises(ValueError, match="PEFT has no counterpart of 'loca'; the methods that export are"):
            export_peft(model, tmp_path / name)


def test_info_name_prints_the_index_entry(capsys):
    assert main(["info", "loca"]) == 0
    out = capsys.readouterr().out
    for label in ("paper", "formula", "class", "file", "parameters", "tests", "proofs", "notebooks", "PEFT",
                  "export"):
        assert re.search(rf"^\s+{label}\s", out, flags=re.M), label
    assert "2502.06820" in out and "lowrank_theory/adapters/loca_locations.py" in out
    assert "n_frequency" in out and "proofs/07-loca-idct-vs-idft.md" in out and "ΔW" in out
    assert main(["info", "lorapro", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "rule" and d["cls"].endswith("LoRAPro") and d["file"].endswith("optim_projected.py")


def test_info_unknown_name_is_one_error_line(capsys):
    assert main(["info", "no-such-method"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lowrank-theory info: error:") and "increlora" in err[0]


def test_each_adapter_class_declares_its_entry_and_a_double_declaration_is_refused(monkeypatch):
    """Every registered adapter carries ``index_entry`` on its own class (not inherited); declaring a name
    on the class and in ``DECLARED`` at once, or an entry for another name, is an error."""
    for name in adapters.names():
        own = adapters.get(name).__dict__.get("index_entry")
        assert own is not None and own.name == name and method_index.entry(name) is own, name
    cls = adapters.get("vera")
    monkeypatch.setitem(method_index.DECLARED, "vera", cls.index_entry)
    with pytest.raises(RuntimeError, match="declared both"):
        method_index.names()
    monkeypatch.delitem(method_index.DECLARED, "vera")
    monkeypatch.setattr(cls, "index_entry", dataclasses.replace(cls.index_entry, name="lora"))
    with pytest.raises(RuntimeError, match="not the adapter 'vera'"):
        method_index.names()
