"""Eager definitions of every fused op: the ground truth the kernels are checked against.

Written with ``torch.nn.functional`` only, so each function is exactly what a PyTorch user would
write by hand. The signatures match :mod:`resnet_fast.functional` (minus ``backend``), so a test
can call either module with the same arguments. Running statistics are updated in place by
``F.batch_norm``, as ``nn.BatchNorm2d`` does.

``momentum=None`` means a cumulative moving average, as in ``nn.BatchNorm2d``: the factor is
``1 / num_batches_tracked`` after the counter is incremented. Here the counter is the optional
``num_batches_tracked`` tensor, incremented in place when statistics are tracked in training
(``nn.BatchNorm2d`` keeps it as a buffer and does the same).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["batch_norm_relu", "batch_norm_add_relu", "dual_batch_norm_add_relu", "conv_bn_relu"]


def _momentum_factor(
    momentum: Optional[float],
    training: bool,
    running_mean: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
) -> float:
    """The exponential-average factor ``nn.BatchNorm2d.forward`` would pass to ``F.batch_norm``."""
    if not (training and running_mean is not None):
        return 0.0 if momentum is None else momentum
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError(
            "momentum=None (cumulative moving average) needs num_batches_tracked, the count of "
            "batches seen so far, as nn.BatchNorm2d keeps it"
        )
    return 1.0 / float(num_batches_tracked)


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
