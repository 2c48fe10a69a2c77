"""The compiled extension ``resnet_fast._C``: it defines the fused ops (``csrc/ops.cpp``) and
holds the ``cpu`` and ``cuda`` kernels. :func:`load_extension` is the one place it is imported.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["load_extension"]


def load_extension() -> ModuleType:
    """``resnet_fast._C``, or an ``ImportError`` that says how to build it."""
    try:
        return importlib.import_module("resnet_fast._C")
    except ImportError as exc:
        raise ImportError(
            f"resnet_fast's compiled extension resnet_fast._C could not be imported ({exc}): it "
            "defines the fused ops and holds the cpu kernels. Build it with "
            "`pip install -e . --no-build-isolation` (or `make test`)") from exc
