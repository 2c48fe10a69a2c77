"""Synchronized BatchNorm on resnet_fast's fused kernels: :class:`SyncBatchNorm`.

In training the batch statistics are those of the whole batch across the processes of a
``torch.distributed`` process group (gloo on the CPU, NCCL on CUDA; DDP and torchrun), with one
collective per layer each way and no host synchronisation:

* forward: each process computes its per-channel partial statistics (count, mean, M2 = the sum
  of squared deviations from its mean), packs them as one ``(3, C)`` float64 tensor and
  all-gathers it (``all_gather_into_tensor``); every process merges the gathered rows itself,
  weighting each by its count (Chan et al.'s parallel variance: ``mean = sum(n_i * mean_i) / n``,
  ``M2 = sum(M2_i) + sum(n_i * (mean_i - mean)^2)``), so uneven per-process batches (an empty
  one too) are exact. The global mean and biased variance then normalise through the fused
  ``resnet_fast::bn_act`` op in its eval form: ``act(batch_norm(x) + residual)`` in one pass.
* backward: ``resnet_fast::bn_act_backward`` in its eval form gives ``g * w * invstd`` (``g`` the
  output gradient through the ReLU mask) and this process's ``sum(g)`` and
  ``sum(g * xhat)``; those two are all-reduced as one ``(2, C)`` tensor, and one more fused
  ``bn_act`` pass (affine, no ReLU, the first term as its residual) adds the centring terms
  ``-w * invstd * (sum(g) + xhat * sum(g * xhat)) / n`` of the global batch. The weight and
  bias gradients are this process's own sums, as ``nn.SyncBatchNorm`` returns them (DDP
  averages them with the other gradients).

The running statistics and ``num_batches_tracked`` are updated as ``nn.SyncBatchNorm`` updates
them: the global mean and the unbiased variance over the global count, ``momentum``, or the
cumulative average for ``momentum=None`` (computed on the device from the counter, no
``.item()``).

Eval, a world of one process, and training without an initialised process group use the local
fused path (the same ``resnet_fast::bn_act`` op as :func:`resnet_fast.batch_norm_relu`); the
last warns once (:class:`SyncBatchNormWarning`), as the statistics are then this process's only.
Inputs other than 4-D, and the ``reference`` backend, run
:func:`resnet_fast.reference.sync_batch_norm` (eager ops, synchronised the same way).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from resnet_fast import functional, ops, reference
from resnet_fast._conventions import acc_dtype_of
from resnet_fast.backends import resolve_backend
from resnet_fast.fused_module import FusedModule, has_hooks

__all__ = ["SyncBatchNorm", "SyncBatchNormWarning", "convert_sync_batchnorm",
           "is_fusable_sync_batch_norm", "adopt_sync_batch_norms"]

_BatchNorm = nn.modules.batchnorm._BatchNorm
# Converted by convert_sync_batchnorm: torch's BatchNorms that run _BatchNorm's own forward.
_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class SyncBatchNormWarning(UserWarning):
    """A :class:`SyncBatchNorm` trained without an initialised process group: it normalised
    with this process's batch statistics only."""


def _local_statistics(x: Tensor) -> Tensor:
    """``(3, C)`` float64 rows (count, mean, M2) of ``x``'s channels; zeros for an empty batch."""
    C = x.shape[1]
    count = x.numel() // C
    if count == 0:
        return x.new_zeros((3, C), dtype=torch.float64)
    # Half / bfloat16 sums would round the statistics to the input's precision.
    xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
    # Two passes (the mean, then the squared deviations from it): robust where the mean is
    # large against the spread, and on the CPU several times faster than torch.var_mean.
    mean = xs.mean((0, 2, 3))
    m2 = (xs - mean.view(1, C, 1, 1)).square_().sum((0, 2, 3))
    return torch.stack([mean.new_full((C,), count, dtype=torch.float64), mean.double(),
                        m2.double()])


def _merge(gathered: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, mean, biased var)`` per channel of the processes' ``(W, 3, C)`` rows."""
    counts, means, m2 = gathered.unbind(1)
    n = counts.sum(0)
    mean = (counts * means).sum(0) / n
    m2 = m2.sum(0) + (counts * (means - mean).square()).sum(0)
    return n, mean, m2 / n


def _update_running(running_mean: Tensor, running_var: Tensor,
                    num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                    n: Tensor, mean: Tensor, var: Tensor) -> None:
    """The running statistics and counter updated in place as ``nn.SyncBatchNorm`` does."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    factor = (1.0 / num_batches_tracked.double()) if momentum is None else momentum
    unbiased = var * (n / (n - 1))
    running_mean.copy_((1 - factor) * running_mean.double() + factor * mean)
    running_var.copy_((1 - factor) * running_var.double() + factor * unbiased)


def _all_gather_into_tensor(out: Tensor, local: Tensor, group) -> None:
    """Every process's ``local`` concatenated along dim 0 into ``out``: one collective
    (``all_gather_single`` where torch has it, which deprecates ``all_gather_into_tensor``)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=group)


class _SyncBatchNormAct(torch.autograd.Function):
    """``act(batch_norm(x) + residual)`` with the statistics of the whole process group (see
    the module docstring); one collective in forward, one in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                momentum, eps, relu, group, backend):
        acc = acc_dtype_of(x.dtype)
        local = _local_statistics(x)
        world = dist.get_world_size(group)
        gathered = local.new_empty((world * local.shape[0], local.shape[1]))
        _all_gather_into_tensor(gathered, local, group)
        n, mean, var = _merge(gathered.view(world, *local.shape))
        if running_mean is not None:
            _update_running(running_mean, running_var, num_batches_tracked, momentum, n, mean,
                            var)
        mean, var = mean.to(acc), var.to(acc)
        if x.numel():
            out, save_stats = ops.bn_act(
                input=x, weight=weight, bias=bias, running_mean=mean, running_var=var,
                num_batches_tracked=None, residual=residual, residual_weight=None,
                residual_bias=None, residual_running_mean=None, residual_running_var=None,
                residual_num_batches_tracked=None, residual_bn=False, batch_stats=False,
                momentum=0.0, eps=eps, relu=relu, backend=backend)
        else:  # an empty share of the batch: nothing to normalise, the collectives still run
            out = torch.empty_like(x)
            save_stats = torch.stack([mean, torch.rsqrt(var + eps)]).unsqueeze(0)
        ctx.save_for_backward(x, weight, bias, residual, mean, var, save_stats, n.to(acc))
        ctx.eps, ctx.relu, ctx.group, ctx.backend = eps, relu, group, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, residual, mean, var, save_stats, n = ctx.saved_tensors
        acc = mean.dtype
        if x.numel():
            grad_local, grad_weight, grad_bias, grad_residual, _, _ = ops.bn_act_backward(
                grad_out=grad_out, input=x, weight=weight, bias=bias, residual=residual,
                residual_weight=None, residual_bias=None, save_stats=save_stats,
                residual_bn=False, batch_stats=False, relu=ctx.relu, backend=ctx.backend)
        else:
            grad_local, grad_residual = torch.empty_like(x), torch.empty_like(x)
            grad_weight = grad_bias = x.new_zeros(x.shape[1], dtype=acc)
        sums = torch.stack([grad_bias, grad_weight])  # sum(g), sum(g * xhat)
        dist.all_reduce(sums, group=ctx.group)
        invstd = save_stats[0, 1]
        scale = invstd if weight is None else weight.to(acc) * invstd
        # dx = scale * (g - (sum(g) + xhat * sum(g * xhat)) / n): the term in g is grad_local,
        # the affine term in xhat = (x - mean) * invstd one more fused pass.
        k_xhat = -scale * sums[1] / n
        k_c = -scale * sums[0] / n
        if x.numel():
            grad_input = ops.bn_act(
                input=x, weight=k_xhat, bias=k_c, running_mean=mean, running_var=var,
                num_batches_tracked=None, residual=grad_local, residual_weight=None,
                residual_bias=None, residual_running_mean=None, residual_running_var=None,
                residual_num_batches_tracked=None, residual_bn=False, batch_stats=False,
                momentum=0.0, eps=ctx.eps, relu=False, backend=ctx.backend)[0]
        else:
            grad_input = grad_local
        return (grad_input,
                None if weight is None else grad_weight.to(weight.dtype),
                None if bias is None else grad_bias.to(bias.dtype),
                None if residual is None else grad_residual.to(residual.dtype),
                None, None, None, None, None, None, None, None)


def _process_group_size(group) -> int:
    """The number of processes ``group`` (``None``: the default group) synchronises, 0 when no
    process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_world_size(group)


@functools.cache
def _warn_unsynchronised() -> None:
    """Warns, once per process, that a SyncBatchNorm trains without a process group."""
    warnings.warn(
        "resnet_fast.SyncBatchNorm in training without an initialised process group "
        "(torch.distributed.init_process_group): it normalises with this process's batch "
        "statistics only", SyncBatchNormWarning, stacklevel=3)


class SyncBatchNorm(FusedModule, _BatchNorm):
    """``nn.SyncBatchNorm`` on resnet_fast's fused kernels (see the module docstring): the same
    arguments, parameters, buffers and state_dict keys, and the same training semantics.

    It is not an ``nn.SyncBatchNorm`` instance, so it also runs under DDP on CPU modules (gloo).
    In a fused ResNet (:mod:`resnet_fast.models`, :func:`resnet_fast.convert`) the conv before
    it runs as its own op, then this BatchNorm with the block's residual add and ReLU
    (:meth:`bn_act`) in one fused pass. ``backend`` (:meth:`set_backend`) picks the kernels.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Any = None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects input of at least 2 dimensions (N, C, ...), "
                             f"got {input.dim()}-D of shape {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        """``batch_norm(input)``, synchronised in training (see the module docstring)."""
        return self.bn_act(input)

    def bn_act(self, input: Tensor, residual: Optional[Tensor] = None,
               relu: bool = False) -> Tensor:
        """``act(self(input) + residual)``: this BatchNorm, then ``residual`` added (when given,
        of the input's shape, dtype and device) and ReLU (``relu=True``), in one fused pass."""
        if not isinstance(input, Tensor):
            raise TypeError(f"SyncBatchNorm expects a Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm({self.num_features}) expects input of shape "
                             f"(N, {self.num_features}, ...), got {tuple(input.shape)}")
        if residual is not None:
            functional._check_activation("residual", residual, like=input)
        backend = resolve_backend(self.backend, input.device)
        fused = input.dim() == 4 and backend != "reference"
        if fused and input.numel():
            functional._check_activation("input", input)
        # As nn.SyncBatchNorm.forward: which statistics are tracked, and whether to synchronise.
        running_mean = (self.running_mean if not self.training or self.track_running_stats
                        else None)
        running_var = self.running_var if running_mean is not None else None
        num_batches_tracked = (self.num_batches_tracked
                               if self.training and self.track_running_stats else None)
        world = _process_group_size(self.process_group) if self.training else 1
        if world == 0:
            _warn_unsynchronised()
        if world > 1 and fused:
            return _SyncBatchNormAct.apply(
                input, self.weight, self.bias, residual, running_mean, running_var,
                num_batches_tracked, self.momentum, self.eps, relu, self.process_group, backend)
        if world > 1:
            return reference.sync_batch_norm(
                input, running_mean, running_var, self.weight, self.bias, self.momentum,
                self.eps, residual=residual, relu=relu, num_batches_tracked=num_batches_tracked,
                process_group=self.process_group)
        batch_stats = self.training or running_mean is None
        if not fused:
            y = reference._batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                      batch_stats, self.momentum, self.eps, num_batches_tracked)
            y = y if residual is None else y + residual
            return torch.relu(y) if relu else y
        functional._check_activation("input", input)
        functional._check_batch_norm_args(
            functional._BatchNormArgs(running_mean, running_var, self.weight, self.bias,
                                      num_batches_tracked), input, batch_stats)
        factor = reference._momentum_factor(self.momentum, batch_stats, running_mean,
                                            num_batches_tracked, count=False)
        return ops.bn_act(
            input=input, weight=self.weight, bias=self.bias, running_mean=running_mean,
            running_var=running_var, num_batches_tracked=num_batches_tracked, residual=residual,
            residual_weight=None, residual_bias=None, residual_running_mean=None,
            residual_running_var=None, residual_num_batches_tracked=None, residual_bn=False,
            batch_stats=batch_stats, momentum=factor, eps=self.eps, relu=relu, backend=backend)[0]


def is_fusable_sync_batch_norm(bn: Any, *, convertible: bool = False) -> bool:
    """Whether ``bn`` is a :class:`SyncBatchNorm` running its own forward, with no forward
    hooks; with ``convertible``, a plain ``nn.SyncBatchNorm`` (which :func:`resnet_fast.convert`
    turns into one) counts too."""
    if convertible and type(bn) is nn.SyncBatchNorm:
        return not has_hooks(bn)
    return (isinstance(bn, SyncBatchNorm) and type(bn).forward is SyncBatchNorm.forward
            and not has_hooks(bn))


def adopt_sync_batch_norms(model: nn.Module) -> int:
    """Turns every plain ``nn.SyncBatchNorm`` in ``model`` into a :class:`SyncBatchNorm` in
    place (the same object, its ``process_group``, parameters, buffers and hooks kept);
    returns how many."""
    adopted = 0
    for m in model.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = SyncBatchNorm
            adopted += 1
    return adopted


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Makes every BatchNorm of ``model`` a :class:`SyncBatchNorm` over ``process_group``
    (``None``: the default group, resolved when it runs) in place; returns ``model``.

    resnet_fast's ``nn.SyncBatchNorm.convert_sync_batchnorm``: plain ``nn.BatchNorm1d/2d/3d``,
    ``nn.SyncBatchNorm`` and :class:`SyncBatchNorm` modules change class (the same objects,
    so parameters, buffers, hooks, state_dict keys and optimizer parameter groups carry on) and
    take ``process_group``. A BatchNorm class with a forward of its own is left as it is. In a
    fused model (:mod:`resnet_fast.models`, :func:`resnet_fast.convert`) each converted
    BatchNorm runs fused with its block's residual add and ReLU.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_sync_batchnorm() takes a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be None or a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")
    found = False
    for m in model.modules():
        if type(m) in (*_PLAIN_BATCH_NORMS, nn.SyncBatchNorm, SyncBatchNorm):
            m.__class__ = SyncBatchNorm
            m.process_group = process_group
            found = True
    if not found:
        warnings.warn(f"resnet_fast.convert_sync_batchnorm found no BatchNorm to convert in "
                      f"{type(model).__name__}", SyncBatchNormWarning, stacklevel=2)
    return model
