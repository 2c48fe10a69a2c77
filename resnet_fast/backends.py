"""Which implementations of the fused ops exist, which one runs, and why one is missing.

Backends, fastest first on their devices:

``cpu``
    C++ kernels (``csrc/cpu/``) in the compiled extension ``resnet_fast._C``; CPU tensors.
``triton``
    Triton kernels (``resnet_fast/triton/``); CUDA tensors, and CPU tensors when Triton's
    interpreter is on (``TRITON_INTERPRET=1`` set before ``resnet_fast`` is imported: slow, for
    testing the kernels without a GPU, never picked by default on the CPU).
``cuda``
    CUDA C++ kernels (``csrc/cuda/``), built into ``resnet_fast._C`` when torch has CUDA and
    ``nvcc`` was found at build time; CUDA tensors.
``reference``
    The eager definitions in :mod:`resnet_fast.reference`; every device.

``backend=None`` picks the first available backend for the tensor's device in the order
``cuda: triton, cuda, reference`` and ``cpu: cpu, reference``. The environment variable
``RESNET_FAST_BACKEND`` overrides that default. A backend that is asked for but not available is
an error that says why, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional, Union

import torch

from resnet_fast import folded_weights
from resnet_fast._extension import load_extension

__all__ = ["BACKENDS", "available_backends", "unavailable_reason", "resolve_backend",
           "cache_sizes"]

BACKENDS = ("cpu", "triton", "cuda", "reference")

# Default order per device type: the first available one is picked when none is asked for.
_DEFAULT_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}

ENV_VAR = "RESNET_FAST_BACKEND"


def _probe_triton() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (`pip install triton`)"
    if importlib.util.find_spec("resnet_fast.triton.bn_act") is None:
        return "this resnet_fast has no Triton kernels (resnet_fast/triton/bn_act.py is missing)"
    return None


# Probed once at import, so that resolving a backend inside torch.compile reads constants only.
_EXTENSION_HAS_CUDA = bool(load_extension().with_cuda)
_TRITON_ERROR = _probe_triton()


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device: Union[str, torch.device]) -> Optional[str]:
    """Why ``backend`` cannot run on ``device``, or ``None`` when it can."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    kind = device.type
    if backend == "reference":
        return None
    if backend == "cpu":
        return None if kind == "cpu" else f"backend 'cpu' runs on CPU tensors only, not on {kind}"
    if backend == "triton":
        if kind == "cpu" and not _triton_interpreted():
            return (
                "backend 'triton' runs on CUDA tensors; on CPU tensors only under Triton's "
                "interpreter (set TRITON_INTERPRET=1 before importing resnet_fast)"
            )
        if kind not in ("cpu", "cuda"):
            return f"backend 'triton' does not run on {kind} tensors"
        if kind == "cuda" and _triton_interpreted():
            return "TRITON_INTERPRET=1 is set: Triton kernels run on CPU tensors only"
        return _TRITON_ERROR
    # backend == "cuda"
    if kind != "cuda":
        return f"backend 'cuda' runs on CUDA tensors only, not on {kind}"
    if not _EXTENSION_HAS_CUDA:
        return (
            "resnet_fast._C was built without CUDA kernels (torch had no CUDA or nvcc was not "
            "found when it was built); rebuild on a machine with both"
        )
    return None


def available_backends(device: Union[str, torch.device] = "cpu") -> list[str]:
    """The backends that can run on ``device``, the default one first."""
    device = torch.device(device)
    order = _DEFAULT_ORDER.get(device.type, ("reference",))
    extra = [b for b in BACKENDS if b not in order]
    return [b for b in (*order, *extra) if unavailable_reason(b, device) is None]


# Successful resolutions per (asked, environment, device type, interpreter): resolving runs on
# every call of a fused op, on the host. Emptied when it passes _RESOLVED_SIZE entries (only a
# program that keeps changing $RESNET_FAST_BACKEND gets there).
_RESOLVED: dict[tuple, str] = {}
_RESOLVED_SIZE = 64  # cache_sizes() documents this bound


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend to run: ``backend`` if given, else ``$RESNET_FAST_BACKEND``, else the default.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` (with the reason) for a
    backend that cannot run on ``device``.
    """
    if torch.compiler.is_compiling():
        return _resolve(backend, device)
    key = (backend, os.environ.get(ENV_VAR), device.type, _triton_interpreted())
    name = _RESOLVED.get(key)
    if name is None:
        name = _resolve(backend, device)
        if len(_RESOLVED) >= _RESOLVED_SIZE:
            _RESOLVED.clear()
        _RESOLVED[key] = name
    return name


def _resolve(backend: Optional[str], device: torch.device) -> str:
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = f"{ENV_VAR}={backend!r}"
    else:
        source = f"backend={backend!r}"
    if backend is None:
        order = _DEFAULT_ORDER.get(device.type, ("reference",))
        return next(b for b in order if unavailable_reason(b, device) is None)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend ({source}); expected one of {', '.join(BACKENDS)}")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} ({source}) is not available: {reason}")
    return backend


def cache_sizes() -> dict[str, int]:
    """Entries in each cache the package keeps, every one bounded: the oneDNN folded weights
    (one per live conv weight run in eval, at most ``folded_weights.CACHE_SIZE``), the resolved
    backend names (at most 64), the Triton BatchNorm launch configurations (at most 1024; 0
    until the Triton backend is first used), the decided call sites of measured dispatch (at
    most 4096) and its tuner's decisions and static choices in memory (at most
    ``autotune.MEMORY_SIZE`` each)."""
    triton_bn_act = sys.modules.get("resnet_fast.triton.bn_act")
    dispatch = sys.modules.get("resnet_fast.dispatch")
    autotune = sys.modules.get("resnet_fast.autotune")
    tuner = None if autotune is None else autotune._DEFAULT_TUNER
    return {"onednn_folded_weights": folded_weights.size(),
            "resolved_backends": len(_RESOLVED),
            "triton_bn_configs": (0 if triton_bn_act is None
                                  else triton_bn_act._cached_config.cache_info().currsize),
            "decided_call_sites": 0 if dispatch is None else len(dispatch._DECIDED),
            "autotune_decisions": 0 if tuner is None else len(tuner._records),
            "autotune_static_choices": 0 if tuner is None else len(tuner._static)}
