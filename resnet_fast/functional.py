"""Differentiable fused ops, mirroring ``torch.nn.functional.batch_norm``.

* :func:`batch_norm_relu` = ``relu(batch_norm(input))``
* :func:`batch_norm_add_relu` = ``relu(batch_norm(input) + residual)``
* :func:`dual_batch_norm_add_relu` = ``relu(batch_norm(input) + batch_norm(residual))``, the end
  of a ResNet block whose shortcut is a downsampling conv with its own BatchNorm.

Semantics are ``nn.BatchNorm2d``'s: in training the batch statistics normalise and the running
statistics (when given) are updated in place with the unbiased variance; in eval the running
statistics normalise; with ``running_mean=None`` batch statistics are used in eval too.
``momentum=None`` is the cumulative moving average, which needs the ``num_batches_tracked``
counter (incremented in place, as the module does). ``weight``/``bias`` may be ``None``.

Inputs are 4-D ``(N, C, H, W)`` in float16, bfloat16, float32 or float64, NCHW or channels_last;
the output has the input's dtype and memory format (a non-dense input is computed densely).
Per-channel tensors may be float32 while the input is half or bfloat16, as under
``torch.autocast``, where a residual of another floating dtype is cast to the input's.

``backend`` selects the implementation (see :mod:`resnet_fast.backends`): ``None`` picks the
fastest available for the input's device, ``$RESNET_FAST_BACKEND`` overrides that default.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from resnet_fast import ops, reference
from resnet_fast.backends import resolve_backend
from resnet_fast.reference import _momentum_factor

__all__ = ["batch_norm_relu", "batch_norm_add_relu", "dual_batch_norm_add_relu"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _BatchNormArgs(NamedTuple):
    """One BatchNorm's tensors, with the prefix its arguments carry in error messages."""

    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    prefix: str = ""


def _check_activation(name: str, t: object, like: Optional[Tensor] = None) -> None:
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
    if t.shape != like.shape:
        raise ValueError(
            f"{name} must have the input's shape {tuple(like.shape)}, got {tuple(t.shape)}"
        )
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but input is on {like.device}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but input has dtype {like.dtype}")


def _check_batch_norm_args(bn: _BatchNormArgs, input: Tensor, training: bool) -> None:
    C = input.shape[1]
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
                f"{name} must have shape ({C},) (one value per channel of input), "
                f"got {tuple(t.shape)}"
            )
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if (bn.running_mean is None) != (bn.running_var is None):
        raise ValueError(
            f"{bn.prefix}running_mean and {bn.prefix}running_var must both be given or both None"
        )
    if training and input.numel() // input.shape[1] == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{list(input.shape)}"
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
    _check_activation("input", input)
    if residual is not None:
        if (
            isinstance(residual, Tensor)
            and residual.is_floating_point()
            and residual.dtype != input.dtype
            and torch.is_autocast_enabled(input.device.type)
        ):
            residual = residual.to(input.dtype)
        _check_activation("residual", residual, like=input)
    branches = [bn] if residual_bn is None else [bn, residual_bn]
    for branch in branches:
        _check_batch_norm_args(branch, input, training)
    if residual_bn is not None and (bn.running_mean is None) != (residual_bn.running_mean is None):
        raise ValueError(
            "running_mean and residual_running_mean must both be given or both None: the two "
            "BatchNorms of a block end track statistics together"
        )
    name = resolve_backend(backend, input.device)

    if name == "reference":
        kwargs = {"num_batches_tracked": bn.num_batches_tracked}
        args = (input, residual, *bn[:4]) if residual is not None else (input, *bn[:4])
        if residual_bn is not None:
            args = args + tuple(residual_bn[:4])
            kwargs["residual_num_batches_tracked"] = residual_bn.num_batches_tracked
        return getattr(reference, api)(*args, training, momentum, eps, **kwargs)

    counts = [b.num_batches_tracked for b in branches]
    if (momentum is None and training and len(counts) == 2 and None not in counts
            and not torch.equal(counts[0], counts[1])):
        raise ValueError(
            "momentum=None needs num_batches_tracked and residual_num_batches_tracked to be equal "
            "(the two BatchNorms of a block end are updated together)"
        )
    factors = [_momentum_factor(momentum, training, b.running_mean, b.num_batches_tracked)
               for b in branches]
    rb = residual_bn if residual_bn is not None else _BatchNormArgs(None, None, None, None, None)
    # Eval with running statistics normalises with them; otherwise batch statistics are used,
    # and the running statistics (when given) are updated.
    batch_stats = training or bn.running_mean is None
    out, _save_stats, new_running = ops.fused_bn_act(
        input,
        bn.weight,
        bn.bias,
        bn.running_mean,
        bn.running_var,
        residual,
        rb.weight,
        rb.bias,
        rb.running_mean,
        rb.running_var,
        residual_bn is not None,
        batch_stats,
        factors[0],
        eps,
        True,
        name,
    )
    if training and bn.running_mean is not None:
        with torch.no_grad():
            stats = [t for b in branches for t in (b.running_mean, b.running_var)]
            torch._foreach_copy_(stats, list(new_running.flatten(0, 1).unbind(0)))
    return out


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
