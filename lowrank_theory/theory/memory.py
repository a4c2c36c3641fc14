r"""Peak tensor memory of a computation, measured without running its arithmetic.

:func:`peak_tensor_bytes` runs a callable (typically one forward + backward of a layer) under
PyTorch's ``FakeTensorMode``: every operator computes only the shape, dtype and device of its
result, so a step at GPU sizes (d = 4096, 8192 tokens) takes milliseconds on any machine.  A
``TorchDispatchMode`` beneath it records each new storage an operator returns and notices, through
weak references, when the last tensor on it dies; the peak of the live total is

.. math:: M_\text{peak} = \max_k \sum_{s\ \text{alive after op}\ k} \text{bytes}(s).

It counts every tensor that autograd saves or creates (activations, gradients, temporaries) and
nothing else: storages that existed before the call (parameters, caller's inputs) are excluded, and
so are what a device library allocates outside PyTorch's tensors (cuBLAS/cuFFT workspaces) and
the rounding of a caching allocator.  It is therefore the allocation profile of the *algorithm*,
the same on every device, and comparable between two implementations of one layer; a device's
``max_memory_allocated`` adds its workspaces on top.

Reference: S. Williams, A. Waterman, D. Patterson, "Roofline" (CACM 2009) for the byte side of the
cost model this complements (:mod:`lowrank_theory.theory.complexity`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["PeakTracker", "peak_tensor_bytes", "step_peak_bytes"]


class PeakTracker(TorchDispatchMode):
    """Tracks the bytes of live storages created by operators inside the context, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _collect(self) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._collect()
        # a return that aliases an input (a view, or the result of an in-place op) allocates nothing
        returns = func._schema.returns
        for ret, res in zip(returns, out if len(returns) > 1 else (out,)):
            if ret.alias_info is not None:
                continue
            for t in res if isinstance(res, (list, tuple)) else (res,):
                if isinstance(t, torch.Tensor):
                    self._add(t)
        self.peak = max(self.peak, self.current)
        return out

    def _add(self, t: torch.Tensor) -> None:
        ref = StorageWeakRef(t.untyped_storage())
        if ref.cdata not in self._live:
            nbytes = t.untyped_storage().nbytes()
            self._live[ref.cdata] = (ref, nbytes)
            self.current += nbytes


def peak_tensor_bytes(fn: Callable[[], Any], *, fake: bool = True) -> int:
    """Peak bytes of tensor storage alive at once while ``fn()`` runs, beyond what existed before.

    Parameters
    ----------
    fn : callable
        Takes no arguments.  With ``fake``, tensors it creates itself (``torch.randn(...)``) are
        fake; tensors it closes over (a module's parameters) are used as they are.  Its result is
        dropped before the count ends, so an output that ``fn`` returns counts only while alive
        inside it.
    fake : bool, default True
        Run under ``FakeTensorMode`` (no arithmetic: shapes and dtypes only).  ``False`` runs the
        real computation and counts the same way (slower; for checking the fake count).  With
        ``fake``, what ``fn`` leaves on real objects is fake: gradients a backward accumulates into
        real parameters (set them to None afterwards, or measure a copy).  The library's own caches
        (DoRA's row norms of W0, the DCT's twiddles) are not filled during a fake run.

    Returns
    -------
    int
        :math:`M_\\text{peak}` in bytes (see the module docstring for what it includes).
    """
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True), PeakTracker() as tracker:
            fn()
    else:
        with PeakTracker() as tracker:
            fn()
    return int(tracker.peak)


def step_peak_bytes(layer: torch.nn.Module, tokens: int, d_in: int, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", fake: bool = True) -> int:
    """:func:`peak_tensor_bytes` of one training step of ``layer``: forward of a (tokens, d_in) input
    that requires grad (so dx is computed, as inside a network), backward of a random output
    gradient.  Both tensors are made inside the count.  Gradients it leaves on the layer's
    parameters are fake with ``fake``: measure a copy, or set them to None afterwards."""

    def step() -> None:
        y = layer(torch.randn(tokens, d_in, dtype=dtype, device=device, requires_grad=True))
        y.backward(torch.randn_like(y))

    return peak_tensor_bytes(step, fake=fake)

