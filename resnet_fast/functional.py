"""Differentiable fused ops, mirroring ``torch.nn.functional.batch_norm``.

* :func:`batch_norm_relu` = ``relu(batch_norm(input))``
* :func:`batch_norm_add_relu` = ``relu(batch_norm(input) + residual)``
* :func:`dual_batch_norm_add_relu` = ``relu(batch_norm(input) + batch_norm(residual))``, the end
  of a ResNet block whose shortcut is a downsampling conv with its own BatchNorm.
* :func:`conv_bn_relu` = ``act(batch_norm(conv2d(input)) + residual)``, a whole conv layer; its
  input may be a :class:`DeferredBatchNorm`, the previous layer's conv output and batch
  statistics, normalised inside this conv's input load.

Semantics are ``nn.BatchNorm2d``'s: in training the batch statistics normalise and the running
statistics (when given) are updated in place with the unbiased variance; in eval the running
statistics normalise; with ``running_mean=None`` batch statistics are used in eval too.
``momentum=None`` is the cumulative moving average, which needs the ``num_batches_tracked``
counter (incremented in place, as the module does). ``weight``/``bias`` may be ``None``.

Inputs are 4-D ``(N, C, H, W)`` in float16, bfloat16, float32 or float64, NCHW or channels_last;
the output has the input's dtype and memory format (a non-dense input is computed densely).
Per-channel tensors may be float32 while the input is half or bfloat16, as under
``torch.autocast``, where a residual of another floating dtype is cast to the input's.

``backend`` selects the implementation (see :mod:`resnet_fast.backends`); ``$RESNET_FAST_BACKEND``
overrides the default. With neither, each call site runs the implementation that measured
fastest there, a fused backend or ATen's own sequence (:mod:`resnet_fast.dispatch`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from resnet_fast import dispatch, ops, reference
from resnet_fast._conventions import acc_dtype_of, check_groups, conv_output_shape
from resnet_fast.reference import _momentum_factor

__all__ = [
    "batch_norm_relu",
    "batch_norm_add_relu",
    "dual_batch_norm_add_relu",
    "conv_bn_relu",
    "DeferredBatchNorm",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _BatchNormArgs(NamedTuple):
    """One BatchNorm's tensors, with the prefix its arguments carry in error messages."""

    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    prefix: str = ""


def _check_activation(name: str, t: object, like: Optional[Tensor] = None,
                      like_name: str = "the input's",
                      shape: Optional[tuple[int, ...]] = None) -> None:
    """Checks activation ``t``: on its own (4-D, a supported dtype, not empty), or against
    ``like`` (its shape, or ``shape`` when given; its dtype and device)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if like is None:
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (N, C, H, W), got {t.dim()}-D of shape {tuple(t.shape)}"
            )
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64"
            )
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
        return
    shape = tuple(like.shape) if shape is None else tuple(shape)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have {like_name} shape {shape}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but input is on {like.device}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but input has dtype {like.dtype}")


def _check_batch_norm_args(bn: _BatchNormArgs, input: Tensor, training: bool,
                           shape: Optional[tuple[int, ...]] = None) -> None:
    """Checks one BatchNorm's tensors against the activation it normalises: ``input``, or, for
    a conv's BatchNorm, the conv output of ``shape`` on ``input``'s device."""
    shape = tuple(input.shape) if shape is None else shape
    C = shape[1]
    for field in ("running_mean", "running_var", "weight", "bias"):
        t = getattr(bn, field)
        name = bn.prefix + field
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 1 or t.shape[0] != C:
            raise ValueError(
                f"{name} must have shape ({C},) (one value per channel of the activation it "
                f"normalises), got {tuple(t.shape)}"
            )
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if (bn.running_mean is None) != (bn.running_var is None):
        raise ValueError(
            f"{bn.prefix}running_mean and {bn.prefix}running_var must both be given or both None"
        )
    # Batch statistics of one value per channel (training, or eval without running statistics,
    # which nn.BatchNorm2d also normalises with batch statistics) are refused, as by eager.
    if (training or bn.running_mean is None) and math.prod(shape) // C == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {list(shape)}"
        )


def _check_bn_act_call(input: object, residual: object, bn: _BatchNormArgs,
                       residual_bn: Optional[_BatchNormArgs], training: bool) -> None:
    """The argument checks of the BatchNorm ops (``residual`` already cast under autocast)."""
    _check_activation("input", input)
    if residual is not None:
        _check_activation("residual", residual, like=input)
    branches = [bn] if residual_bn is None else [bn, residual_bn]
    for branch in branches:
        _check_batch_norm_args(branch, input, training)
    if residual_bn is not None and (bn.running_mean is None) != (residual_bn.running_mean is None):
        raise ValueError(
            "running_mean and residual_running_mean must both be given or both None: the two "
            "BatchNorms of a block end track statistics together"
        )


def _fused(
    api: str,
    input: Tensor,
    residual: Optional[Tensor],
    bn: _BatchNormArgs,
    residual_bn: Optional[_BatchNormArgs],
    training: bool,
    momentum: Optional[float],
    eps: float,
    backend: Optional[str],
) -> Tensor:
    site = dispatch.call_site(
        api, (input, residual, *bn[:5], *(() if residual_bn is None else residual_bn[:5])),
        (training, momentum, eps, residual_bn is not None, backend))
    name = dispatch.decided(site)
    if (
        isinstance(residual, Tensor)
        and residual.is_floating_point()
        and isinstance(input, Tensor)
        and residual.dtype != input.dtype
        and torch.is_autocast_enabled(input.device.type)
    ):
        residual = residual.to(input.dtype)
    call = dict(input=input, residual=residual, bn=bn, residual_bn=residual_bn,
                training=training, momentum=momentum, eps=eps)
    if name is None:  # a call site met for the first time: checked in full, then decided
        _check_bn_act_call(input, residual, bn, residual_bn, training)
        name = dispatch.static_choice(api, backend, input.device)
        if name != "reference" and dispatch.measured(backend):
            name = dispatch.choose(
                api, input.device, training, call,
                {"fused": functools.partial(_fused, api), dispatch.ATEN: _aten_bn_act},
                (bn.weight, bn.running_mean), site, momentum_none=momentum is None)
        else:
            dispatch.record(site, name)
    if name == dispatch.ATEN:
        return _aten_bn_act(**call)

    if name == "reference":
        kwargs = {"num_batches_tracked": bn.num_batches_tracked}
        args = (input, residual, *bn[:4]) if residual is not None else (input, *bn[:4])
        if residual_bn is not None:
            args = args + tuple(residual_bn[:4])
            kwargs["residual_num_batches_tracked"] = residual_bn.num_batches_tracked
        return getattr(reference, api)(*args, training, momentum, eps, **kwargs)

    branches = [bn] if residual_bn is None else [bn, residual_bn]
    counts = [b.num_batches_tracked for b in branches]
    if (momentum is None and training and len(counts) == 2 and None not in counts
            and not torch.equal(counts[0], counts[1])):
        raise ValueError(
            "momentum=None needs num_batches_tracked and residual_num_batches_tracked to be equal "
            "(the two BatchNorms of a block end are updated together)"
        )
    factors = [_momentum_factor(momentum, training, b.running_mean, b.num_batches_tracked,
                                count=False) for b in branches]
    rb = residual_bn if residual_bn is not None else _BatchNormArgs(None, None, None, None, None)
    # Eval with running statistics normalises with them; otherwise batch statistics are used,
    # and the running statistics and batch counters (when given) are updated by the op.
    batch_stats = training or bn.running_mean is None
    out, _save_stats = ops.bn_act(
        input=input, weight=bn.weight, bias=bn.bias, running_mean=bn.running_mean,
        running_var=bn.running_var, num_batches_tracked=bn.num_batches_tracked,
        residual=residual, residual_weight=rb.weight, residual_bias=rb.bias,
        residual_running_mean=rb.running_mean, residual_running_var=rb.running_var,
        residual_num_batches_tracked=rb.num_batches_tracked, residual_bn=residual_bn is not None,
        batch_stats=batch_stats, momentum=factors[0], eps=eps, relu=True, backend=name)
    return out


def _aten_batch_norm(input: Tensor, bn: _BatchNormArgs, training: bool,
                     momentum: Optional[float], eps: float) -> Tensor:
    """``nn.BatchNorm2d``'s forward on ``bn``'s tensors, through ATen: the batch counter moves in
    training and ``momentum=None`` averages cumulatively, as the module does. ATen's op is called
    directly: the argument checks of ``F.batch_norm`` ran on the call site's first call."""
    factor = 0.0 if momentum is None else momentum
    if training and bn.running_mean is not None and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    return torch.batch_norm(input, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                            training or bn.running_mean is None, factor, eps,
                            torch.backends.cudnn.enabled)


def _aten_bn_act(input: Tensor, residual: Optional[Tensor], bn: _BatchNormArgs,
                 residual_bn: Optional[_BatchNormArgs], training: bool,
                 momentum: Optional[float], eps: float) -> Tensor:
    """The BatchNorm ops as ATen's sequence (the ``aten`` candidate of measured dispatch):
    ``relu(batch_norm(input) [+ residual or batch_norm(residual)])``, as eager runs the
    modules."""
    y = _aten_batch_norm(input, bn, training, momentum, eps)
    if residual_bn is not None:
        residual = _aten_batch_norm(residual, residual_bn, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y)


def batch_norm_relu(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``relu(batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))``
    in one fused op."""
    bn = _BatchNormArgs(running_mean, running_var, weight, bias, num_batches_tracked)
    return _fused("batch_norm_relu", input, None, bn, None, training, momentum, eps, backend)


def batch_norm_add_relu(
    input: Tensor,
    residual: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``relu(batch_norm(input, ...) + residual)`` in one fused op: a block end with an identity
    shortcut. ``residual`` has the input's shape, dtype and device."""
    if residual is None:
        raise TypeError("residual must be a Tensor, got None (use batch_norm_relu)")
    bn = _BatchNormArgs(running_mean, running_var, weight, bias, num_batches_tracked)
    return _fused("batch_norm_add_relu", input, residual, bn, None, training, momentum, eps,
                  backend)


def dual_batch_norm_add_relu(
    input: Tensor,
    residual: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual_running_mean: Optional[Tensor],
    residual_running_var: Optional[Tensor],
    residual_weight: Optional[Tensor],
    residual_bias: Optional[Tensor],
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
    residual_num_batches_tracked: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``relu(batch_norm(input, ...) + batch_norm(residual, ...))`` in one fused op: the end of a
    block whose shortcut is ``downsample = Sequential(conv1x1, BatchNorm2d)``, with the pre-BN
    output of that conv as ``residual`` and its BatchNorm's tensors as the ``residual_*``
    arguments. Both BatchNorms share ``training``, ``momentum`` and ``eps``, and track running
    statistics together (both or neither)."""
    if residual is None:
        raise TypeError("residual must be a Tensor, got None (use batch_norm_relu)")
    bn = _BatchNormArgs(running_mean, running_var, weight, bias, num_batches_tracked)
    rbn = _BatchNormArgs(residual_running_mean, residual_running_var, residual_weight,
                         residual_bias, residual_num_batches_tracked, prefix="residual_")
    return _fused("dual_batch_norm_add_relu", input, residual, bn, rbn, training, momentum, eps,
                  backend)


def _aten_conv_bn_relu(input: Union[Tensor, "DeferredBatchNorm"], conv_weight: Tensor,
                       running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], training: bool,
                       momentum: Optional[float], eps: float, conv_bias: Optional[Tensor],
                       stride, padding, dilation, groups: int, residual: Optional[Tensor],
                       relu: bool, num_batches_tracked: Optional[Tensor]) -> Tensor:
    """:func:`conv_bn_relu` as ATen's sequence (the ``aten`` candidate of measured dispatch):
    a deferred input materialised, then ``conv2d``, ``batch_norm``, the residual add and ReLU,
    as eager runs the modules."""
    if isinstance(input, DeferredBatchNorm):
        input = input.materialize()
    y = torch.conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups)
    bn = _BatchNormArgs(running_mean, running_var, bn_weight, bn_bias, num_batches_tracked)
    y = _aten_batch_norm(y, bn, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


class DeferredBatchNorm(NamedTuple):
    """``act(batch_norm(raw))`` whose normalisation has not been applied yet.

    :func:`conv_bn_relu` with ``defer=True`` returns one in training: the conv output before its
    BatchNorm (``raw``) and the batch statistics that normalise it, computed in the conv's
    epilogue on the ``triton``/``cuda`` backends; the running statistics are already updated.
    Passed as the ``input`` of the next :func:`conv_bn_relu`, it is normalised (and rectified)
    inside that conv's input load and never stored; that conv's backward gives ``raw``,
    ``weight`` and ``bias`` the full BatchNorm gradient. :meth:`materialize` forms the tensor.

    ``stats`` is ``(2, C)``: the batch mean and ``1 / sqrt(var + eps)`` in the accumulation
    dtype (float32, or float64 for float64 activations); it carries no gradient of its own.
    """

    raw: Tensor
    stats: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    relu: bool
    eps: float
    backend: str

    @property
    def shape(self) -> torch.Size:
        return self.raw.shape

    def materialize(self) -> Tensor:
        """The normalised (and rectified) activation, differentiable like the BatchNorm it
        stands for (batch statistics are recomputed from ``raw``)."""
        if self.backend == "reference":
            y = F.batch_norm(self.raw, None, None, self.weight, self.bias, True, 0.0, self.eps)
            return F.relu(y) if self.relu else y
        return ops.bn_act(
            input=self.raw, weight=self.weight, bias=self.bias, running_mean=None,
            running_var=None, num_batches_tracked=None, residual=None, residual_weight=None,
            residual_bias=None, residual_running_mean=None, residual_running_var=None,
            residual_num_batches_tracked=None, residual_bn=False, batch_stats=True, momentum=0.0,
            eps=self.eps, relu=self.relu, backend=self.backend)[0]


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _check_conv_weight(weight: object, input: Tensor, groups: int) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"conv_weight must be a Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(
            f"conv_weight must be 4-D (out_channels, in_channels / groups, kH, kW), got "
            f"{weight.dim()}-D of shape {tuple(weight.shape)}"
        )
    if weight.dtype != input.dtype:
        raise TypeError(f"conv_weight has dtype {weight.dtype} but input has dtype {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"conv_weight is on {weight.device} but input is on {input.device}")
    check_groups(groups)
    Cin, Cout = input.shape[1], weight.shape[0]
    if Cin % groups or Cout % groups:
        raise ValueError(
            f"input channels ({Cin}) and out channels ({Cout}) must both be divisible by "
            f"groups ({groups})"
        )
    if weight.shape[1] * groups != Cin:
        raise ValueError(
            f"conv_weight of shape {tuple(weight.shape)} expects {weight.shape[1] * groups} "
            f"input channels with groups={groups}, but input has {Cin} (shape "
            f"{tuple(input.shape)})"
        )


def _check_conv_bn_relu_call(x: object, conv_weight: object, conv_bias: object,
                             running_mean, running_var, bn_weight, bn_bias, num_batches_tracked,
                             training: bool, stride, padding, dilation, groups,
                             residual: object, defer: bool) -> None:
    """The argument checks of :func:`conv_bn_relu` (tensors already cast under autocast)."""
    _check_activation("input", x)
    _check_conv_weight(conv_weight, x, groups)
    stride = _pair("stride", stride, 1)
    padding = _pair("padding", padding, 0)
    dilation = _pair("dilation", dilation, 1)
    shape = conv_output_shape(x.shape, conv_weight.shape, stride, padding, dilation)
    if min(shape[2:]) < 1:
        raise ValueError(
            f"input of spatial size {tuple(x.shape[2:])} is too small for conv_weight "
            f"{tuple(conv_weight.shape)} with stride={stride}, padding={padding}, "
            f"dilation={dilation} (output size {tuple(shape[2:])})"
        )
    if conv_bias is not None:
        if not isinstance(conv_bias, Tensor):
            raise TypeError(f"conv_bias must be a Tensor or None, got {type(conv_bias).__name__}")
        if tuple(conv_bias.shape) != (shape[1],):
            raise ValueError(f"conv_bias must have shape ({shape[1]},) (one value per out "
                             f"channel), got {tuple(conv_bias.shape)}")
        if conv_bias.dtype != x.dtype or conv_bias.device != x.device:
            raise TypeError(f"conv_bias ({conv_bias.dtype} on {conv_bias.device}) must have the "
                            f"input's dtype and device ({x.dtype} on {x.device})")
    bn = _BatchNormArgs(running_mean, running_var, bn_weight, bn_bias, num_batches_tracked)
    _check_batch_norm_args(bn, x, training, shape)
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a Tensor or None, got {type(residual).__name__}")
        _check_activation("residual", residual, like=x, like_name="the conv output's",
                          shape=shape)
    if defer and residual is not None:
        raise ValueError("defer=True returns the conv output before its BatchNorm, so residual "
                         "must be None (add it where the BatchNorm is applied)")


def _autocast_conv_dtype(device: torch.device) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def conv_bn_relu(
    input: Union[Tensor, DeferredBatchNorm],
    conv_weight: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    conv_bias: Optional[Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    num_batches_tracked: Optional[Tensor] = None,
    defer: bool = False,
    recompute: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, DeferredBatchNorm]:
    """``act(batch_norm(conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups))
    + residual)`` as one fused op; ``act`` is ReLU (``relu=True``) or the identity, ``residual``
    optional (the output's shape, dtype and device).

    The BatchNorm arguments follow :func:`batch_norm_relu` (running statistics updated in
    training, ``momentum=None``, no tracking with ``running_mean=None``). Gradients reach the
    input, ``conv_weight``, ``conv_bias``, ``bn_weight``, ``bn_bias`` and ``residual``.

    ``input`` may be a :class:`DeferredBatchNorm`; its normalisation (+ ReLU) is applied to the
    loaded input (padding stays zero after it). With ``defer=True`` and batch statistics
    (training), the result is a :class:`DeferredBatchNorm` for the next conv instead of a
    tensor (``residual`` must then be ``None``); with running statistics (eval) deferring gains
    nothing and the tensor is returned.

    ``recompute=True`` trades compute for memory: backward runs the conv once more instead of
    keeping its output (the op then keeps only its input and the residual for backward; the
    gradients are the same); measured dispatch leaves such a call to the fused backend. A
    deferred result keeps nothing of its own either way.

    Under ``torch.autocast`` the conv runs in the autocast dtype, as ``F.conv2d`` does, and the
    BatchNorm tensors keep theirs. channels_last input is the fast layout; the output has the
    input's memory format.
    """
    deferred = input if isinstance(input, DeferredBatchNorm) else None
    x = deferred.raw if deferred is not None else input
    site = dispatch.call_site(
        "conv_bn_relu",
        (x, conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, residual,
         num_batches_tracked, *(() if deferred is None else deferred[1:4])),
        (training, momentum, eps, stride, padding, dilation, groups, relu, defer, recompute,
         None if deferred is None else deferred[4:], backend))
    name = dispatch.decided(site)
    cast = _autocast_conv_dtype(x.device) if isinstance(x, Tensor) else None
    if cast is not None:  # the conv in the autocast dtype, as F.conv2d runs it
        if deferred is None and x.is_floating_point() and x.dtype != cast:
            x = x.to(cast)
        if isinstance(conv_weight, Tensor):
            conv_weight = conv_weight.to(x.dtype)
        if isinstance(conv_bias, Tensor):
            conv_bias = conv_bias.to(x.dtype)
        if (isinstance(residual, Tensor) and residual.is_floating_point()
                and residual.dtype != x.dtype):
            residual = residual.to(x.dtype)
    batch_stats = training or running_mean is None
    defer = bool(defer) and batch_stats
    if name is None:  # a call site met for the first time: checked in full, then decided
        call = dict(input=input if deferred is not None else x, conv_weight=conv_weight,
                    running_mean=running_mean, running_var=running_var, bn_weight=bn_weight,
                    bn_bias=bn_bias, training=training, momentum=momentum, eps=eps,
                    conv_bias=conv_bias, stride=stride, padding=padding, dilation=dilation,
                    groups=groups, residual=residual, relu=relu,
                    num_batches_tracked=num_batches_tracked)
        _check_conv_bn_relu_call(x, conv_weight, conv_bias, running_mean, running_var,
                                 bn_weight, bn_bias, num_batches_tracked, training, stride,
                                 padding, dilation, groups, residual, defer)
        name = dispatch.static_choice("conv_bn_relu", backend, x.device)
        # A recomputing call is not measured: ATen's sequence keeps what eager keeps for
        # backward, and recompute is asked for to keep less.
        if name != "reference" and dispatch.measured(backend) and not (defer or recompute):
            name = dispatch.choose(
                "conv_bn_relu", x.device, training, call,
                {"fused": conv_bn_relu, dispatch.ATEN: _aten_conv_bn_relu}, (conv_weight,),
                site, stride=_pair("stride", stride, 1), padding=_pair("padding", padding, 0),
                dilation=_pair("dilation", dilation, 1), groups=groups, relu=relu,
                momentum_none=momentum is None,
                deferred_relu=None if deferred is None else deferred.relu)
        else:
            dispatch.record(site, name)
    if name == dispatch.ATEN:
        return _aten_conv_bn_relu(input if deferred is not None else x, conv_weight,
                                  running_mean, running_var, bn_weight, bn_bias, training,
                                  momentum, eps, conv_bias, stride, padding, dilation, groups,
                                  residual, relu, num_batches_tracked)
    stride, padding = _pair("stride", stride, 1), _pair("padding", padding, 0)
    dilation = _pair("dilation", dilation, 1)
    conv_args = dict(conv_bias=conv_bias, stride=stride, padding=padding, dilation=dilation,
                     groups=groups)

    if deferred is not None and "reference" in (name, deferred.backend):
        x, deferred = deferred.materialize(), None
    if name == "reference":
        if not defer:
            return reference.conv_bn_relu(
                x, conv_weight, running_mean, running_var, bn_weight, bn_bias, training,
                momentum, eps, residual=residual, relu=relu,
                num_batches_tracked=num_batches_tracked, **conv_args)
        raw = F.conv2d(x, conv_weight, conv_bias, stride, padding, dilation, groups)
        with torch.no_grad():
            var, mean = torch.var_mean(raw, dim=(0, 2, 3), correction=0)
            stats = torch.stack([mean, torch.rsqrt(var + eps)]).to(acc_dtype_of(raw.dtype))
            if running_mean is not None:  # updates them exactly as eager BatchNorm does
                factor = _momentum_factor(momentum, training, running_mean, num_batches_tracked)
                F.batch_norm(raw, running_mean, running_var, None, None, True, factor, eps)
        return DeferredBatchNorm(raw, stats, bn_weight, bn_bias, relu, eps, name)

    factor = _momentum_factor(momentum, training, running_mean, num_batches_tracked, count=False)
    tensors = (x, conv_weight, conv_bias, bn_weight, bn_bias, residual,
               *((deferred.weight, deferred.bias) if deferred is not None else ()))
    save_raw = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)
    prologue = (dict(in_weight=deferred.weight, in_bias=deferred.bias, in_stats=deferred.stats,
                     in_relu=deferred.relu) if deferred is not None
                else dict(in_weight=None, in_bias=None, in_stats=None, in_relu=False))
    out, _raw, save_stats = ops.conv_bn_act(
        input=x, weight=conv_weight, conv_bias=conv_bias, stride=list(stride),
        padding=list(padding), dilation=list(dilation), groups=groups, **prologue,
        bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean, running_var=running_var,
        num_batches_tracked=num_batches_tracked, residual=residual, batch_stats=batch_stats,
        momentum=factor, eps=eps, relu=relu, defer=defer, save_raw=save_raw,
        recompute=bool(recompute), backend=name)
    if defer:
        return DeferredBatchNorm(out, save_stats, bn_weight, bn_bias, relu, eps, name)
    return out
