"""Measured dispatch: the implementation each fused call runs.

A fused call made with the default backend (``backend=None`` and no ``RESNET_FAST_BACKEND``)
runs the implementation that measured fastest at its call site; :mod:`resnet_fast.autotune`
times, decides, caches and persists. The candidates of every fused op:

each fused backend available on the device (``cpu``; ``cuda`` and ``triton`` on a GPU)
    the fused op. On the CPU in eval the conv layer is oneDNN's conv with the BatchNorm folded
    into its weights; in training, PyTorch's conv composed with the fused BatchNorm kernels.
``aten``
    ATen's own sequence, as eager PyTorch runs the modules: ``conv2d``, ``batch_norm``, the
    residual add, ReLU. It is the eager floor: with it among the candidates, no layer runs
    slower than eager beyond the timing noise.

The static choice (:func:`static_choice`: with ``RESNET_FAST_AUTOTUNE=0``, and inside a
``torch.compile`` trace on a cache miss) is the device's default backend
(:func:`resnet_fast.backends.resolve_backend`), except the BatchNorm ops on CUDA, where the
``cuda`` kernels come before the Triton ones (training forward + backward at batch 256 on an
H100: 1.27x eager's geometric mean against 0.80x).

A call site is its op; the shapes, dtypes and layouts of its tensors and which optional ones
are given; its flags (stride, padding, dilation, groups, ReLU, a deferred input, ...); the
device; eval or training, and whether a gradient is recorded. Each candidate is timed on
scratch copies of the call's tensors (running statistics and counters included: the user's
state is updated once, by the real call), forward + backward when the call records a gradient.

A conv call with ``recompute`` (a ``memory_efficient`` model) is not measured: it runs the
device's fused backend, since ATen's sequence keeps for backward what eager keeps.

A :class:`~resnet_fast.functional.DeferredBatchNorm` hand-off is part of the plan: a producer
always defers (its conv + statistics is the least work whoever consumes it), and the consumer's
candidates are timed as they take it: a fused backend normalises it on load, ``aten``
materialises it first (:meth:`~resnet_fast.functional.DeferredBatchNorm.materialize`: one fused
BatchNorm + ReLU pass), then runs its sequence.

:func:`tune` decides every call site of a model ahead of time on an example batch, and
:func:`explain` prints each layer's candidates, their times and the winner.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from resnet_fast._extension import load_extension
from resnet_fast.backends import ENV_VAR, available_backends, resolve_backend

__all__ = ["ATEN", "measured", "static_choice", "candidates_for", "call_site", "decided",
           "record", "choose", "tune", "explain", "clear"]

ATEN = "aten"

_C = load_extension()


def measured(backend: Optional[str]) -> bool:
    """Whether a call with ``backend`` is dispatched by measurement: autotuning is on
    (``RESNET_FAST_AUTOTUNE`` is not ``0``) and the default backend was asked for (``None``,
    and ``$RESNET_FAST_BACKEND`` unset). An explicit backend always runs."""
    return backend is None and not os.environ.get(ENV_VAR) and _autotune().autotune_enabled()


def _autotune():
    """:mod:`resnet_fast.autotune`, imported at first use: it imports ``torch._dynamo`` (over a
    second), which a process that never dispatches by measurement does without."""
    from resnet_fast import autotune

    return autotune


def static_choice(op: str, backend: Optional[str], device: torch.device) -> str:
    """The backend a call of ``op`` asking for ``backend`` runs on ``device`` when nothing is
    measured: ``backend``, else ``$RESNET_FAST_BACKEND``, else the static table (errors as
    :func:`~resnet_fast.backends.resolve_backend`)."""
    if (device.type == "cuda" and backend is None and not os.environ.get(ENV_VAR)
            and op != "conv_bn_relu" and "cuda" in available_backends(device)):
        return "cuda"
    return resolve_backend(backend, device)


def candidates_for(device: torch.device) -> tuple[str, ...]:
    """The implementations timed on ``device``: its fused backends (the Triton interpreter on
    CPU tensors is a testing tool, never a candidate), then ``aten``."""
    fused = [b for b in available_backends(device)
             if b != "reference" and not (b == "triton" and device.type == "cpu")]
    return (*fused, ATEN)


# ------------------------------------------------------------------------- scratch copies


def _scratch(value: Any) -> Any:
    """A copy of a call argument for timing: tensors cloned with their layout and
    ``requires_grad`` (never the caller's, so nothing the caller holds is updated), tuples
    (a DeferredBatchNorm) copied member by member, anything else as it is."""
    if isinstance(value, Tensor):
        copy = value.detach().clone(memory_format=torch.preserve_format)
        return copy.requires_grad_(value.requires_grad)
    if isinstance(value, tuple):
        copied = [_scratch(v) for v in value]
        return type(value)(*copied) if hasattr(value, "_fields") else tuple(copied)
    return value


def _tensors(value: Any) -> Iterator[Tensor]:
    """The tensors of a call argument: itself, or the members of a tuple (a DeferredBatchNorm,
    a BatchNorm's tensors)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, tuple):
        for v in value:
            yield from _tensors(v)


def _timed_call(name: str, fn: Callable[..., Tensor], kwargs: Mapping[str, Any],
                backward: bool, shared: dict[str, Tensor]) -> Callable[[], None]:
    """The candidate ``name``: a zero-argument call of ``fn`` on scratch copies of ``kwargs``
    (made at its first call), forward + backward when ``backward``, from one fixed random
    output gradient that the candidates of a call site share (``shared["grad"]``, made by the
    first to need it: uniform in [-1, 1), which fills an activation several times faster than
    a normal draw)."""
    state: dict[str, Any] = {}

    def run() -> None:
        if not state:
            state["kwargs"] = {k: _scratch(v) for k, v in kwargs.items()}
            state["leaves"] = [t for v in state["kwargs"].values() for t in _tensors(v)
                               if t.requires_grad]
        if not backward:
            with torch.no_grad():
                fn(**state["kwargs"])
            return
        out = fn(**state["kwargs"])
        grad = shared.get("grad")
        if grad is None:
            grad = shared["grad"] = torch.empty_like(out).uniform_(-1.0, 1.0)
        out.backward(grad)
        for leaf in state["leaves"]:
            leaf.grad = None

    run.__name__ = name
    return run


# ------------------------------------------------------------------------- choosing


_LABELS = threading.local()

# Call sites decided in this process: the implementation each runs, keyed by
# :func:`call_site`. A call found here runs without its argument checks and without building
# the tuner's key; that lookup is the whole per-call cost of a decided site. Bounded like the
# other caches (resnet_fast.backends.cache_sizes).
_DECIDED: dict[tuple, str] = {}
_DECIDED_SIZE = 4096


def call_site(op: str, tensors: tuple, flags: tuple) -> Optional[tuple]:
    """The key of a call of ``op`` in the table of decided call sites: ``flags`` (its
    non-tensor arguments, as given) and the signature of ``tensors`` (each tensor's type,
    dispatch keys, dtype, device, ``requires_grad``, sizes and strides, with the thread count,
    grad mode, autocast state and the environment variables that select a backend; see
    ``csrc/call_signature.h``): everything the call's argument checks and its choice depend on,
    so that a call with the key of one that passed its checks passes them too. ``None`` where
    the table is not used: inside a ``torch.compile`` trace, while :func:`tune` or
    :func:`explain` label the calls, or for an argument that is not a tensor, or a flag that is
    not hashable."""
    if torch.compiler.is_compiling() or getattr(_LABELS, "names", None):
        return None
    signature = _C.call_signature(*tensors)
    if signature is None:
        return None
    try:
        hash(flags)
    except TypeError:  # e.g. a stride given as a list
        return None
    return op, flags, signature


def decided(site: Optional[tuple]) -> Optional[str]:
    """The implementation decided for ``site`` (:func:`call_site`) in this process, or None."""
    return None if site is None else _DECIDED.get(site)


def record(site: Optional[tuple], name: str) -> None:
    """Keeps ``name`` as the implementation of ``site``, a call whose arguments passed their
    checks and which measured dispatch decided, or which runs unmeasured (an explicit backend,
    autotuning off, a recomputing conv): its next calls skip the checks as well."""
    if site is None:
        return
    if len(_DECIDED) >= _DECIDED_SIZE:
        _DECIDED.clear()
    _DECIDED[site] = name


def _label_of(owners: tuple) -> Optional[str]:
    """The layer a call belongs to while :func:`tune` or :func:`explain` runs a model: the
    module that owns the first of ``owners`` (the call's conv weight, or its BatchNorm's
    tensors) that is a model's."""
    names = getattr(_LABELS, "names", None)
    if not names:
        return None
    return next((names[id(t)] for t in owners if t is not None and id(t) in names), None)


def choose(op: str, device: torch.device, training: bool, kwargs: Mapping[str, Any],
           implementations: Mapping[str, Callable[..., Tensor]], owners: tuple,
           site: Optional[tuple], **flags: Any) -> str:
    """The implementation to run for a call of ``op`` not found among the decided call sites
    (:func:`decided`): a name from :func:`candidates_for`, recorded for ``site``. ``kwargs``
    are the call's arguments by name (those of each implementation in ``implementations``: a
    function for ``aten`` and one taking ``backend`` for the fused backends); ``owners`` the
    tensors whose module names the call in :func:`explain`; ``flags`` the non-tensor arguments
    that make the tuner's key."""
    tensors = []
    for value in kwargs.values():
        if value is None or isinstance(value, Tensor):
            tensors.append(value)
        elif isinstance(value, tuple):  # a DeferredBatchNorm, a BatchNorm's tensors
            tensors.extend(v for v in value if v is None or isinstance(v, Tensor))
    backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)
    compiling = torch.compiler.is_compiling()
    label = None if compiling else _label_of(owners)
    names = candidates_for(device)
    static = static_choice(op, None, device)
    autotune = _autotune()
    key = autotune.make_key(op, tensors, training, backward=backward, **flags)
    if compiling:  # read, never timed
        return autotune.default_tuner().choose(key, dict.fromkeys(names), static)

    shared: dict[str, Tensor] = {}

    def candidate(name: str) -> Callable[[], None]:
        if name == ATEN:
            return _timed_call(name, implementations[ATEN], kwargs, backward, shared)
        fused = implementations["fused"]
        return _timed_call(name, lambda **kw: fused(**kw, backend=name), kwargs, backward,
                           shared)

    if label is not None:
        _LABELS.keys.add(key)
    winner = autotune.default_tuner().choose(
        key, {name: candidate(name) for name in names}, static, label=label)
    record(site, winner)
    return winner


# ------------------------------------------------------------------------- whole models


def _layer_names(model: nn.Module) -> dict[int, str]:
    """The layer each parameter and buffer of ``model`` belongs to, by the tensor's id."""
    names: dict[int, str] = {}
    for module_name, module in model.named_modules():
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            names.setdefault(id(t), module_name)
    return names


@contextlib.contextmanager
def _labelled(names: dict[int, str]) -> Iterator[None]:
    """Calls inside are labelled with the layer of their first tensor found in ``names``."""
    previous = getattr(_LABELS, "names", None), getattr(_LABELS, "keys", None)
    _LABELS.names, _LABELS.keys = names, set()
    try:
        yield
    finally:
        _LABELS.names, _LABELS.keys = previous


def _run(model: nn.Module, example_input: Tensor, mode: str) -> set[str]:
    """One pass of ``model`` over ``example_input`` in ``mode`` with every fused call labelled,
    its parameters, buffers and gradients restored afterwards; the keys of its call sites."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    names = _layer_names(model)
    was_training = model.training
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {p: p.grad for p in model.parameters()}
    try:
        model.train(mode == "train")
        with _labelled(names):
            keys = _LABELS.keys
            if mode == "train":
                model(example_input).float().sum().backward()
            else:
                with torch.no_grad():
                    model(example_input)
    finally:
        model.load_state_dict(state)
        for p, g in grads.items():
            p.grad = g
        model.train(was_training)
    return keys


def tune(model: nn.Module, example_input: Tensor, mode: str = "train") -> None:
    """Decides, ahead of time, the implementation of every fused call ``model`` makes on a batch
    like ``example_input`` in ``mode`` (``"train"``: forward + backward; ``"eval"``), so that the
    first real step runs at full speed. The model's parameters, buffers and gradients are left
    as they were."""
    _run(model, example_input, mode)


def explain(model: nn.Module, example_input: Tensor, mode: str = "train") -> str:
    """:func:`tune`, then the table of every fused layer of ``model``: its candidates' times,
    the winner and where the decision came from (timed, read from the cache file, or the static
    choice)."""
    keys = _run(model, example_input, mode)
    autotune = _autotune()
    return autotune.format_table([r for r in autotune.default_tuner().records()
                                  if r.key in keys])


def clear() -> None:
    """Forgets the decisions made in this process (the cache file stays)."""
    _DECIDED.clear()
    _autotune().default_tuner().clear()
