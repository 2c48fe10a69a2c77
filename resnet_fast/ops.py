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

``resnet_fast::conv_bn_act`` (functional; differentiable)
    ``act(batch_norm(conv2d(a)) + residual)`` where ``a`` is the input, or, given ``in_stats``,
    the input normalised on load by a preceding BatchNorm (+ ReLU) whose batch statistics are
    already known (the hand-off of :class:`resnet_fast.functional.DeferredBatchNorm`). With
    ``defer`` the op stops before normalising and returns the conv output with its statistics.
    Returns ``(out, raw, save_stats, new_running)``: ``raw`` is the pre-BN conv output when
    backward needs it and ``out`` is not already that (else empty), ``save_stats`` the ``(2, C)``
    (mean, invstd) that normalised, ``new_running`` as for ``bn_act`` but ``(2, C)``.
``resnet_fast::conv_bn_act_backward`` (functional)
    Its gradients: the BatchNorm/ReLU part with ``bn_act``'s backward kernels, the conv part
    with ``aten.convolution_backward`` on the recomputed (never saved) normalised input, then
    the input BatchNorm's backward when the input was normalised on load.

Kernels behind ``conv_bn_act``: ``triton`` and ``cuda`` fuse the input normalisation into the
conv's load and the BatchNorm (+ residual + ReLU) or the statistics into its epilogue (one
launch in eval); ``cpu`` runs oneDNN's conv with the BatchNorm folded into its weight and bias
in eval (weights folded and prepacked once per parameter version), and in training PyTorch's
conv and ``convolution_backward`` composed with the C++ ``bn_act`` kernels in one C++ call per
direction (``_C.conv_bn_act_forward_cpu`` / ``_C.conv_bn_act_backward_cpu``), the input's
deferred BatchNorm applied by a one-pass kernel before the conv and recomputed in backward.
"""

from __future__ import annotations

import importlib
import weakref
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "bn_act",
    "bn_act_backward",
    "fused_bn_act",
    "conv_bn_act",
    "conv_bn_act_backward",
    "fused_conv_bn_act",
    "conv_output_shape",
    "memory_format_of",
    "acc_dtype_of",
]


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


def _extension():
    """The compiled module ``resnet_fast._C`` (imported when first needed: the package works
    without it, and the backends that need it say so)."""
    return importlib.import_module("resnet_fast._C")


def _backend_kernels(backend: str):
    """``(forward, backward)`` of a kernel backend."""
    if backend == "triton":
        module = importlib.import_module("resnet_fast.triton.bn_act")
        return module.forward, module.backward
    if backend in ("cpu", "cuda"):
        ext = _extension()
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
    training: bool,
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
    w, b, rw, rb = _affine_params(x, x.shape[1], acc, weight, bias, residual_weight,
                                  residual_bias, residual_bn)
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
    # The auxiliary outputs (statistics) take no gradient: none is formed for them.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, weight, bias, residual, residual_weight, residual_bias,
                          save_stats)
    ctx.flags = (residual_bn, training, relu, backend)


def _bn_act_input_grads(ctx, grad_out, backward):
    """The gradients of bn_act's 16 inputs, from ``backward`` (the op or its implementation)."""
    if grad_out is None:  # the output itself did not reach the loss
        return (None,) * 16
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


def _eager_function(name: str, forward: Callable, setup_context: Callable,
                    input_grads: Callable) -> type:
    """An ``autograd.Function`` running an op's implementation and autograd formula directly.

    ``fused_*`` use it in eager mode: it skips the dispatcher's per-call cost for Python custom
    ops (a few hundred microseconds per forward + backward, more than a small BatchNorm takes),
    while ``torch.compile`` sees the registered op with its fake kernel and backward op.
    """

    def forward_(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def backward_(ctx, grad_out, *_grad_aux):
        return input_grads(ctx, grad_out)

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward_), "backward": staticmethod(backward_)})


_BnActFunction = _eager_function(
    "_BnActFunction", _bn_act_forward, _bn_act_setup_context,
    lambda ctx, grad_out: _bn_act_input_grads(ctx, grad_out, _bn_act_backward))


def _needs_grad(inputs) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in inputs)


def fused_bn_act(*inputs):
    """``resnet_fast::bn_act`` with its autograd formula, arguments as the op's: the registered
    op under ``torch.compile`` (or any dynamo trace); in eager mode the ``cpu`` backend's C++
    autograd function, else the op's implementation, through a plain ``autograd.Function`` when
    a gradient is needed."""
    if torch.compiler.is_compiling():
        return bn_act(*inputs)
    if inputs[-1] == "cpu":
        return tuple(_extension().bn_act_cpu(*inputs[:-1]))
    if not _needs_grad(inputs):
        return _bn_act_forward(*inputs)
    return _BnActFunction.apply(*inputs)


# --------------------------------------------------------------------------- conv + BN + act


def conv_output_shape(input_shape: Sequence[int], weight_shape: Sequence[int],
                      stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """``(N, Cout, Ho, Wo)`` of ``conv2d``; ``Ho`` or ``Wo`` below 1 means the input is too
    small for the kernel."""
    N, _, H, W = input_shape
    Cout, _, kh, kw = weight_shape
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return N, Cout, Ho, Wo


def _conv_launcher(backend: str) -> Optional[Callable]:
    """The backend's fused conv launcher (``conv2d_bn_act`` contract: input normalisation on
    load, BatchNorm/residual/ReLU or statistics in the epilogue), or ``None`` for ``cpu``,
    which composes PyTorch's conv with the ``bn_act`` kernels."""
    if backend == "triton":
        return importlib.import_module("resnet_fast.triton.conv_bn_act").conv2d_bn_act
    if backend == "cuda":
        return _extension().conv2d_bn_act_cuda
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


def _normalize(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], stats: Tensor,
               relu: bool) -> Tensor:
    """``act(batch_norm(x))`` with known statistics, computed in their dtype and returned in
    ``x``'s dtype and layout: the input of a conv that normalises on load, recomputed for its
    backward (and formed in full where no kernel fuses the load)."""
    scale, shift = _scale_shift(stats, weight, bias)
    y = torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))
    if relu:
        y = y.relu_()
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def _running_update(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                    count: int, momentum: float) -> Tensor:
    """``(2, C)`` updated (running_mean, running_var) as ``nn.BatchNorm2d`` updates them, from
    the batch's mean and biased variance over ``count`` values per channel."""
    unbiased = var * (count / (count - 1))
    return torch.stack([(1 - momentum) * running_mean + momentum * mean,
                        (1 - momentum) * running_var + momentum * unbiased])


def _eval_stats(running_mean: Tensor, running_var: Tensor, eps: float) -> Tensor:
    return torch.stack([running_mean, torch.rsqrt(running_var + eps)])


# oneDNN fuses conv + bias + (add) + ReLU on the CPU for these activation dtypes.
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# id(conv weight) -> (weak reference to it, cache key, (prepacked folded weight, folded bias));
# an entry goes when its weight is freed. (Tensors cannot be weak dictionary keys: their == is
# elementwise.)
_ONEDNN_CACHE: dict[int, tuple] = {}


def _onednn_folded_weights(weight, conv_bias, batch_norm, input_shape, stride, padding,
                           dilation, groups, cache_key):
    """``(prepacked weight, bias, save_stats)``: the conv weight and bias with the BatchNorm
    folded in, the weight in oneDNN's blocked layout for ``input_shape``; ``batch_norm()`` gives
    the ``(save_stats, scale, shift)`` to fold. Cached per ``weight`` under ``cache_key`` (the
    storage and version of every parameter and statistic that went in), so a module folds and
    packs once per parameter update, not per call."""
    cached = _ONEDNN_CACHE.get(id(weight)) if cache_key is not None else None
    if cached is not None and cached[0]() is weight and cached[1] == cache_key:
        return cached[2]
    save_stats, scale, shift = batch_norm()
    folded_bias = shift if conv_bias is None else shift + conv_bias.to(scale.dtype) * scale
    folded = (weight.to(scale.dtype) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
        folded.to_mkldnn(), list(padding), list(stride), list(dilation), groups,
        list(input_shape))
    result = (packed, folded_bias.to(weight.dtype), save_stats)
    if cache_key is not None:
        if cached is None or cached[0]() is not weight:
            weakref.finalize(weight, _ONEDNN_CACHE.pop, id(weight), None)
        _ONEDNN_CACHE[id(weight)] = (weakref.ref(weight), cache_key, result)
    return result


def _cpu_composite(backend: str, dtype: torch.dtype, batch_stats: bool, save_raw: bool) -> bool:
    """Whether the ``cpu`` backend runs a conv layer as PyTorch's conv composed with the bn_act
    kernels in C++: in training, and in eval when backward needs the conv output or oneDNN's
    fused call does not take the dtype (otherwise eval is one folded oneDNN call)."""
    return backend == "cpu" and (batch_stats or save_raw or dtype not in _ONEDNN_DTYPES)


def _version_key(*tensors: Optional[Tensor]):
    """What identifies the values of ``tensors`` (storage and in-place version), or ``None``
    where that cannot be told (inference tensors, tracing)."""
    if torch.compiler.is_compiling():
        return None
    try:
        return tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)
    except RuntimeError:  # inference tensors carry no version counter
        return None


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
    in_batch_stats: bool,
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
    if _cpu_composite(backend, input.dtype, batch_stats, save_raw):
        return _extension().conv_bn_act_forward_cpu(
            input, weight, conv_bias, stride, padding, dilation, groups, in_weight, in_bias,
            in_stats, in_relu, bn_weight, bn_bias, running_mean, running_var, residual,
            batch_stats, momentum, eps, relu, defer)
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
        key = _version_key(weight, conv_bias, bn_weight, bn_bias, running_mean, running_var)
        packed, folded_bias, save_stats = _onednn_folded_weights(
            weight, conv_bias, eval_batch_norm, x.shape, *conv_args,
            cache_key=None if key is None else (key, eps, tuple(x.shape), *map(tuple, (
                stride, padding, dilation)), groups))
        unary = "relu" if relu else None
        if r is None:
            out = torch.ops.mkldnn._convolution_pointwise(
                x, packed, folded_bias, padding, stride, dilation, groups, unary or "none",
                [None] if relu else [], "" if relu else None)
        else:
            out = torch.ops.mkldnn._convolution_pointwise.binary(
                x, r, packed, folded_bias, padding, stride, dilation, groups, "add", None,
                unary, [None] if relu else [], "" if relu else None)
        return out.contiguous(memory_format=fmt), empty(), save_stats, empty()

    prologue = {}
    if in_stats is not None:
        in_scale, in_shift = _scale_shift(in_stats, in_weight, in_bias)
        prologue = dict(in_scale=in_scale.contiguous(), in_shift=in_shift.contiguous(),
                        in_relu=in_relu)

    def conv(**epilogue):
        y, stats = launch(x, weight, conv_bias, *conv_args, **prologue, **epilogue)
        return y.contiguous(memory_format=fmt), stats

    def apply(raw, mean, var):
        """bn_act over the conv output, normalised with (mean, var)."""
        return _backend_kernels(backend)[0](raw, w, b, mean, var, r, None, None, None, None,
                                            False, False, 0.0, eps, relu)[0]

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


conv_bn_act = torch.library.custom_op("resnet_fast::conv_bn_act", _conv_bn_act_forward,
                                      mutates_args=())


@conv_bn_act.register_fake
def _conv_bn_act_fake(
    input, weight, conv_bias, stride, padding, dilation, groups, in_weight, in_bias, in_stats,
    in_batch_stats, in_relu, bn_weight, bn_bias, running_mean, running_var, residual,
    batch_stats, momentum, eps, relu, defer, save_raw, backend,
):
    acc = acc_dtype_of(input.dtype)
    shape = conv_output_shape(input.shape, weight.shape, stride, padding, dilation)
    fmt = memory_format_of(input)

    def activation(present):
        if not present:
            return input.new_empty((0,), dtype=acc)
        return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)

    keeps_raw = not defer and (batch_stats or save_raw
                               or _cpu_composite(backend, input.dtype, batch_stats, save_raw))
    tracks = batch_stats and running_mean is not None
    return (activation(True), activation(keeps_raw), input.new_empty((2, shape[1]), dtype=acc),
            input.new_empty((2, shape[1]) if tracks else (0,), dtype=acc))


def _conv_bn_act_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor,
    has_conv_bias: bool,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    in_weight: Optional[Tensor],
    in_bias: Optional[Tensor],
    in_stats: Optional[Tensor],
    in_batch_stats: bool,
    in_relu: bool,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    residual: Optional[Tensor],
    raw: Tensor,
    save_stats: Tensor,
    batch_stats: bool,
    relu: bool,
    defer: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if backend == "cpu":  # composed in C++
        return _extension().conv_bn_act_backward_cpu(
            grad_out, input, weight, has_conv_bias, stride, padding, dilation, groups, in_weight,
            in_bias, in_stats, in_batch_stats, in_relu, bn_weight, bn_bias, residual, raw,
            save_stats, batch_stats, relu, defer)
    acc = acc_dtype_of(input.dtype)
    in_fmt, weight_fmt = memory_format_of(input), memory_format_of(weight)

    def empty():  # an absent gradient: a fresh one each time, as outputs may not alias
        return input.new_empty((0,), dtype=acc)

    if defer:
        grad_raw, grad_bn_weight, grad_bn_bias, grad_residual = grad_out, empty(), empty(), empty()
    else:
        grad_raw, grad_bn_weight, grad_bn_bias, grad_residual, _, _ = _bn_act_backward(
            grad_out, raw, bn_weight, bn_bias, residual, None, None, save_stats.unsqueeze(0),
            False, batch_stats, relu, backend)
    x, grad_raw = _prepare(input, grad_raw)
    a = x if in_stats is None else _normalize(x, in_weight, in_bias, in_stats, in_relu)
    grad_a, grad_weight, grad_conv_bias = torch.ops.aten.convolution_backward(
        grad_raw, a, weight, [weight.shape[0]] if has_conv_bias else None, stride, padding,
        dilation, False, [0, 0], groups, [True, True, has_conv_bias])
    if in_stats is None:
        grad_input, grad_in_weight, grad_in_bias = grad_a, empty(), empty()
    else:
        grad_input, grad_in_weight, grad_in_bias, _, _, _ = _bn_act_backward(
            grad_a, x, in_weight, in_bias, None, None, None, in_stats.unsqueeze(0), False,
            in_batch_stats, in_relu, backend)
    return (grad_input.contiguous(memory_format=in_fmt),
            grad_weight.contiguous(memory_format=weight_fmt),
            empty() if grad_conv_bias is None else grad_conv_bias,
            grad_in_weight, grad_in_bias, grad_bn_weight, grad_bn_bias, grad_residual)


conv_bn_act_backward = torch.library.custom_op(
    "resnet_fast::conv_bn_act_backward", _conv_bn_act_backward, mutates_args=())


@conv_bn_act_backward.register_fake
def _conv_bn_act_backward_fake(
    grad_out, input, weight, has_conv_bias, stride, padding, dilation, groups, in_weight,
    in_bias, in_stats, in_batch_stats, in_relu, bn_weight, bn_bias, residual, raw, save_stats,
    batch_stats, relu, defer, backend,
):
    acc = acc_dtype_of(input.dtype)

    def per_channel(present, C):
        return input.new_empty((C,) if present else (0,), dtype=acc)

    Cin, Cout = input.shape[1], weight.shape[0]
    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device,
                             memory_format=memory_format_of(input))
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device,
                              memory_format=memory_format_of(weight))
    grad_residual = (torch.empty_like(grad_out, memory_format=memory_format_of(grad_out))
                     if residual is not None and not defer else per_channel(False, 0))
    return (grad_input, grad_weight, per_channel(has_conv_bias, Cout),
            per_channel(in_stats is not None, Cin), per_channel(in_stats is not None, Cin),
            per_channel(not defer, Cout), per_channel(not defer, Cout), grad_residual)


def _conv_bn_act_setup_context(ctx, inputs, output):
    (input, weight, conv_bias, stride, padding, dilation, groups, in_weight, in_bias, in_stats,
     in_batch_stats, in_relu, bn_weight, bn_bias, _rm, _rv, residual, batch_stats, _momentum,
     _eps, relu, defer, _save_raw, backend) = inputs
    _out, raw, save_stats, new_running = output
    ctx.mark_non_differentiable(raw, save_stats, new_running)
    ctx.set_materialize_grads(False)  # as for bn_act
    ctx.save_for_backward(input, weight, in_weight, in_bias, in_stats, bn_weight, bn_bias,
                          residual, raw, save_stats)
    ctx.args = (conv_bias is not None, stride, padding, dilation, groups, in_batch_stats,
                in_relu, batch_stats, relu, defer, backend)


def _conv_bn_act_input_grads(ctx, grad_out, backward):
    """The gradients of conv_bn_act's 24 inputs, from ``backward`` (the op or its
    implementation)."""
    if grad_out is None:  # the output itself did not reach the loss
        return (None,) * 24
    (input, weight, in_weight, in_bias, in_stats, bn_weight, bn_bias, residual, raw,
     save_stats) = ctx.saved_tensors
    (has_conv_bias, stride, padding, dilation, groups, in_batch_stats, in_relu, batch_stats,
     relu, defer, backend) = ctx.args
    gi, gw, gcb, giw, gib, gbw, gbb, gr = backward(
        grad_out, input, weight, has_conv_bias, stride, padding, dilation, groups, in_weight,
        in_bias, in_stats, in_batch_stats, in_relu, bn_weight, bn_bias, residual, raw,
        save_stats, batch_stats, relu, defer, backend)

    def grad_of(grad, t):
        return None if t is None or not t.requires_grad else grad.to(t.dtype)

    if defer:  # the BatchNorm's parameters get their gradients from the conv normalising on load
        bn_weight = bn_bias = None
    return (grad_of(gi, input), grad_of(gw, weight), gcb if has_conv_bias else None,
            None, None, None, None, grad_of(giw, in_weight), grad_of(gib, in_bias), None, None,
            None, grad_of(gbw, bn_weight), grad_of(gbb, bn_bias), None, None,
            grad_of(gr, residual), None, None, None, None, None, None, None)


conv_bn_act.register_autograd(
    lambda ctx, grad_out, _grad_raw, _grad_stats, _grad_running: _conv_bn_act_input_grads(
        ctx, grad_out, conv_bn_act_backward),
    setup_context=_conv_bn_act_setup_context,
)

_ConvBnActFunction = _eager_function(
    "_ConvBnActFunction", _conv_bn_act_forward, _conv_bn_act_setup_context,
    lambda ctx, grad_out: _conv_bn_act_input_grads(ctx, grad_out, _conv_bn_act_backward))


def fused_conv_bn_act(*inputs):
    """``resnet_fast::conv_bn_act`` with its autograd formula, arguments as the op's (see
    :func:`fused_bn_act`; the folded oneDNN eval call of the ``cpu`` backend runs in Python)."""
    if torch.compiler.is_compiling():
        return conv_bn_act(*inputs)
    if _cpu_composite(inputs[23], inputs[0].dtype, inputs[17], inputs[22]):
        return tuple(_extension().conv_bn_act_cpu(*inputs[:22]))
    if not _needs_grad(inputs):
        return _conv_bn_act_forward(*inputs)
    return _ConvBnActFunction.apply(*inputs)
