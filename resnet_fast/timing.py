"""How resnet_fast's benchmarks time their providers, and what their result files record.

One method for every benchmark:

* on the CPU, :class:`torch.utils.benchmark.Timer` with ``num_threads`` set to
  ``torch.get_num_threads()``: each measurement is one ``blocked_autorange(min_run_time)``,
  whose block-size estimate runs the callable at least once untimed before the timed blocks;
  ``min_run_time=0`` times exactly one call (after that one untimed call);
* on CUDA, ``triton.testing.do_bench`` (the L2 cache flushed before every call, the median of
  its calls) when Triton is importable, else CUDA events around each call with the L2 cache
  flushed by writing a buffer larger than it before each;
* :func:`interleave`: the providers of one comparison warmed up, then ``rounds`` rounds in
  each of which every provider is measured once, in an order shuffled afresh each round by a
  seeded :class:`random.Random`, so that a machine whose speed drifts slows them alike;
* :func:`compiled`: a ``torch.compile`` provider made after ``torch._dynamo.reset()``, which
  counts the compilations after its first call (recompiles);
* :func:`provenance`: the machine, versions, commit, command line and settings of a run,
  which every result file records (:func:`write_json`: a top-level ``"provenance"`` object;
  :func:`write_csv` rows carry :func:`row_provenance`'s columns);
* :func:`write_result_files`: a run's CSV, JSON and (with matplotlib) PNG under one name,
  each figure saved by :func:`save_figure`.

Only torch, the standard library and (optionally) Triton are imported here.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils import benchmark

# A buffer larger than the L2 cache of current GPUs (50-60 MiB on H100/H200), written before
# each CUDA-event-timed call.
_L2_FLUSH_BYTES = 256 * 2**20


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo, else what the platform reports) and the
    vector instructions ATen's CPU kernels use on it, e.g. ``"AMD EPYC, AVX2"``: hosts that
    report one model name can differ there (AVX2 against AVX-512), and with it their speed, so
    the name keeps their results and tuning decisions apart."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(fn: Callable, n: int, device: torch.device) -> None:
    """``n`` untimed calls of ``fn``, then a synchronize."""
    for _ in range(n):
        fn()
    synchronize(device)


def _triton_do_bench() -> Optional[Callable]:
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


def measurer(fn: Callable, device: torch.device, min_run_time: float) -> Callable[[], float]:
    """A function that takes one measurement of ``fn`` and returns it in seconds per call."""
    if device.type != "cuda":
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                                num_threads=torch.get_num_threads())
        return lambda: timer.blocked_autorange(min_run_time=min_run_time).median
    do_bench = _triton_do_bench()
    if do_bench is not None:
        rep_ms = max(1.0, min_run_time * 1e3)
        return lambda: do_bench(fn, warmup=0, rep=rep_ms, return_mode="median") / 1e3
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)

    def events() -> float:
        times = []
        while not times or sum(times) < min_run_time:
            flush.zero_()
            start, end = (torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True))
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    return events


def alone(fn: Callable, device: torch.device, warmup: int, reps: int,
          min_run_time: float = 0.0) -> list[float]:
    """``reps`` measurements of ``fn`` alone after ``warmup`` untimed calls, in seconds per
    call."""
    return interleave({"fn": fn}, reps, device=device, warmup=warmup,
                      min_run_time=min_run_time)["fn"]


def interleave(providers: dict[str, Callable], rounds: int, *, device: torch.device,
               warmup: int, min_run_time: float = 0.0, seed: int = 0,
               before: Optional[Callable[[], None]] = None,
               errors: Optional[dict[str, str]] = None) -> dict[str, list[float]]:
    """Seconds per call of each provider, one measurement per round.

    Every provider gets ``warmup`` untimed calls first (in the given order); then each of the
    ``rounds`` rounds measures every provider once, in an order drawn afresh each round from
    ``random.Random(seed)`` (the same seed gives every process of a distributed run the same
    orders). ``before`` runs (untimed) before each measurement. With ``errors`` given, a
    provider that raises is dropped from the result and its error (``Type: first line``)
    recorded there under its name; without, the exception propagates.
    """
    measure = {}
    for name, fn in providers.items():
        try:
            warm_up(fn, warmup, device)
            measure[name] = measurer(fn, device, min_run_time)
        except Exception as exc:
            if errors is None:
                raise
            errors[name] = error_text(exc)
    rng = random.Random(seed)
    result: dict[str, list[float]] = {name: [] for name in measure}
    for _ in range(rounds):
        order = list(measure)
        rng.shuffle(order)
        for name in order:
            if before is not None:
                before()
            try:
                result[name].append(measure[name]())
            except Exception as exc:
                if errors is None:
                    raise
                errors[name] = error_text(exc)
                del measure[name], result[name]
    return result


def time_stats(seconds: list[float]) -> dict[str, float]:
    """Median, minimum and maximum of a provider's measurements, in milliseconds, and how many
    there were."""
    return dict(median_ms=statistics.median(seconds) * 1e3, min_ms=min(seconds) * 1e3,
                max_ms=max(seconds) * 1e3, reps=len(seconds))


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _frames_compiled() -> Optional[int]:
    """Frames torch.compile has compiled in this process (it never resets this count), or
    None where this torch does not count them."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    frames = counters.get("frames")
    return None if frames is None else int(frames.get("total", 0))


class Compiled:
    """A ``torch.compile``'d callable that counts the compilations after its first call."""

    def __init__(self, fn: Callable, **kwargs):
        torch._dynamo.reset()
        self._fn = torch.compile(fn, **kwargs)
        self._after_first: Optional[int] = None
        self._called = False

    def __call__(self, *args, **kwargs):
        out = self._fn(*args, **kwargs)
        if not self._called:
            self._called = True
            self._after_first = _frames_compiled()
        return out

    def recompiles(self) -> Optional[int]:
        """Frames compiled since the first call finished (0 when nothing recompiled; None
        before the first call or where torch does not count compilations)."""
        now = _frames_compiled()
        if self._after_first is None or now is None:
            return None
        return now - self._after_first


def compiled(fn_or_module: Callable, **kwargs) -> Compiled:
    """``torch.compile(fn_or_module, **kwargs)`` after ``torch._dynamo.reset()``; the result's
    ``recompiles()`` reads how often it recompiled after its first call."""
    return Compiled(fn_or_module, **kwargs)


def recompiles_of(fn: Callable) -> Optional[int]:
    """``fn.recompiles()`` for a :func:`compiled` provider, None for any other."""
    return fn.recompiles() if isinstance(fn, Compiled) else None


# The checkout resnet_fast runs from, when it runs from one.
CHECKOUT = Path(__file__).resolve().parent.parent


def git(*args: str) -> Optional[str]:
    """The output of ``git -C CHECKOUT ARGS...``, or None when git fails or is missing."""
    try:
        res = subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_commit() -> tuple[Optional[str], Optional[bool]]:
    """(``git rev-parse HEAD`` of the checkout resnet_fast runs from, whether its tracked files
    differ from that commit); (None, None) when it does not run from a git checkout."""
    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != CHECKOUT:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "HEAD"), (None if status is None else bool(status))


def provenance(device: torch.device, warmup: Optional[int], reps: Optional[int],
               argv: Optional[list[str]] = None, **settings) -> dict:
    """Where a result comes from: the device, the versions, the commit of the code, the command
    line (``argv``, default ``sys.argv``), the warm-up calls and repetitions, the threads, the
    load average when it was taken (call it at the start of a run) and any further
    ``settings``. A result that times nothing passes ``warmup=reps=None`` and gets no timing
    method."""
    from resnet_fast._version import __version__

    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = git_commit()
    info = {
        "device": device_name(device),
        "device_kind": device.type,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "triton": triton_version,
        "python": platform.python_version(),
        "resnet_fast": __version__,
        "commit": commit,
        "dirty": dirty,
        "command": [Path(sys.executable).name, *(sys.argv if argv is None else argv)],
        "warmup": warmup,
        "reps": reps,
        "timing": None if reps is None else (
            ("triton.testing.do_bench" if device.type == "cuda" and _triton_do_bench()
             else "CUDA events, L2 flushed" if device.type == "cuda"
             else "torch.utils.benchmark.Timer.blocked_autorange")
            + ", providers interleaved in shuffled order"),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    info.update(settings)
    return info


def row_provenance(prov: dict) -> dict:
    """The columns of :func:`provenance` every CSV row repeats (its JSON twin holds all of
    it)."""
    return {k: prov[k] for k in ("device", "torch", "commit")}


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as CSV, the columns those of the first row."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, prov: dict, content: dict) -> None:
    """A result file: ``{"provenance": prov, **content}``."""
    with open(path, "w") as f:
        json.dump({"provenance": prov, **content}, f, indent=1)


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


def save_figure(fig, path: Path) -> None:
    """Lays ``fig`` out, saves it to ``path`` at 90 dpi and closes it."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)


def write_result_files(stem: Path, rows: list[dict], prov: dict, content: dict,
                       plot: Callable[[list[dict], Path, dict], bool]) -> dict[str, Path]:
    """A run's result files, made with their folder: ``stem``.csv (``rows``), .json
    (``{"provenance": prov, **content}``) and .png when ``plot(rows, path, prov)`` draws one
    (it returns whether it did); their paths by suffix."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {"csv": stem.with_suffix(".csv"), "json": stem.with_suffix(".json")}
    write_csv(paths["csv"], rows)
    write_json(paths["json"], prov, content)
    if plot(rows, stem.with_suffix(".png"), prov):
        paths["png"] = stem.with_suffix(".png")
    return paths


def fmt_cell(v) -> str:
    """A table cell: floats to 3 decimals, ``None`` as ``-``."""
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else str(v)
