"""The training layer inside Hugging Face ``accelerate`` (CPU, gloo).

* ``accelerate launch`` with 2 processes, the worker building an ``Accelerator`` first (so
  accelerate owns the process group): our :class:`Trainer` joins that group and gives the adapter
  weights of one process with the same global batch (compared at ``tol(float64)``, the argument
  of ``test_trainer.py``'s torchrun test).  ``--multi_gpu`` is accelerate's switch for its
  ``torch.distributed.run`` launcher; on a machine without CUDA the group uses gloo.
* A user's own accelerate loop (``prepare`` + ``accelerator.backward``) over our injected adapters
  takes the same steps as a plain PyTorch loop (bit for bit: the same ops on one process), and the
  adapters saved from the prepared, possibly wrapped, model load into a fresh one unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lowrank_theory.training import load_adapters, save_adapters, unwrap_model
from tests.conftest import tol
from tests.training.test_trainer import REPO, adapter_tensors, tiny_task, train_tiny

accelerate = pytest.importorskip("accelerate")


def test_accelerate_launch_two_processes_match_one_process(tmp_path):
    train_tiny(str(tmp_path / "single"))
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys\nimport torch.distributed as dist\nfrom accelerate import Accelerator\n"
        "from tests.training.test_trainer import train_tiny\n"
        "acc = Accelerator(cpu=True)\n"
        "assert acc.num_processes == 2 and dist.is_initialized(), acc.num_processes\n"
        "s = train_tiny(sys.argv[1], grad_accum=2)\nassert s['world_size'] == 2, s\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           str(tmp_path / "acc")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = adapter_tensors(tmp_path / "single"), adapter_tensors(tmp_path / "acc")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], **tol(torch.float64))
    assert any(a[k].abs().max() > 0 for k in a if k.endswith(".B"))  # B moved off zero: it trained


def _steps(model, opt, batches, loss_fn, backward):
    for batch in batches:
        opt.zero_grad()
        backward(loss_fn(model, batch))
        opt.step()


def test_user_accelerate_loop_over_our_adapters(tmp_path):
    from accelerate import Accelerator

    batches = [{k: v[i:i + 4] for k, v in tiny_task().train.items()} for i in (0, 4, 8)]
    ref = tiny_task()
    opt = torch.optim.SGD([p for p in ref.model.parameters() if p.requires_grad], lr=0.5)
    _steps(ref.model, opt, batches, ref.loss_fn, lambda loss: loss.backward())

    task = tiny_task()
    acc = Accelerator(cpu=True)
    opt = torch.optim.SGD([p for p in task.model.parameters() if p.requires_grad], lr=0.5)
    model, opt = acc.prepare(task.model, opt)
    _steps(model, opt, batches, task.loss_fn, acc.backward)
    got = dict(unwrap_model(model).named_parameters())
    moved = 0
    for name, p in ref.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(got[name], p), name
            moved += int(not torch.equal(p, dict(tiny_task().model.named_parameters())[name]))
    assert moved > 0

    save_adapters(model, tmp_path / "ad")
    fresh = tiny_task()
    load_adapters(fresh.model, tmp_path / "ad")
    x = batches[0]
    torch.testing.assert_close(fresh.loss_fn(fresh.model, x), task.loss_fn(unwrap_model(model), x), rtol=0, atol=0)


def test_wrapped_models_save_under_the_plain_names(tmp_path):
    """``DataParallel`` / ``DistributedDataParallel``-style wrappers add a ``module.`` prefix to every
    name; checkpoints must not depend on it."""
    task = tiny_task()
    save_adapters(task.model, tmp_path / "plain")
    save_adapters(torch.nn.DataParallel(task.model), tmp_path / "wrapped")
    a, b = adapter_tensors_in(tmp_path / "plain"), adapter_tensors_in(tmp_path / "wrapped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("module.") for k in b)


def adapter_tensors_in(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapters.safetensors"))
