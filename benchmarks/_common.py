"""What the benchmark scripts in this folder share beyond :mod:`resnet_fast.timing` (timing,
provenance, the result-file writers): the results folder, the BatchNorm shape sets, geometric
means, file names.

The benchmark scripts run as ``python benchmarks/<script>.py``, which puts this folder first on
``sys.path``, so they import this module as ``_common``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

RESULTS = Path(__file__).resolve().parent / "results"

# (channels, spatial size) of ResNet-50's BatchNorm layers for a 224x224 input; other inputs
# scale every size (a 64x64 input divides them by 224/64 = 3.5).
RESNET50_BN_224 = [(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28),
                   (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7)]


def bn_shape_sets(batch: int, image: int) -> dict[str, list[tuple[int, int, int, int]]]:
    """The named shape sets of ``bench_bn_act.py``: ``resnet50``, ResNet-50's BatchNorm shapes
    at this batch and input size (the set its geometric means are taken over), and ``extra``,
    one large shape ResNet-50 does not have (256 channels at half the input size)."""
    resnet50 = []
    for c, size in RESNET50_BN_224:
        s = max(1, round(size * image / 224))
        resnet50.append((batch, c, s, s))
    return {"resnet50": resnet50, "extra": [(batch, 256, image // 2, image // 2)]}


def geomean(values, weights=None) -> Optional[float]:
    """Weighted geometric mean of the values that are not None (None if there are none)."""
    pairs = [(v, w) for v, w in zip(values, weights or [1] * len(values)) if v is not None]
    if not pairs:
        return None
    return math.exp(sum(w * math.log(v) for v, w in pairs) / sum(w for _, w in pairs))


def run_name(tag: Optional[str], device) -> str:
    """The suffix of the result files: ``tag`` if given, else the device kind (cpu, cuda)."""
    return tag or device.type
