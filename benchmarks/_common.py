"""Helpers shared by the benchmarks in this folder: the timing loop, the device and version
information every result row carries, and the CSV / JSON / PNG writers.

The benchmark scripts run as ``python benchmarks/<script>.py``, which puts this folder first on
``sys.path``, so they import this module as ``_common``.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import resnet_fast
from resnet_fast.cli.info import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"


def timer(device: torch.device, warmup: int, reps: int) -> Callable[[Callable], list[float]]:
    """Returns a function that times a callable: seconds per call, one entry per repetition."""
    if device.type == "cuda":
        def run(fn):
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return times
        return run

    def run(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times
    return run


def versions(device: torch.device) -> dict[str, str]:
    info = {"torch": torch.__version__, "resnet_fast": resnet_fast.__version__,
            "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "none"
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    else:
        info["device_name"] = f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return info


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as CSV, the columns those of the first row."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or ``None`` when matplotlib is not
    installed (the plot is then skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def fmt_cell(v) -> str:
    """A table cell: floats to 3 decimals, ``None`` as ``-``."""
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else str(v)


def run_name(tag: Optional[str], device: torch.device) -> str:
    """The suffix of the result files: ``tag`` if given, else the device kind (cpu, cuda)."""
    return tag or device.type
