"""``training_step_memory``: the meta-device trace against a real run, closed forms, FSDP arithmetic, NF4 storage.

Byte counts are exact integers, so every comparison below is exact (no tolerance): the trace counts
storages created by operators, and a real run of the same code on the CPU creates storages of the same
sizes.  The tiny decoder has every feature of the Llama one (GQA with 2 query heads per KV head, a
SwiGLU MLP wider than the model, rotary embedding, untied head) at sizes that run for real in milliseconds.
"""

from __future__ import annotations

import pytest
import torch

from lowrank_theory.adapters.quantized_base import QuantizedLinear
from lowrank_theory.theory import llm_memory
from lowrank_theory.theory.llm_decoder import LLAMA3_8B, PROJECTIONS, Decoder, DecoderConfig
from lowrank_theory.theory.llm_memory import (
    METHODS,
    PackedLinearForPeft,
    build_model,
    combine,
    measure,
    static_bytes,
    trace_step,
    training_step_memory,
)

TINY = DecoderConfig(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=256)
TINY4 = TINY.with_layers(4)
SEQ, BATCH = 32, 2


def _proj_shapes(c: DecoderConfig) -> list[tuple[int, int]]:
    """(d_out, d_in) of the seven projections of a block."""
    q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
    return [(q, c.hidden), (kv, c.hidden), (kv, c.hidden), (c.hidden, q),
            (c.intermediate, c.hidden), (c.intermediate, c.hidden), (c.hidden, c.intermediate)]


# ----------------------------------------------------------------------------- measured = real
@pytest.mark.parametrize("method, impl, quant, ckpt", [
    ("lora_r16", "ours", None, False), ("lora_r16", "peft", None, True), ("dora_r16", "ours", None, False),
    ("dora_r16", "peft", "nf4", True),
    ("vera_r256", "ours", "nf4", False), ("fourierft_n1000", "ours", None, True), ("randlora_r32", "ours", None, False),
    ("adalora_r16", "ours", "nf4", True),
])
def test_meta_trace_equals_a_real_run_to_the_byte(method, impl, quant, ckpt):
    kw = dict(impl=impl, base_quant=quant, checkpointing=ckpt)
    real = trace_step(build_model(method, TINY, device="cpu", **kw), batch=BATCH, seq_len=SEQ)
    meta = trace_step(build_model(method, TINY, device="meta", **kw), batch=BATCH, seq_len=SEQ)
    assert real[1] > BATCH * SEQ * TINY.vocab * 4  # at least the float32 logits
    assert meta == real


def test_peft_fourierft_copies_its_host_indices_to_the_device_every_forward():
    """PEFT keeps FourierFT's (2, n) int64 indices in a plain dict, which ``model.to(device)`` does not move, and
    calls ``indices.to(spectrum.device)`` in every forward: a 16 kB copy per layer (n = 1000) that a real CPU run
    skips (same device) and the meta trace -- like a GPU -- counts, each kept alive for the backward."""
    real = trace_step(build_model("fourierft_n1000", TINY, impl="peft", device="cpu"), batch=BATCH, seq_len=SEQ)
    meta = trace_step(build_model("fourierft_n1000", TINY, impl="peft", device="meta"), batch=BATCH, seq_len=SEQ)
    assert meta[1] - real[1] == 7 * TINY.layers * 2 * 1000 * 8


def test_peft_randlora_upcasts_to_float32_on_the_cpu_only():
    """PEFT's RandLoRA computes in float32 when the device is a CPU (``cast_to_fp32 = device.type == "cpu"``,
    for slow bf16 CPU matmuls); on a GPU -- and in the meta trace -- it stays in bf16, so the real CPU run
    holds more.  Our RandLoRA has no device-dependent path: its meta trace equals the CPU run (above)."""
    real = trace_step(build_model("randlora_r32", TINY, impl="peft", device="cpu"), batch=BATCH, seq_len=SEQ)
    meta = trace_step(build_model("randlora_r32", TINY, impl="peft", device="meta"), batch=BATCH, seq_len=SEQ)
    assert meta[1] < real[1]


def test_the_real_step_computes_gradients_and_the_hooks_are_removed():
    model = build_model("lora_r16", TINY, device="cpu")
    trace_step(model, batch=BATCH, seq_len=SEQ)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- closed forms
def test_static_bytes_equal_the_closed_form_for_lora():
    r, c = 16, TINY.with_layers(3)
    st = static_bytes(build_model("lora_r16", c))
    shapes = _proj_shapes(c)
    P = c.layers * sum(r * (m + n) for m, n in shapes)
    base_numel = 2 * c.vocab * c.hidden + c.hidden + c.layers * (sum(m * n for m, n in shapes) + 2 * c.hidden)
    assert st.trainable == P and st.trainable_bytes == 2 * P
    assert st.base_params == 2 * base_numel
    assert st.base_buffers == 4 * c.head_dim // 2  # the rotary frequencies, float32
    assert st.root_group == 2 * (2 * c.vocab * c.hidden + c.hidden) + 4 * c.head_dim // 2  # + rotary buffer
    assert st.block_group == 2 * (sum(m * n for m, n in shapes) + 2 * c.hidden) + 2 * P // c.layers


def test_llama3_8b_parameter_counts():
    """8,030,261,248 parameters (Llama-3-8B's published count); LoRA r=16 on all seven projections: 41,943,040."""
    st = static_bytes(build_model("lora_r16", LLAMA3_8B))
    assert st.base_params == 2 * 8_030_261_248
    assert st.trainable == 41_943_040


def test_total_is_the_stated_formula_for_one_device():
    st, caches, act = measure("dora_r16", TINY, seq_len=SEQ, batch=BATCH)
    m = combine("dora_r16", "ours", st, caches=caches, activations=act, fsdp_ranks=1)
    P = st.trainable
    hand = st.base_params + st.base_buffers + st.adapter_buffers + 2 * P + 16 * P + caches + max(act, 8 * P)
    assert m.total == hand
    assert (m.master, m.grads, m.optimizer) == (4 * P, 4 * P, 8 * P)


def test_negative_control_a_gradient_counted_in_bf16_changes_the_total(monkeypatch):
    st, caches, act = measure("lora_r16", TINY, seq_len=SEQ, batch=BATCH)
    P = st.trainable
    hand = st.base_params + st.base_buffers + 18 * P + caches + max(act, 8 * P)
    monkeypatch.setattr(llm_memory, "GRAD_BYTES", 2)
    assert combine("lora_r16", "ours", st, caches=caches, activations=act, fsdp_ranks=1).total == hand - 2 * P


# ----------------------------------------------------------------------------- FSDP
def _fsdp_hand(c: DecoderConfig, method_rank: int, R: int, act: int, g: int = 1, nf4: bool = False) -> int:
    """Per-rank bytes from the config alone (LoRA of rank r on the seven projections)."""
    shapes = _proj_shapes(c)
    p_block = sum(method_rank * (m + n) for m, n in shapes)
    P = c.layers * p_block
    proj = sum(m * n for m, n in shapes)
    proj_bytes = sum(m * n // 2 + 4 * (m * n // 64) for m, n in shapes) if nf4 else 2 * proj
    block = proj_bytes + 2 * 2 * c.hidden + 2 * p_block
    root = 2 * (2 * c.vocab * c.hidden + c.hidden) + 4 * c.head_dim // 2  # embedding, head, norm, rotary buffer
    base = c.layers * (proj_bytes + 4 * c.hidden) + root
    ceil = lambda x: -(-x // R)  # noqa: E731
    return ceil(base) + ceil(4 * P) * 2 + ceil(8 * P) + root + g * block + max(act, ceil(8 * P))


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("R", [2, 8])
def test_fsdp_per_rank_total_matches_the_hand_formula(R, nf4):
    c = TINY.with_layers(3)
    quant = "nf4" if nf4 else None
    m = training_step_memory("lora_r16", c, seq_len=SEQ, batch=BATCH, fsdp_ranks=R, base_quant=quant)
    assert m.caches == 0
    assert m.total == _fsdp_hand(c, 16, R, m.activations, nf4=nf4)
    m2 = training_step_memory("lora_r16", c, seq_len=SEQ, batch=BATCH, fsdp_ranks=R, base_quant=quant,
                              gathered_blocks=2)
    assert m2.total == _fsdp_hand(c, 16, R, m.activations, g=2, nf4=nf4)
    # packed codes as FSDP2 treats buffers today: whole on every rank
    codes = sum(m_ * n // 2 + 4 * (m_ * n // 64) for m_, n in _proj_shapes(c)) * c.layers if nf4 else 0
    inv_freq = 4 * c.head_dim // 2
    assert m.base_replicated_total - m.total == (codes + inv_freq) - (-(-(codes + inv_freq) // R))


def test_negative_control_forgetting_the_all_gather_fails_the_formula():
    c = TINY.with_layers(3)
    m = training_step_memory("lora_r16", c, seq_len=SEQ, batch=BATCH, fsdp_ranks=8)
    hand = _fsdp_hand(c, 16, 8, m.activations)
    assert m.total == hand
    assert m.total - m.gathered != hand  # the formula without the gathered groups does not match
    assert m.gathered > 0


def test_more_ranks_never_hold_more():
    st, caches, act = measure("vera_r256", TINY, seq_len=SEQ, batch=BATCH)
    totals = [combine("vera_r256", "ours", st, caches=caches, activations=act, fsdp_ranks=R).total
              for R in (2, 4, 8, 16)]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]


# ----------------------------------------------------------------------------- checkpointing, extrapolation
def test_checkpointing_lowers_the_activation_peak():
    c = TINY.with_layers(4)
    off, on = (measure("lora_r16", c, seq_len=128, batch=BATCH, checkpointing=k, trace_layers=None)[2]
               for k in (False, True))
    assert on < off


@pytest.mark.parametrize("method, impl, quant", [
    ("lora_r16", "ours", None), ("dora_r16", "ours", "nf4"), ("vera_r256", "ours", None), ("vera_r256", "peft", "nf4"),
    ("randlora_r32", "peft", None),
])
@pytest.mark.parametrize("ckpt", [False, True])
def test_the_per_block_extrapolation_equals_the_full_trace(method, impl, quant, ckpt):
    """Activations, caches and every static byte count: traced at 2 and 3 blocks and extrapolated to 4, equal to the
    4-block model's.  Shared tensors (PEFT's one VeRA/RandLoRA pair) are constant in the depth, per-layer ones
    linear."""
    kw = dict(seq_len=SEQ, batch=BATCH, impl=impl, base_quant=quant, checkpointing=ckpt)
    assert measure(method, TINY4, trace_layers=(2, 3), **kw) == measure(method, TINY4, trace_layers=None, **kw)


def test_one_block_is_not_yet_on_the_line_with_checkpointing():
    """Why ``trace_layers`` starts at 2: with checkpointing, extrapolating from 1 block misses the full trace."""
    full = measure("lora_r16", TINY4, seq_len=SEQ, batch=BATCH, checkpointing=True, trace_layers=None)
    assert measure("lora_r16", TINY4, seq_len=SEQ, batch=BATCH, checkpointing=True, trace_layers=(1, 2)) != full


def test_the_extrapolation_is_exact_at_llama_shapes():
    """Four Llama-3-8B blocks, traced in full vs extrapolated from 2 and 3 (the benchmark checks 32)."""
    c = LLAMA3_8B.with_layers(4)
    kw = dict(seq_len=128, checkpointing=True)
    assert measure("lora_r16", c, trace_layers=(2, 3), **kw)[1:] == measure("lora_r16", c, trace_layers=None,
                                                                            **kw)[1:]


# ----------------------------------------------------------------------------- NF4
def test_nf4_projection_storage_is_at_most_0_3_of_bf16():
    bf16 = build_model("lora_r16", LLAMA3_8B)
    nf4 = build_model("lora_r16", LLAMA3_8B, base_quant="nf4")
    packed = [m for m in nf4.modules() if isinstance(m, QuantizedLinear)]
    assert len(packed) == 7 * LLAMA3_8B.layers
    q_bytes = sum(m.storage_bytes() for m in packed)
    b_bytes = sum(2 * m.out_features * m.in_features for m in packed)
    assert q_bytes / b_bytes == (0.5 + 4 / 64) / 2 == 0.28125  # 4-bit codes + one float32 scale per 64, vs 16 bits
    assert q_bytes / b_bytes <= 0.3
    s16, s4 = static_bytes(bf16), static_bytes(nf4)
    assert s16.base_params + s16.base_buffers - (s4.base_params + s4.base_buffers) == b_bytes - q_bytes


def test_peft_runs_its_own_code_over_the_packed_base():
    torch.manual_seed(0)
    W = torch.randn(24, 16)
    q = QuantizedLinear.from_weight(W, None)
    wrapped = PackedLinearForPeft(q)
    x = torch.randn(3, 16)
    assert torch.equal(wrapped(x), q(x))
    assert torch.equal(wrapped.weight, q.dequantize())
    model = build_model("lora_r16", TINY, impl="peft", base_quant="nf4", device="cpu")
    layer = model.base_model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__.startswith("peft.") and isinstance(layer.base_layer, PackedLinearForPeft)


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs, arg", [
    ({"method": "nope"}, "method"), ({"fsdp_ranks": 0}, "fsdp_ranks"), ({"seq_len": 0}, "seq_len"),
    ({"batch": 0}, "batch"), ({"impl": "hf"}, "impl"), ({"base_quant": "nf3"}, "base_quant"),
    ({"trace_layers": (3, 2)}, "trace_layers"), ({"trace_layers": (1, 2)}, "trace_layers"),
    ({"gathered_blocks": 0}, "gathered_blocks"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, arg):
    kw = {"method": "lora_r16", **kwargs}
    with pytest.raises(ValueError, match=arg):
        training_step_memory(kw.pop("method"), TINY, **kw)


def test_bad_config_and_dtype():
    with pytest.raises(TypeError, match="config"):
        training_step_memory("lora_r16", {"hidden": 64})
    with pytest.raises(TypeError, match="base_dtype"):
        training_step_memory("lora_r16", TINY, base_dtype=torch.int8)
    with pytest.raises(ValueError, match="kv_heads"):
        DecoderConfig(heads=6, kv_heads=4)


def test_every_method_has_a_peer_and_targets_default_to_the_seven_projections():
    assert all(spec.peft is not None for spec in METHODS.values())
    assert PROJECTIONS == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert isinstance(build_model("lora_r16", TINY), Decoder)


@pytest.mark.parametrize("method, impl", [("fourierft_n1000", "ours"), ("fourierft_n1000", "peft")])
def test_fast_init_builds_the_same_adapters(method, impl):
    """``fast_init`` (memoized randperm while building) gives the adapters the seeds give, tensor for tensor."""
    states = [build_model(method, TINY, impl=impl, device="cpu", fast_init=fast).state_dict() for fast in (False, True)]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    peft_ft = build_model(method, TINY, impl=impl, device="cpu", fast_init=True)
    held = [t for m in peft_ft.modules() for t in getattr(m, "indices", {}).values()]  # PEFT's unregistered indices
    ref = [t for m in build_model(method, TINY, impl=impl, device="cpu").modules()
           for t in getattr(m, "indices", {}).values()]
    assert len(held) == len(ref) and all(torch.equal(a, b) for a, b in zip(held, ref))


def test_the_randperm_memo_leaves_the_generator_where_a_real_call_would():
    from lowrank_theory.theory.llm_memory import _memoized_randperm

    def draws():
        g = torch.Generator().manual_seed(3)
        return torch.randperm(50, generator=g), torch.rand(4, generator=g)

    ref = [draws(), draws()]
    with _memoized_randperm(True):
        got = [draws(), draws()]  # the second is answered from the memo
    for (p1, r1), (p2, r2) in zip(ref, got):
        assert torch.equal(p1, p2) and torch.equal(r1, r2)
    assert torch.randperm is not None and torch.randperm(5).sort().values.tolist() == list(range(5))


# ----------------------------------------------------------------------------- what the accounting found and fixed
@pytest.mark.parametrize("method", ["vera_r256", "randlora_r32"])
def test_our_frozen_random_pair_is_one_copy_after_injection_as_peft_holds_it(method):
    """VeRA's and RandLoRA's layers slice one shared frozen pair; injecting into a bf16 (or GPU) model used to
    convert each layer's slice on its own, one private copy per layer (VeRA r=256 on Llama-3-8B: 1.25 GiB vs 14 MiB)."""
    ours, peft = (static_bytes(build_model(method, TINY.with_layers(3), impl=i)) for i in ("ours", "peft"))
    assert ours.adapter_buffers == peft.adapter_buffers > 0


def test_negative_control_converting_each_layer_on_its_own_gives_private_copies():
    from lowrank_theory import adapters
    from lowrank_theory.training.injection import _cast_floating

    layers = [adapters.create("vera", 32, 48, rank=8, basis_shape=(32, 48)) for _ in range(3)]
    alone = [_cast_floating(a, torch.bfloat16, torch.device("cpu")) for a in layers]
    assert len({a.vera_A.untyped_storage().data_ptr() for a in alone}) == 3
    memo: dict = {}
    layers = [adapters.create("vera", 32, 48, rank=8, basis_shape=(32, 48)) for _ in range(3)]
    shared = [_cast_floating(a, torch.bfloat16, torch.device("cpu"), memo) for a in layers]
    assert len({a.vera_A.untyped_storage().data_ptr() for a in shared}) == 1
    assert all(a.vera_A.dtype == torch.bfloat16 for a in shared)
    assert torch.equal(shared[0].vera_A, alone[0].vera_A)  # same values either way


def test_randlora_scaled_basis_gradient_is_autograd_s():
    """Our RandLoRA's λ·A·γ keeps only λ, A, γ for the backward (as PEFT's UniqueBaseGrad); its gradients are
    those of the plain product (float64 gradcheck)."""
    from lowrank_theory.adapters.random_basis import _ScaledBasis

    g = torch.Generator().manual_seed(0)
    for n_a in (1, 3):
        lam = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
        A = torch.randn(n_a, 4, 5, dtype=torch.float64, generator=g)
        gamma = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(lambda lam, gamma, A=A: _ScaledBasis.apply(lam, A, gamma), (lam, gamma))
        assert torch.equal(_ScaledBasis.apply(lam, A, gamma), lam[:, :, None] * A * gamma[:, None, :])


def test_our_randlora_step_holds_no_more_than_peft_s():
    """Non-square projections (MLP 4x wider), where autograd's saved λ·A product (p×p per layer) showed."""
    c = DecoderConfig(hidden=256, intermediate=1024, layers=2, heads=4, kv_heads=2, head_dim=64, vocab=512)
    ours, peft = (measure("randlora_r32", c, seq_len=64, impl=i, trace_layers=None)[2] for i in ("ours", "peft"))
    assert ours <= peft
