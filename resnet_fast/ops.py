"""The ``torch.library`` registration of resnet_fast's fused ops: schemas, fake kernels, autograd.

Every backend runs under the same op, chosen by its ``backend`` argument, so ``torch.compile``,
``torch.library.opcheck`` and autograd see one op whatever the device and backend:

``resnet_fast::bn_act`` (functional; differentiable)
    ``out = act(batch_norm(input) + r_term)`` with ``r_term`` = 0, ``residual``, or
    ``batch_norm(residual)`` when ``residual_bn``. Returns ``(out, save_stats, new_running)``:
    ``save_stats`` is ``(B, 2, C)`` (mean, invstd) per BatchNorm branch (``B`` = 2 with
    ``residual_bn``), the statistics backward needs; ``new_running`` is the updated running
    ``(mean, var)`` per branch, or an empty tensor when no statistics are tracked. The op does not
    mutate its inputs: :mod:`resnet_fast.functional` copies ``new_running`` into the buffers.
``resnet_fast::bn_act_backward`` (functional)
    The gradients of ``bn_act``; its autograd formula calls it.

Arguments reaching a backend are normalised here (see ``_prepare``): ``input``, ``residual``
and ``grad_out`` dense in one layout (NCHW or channels_last, the input's), weight and bias
materialised and, like all per-channel tensors, in the accumulation dtype (float64 for float64
input, float32 otherwise). The backends implement ``forward`` and ``backward`` with the same
arguments as the two ops minus ``backend``.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

__all__ = ["bn_act", "bn_act_backward", "fused_bn_act", "memory_format_of", "acc_dtype_of"]


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The dense layout a fused op computes in and returns: the input's own when it is dense in
    NCHW or channels_last, else the one PyTorch suggests for it (a strided view is copied)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.channels_last if x.dim() == 4 and x.stride(1) == 1 else torch.contiguous_format


def acc_dtype_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backend_kernels(backend: str):
    """``(forward, backward)`` of a kernel backend."""
    if backend == "triton":
        module = importlib.import_module("resnet_fast.triton.bn_act")
        return module.forward, module.backward
    if backend in ("cpu", "cuda"):
        ext = importlib.import_module("resnet_fast._C")
        return getattr(ext, f"bn_act_forward_{backend}"), getattr(ext, f"bn_act_backward_{backend}")
    raise ValueError(f"backend {backend!r} has no kernels behind resnet_fast::bn_act")


def _per_channel(t: Optional[Tensor], acc: torch.dtype) -> Optional[Tensor]:
    if t is None or (t.dtype == acc and t.is_contiguous()):
        return t
    return t.to(acc).contiguous()


def _prepare(x: Tensor, *tensors: Optional[Tensor]) -> tuple[Tensor, ...]:
    """``x`` and the activation-shaped ``tensors`` dense in ``x``'s layout."""
    fmt = memory_format_of(x)
    return tuple(None if t is None else t.contiguous(memory_format=fmt) for t in (x, *tensors))


def _affine_params(x, acc, weight, bias, residual_weight, residual_bias, residual_bn):
    """(w, b, rw, rb) as the backends take them: in ``acc``, contiguous, ``None`` weight/bias
    materialised as ones/zeros; the residual's pair is ``None`` unless ``residual_bn``."""
    C = x.shape[1]

    def param(t, fill):
        return _per_channel(t, acc) if t is not None else x.new_full((C,), fill, dtype=acc)

    if not residual_bn:
        return param(weight, 1.0), param(bias, 0.0), None, None
    return (param(weight, 1.0), param(bias, 0.0), param(residual_weight, 1.0),
            param(residual_bias, 0.0))


def _bn_act_forward(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    residual: Optional[Tensor],
    residual_weight: Optional[Tensor],
    residual_bias: Optional[Tensor],
    residual_running_mean: Optional[Tensor],
    residual_running_var: Optional[Tensor],
    residual_bn: bool,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype_of(input.dtype)
    x, r = _prepare(input, residual)
    w, b, rw, rb = _affine_params(x, acc, weight, bias, residual_weight, residual_bias,
                                  residual_bn)
    return _backend_kernels(backend)[0](
        x, w, b, _per_channel(running_mean, acc), _per_channel(running_var, acc),
        r, rw, rb, _per_channel(residual_running_mean, acc),
        _per_channel(residual_running_var, acc),
        residual_bn, training, momentum, eps, relu,
    )


bn_act = torch.library.custom_op("resnet_fast::bn_act", _bn_act_forward, mutates_args=())


@bn_act.register_fake
def _bn_act_fake(
    input, weight, bias, running_mean, running_var, residual, residual_weight, residual_bias,
    residual_running_mean, residual_running_var, residual_bn, training, momentum, eps, relu,
    backend,
):
    acc = acc_dtype_of(input.dtype)
    C = input.shape[1]
    B = 2 if residual_bn else 1
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device,
                      memory_format=memory_format_of(input))
    save_stats = input.new_empty((B, 2, C), dtype=acc)
    tracks = training and running_mean is not None
    new_running = input.new_empty((B, 2, C) if tracks else (0,), dtype=acc)
    return out, save_stats, new_running


def _bn_act_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    residual_weight: Optional[Tensor],
    residual_bias: Optional[Tensor],
    save_stats: Tensor,
    residual_bn: bool,
    training: bool,
    relu: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    acc = acc_dtype_of(input.dtype)
    x, g, r = _prepare(input, grad_out, residual)
    w, b, rw, rb = _affine_params(x, acc, weight, bias, residual_weight, residual_bias,
                                  residual_bn)
    return _backend_kernels(backend)[1](
        g, x, w, b, r, rw, rb, save_stats.contiguous(), residual_bn, training, relu
    )


bn_act_backward = torch.library.custom_op("resnet_fast::bn_act_backward", _bn_act_backward,
                                          mutates_args=())


@bn_act_backward.register_fake
def _bn_act_backward_fake(
    grad_out, input, weight, bias, residual, residual_weight, residual_bias, save_stats,
    residual_bn, training, relu, backend,
):
    acc = acc_dtype_of(input.dtype)
    C = input.shape[1]
    fmt = memory_format_of(input)

    def like_input():
        return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=fmt)

    def per_channel(present):
        return input.new_empty((C,) if present else (0,), dtype=acc)

    grad_residual = like_input() if residual is not None else per_channel(False)
    return (like_input(), per_channel(True), per_channel(True), grad_residual,
            per_channel(residual_bn), per_channel(residual_bn))


def _bn_act_setup_context(ctx, inputs, output):
    (input, weight, bias, _rm, _rv, residual, residual_weight, residual_bias, _rrm, _rrv,
     residual_bn, training, _momentum, _eps, relu, backend) = inputs
    _out, save_stats, new_running = output
    ctx.mark_non_differentiable(save_stats, new_running)
    ctx.save_for_backward(input, weight, bias, residual, residual_weight, residual_bias,
                          save_stats)
    ctx.flags = (residual_bn, training, relu, backend)


def _bn_act_input_grads(ctx, grad_out, backward):
    """The gradients of bn_act's 16 inputs, from ``backward`` (the op or its implementation)."""
    input, weight, bias, residual, residual_weight, residual_bias, save_stats = ctx.saved_tensors
    residual_bn, training, relu, backend = ctx.flags
    gx, gw, gb, gr, grw, grb = backward(
        grad_out, input, weight, bias, residual, residual_weight, residual_bias, save_stats,
        residual_bn, training, relu, backend,
    )

    def param_grad(grad, param):
        return None if param is None or not param.requires_grad else grad.to(param.dtype)

    grad_residual = None if residual is None else gr.to(residual.dtype)
    return (
        gx, param_grad(gw, weight), param_grad(gb, bias), None, None,
        grad_residual, param_grad(grw, residual_weight), param_grad(grb, residual_bias),
        None, None, None, None, None, None, None, None,
    )


bn_act.register_autograd(
    lambda ctx, grad_out, _grad_stats, _grad_running: _bn_act_input_grads(
        ctx, grad_out, bn_act_backward),
    setup_context=_bn_act_setup_context,
)


class _BnActFunction(torch.autograd.Function):
    """bn_act's autograd formula applied directly to its implementation (see fused_bn_act)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _bn_act_forward(*inputs)
        _bn_act_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, _grad_stats, _grad_running):
        return _bn_act_input_grads(ctx, grad_out, _bn_act_backward)


def fused_bn_act(*inputs):
    """``resnet_fast::bn_act`` with its autograd formula, arguments as the op's.

    Under ``torch.compile`` (or any dynamo trace) this is the registered op, which the compiler
    sees as one node with its fake kernel and backward op. In eager mode the same
    implementation and formula run through a plain ``autograd.Function``, which skips the
    dispatcher's per-call cost for Python custom ops (a few hundred microseconds per
    forward + backward, more than a small BatchNorm takes).
    """
    if torch.compiler.is_compiling():
        return bn_act(*inputs)
    return _BnActFunction.apply(*inputs)
