"""The base of every module that runs resnet_fast's fused ops: :class:`FusedModule`, the
backend and ``memory_efficient`` setting it holds, and the checks every fused module makes of
the modules it fuses and of the backend it is given.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from resnet_fast.backends import BACKENDS, unavailable_reason

__all__ = ["FusedModule", "has_hooks", "validate_backend"]


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward (pre-)hooks, which a fused op would not fire."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def validate_backend(backend: Optional[str]) -> Optional[str]:
    """``backend`` if it names a backend that can run on this machine, else a clear error.

    ``None`` (the default for each tensor's device, or ``$RESNET_FAST_BACKEND``) is always
    accepted. A known backend that cannot run on the CPU nor on an available GPU raises
    ``RuntimeError`` with the reasons; whether it runs on the tensors a model is later given
    is checked on each call, as for the functional ops.
    """
    if backend is None:
        return None
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected None or one of "
                         f"{', '.join(BACKENDS)}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    reasons = {d: unavailable_reason(backend, d) for d in devices}
    if all(r is not None for r in reasons.values()):
        detail = "; ".join(f"{d}: {r}" for d, r in reasons.items())
        raise RuntimeError(f"backend {backend!r} cannot run on this machine ({detail})")
    return backend


class FusedModule(nn.Module):
    """A module whose forward runs resnet_fast's fused ops with the backend it holds
    (``None``: the default for the input's device), keeping less for backward when
    ``memory_efficient`` (see :mod:`resnet_fast.models`)."""

    backend: Optional[str] = None
    memory_efficient: bool = False

    def _set_on_fused_modules(self, name: str, value: Any) -> "FusedModule":
        for m in self.modules():
            if isinstance(m, FusedModule):
                setattr(m, name, value)
        return self

    def set_backend(self, backend: Optional[str]) -> "FusedModule":
        """Runs this module and every fused module inside it with ``backend``; returns self."""
        return self._set_on_fused_modules("backend", validate_backend(backend))

    def set_memory_efficient(self, enabled: bool = True) -> "FusedModule":
        """Makes this module and every fused module inside it recompute, in backward, the conv
        outputs that end its blocks instead of keeping them (or stops it); returns self."""
        return self._set_on_fused_modules("memory_efficient", bool(enabled))
