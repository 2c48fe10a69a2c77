"""Triton implicit-GEMM conv2d with a fused input prologue and a fused output epilogue.

Math. Input x is (N, Cin, H, W), weight w is (Cout, Cin/groups, KH, KW), the output y is
(N, Cout, Ho, Wo) with Ho = (H + 2*pad_h - dil_h*(KH - 1) - 1) // stride_h + 1 (Wo alike).
For an output channel co of group g = co // Cout_g and a position (n, ho, wo):

    a[n, c, h, w]   = act_in(x[n, c, h, w] * in_scale[c] + in_shift[c])   (prologue, optional)
                      act_in = ReLU when in_relu, else the identity; without the prologue a = x
    acc[n, co, ho, wo] = conv_bias[co] + sum over (r, s, c in group g) of
                         a_pad[n, c, ho*stride_h - pad_h + r*dil_h, wo*stride_w - pad_w + s*dil_w]
                         * w[co, c - g*Cin_g, r, s]
    a_pad           = a inside the image and exactly 0 in the padding: zero padding is applied
                      AFTER the prologue (a padded tap contributes 0, not in_shift)
    y               = act_out(acc * out_scale[co] + out_shift[co] + residual)   (each optional)

so the prologue is a preceding BatchNorm (+ ReLU) folded into a per-channel scale and shift,
and the epilogue the following BatchNorm in eval, the block's residual add and its ReLU. The
sums accumulate in float32 (float64 for float64 tensors): the accumulation dtype, also the dtype
of every per-channel tensor. y is stored once, in x's dtype.

Statistics (``stats=True``, training BatchNorm after the conv): per output channel the mean and
the biased variance of acc over its M = N*Ho*Wo values. Each program reduces its tile of BM rows
(BM valid rows, fewer in the last tile) to a tile mean and a tile sum of squared deviations from
that mean,

    mean_t = sum_i acc_i / n_t,   M2_t = sum_i (acc_i - mean_t)^2        (two passes, in registers)

never a raw sum of squares, which cancels catastrophically when the mean is large against the
spread. The [T, 2, Cout] buffer of T = ceil(M / BM) partials is merged with Chan's parallel
formula, here for all T parts at once (the same as merging them pairwise):

    mean = sum_t n_t * mean_t / M,   M2 = sum_t M2_t + sum_t n_t * (mean_t - mean)^2,
    var  = M2 / M.

Every term is non-negative, so nothing cancels. The merge is a few torch ops on that small
buffer rather than a second Triton kernel: torch's reductions spread the T rows over the whole
device, where a merge kernel would give each of the few Cout/BLOCK programs a serial walk over
all T tiles; and they run the same on CPU tensors under the interpreter. Their order is fixed,
so the statistics are deterministic.

Implicit GEMM. With x channels_last (element (n, h, w, c) at ((n*H + h)*W + w)*Cin + c) the conv
of one group is a GEMM of [M rows = (n, ho, wo)] x [K = (r, s, c)] by [K] x [Cout_g columns],
whose A tile is gathered on load: row m, tap (r, s) reads Cin_g contiguous channels at pixel
(n, ho*stride_h - pad_h + r*dil_h, wo*stride_w - pad_w + s*dil_w), masked to 0 outside the
image. The weight is repacked once per call to (KH, KW, Cin_g, Cout), so a B tile
[BLOCK_K channels, BLOCK_N output channels] is contiguous along the output channels. The K loop
is one flat loop over KH*KW*ceil(Cin_g / BLOCK_K) steps (tap-major, channel blocks inner), which
Triton software-pipelines. Grid: (ceil(M / BM), ceil(Cout_g / BN), groups); channel masks are
per group, so a group narrower than the block (ResNeXt: 4 channels against BLOCK_K = 16) reads
only its own channels.

Precision of tl.dot: float16/bfloat16 operands with float32 accumulation; float32 operands as
TF32 when ``torch.backends.cudnn.allow_tf32`` is set (what eager conv does on a GPU), else IEEE;
float64 operands in IEEE float64. Triton's interpreter (CPU tensors) multiplies bfloat16 dot
operands as their raw 16-bit patterns, so there (DOT_IN_FP32) they are widened to float32
first: exact, as every bfloat16 product is exact in float32 and the sum is float32 anyway.

Tiling. On a GPU ``triton.autotune`` picks among CONV_CONFIGS per problem size; a config wider
than a group, or too large for float64 accumulators, is pruned first. Under the interpreter
(TRITON_INTERPRET=1) one small INTERPRETER_CONFIG, so tiny test shapes cross tile edges.
"""

import contextlib
import os
import threading
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from resnet_fast._conventions import acc_dtype_of, check_groups, conv_output_shape
from resnet_fast.triton.bn_act import relu_keep_nan

__all__ = ["CONV_CONFIGS", "INTERPRETER_CONFIG", "conv2d_bn_act"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _config(block_m, block_n, block_k, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                         num_warps=num_warps, num_stages=num_stages)


# The autotuning space on a GPU (tests/test_triton_conv_bn_act.py compiles every entry for
# sm_80 and sm_90 and checks its resources). Large square tiles for the wide layers; 128 x 64 and
# 64 x 128 for the 64-channel and small-M layers; narrow BLOCK_N/BLOCK_K for grouped convs whose
# groups hold 4 .. 32 channels.
CONV_CONFIGS = (
    _config(128, 128, 32, 8, 3),
    _config(128, 64, 32, 4, 4),
    _config(64, 128, 32, 4, 4),
    _config(64, 64, 32, 4, 4),
    _config(128, 32, 32, 4, 4),
    _config(128, 16, 16, 4, 4),
)
# Under the interpreter: small blocks (16 is tl.dot's minimum), so tests stay fast.
INTERPRETER_CONFIG = _config(16, 16, 16, 1, 1)
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_ACTIVE_CONFIGS = [INTERPRETER_CONFIG] if _INTERPRETING else list(CONV_CONFIGS)
# float64 values take two registers each: a float64 tile keeps its accumulators plus its A
# operand tile within this many elements (64 x 64 accumulators + 64 x 32 operands), which
# compiles without spills for sm_80 and sm_90.
_FP64_MAX_ELEMENTS = 64 * (64 + 32)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _fp64_fits(config: triton.Config) -> bool:
    kw = config.kwargs
    return kw["BLOCK_M"] * (kw["BLOCK_N"] + kw["BLOCK_K"]) <= _FP64_MAX_ELEMENTS


def config_fits(config: triton.Config, dtype: torch.dtype, cin_g: int, cout_g: int) -> bool:
    """Whether autotuning should try ``config`` for this dtype and group width: no block wider
    than the group's channels rounded up to a power of two (16 at least), no float64 tile past
    _FP64_MAX_ELEMENTS."""
    kw = config.kwargs
    if dtype == torch.float64 and not _fp64_fits(config):
        return False
    return (kw["BLOCK_N"] <= max(16, _pow2_at_least(cout_g))
            and kw["BLOCK_K"] <= max(16, _pow2_at_least(cin_g)))


def _prune_configs(configs, named_args, **kwargs):
    """early_config_prune of the autotuner: the configs that fit (config_fits), or, when none
    does, the smallest tile the dtype allows."""
    dtype = named_args["x_ptr"].dtype
    fits = [c for c in configs if config_fits(c, dtype, named_args["CIN_G"],
                                               named_args["COUT_G"])]
    if fits:
        return fits
    allowed = [c for c in configs if dtype != torch.float64 or _fp64_fits(c)] or list(configs)
    return [min(allowed, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"],
                                        c.kwargs["BLOCK_K"]))]


# --------------------------------------------------------------------------- kernel


@triton.autotune(
    configs=_ACTIVE_CONFIGS,
    key=["M", "Cin", "Cout", "CIN_G", "COUT_G", "KH", "KW", "stride_h", "stride_w",
         "PROLOGUE", "OUT_AFFINE", "HAS_RESIDUAL", "STATS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def conv2d_bn_act_kernel(
    x_ptr,            # input, (N, H, W, Cin) dense (channels_last), x dtype
    w_ptr,            # weight repacked to (KH, KW, Cin_g, Cout), x dtype
    bias_ptr,         # (Cout,) acc dtype: conv bias (when HAS_BIAS; else any acc tensor)
    in_scale_ptr, in_shift_ptr,     # (Cin,) acc dtype, when PROLOGUE
    out_scale_ptr, out_shift_ptr,   # (Cout,) acc dtype, when OUT_AFFINE
    residual_ptr,     # (N, Ho, Wo, Cout) dense, x dtype, when HAS_RESIDUAL
    y_ptr,            # output, (N, Ho, Wo, Cout) dense, x dtype
    partials_ptr,     # [tiles, 2, Cout] acc dtype: tile mean, tile M2, when STATS
    M, H, W, Cin, Ho, Wo, Cout, CIN_G, COUT_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr,
    OUT_AFFINE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    STATS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M rows, BLOCK_N output channels] tile of one group (see the module docstring)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    ACC: tl.constexpr = bias_ptr.dtype.element_ty
    OPERAND: tl.constexpr = x_ptr.dtype.element_ty

    # Rows of the tile: output positions (n, ho, wo), and the input pixel of tap (0, 0).
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < M
    hw_out = Ho * Wo
    n_img = rows // hw_out
    rem = rows - n_img * hw_out
    ho = rem // Wo
    wo = rem - ho * Wo
    h0 = ho * stride_h - pad_h
    w0 = wo * stride_w - pad_w
    img_base = n_img * H

    # Columns: output channels of this group.
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < COUT_G
    co = g * COUT_G + cols
    ks = tl.arange(0, BLOCK_K)
    cin0 = g * CIN_G

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    c_blocks = tl.cdiv(CIN_G, BLOCK_K)
    for step in range(0, KH * KW * c_blocks):
        tap = step // c_blocks
        c = (step - tap * c_blocks) * BLOCK_K + ks       # channel within the group
        r = tap // KW
        s = tap - r * KW
        hi = h0 + r * dil_h
        wi = w0 + s * dil_w
        in_image = row_valid & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        c_valid = c < CIN_G
        pixel = tl.cast((img_base + hi) * W + wi, tl.int64)
        a_mask = in_image[:, None] & c_valid[None, :]
        a = tl.load(x_ptr + (pixel * Cin + cin0)[:, None] + c[None, :], mask=a_mask, other=0.0)
        if PROLOGUE:
            sc = tl.load(in_scale_ptr + cin0 + c, mask=c_valid, other=0.0)
            sh = tl.load(in_shift_ptr + cin0 + c, mask=c_valid, other=0.0)
            t = a.to(ACC) * sc[None, :] + sh[None, :]
            if IN_RELU:
                t = relu_keep_nan(t)
            # Padding (and channels past the group) stay exactly 0 after the shift.
            a = tl.where(a_mask, t, 0.0).to(OPERAND)
        b_rows = (r * KW + s) * CIN_G + c
        b = tl.load(w_ptr + b_rows[:, None] * Cout + co[None, :],
                    mask=c_valid[:, None] & col_valid[None, :], other=0.0)
        if DOT_IN_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    v = acc
    if HAS_BIAS:
        v += tl.load(bias_ptr + co, mask=col_valid, other=0.0)[None, :]
    if STATS:
        # Tile mean and sum of squared deviations per channel, from the values in registers.
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(ACC)
        tile_mean = tl.sum(tl.where(row_valid[:, None], v, 0.0), axis=0) / count
        dev = tl.where(row_valid[:, None], v - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=0)
        p = partials_ptr + tl.cast(pid_m, tl.int64) * (2 * Cout) + co
        tl.store(p, tile_mean, mask=col_valid)
        tl.store(p + Cout, tile_m2, mask=col_valid)
    if OUT_AFFINE:
        osc = tl.load(out_scale_ptr + co, mask=col_valid, other=0.0)
        osh = tl.load(out_shift_ptr + co, mask=col_valid, other=0.0)
        v = v * osc[None, :] + osh[None, :]
    out_offs = tl.cast(rows, tl.int64)[:, None] * Cout + co[None, :]
    out_mask = row_valid[:, None] & col_valid[None, :]
    if HAS_RESIDUAL:
        v += tl.load(residual_ptr + out_offs, mask=out_mask, other=0.0).to(ACC)
    if RELU:
        v = relu_keep_nan(v)
    tl.store(y_ptr + out_offs, v.to(y_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------- launcher

# The autotuner records the config of its latest launch in best_config; the launch and the read
# happen under this lock so that concurrent launchers see their own.
_LAUNCH_LOCK = threading.Lock()


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of ``dtype``: TF32 for float32 exactly when eager
    conv would use it (``torch.backends.cudnn.allow_tf32``), IEEE otherwise."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _pair(value, name: str) -> tuple:
    if (not isinstance(value, Sequence) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{name} must be a sequence of 2 ints, got {value!r}")
    return int(value[0]), int(value[1])


def _check_per_channel(t: Optional[Tensor], name: str, size: int, acc: torch.dtype,
                       device: torch.device) -> Optional[Tensor]:
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    if t.dtype != acc:
        raise TypeError(f"{name} must be {acc} (the accumulation dtype), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the input on {device}")
    return t.contiguous()


def _on_device_of(x: Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _merge_stats(partials: Tensor, M: int, block_m: int) -> Tensor:
    """(2, Cout): mean and biased variance from the [T, 2, Cout] tile partials (Chan's formula
    over all tiles at once, see the module docstring)."""
    T = partials.shape[0]
    counts = (M - torch.arange(T, device=partials.device) * block_m).clamp(max=block_m)
    counts = counts.to(partials.dtype)[:, None]
    tile_mean, tile_m2 = partials[:, 0], partials[:, 1]
    mean = (counts * tile_mean).sum(0) / M
    m2 = tile_m2.sum(0) + (counts * (tile_mean - mean).square()).sum(0)
    return torch.stack([mean, m2 / M])


def conv2d_bn_act(x: Tensor, weight: Tensor, conv_bias: Optional[Tensor], stride, padding,
                  dilation, groups: int, *,
                  in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None,
                  in_relu: bool = False,
                  out_scale: Optional[Tensor] = None, out_shift: Optional[Tensor] = None,
                  residual: Optional[Tensor] = None, relu: bool = False,
                  stats: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """``(y, stats)``: y = act(conv2d(prologue(x)) * out_scale + out_shift + residual).

    x: (N, Cin, H, W) float16/bfloat16/float32/float64, any layout; weight (Cout, Cin/groups,
    KH, KW) of x's dtype; conv_bias (Cout,) of x's or the accumulation dtype, or None. stride,
    padding, dilation: 2 ints each. in_scale/in_shift (Cin,) and out_scale/out_shift (Cout,) in
    the accumulation dtype (float64 for float64 x, else float32), each pair given together;
    in_relu needs the prologue. residual: (N, Cout, Ho, Wo) of x's dtype, any layout.
    y: (N, Cout, Ho, Wo) of x's dtype, channels_last. stats=True (without out_scale, residual
    and relu) also returns the (2, Cout) mean and biased variance of conv2d(...) + conv_bias
    per channel, in the accumulation dtype; otherwise the second value is None.
    """
    # ---- arguments
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, Cin, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (Cout, Cin/groups, KH, KW), got shape "
                         f"{tuple(weight.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    check_groups(groups)
    sh_, sw_ = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    if sh_ < 1 or sw_ < 1:
        raise ValueError(f"stride must be positive, got {tuple(stride)}")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {tuple(padding)}")
    if dh < 1 or dw < 1:
        raise ValueError(f"dilation must be positive, got {tuple(dilation)}")
    N, Cin, H, W = x.shape
    Cout, cin_g, KH, KW = weight.shape
    if cin_g * groups != Cin:
        raise ValueError(f"weight.shape[1] * groups = {cin_g} * {groups} must equal x's "
                         f"{Cin} input channels")
    if Cout % groups != 0:
        raise ValueError(f"weight's {Cout} output channels are not divisible by groups={groups}")
    if KH < 1 or KW < 1 or Cout < 1:
        raise ValueError(f"weight must have a positive size, got {tuple(weight.shape)}")
    _, _, Ho, Wo = conv_output_shape(x.shape, weight.shape, (sh_, sw_), (ph, pw), (dh, dw))
    if Ho < 1 or Wo < 1:
        raise ValueError(f"x's {H}x{W} image (padding {ph, pw}) is smaller than the "
                         f"{KH}x{KW} kernel at dilation {dh, dw}: output {Ho}x{Wo}")
    acc = acc_dtype_of(x.dtype)
    if conv_bias is not None:
        if not isinstance(conv_bias, Tensor):
            raise TypeError(f"conv_bias must be a Tensor, got {type(conv_bias).__name__}")
        if conv_bias.dtype not in (x.dtype, acc):
            raise TypeError(f"conv_bias must be {x.dtype} or {acc}, got {conv_bias.dtype}")
        conv_bias = _check_per_channel(conv_bias.to(acc), "conv_bias", Cout, acc, x.device)
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together")
    if (out_scale is None) != (out_shift is None):
        raise ValueError("out_scale and out_shift must be given together")
    if in_relu and in_scale is None:
        raise ValueError("in_relu needs the prologue: give in_scale and in_shift")
    in_scale = _check_per_channel(in_scale, "in_scale", Cin, acc, x.device)
    in_shift = _check_per_channel(in_shift, "in_shift", Cin, acc, x.device)
    out_scale = _check_per_channel(out_scale, "out_scale", Cout, acc, x.device)
    out_shift = _check_per_channel(out_shift, "out_shift", Cout, acc, x.device)
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a Tensor, got {type(residual).__name__}")
        if residual.shape != (N, Cout, Ho, Wo):
            raise ValueError(f"residual must have the output's shape {(N, Cout, Ho, Wo)}, got "
                             f"{tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device}, x on {x.device}")
    if stats and (out_scale is not None or residual is not None or relu):
        raise ValueError("stats=True needs the bare conv output: no out_scale/out_shift, "
                         "residual or relu")
    M = N * Ho * Wo
    if max(N * H * W, M) >= 2**31:
        raise ValueError(f"N*H*W = {N * H * W} and N*Ho*Wo = {M} must be below 2**31")

    # ---- launch
    y = torch.empty((N, Cout, Ho, Wo), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    if M == 0:
        empty = torch.full((2, Cout), float("nan"), dtype=acc, device=x.device)
        return y, empty if stats else None
    xc = x.contiguous(memory_format=torch.channels_last)
    w_packed = weight.permute(2, 3, 1, 0).contiguous()           # (KH, KW, Cin_g, Cout)
    rc = None if residual is None else residual.contiguous(memory_format=torch.channels_last)
    any_acc = torch.empty(1, dtype=acc, device=x.device)        # stands in for absent ones
    min_block_m = min(c.kwargs["BLOCK_M"] for c in _ACTIVE_CONFIGS)
    partials = (torch.empty((triton.cdiv(M, min_block_m), 2, Cout), dtype=acc, device=x.device)
                if stats else any_acc)
    cout_g = Cout // groups

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(cout_g, meta["BLOCK_N"]), groups)

    with _on_device_of(x), _LAUNCH_LOCK:
        conv2d_bn_act_kernel[grid](
            xc, w_packed,
            any_acc if conv_bias is None else conv_bias,
            any_acc if in_scale is None else in_scale,
            any_acc if in_shift is None else in_shift,
            any_acc if out_scale is None else out_scale,
            any_acc if out_shift is None else out_shift,
            y if rc is None else rc, y, partials,
            M, H, W, Cin, Ho, Wo, Cout, cin_g, cout_g, sh_, sw_, ph, pw, dh, dw,
            KH=KH, KW=KW, HAS_BIAS=conv_bias is not None, PROLOGUE=in_scale is not None,
            IN_RELU=bool(in_relu), OUT_AFFINE=out_scale is not None,
            HAS_RESIDUAL=rc is not None, RELU=bool(relu), STATS=bool(stats),
            INPUT_PRECISION=input_precision(x.dtype),
            DOT_IN_FP32=x.dtype == torch.bfloat16 and x.device.type == "cpu",
        )
        block_m = conv2d_bn_act_kernel.best_config.kwargs["BLOCK_M"]
    if not stats:
        return y, None
    return y, _merge_stats(partials[:triton.cdiv(M, block_m)], M, block_m)
