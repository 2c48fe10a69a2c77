"""Layers of a ResNet run as fused ops: ``nn.Conv2d`` + ``nn.BatchNorm2d`` (+ residual) (+ ReLU).

The modules stay the ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.ReLU`` that own the
parameters and buffers (so state_dicts, optimizers, ``.to()``, ``momentum``, ``eps`` and
``track_running_stats`` behave as usual); :func:`conv_bn_act` reads their tensors and runs the
whole chain as one :func:`resnet_fast.functional.conv_bn_relu` call, with ``nn.BatchNorm2d``'s
own semantics: ``bn.training`` picks batch or running statistics, and the running statistics and
``num_batches_tracked`` update in place exactly when the module would update them.

A :class:`resnet_fast.SyncBatchNorm` runs its own fused op after the conv (see
:func:`conv_bn_act`). A layer that the fused op cannot express exactly (a conv with a non-zero
``padding_mode``, another norm layer that is not a plain ``nn.BatchNorm2d``, an activation
other than ReLU, a module with forward hooks, which must still fire) runs its modules eagerly
instead: never a silent change of meaning.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from resnet_fast import functional
from resnet_fast.backends import BACKENDS, unavailable_reason

__all__ = [
    "FusedModule",
    "conv_bn_act",
    "batch_norm_arguments",
    "is_fusable_conv",
    "is_fusable_batch_norm",
    "is_relu",
    "check_input",
    "validate_backend",
]

_BatchNorm = nn.modules.batchnorm._BatchNorm

# The activation argument of conv_bn_act: an nn.ReLU (fused), None (identity), or any other
# module, applied eagerly after the fused conv + BatchNorm (+ residual).
Activation = Optional[nn.Module]


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def is_fusable_conv(conv: Any) -> bool:
    """Whether ``conv`` is an ``nn.Conv2d`` whose forward the fused op reproduces exactly: the
    module's own forward (not overridden), zero padding given as numbers, no forward hooks."""
    return (
        isinstance(conv, nn.Conv2d)
        and type(conv).forward is nn.Conv2d.forward
        and type(conv)._conv_forward is nn.Conv2d._conv_forward
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not _has_hooks(conv)
    )


def is_fusable_batch_norm(bn: Any) -> bool:
    """Whether ``bn`` is an ``nn.BatchNorm2d`` running ``nn.BatchNorm2d``'s own forward, with
    no forward hooks (``SyncBatchNorm``, ``FrozenBatchNorm2d``, ``GroupNorm`` are not)."""
    return (
        isinstance(bn, nn.BatchNorm2d)
        and type(bn).forward is _BatchNorm.forward
        and not _has_hooks(bn)
    )


def is_relu(act: Any) -> bool:
    """Whether ``act`` is an ``nn.ReLU`` (in place or not) without hooks."""
    return (isinstance(act, nn.ReLU) and type(act).forward is nn.ReLU.forward
            and not _has_hooks(act))


def batch_norm_arguments(bn: nn.BatchNorm2d) -> dict[str, Any]:
    """The BatchNorm arguments of :func:`resnet_fast.functional.conv_bn_relu` that make it do
    what ``bn(x)`` does.

    As in ``nn.BatchNorm2d.forward``: training uses batch statistics and, when the module
    tracks running statistics, updates them and counts the batch in ``num_batches_tracked``;
    eval uses the running statistics when the module has them, batch statistics otherwise.
    """
    tracking = bn.training and bn.track_running_stats
    use_running = not bn.training or bn.track_running_stats
    return {
        "running_mean": bn.running_mean if use_running else None,
        "running_var": bn.running_var if use_running else None,
        "bn_weight": bn.weight,
        "bn_bias": bn.bias,
        "training": bn.training,
        "momentum": bn.momentum,
        "eps": bn.eps,
        "num_batches_tracked": bn.num_batches_tracked if tracking else None,
    }


def _materialize(x: Any) -> Tensor:
    """``x`` as a Tensor: a deferred BatchNorm (+ ReLU) is applied."""
    return x if isinstance(x, Tensor) else x.materialize()


def conv_bn_act(
    input: Union[Tensor, "functional.DeferredBatchNorm"],
    conv: nn.Conv2d,
    bn: nn.Module,
    act: Activation,
    *,
    residual: Optional[Tensor] = None,
    defer: bool = False,
    recompute: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, "functional.DeferredBatchNorm"]:
    """``act(bn(conv(input)) + residual)`` for the modules ``conv``, ``bn`` and ``act``.

    ``act`` is an ``nn.ReLU`` (fused), ``None`` (identity) or another activation module (applied
    after the fused part). ``input`` may be a ``DeferredBatchNorm`` from the previous layer,
    whose BatchNorm (+ ReLU) the conv applies as it loads its input. With ``defer=True`` and a
    BatchNorm that normalises with batch statistics, the result is itself deferred (only when
    ``act`` is fused or None, and there is no residual). ``recompute`` as in
    :func:`resnet_fast.functional.conv_bn_relu`. Layers the fused op cannot express run their
    modules eagerly (see the module docstring). With a :class:`resnet_fast.SyncBatchNorm`, the
    conv runs as its own op, then the synchronised BatchNorm, residual and ReLU in one fused
    pass (:meth:`~resnet_fast.SyncBatchNorm.bn_act`, with the BatchNorm's own backend; nothing
    is deferred or recomputed).
    """
    # Imported here: resnet_fast.sync_batchnorm builds on FusedModule, defined below.
    from resnet_fast.sync_batchnorm import is_fusable_sync_batch_norm

    fused_act = act is None or is_relu(act)
    if fused_act and is_fusable_conv(conv) and is_fusable_sync_batch_norm(bn):
        return bn.bn_act(conv(_materialize(input)), residual, relu=act is not None)
    if not (is_fusable_conv(conv) and is_fusable_batch_norm(bn)):
        y = bn(conv(_materialize(input)))
        if residual is not None:
            y = y + residual
        return y if act is None else act(y)
    out = functional.conv_bn_relu(
        input,
        conv.weight,
        conv_bias=conv.bias,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        residual=residual,
        relu=act is not None and fused_act,
        defer=defer and fused_act,
        recompute=recompute,
        backend=backend,
        **batch_norm_arguments(bn),
    )
    return out if fused_act else act(out)


def check_input(x: Any, channels: int, owner: str) -> None:
    """Raises unless ``x`` is a 4-D ``(N, channels, H, W)`` tensor, naming the expected shape."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner} expects a Tensor of shape (N, {channels}, H, W), "
                        f"got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{owner} expects input of shape (N, {channels}, H, W), "
                         f"got {tuple(x.shape)}")


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
