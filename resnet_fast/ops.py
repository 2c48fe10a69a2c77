"""resnet_fast's fused ops: their device kernels and fake kernels.

The four ops are defined, with the autograd formulas of the two differentiable ones, by the
compiled extension (``csrc/ops.cpp``), which also registers their CPU and CUDA kernels
(``csrc/op_kernels.cpp``): a call whose backend is the device's own (``"cpu"`` on CPU tensors,
``"cuda"`` on CUDA ones) runs in C++ from the dispatcher on. This module registers the fake
kernels and the Python kernels the C++ ones hand the rest to: the Triton backend (under its
interpreter on CPU tensors), the folded oneDNN eval call, and the fused conv launchers of the
``triton`` and ``cuda`` backends, composed once here. Every
backend runs under the same op, chosen by its ``backend`` argument, so
eager mode, ``torch.compile``, ``torch.library.opcheck`` and autograd see one op whatever the
device and backend:

``resnet_fast::bn_act`` (differentiable; updates the running statistics it is given)
    ``out = act(batch_norm(input) + r_term)`` with ``r_term`` = 0, ``residual``, or
    ``batch_norm(residual)`` when ``residual_bn``. Returns ``(out, save_stats)``:
    ``save_stats`` is ``(B, 2, C)`` (mean, invstd) per BatchNorm branch (``B`` = 2 with
    ``residual_bn``), the statistics backward needs. With ``batch_stats`` the running means and
    variances given are updated in place and the batch counters (``num_batches_tracked``)
    incremented, as ``nn.BatchNorm2d`` does; ``momentum`` is the exponential-average factor to
    update with.
``resnet_fast::bn_act_backward`` (functional)
    The gradients of ``bn_act``; its autograd formula calls it.

Arguments reaching a backend are normalised (here, see ``_prepare``; in C++ by the same rules
in ``csrc/tensor_args.h``): ``input``, ``residual``
and ``grad_out`` dense in one layout (NCHW or channels_last, the input's), weight and bias
materialised and, like all per-channel tensors, in the accumulation dtype (float64 for float64
input, float32 otherwise). The backends implement ``forward`` and ``backward`` with the same
arguments as the two ops minus ``backend``; their ``forward`` returns the updated running
statistics as a third output (``(B, 2, C)`` (mean, var), or empty when none are tracked), which
the registered kernel copies into the running buffers.

``resnet_fast::conv_bn_act`` (differentiable; updates the running statistics it is given)
    ``act(batch_norm(conv2d(a)) + residual)`` where ``a`` is the input, or, given ``in_stats``,
    the input normalised on load by a preceding BatchNorm (+ ReLU) whose batch statistics are
    already known (the hand-off of :class:`resnet_fast.functional.DeferredBatchNorm`). With
    ``defer`` the op stops before normalising and returns the conv output with its statistics.
    Returns ``(out, raw, save_stats)``: ``raw`` is the pre-BN conv output when backward needs it,
    ``out`` is not already that and ``recompute`` is off (else empty: with ``recompute`` the
    backward runs the conv once more instead of keeping its output), ``save_stats`` the
    ``(2, C)`` (mean, invstd) that normalised. With batch statistics the running statistics and
    the batch counter are updated as by ``bn_act``.
``resnet_fast::conv_bn_act_backward`` (functional)
    Its gradients, one C++ composite for every backend (``csrc/conv_bn_act_backward.cpp``):
    the BatchNorm/ReLU part through ``bn_act_backward`` (the backend's kernels), the conv part
    with ``aten.convolution_backward`` on the recomputed (never saved) normalised input, then
    the input BatchNorm's backward through ``bn_act_backward`` when the input was normalised on
    load.

Kernels behind ``conv_bn_act``: ``triton`` and ``cuda`` fuse the input normalisation into the
conv's load and the BatchNorm (+ residual + ReLU) or the statistics into its epilogue (one
launch in eval); ``cpu`` runs oneDNN's conv with the BatchNorm folded into its weight and bias
in eval (weights folded, and prepacked for a channels_last input, once per parameter version),
and in training PyTorch's conv and ``convolution_backward`` composed with the C++ ``bn_act``
kernels in its C++ CPU kernel (``csrc/cpu/conv_bn_act_cpu.cpp``), the input's deferred
BatchNorm applied by a one-pass kernel before the conv and recomputed in backward.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from resnet_fast import folded_weights
from resnet_fast._conventions import acc_dtype_of, conv_output_shape, memory_format_of
from resnet_fast._extension import load_extension

__all__ = [
    "bn_act",
    "bn_act_backward",
    "conv_bn_act",
    "conv_bn_act_backward",
    "conv_output_shape",
    "memory_format_of",
    "acc_dtype_of",
]

_C = load_extension()  # defines the ops (csrc/ops.cpp) and registers their CPU and CUDA kernels


def _backend_kernels(backend: str):
    """``(forward, backward)`` of the bn_act kernels run from Python: the ``triton`` backend's
    (the ``cpu`` and ``cuda`` ones run in C++, ``csrc/op_kernels.cpp``)."""
    if backend == "triton":
        module = importlib.import_module("resnet_fast.triton.bn_act")
        return module.forward, module.backward
    raise ValueError(f"backend {backend!r} has no kernels behind resnet_fast::bn_act for "
                     "these tensors")


def _per_channel(t: Optional[Tensor], acc: torch.dtype) -> Optional[Tensor]:
    if t is None or (t.dtype == acc and t.is_contiguous()):
        return t
    return t.to(acc).contiguous()


def _prepare(x: Tensor, *tensors: Optional[Tensor]) -> tuple[Tensor, ...]:
    """``x`` and the activation-shaped ``tensors`` dense in ``x``'s layout."""
    fmt = memory_format_of(x)
    return tuple(None if t is None else t.contiguous(memory_format=fmt) for t in (x, *tensors))


def _affine_params(like, C, acc, weight, bias, residual_weight, residual_bias, residual_bn):
    """(w, b, rw, rb) of ``C`` channels as the backends take them: in ``acc``, contiguous,
    ``None`` weight/bias materialised as ones/zeros (on ``like``'s device); the residual's pair
    is ``None`` unless ``residual_bn``."""

    def param(t, fill):
        return _per_channel(t, acc) if t is not None else like.new_full((C,), fill, dtype=acc)

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
    batch_stats: bool,
    momentum: float,
    eps: float,
    relu: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype_of(input.dtype)
    x, r = _prepare(input, residual)
    w, b, rw, rb = _affine_params(x, x.shape[1], acc, weight, bias, residual_weight,
                                  residual_bias, residual_bn)
    return _backend_kernels(backend)[0](
        x, w, b, _per_channel(running_mean, acc), _per_channel(running_var, acc),
        r, rw, rb, _per_channel(residual_running_mean, acc),
        _per_channel(residual_running_var, acc),
        residual_bn, batch_stats, momentum, eps, relu,
    )


@torch.library.register_fake("resnet_fast::bn_act")
def _bn_act_fake(
    input, weight, bias, running_mean, running_var, num_batches_tracked, residual,
    residual_weight, residual_bias, residual_running_mean, residual_running_var,
    residual_num_batches_tracked, residual_bn, batch_stats, momentum, eps, relu, backend,
):
    acc = acc_dtype_of(input.dtype)
    C = input.shape[1]
    B = 2 if residual_bn else 1
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device,
                      memory_format=memory_format_of(input))
    return out, input.new_empty((B, 2, C), dtype=acc)


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
    batch_stats: bool,
    relu: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    acc = acc_dtype_of(input.dtype)
    x, g, r = _prepare(input, grad_out, residual)
    w, b, rw, rb = _affine_params(x, x.shape[1], acc, weight, bias, residual_weight,
                                  residual_bias, residual_bn)
    return _backend_kernels(backend)[1](
        g, x, w, b, r, rw, rb, save_stats.contiguous(), residual_bn, batch_stats, relu
    )


@torch.library.register_fake("resnet_fast::bn_act_backward")
def _bn_act_backward_fake(
    grad_out, input, weight, bias, residual, residual_weight, residual_bias, save_stats,
    residual_bn, batch_stats, relu, backend,
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


# --------------------------------------------------------------------------- conv + BN + act


def _conv_launcher(backend: str) -> Optional[Callable]:
    """The backend's fused conv launcher (``conv2d_bn_act`` contract: input normalisation on
    load, BatchNorm/residual/ReLU or statistics in the epilogue), or ``None`` for ``cpu``, whose
    calls reaching Python are the folded oneDNN eval call (its C++ kernel composes the rest)."""
    if backend == "triton":
        return importlib.import_module("resnet_fast.triton.conv_bn_act").conv2d_bn_act
    if backend == "cuda":
        return _C.conv2d_bn_act_cuda
    if backend == "cpu":
        return None
    raise ValueError(f"backend {backend!r} has no kernels behind resnet_fast::conv_bn_act")


def _scale_shift(stats: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    """Per-channel ``(scale, shift)`` with ``batch_norm(x) = x * scale + shift`` for the
    ``(2, C)`` (mean, invstd) ``stats``."""
    mean, invstd = stats.unbind(0)
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mean * scale if bias is None else bias.to(scale.dtype) - mean * scale
    return scale, shift


def _running_update(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                    count: int, momentum: float) -> Tensor:
    """``(2, C)`` updated (running_mean, running_var) as ``nn.BatchNorm2d`` updates them, from
    the batch's mean and biased variance over ``count`` values per channel."""
    unbiased = var * (count / (count - 1))
    return torch.stack([(1 - momentum) * running_mean + momentum * mean,
                        (1 - momentum) * running_var + momentum * unbiased])


def _eval_stats(running_mean: Tensor, running_var: Tensor, eps: float) -> Tensor:
    return torch.stack([running_mean, torch.rsqrt(running_var + eps)])


def _onednn_prepacks(x: Tensor, residual: Optional[Tensor]) -> bool:
    """Whether the folded oneDNN call of input ``x`` takes its weight prepacked in oneDNN's
    blocked layout: for a channels_last input. With an NCHW one a prepacked weight makes the
    call run channels_last (the input converted on the way in, the output on the way out), so
    the weight stays dense (oneDNN reorders it in each call, as eager's NCHW conv does: a
    weight, not an activation), except for a bfloat16 residual add, which PyTorch's
    dense-weight path does not take."""
    return (memory_format_of(x) == torch.channels_last
            or (residual is not None and x.dtype == torch.bfloat16))


def _onednn_folded_weights(weight, conv_bias, batch_norm, input_shape, prepack, stride,
                           padding, dilation, groups, cache_key):
    """``(weight, bias, save_stats)``: the conv weight and bias with the BatchNorm folded in;
    ``batch_norm()`` gives the ``(save_stats, scale, shift)`` to fold; with ``prepack`` the
    weight in oneDNN's blocked layout for ``input_shape`` (:func:`_onednn_prepacks`). Kept in
    :mod:`resnet_fast.folded_weights` per ``weight`` under ``cache_key`` (the storage and
    version of every parameter and statistic that went in, the input's shape, ``prepack``), so
    a module folds and packs once per parameter update, not per call."""

    def fold():
        save_stats, scale, shift = batch_norm()
        folded_bias = shift if conv_bias is None else shift + conv_bias.to(scale.dtype) * scale
        folded = (weight.to(scale.dtype) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
        if prepack:
            folded = torch._C._nn.mkldnn_reorder_conv2d_weight(
                folded.to_mkldnn(), list(padding), list(stride), list(dilation), groups,
                list(input_shape))
        return folded, folded_bias.to(weight.dtype), save_stats

    return folded_weights.cached(weight, cache_key, fold)


def _prologue(in_weight: Optional[Tensor], in_bias: Optional[Tensor], in_stats: Optional[Tensor],
              in_relu: bool) -> dict:
    """The launchers' keyword arguments that normalise the conv's input on load (none when the
    input is not a deferred BatchNorm)."""
    if in_stats is None:
        return {}
    in_scale, in_shift = _scale_shift(in_stats, in_weight, in_bias)
    return dict(in_scale=in_scale.contiguous(), in_shift=in_shift.contiguous(), in_relu=in_relu)


def _cpu_composite(backend: str, input: Tensor, batch_stats: bool, save_raw: bool) -> bool:
    """Whether the ``cpu`` backend runs a conv layer as PyTorch's conv composed with the bn_act
    kernels, in its C++ CPU kernel: in training, and in eval when backward needs the conv output
    or oneDNN's fused call does not take the dtype on this CPU (bfloat16 needs oneDNN's bfloat16
    support; otherwise eval is one folded oneDNN call, from Python)."""
    return backend == "cpu" and _C.runs_composite(input, batch_stats, save_raw)


def _conv_bn_act_forward(
    input: Tensor,
    weight: Tensor,
    conv_bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    in_weight: Optional[Tensor],
    in_bias: Optional[Tensor],
    in_stats: Optional[Tensor],
    in_relu: bool,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    residual: Optional[Tensor],
    batch_stats: bool,
    momentum: float,
    eps: float,
    relu: bool,
    defer: bool,
    save_raw: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if defer and not batch_stats:
        raise ValueError("defer=True needs batch statistics (training, or no running statistics)")
    acc = acc_dtype_of(input.dtype)
    launch = _conv_launcher(backend)
    x, r = _prepare(input, residual)
    fmt = memory_format_of(x)
    out_shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    count = out_shape[0] * out_shape[2] * out_shape[3]

    def empty():  # an absent output: a fresh one each time, as outputs may not alias
        return x.new_empty((0,), dtype=acc)

    w, b, _, _ = _affine_params(x, out_shape[1], acc, bn_weight, bn_bias, None, None, False)
    rm, rv = _per_channel(running_mean, acc), _per_channel(running_var, acc)
    conv_args = (stride, padding, dilation, groups)

    def eval_batch_norm():
        save_stats = _eval_stats(rm, rv, eps)
        return (save_stats, *_scale_shift(save_stats, w, b))

    if not batch_stats and not save_raw and launch is not None:  # one launch
        save_stats, scale, shift = eval_batch_norm()
        shift = shift if conv_bias is None else shift + conv_bias.to(acc) * scale
        out, _ = launch(x, weight, None, *conv_args, out_scale=scale.contiguous(),
                        out_shift=shift.contiguous(), residual=r, relu=relu)
        return out.contiguous(memory_format=fmt), empty(), save_stats, empty()
    if launch is None:  # cpu, not the composite: one oneDNN call
        key = folded_weights.version_key(weight, conv_bias, bn_weight, bn_bias, running_mean,
                                         running_var)
        prepack = _onednn_prepacks(x, r)
        folded_w, folded_bias, save_stats = _onednn_folded_weights(
            weight, conv_bias, eval_batch_norm, x.shape, prepack, *conv_args,
            cache_key=None if key is None else (key, eps, tuple(x.shape), prepack,
                                                *map(tuple, (stride, padding, dilation)),
                                                groups))
        unary = "relu" if relu else None
        if r is None:
            out = torch.ops.mkldnn._convolution_pointwise(
                x, folded_w, folded_bias, padding, stride, dilation, groups, unary or "none",
                [None] if relu else [], "" if relu else None)
        else:
            out = torch.ops.mkldnn._convolution_pointwise.binary(
                x, r, folded_w, folded_bias, padding, stride, dilation, groups, "add", None,
                unary, [None] if relu else [], "" if relu else None)
        return out.contiguous(memory_format=fmt), empty(), save_stats, empty()

    prologue = _prologue(in_weight, in_bias, in_stats, in_relu)

    def conv(**epilogue):
        y, stats = launch(x, weight, conv_bias, *conv_args, **prologue, **epilogue)
        return y.contiguous(memory_format=fmt), stats

    def apply(raw, mean, var):
        """bn_act over the conv output, normalised with (mean, var): the op, so that the
        backend's kernels run wherever they are registered."""
        return bn_act(input=raw, weight=w, bias=b, running_mean=mean, running_var=var,
                      num_batches_tracked=None, residual=r, residual_weight=None,
                      residual_bias=None, residual_running_mean=None, residual_running_var=None,
                      residual_num_batches_tracked=None, residual_bn=False, batch_stats=False,
                      momentum=0.0, eps=eps, relu=relu, backend=backend)[0]

    if not batch_stats:
        raw, _ = conv()
        return apply(raw, rm, rv), raw, _eval_stats(rm, rv, eps), empty()
    raw, mean_var = conv(stats=True)
    mean, var = mean_var.unbind(0)
    save_stats = torch.stack([mean, torch.rsqrt(var + eps)])
    new_running = (empty() if rm is None
                   else _running_update(rm, rv, mean, var, count, momentum))
    if defer:
        return raw, empty(), save_stats, new_running
    return apply(raw, mean, var), raw, save_stats, new_running


@torch.library.register_fake("resnet_fast::conv_bn_act")
def _conv_bn_act_fake(
    input, weight, conv_bias, stride, padding, dilation, groups, in_weight, in_bias, in_stats,
    in_relu, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, residual,
    batch_stats, momentum, eps, relu, defer, save_raw, recompute, backend,
):
    acc = acc_dtype_of(input.dtype)
    shape = conv_output_shape(input.shape, weight.shape, stride, padding, dilation)
    fmt = memory_format_of(input)

    def activation(present):
        if not present:
            return input.new_empty((0,), dtype=acc)
        return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)

    keeps_raw = not defer and not recompute and (
        batch_stats or save_raw or _cpu_composite(backend, input, batch_stats, save_raw))
    return activation(True), activation(keeps_raw), input.new_empty((2, shape[1]), dtype=acc)


@torch.library.register_fake("resnet_fast::conv_bn_act_backward")
def _conv_bn_act_backward_fake(
    grad_out, input, weight, conv_bias, stride, padding, dilation, groups, in_weight,
    in_bias, in_stats, in_relu, bn_weight, bn_bias, residual, raw, save_stats, batch_stats,
    relu, defer, input_grad, backend,
):
    acc = acc_dtype_of(input.dtype)

    def per_channel(present, C):
        return input.new_empty((C,) if present else (0,), dtype=acc)

    Cin, Cout = input.shape[1], weight.shape[0]
    grad_input = (torch.empty(input.shape, dtype=input.dtype, device=input.device,
                              memory_format=memory_format_of(input))
                  if input_grad else per_channel(False, 0))
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device,
                              memory_format=memory_format_of(weight))
    grad_residual = (torch.empty_like(grad_out, memory_format=memory_format_of(grad_out))
                     if residual is not None and not defer else per_channel(False, 0))
    return (grad_input, grad_weight, per_channel(conv_bias is not None, Cout),
            per_channel(input_grad and in_stats is not None, Cin),
            per_channel(input_grad and in_stats is not None, Cin),
            per_channel(not defer, Cout), per_channel(not defer, Cout), grad_residual)


# ------------------------------------------------------------------------- the registered ops


def _update_running(tracks: bool, new_running: Tensor, running: Sequence[Optional[Tensor]],
                    counters: Sequence[Optional[Tensor]]) -> None:
    """What a forward op updates when ``tracks`` (batch statistics, running statistics given):
    the running ``(mean, var)`` of each branch (``running``, in ``new_running``'s ``(B, 2, C)``
    or ``(2, C)`` order) and the branches' batch counters, as ``nn.BatchNorm2d`` does."""
    if not tracks:
        return
    rows = new_running.reshape(-1, new_running.shape[-1]).unbind(0)
    torch._foreach_copy_([t for t in running if t is not None], list(rows))
    for counter in counters:
        if counter is not None:
            counter.add_(1)


def _bn_act_kernel(input, weight, bias, running_mean, running_var, num_batches_tracked, residual,
                   residual_weight, residual_bias, residual_running_mean, residual_running_var,
                   residual_num_batches_tracked, residual_bn, batch_stats, momentum, eps, relu,
                   backend):
    out, save_stats, new_running = _bn_act_forward(
        input, weight, bias, running_mean, running_var, residual, residual_weight,
        residual_bias, residual_running_mean, residual_running_var, residual_bn, batch_stats,
        momentum, eps, relu, backend)
    _update_running(batch_stats and running_mean is not None, new_running,
                    (running_mean, running_var, residual_running_mean, residual_running_var),
                    (num_batches_tracked, residual_num_batches_tracked))
    return out, save_stats


def _conv_bn_act_kernel(input, weight, conv_bias, stride, padding, dilation, groups, in_weight,
                        in_bias, in_stats, in_relu, bn_weight, bn_bias, running_mean,
                        running_var, num_batches_tracked, residual, batch_stats,
                        momentum, eps, relu, defer, save_raw, recompute, backend):
    out, raw, save_stats, new_running = _conv_bn_act_forward(
        input, weight, conv_bias, stride, padding, dilation, groups, in_weight, in_bias,
        in_stats, in_relu, bn_weight, bn_bias, running_mean, running_var,
        residual, batch_stats, momentum, eps, relu, defer, save_raw, backend)
    _update_running(batch_stats and running_mean is not None, new_running,
                    (running_mean, running_var), (num_batches_tracked,))
    if recompute and raw.numel():  # backward recomputes it: not kept
        raw = raw.new_empty((0,), dtype=acc_dtype_of(raw.dtype))
    return out, raw, save_stats


# The CPU and CUDA kernels are C++ (csrc/op_kernels.cpp), as is conv_bn_act_backward
# (csrc/conv_bn_act_backward.cpp); these run the calls they leave to Python (the triton backend,
# the folded oneDNN eval call, the fused conv launchers).
for _name, _kernel in (("bn_act", _bn_act_kernel), ("bn_act_backward", _bn_act_backward),
                       ("conv_bn_act", _conv_bn_act_kernel)):
    _C.set_python_kernel(_name, _kernel)

bn_act = torch.ops.resnet_fast.bn_act.default
bn_act_backward = torch.ops.resnet_fast.bn_act_backward.default
conv_bn_act = torch.ops.resnet_fast.conv_bn_act.default
conv_bn_act_backward = torch.ops.resnet_fast.conv_bn_act_backward.default
