"""Triton kernels of the fused BatchNorm (+ residual / + BatchNorm'ed residual) + ReLU op.

Math (csrc/bn_act_math.h has the same formulas for the C++ backends). Per channel c over its
m = N*H*W values:

    mean = sum(x) / m,   var = sum((x - mean)^2) / m (biased),   invstd = 1 / sqrt(var + eps)
    out = act((x - mean) * scale + b + r_term),   scale = w * invstd
    r_term = 0 | r | (r - r_mean) * r_scale + r_b (the residual BatchNorm'ed with its own
    statistics); x is centred before it is scaled, as in eager, which keeps a channel whose mean
    is large against its spread exact (the folded x * scale + (b - mean * scale) would not)

The statistics come from pivot-shifted sums, s1 = sum(x - p), s2 = sum((x - p)^2) with p the
channel's first element: mean = p + s1/m, var = max(s2/m - (s1/m)^2, 0). Shifting keeps the
variance exact when the mean is large against the spread (raw sum / sum of squares would cancel).
Training also gives nn.BatchNorm2d's running update:
    running_mean' = (1 - momentum) * running_mean + momentum * mean
    running_var'  = (1 - momentum) * running_var  + momentum * var * m / (m - 1).

Backward, with g = dy * [not pre-activation <= 0] (the ReLU mask recomputed from x, r and the saved
statistics):
    grad_bias = sum(g),  grad_weight = invstd * sum(g * (x - mean))
    dx = ((g - mean_g) - (x - mean) * invstd * mean_gxhat) * w * invstd  with, for batch
        statistics, mean_g = sum(g) / m,  mean_gxhat = invstd * sum(g * (x - mean)) / m
        (both 0 for fixed statistics), and the same with the residual's own statistics and
        weight for the gradient of a BatchNorm'ed residual (a plain residual's gradient is g).
    Centring g and x first keeps dx accurate where a channel is constant or its mean is large
    against its spread; normalising x before its coefficient keeps it for huge values.

Layouts. An activation is a matrix of M = N*H*W rows by C channels, stored either
channels_last (element (m, c) at m*C + c: channel innermost) or NCHW (element (n, c, hw) at
(n*C + c)*HW + hw: HW innermost). A program works on 2-D tiles whose second axis is the
contiguous one, so loads and stores are 16-byte vectors along it:
    channels_last: [BLOCK_R rows, BLOCK_C channels]
    NCHW:          [BLOCK_C channels, BLOCK_R positions of one image's HW plane]
(NCHW with H*W == 1 is the same memory as channels_last and takes that path.) The row tiles
are numbered t = 0 .. num_row_tiles-1 (NCHW: t = n * row_tiles_per_n + hw block) and split
into contiguous runs of tiles_per_program tiles, one run per program along grid axis 0; grid
axis 1 walks the channel blocks. Addresses are an int64 tile base plus int32 in-tile offsets.

Passes over memory per activation element:
    training forward: bn_act_fwd_stats_kernel reads x (and r) and writes a small
        [row programs, sums, C] buffer of per-program partial sums; bn_act_fwd_apply_kernel
        re-reduces those partials for its channel block in its prologue (they are small), then
        reads x (and r) and writes out. Only the first row of programs writes save_stats and
        the new running statistics, so each is written once.
    eval forward: bn_act_fwd_apply_kernel alone, statistics from the running ones.
    backward: bn_act_bwd_reduce_kernel (partial sums of g, g*(x - mean), g*(r - r_mean)), then
        bn_act_bwd_apply_kernel writes grad_input (and grad_residual), and its first row of
        programs the weight and bias gradients.
Accumulation is float32 (float64 for float64 tensors), the dtype of weight, bias, the
statistics and the partial sums.
"""

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from resnet_fast._conventions import acc_dtype_of, residual_mode

__all__ = ["BnActConfig", "pick_config", "forward", "backward"]

# RESIDUAL_MODE of the kernels (resnet_fast._conventions.residual_mode): r_term = 0 (0), r (1),
# or (r - r_mean) * r_scale + r_b (2).


# --------------------------------------------------------------------------- tile helpers


@triton.jit
def _channel_block(C, BLOCK_C: tl.constexpr):
    """(c0, c, c_mask): channels c = c0 .. c0+BLOCK_C of this program's block (grid axis 1)."""
    c0 = tl.program_id(1) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    return c0, c, c < C


@triton.jit
def _first_row_mask(c, C):
    """Where this program stores per-channel results: channels c < C in the first row of
    programs, so that each is written once."""
    return c < tl.where(tl.program_id(0) == 0, C, 0)


@triton.jit
def _row_tile(t, c0, C, HW, M, row_tiles_per_n, CHANNELS_LAST: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(int64 base, int32 in-tile offsets, mask) of row tile t at channels c0 .. c0+BLOCK_C."""
    if CHANNELS_LAST:
        rows = tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        m0 = t * BLOCK_R
        base = tl.cast(m0, tl.int64) * C + c0
        offs = rows[:, None] * C + cols[None, :]
        mask = (rows[:, None] < M - m0) & (cols[None, :] < C - c0)
    else:
        chans = tl.arange(0, BLOCK_C)
        pos = tl.arange(0, BLOCK_R)
        n = t // row_tiles_per_n
        hw0 = (t - n * row_tiles_per_n) * BLOCK_R
        base = (tl.cast(n, tl.int64) * C + c0) * HW + hw0
        offs = chans[:, None] * HW + pos[None, :]
        mask = (chans[:, None] < C - c0) & (pos[None, :] < HW - hw0)
    return base, offs, mask


@triton.jit
def _tile_run(tiles_per_program, num_row_tiles):
    """(first, end) row tiles of this program's run (grid axis 0)."""
    t_start = tl.program_id(0) * tiles_per_program
    return t_start, tl.minimum(t_start + tiles_per_program, num_row_tiles)


@triton.jit
def _tile_zeros(dtype: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_C: tl.constexpr):
    if CHANNELS_LAST:
        z = tl.zeros([BLOCK_R, BLOCK_C], dtype)
    else:
        z = tl.zeros([BLOCK_C, BLOCK_R], dtype)
    return z


@triton.jit
def _per_channel(v, CHANNELS_LAST: tl.constexpr):
    """A [BLOCK_C] vector broadcastable against a tile (channels on axis 1 or 0)."""
    if CHANNELS_LAST:
        b = v[None, :]
    else:
        b = v[:, None]
    return b


@triton.jit
def _channel_sum(tile, CHANNELS_LAST: tl.constexpr):
    """Per-channel sum of a tile: a [BLOCK_C] vector."""
    if CHANNELS_LAST:
        s = tl.sum(tile, axis=0)
    else:
        s = tl.sum(tile, axis=1)
    return s


@triton.jit
def relu_keep_nan(v):
    """max(v, 0) that keeps NaN, as eager's ReLU: the GPU's max.NaN instruction for 16- and
    32-bit values, a compare and select for float64 (which has no such instruction)."""
    if v.dtype == tl.float64:
        return tl.where(v < 0.0, 0.0, v)
    else:
        return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _load_pivot(src_ptr, c, c_mask, HW, CHANNELS_LAST: tl.constexpr, acc: tl.constexpr):
    """The pivot of channel c's shifted sums: element (m = 0, c), or 0 where that is inf or NaN
    (shifting by inf would make the channel's finite values NaN where eager's mean is inf)."""
    if CHANNELS_LAST:
        offs = c
    else:
        offs = c * HW
    p = tl.load(src_ptr + offs, mask=c_mask, other=0.0).to(acc)
    return tl.where(p - p == 0.0, p, 0.0)


@triton.jit
def _inv_sqrt(v):
    # Round-to-nearest sqrt and division in float64 (gradcheck); rsqrt in float32.
    if v.dtype == tl.float64:
        r = 1.0 / tl.sqrt(v)
    else:
        r = tl.rsqrt(v)
    return r


@triton.jit
def _pre_activation(x, r, mean, scale, b, r_mean, r_scale, RESIDUAL_MODE: tl.constexpr):
    """(x - mean) * scale + b + r_term, the value the ReLU sees; b includes the BatchNorm'ed
    residual's bias (the order of csrc/bn_act_math.h)."""
    y = (x - mean) * scale + b
    if RESIDUAL_MODE == 1:
        y += r
    elif RESIDUAL_MODE == 2:
        y += (r - r_mean) * r_scale
    return y


@triton.jit
def _load_grad_tile(grad_out_ptr, x_ptr, residual_ptr, base, offs, mask, mean, scale, b, r_mean,
                    r_scale, acc: tl.constexpr, READ_X: tl.constexpr,
                    RESIDUAL_MODE: tl.constexpr, RELU: tl.constexpr):
    """(g, x, r) of a backward tile: g = dy * [not pre-activation <= 0] (NaN passes, as
    threshold_backward), x where READ_X or the ReLU mask needs it, r where the BatchNorm'ed
    residual or the ReLU mask needs it (dy stands in for what is not read)."""
    g = tl.load(grad_out_ptr + base + offs, mask=mask, other=0.0).to(acc)
    x = g
    if READ_X or RELU:
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(acc)
    r = g
    if RESIDUAL_MODE == 2 or (RELU and RESIDUAL_MODE == 1):
        r = tl.load(residual_ptr + base + offs, mask=mask, other=0.0).to(acc)
    if RELU:
        pre = _pre_activation(x, r, mean, scale, b, r_mean, r_scale, RESIDUAL_MODE)
        g = tl.where(pre <= 0.0, 0.0, g)
    return g, x, r


@triton.jit
def _sum_partials(partials_ptr, k, c, c_mask, C, num_partials, NUM_SUMS: tl.constexpr,
                  PARTIAL_CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum over row programs p of partials[p, k, c]: a [BLOCK_C] vector."""
    rows = tl.arange(0, PARTIAL_CHUNK)
    acc = tl.zeros([PARTIAL_CHUNK, BLOCK_C], partials_ptr.dtype.element_ty)
    for p0 in range(0, num_partials, PARTIAL_CHUNK):
        p = p0 + rows
        ptrs = partials_ptr + (p[:, None] * NUM_SUMS + k) * C + c[None, :]
        acc += tl.load(ptrs, mask=(p[:, None] < num_partials) & c_mask[None, :], other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _store_partial(partials_ptr, k, tile, c, c_mask, C, NUM_SUMS: tl.constexpr,
                   CHANNELS_LAST: tl.constexpr):
    """partials[p, k, c] = the per-channel sum of tile, p this program's run (grid axis 0)."""
    out = partials_ptr + tl.program_id(0) * (NUM_SUMS * C) + k * C + c
    tl.store(out, _channel_sum(tile, CHANNELS_LAST), mask=c_mask)


@triton.jit
def _bn_channel_stats(src_ptr, running_mean_ptr, running_var_ptr, partials_ptr, save_stats_ptr,
                      new_running_ptr, branch, c, c_mask, store_mask, C, HW, M, num_partials,
                      eps, momentum, BATCH_STATS: tl.constexpr, TRACK_RUNNING: tl.constexpr,
                      NUM_SUMS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                      PARTIAL_CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """(mean, invstd) of one BatchNorm branch (0: x, 1: the residual) for channels c.

    BATCH_STATS: from the pivot-shifted partial sums 2*branch, 2*branch+1 (pivot re-read from
    src_ptr), plus the running update; otherwise from the running statistics. The first row of
    programs (store_mask) stores save_stats[branch] and new_running[branch].
    """
    acc: tl.constexpr = partials_ptr.dtype.element_ty
    eps_c = tl.full([BLOCK_C], eps, acc)
    if BATCH_STATS:
        m = tl.full([BLOCK_C], M, acc)
        pivot = _load_pivot(src_ptr, c, c_mask, HW, CHANNELS_LAST, acc)
        s1 = _sum_partials(partials_ptr, 2 * branch, c, c_mask, C, num_partials, NUM_SUMS,
                           PARTIAL_CHUNK, BLOCK_C)
        s2 = _sum_partials(partials_ptr, 2 * branch + 1, c, c_mask, C, num_partials, NUM_SUMS,
                           PARTIAL_CHUNK, BLOCK_C)
        # Finished in float64: where finite values overflow s2 (|x| ~ 1e30 in float32), d * d
        # stays finite and the variance is +inf, as eager's; an inf or NaN value makes s1
        # non-finite and the variance NaN, also as in eager (the clamp at 0 keeps NaN).
        m64 = m.to(tl.float64)
        d = s1.to(tl.float64) / m64
        var = s2.to(tl.float64) / m64 - d * d
        var = tl.where(var < 0.0, 0.0, var).to(acc)
        mean = pivot + d.to(acc)
        if TRACK_RUNNING:
            mom = tl.full([BLOCK_C], momentum, acc)
            old_mean = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0)
            old_var = tl.load(running_var_ptr + c, mask=c_mask, other=0.0)
            new_mean = (1.0 - mom) * old_mean + mom * mean
            new_var = (1.0 - mom) * old_var + mom * (var * m / (m - 1.0))
            tl.store(new_running_ptr + (2 * branch) * C + c, new_mean, mask=store_mask)
            tl.store(new_running_ptr + (2 * branch + 1) * C + c, new_var, mask=store_mask)
    else:
        mean = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0)
        var = tl.load(running_var_ptr + c, mask=c_mask, other=0.0)
    invstd = _inv_sqrt(var + eps_c)
    tl.store(save_stats_ptr + (2 * branch) * C + c, mean, mask=store_mask)
    tl.store(save_stats_ptr + (2 * branch + 1) * C + c, invstd, mask=store_mask)
    return mean, invstd


@triton.jit
def _load_affine(stats_ptr, weight_ptr, bias_ptr, branch, c, c_mask, C):
    """(mean, invstd, w, scale = w * invstd, b) of a branch from its saved (mean, invstd)."""
    mean = tl.load(stats_ptr + (2 * branch) * C + c, mask=c_mask, other=0.0)
    invstd = tl.load(stats_ptr + (2 * branch + 1) * C + c, mask=c_mask, other=0.0)
    w = tl.load(weight_ptr + c, mask=c_mask, other=0.0)
    b = tl.load(bias_ptr + c, mask=c_mask, other=0.0)
    scale = w * invstd
    return mean, invstd, w, scale, b


# --------------------------------------------------------------------------- kernels


@triton.jit
def bn_act_fwd_stats_kernel(
    x_ptr,             # activation, [M, C] channels_last or [N, C, HW]
    residual_ptr,      # like x; read only when RESIDUAL_BN
    partials_ptr,      # [row programs, NUM_SUMS, C] acc dtype: s1(x), s2(x)[, s1(r), s2(r)]
    C, HW, M, row_tiles_per_n, num_row_tiles, tiles_per_program,
    CHANNELS_LAST: tl.constexpr, RESIDUAL_BN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Pivot-shifted partial sums of x (and of the residual) over one run of row tiles."""
    c0, c, c_mask = _channel_block(C, BLOCK_C)
    acc: tl.constexpr = partials_ptr.dtype.element_ty
    NUM_SUMS: tl.constexpr = 4 if RESIDUAL_BN else 2
    # Tile-shaped accumulators, reduced across the tile once at the end: each lane sums only
    # tiles_per_program values, and the tile reduction is a tree.
    x_pivot = _per_channel(_load_pivot(x_ptr, c, c_mask, HW, CHANNELS_LAST, acc), CHANNELS_LAST)
    x_s1 = _tile_zeros(acc, CHANNELS_LAST, BLOCK_R, BLOCK_C)
    x_s2 = _tile_zeros(acc, CHANNELS_LAST, BLOCK_R, BLOCK_C)
    if RESIDUAL_BN:
        r_pivot = _per_channel(_load_pivot(residual_ptr, c, c_mask, HW, CHANNELS_LAST, acc),
                               CHANNELS_LAST)
        r_s1 = _tile_zeros(acc, CHANNELS_LAST, BLOCK_R, BLOCK_C)
        r_s2 = _tile_zeros(acc, CHANNELS_LAST, BLOCK_R, BLOCK_C)
    t_start, t_end = _tile_run(tiles_per_program, num_row_tiles)
    for t in range(t_start, t_end):
        base, offs, mask = _row_tile(t, c0, C, HW, M, row_tiles_per_n, CHANNELS_LAST,
                                     BLOCK_R, BLOCK_C)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(acc)
        d = tl.where(mask, x - x_pivot, 0.0)
        x_s1 += d
        x_s2 += d * d
        if RESIDUAL_BN:
            r = tl.load(residual_ptr + base + offs, mask=mask, other=0.0).to(acc)
            dr = tl.where(mask, r - r_pivot, 0.0)
            r_s1 += dr
            r_s2 += dr * dr
    _store_partial(partials_ptr, 0, x_s1, c, c_mask, C, NUM_SUMS, CHANNELS_LAST)
    _store_partial(partials_ptr, 1, x_s2, c, c_mask, C, NUM_SUMS, CHANNELS_LAST)
    if RESIDUAL_BN:
        _store_partial(partials_ptr, 2, r_s1, c, c_mask, C, NUM_SUMS, CHANNELS_LAST)
        _store_partial(partials_ptr, 3, r_s2, c, c_mask, C, NUM_SUMS, CHANNELS_LAST)


@triton.jit
def bn_act_fwd_apply_kernel(
    x_ptr, residual_ptr, out_ptr,                  # activations (out like x)
    weight_ptr, bias_ptr,                          # [C] acc dtype
    running_mean_ptr, running_var_ptr,             # [C]: eval statistics / old running ones
    residual_weight_ptr, residual_bias_ptr,        # [C], RESIDUAL_MODE == 2
    residual_running_mean_ptr, residual_running_var_ptr,
    partials_ptr,                                  # bn_act_fwd_stats_kernel's, when BATCH_STATS
    save_stats_ptr,                                # [B, 2, C]: (mean, invstd) per branch
    new_running_ptr,                               # [B, 2, C]: (mean, var) when TRACK_RUNNING
    C, HW, M, row_tiles_per_n, num_row_tiles, tiles_per_program, num_partials,
    eps: tl.float64, momentum: tl.float64,
    CHANNELS_LAST: tl.constexpr, RESIDUAL_MODE: tl.constexpr, BATCH_STATS: tl.constexpr,
    TRACK_RUNNING: tl.constexpr, RELU: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PARTIAL_CHUNK: tl.constexpr,
):
    """out = act((x - mean) * scale + b + r_term), statistics finalised in the prologue."""
    c0, c, c_mask = _channel_block(C, BLOCK_C)
    acc: tl.constexpr = weight_ptr.dtype.element_ty
    NUM_SUMS: tl.constexpr = 4 if RESIDUAL_MODE == 2 else 2
    store_mask = _first_row_mask(c, C)
    mean, invstd = _bn_channel_stats(
        x_ptr, running_mean_ptr, running_var_ptr, partials_ptr, save_stats_ptr, new_running_ptr,
        0, c, c_mask, store_mask, C, HW, M, num_partials, eps, momentum, BATCH_STATS,
        TRACK_RUNNING, NUM_SUMS, CHANNELS_LAST, PARTIAL_CHUNK, BLOCK_C)
    w = tl.load(weight_ptr + c, mask=c_mask, other=0.0)
    b = tl.load(bias_ptr + c, mask=c_mask, other=0.0)
    scale = _per_channel(w * invstd, CHANNELS_LAST)
    mean = _per_channel(mean, CHANNELS_LAST)
    b = _per_channel(b, CHANNELS_LAST)
    r_mean = mean  # placeholders unless the residual is BatchNorm'ed
    r_scale = scale
    if RESIDUAL_MODE == 2:
        r_mean, r_invstd = _bn_channel_stats(
            residual_ptr, residual_running_mean_ptr, residual_running_var_ptr, partials_ptr,
            save_stats_ptr, new_running_ptr, 1, c, c_mask, store_mask, C, HW, M,
            num_partials, eps, momentum, BATCH_STATS, TRACK_RUNNING, NUM_SUMS, CHANNELS_LAST,
            PARTIAL_CHUNK, BLOCK_C)
        rw = tl.load(residual_weight_ptr + c, mask=c_mask, other=0.0)
        rb = tl.load(residual_bias_ptr + c, mask=c_mask, other=0.0)
        r_scale = _per_channel(rw * r_invstd, CHANNELS_LAST)
        r_mean = _per_channel(r_mean, CHANNELS_LAST)
        b += _per_channel(rb, CHANNELS_LAST)
    t_start, t_end = _tile_run(tiles_per_program, num_row_tiles)
    for t in range(t_start, t_end):
        base, offs, mask = _row_tile(t, c0, C, HW, M, row_tiles_per_n, CHANNELS_LAST,
                                     BLOCK_R, BLOCK_C)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(acc)
        r = x  # unused unless there is a residual
        if RESIDUAL_MODE != 0:
            r = tl.load(residual_ptr + base + offs, mask=mask, other=0.0).to(acc)
        y = _pre_activation(x, r, mean, scale, b, r_mean, r_scale, RESIDUAL_MODE)
        if RELU:
            y = relu_keep_nan(y)
        tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_act_bwd_reduce_kernel(
    grad_out_ptr, x_ptr, residual_ptr,             # activations
    weight_ptr, bias_ptr, residual_weight_ptr, residual_bias_ptr,   # [C] acc dtype
    save_stats_ptr,                                # [B, 2, C] forward's (mean, invstd)
    partials_ptr,                                  # [row programs, NUM_SUMS, C]:
                                                   #   sum(g), sum(g*(x-mean))[, sum(g*(r-r_mean))]
    C, HW, M, row_tiles_per_n, num_row_tiles, tiles_per_program,
    CHANNELS_LAST: tl.constexpr, RESIDUAL_MODE: tl.constexpr, RELU: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial per-channel sums of g, g*(x - mean) (and g*(r - r_mean)) over a run of tiles."""
    c0, c, c_mask = _channel_block(C, BLOCK_C)
    acc: tl.constexpr = weight_ptr.dtype.element_ty
    NUM_SUMS: tl.constexpr = 3 if RESIDUAL_MODE == 2 else 2
    mean, invstd, w, scale, b = _load_affine(save_stats_ptr, weight_ptr, bias_ptr, 0, c, c_mask,
                                             C)
    mean = _per_channel(mean, CHANNELS_LAST)
    scale = _per_channel(scale, CHANNELS_LAST)
    b = _per_channel(b, CHANNELS_LAST)
    r_mean = mean  # placeholders unless the residual is BatchNorm'ed
    r_scale = scale
    if RESIDUAL_MODE == 2:
        r_mean, r_invstd, rw, r_scale, r_b = _load_affine(
            save_stats_ptr, residual_weight_ptr, residual_bias_ptr, 1, c, c_mask, C)
        r_mean = _per_channel(r_mean, CHANNELS_LAST)
        r_scale = _per_channel(r_scale, CHANNELS_LAST)
        b += _per_channel(r_b, CHANNELS_LAST)
    sum_g = _tile_zeros(acc, CHANNELS_LAST, BLOCK_R, BLOCK_C)
    sum_gx = _tile_zeros(acc, CHANNELS_LAST, BLOCK_R, BLOCK_C)
    if RESIDUAL_MODE == 2:
        sum_gr = _tile_zeros(acc, CHANNELS_LAST, BLOCK_R, BLOCK_C)
    t_start, t_end = _tile_run(tiles_per_program, num_row_tiles)
    for t in range(t_start, t_end):
        base, offs, mask = _row_tile(t, c0, C, HW, M, row_tiles_per_n, CHANNELS_LAST,
                                     BLOCK_R, BLOCK_C)
        g, x, r = _load_grad_tile(grad_out_ptr, x_ptr, residual_ptr, base, offs, mask, mean,
                                  scale, b, r_mean, r_scale, acc, True, RESIDUAL_MODE, RELU)
        # masked lanes hold g = 0, so they add nothing
        sum_g += g
        sum_gx += g * (x - mean)
        if RESIDUAL_MODE == 2:
            sum_gr += g * (r - r_mean)
    _store_partial(partials_ptr, 0, sum_g, c, c_mask, C, NUM_SUMS, CHANNELS_LAST)
    _store_partial(partials_ptr, 1, sum_gx, c, c_mask, C, NUM_SUMS, CHANNELS_LAST)
    if RESIDUAL_MODE == 2:
        _store_partial(partials_ptr, 2, sum_gr, c, c_mask, C, NUM_SUMS, CHANNELS_LAST)


@triton.jit
def _bwd_coeffs(sum_g, sum_gc, invstd, m, BATCH_STATS: tl.constexpr):
    """(mean_g, mean_gxhat): the centring terms of dx (bn_backward_coeffs)."""
    if BATCH_STATS:
        mean_g = sum_g / m
        mean_gxhat = sum_gc * invstd / m
    else:
        mean_g = tl.zeros_like(invstd)
        mean_gxhat = tl.zeros_like(invstd)
    return mean_g, mean_gxhat


@triton.jit
def _branch_backward_constants(save_stats_ptr, weight_ptr, bias_ptr, grad_weight_ptr,
                               grad_bias_ptr, branch, sum_g, sum_gc, m, c, c_mask, store_mask, C,
                               CHANNELS_LAST: tl.constexpr, BATCH_STATS: tl.constexpr):
    """One BatchNorm branch's per-channel backward constants, laid out for the tile:
    (mean, invstd, mean_g, mean_gxhat, scale, b); its weight and bias gradients are stored where
    store_mask."""
    mean, invstd, w, scale, b = _load_affine(save_stats_ptr, weight_ptr, bias_ptr, branch, c,
                                             c_mask, C)
    tl.store(grad_weight_ptr + c, sum_gc * invstd, mask=store_mask)
    tl.store(grad_bias_ptr + c, sum_g, mask=store_mask)
    mean_g, mean_gxhat = _bwd_coeffs(sum_g, sum_gc, invstd, m, BATCH_STATS)
    return (_per_channel(mean, CHANNELS_LAST), _per_channel(invstd, CHANNELS_LAST),
            _per_channel(mean_g, CHANNELS_LAST), _per_channel(mean_gxhat, CHANNELS_LAST),
            _per_channel(scale, CHANNELS_LAST), _per_channel(b, CHANNELS_LAST))


@triton.jit
def bn_act_bwd_apply_kernel(
    grad_out_ptr, x_ptr, residual_ptr,             # activations
    grad_input_ptr, grad_residual_ptr,             # like x (grad_residual when a residual)
    weight_ptr, bias_ptr, residual_weight_ptr, residual_bias_ptr,   # [C] acc dtype
    save_stats_ptr,                                # [B, 2, C] forward's (mean, invstd)
    partials_ptr,                                  # bn_act_bwd_reduce_kernel's
    grad_weight_ptr, grad_bias_ptr,                # [C]
    grad_residual_weight_ptr, grad_residual_bias_ptr,   # [C], RESIDUAL_MODE == 2
    C, HW, M, row_tiles_per_n, num_row_tiles, tiles_per_program, num_partials,
    CHANNELS_LAST: tl.constexpr, RESIDUAL_MODE: tl.constexpr, BATCH_STATS: tl.constexpr,
    RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    PARTIAL_CHUNK: tl.constexpr,
):
    """grad_input (and grad_residual) from the finalised sums; weight/bias gradients once."""
    c0, c, c_mask = _channel_block(C, BLOCK_C)
    acc: tl.constexpr = weight_ptr.dtype.element_ty
    NUM_SUMS: tl.constexpr = 3 if RESIDUAL_MODE == 2 else 2
    store_mask = _first_row_mask(c, C)
    m = tl.full([BLOCK_C], M, acc)
    sum_g = _sum_partials(partials_ptr, 0, c, c_mask, C, num_partials, NUM_SUMS, PARTIAL_CHUNK,
                          BLOCK_C)
    sum_gx = _sum_partials(partials_ptr, 1, c, c_mask, C, num_partials, NUM_SUMS, PARTIAL_CHUNK,
                           BLOCK_C)
    mean, invstd, mean_g, mean_gxhat, scale, b = _branch_backward_constants(
        save_stats_ptr, weight_ptr, bias_ptr, grad_weight_ptr, grad_bias_ptr, 0, sum_g, sum_gx,
        m, c, c_mask, store_mask, C, CHANNELS_LAST, BATCH_STATS)
    r_scale = scale  # placeholders unless the residual is BatchNorm'ed
    r_mean = mean
    r_invstd = invstd
    r_mean_g = mean_g
    r_mean_gxhat = mean_gxhat
    if RESIDUAL_MODE == 2:
        sum_gr = _sum_partials(partials_ptr, 2, c, c_mask, C, num_partials, NUM_SUMS,
                               PARTIAL_CHUNK, BLOCK_C)
        r_mean, r_invstd, r_mean_g, r_mean_gxhat, r_scale, r_b = _branch_backward_constants(
            save_stats_ptr, residual_weight_ptr, residual_bias_ptr, grad_residual_weight_ptr,
            grad_residual_bias_ptr, 1, sum_g, sum_gr, m, c, c_mask, store_mask, C,
            CHANNELS_LAST, BATCH_STATS)
        b += r_b
    t_start, t_end = _tile_run(tiles_per_program, num_row_tiles)
    for t in range(t_start, t_end):
        base, offs, mask = _row_tile(t, c0, C, HW, M, row_tiles_per_n, CHANNELS_LAST,
                                     BLOCK_R, BLOCK_C)
        g, x, r = _load_grad_tile(grad_out_ptr, x_ptr, residual_ptr, base, offs, mask, mean,
                                  scale, b, r_mean, r_scale, acc, BATCH_STATS, RESIDUAL_MODE,
                                  RELU)
        if BATCH_STATS:
            dx = ((g - mean_g) - ((x - mean) * invstd) * mean_gxhat) * scale
        else:
            dx = g * scale
        tl.store(grad_input_ptr + base + offs, dx.to(grad_input_ptr.dtype.element_ty), mask=mask)
        if RESIDUAL_MODE == 1:
            tl.store(grad_residual_ptr + base + offs, g.to(grad_residual_ptr.dtype.element_ty),
                     mask=mask)
        elif RESIDUAL_MODE == 2:
            if BATCH_STATS:
                dr = ((g - r_mean_g) - ((r - r_mean) * r_invstd) * r_mean_gxhat) * r_scale
            else:
                dr = g * r_scale
            tl.store(grad_residual_ptr + base + offs, dr.to(grad_residual_ptr.dtype.element_ty),
                     mask=mask)


# --------------------------------------------------------------------------- launch configuration

# Programs a pass aims for per multiprocessor (SM), enough to keep every SM streaming; the
# device's own SM count is used where there is one, an H100's 132 for ahead-of-time checks.
_PROGRAMS_PER_SM = 4
_DEFAULT_SMS = 132
# Tile side under the interpreter: small, so that tiny shapes cross tile edges and need
# several row programs (the tests change it to cover other block sizes).
INTERPRETER_BLOCK = 16


@dataclass(frozen=True)
class BnActConfig:
    """Tiling and grid of every kernel of one activation shape (see the module docstring)."""

    channels_last: bool      # tile layout: [BLOCK_R rows, BLOCK_C] or [BLOCK_C, BLOCK_R of HW]
    block_r: int             # rows (channels_last) or HW positions (NCHW) per tile
    block_c: int             # channels per tile
    row_tiles_per_n: int     # NCHW: tiles across one HW plane (1 for channels_last)
    num_row_tiles: int
    tiles_per_program: int
    row_programs: int        # grid axis 0; also the number of partial sums per channel
    channel_blocks: int      # grid axis 1
    partial_chunk: int       # partial sums re-reduced per step in the prologues
    num_warps: int

    @property
    def grid(self):
        return (self.row_programs, self.channel_blocks)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pick_block_hw(HW: int, tile: int) -> int:
    """NCHW positions per tile: the largest power of two (64 .. 1024, within the tile) that
    wastes at most 1/16 of its last tile; small planes take one tile each."""
    if HW <= 64:
        return _pow2_at_least(HW)
    best = 64
    for block in (1024, 512, 256, 128):
        if block <= tile and (-HW % block) * 16 <= HW:
            best = block
            break
    return best


def pick_config(N: int, C: int, H: int, W: int, channels_last: bool, dtype: torch.dtype,
                interpreter: bool = False, multiprocessors: int = _DEFAULT_SMS) -> BnActConfig:
    """The tiling and grid the launchers use for an (N, C, H, W) activation of ``dtype``.

    ``channels_last`` is the tensor's layout; NCHW with H*W == 1 is the same memory and is
    tiled as channels_last. GPU tiles hold 2048 values (1024 in float64) for 8 warps: a thread
    moves one or two 16-byte vectors per tensor and tile along the contiguous axis, and the
    heaviest kernel (backward with a BatchNorm'ed residual) needs at most 128 registers, so
    several programs share an SM. The rows are split into about
    _PROGRAMS_PER_SM * multiprocessors / channel_blocks runs, but at most sqrt(M / 32) of them: every program of
    an apply pass re-reduces the partial sums of all runs, which stays a few percent of the
    activation traffic at that bound. Under the interpreter, tiles of INTERPRETER_BLOCK and runs
    of two tiles exercise the masked edges and the partial sums on tiny shapes.
    """
    HW = H * W
    M = N * HW
    target_programs = _PROGRAMS_PER_SM * multiprocessors
    channels_last = channels_last or HW == 1
    elem = torch.empty((), dtype=dtype).element_size()
    if interpreter:
        block_c = min(_pow2_at_least(C), INTERPRETER_BLOCK)
        block_r = (INTERPRETER_BLOCK if channels_last
                   else min(_pow2_at_least(HW), INTERPRETER_BLOCK))
    else:
        # Without 16-divisible rows (Triton specialises on that) a thread keeps one 64-bit
        # address per element instead of one per vector: halve the tile to stay well under
        # 128 registers.
        vectorized = (C if channels_last else HW) % 16 == 0
        tile = (2048 if vectorized else 1024) // (2 if elem == 8 else 1)
        min_block_c = max(1, 16 // elem)  # channels_last: one 16-byte vector
        if channels_last:
            block_c = min(_pow2_at_least(C), 64)
        else:
            block_r = _pick_block_hw(HW, tile)
            block_c = min(_pow2_at_least(C), max(1, tile // block_r))
        max_runs = max(1, math.isqrt(M // 32))
        # Narrower channel blocks when the runs alone cannot give enough programs.
        while (block_c > min_block_c and block_c > 1
               and triton.cdiv(C, block_c) * max_runs < target_programs):
            block_c //= 2
        if channels_last:
            block_r = max(1, tile // block_c)
    channel_blocks = triton.cdiv(C, block_c)
    if channels_last:
        row_tiles_per_n = 1
        num_row_tiles = triton.cdiv(M, block_r)
    else:
        row_tiles_per_n = triton.cdiv(HW, block_r)
        num_row_tiles = N * row_tiles_per_n
    if interpreter:
        tiles_per_program = min(2, num_row_tiles)
    else:
        runs = min(triton.cdiv(target_programs, channel_blocks), max_runs, num_row_tiles)
        tiles_per_program = triton.cdiv(num_row_tiles, runs)
    row_programs = triton.cdiv(num_row_tiles, tiles_per_program)
    if interpreter:
        partial_chunk = 4
    else:
        partial_chunk = min(_pow2_at_least(row_programs), max(1, 2048 // block_c))
    return BnActConfig(
        channels_last=channels_last, block_r=block_r, block_c=block_c,
        row_tiles_per_n=row_tiles_per_n, num_row_tiles=num_row_tiles,
        tiles_per_program=tiles_per_program, row_programs=row_programs,
        channel_blocks=channel_blocks, partial_chunk=partial_chunk,
        num_warps=1 if interpreter else 8,
    )


# --------------------------------------------------------------------------- launchers


def _launch(kernel, grid, num_warps, *args, **constexprs):
    kernel[grid](*args, **constexprs, num_warps=num_warps)


def _config_of(x: Tensor) -> BnActConfig:
    N, C, H, W = x.shape
    channels_last = not x.is_contiguous()  # dense: NCHW-contiguous or channels_last
    interpreter = x.device.type == "cpu"
    return _cached_config(N, C, H, W, channels_last, x.dtype, interpreter,
                          INTERPRETER_BLOCK if interpreter else 0,
                          _multiprocessors(x.device))


@functools.lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    """The number of SMs of a CUDA device; an H100's for other devices (the interpreter, the
    ahead-of-time checks)."""
    if device.type != "cuda":
        return _DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=1024)
def _cached_config(N, C, H, W, channels_last, dtype, interpreter, _interpreter_block,
                   multiprocessors):
    """pick_config, memoised per shape (it runs on every call, on the host); the interpreter's
    tile side is part of the key because tests change it."""
    return pick_config(N, C, H, W, channels_last, dtype, interpreter=interpreter,
                       multiprocessors=multiprocessors)


def _geometry(x: Tensor, cfg: BnActConfig):
    """(C, HW, M, row_tiles_per_n, num_row_tiles, tiles_per_program) kernel arguments."""
    N, C, H, W = x.shape
    return (C, H * W, N * H * W, cfg.row_tiles_per_n, cfg.num_row_tiles, cfg.tiles_per_program)


def launch_fwd_stats(x: Tensor, residual: Optional[Tensor], residual_bn: bool,
                     cfg: BnActConfig) -> Tensor:
    """Partial pivot-shifted sums [row programs, 2 or 4, C] of x (and the residual)."""
    num_sums = 4 if residual_bn else 2
    partials = torch.empty((cfg.row_programs, num_sums, x.shape[1]),
                           dtype=acc_dtype_of(x.dtype), device=x.device)
    _launch(bn_act_fwd_stats_kernel, cfg.grid, cfg.num_warps,
            x, residual if residual_bn else x, partials, *_geometry(x, cfg),
            CHANNELS_LAST=cfg.channels_last, RESIDUAL_BN=residual_bn,
            BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c)
    return partials


def launch_fwd_apply(x, weight, bias, running_mean, running_var, residual, residual_weight,
                     residual_bias, residual_running_mean, residual_running_var, residual_bn,
                     batch_stats, momentum, eps, relu, partials, cfg: BnActConfig):
    """(out, save_stats, new_running): normalise (+ residual) (+ ReLU)."""
    acc = acc_dtype_of(x.dtype)
    C = x.shape[1]
    branches = 2 if residual_bn else 1
    track = batch_stats and running_mean is not None
    out = torch.empty_like(x)
    save_stats = torch.empty((branches, 2, C), dtype=acc, device=x.device)
    new_running = (torch.empty((branches, 2, C), dtype=acc, device=x.device) if track
                   else x.new_empty(0, dtype=acc))
    # Pointers a configuration never reads are given as some valid tensor of the right dtype.
    running_mean = weight if running_mean is None else running_mean
    running_var = weight if running_var is None else running_var
    r_bn = residual_bn
    _launch(bn_act_fwd_apply_kernel, cfg.grid, cfg.num_warps,
            x, x if residual is None else residual, out, weight, bias,
            running_mean, running_var,
            residual_weight if r_bn else weight, residual_bias if r_bn else bias,
            residual_running_mean if r_bn and residual_running_mean is not None else running_mean,
            residual_running_var if r_bn and residual_running_var is not None else running_var,
            weight if partials is None else partials, save_stats,
            new_running if track else save_stats,
            *_geometry(x, cfg), 0 if partials is None else partials.shape[0],
            float(eps), float(momentum),
            CHANNELS_LAST=cfg.channels_last, RESIDUAL_MODE=residual_mode(residual, residual_bn),
            BATCH_STATS=batch_stats, TRACK_RUNNING=track, RELU=relu,
            BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, PARTIAL_CHUNK=cfg.partial_chunk)
    return out, save_stats, new_running


def launch_bwd_reduce(grad_out, x, weight, bias, residual, residual_weight, residual_bias,
                      save_stats, residual_bn, relu, cfg: BnActConfig) -> Tensor:
    """Partial sums [row programs, 2 or 3, C] of g, g*(x - mean)[, g*(r - r_mean)]."""
    num_sums = 3 if residual_bn else 2
    partials = torch.empty((cfg.row_programs, num_sums, x.shape[1]),
                           dtype=acc_dtype_of(x.dtype), device=x.device)
    _launch(bn_act_bwd_reduce_kernel, cfg.grid, cfg.num_warps,
            grad_out, x, x if residual is None else residual, weight, bias,
            residual_weight if residual_bn else weight, residual_bias if residual_bn else bias,
            save_stats, partials, *_geometry(x, cfg),
            CHANNELS_LAST=cfg.channels_last, RESIDUAL_MODE=residual_mode(residual, residual_bn),
            RELU=relu, BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c)
    return partials


def launch_bwd_apply(grad_out, x, weight, bias, residual, residual_weight, residual_bias,
                     save_stats, residual_bn, batch_stats, relu, partials, cfg: BnActConfig):
    """The six gradients of the interface from the reduce pass's partial sums."""
    acc = acc_dtype_of(x.dtype)
    C = x.shape[1]
    grad_input = torch.empty_like(x)
    grad_residual = torch.empty_like(x) if residual is not None else x.new_empty(0, dtype=acc)
    grad_weight = torch.empty(C, dtype=acc, device=x.device)
    grad_bias = torch.empty(C, dtype=acc, device=x.device)
    if residual_bn:
        grad_residual_weight = torch.empty(C, dtype=acc, device=x.device)
        grad_residual_bias = torch.empty(C, dtype=acc, device=x.device)
    else:
        grad_residual_weight = x.new_empty(0, dtype=acc)
        grad_residual_bias = x.new_empty(0, dtype=acc)
    _launch(bn_act_bwd_apply_kernel, cfg.grid, cfg.num_warps,
            grad_out, x, x if residual is None else residual,
            grad_input, grad_input if residual is None else grad_residual,
            weight, bias,
            residual_weight if residual_bn else weight, residual_bias if residual_bn else bias,
            save_stats, partials, grad_weight, grad_bias,
            grad_residual_weight if residual_bn else grad_weight,
            grad_residual_bias if residual_bn else grad_bias,
            *_geometry(x, cfg), partials.shape[0],
            CHANNELS_LAST=cfg.channels_last, RESIDUAL_MODE=residual_mode(residual, residual_bn),
            BATCH_STATS=batch_stats, RELU=relu,
            BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, PARTIAL_CHUNK=cfg.partial_chunk)
    return (grad_input, grad_weight, grad_bias, grad_residual, grad_residual_weight,
            grad_residual_bias)


# --------------------------------------------------------------------------- backend interface


def _on_device_of(x: Tensor):
    """Triton launches on the current CUDA device: make it x's (entering a device context only
    when it differs, as the context costs more host time than a small kernel's launch)."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def forward(x, weight, bias, running_mean, running_var, residual, residual_weight, residual_bias,
            residual_running_mean, residual_running_var, residual_bn, batch_stats, momentum, eps,
            relu):
    """(out, save_stats, new_running) of act(batch_norm(x) + r_term); see the module docstring."""
    cfg = _config_of(x)
    with _on_device_of(x):
        partials = launch_fwd_stats(x, residual, residual_bn, cfg) if batch_stats else None
        return launch_fwd_apply(x, weight, bias, running_mean, running_var, residual,
                                residual_weight, residual_bias, residual_running_mean,
                                residual_running_var, residual_bn, batch_stats, momentum, eps, relu,
                                partials, cfg)


def backward(grad_out, x, weight, bias, residual, residual_weight, residual_bias, save_stats,
             residual_bn, batch_stats, relu):
    """(grad_input, grad_weight, grad_bias, grad_residual, grad_residual_weight,
    grad_residual_bias) of forward, with its saved statistics."""
    cfg = _config_of(x)
    with _on_device_of(x):
        partials = launch_bwd_reduce(grad_out, x, weight, bias, residual, residual_weight,
                                     residual_bias, save_stats, residual_bn, relu, cfg)
        return launch_bwd_apply(grad_out, x, weight, bias, residual, residual_weight,
                                residual_bias, save_stats, residual_bn, batch_stats, relu, partials,
                                cfg)
