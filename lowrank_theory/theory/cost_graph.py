r"""A symbolic trace of eager PyTorch kernels: FLOPs, bytes and launches, forward and backward.

:mod:`lowrank_theory.theory.adapter_costs` writes each adapter's forward pass op by op on a
:class:`CostGraph` -- the same products, element-wise ops, gathers and FFTs, on tensors that
carry only a shape, an element size and a ``requires_grad`` flag.  Each op records what one
eager kernel costs and what its backward kernels cost (the derivative rules of autograd), and
:meth:`CostGraph.cost` adds up the live part of the graph.

Cost of one kernel
------------------
* **FLOPs**: a multiply-add counts 2, so a product :math:`(M\times K)(K\times N)` costs
  :math:`2MKN` (the convention of ``torch.utils.flop_counter``, which the tests compare with);
  an element-wise op costs its flops per output element times the output size; a complex
  FFT of length :math:`L` costs :math:`5L\log_2 L` and a real one half of that (the usual
  radix-2 count, as FFTW's benchmark reports "mflops").
* **Bytes**: every kernel reads each input once and writes its output once from main memory
  (no fusion, no cache reuse between kernels -- eager mode on data larger than the caches).
* **Launches**: one per kernel; the backward of an op adds one per input gradient it computes
  (plus a reduction when the input was broadcast) and one ``add`` per extra consumer of a
  tensor whose gradients must be summed.

Gradients run only where autograd runs them: for inputs that require grad, of ops whose output
reaches the traced output (an op whose result is discarded, as the base product that HUT's
layer ignores, gets no backward).  Leaf gradients are assumed freshly allocated
(``zero_grad(set_to_none=True)``, PyTorch's default), so no accumulation into ``.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["Cost", "CostGraph", "Op", "T"]


class Op(NamedTuple):
    """One kernel: its name, FLOPs (all / by matrix products), bytes moved, pass and part."""

    name: str
    flops: float
    matmul_flops: float
    bytes: float
    phase: str = "fwd"  # "fwd" | "bwd"
    part: str = "adapter"  # "base" | "adapter"


@dataclass(frozen=True)
class Cost:
    r"""FLOPs, bytes and kernel launches of a computation (sums over :attr:`ops`).

    Attributes
    ----------
    flops : float
        Floating-point operations, a multiply-add counted as 2.
    bytes : float
        Bytes read plus written by the kernels, each on its own.
    matmul_flops : float
        The part of ``flops`` done by matrix products and convolutions (what
        ``torch.utils.flop_counter.FlopCounterMode`` counts).
    launches : int
        Number of kernels.
    ops : tuple of Op
        The kernels themselves (for the per-kernel roofline).
    """

    flops: float = 0.0
    bytes: float = 0.0
    matmul_flops: float = 0.0
    launches: int = 0
    ops: tuple[Op, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_ops(cls, ops: Iterable[Op]) -> Cost:
        ops = tuple(ops)
        return cls(flops=float(sum(o.flops for o in ops)), bytes=float(sum(o.bytes for o in ops)),
                   matmul_flops=float(sum(o.matmul_flops for o in ops)), launches=len(ops), ops=ops)

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost.from_ops(self.ops + other.ops)

    @property
    def other_flops(self) -> float:
        """FLOPs not done by matrix products (element-wise ops, FFTs, reductions)."""
        return self.flops - self.matmul_flops

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte (``inf`` when no byte moves)."""
        return self.flops / self.bytes if self.bytes else math.inf

    def select(self, *, phase: str | None = None, part: str | None = None) -> Cost:
        """The kernels of one ``phase`` ("fwd"/"bwd") and/or ``part`` ("base"/"adapter")."""
        return Cost.from_ops(o for o in self.ops if (phase is None or o.phase == phase)
                             and (part is None or o.part == part))

    def as_dict(self) -> dict[str, float]:
        return dict(flops=self.flops, matmul_flops=self.matmul_flops, bytes=self.bytes, launches=self.launches)


class T:
    """A symbolic tensor: shape, bytes per element, whether it requires grad."""

    __slots__ = ("eb", "grad", "id", "name", "shape")

    def __init__(self, shape: Sequence[int], eb: float, grad: bool, name: str, id_: int) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.eb, self.grad, self.name, self.id = float(eb), bool(grad), name, id_

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> float:
        return self.numel * self.eb

    def __repr__(self) -> str:
        return f"T({self.name or self.id}, {self.shape}, eb={self.eb:g}, grad={self.grad})"


class _Rec(NamedTuple):
    inputs: tuple[T, ...]
    out: T
    fwd: tuple[Op, ...]
    bwd: tuple[tuple[int, tuple[Op, ...]], ...]  # (input index, kernels computing its gradient)
    part: str


def _fft_flops(length: int, rows: int, real: bool) -> float:
    if length <= 1:
        return 0.0
    f = 5.0 * length * math.log2(length) * rows
    return f / 2 if real else f


class CostGraph:
    """Records ops on symbolic tensors; :meth:`cost` sums the forward and/or backward kernels.

    Parameters
    ----------
    eb : float
        Bytes per element of the working dtype (4 for float32, 2 for bfloat16).
    """

    INDEX_BYTES = 8.0  # int64 indices

    def __init__(self, eb: float) -> None:
        self.eb = float(eb)
        self.recs: list[_Rec] = []
        self.part = "adapter"
        self._ids = 0
        self._grad_enabled = True
        self.params: list[T] = []

    # ------------------------------------------------------------------ tensors
    def _new(self, shape: Sequence[int], eb: float | None, grad: bool, name: str = "") -> T:
        self._ids += 1
        return T(shape, self.eb if eb is None else eb, grad and self._grad_enabled, name, self._ids)

    def input(self, shape: Sequence[int], *, grad: bool, eb: float | None = None, name: str = "x") -> T:
        """An input activation (``grad`` as the layer's input requires grad)."""
        return self._new(shape, eb, grad, name)

    def param(self, shape: Sequence[int], *, eb: float | None = None, name: str = "") -> T:
        """A trainable tensor (counted in :attr:`params`)."""
        t = self._new(shape, eb, True, name)
        self.params.append(t)
        return t

    def buffer(self, shape: Sequence[int], *, eb: float | None = None, name: str = "") -> T:
        """A frozen tensor (weights, bases, indices are passed as ``eb=INDEX_BYTES``)."""
        return self._new(shape, eb, False, name)

    @contextmanager
    def no_grad(self):
        prev, self._grad_enabled = self._grad_enabled, False
        try:
            yield
        finally:
            self._grad_enabled = prev

    @contextmanager
    def as_part(self, part: str):
        prev, self.part = self.part, part
        try:
            yield
        finally:
            self.part = prev

    def view(self, a: T, shape: Sequence[int], *, eb: float | None = None, bwd_kernels: int = 0) -> T:
        """A reshape/transpose/slice/``.real`` that launches nothing forward.

        ``bwd_kernels`` is the number of kernels its backward launches, each writing the input's
        size: 2 for a strided slice (``slice_backward``: zeros, then a copy into the slice), 1
        for ``.real`` of a complex tensor (the real gradient is made complex).
        """
        out = self._new(shape, a.eb if eb is None else eb, a.grad, a.name)
        back = tuple(self._op("view_grad", 0.0, a.nbytes + out.nbytes, bwd=True) for _ in range(bwd_kernels))
        self._record("view", (a,), out, (), {0: back})
        return out

    # ------------------------------------------------------------------ recording
    def _op(self, name: str, flops: float = 0.0, nbytes: float = 0.0, *, matmul: bool = False,
            bwd: bool = False) -> Op:
        phase = "bwd" if bwd else "fwd"
        return Op(name, float(flops), float(flops) if matmul else 0.0, float(nbytes), phase, self.part)

    def _record(self, name: str, inputs: tuple[T, ...], out: T, fwd: tuple[Op, ...],
                bwd: dict[int, tuple[Op, ...]]) -> T:
        del name
        keep = tuple((i, ops) for i, ops in bwd.items() if inputs[i].grad and out.grad)
        self.recs.append(_Rec(inputs, out, fwd, keep, self.part))
        return out

    def _reduce_to(self, src_numel: int, dst: T, eb: float) -> tuple[Op, ...]:
        """Backward of broadcasting: sum a gradient of ``src_numel`` elements down to ``dst``."""
        if dst.numel == src_numel:
            return ()
        return (self._op("sum_to", src_numel, eb * (src_numel + dst.numel), bwd=True),)

    # ------------------------------------------------------------------ ops
    def mm(self, a: T, b: T, name: str = "mm") -> T:
        """``a @ b`` for a (..., M, K) and a matrix b (K, N) (the leading axes of a fold into rows)."""
        if len(b.shape) != 2 or b.shape[0] != a.shape[-1]:
            raise ValueError(f"mm: expected a (..., K) and b (K, N), got a {a.shape} @ b {b.shape}")
        K, N = b.shape
        rows = math.prod(a.shape[:-1])
        lead = a.shape[:-1]
        eb = max(a.eb, b.eb)
        out = self._new((*lead, N), eb, a.grad or b.grad)
        f = 2.0 * rows * K * N
        mem = a.nbytes + b.nbytes + out.nbytes
        return self._record(name, (a, b), out, (self._op(name, f, mem, matmul=True),),
                            {0: (self._op(name + "_grad_a", f, mem, matmul=True, bwd=True),),
                             1: (self._op(name + "_grad_b", f, mem, matmul=True, bwd=True),)})

    def conv2d(self, x: T, w: T, out_hw: tuple[int, int], name: str = "conv2d") -> T:
        """Convolution of x (B, C, H, W) with w (O, C, kh, kw) to (B, O, *out_hw), groups 1."""
        B, C = x.shape[:2]
        O, C2, kh, kw = w.shape
        if C2 != C:
            raise ValueError(f"conv2d: channels differ, x {x.shape} w {w.shape}")
        out = self._new((B, O, *out_hw), max(x.eb, w.eb), x.grad or w.grad)
        f = 2.0 * B * O * C * kh * kw * out_hw[0] * out_hw[1]
        mem = x.nbytes + w.nbytes + out.nbytes
        return self._record(name, (x, w), out, (self._op(name, f, mem, matmul=True),),
                            {0: (self._op(name + "_grad_x", f, mem, matmul=True, bwd=True),),
                             1: (self._op(name + "_grad_w", f, mem, matmul=True, bwd=True),)})

    def ew(self, name: str, *inputs: T, grads: str = "mul", flops: float = 1.0, out_eb: float | None = None,
           shape: Sequence[int] | None = None) -> T:
        """An element-wise op on broadcast ``inputs`` (python scalars are not inputs).

        ``grads`` names the derivative rule: ``"mul"`` (``d·other``, one kernel per input),
        ``"add"`` (identity: no kernel), ``"sub"`` (negation for the second input),
        ``"linear"`` (one kernel, ``d·const``), ``"none"`` (not differentiable).
        """
        if shape is None:
            nd = max(len(t.shape) for t in inputs)
            padded = [(1,) * (nd - len(t.shape)) + t.shape for t in inputs]
            shape = tuple(max(dims) for dims in zip(*padded))
        eb = out_eb if out_eb is not None else max(t.eb for t in inputs)
        out = self._new(shape, eb, any(t.grad for t in inputs))
        n = out.numel
        fwd = (self._op(name, flops * n, sum(t.nbytes for t in inputs) + out.nbytes),)
        bwd: dict[int, tuple[Op, ...]] = {}
        for i, t in enumerate(inputs):
            if grads == "none":
                continue
            if grads == "add" or (grads == "sub" and i == 0):
                own: tuple[Op, ...] = ()
            elif grads == "mul" and len(inputs) > 1:
                other = sum(u.nbytes for j, u in enumerate(inputs) if j != i)
                own = (self._op(name + "_grad", n, 2 * eb * n + other, bwd=True),)
            else:
                own = (self._op(name + "_grad", n, 2 * eb * n, bwd=True),)
            bwd[i] = own + self._reduce_to(n, t, eb)
        return self._record(name, tuple(inputs), out, fwd, bwd)

    def reduce(self, name: str, a: T, shape: Sequence[int]) -> T:
        """A sum over some axes of ``a`` down to ``shape`` (backward: a broadcast view, no kernel)."""
        out = self._new(shape, a.eb, a.grad)
        return self._record(name, (a,), out, (self._op(name, a.numel, a.nbytes + out.nbytes),), {0: ()})

    def copy(self, name: str, a: T, *, shape: Sequence[int] | None = None, eb: float | None = None,
             bwd_kernels: int = 1) -> T:
        """A materialising copy (contiguous, flip, pad, cast, slice-assign); backward copies back."""
        out = self._new(a.shape if shape is None else shape, a.eb if eb is None else eb, a.grad)
        mem = a.nbytes + out.nbytes
        back = tuple(self._op(name + "_grad", 0.0, mem, bwd=True) for _ in range(bwd_kernels))
        return self._record(name, (a,), out, (self._op(name, 0.0, mem),), {0: back})

    def cast(self, a: T, eb: float) -> T:
        """``a.to(dtype)``: nothing when the element size is already ``eb``."""
        return a if a.eb == eb else self.copy("cast", a, eb=eb)

    def cat(self, name: str, parts: Sequence[T], shape: Sequence[int]) -> T:
        """``torch.cat``: one copy; its backward hands out views (no kernel)."""
        out = self._new(shape, max(p.eb for p in parts), any(p.grad for p in parts))
        mem = sum(p.nbytes for p in parts) + out.nbytes
        return self._record(name, tuple(parts), out, (self._op(name, 0.0, mem),), {i: () for i in range(len(parts))})

    def fill(self, name: str, shape: Sequence[int], *, eb: float | None = None) -> T:
        """A new constant tensor (zeros, full, arange): one write, no gradient."""
        out = self._new(shape, eb, False)
        return self._record(name, (), out, (self._op(name, 0.0, out.nbytes),), {})

    def index_select(self, a: T, count: int, name: str = "index_select") -> T:
        """``a.index_select(-1, idx)`` with ``count`` indices; backward: zeros + ``index_add_``."""
        out = self._new((*a.shape[:-1], count), a.eb, a.grad)
        n = out.numel
        idx = self.INDEX_BYTES * count
        return self._record(name, (a,), out, (self._op(name, 0.0, 2 * a.eb * n + idx),),
                            {0: (self._op(name + "_grad_zeros", 0.0, a.nbytes, bwd=True),
                                 self._op(name + "_grad_index_add", n, 3 * a.eb * n + idx, bwd=True))})

    def index_add(self, src: T, size: int, name: str = "index_add", *, inplace: bool = False) -> T:
        """``zeros(..., size).index_add(-1, idx, src)``: zeros, (clone,) scatter-add; backward gathers."""
        out = self._new((*src.shape[:-1], size), src.eb, src.grad)
        n, idx = src.numel, self.INDEX_BYTES * src.shape[-1]
        fwd = [self._op(name + "_zeros", 0.0, out.nbytes)]
        if not inplace:  # the out-of-place form clones its zero target first
            fwd.append(self._op(name + "_clone", 0.0, 2 * out.nbytes))
        fwd.append(self._op(name, n, 3 * src.eb * n + idx))
        return self._record(name, (src,), out, tuple(fwd),
                            {0: (self._op(name + "_grad", 0.0, 2 * src.eb * n + idx, bwd=True),)})

    def fft(self, name: str, a: T, kind: str, length: int) -> T:
        """An FFT along the last axis: ``kind`` in rfft, irfft, fft (complex), fft_r2c (real in, full out), ifft."""
        rows = a.numel // a.shape[-1]
        real_in = kind in ("rfft", "fft_r2c")
        ceb = 2 * a.eb if real_in else a.eb  # complex element = two reals
        if kind == "rfft":
            shape, eb = (*a.shape[:-1], length // 2 + 1), ceb
        elif kind == "irfft":
            shape, eb = (*a.shape[:-1], length), a.eb / 2
        elif kind in ("fft", "ifft", "fft_r2c"):
            shape, eb = (*a.shape[:-1], length), ceb
        else:
            raise ValueError(f"kind must be rfft, irfft, fft, fft_r2c or ifft, got {kind!r}")
        out = self._new(shape, eb, a.grad)
        f = _fft_flops(length, rows, real=kind in ("rfft", "irfft", "fft_r2c"))
        mem = a.nbytes + out.nbytes
        back: tuple[Op, ...] = (self._op(name + "_grad", f, mem, bwd=True),)
        if kind in ("rfft", "irfft", "fft_r2c"):  # Hermitian fold / real-part of the adjoint
            back += (self._op(name + "_grad_fold", out.numel, 2 * max(a.nbytes, out.nbytes), bwd=True),)
        return self._record(name, (a,), out, (self._op(name, f, mem),), {0: back})

    def custom(self, name: str, inputs: Sequence[T], shape: Sequence[int], fwd: Sequence[tuple[str, float, float]],
               bwd: dict[int | str, Sequence[tuple[str, float, float]]], *, eb: float | None = None) -> T:
        """An ``autograd.Function`` with hand-written kernels: (name, flops, bytes) per kernel,
        optionally followed by the matrix-product part of the flops and the part ("base"/"adapter").

        ``bwd`` maps an input index to the kernels of its gradient; the key ``"shared"`` holds
        kernels run once whenever any input gradient is computed (attached to the first input
        that requires grad).
        """
        out = self._new(shape, eb, any(t.grad for t in inputs))
        f_ops = tuple(self._kernel(k, False) for k in fwd)
        b_ops = {i: tuple(self._kernel(k, True) for k in ks) for i, ks in bwd.items() if i != "shared"}
        first = next((i for i, t in enumerate(inputs) if t.grad), None)
        if first is not None and "shared" in bwd:
            shared = tuple(self._kernel(k, True) for k in bwd["shared"])
            b_ops[first] = shared + b_ops.get(first, ())
        return self._record(name, tuple(inputs), out, f_ops, b_ops)

    def _kernel(self, spec: tuple, bwd: bool) -> Op:
        """(name, flops, bytes[, matmul_flops[, part]]) -> Op."""
        name, flops, nbytes = spec[:3]
        mm = spec[3] if len(spec) > 3 else 0.0
        part = spec[4] if len(spec) > 4 else self.part
        return Op(name, float(flops), float(mm), float(nbytes), "bwd" if bwd else "fwd", part)

    def launch(self, name: str, flops: float = 0.0, nbytes: float = 0.0) -> None:
        """A kernel outside autograd's graph: by default one that moves almost nothing (a host sync, a tiny
        fill); ``flops`` / ``nbytes`` cost one that does work on no tracked tensor (a sort for a mask)."""
        self.recs.append(_Rec((), self._new((), None, False), (self._op(name, flops, nbytes),), (), self.part))

    # ------------------------------------------------------------------ totals
    def cost(self, output: T, pass_: str = "fwd") -> Cost:
        """Kernels of the forward (``"fwd"``), backward (``"bwd"``) or both (``"fwd+bwd"``).

        The backward starts from a gradient of ``output`` and runs the recorded derivative
        kernels of every op on a path to ``output``, plus one add per extra gradient a tensor
        receives.
        """
        if pass_ not in ("fwd", "bwd", "fwd+bwd"):
            raise ValueError(f"pass_ must be 'fwd', 'bwd' or 'fwd+bwd', got {pass_!r}")
        ops: list[Op] = []
        if pass_ != "bwd":
            ops += [o for r in self.recs for o in r.fwd]
        if pass_ == "fwd":
            return Cost.from_ops(ops)
        live = {output.id} if output.grad else set()
        received: dict[int, list[str]] = {}
        for r in reversed(self.recs):
            if r.out.id not in live:
                continue
            for i, kernels in r.bwd:
                t = r.inputs[i]
                ops += kernels
                received.setdefault(t.id, []).append(r.out.name)
                live.add(t.id)
                if len(received[t.id]) > 1:  # a second gradient for t: summed by one add
                    ops.append(Op("grad_accumulate", float(t.numel), 0.0, 3 * t.nbytes, "bwd", r.part))
        return Cost.from_ops(ops)
