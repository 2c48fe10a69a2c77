"""Layers of a ResNet run as fused ops: ``nn.Conv2d`` + ``nn.BatchNorm2d`` (+ residual) (+ ReLU).

The modules stay the ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.ReLU`` that own the
parameters and buffers (so state_dicts, optimizers, ``.to()``, ``momentum``, ``eps`` and
``track_running_stats`` behave as usual); :func:`conv_bn_act` reads their tensors and runs the
whole chain as one :func:`resnet_fast.functional.conv_bn_relu` call, with ``nn.BatchNorm2d``'s
own semantics: ``bn.training`` picks batch or running statistics, and the running statistics and
``num_batches_tracked`` update in place exactly when the module would update them.

:func:`block_end` does the same for the end of a residual block, the shortcut plain or itself a
conv + BatchNorm. A :class:`resnet_fast.SyncBatchNorm` runs its own fused op after the conv (see
:func:`conv_bn_act`). A layer that the fused op cannot express exactly (a conv with a non-zero
``padding_mode``, another norm layer that is not a plain ``nn.BatchNorm2d``, an activation
other than ReLU, a module with forward hooks, which must still fire) runs its modules eagerly
instead: never a silent change of meaning.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor, nn

from resnet_fast import functional
from resnet_fast._conventions import conv_output_shape
from resnet_fast.fused_module import FusedModule, has_hooks, validate_backend
from resnet_fast.sync_batchnorm import is_fusable_sync_batch_norm

__all__ = [
    "FusedModule",
    "conv_bn_act",
    "block_end",
    "batch_norm_arguments",
    "uses_batch_statistics",
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


def is_fusable_conv(conv: Any) -> bool:
    """Whether ``conv`` is an ``nn.Conv2d`` whose forward the fused op reproduces exactly: the
    module's own forward (not overridden), zero padding given as numbers, no forward hooks."""
    return (
        isinstance(conv, nn.Conv2d)
        and type(conv).forward is nn.Conv2d.forward
        and type(conv)._conv_forward is nn.Conv2d._conv_forward
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not has_hooks(conv)
    )


def is_fusable_batch_norm(bn: Any) -> bool:
    """Whether ``bn`` is an ``nn.BatchNorm2d`` running ``nn.BatchNorm2d``'s own forward, with
    no forward hooks (``SyncBatchNorm``, ``FrozenBatchNorm2d``, ``GroupNorm`` are not)."""
    return (
        isinstance(bn, nn.BatchNorm2d)
        and type(bn).forward is _BatchNorm.forward
        and not has_hooks(bn)
    )


def is_relu(act: Any) -> bool:
    """Whether ``act`` is an ``nn.ReLU`` (in place or not) without hooks."""
    return (isinstance(act, nn.ReLU) and type(act).forward is nn.ReLU.forward
            and not has_hooks(act))


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


def uses_batch_statistics(bn: nn.Module) -> bool:
    """Whether ``bn`` normalises with batch statistics, as ``nn.BatchNorm2d.forward`` decides:
    in training, and in eval without running statistics."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


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


def block_end(
    input: Union[Tensor, "functional.DeferredBatchNorm"],
    conv: nn.Conv2d,
    bn: nn.Module,
    act: Activation,
    shortcut: Tensor,
    shortcut_conv: Optional[nn.Conv2d] = None,
    shortcut_bn: Optional[nn.Module] = None,
    *,
    recompute: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """``act(bn(conv(input)) + s)``, the end of a residual block, ``s`` being ``shortcut`` or,
    with ``shortcut_conv`` and ``shortcut_bn``, ``shortcut_bn(shortcut_conv(shortcut))``.

    ``act`` as in :func:`conv_bn_act` (a ReLU is fused, ``None`` is the identity, any other
    module runs after the fused part). When both BatchNorms normalise with batch statistics
    (training), ``act`` is a ReLU and both pairs are fusable, both convs stop before their
    BatchNorm (their running statistics already updated) and one
    :func:`~resnet_fast.functional.dual_batch_norm_add_relu` ends the block: the shortcut's
    normalised activation is never written out or kept for backward. Otherwise the shortcut is
    one fused conv + BatchNorm and the end one fused conv + BatchNorm + residual (+ ReLU).
    ``recompute`` (``memory_efficient``) takes the second way, each conv recomputing its output
    in backward instead of keeping it. A residual that is not of the conv output's shape (an
    add that broadcasts) is added eagerly after the fused conv + BatchNorm.
    """
    fusable = is_fusable_conv(conv) and is_fusable_batch_norm(bn)
    # A SyncBatchNorm takes the residual into its own fused pass after the conv: same shape.
    sync = is_fusable_conv(conv) and is_fusable_sync_batch_norm(bn)
    shape = _conv_output_shape(input, conv) if fusable or sync else None
    if shortcut_conv is None:
        residual = shortcut
    else:
        if (fusable and not recompute and is_relu(act) and is_fusable_conv(shortcut_conv)
                and is_fusable_batch_norm(shortcut_bn) and uses_batch_statistics(bn)
                and uses_batch_statistics(shortcut_bn) and bn.eps == shortcut_bn.eps
                and _conv_output_shape(shortcut, shortcut_conv) == shape):
            main = conv_bn_act(input, conv, bn, None, defer=True, backend=backend)
            short = conv_bn_act(shortcut, shortcut_conv, shortcut_bn, None, defer=True,
                                backend=backend)
            return functional.dual_batch_norm_add_relu(
                main.raw, short.raw, None, None, main.weight, main.bias, None, None,
                short.weight, short.bias, True, 0.0, bn.eps, backend=backend)
        residual = conv_bn_act(shortcut, shortcut_conv, shortcut_bn, None, recompute=recompute,
                               backend=backend)
    if shape is not None and not (isinstance(residual, Tensor) and residual.shape == shape):
        y = conv_bn_act(input, conv, bn, None, recompute=recompute, backend=backend) + residual
        return y if act is None else act(y)
    return conv_bn_act(input, conv, bn, act, residual=residual, recompute=recompute,
                       backend=backend)


def _conv_output_shape(x: Any, conv: nn.Conv2d) -> tuple[int, int, int, int]:
    return conv_output_shape(x.shape, conv.weight.shape, conv.stride, conv.padding,
                             conv.dilation)


def check_input(x: Any, channels: int, owner: str) -> None:
    """Raises unless ``x`` is a 4-D ``(N, channels, H, W)`` tensor, naming the expected shape."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner} expects a Tensor of shape (N, {channels}, H, W), "
                        f"got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{owner} expects input of shape (N, {channels}, H, W), "
                         f"got {tuple(x.shape)}")
