"""``Trainer.load_checkpoint`` validates every file before it changes anything (issue #15).

A trainer that has trained (so it has adapter values, AdamW moments and an RNG state of its own,
all different from the checkpoint's) loads a checkpoint with one bad file.  It must raise
``ValueError`` naming that file, and afterwards its model ``state_dict`` (every tensor, module
type and ``requires_grad`` flag), its optimizer (the same object, the same state) and the torch
RNG state must be bit-identical to before (``torch.equal``: nothing may be even partly written).
The control test loads the good checkpoint into the same kind of trainer and sees all three change,
so each comparison could fail.  AdaLoRA covers the resize path (the checkpoint's ranks differ from
the model's, so ``plan_load`` builds new adapters): after a failure the model's own adapter modules
are back and the schedule's state is its own again.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank_theory.training import adapted_layers
from lowrank_theory.training.schedules import AdaLoRASchedule
from lowrank_theory.training.trainer import TrainConfig, Trainer
from tests.training import assert_unchanged, snapshot
from tests.training.test_trainer import tiny_task


def make_trainer(out=None, *, seed=0, method="lora", rule="adamw", schedule=False, **cfg):
    """The tiny GPT-2 task with its final LayerNorm trainable too (so ``trainable.safetensors`` is not empty)."""
    task = tiny_task(method=method, **cfg)
    for p in task.model.ln_f.parameters():
        p.requires_grad_(True)
    cbs = [AdaLoRASchedule(task.model, total_steps=8, target_budget=2, t_init=1, t_final=2, delta_t=1)] if schedule \
        else []
    config = TrainConfig(steps=8, batch_size=8, lr=1e-2, rule=rule, out_dir=None if out is None else str(out),
                         progress=False, device="cpu", seed=seed)
    return Trainer(task.model, task.train, task.loss_fn, config=config, callbacks=cbs)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A checkpoint after 2 AdamW steps (seed 0)."""
    out = tmp_path_factory.mktemp("good")
    make_trainer(out).fit(stop_after=2)
    return out / "checkpoint"


def victim(**kw) -> Trainer:
    """A trainer 1 step into another run (seed 5): its tensors, moments and RNG differ from the checkpoint's."""
    tr = make_trainer(seed=5, **kw)
    tr.fit(stop_after=1)
    return tr


@pytest.fixture(scope="module")
def lora_victim():
    """One victim for all the bad-file cases: each case snapshots it just before its load, and a
    correct load leaves it as it was for the next (a wrong one fails that case, and likely later ones)."""
    return victim()


def optimizer_snapshot(opt):
    sd = opt.state_dict()
    return {"groups": json.dumps(sd["param_groups"], sort_keys=True, default=str),
            "state": {(pid, k): (v.clone() if isinstance(v, torch.Tensor) else v)
                      for pid, st in sd["state"].items() for k, v in st.items()}}


def assert_same_optimizer(opt, snap):
    now = optimizer_snapshot(opt)
    assert now["groups"] == snap["groups"]
    assert now["state"].keys() == snap["state"].keys()
    for key, v in snap["state"].items():
        w = now["state"][key]
        assert torch.equal(w, v) if isinstance(v, torch.Tensor) else w == v, key


# ============================================================================ corruptions
def _tensors(name, fn):
    def corrupt(d):
        t = load_file(str(d / name))
        fn(t)
        save_file(t, str(d / name))
    return corrupt


def _state(fn):
    def corrupt(d):
        s = json.loads((d / "trainer_state.json").read_text())
        fn(s)
        (d / "trainer_state.json").write_text(json.dumps(s))
    return corrupt


def _truncate(name):
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[:-9])


def _pickle(name):
    """A pickle (``torch.save``) of the same tensors under the ``.safetensors`` name."""
    def corrupt(d):
        t = load_file(str(d / name))
        (d / name).unlink()
        torch.save(t, d / name)
    return corrupt


def _nan(name):
    def fn(t):
        k = next(k for k, v in t.items() if v.is_floating_point() and v.numel())
        t[k].view(-1)[0] = float("nan")
    return _tensors(name, fn)


def _reshape_first(name, suffix=""):
    def fn(t):
        k = next(k for k, v in t.items() if k.endswith(suffix) and v.ndim)
        t[k] = torch.zeros(t[k].shape[0] + 1, *t[k].shape[1:], dtype=t[k].dtype)
    return _tensors(name, fn)


def _drop_group_param(s):
    s["optimizer"]["param_groups"][0]["params"].pop()


def _set_ln_dtype(t):
    t["ln_f.weight"] = t["ln_f.weight"].to(torch.int64)


def _pop_rng(t):
    t.pop("torch_cpu.0")


def _short_rng(t):
    t["torch_cpu.0"] = t["torch_cpu.0"][:-4].clone()


CORRUPTIONS = {
    # trainer_state.json
    "state missing": (lambda d: (d / "trainer_state.json").unlink(), r"trainer_state\.json does not exist"),
    "state truncated": (_truncate("trainer_state.json"), r"trainer_state\.json is not valid JSON"),
    "step is a string": (_state(lambda s: s.update(step="2")), r"trainer_state\.json: 'step' must be an int"),
    "step is a float": (_state(lambda s: s.update(step=2.5)), r"trainer_state\.json: 'step' must be an int"),
    "step is negative": (_state(lambda s: s.update(step=-1)), r"trainer_state\.json: 'step' must be an int"),
    "best is a string": (_state(lambda s: s.update(best="low")), r"trainer_state\.json: 'best'"),
    "optimizer class": (_state(lambda s: s.update(optimizer_class="SGD")), r"trainer_state\.json.*optimizer is SGD"),
    "optimizer groups": (_state(_drop_group_param), r"trainer_state\.json: optimizer param group sizes"),
    "callbacks not a list": (_state(lambda s: s.update(callbacks={})), r"trainer_state\.json: 'callbacks'"),
    "callback count": (_state(lambda s: s.update(callbacks=[{}])), r"trainer_state\.json: state for 1 callbacks"),
    # adapters
    "adapters truncated": (_truncate("adapters.safetensors"), r"adapters\.safetensors is not a readable"),
    "adapters missing": (lambda d: (d / "adapters.safetensors").unlink(), r"adapters\.safetensors does not exist"),
    "adapters NaN": (_nan("adapters.safetensors"), r"adapters\.safetensors.*NaN"),
    "adapters pickle": (_pickle("adapters.safetensors"), r"adapters\.safetensors is not a readable"),
    # trainable.safetensors
    "trainable extra tensor": (_tensors("trainable.safetensors", lambda t: t.update(extra=torch.zeros(2))),
                               r"trainable\.safetensors: trainable tensors differ.*unexpected \['extra'\]"),
    "trainable missing tensor": (_tensors("trainable.safetensors", lambda t: t.pop("ln_f.bias")),
                                 r"trainable\.safetensors: trainable tensors differ: missing \['ln_f\.bias'\]"),
    "trainable shape": (_reshape_first("trainable.safetensors"), r"trainable\.safetensors: tensor .* has shape"),
    "trainable dtype": (_tensors("trainable.safetensors", _set_ln_dtype), r"trainable\.safetensors: .*dtype"),
    "trainable NaN": (_nan("trainable.safetensors"), r"trainable\.safetensors.*NaN"),
    "trainable pickle": (_pickle("trainable.safetensors"), r"trainable\.safetensors is not a readable"),
    "trainable truncated": (_truncate("trainable.safetensors"), r"trainable\.safetensors is not a readable"),
    # optimizer.safetensors
    "optimizer truncated": (_truncate("optimizer.safetensors"), r"optimizer\.safetensors is not a readable"),
    "optimizer missing": (lambda d: (d / "optimizer.safetensors").unlink(), r"optimizer\.safetensors does not exist"),
    "optimizer pickle": (_pickle("optimizer.safetensors"), r"optimizer\.safetensors is not a readable"),
    "optimizer NaN": (_nan("optimizer.safetensors"), r"optimizer\.safetensors.*NaN"),
    "optimizer state shape": (_reshape_first("optimizer.safetensors", ".exp_avg"),
                              r"optimizer\.safetensors: state \d+\.exp_avg has shape"),
    "optimizer unknown param": (_tensors("optimizer.safetensors", lambda t: t.update({"99.exp_avg": torch.zeros(1)})),
                                r"optimizer\.safetensors: optimizer state for parameter indices \[99\]"),
    "optimizer bad key": (_tensors("optimizer.safetensors", lambda t: t.update({"exp_avg": torch.zeros(1)})),
                          r"optimizer\.safetensors: tensor key 'exp_avg'"),
    # callbacks.safetensors and rng.safetensors
    "callbacks missing": (lambda d: (d / "callbacks.safetensors").unlink(), r"callbacks\.safetensors does not exist"),
    "callbacks stray index": (_tensors("callbacks.safetensors", lambda t: t.update({"0.x": torch.zeros(1)})),
                              r"callbacks\.safetensors: tensor key '0\.x' is not"),
    "rng missing": (lambda d: (d / "rng.safetensors").unlink(), r"rng\.safetensors does not exist"),
    "rng truncated": (_truncate("rng.safetensors"), r"rng\.safetensors is not a readable"),
    "rng no state for this rank": (_tensors("rng.safetensors", _pop_rng), r"rng\.safetensors: no 'torch_cpu\.0'"),
    "rng wrong size": (_tensors("rng.safetensors", _short_rng), r"rng\.safetensors: 'torch_cpu\.0' is"),
}


def _check_unchanged_after(tr: Trainer, path, match: str) -> None:
    snap, opt, opt_snap = snapshot(tr.model), tr.optimizer, optimizer_snapshot(tr.optimizer)
    modules = {n: layer.adapter for n, layer in adapted_layers(tr.model).items()}
    rng, step = torch.get_rng_state(), tr.step
    with pytest.raises(ValueError, match=match):
        tr.load_checkpoint(path)
    assert_unchanged(tr.model, snap)
    assert {n: layer.adapter for n, layer in adapted_layers(tr.model).items()} == modules  # the same objects
    assert tr.optimizer is opt
    assert_same_optimizer(tr.optimizer, opt_snap)
    assert torch.equal(torch.get_rng_state(), rng) and tr.step == step


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_file_raises_naming_it_and_changes_nothing(good, lora_victim, tmp_path, case):
    bad = tmp_path / "checkpoint"
    shutil.copytree(good, bad)
    corrupt, match = CORRUPTIONS[case]
    corrupt(bad)
    _check_unchanged_after(lora_victim, bad, match)


def test_another_optimizer_rule_is_refused(good):
    """The run builds SGD, the checkpoint holds AdamW state: refused before anything is written."""
    _check_unchanged_after(victim(rule="sgd"), good, r"trainer_state\.json: .*optimizer is AdamW.*builds SGD")


def test_the_good_checkpoint_changes_all_three(good):
    """Control: every comparison above could fail -- loading the intact checkpoint changes the
    model's tensors, the optimizer and the RNG, and sets the step."""
    tr = victim()
    snap, opt_snap, rng = snapshot(tr.model), optimizer_snapshot(tr.optimizer), torch.get_rng_state()
    tr.load_checkpoint(good)
    assert tr.step == 2
    with pytest.raises(AssertionError):
        assert_unchanged(tr.model, snap)
    assert not torch.equal(tr.model.ln_f.weight.detach(), snap["state"]["ln_f.weight"])  # trainable.safetensors
    with pytest.raises(AssertionError):
        assert_same_optimizer(tr.optimizer, opt_snap)
    assert not torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(torch.get_rng_state(), load_file(str(good / "rng.safetensors"))["torch_cpu.0"])


# ============================================================================ the resize path (AdaLoRA)
@pytest.fixture(scope="module")
def adalora_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("adalora")
    make_trainer(out, method="adalora", rank=4, schedule=True).fit(stop_after=2)
    return out / "checkpoint"


@pytest.fixture(scope="module")
def adalora_victim():
    return victim(method="adalora", rank=4, schedule=True)


def _ranks(tr):
    return {n: int(layer.adapter.rank) for n, layer in adapted_layers(tr.model).items()}


def _saved_ranks(path):
    layers = json.loads((path / "adapter_config.json").read_text())["layers"]
    return {n: int(e["config"]["rank"]) for n, e in layers.items()}


def _shrink_importance(t):
    k = next(iter(sorted(t)))
    t[k] = torch.zeros(t[k].shape[0] + 1, *t[k].shape[1:], dtype=t[k].dtype)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (_reshape_first("optimizer.safetensors", ".exp_avg"), r"optimizer\.safetensors: state \d+\.exp_avg"),
        (_tensors("callbacks.safetensors", _shrink_importance),
         r"callbacks\.safetensors: callback 0 \(AdaLoRASchedule\) refused its saved state"),
        (_tensors("trainable.safetensors", lambda t: t.pop("ln_f.bias")), r"trainable\.safetensors"),
    ],
    ids=["optimizer", "callback refuses", "trainable"],
)
def test_resize_path_restores_the_old_adapters_and_schedule(adalora_ckpt, adalora_victim, tmp_path, corrupt, match):
    bad = tmp_path / "checkpoint"
    shutil.copytree(adalora_ckpt, bad)
    corrupt(bad)
    tr = adalora_victim
    assert _ranks(tr) != _saved_ranks(bad)  # the load has to rebuild adapters at the saved ranks
    sched = tr.callbacks[0]
    before = sched.state_dict()
    _check_unchanged_after(tr, bad, match)
    after = sched.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [m.adapter for m in sched.layers().values()] == [m.adapter for m in adapted_layers(tr.model).values()]


def test_resize_path_good_checkpoint_resumes(adalora_ckpt):
    tr = victim(method="adalora", rank=4, schedule=True)
    tr.load_checkpoint(adalora_ckpt)
    assert _ranks(tr) == _saved_ranks(adalora_ckpt) and tr.step == 2
    opt_params = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in tr.model.parameters() if p.requires_grad}  # built on the new adapters
