"""Set-up of the pytest-benchmark suite in this folder.

    pytest benchmarks --benchmark-only                      # run, print one table per group
    pytest benchmarks --benchmark-only --benchmark-autosave # keep the results (.benchmarks/)
    pytest benchmarks --benchmark-only --benchmark-compare  # against the last saved run

Each group holds one piece of work measured by eager PyTorch and by every resnet_fast backend
that runs on the device (``test_bench_ops.py``: each fused op; ``test_bench_model.py``: a
ResNet training step and an eval forward). The plain ``pytest`` run does not collect this
folder (``testpaths = ["tests"]``). On a machine with a GPU the benchmarks run on CUDA, and
each timed call ends with a synchronize. pytest-benchmark times and stores these runs to
compare commits; the result files under ``benchmarks/results/`` come from the scripts, which
time with :mod:`resnet_fast.timing`.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

import resnet_fast
from resnet_fast.timing import synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# The fused providers: every resnet_fast backend that runs on DEVICE, but the eager reference
# (measured as "eager").
FUSED = [b for b in resnet_fast.available_backends(DEVICE) if b != "reference"]
PROVIDERS = ["eager", *FUSED]


def pytest_generate_tests(metafunc):
    """Every test that takes ``provider`` runs once per provider: eager, then each backend."""
    if "provider" in metafunc.fixturenames:
        metafunc.parametrize("provider", PROVIDERS)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def _timed(fn: Callable) -> Callable:
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        synchronize(DEVICE)
        return out
    return run


@pytest.fixture
def timed() -> Callable[[Callable], Callable]:
    """Wraps a callable so that on CUDA it ends with a synchronize (the benchmark then times
    the work, not its launch)."""
    return _timed
