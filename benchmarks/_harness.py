"""Shared timing, memory and reporting helpers for the benchmark scripts.

Timing rule: warm up, then take the median of ``repeats`` runs.  On CUDA each run is
bracketed by CUDA events (device time, no host overhead); on the CPU by
``time.perf_counter``.  Ratios are always against a peer measured in the same process.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def time_call(fn: Callable[[], Any], *, repeats: int = 10, warmup: int = 3, device: str = "cpu") -> float:
    """Median wall (CPU) or device (CUDA events) time of ``fn()`` in milliseconds."""
    if device.startswith("cuda"):
        import torch

        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def machine_info() -> dict[str, Any]:
    """Device name, versions and date, stored with every result file."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:  # pragma: no cover
        pass
    for mod in ("numpy", "scipy", "peft", "tensorly", "cupy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Format ``rows`` as a fixed-width text table (also returned for logging)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text


def write_json(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None,
               out_dir: Path | None = None) -> Path:
    """Write ``{"machine": ..., "rows": rows}`` to ``results/<name>.json`` and return the path."""
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"machine": machine_info(), **(extra or {}), "rows": rows}
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path
