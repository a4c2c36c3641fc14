"""The training step of every adapter issue #8 times is one graph with no host sync.

``torch.compile(fullgraph=True)`` raises on any graph break.  A data-dependent Python branch
(``bool(t)``, ``t.item()``, ``nonzero``) is one, and in eager CUDA the same line is a host sync that
stalls the launch queue and rules out CUDA graphs (``mode="reduce-overhead"``).  So on the CPU the
fullgraph capture is the check that the step (forward and backward) has none; the ``gpu`` tests
check it directly with ``torch.cuda.set_sync_debug_mode("error")`` and run the CUDA-graph mode.

Reference: the same layer run eagerly.  Tolerance 1e-5 relative in float32: the compiled graph
runs the same operations after AOTAutograd's decompositions, which may reorder a reduction
(a few ulps per sum of at most 40 terms); a wrong operation would differ at O(1).
"""

from __future__ import annotations

import pytest
import torch

from tests.adapters.contract import adapted_layer, relerr

CUDA = torch.cuda.is_available()
#: (registry name, config) for each method issue #8 measures, both paths of the transform adapters
CASES = [
    ("lora", {"rank": 4}),
    ("dora", {"rank": 4}),
    ("vera", {"rank": 16}),
    ("fourierft", {"n_frequency": 40, "path": "dense"}),
    ("fourierft", {"n_frequency": 40, "path": "structured"}),
    ("loca", {"n_frequency": 40, "path": "dense"}),
    ("loca", {"n_frequency": 40, "path": "structured"}),
    ("randlora", {"rank": 4}),
]
IDS = [f"{n}-{c.get('path', 'default')}" for n, c in CASES]


def _step(layer, x, gy):
    x = x.detach().clone().requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    y = layer(x)
    y.backward(gy)
    return [y.detach(), x.grad] + [p.grad for p in params]


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=IDS)
def test_step_compiles_to_one_graph_and_matches_eager(name, cfg):
    x, gy = torch.randn(2, 5, 40), torch.randn(2, 5, 24)
    layer = adapted_layer(name, cfg, 40, 24)
    ref = _step(layer, x, gy)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = _step(compiled, x, gy)
    got2 = _step(compiled, x, gy)  # a second call reuses the graph (no recompile-dependent state)
    assert len(got) == len(ref) >= 3
    for a, b, c in zip(got, got2, ref):
        assert relerr(a, c) < 1e-5
        assert relerr(b, c) < 1e-5


def test_negative_control_a_host_read_breaks_the_graph():
    """The check can fail: a layer that reads a tensor's value in Python is refused by fullgraph."""

    class Syncing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            return y * 2 if bool((y > 0).any()) else y

    torch._dynamo.reset()
    with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)):
        torch.compile(Syncing(), fullgraph=True, backend="aot_eager")(torch.randn(3, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize(("name", "cfg"), CASES, ids=IDS)
def test_eager_cuda_step_has_no_host_sync(name, cfg):
    """bf16 step on CUDA under ``set_sync_debug_mode("error")``: any synchronizing call raises."""
    layer = adapted_layer(name, cfg, 256, 128, "cuda", torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    _step(layer, x, gy)  # warm-up: caches (W0's row norms, DCT twiddles) are built here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _step(layer, x, gy)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(t.float()).all() for t in out)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize(("name", "cfg"), CASES, ids=IDS)
def test_cuda_graph_mode_matches_eager(name, cfg):
    """``torch.compile(mode="reduce-overhead")`` (CUDA graphs) gives the eager step, float32, 1e-4
    relative (inductor's fused kernels reorder float32 sums; TF32 is off by default for matmuls)."""
    layer = adapted_layer(name, cfg, 256, 128, "cuda")
    x = torch.randn(64, 256, device="cuda")
    gy = torch.randn(64, 128, device="cuda")
    ref = _step(layer, x, gy)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # record, then replay
        torch.compiler.cudagraph_mark_step_begin()
        got = [t.clone() for t in _step(compiled, x, gy)]
    for a, b in zip(got, ref):
        assert relerr(a, b) < 1e-4
