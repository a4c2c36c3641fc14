"""FSDP2 (``fully_shard``, gloo, CPU, 2 processes under ``torchrun``) against one process (issue #19, item 1).

One ``torchrun`` launch (:func:`test_fsdp_two_processes_match_one_process`) runs everything sharded,
in the order of :data:`RUNS`, and the parent compares each result with the same run in one
unsharded process:

* the :class:`Trainer` with ``TrainConfig(fsdp=True)`` for the eight methods of :data:`METHODS`:
  LoRA, DoRA, VeRA, LoCA, FourierFT, RandLoRA (frozen random bases, transform constants, learned
  locations: buffers, never sharded), Uni-LoRA (one vector shared by layers of *both* blocks, so of
  two FSDP groups: kept whole), AdaLoRA (its rank schedule replaces tensors mid-training: adapters
  kept whole, base sharded).  Adapted layers sit in both GPT-2 blocks (two FSDP groups + the root),
  the final LayerNorm is trainable (a sharded non-adapter tensor: ``trainable.safetensors``);
* LoRA interrupted after 2 of 4 AdamW steps and resumed (the optimizer's sharded state saved
  whole and loaded back in shards), and AdaLoRA interrupted and resumed across a rank change;
* a user's own loop: ``shard_model`` + SGD + :func:`fsdp.clip_grad_norm_` (clipping engaged, on a
  mix of sharded and whole gradients);
* the checkpoint of a sharded run loaded into a fresh *sharded* model and saved again (the same
  tensors), and into a fresh *unsharded* one (the parent: the same outputs);
* every run's final evaluation (loss and the teacher task's ΔW error, which reads the weights
  outside a forward: ``fsdp.gathered``), ``lowrank-theory train --fsdp``, and the clear errors
  when a sharded adapter tensor is reshaped or an adapter replaced after sharding.

Tolerance: float64 model and data; the only difference from one process is the order of the
gradient sums (the reduce-scatter's :math:`(g_1 + g_2)/2` against one mean over 8 examples, each
~1e-16 relative), carried through a few steps at that relative size -- ``tol(float64)`` (1e-10).
The measured maximum differences are printed by the worker (``-s`` shows them).  Plain SGD for the
method runs: a wrong averaging factor over ranks would change the step (Adam would hide it).
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowrank_theory import adapters
from lowrank_theory.adapters.projection import UniLoRAShared
from lowrank_theory.training import adapted_layers, inject, load_adapters
from lowrank_theory.training.schedules import AdaLoRASchedule
from lowrank_theory.training.tasks import make_task
from lowrank_theory.training.trainer import TrainConfig, Trainer
from tests.conftest import tol
from tests.training.test_cli_train import TINY
from tests.training.test_trainer import torchrun

#: method -> (adapter config, SGD learning rate).  Targets: c_proj of both blocks (two FSDP groups).
METHODS = {
    "lora": ({"rank": 2}, 0.1),
    "dora": ({"rank": 2}, 0.02),
    "vera": ({"rank": 8}, 0.5),
    "loca": ({"n_frequency": 24}, 0.1),
    "fourierft": ({"n_frequency": 24, "scaling": 10.0}, 0.5),
    "randlora": ({"rank": 2, "alpha": 2.0}, 0.02),
    "unilora": ({"rank": 2}, 0.5),
    "adalora": ({"rank": 4}, 0.5),
}
TARGETS = ["h.0.attn.c_proj", "h.1.attn.c_proj", "h.1.mlp.c_proj"]
CLI = [*TINY, "--task", "teacher-lowrank", "--method", "lora", "--rank", "2", "--steps", "3", "--lr", "0.02"]


def make_model(method: str):
    """The teacher--student task on tiny GPT-2 (float64), ``method`` in 3 layers of 2 blocks, ln_f trainable."""
    task = make_task("teacher-lowrank", "tiny-gpt2", model_kw={"dtype": torch.float64, "dropout": 0.0},
                     n_train=32, n_test=8, max_length=8)
    cfg = dict(METHODS[method][0])
    if method == "unilora":
        cfg["shared"] = UniLoRAShared(64, seed=3)
    params = inspect.signature(adapters.get(method).__init__).parameters
    seed = {"seed": 0} if "seed" in params and "shared" not in cfg else {}
    per_layer = bool(seed) and "basis_shape" not in params  # a shared basis has one seed (as the CLI does)
    inject(task.model, method, TARGETS, layer_seeds=per_layer, **seed, **cfg)
    for p in task.model.ln_f.parameters():
        p.requires_grad_(True)
    return task


def train(method: str, out: str, *, fsdp: bool, steps: int = 4, stop_after=None, resume=False, rule="sgd"):
    """The same run in one process or under torchrun (``fsdp``); returns the trainer."""
    torch.set_num_threads(1)
    task = make_model(method)
    cbs = []
    if method == "adalora":
        cbs = [AdaLoRASchedule(task.model, total_steps=steps, target_budget=4, t_init=1, t_final=1, delta_t=1)]
    lr = METHODS[method][1] if rule == "sgd" else 1e-2
    cfg = TrainConfig(steps=steps, batch_size=8, lr=lr, rule=rule, out_dir=out, progress=False, device="cpu",
                      fsdp=fsdp, lr_schedule="constant")
    tr = Trainer(task.model, task.train, task.loss_fn, eval_data=task.test, eval_fn=task.eval_fn, config=cfg,
                 callbacks=cbs)
    tr.fit(stop_after=stop_after, resume=resume)
    return tr


def user_loop(fsdp: bool, out: str | None = None) -> torch.Tensor:
    """A hand-written loop: SGD over 3 batches with clipping engaged; returns the first step's grad norm."""
    from lowrank_theory.training import fsdp as F

    torch.set_num_threads(1)
    task = make_model("unilora")
    model = task.model
    for p in model.h[0].mlp.c_fc.parameters():  # a sharded non-adapter tensor next to the whole θ_d
        p.requires_grad_(True)
    rank, world = 0, 1
    if fsdp:
        import torch.distributed as dist

        F.shard_model(model)
        rank, world = dist.get_rank(), dist.get_world_size()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    norms = []
    for i in range(3):
        idx = torch.arange(8 * i, 8 * i + 8).view(world, -1)[rank]
        batch = {k: v[idx] for k, v in task.train.items()}
        opt.zero_grad()
        task.loss_fn(model, batch).backward()
        clip = F.clip_grad_norm_ if fsdp else torch.nn.utils.clip_grad_norm_
        norms.append(clip([p for p in model.parameters() if p.requires_grad], 0.05))
        opt.step()
    if out is not None:
        from lowrank_theory.training import save_adapters

        save_adapters(model, out)
    return torch.stack([n.detach().double() for n in norms])


#: The runs of the one torchrun launch, by output name.
RUNS = {**{m: {"method": m} for m in METHODS},
        "lora_resumed": {"method": "lora", "rule": "adamw"},
        "adalora_resumed": {"method": "adalora"}}


def worker(root: str) -> None:
    """Everything sharded, in one launch (see the module docstring); rank 0 writes ``report.json``."""
    import torch.distributed as dist

    from lowrank_theory.training import fsdp as F
    from lowrank_theory.training import save_adapters

    report: dict[str, object] = {}
    for name, spec in RUNS.items():
        out = f"{root}/{name}"
        if name.endswith("_resumed"):
            train(spec["method"], out, fsdp=True, stop_after=2, rule=spec.get("rule", "sgd"))
            saved = json.loads(Path(out, "checkpoint", "adapter_config.json").read_text())["layers"]
            report[f"{name}_saved_ranks"] = [e["config"].get("rank") for e in saved.values()]
            tr = train(spec["method"], out, fsdp=True, resume=True, rule=spec.get("rule", "sgd"))
        else:
            task = make_model(name)
            before = {k: v.clone() for k, v in task.model.named_buffers()}
            tr = train(name, out, fsdp=True)
            assert tr.world == 2 and F.is_sharded(tr.model), name
            after = dict(tr.model.named_buffers())
            fresh = {k: v for k, v in make_model(name).model.named_buffers()}
            # buffers (frozen bases, locations, constants) are whole on every rank and as regenerated from seeds
            assert before.keys() == fresh.keys(), name
            for k, v in before.items():
                assert torch.equal(v, fresh[k]), (name, k)
                if k in after and name not in ("loca", "adalora"):  # LoCA's locations move; AdaLoRA's ranks
                    assert torch.equal(after[k], v), (name, k)
        sharded = sorted(n for n, p in tr.model.named_parameters() if F.is_dtensor(p))
        whole = sorted(n for n, p in tr.model.named_parameters() if p.requires_grad and not F.is_dtensor(p))
        final = next(r for r in reversed(tr.history) if "eval_delta_error" in r)
        report[name] = {"sharded": sharded, "whole_trainable": whole, "step": tr.step, "eval": final}
    # a sharded run's checkpoint into a fresh sharded model, saved again
    task = make_model("vera")
    F.shard_model(task.model)
    load_adapters(task.model, f"{root}/vera/checkpoint")
    save_adapters(task.model, f"{root}/vera_reloaded")
    report["user_norms"] = user_loop(True, f"{root}/user").tolist()
    report["errors"] = {k: _replaced_after_sharding(k) for k in ("reshaped", "replaced")}
    from lowrank_theory.cli import main

    report["cli"] = main([*CLI, "--fsdp", "--out", f"{root}/cli"])
    if dist.get_rank() == 0:
        Path(root, "report.json").write_text(json.dumps(report))


def _replaced_after_sharding(kind: str) -> str:
    """A sharded adapter tensor reshaped (what a rank schedule does) or an adapter replaced after
    ``shard_model(..., replicate_adapters=False)``: the next forward's error message."""
    from torch import nn

    from lowrank_theory.adapters.lowrank import LoRA
    from lowrank_theory.training import fsdp as F

    task = make_model("lora")
    F.shard_model(task.model, replicate_adapters=False)
    layer = adapted_layers(task.model)["h.1.mlp.c_proj"]
    if kind == "reshaped":
        layer.adapter.A = nn.Parameter(torch.zeros(1, 256, dtype=torch.float64))
    else:
        layer.adapter = LoRA(64, 256, rank=2).double()
    try:
        task.loss_fn(task.model, {k: v[:2] for k, v in task.train.items()})
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def _adapters(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapters.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def test_fsdp_two_processes_match_one_process(tmp_path, capsys):
    root = tmp_path / "fsdp"
    torchrun(tmp_path, "from tests.training.test_fsdp import worker\nworker(sys.argv[1])\n", str(root))
    report = json.loads((root / "report.json").read_text())
    measured = {}
    for name, spec in RUNS.items():
        ref = train(spec["method"], str(tmp_path / "single" / name), fsdp=False, rule=spec.get("rule", "sgd"))
        ref_dir, got_dir = tmp_path / "single" / name / "checkpoint", root / name / "checkpoint"
        a, b = _adapters(ref_dir), _adapters(got_dir)
        measured[name] = _max_diff(a, b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], **tol(torch.float64))
        ta, tb = load_file(str(ref_dir / "trainable.safetensors")), load_file(str(got_dir / "trainable.safetensors"))
        assert set(ta) == {"ln_f.weight", "ln_f.bias"}
        for k in ta:
            torch.testing.assert_close(tb[k], ta[k], **tol(torch.float64))
        assert report[name]["step"] == 4 and any(n.startswith("ln_f") for n in report[name]["sharded"])
        # the final evaluation (its ΔW error reads the weights: run on the gathered parameters)
        want = next(r for r in reversed(ref.history) if "eval_delta_error" in r)
        for key in ("eval_loss", "eval_delta_error"):
            torch.testing.assert_close(torch.tensor(report[name]["eval"][key]), torch.tensor(want[key]),
                                       **tol(torch.float64))
        if spec["method"] == "adalora":
            rank_now = {n: int(layer.adapter.rank) for n, layer in adapted_layers(ref.model).items()}
            assert sum(rank_now.values()) < 4 * len(TARGETS), name  # the schedule pruned during the run
        else:
            moved = _max_diff(a, _adapters_at_init(spec["method"], tmp_path / "init" / name))
            assert moved > 1e-3, name  # the runs really trained
    # what was kept whole, and why: Uni-LoRA's shared vector, AdaLoRA's changing tensors
    assert report["unilora"]["whole_trainable"] == ["h.0.attn.c_proj.adapters.default.shared.theta_d"]
    assert all(".adapters." in n for n in report["adalora"]["whole_trainable"])
    assert not any(".adapters." in n for n in report["adalora"]["sharded"])
    for m in ("lora", "dora", "vera", "loca", "fourierft", "randlora"):
        assert report[m]["whole_trainable"] == [], m
        assert any(".adapters." in n for n in report[m]["sharded"]), m
    assert report["adalora_resumed_saved_ranks"] != [4] * len(TARGETS)  # resumed across a rank change
    assert "changed from shape (2, 256) to (1, 256)" in report["errors"]["reshaped"]
    assert "was replaced after shard_model" in report["errors"]["replaced"]
    assert all("replicate_adapters=True" in e for e in report["errors"].values())
    # lowrank-theory train --fsdp: the same run as without the flag in one process
    assert report["cli"] == 0
    from lowrank_theory.cli import main

    assert main([*CLI, "--out", str(tmp_path / "cli")]) == 0
    a, b = _adapters(tmp_path / "cli" / "checkpoint"), _adapters(root / "cli" / "checkpoint")
    measured["cli"] = _max_diff(a, b)
    for k in a:  # tiny-gpt2 in float32 here: float32's tolerance, by the same argument
        torch.testing.assert_close(b[k], a[k], **tol(a[k].dtype))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "cli", root / "cli"))
    for key in ("value", "start_value", "train_loss"):
        torch.testing.assert_close(torch.tensor(sb[key]), torch.tensor(sa[key]), **tol(torch.float32))
    # a sharded checkpoint loaded into a sharded model and saved again: the same tensors
    a, b = _adapters(root / "vera" / "checkpoint"), _adapters(root / "vera_reloaded")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... and into an unsharded one: the single-process model's outputs
    ref = train("fourierft", str(tmp_path / "single" / "fourierft_again"), fsdp=False)
    fresh = make_model("fourierft")
    load_adapters(fresh.model, root / "fourierft" / "checkpoint")
    fresh.model.load_state_dict(load_file(str(root / "fourierft" / "checkpoint" / "trainable.safetensors")),
                                strict=False)
    x = {k: v[:4] for k, v in fresh.test.items()}
    torch.testing.assert_close(fresh.loss_fn(fresh.model, x), fresh.loss_fn(ref.model, x),
                               **tol(torch.float64))
    # the user's loop: the grad norms (mixed sharded + whole gradients) and the trained vector
    norms = user_loop(False, str(tmp_path / "user"))
    torch.testing.assert_close(torch.tensor(report["user_norms"], dtype=torch.float64), norms, **tol(torch.float64))
    assert bool((norms > 0.05).all())  # clipping was engaged at every step
    measured["user_loop"] = _max_diff(_adapters(tmp_path / "user"), _adapters(root / "user"))
    for k, v in _adapters(tmp_path / "user").items():
        torch.testing.assert_close(_adapters(root / "user")[k], v, **tol(torch.float64))
    with capsys.disabled():
        print("\nFSDP (2 ranks) vs 1 process, max |diff| of the adapter tensors:",
              json.dumps({k: f"{v:.1e}" for k, v in measured.items()}), file=sys.stderr)


def _adapters_at_init(method: str, out: Path) -> dict[str, torch.Tensor]:
    from lowrank_theory.training import save_adapters

    save_adapters(make_model(method).model, out)
    return _adapters(out)


# ============================================================================ in one process
def test_shard_model_needs_a_process_group():
    with pytest.raises(ValueError, match="torchrun"):
        from lowrank_theory.training.fsdp import shard_model

        shard_model(make_model("lora").model)


def test_cli_fsdp_without_torchrun_is_an_error(monkeypatch, tmp_path, capsys):
    from lowrank_theory.cli import main

    for var in ("MASTER_ADDR", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert main([*CLI, "--fsdp", "--out", str(tmp_path)]) == 2
    assert "launch with torchrun" in capsys.readouterr().err


def test_fsdp_config_needs_torchrun(monkeypatch):
    for var in ("MASTER_ADDR", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    task = make_model("lora")
    with pytest.raises(ValueError, match=r"fsdp=True needs torch\.distributed"):
        Trainer(task.model, task.train, task.loss_fn, config=TrainConfig(batch_size=8, fsdp=True))
    with pytest.raises(ValueError, match="fsdp must be a bool"):
        TrainConfig(fsdp="yes").validate()


# ============================================================================ mixed precision (CUDA)
def train_cuda(out: str, *, fsdp: bool, steps: int = 6) -> Trainer:
    """LoRA on tiny GPT-2 in float32 on CUDA, AdamW; ``fsdp``: bf16 compute / fp32 reduce (MixedPrecisionPolicy)."""
    task = make_task("teacher-lowrank", "tiny-gpt2", model_kw={"dropout": 0.0}, n_train=32, n_test=8, max_length=8)
    inject(task.model, "lora", TARGETS, layer_seeds=True, seed=0, rank=2)
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, out_dir=out, progress=False, fsdp=fsdp,
                      mixed_precision="bf16" if fsdp else "no", lr_schedule="constant")
    tr = Trainer(task.model, task.train, task.loss_fn, config=cfg)
    tr.fit()
    return tr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fsdp_bf16_mixed_precision_on_cuda(tmp_path):
    """FSDP with ``MixedPrecisionPolicy(bf16 params, fp32 reduce)`` on 1-2 GPUs (NCCL) against fp32 on one.

    bf16 keeps 8 bits of mantissa (relative rounding 4e-3), so the gradients differ from fp32 at
    ~1e-2 relative; AdamW turns each into a step of about ``lr`` per coordinate, so the parameter
    *updates* agree in direction (cosine > 0.9) without agreeing to fp32 round-off.  The sharded
    master parameters stay float32 (what the checkpoint holds), and the loss falls."""
    n = min(2, torch.cuda.device_count())
    body = ("from tests.training.test_fsdp import train_cuda\n"
            "tr = train_cuda(sys.argv[1], fsdp=True)\n"
            "from torch.distributed.fsdp import FSDPModule\n"
            "assert isinstance(tr.model, FSDPModule)\n")
    torchrun(tmp_path, body, str(tmp_path / "fsdp"), nproc=n)
    ref = train_cuda(str(tmp_path / "ref"), fsdp=False)
    init = _adapters_at_init_cuda(tmp_path / "init")
    a, b = _adapters(tmp_path / "ref" / "checkpoint"), _adapters(tmp_path / "fsdp" / "checkpoint")
    assert all(t.dtype == torch.float32 for t in b.values())
    da = torch.cat([(a[k] - init[k]).flatten() for k in sorted(a)])
    db = torch.cat([(b[k] - init[k]).flatten() for k in sorted(a)])
    assert float(torch.nn.functional.cosine_similarity(da, db, dim=0)) > 0.9
    rows = [json.loads(x) for x in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rows[-1]["loss"] < rows[0]["loss"] and ref.history[-1]["loss"] < ref.history[0]["loss"]


def _adapters_at_init_cuda(out: Path) -> dict[str, torch.Tensor]:
    from lowrank_theory.training import save_adapters

    task = make_task("teacher-lowrank", "tiny-gpt2", model_kw={"dropout": 0.0}, n_train=32, n_test=8, max_length=8)
    inject(task.model, "lora", TARGETS, layer_seeds=True, seed=0, rank=2)
    save_adapters(task.model, out)
    return _adapters(out)
