"""The ``cpu`` backend's cache of folded, prepacked conv weights.

In eval the ``cpu`` backend runs a conv layer as one oneDNN call with the BatchNorm folded into
the conv's weight and bias, the weight prepacked in oneDNN's blocked layout for a channels_last
input (dense for an NCHW one; :mod:`resnet_fast.ops`). Folding and packing cost more than a
small layer's conv, so the result is kept per conv weight and made again only when one of the
tensors that went in changes (its storage or in-place version: :func:`version_key`).

Entries: id(conv weight) -> (weak reference to it, cache key, value). An entry goes when its
weight is freed, and the least recently used one when more than ``CACHE_SIZE`` weights are
live. (Tensors cannot be weak dictionary keys: their == is elementwise.) The lock is
reentrant: a weight's finaliser can run, through the garbage collector, while its own thread
holds it.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
from torch import Tensor

__all__ = ["CACHE_SIZE", "cached", "version_key", "size"]

CACHE_SIZE = 1024
_CACHE: "OrderedDict[int, tuple]" = OrderedDict()
_LOCK = threading.RLock()


def _forget(key: int) -> None:
    with _LOCK:
        _CACHE.pop(key, None)


def version_key(*tensors: Optional[Tensor]) -> Optional[tuple]:
    """What identifies the values of ``tensors`` (storage and in-place version), or ``None``
    where that cannot be told (inference tensors, tracing)."""
    if torch.compiler.is_compiling():
        return None
    try:
        return tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)
    except RuntimeError:  # inference tensors carry no version counter
        return None


def cached(weight: Tensor, cache_key: Any, make: Callable[[], Any]) -> Any:
    """``make()``, kept for ``weight`` under ``cache_key`` and returned again while the key is
    the same; ``cache_key=None`` makes it every time and keeps nothing."""
    with _LOCK:
        entry = _CACHE.get(id(weight)) if cache_key is not None else None
        if entry is not None and entry[0]() is weight and entry[1] == cache_key:
            _CACHE.move_to_end(id(weight))
            return entry[2]
    value = make()
    if cache_key is not None:
        with _LOCK:
            if entry is None or entry[0]() is not weight:
                weakref.finalize(weight, _forget, id(weight))
            _CACHE[id(weight)] = (weakref.ref(weight), cache_key, value)
            _CACHE.move_to_end(id(weight))
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
    return value


def size() -> int:
    """The number of weights kept."""
    return len(_CACHE)
