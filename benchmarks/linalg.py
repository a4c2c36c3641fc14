"""Decompositions against their peers, measured in one run; prints ratios, writes JSON.

    python benchmarks/linalg.py                     # CPU, sizes 256 1024 2048
    python benchmarks/linalg.py --sizes 256 4096    # choose sizes
    python benchmarks/linalg.py --device cuda       # torch CUDA (+ CuPy if present)

Rows (ratio = ours / peer; < 1 means we are faster):
* randomized_svd (rank 32, numpy) vs scipy.linalg.svd (full, gesdd) and vs torch.svd_lowrank;
  the relative error of each against the optimal rank-32 tail is recorded beside the time.
* tucker HOOI (3-D, ranks n/8) vs tensorly.decomposition.tucker (numpy backend).
* dct along the last axis: ours on torch vs scipy.fft.dct on numpy.
* wht: ours vs multiplication by the dense Hadamard matrix (the O(n²) path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import print_table, time_call, write_json


def decaying(n: int, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """n×n matrix with singular values 1/(1+i)^1 (a slowly decaying spectrum)."""
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = 1.0 / (1.0 + np.arange(n))
    return ((U * s) @ V.T).astype(dtype)


def bench_svd(n: int, device: str, rank: int = 32) -> list[dict]:
    import scipy.linalg
    import torch

    from lowrank_theory.linalg import randomized_svd

    rng = np.random.default_rng(n)
    A = decaying(n, rng)
    s_all = 1.0 / (1.0 + np.arange(n))
    opt = float(np.sqrt((s_all[rank:] ** 2).sum()))
    rows = []
    reps = 3 if n >= 2048 else 5
    At = torch.from_numpy(A).to(device)

    def err(U, S, Vh):
        U, S, Vh = (np.asarray(torch.as_tensor(t).cpu()) for t in (U, S, Vh))
        return float(np.linalg.norm(A - (U * S) @ Vh) / opt)

    res = randomized_svd(At, rank, seed=0)
    t_ours = time_call(lambda: randomized_svd(At, rank, seed=0), repeats=reps, device=device)
    e_ours = err(*res)
    t_lowrank = time_call(lambda: torch.svd_lowrank(At, q=rank + 10, niter=2), repeats=reps, device=device)
    Ul, Sl, Vl = torch.svd_lowrank(At, q=rank + 10, niter=2)
    e_lowrank = err(Ul[:, :rank], Sl[:rank], Vl[:, :rank].T)
    rows.append(dict(op="randomized_svd r32", n=n, backend=f"torch-{device}", ours_ms=t_ours,
                     peer="torch.svd_lowrank", peer_ms=t_lowrank, ratio=t_ours / t_lowrank,
                     ours_err=e_ours, peer_err=e_lowrank))
    if device == "cpu":
        t_np = time_call(lambda: randomized_svd(A, rank, seed=0), repeats=reps)
        t_full = time_call(lambda: scipy.linalg.svd(A, full_matrices=False), repeats=1, warmup=0)
        rows.append(dict(op="randomized_svd r32", n=n, backend="numpy", ours_ms=t_np,
                         peer="scipy.linalg.svd (full)", peer_ms=t_full, ratio=t_np / t_full,
                         ours_err=err(*randomized_svd(A, rank, seed=0)), peer_err=1.0))
    else:
        t_full = time_call(lambda: torch.linalg.svd(At, full_matrices=False), repeats=2, warmup=1,
                           device=device)
        rows.append(dict(op="randomized_svd r32", n=n, backend=f"torch-{device}", ours_ms=t_ours,
                         peer="torch.linalg.svd (full)", peer_ms=t_full, ratio=t_ours / t_full,
                         ours_err=e_ours, peer_err=1.0))
    return rows


def bench_tucker(n: int, device: str) -> list[dict]:
    import tensorly as tl
    import torch
    from tensorly.decomposition import tucker as tl_tucker

    from lowrank_theory.linalg import tucker

    side = max(8, round(n ** (2 / 3)))  # a 3-D tensor with about n² entries
    r = max(2, side // 8)
    rng = np.random.default_rng(side)
    T = rng.standard_normal((side, side, side))
    Tt = torch.from_numpy(T).to(device)
    t_ours = time_call(lambda: tucker(Tt, [r, r, r], method="hooi", n_iter=10, tol=0.0),
                       repeats=3, device=device)
    tl.set_backend("numpy")
    t_tl = time_call(lambda: tl_tucker(T, rank=[r, r, r], n_iter_max=10, tol=0.0, init="svd"), repeats=3)
    return [dict(op=f"tucker hooi {side}^3 r{r}", n=n, backend=f"torch-{device}", ours_ms=t_ours,
                 peer="tensorly (numpy)", peer_ms=t_tl, ratio=t_ours / t_tl)]


def bench_dct(n: int, device: str) -> list[dict]:
    import scipy.fft
    import torch

    from lowrank_theory.linalg import dct

    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, n)).astype(np.float32)
    Xt = torch.from_numpy(X).to(device)
    t_ours = time_call(lambda: dct(Xt), repeats=10, device=device)
    t_sp = time_call(lambda: scipy.fft.dct(X, norm="ortho", axis=-1), repeats=10)
    return [dict(op="dct-II (rows)", n=n, backend=f"torch-{device}", ours_ms=t_ours,
                 peer="scipy.fft.dct (numpy)", peer_ms=t_sp, ratio=t_ours / t_sp)]


def bench_wht(n: int, device: str) -> list[dict]:
    import torch

    from lowrank_theory.linalg import hadamard_matrix, wht

    size = 1 << int(np.ceil(np.log2(n)))
    rng = np.random.default_rng(n)
    X = torch.from_numpy(rng.standard_normal((256, size)).astype(np.float32)).to(device)
    H = hadamard_matrix(size, like=X)
    t_ours = time_call(lambda: wht(X), repeats=10, device=device)
    t_dense = time_call(lambda: X @ H.T, repeats=10, device=device)
    return [dict(op="wht (256 rows)", n=size, backend=f"torch-{device}", ours_ms=t_ours,
                 peer="dense Hadamard matmul", peer_ms=t_dense, ratio=t_ours / t_dense)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--name", default=None, help="results file stem")
    args = p.parse_args(argv)
    rows: list[dict] = []
    for n in args.sizes:
        for bench in (bench_svd, bench_tucker, bench_dct, bench_wht):
            rows += bench(n, args.device)
    print_table(rows, ["op", "n", "backend", "ours_ms", "peer", "peer_ms", "ratio", "ours_err", "peer_err"])
    name = args.name or f"linalg_{args.device.split(':')[0]}"
    write_json(name, rows, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
