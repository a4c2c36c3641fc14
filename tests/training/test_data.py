"""Offline models, standard-library text, the two real tasks and the theory helpers.

Independent references: the packaged MiniLM loaded through the ordinary ``from_pretrained(path)``
route, SciPy's DCT for the frequency-sparse plant, NumPy's rank, a teacher rebuilt here by hand,
a LoRA set to the planted update's SVD factors, and (for the two theory helpers) each other: one
SGD step of the full fine-tune moves W by exactly ``-lr`` times the gradient the other returns.
"""

from __future__ import annotations

import collections
import copy
import importlib.util
import json

import numpy as np
import pytest
import scipy.fft
import torch
from torch import nn

from lowrank_theory.training import adapted_layers, inject
from lowrank_theory.training.data import (
    ByteTokenizer,
    docstring_dataset,
    encode,
    load_model,
    load_text_dataset,
    minilm_path,
    real_finetune_delta,
    real_layer_gradients,
    stdlib_docstrings,
    stdlib_sentences,
    tiny_gpt2,
)
from lowrank_theory.training.tasks import (
    SequenceClassifier,
    classification_task,
    make_task,
    planted_delta,
    teacher_student_task,
)
from tests.conftest import tol

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


# ============================================================================ models
def test_minilm_loads_offline_and_the_hub_path_gives_the_same_model(minilm):
    model, tok = minilm
    assert (minilm_path() / "config.json").is_file()
    assert type(model).__name__ == "BertModel" and model.config.hidden_size == 384 and not model.training
    assert {"query", "key", "value", "dense"} <= {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    same, tok2 = load_model(str(minilm_path()))  # the ordinary AutoModel.from_pretrained(<dir>) route
    batch = encode(tok, [TEXT], 12)
    assert torch.equal(batch["input_ids"], encode(tok2, [TEXT], 12)["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, same(**batch).last_hidden_state, rtol=0, atol=0)
    with pytest.raises(TypeError, match="dtype"):
        load_model("tiny-gpt2", dtype=torch.int32)


def test_tiny_gpt2_and_byte_tokenizer():
    a, b = tiny_gpt2(seed=3), tiny_gpt2(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), tiny_gpt2(seed=4).parameters()))
    tok = ByteTokenizer()
    enc = tok(["hé", "abc"], max_length=4)
    assert enc["input_ids"].tolist() == [[*"hé".encode(), 256], [97, 98, 99, 256]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    assert tok(["abcdef"], max_length=4)["input_ids"].tolist() == [[97, 98, 99, 100]]
    with pytest.raises(ValueError, match="max_length"):
        tok(["abcdef"], max_length=4, truncation=False)
    with pytest.raises(ValueError, match="max_length"):
        encode(tok, ["x"], 1)


# ============================================================================ text
def test_docstring_dataset_is_fixed_disjoint_and_stable_under_other_modules():
    d1, d2 = docstring_dataset(), docstring_dataset()
    assert d1 == d2
    assert not set(d1.train_texts) & set(d1.test_texts)
    assert set(range(d1.num_labels)) == set(d1.train_labels) == set(d1.test_labels)
    counts = collections.Counter(d1.train_labels)
    top = max(sorted(counts), key=counts.get)
    assert d1.majority_baseline() == pytest.approx(sum(y == top for y in d1.test_labels) / len(d1.test_labels))
    assert d1.majority_baseline() < 0.4  # five fairly balanced classes
    # the split of a module's examples does not depend on which other modules are in the task
    small = docstring_dataset(["json", "logging"], max_per_class=None)
    big = docstring_dataset(["json", "logging", "csv"], max_per_class=None)
    pick = lambda d, k, texts, labels: {t for t, y in zip(getattr(d, texts), getattr(d, labels)) if y == k}  # noqa: E731
    assert pick(small, 0, "test_texts", "test_labels") == pick(big, 0, "test_texts", "test_labels")
    with pytest.raises(ValueError, match="at least two"):
        docstring_dataset(["json"])
    with pytest.raises(ValueError, match="cannot be imported"):
        stdlib_docstrings("no_such_module_here")


def test_stdlib_sentences():
    s = stdlib_sentences(50, seed=1)
    assert len(s) == len(set(s)) == 50 and s == stdlib_sentences(50, seed=1) and s != stdlib_sentences(50, seed=2)
    assert all(5 <= len(x.split()) <= 30 and x[0].isupper() for x in s)
    with pytest.raises(ValueError, match="only"):
        stdlib_sentences(10**7)


def test_load_text_dataset_from_local_files(tmp_path):
    rows = [{"text": f"sentence number {i}", "label": ["neg", "pos"][i % 2]} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = load_text_dataset(tmp_path / "d.jsonl", test_fraction=0.3)
    assert d.label_names == ["neg", "pos"] and len(d.train_texts) + len(d.test_texts) == 40
    truth = {r["text"]: r["label"] for r in rows}
    pairs = zip(d.train_texts + d.test_texts, d.train_labels + d.test_labels)
    assert all(d.label_names[y] == truth[t] for t, y in pairs)
    (tmp_path / "t.csv").write_text("text,label\nhello there,1\ngood bye,0\n")
    d2 = load_text_dataset(tmp_path / "d.jsonl", test_source=tmp_path / "t.csv", label_field="label")
    assert len(d2.train_texts) == 40 and d2.test_texts == ["hello there", "good bye"]
    with pytest.raises(ValueError, match="no field"):
        load_text_dataset(tmp_path / "d.jsonl", text_field="body")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="cannot read"):
        load_text_dataset(tmp_path / "bad.jsonl")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ImportError, match="datasets"):
            load_text_dataset("some-user/some-hub-dataset")
    task = make_task(f"file:{tmp_path / 'd.jsonl'}", "tiny-gpt2", max_length=8)
    d_default = load_text_dataset(tmp_path / "d.jsonl")
    assert task.info["label_names"] == ["neg", "pos"] and task.train["labels"].shape[0] == len(d_default.train_texts)


# ============================================================================ planted updates and tasks
def test_planted_deltas_have_their_structure():
    D = planted_delta("lowrank", 20, 12, rank=3, seed=1, norm=2.0).numpy()
    assert np.linalg.matrix_rank(D) == 3 and np.isclose(np.linalg.norm(D), 2.0)
    F = planted_delta("frequency", 16, 12, n_coefficients=7, seed=2).numpy()
    coeffs = scipy.fft.dctn(F, type=2, norm="ortho")
    assert np.sum(np.abs(coeffs) > 1e-12) == 7 and np.linalg.matrix_rank(F) > 3
    assert np.linalg.matrix_rank(planted_delta("fullrank", 9, 7).numpy()) == 7
    with pytest.raises(ValueError, match="kind"):
        planted_delta("sparse", 4, 4)
    with pytest.raises(ValueError, match="rank"):
        planted_delta("lowrank", 4, 4, rank=5)


def test_teacher_student_task_targets_scale_and_exact_recovery():
    model, tok = load_model("tiny-gpt2", dtype=torch.float64)
    task = teacher_student_task(model, tok, "lowrank", rank=2, n_train=24, n_test=8, max_length=10, seed=0)
    assert task.targets == ["h.1.attn.c_proj", "h.1.mlp.c_proj"]
    # independent teacher: the planted ΔW added to a copy's Conv1D weights (stored transposed)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for name, D in task.info["planted"].items():
            teacher.get_submodule(name).weight.add_(D.T)
        ref = teacher(input_ids=task.test["input_ids"], attention_mask=task.test["attention_mask"]).last_hidden_state
    torch.testing.assert_close(task.test["target"], ref, **tol(torch.float64))
    assert task.eval_fn(model, task.train)["loss"] == pytest.approx(1.0, rel=1e-6)  # normalized at the start
    # a rank-2 LoRA set to the planted update's SVD factors matches the teacher exactly
    inject(model, "lora", task.targets, rank=2, seed=0)
    with torch.no_grad():
        for name, layer in adapted_layers(model).items():
            U, S, Vh = torch.linalg.svd(task.info["planted"][name])
            layer.adapter.B.copy_(U[:, :2] * S[:2] / layer.adapter.scale)
            layer.adapter.A.copy_(Vh[:2])
    metrics = task.eval_fn(model, task.test)
    assert metrics["loss"] < 1e-9 and metrics["delta_error"] < 1e-10


def test_classification_task_head_and_pooling():
    model, tok = load_model("tiny-gpt2", dtype=torch.float64)
    task = classification_task(model, tok, docstring_dataset(["json", "csv"], max_per_class=12), max_length=8)
    clf = task.model
    assert isinstance(clf, SequenceClassifier) and task.head == "classifier"
    assert all(t.startswith("backbone.") for t in task.targets) and "classifier" not in task.targets
    b = {k: v[:3] for k, v in task.train.items()}
    with torch.no_grad():
        h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        m = b["attention_mask"].double()
        pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        logits = clf(b["input_ids"], b["attention_mask"])
        torch.testing.assert_close(logits, clf.classifier(pooled), **tol(torch.float64))
    inject(clf, "lora", task.targets, rank=2, seed=0)
    task.unfreeze_head()
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(n.startswith("classifier.") or ".adapters." in n for n in trainable)
    metrics = task.eval_fn(clf, task.test)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])
    with pytest.raises(ValueError, match="num_labels"):
        SequenceClassifier(model, 1)
    with pytest.raises(ValueError, match="task must be one of"):
        make_task("nope", "tiny-gpt2")


# ============================================================================ theory helpers (real MiniLM)
LAYERS = ("encoder.layer.0.attention.self.query", "encoder.layer.5.attention.self.value")


def test_one_sgd_step_of_the_full_finetune_is_minus_lr_times_the_layer_gradient(minilm):
    model, tok = minilm
    lr = 0.5
    deltas = real_finetune_delta(LAYERS, steps=1, lr=lr, optimizer="sgd", batch_size=4, max_length=12, seed=3,
                                 model=copy.deepcopy(model), tokenizer=tok)
    trace = real_layer_gradients(LAYERS, n_batches=2, batch_size=4, max_length=12, seed=3,
                                 model=copy.deepcopy(model), tokenizer=tok)
    assert trace.layers == list(LAYERS) and trace.factors is None
    for n in LAYERS:
        G = trace.grads[n]
        assert G.shape == (2, 384, 384) and G.dtype == torch.float64
        assert float(G[0].norm()) > 0 and not torch.equal(G[0], G[1])  # two different batches
        # float32 weights: W - lr*G rounds to float32 before the difference is taken
        torch.testing.assert_close(deltas[n], -lr * G[0], rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(trace.weights[n], model.get_submodule(n).weight.double(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a module"):
        real_layer_gradients(["encoder.nope"], model=copy.deepcopy(model), tokenizer=tok)


def test_gradients_along_a_lora_run(minilm):
    model, tok = minilm
    base = real_layer_gradients(LAYERS[:1], n_batches=1, batch_size=4, max_length=12, seed=1,
                                model=copy.deepcopy(model), tokenizer=tok)
    trace = real_layer_gradients(LAYERS[:1], n_batches=3, batch_size=4, max_length=12, seed=1, lora_rank=4,
                                 lora_lr=1e-2, model=copy.deepcopy(model), tokenizer=tok)
    n = LAYERS[0]
    f = trace.factors[n]
    assert len(f) == 3 and f[0]["A"].shape == (4, 384) and f[0]["B"].shape == (384, 4)
    assert float(f[0]["B"].abs().max()) == 0.0 and float(f[2]["B"].abs().max()) > 0  # LoRA moved
    torch.testing.assert_close(trace.grads[n][0], base.grads[n][0], rtol=1e-5, atol=1e-9)  # B = 0: same weights
    assert not torch.allclose(trace.grads[n][2], trace.grads[n][0])


def test_full_finetune_delta_is_the_weight_difference(minilm):
    model, tok = minilm
    m = copy.deepcopy(model)
    before = {n: m.get_submodule(n).weight.detach().double().clone() for n in LAYERS}
    deltas, info = real_finetune_delta(LAYERS, steps=2, batch_size=4, max_length=12, model=m, tokenizer=tok,
                                       with_info=True)
    for n in LAYERS:
        torch.testing.assert_close(deltas[n], m.get_submodule(n).weight.detach().double() - before[n], rtol=0, atol=0)
        assert float(deltas[n].abs().max()) > 0
    assert len(info["losses"]) == 2 and 0 <= info["accuracy_after"] <= 1
    assert isinstance(m.get_submodule(LAYERS[0]), nn.Linear)
