"""``python -m resnet_fast bench``: model benchmarks, and ``--ops`` for the per-op ones.

The measuring code is :mod:`resnet_fast.model_bench` (``benchmarks/bench_model.py`` is a thin
script around it); ``bench`` takes its options (``python -m resnet_fast bench --help``).
``bench --ops`` runs the per-op benchmark scripts of the repository
(``benchmarks/bench_bn_act.py``, ``benchmarks/bench_conv_bn_act.py``) in subprocesses, with a
short setting under ``--quick``, and reports the plots they wrote; an installed resnet_fast
without the repository has no ``benchmarks/``, and ``bench --ops`` then says so (exit status 2).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

from resnet_fast.cli import UsageError, check_writable_dir

OP_SCRIPTS = ("bench_bn_act.py", "bench_conv_bn_act.py")

def benchmarks_dir() -> Path:
    """``benchmarks/`` of the repository this resnet_fast was imported from."""
    import resnet_fast

    return Path(resnet_fast.__file__).resolve().parent.parent / "benchmarks"


def load_bench_model() -> ModuleType:
    """:mod:`resnet_fast.model_bench`, imported only when ``bench`` runs (it imports the models
    and the timing code)."""
    return importlib.import_module("resnet_fast.model_bench")


def add_arguments(p: argparse.ArgumentParser, bench_model: Optional[ModuleType]) -> None:
    if bench_model is not None:  # None: only building the other commands' parser
        bench_model.add_arguments(p)
    p.add_argument("--ops", action="store_true",
                   help="run the per-op benchmark scripts instead (" + ", ".join(
                       f"benchmarks/{s}" for s in OP_SCRIPTS) + ")")


def _script_args(script: Path, args, out: Path) -> list[str]:
    """The options a per-op script gets: the device, the output folder and, under --quick,
    its own --quick and a ``<device>_quick`` tag, so that a quick run does not overwrite the
    full results."""
    import torch

    source = script.read_text(errors="replace")
    kind = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    extra = []
    if '"--device"' in source:
        extra += ["--device", kind]
    if '"--out"' in source:
        extra += ["--out", str(out)]
    tag = getattr(args, "tag", None)
    if args.quick:
        if '"--quick"' in source:
            extra.append("--quick")
        tag = tag or f"{kind}_quick"
    if tag and '"--tag"' in source:
        extra += ["--tag", tag]
    return extra


def run_ops(args) -> int:
    here = benchmarks_dir()
    if not here.is_dir():
        raise UsageError(f"{here} not found: `bench --ops` runs the repository's benchmarks/ "
                         "scripts, which an installed resnet_fast does not carry; run it from a "
                         "checkout of the repository (pip install -e . there)")
    out = check_writable_dir(args.out)
    failed = 0
    for name in OP_SCRIPTS:
        script = here / name
        if not script.is_file():
            print(f"{name}: not found in {here}, skipped", flush=True)
            continue
        cmd = [sys.executable, str(script), *_script_args(script, args, out)]
        print(f"$ {shlex.join(cmd)}", flush=True)
        before = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
        res = subprocess.run(cmd)
        plots = sorted(str(p) for p in out.glob("*.png")
                       if before.get(p) != p.stat().st_mtime_ns)
        if res.returncode != 0:
            failed += 1
            print(f"{name}: failed with exit status {res.returncode}", flush=True)
        print(f"{name}: plots: {', '.join(plots) if plots else 'none written'}", flush=True)
    return 1 if failed else 0


def run(args) -> int:
    if args.ops:
        return run_ops(args)
    bench_model = load_bench_model()
    settings = bench_model.settings_from_args(args)  # raises UsageError on a bad option
    check_writable_dir(settings.out)
    bench_model.run(settings)
    return 0


def wants_bench(argv: list[str]) -> bool:
    """Whether the command line runs ``bench`` (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None) == "bench"

