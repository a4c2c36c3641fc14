"""The training loop: equivalences that must hold exactly, and real runs that must learn.

* DDP: 2 processes (``torchrun``, gloo, CPU) give the adapter weights of 1 process with the same
  global batch.  Float64 model; the only difference is the order of the gradient sums (rank
  average ``(g_1 + g_2)/2`` vs one mean over 8 examples, each ~1e-16 relative), which AdamW's
  four steps carry through at the same relative size -- compared at ``tol(float64)``.
* Gradient accumulation: 4 micro-batches give the 1-micro-batch step (same argument).
* Resume: an interrupted run continued from its checkpoint equals the uninterrupted run bit for
  bit (same process, same CPU ops, dropout RNG restored), also across an AdaLoRA rank change.
* Real MiniLM: the teacher--student loss falls well below its start and the docstring classifier
  beats the majority-class baseline.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from lowrank_theory.training import adapted_layers, inject
from lowrank_theory.training.perturb import GGPO
from lowrank_theory.training.schedules import AdaLoRASchedule
from lowrank_theory.training.tasks import make_task
from lowrank_theory.training.trainer import TrainConfig, Trainer, lr_factor
from tests.conftest import tol

REPO = Path(__file__).resolve().parents[2]


def tiny_task(dropout: float = 0.0, method: str = "lora", **cfg):
    task = make_task("teacher-lowrank", "tiny-gpt2", model_kw={"dtype": torch.float64, "dropout": dropout},
                     n_train=32, n_test=8, max_length=8)
    inject(task.model, method, task.targets, layer_seeds=True, seed=0, **(cfg or {"rank": 2}))
    return task


def train_tiny(out: str, grad_accum: int = 1, steps: int = 4, stop_after: int | None = None,
               resume: bool = False, rule: str = "sgd") -> dict:
    """Used in-process and by the torchrun / accelerate workers: the same run, any world size.

    Plain SGD by default, not Adam: Adam is invariant to the gradient's scale, so a wrong
    averaging factor over ranks or micro-batches would go unseen.
    """
    torch.set_num_threads(1)
    task = tiny_task()
    cfg = TrainConfig(steps=steps, batch_size=8, grad_accum=grad_accum, lr=0.5 if rule == "sgd" else 1e-2,
                      rule=rule, out_dir=out, progress=False, device="cpu")
    return Trainer(task.model, task.train, task.loss_fn, config=cfg).fit(stop_after=stop_after, resume=resume)


def torchrun(tmp_path: Path, body: str, *args: str, nproc: int = 2) -> None:
    """Run ``body`` (Python, with ``sys.argv[1:] == args``) in ``nproc`` processes under torchrun
    (gloo on the CPU, NCCL on CUDA); on failure show the ranks' own tracebacks."""
    script = tmp_path / f"worker_{abs(hash(body))}.py"
    script.write_text("import sys\nfrom tests.training.test_trainer import train_tiny\n" + body)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script),
           *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    ranks = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank"))
    assert proc.returncode == 0, (ranks or proc.stderr)[-4000:]


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint" / "adapters.safetensors"))


# ============================================================================ pieces
@given(steps=st.integers(1, 50), warmup=st.integers(0, 10), kind=st.sampled_from(["linear", "cosine", "constant"]),
       data=st.data())
def test_lr_factor_closed_forms(steps, warmup, kind, data):
    t = data.draw(st.integers(0, steps - 1))
    got = lr_factor(t, steps, warmup, kind)
    if t < warmup:
        assert got == pytest.approx((t + 1) / warmup)
    elif kind == "constant" or steps <= warmup:
        assert got == 1.0
    elif kind == "linear":
        assert got == pytest.approx(1 - (t - warmup) / (steps - warmup))
    else:
        assert got == pytest.approx((1 + math.cos(math.pi * (t - warmup) / (steps - warmup))) / 2)


def test_config_and_trainer_errors():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0).validate()
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step").validate()
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8").validate()
    m = nn.Linear(3, 2)
    data = {"x": torch.zeros(10, 3)}
    with pytest.raises(ValueError, match="divisible"):
        Trainer(m, data, lambda net, b: net(b["x"]).sum(), config=TrainConfig(batch_size=5, grad_accum=2))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        Trainer(m, data, lambda net, b: net(b["x"]).sum(), config=TrainConfig(batch_size=16))
    with pytest.raises(ValueError, match="first dimension"):
        Trainer(m, {"x": torch.zeros(10, 3), "y": torch.zeros(9)}, lambda net, b: 0)
    with pytest.raises(ValueError, match="eval_fn needs eval_data"):
        Trainer(m, data, lambda net, b: 0, eval_fn=lambda net, d: {}, config=TrainConfig(batch_size=2))


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    train_tiny(str(tmp_path / "a"), grad_accum=1)
    train_tiny(str(tmp_path / "b"), grad_accum=4)
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol(torch.float64))


def test_ddp_two_processes_match_one_process(tmp_path):
    ref = train_tiny(str(tmp_path / "single"))
    body = "s = train_tiny(sys.argv[1], grad_accum=2)\nassert s['world_size'] == 2, s\n"
    torchrun(tmp_path, body, str(tmp_path / "ddp"))
    a, b = adapter_tensors(tmp_path / "single"), adapter_tensors(tmp_path / "ddp")
    assert a.keys() == b.keys() and ref["world_size"] == 1
    moved = False
    for k in a:
        torch.testing.assert_close(b[k], a[k], **tol(torch.float64))
        moved |= bool(a[k].abs().max() > 0) and k.endswith(".B")
    assert moved  # B left zero: the runs really trained
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in rows], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in ref_rows], dtype=torch.float64), **tol(torch.float64))


def test_ddp_interrupted_and_resumed_equals_one_uninterrupted_process(tmp_path):
    """2 ranks stop after 2 of 4 steps (checkpoint: adapters, AdamW state, every rank's RNG), a new
    torchrun resumes: the result equals one process running the 4 steps.  AdamW here, so the
    optimizer state must come back too (a fresh AdamW restarts its bias correction and moments)."""
    train_tiny(str(tmp_path / "single"), rule="adamw")
    out = str(tmp_path / "ddp")
    torchrun(tmp_path, "s = train_tiny(sys.argv[1], rule='adamw', stop_after=2)\nassert s['steps'] == 2, s\n", out)
    torchrun(tmp_path, "s = train_tiny(sys.argv[1], rule='adamw', resume=True)\nassert s['steps'] == 4, s\n", out)
    a, b = adapter_tensors(tmp_path / "single"), adapter_tensors(tmp_path / "ddp")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], **tol(torch.float64))
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the resumed run appended to the log


def test_resume_equals_an_uninterrupted_run_with_dropout(tmp_path):
    def run(out, stop_after=None, resume=False):
        task = tiny_task(dropout=0.1)
        cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=2, out_dir=str(out), progress=False)
        tr = Trainer(task.model, task.train, task.loss_fn, config=cfg)
        return tr, tr.fit(stop_after=stop_after, resume=resume)

    run(tmp_path / "full")
    _, first = run(tmp_path / "cut", stop_after=3)
    assert first["steps"] == 3
    _, second = run(tmp_path / "cut", resume=True)
    assert second["steps"] == 6
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in full if "loss" in r]
    csv_lines = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,loss,lr") and len(csv_lines) == 1 + len(rows)


def test_resume_across_an_adalora_rank_change(tmp_path):
    def run(out, stop_after=None, resume=False):
        task = tiny_task(method="adalora", rank=4)
        sched = AdaLoRASchedule(task.model, total_steps=8, target_budget=2, t_init=1, t_final=2, delta_t=1)
        cfg = TrainConfig(steps=8, batch_size=8, lr=1e-2, out_dir=str(out), progress=False)
        tr = Trainer(task.model, task.train, task.loss_fn, config=cfg, callbacks=[sched])
        summary = tr.fit(stop_after=stop_after, resume=resume)
        return tr, sched, summary

    tr_full, sched_full, full = run(tmp_path / "full")
    assert sum(sched_full.ranks().values()) == 2
    shapes = {n: (l.adapter.d_out, l.adapter.d_in) for n, l in adapted_layers(tr_full.model).items()}
    assert full["trainable_params"] == sum(r * (sum(shapes[n]) + 1) for n, r in sched_full.ranks().items())
    _, sched_cut, _ = run(tmp_path / "cut", stop_after=2)
    assert 2 < sum(sched_cut.ranks().values()) < 8  # the checkpoint is taken mid-pruning
    _, sched_res, res = run(tmp_path / "cut", resume=True)
    assert sched_res.ranks() == sched_full.ranks() and res["trainable_params"] == full["trainable_params"]
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_early_stopping_and_callbacks(tmp_path):
    task = tiny_task()
    calls = iter(range(100))

    def worse_every_time(net, data):
        return {"loss": float(next(calls))}

    ggpo = GGPO(task.model, sigma=0.01, beta=0.0, seed=1)
    cfg = TrainConfig(steps=50, batch_size=8, lr=1e-3, eval_every=2, early_stop_patience=2, progress=False)
    tr = Trainer(task.model, task.train, task.loss_fn, eval_data=task.test, eval_fn=worse_every_time, config=cfg,
                 callbacks=[ggpo])
    s = tr.fit()
    assert s["stopped_early"] and s["steps"] == 6  # evals at 2 (best), 4 and 6 (worse twice)
    assert ggpo.draw == 6 and not ggpo._hooks  # updated once per step, detached at the end


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bf16_autocast_on_cuda():
    task = make_task("teacher-lowrank", "tiny-gpt2", n_train=32, n_test=8, max_length=8)
    inject(task.model, "lora", task.targets, rank=2, seed=0)
    seen = []

    def loss_fn(net, batch):
        seen.append(torch.is_autocast_enabled("cuda"))
        return task.loss_fn(net, batch)

    cfg = TrainConfig(steps=20, batch_size=8, lr=1e-2, progress=False, device="cuda")
    tr = Trainer(task.model, task.train, loss_fn, eval_data=task.test, eval_fn=task.eval_fn, config=cfg)
    start = tr.evaluate()["loss"]
    s = tr.fit()
    assert all(seen) and s["eval"]["loss"] < start and s["peak_memory_mb"] > 0


# ============================================================================ real MiniLM
def test_minilm_teacher_student_loss_falls_well_below_its_start():
    task = make_task("teacher-lowrank", "minilm", n_train=128, n_test=32, max_length=16)
    inject(task.model, "lora", task.targets, rank=4, seed=0, layer_seeds=True)
    cfg = TrainConfig(steps=60, batch_size=16, lr=2e-2, progress=False, train_mode=False)
    tr = Trainer(task.model, task.train, task.loss_fn, eval_data=task.test, eval_fn=task.eval_fn, config=cfg)
    start = tr.evaluate()
    s = tr.fit()
    assert start["delta_error"] == pytest.approx(1.0)  # ΔW = 0 at init
    assert s["eval"]["loss"] < 0.4 * start["loss"], (start, s["eval"])
    assert s["eval"]["delta_error"] < 1.0  # moving towards the planted update


def test_minilm_docstring_classifier_beats_the_majority_baseline():
    task = make_task("docstrings", "minilm", max_length=16)
    inject(task.model, "lora", task.targets, rank=4, seed=0, layer_seeds=True)
    task.unfreeze_head()
    n_adapter = sum(layer.adapter.num_trainable for layer in adapted_layers(task.model).values())
    cfg = TrainConfig(steps=20, batch_size=16, lr=5e-3, progress=False)
    tr = Trainer(task.model, task.train, task.loss_fn, eval_data=task.test, eval_fn=task.eval_fn, config=cfg)
    s = tr.fit()
    base = task.info["majority_baseline"]
    assert s["eval"]["accuracy"] > base + 0.3, (s["eval"], base)
    assert s["trainable_params"] == n_adapter + 384 * 5 + 5  # adapters + the head
