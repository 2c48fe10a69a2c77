"""Eager definitions of every fused op: the ground truth the kernels are checked against.

Written with ``torch.nn.functional`` only (and ``torch.distributed.all_reduce`` for
:func:`sync_batch_norm`), so each function is exactly what a PyTorch user would write by hand.
The signatures match :mod:`resnet_fast.functional` (minus ``backend``), so a test can call
either module with the same arguments. Running statistics are updated in place by
``F.batch_norm``, as ``nn.BatchNorm2d`` does.

``momentum=None`` means a cumulative moving average, as in ``nn.BatchNorm2d``: the factor is
``1 / num_batches_tracked`` after the counter is incremented. Here the counter is the optional
``num_batches_tracked`` tensor, incremented in place when statistics are tracked in training
(``nn.BatchNorm2d`` keeps it as a buffer and does the same).

The eager ResNets (``ResNet``, ``BasicBlock``, ``Bottleneck``, ``resnet18`` ...), the ground
truth of :mod:`resnet_fast.models`, are defined in :mod:`resnet_fast.reference_models` and
reached from here as well.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from resnet_fast.reference_models import (  # noqa: F401  (re-exported, see the docstring)
    ARCHITECTURES, BasicBlock, Bottleneck, ResNet, conv1x1, conv3x3, resnet18, resnet34, resnet50,
    resnet101, resnet152, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2,
    wide_resnet101_2)

__all__ = [
    "batch_norm_relu", "batch_norm_add_relu", "dual_batch_norm_add_relu", "conv_bn_relu",
    "sync_batch_norm",
    "ResNet", "BasicBlock", "Bottleneck", "conv3x3", "conv1x1", "ARCHITECTURES",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]


def _momentum_factor(
    momentum: Optional[float],
    training: bool,
    running_mean: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    count: bool = True,
) -> float:
    """The exponential-average factor ``nn.BatchNorm2d.forward`` would pass to ``F.batch_norm``,
    counting this batch in ``num_batches_tracked`` as it does when ``count`` (the fused ops
    count it themselves: with ``count=False`` the counter is read, not updated)."""
    if not (training and running_mean is not None):
        return 0.0 if momentum is None else momentum
    if momentum is None and num_batches_tracked is None:
        raise ValueError(
            "momentum=None (cumulative moving average) needs num_batches_tracked, the count of "
            "batches seen so far, as nn.BatchNorm2d keeps it"
        )
    if num_batches_tracked is not None and count:
        num_batches_tracked.add_(1)
    if momentum is not None:
        return momentum
    return 1.0 / (float(num_batches_tracked) + (0 if count else 1))


def _batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor],
) -> Tensor:
    # F.batch_norm uses batch statistics when there are no running statistics, in eval too.
    factor = _momentum_factor(momentum, training, running_mean, num_batches_tracked)
    return F.batch_norm(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training or running_mean is None,
        factor,
        eps,
    )


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
) -> Tensor:
    """``relu(batch_norm(input))``."""
    y = _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked,
    )
    return F.relu(y)


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
) -> Tensor:
    """``relu(batch_norm(input) + residual)``: the end of a ResNet block with an identity shortcut."""
    y = _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked,
    )
    return F.relu(y + residual)


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
) -> Tensor:
    """``relu(batch_norm(input) + batch_norm(residual))``: a block end whose shortcut is a
    downsampling conv followed by its own BatchNorm (same ``training``, ``momentum``, ``eps``)."""
    y = _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked,
    )
    r = _batch_norm(
        residual, residual_running_mean, residual_running_var, residual_weight, residual_bias,
        training, momentum, eps, residual_num_batches_tracked,
    )
    return F.relu(y + r)


def conv_bn_relu(
    input: Tensor,
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
) -> Tensor:
    """``act(batch_norm(conv2d(input)) + residual)``: a conv layer, its BatchNorm, the optional
    shortcut add and ReLU (``relu=True``) or identity (``relu=False``)."""
    y = F.conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups)
    y = _batch_norm(
        y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
        num_batches_tracked,
    )
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


class _AllReduce(torch.autograd.Function):
    """The sum of ``tensor`` over the processes of ``group``; the gradient is summed alike
    (each process's output feeds its own loss, and the input feeds all of them)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return _AllReduce.apply(grad, ctx.group), None


def sync_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    relu: bool = False,
    num_batches_tracked: Optional[Tensor] = None,
    process_group=None,
) -> Tensor:
    """``act(batch_norm(input) + residual)`` with the batch statistics of every process of
    ``process_group`` (``None``: the default group), as ``nn.SyncBatchNorm`` computes in
    training: the ground truth of :class:`resnet_fast.SyncBatchNorm`.

    Plain ops and a differentiable all_reduce (:class:`_AllReduce`, whose backward
    all-reduces the gradients): one all_reduce of each process's count and per-channel sum
    gives the global mean, a second one of the per-channel sum of squared deviations from it
    the (biased) variance; backward runs one for each. ``input`` is ``(N, C, ...)``; the running
    statistics (when given) are updated in place with the unbiased variance over the global
    count, and ``num_batches_tracked`` counted, as ``nn.SyncBatchNorm`` does.
    """
    dims = [0, *range(2, input.dim())]
    shape = [1, -1] + [1] * (input.dim() - 2)
    count = input.new_full((1,), input.numel() // input.shape[1])
    sums = _AllReduce.apply(torch.cat([count, input.sum(dims)]), process_group)
    n, mean = sums[0], sums[1:] / sums[0]
    centered = input - mean.view(shape)
    var = _AllReduce.apply(centered.square().sum(dims), process_group) / n
    y = centered * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    if running_mean is not None:
        factor = _momentum_factor(momentum, True, running_mean, num_batches_tracked)
        with torch.no_grad():
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            unbiased = (var * (n / (n - 1))).to(running_var.dtype)
            running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y
