r"""A minimal Llama-style decoder in plain ``torch.nn``, for memory accounting at LLM shapes.

The layout and the operators are those of Hugging Face's ``LlamaForCausalLM`` (transformers 4.4x/5.x)
as far as memory is concerned, written from its description, not copied:

* ``embed_tokens`` (vocab, hidden), frozen;
* per block: ``input_layernorm`` (RMSNorm, computed in float32 and cast back), attention with
  ``q_proj`` (H·D, hidden), ``k_proj``/``v_proj`` (H_kv·D, hidden), rotary position embedding on q and k,
  causal grouped-query attention, ``o_proj`` (hidden, H·D), residual add; ``post_attention_layernorm``,
  SwiGLU MLP :math:`W_\text{down}(\operatorname{silu}(W_\text{gate} x) \odot W_\text{up} x)`, residual add;
* final ``norm``, ``lm_head`` (vocab, hidden) -- untied as in Llama-3-8B, or tied to the embedding;
* the loss as HF's ``ForCausalLMLoss``: logits upcast to float32, cross-entropy (labels given
  already shifted).

Attention calls ``aten._scaled_dot_product_flash_attention_for_cpu`` on CPU and meta tensors: a
fused kernel that takes the K/V heads un-repeated (GQA inside the kernel) and saves for backward
what FlashAttention-2 saves on a GPU, the output and a float32 log-sum-exp per (batch, head,
token), never the T×T scores.  (``F.scaled_dot_product_attention`` on meta tensors takes the math
path, which materializes the scores; it is used on other devices.)  No dropout, no bias, no KV cache.

Linear layers are ``nn.Linear`` (bias-free) in the model dtype, or, with ``base_quant``, a
:class:`~lowrank_theory.adapters.quantized_base.QuantizedLinear` per projection (packed codes +
block scales; the embedding, norms and ``lm_head`` stay in the model dtype, as in QLoRA).

References
----------
H. Touvron et al., "Llama 2", arXiv:2307.09288; A. Grattafiori et al., "The Llama 3 Herd of Models",
arXiv:2407.21783 (shapes: hidden 4096, MLP 14336, 32 layers, 32 query / 8 KV heads of dim 128, vocab 128256);
J. Ainslie et al., "GQA", arXiv:2305.13245; J. Su et al., "RoFormer", arXiv:2104.09864;
N. Shazeer, "GLU Variants Improve Transformer", arXiv:2002.05202.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..adapters.quantized_base import SCHEMES, QuantizedLinear

__all__ = ["LLAMA3_8B", "PROJECTIONS", "Decoder", "DecoderConfig"]

#: The seven projection names of a block (PEFT's and HF's names), the default adapter targets.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DecoderConfig:
    """Shapes of a Llama-style decoder.  ``heads * head_dim`` need not equal ``hidden``."""

    hidden: int = 4096
    intermediate: int = 14336
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 128256
    tie_embeddings: bool = False
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary pairs), got {self.head_dim}")

    def with_layers(self, layers: int) -> DecoderConfig:
        """The same shapes with another number of blocks."""
        return DecoderConfig(**{**self.__dict__, "layers": layers})


#: Llama-3-8B (Grattafiori et al. 2024, Table 3): 8.03 B parameters.
LLAMA3_8B = DecoderConfig()


class RMSNorm(nn.Module):
    r""":math:`w \odot x / \sqrt{\operatorname{mean}(x^2) + \epsilon}`, computed in float32, cast back to x's dtype."""

    def __init__(self, d: int, eps: float, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention, (B, H, T, D) queries against (B, H_kv, T, D) keys/values, GQA inside the kernel."""
    if q.device.type in ("cpu", "meta"):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _linear(d_in: int, d_out: int, dtype: torch.dtype, device, base_quant: str | None) -> nn.Module:
    if base_quant is None:
        return nn.Linear(d_in, d_out, bias=False, dtype=dtype, device=device)
    return QuantizedLinear(d_in, d_out, scheme=base_quant, bias=False, dtype=dtype, device=device)


class Attention(nn.Module):
    def __init__(self, c: DecoderConfig, dtype, device, base_quant) -> None:
        super().__init__()
        self.c = c
        self.q_proj = _linear(c.hidden, c.heads * c.head_dim, dtype, device, base_quant)
        self.k_proj = _linear(c.hidden, c.kv_heads * c.head_dim, dtype, device, base_quant)
        self.v_proj = _linear(c.hidden, c.kv_heads * c.head_dim, dtype, device, base_quant)
        self.o_proj = _linear(c.heads * c.head_dim, c.hidden, dtype, device, base_quant)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(b, t, c.heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = _attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c.heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, c: DecoderConfig, dtype, device, base_quant) -> None:
        super().__init__()
        self.gate_proj = _linear(c.hidden, c.intermediate, dtype, device, base_quant)
        self.up_proj = _linear(c.hidden, c.intermediate, dtype, device, base_quant)
        self.down_proj = _linear(c.intermediate, c.hidden, dtype, device, base_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: DecoderConfig, dtype, device, base_quant) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, c.rms_eps, dtype, device)
        self.self_attn = Attention(c, dtype, device, base_quant)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.rms_eps, dtype, device)
        self.mlp = MLP(c, dtype, device, base_quant)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """The decoder; ``forward(ids, labels)`` returns the mean cross-entropy (a 0-d float32 tensor).

    Parameters
    ----------
    config : DecoderConfig
    dtype : torch.dtype, default bfloat16
        Dtype of every float weight (and of the activations).
    device : torch.device or str, optional
        ``"meta"`` builds it without storage (any size, no memory).
    base_quant : {None, "nf4", "int8"}
        Store the seven projections of every block as packed :class:`QuantizedLinear`.
    checkpointing : bool
        Recompute each block in the backward (``torch.utils.checkpoint``, non-reentrant, as HF's
        ``gradient_checkpointing_enable``); only the blocks' inputs are saved across the forward.
    """

    def __init__(self, config: DecoderConfig, *, dtype: torch.dtype = torch.bfloat16, device=None,
                 base_quant: str | None = None, checkpointing: bool = False) -> None:
        super().__init__()
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}")
        if base_quant is not None and base_quant not in SCHEMES:
            raise ValueError(f"base_quant must be None or one of {SCHEMES}, got {base_quant!r}")
        c = self.config = config
        self.checkpointing = bool(checkpointing)
        self.embed_tokens = nn.Embedding(c.vocab, c.hidden, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Block(c, dtype, device, base_quant) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.rms_eps, dtype, device)
        self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False, dtype=dtype, device=device)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32, device=device)
                                           / c.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.requires_grad_(False)

    def _rope(self, t: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(t, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        cos, sin = self._rope(ids.shape[1], h.dtype)
        for block in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, cos, sin, use_reentrant=False, preserve_rng_state=False)
            else:
                h = block(h, cos, sin)
        logits = self.lm_head(self.norm(h)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))
