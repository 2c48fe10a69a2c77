// CUDA kernels of the fused BatchNorm (+ residual / + BatchNorm'ed residual) + ReLU op.
//
// Passes over memory, per activation element (the fewest the math allows without the conv):
//   training forward: statistics kernel (read x [, r]) + apply kernel (read x [, r], write out);
//   eval forward:     apply kernel alone;
//   backward:         sums kernel (read dy, x [, r]) + apply kernel (read dy, x [, r], write dx
//                     [, dr]).
// Every per-element and per-channel formula is csrc/bn_act_math.h, shared with the CPU kernels.
//
// Work decomposition. Both layouts are cut into (channel tile, split) blocks:
//   channels_last (element (m, c) at m*C + c): a tile is `tile_vectors` consecutive 16-byte
//     vectors of a row (64 channels at most); the block's threads form tile_vectors columns x
//     (256 / tile_vectors) rows, and walk the rows m of the tile's split. A thread keeps the same
//     channels for its whole walk, so their per-channel constants live in registers.
//   NCHW (element (n, c, hw) at (n*C + c)*HW + hw): a tile is one channel; its N*HW values are
//     vectorised along HW, and the 256 threads walk them in order (n, hw).
// Splits cut the tile's rows (items) into contiguous ranges, one per block in gridDim.y; the
// host sizes the grid from the shape, the multiprocessor count and the kernel's occupancy
// (plan_launch): one wave of blocks that fills every block slot of the device, each block
// streaming one long range with kUnroll independent 16-byte loads per input per thread.
//
// Reductions are deterministic: each block sums its range per channel (per-thread sums, then
// warp shuffles, then shared memory, in a fixed order) into a partials buffer
// [split][quantity][C] in the accumulation type; the apply kernel's prologue sums the partials
// of its tile's channels over the splits in a fixed order, finalises the per-channel constants,
// and blocks of split 0 write the per-channel outputs (save_stats, new_running, the weight and
// bias gradients) exactly once. No atomics, no third kernel.
//
// Statistics are sums shifted by a pivot, the channel's first element (x[0, c, 0, 0]):
// s1 = sum(x - pivot), s2 = sum((x - pivot)^2). All partials of a channel share the pivot, so
// merging them is plain addition, and the variance s2/m - (s1/m)^2 does not cancel for data
// whose mean is large against its spread.
#include "bn_act_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../bn_act_math.h"

namespace resnet_fast {
namespace cuda {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kVectorBytes = 16;
// Channels in a channels_last tile: 128 bytes of a bf16 row. Narrow tiles give more tiles and
// fewer splits, which keeps the apply prologue (splits x channels partials per block) short.
constexpr int kTileChannels = 64;
// Blocks a multiprocessor must be able to hold at once (__launch_bounds__): 2 caps registers at
// 128 per thread, so a kernel keeps at least 16 warps per multiprocessor. Ops whose per-channel
// constants and sums alone need most of that (the BatchNorm'ed residual's backward) ask for 1.
constexpr int kMinResidentBlocks = 2;
constexpr int kMaxGridY = 65535;
// A split gives each thread at least this many items (vectors), so short tensors are not cut
// into blocks that do little but their prologue.
constexpr int kMinItemsPerThread = 4;

enum ResidualMode { kNoResidual, kAddResidual, kBatchNormResidual };

// ------------------------------------------------------------------ element types

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_acc(acc_type<T> v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// V consecutive elements moved as one aligned access (16 bytes when vectorised, else one).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T lane[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* base, int64_t vec) {
  return reinterpret_cast<const Pack<T, V>*>(base)[vec];
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* base, int64_t vec, const Pack<T, V>& p) {
  reinterpret_cast<Pack<T, V>*>(base)[vec] = p;
}

// ------------------------------------------------------------------ geometry

// One launch's decomposition (see the top of the file); the same for every block.
struct TileGeometry {
  int64_t items;        // per tile: channels_last rows M = N*HW; NCHW vectors N*HW/V
  int64_t channels;     // C
  int64_t row_vectors;  // vectors per row: channels_last C/V; NCHW HW/V (a plane of (n, c))
  int tile_vectors;     // threads along channels (a power of two); 1 for NCHW
};

// Where one thread sits in its block's tile.
struct ThreadTile {
  int columns;          // threads along channels (tile_vectors)
  int rows;             // threads along items, kBlockThreads / columns
  int column;
  int row;
  int64_t vector_col;   // channels_last: the thread's vector within a row
  int64_t channel;      // the thread's first channel
  bool active;          // false past the last channel of a partial channels_last tile
};

template <bool kChannelsLast, int V>
__device__ __forceinline__ ThreadTile thread_tile(const TileGeometry& geo) {
  ThreadTile t;
  t.columns = geo.tile_vectors;
  t.rows = kBlockThreads / t.columns;
  t.column = threadIdx.x & (t.columns - 1);
  t.row = threadIdx.x / t.columns;
  if constexpr (kChannelsLast) {
    t.vector_col = static_cast<int64_t>(blockIdx.x) * t.columns + t.column;
    t.channel = t.vector_col * V;
    t.active = t.vector_col < geo.row_vectors;
  } else {
    t.vector_col = 0;
    t.channel = blockIdx.x;
    t.active = true;
  }
  return t;
}

// Vector index of a thread's current item, stepped `rows` items at a time.
template <bool kChannelsLast>
struct ElementCursor;

template <>
struct ElementCursor<true> {  // item = row m: vector m * row_vectors + vector_col
  int64_t vec;
  int64_t step;
  __device__ ElementCursor(const TileGeometry& geo, const ThreadTile& t, int64_t item)
      : vec(item * geo.row_vectors + t.vector_col), step(t.rows * geo.row_vectors) {}
  __device__ int64_t vector() const { return vec; }
  __device__ void advance() { vec += step; }
};

template <>
struct ElementCursor<false> {  // item = n * HWV + hw: vector (n*C + c) * HWV + hw
  int64_t plane;       // (n*C + c) * HWV
  int64_t hw;
  int64_t hw_step;     // rows % HWV
  int64_t plane_step;  // (rows / HWV) * C * HWV
  int64_t plane_stride;  // C * HWV: the next n
  int64_t plane_vectors;  // HWV
  __device__ ElementCursor(const TileGeometry& geo, const ThreadTile& t, int64_t item)
      : plane_stride(geo.channels * geo.row_vectors), plane_vectors(geo.row_vectors) {
    plane = (item / plane_vectors) * plane_stride + t.channel * plane_vectors;
    hw = item % plane_vectors;
    hw_step = t.rows % plane_vectors;
    plane_step = (t.rows / plane_vectors) * plane_stride;
  }
  __device__ int64_t vector() const { return plane + hw; }
  __device__ void advance() {
    hw += hw_step;
    plane += plane_step;
    if (hw >= plane_vectors) {
      hw -= plane_vectors;
      plane += plane_stride;
    }
  }
};

// Calls body(packs, vec) for every item of this thread in its block's split, packs holding the
// op's inputs at vector vec (a null input reads as zeros). Loads for kUnroll items are issued
// before the first is used.
template <int V, bool kChannelsLast, int kUnroll, int kInputs, typename T, typename Body>
__device__ __forceinline__ void for_each_item(const TileGeometry& geo, const ThreadTile& t,
                                              const T* const (&input)[kInputs], Body&& body) {
  const int64_t begin = geo.items * blockIdx.y / gridDim.y;
  const int64_t end = geo.items * (blockIdx.y + 1) / gridDim.y;
  ElementCursor<kChannelsLast> cursor(geo, t, begin + t.row);
  for (int64_t item = begin + t.row; item < end; item += kUnroll * t.rows) {
    Pack<T, V> packs[kUnroll][kInputs];
    int64_t vecs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      vecs[u] = cursor.vector();
      if (item + u * t.rows < end) {
#pragma unroll
        for (int j = 0; j < kInputs; ++j) {
          packs[u][j] = input[j] != nullptr ? load_pack<T, V>(input[j], vecs[u]) : Pack<T, V>{};
        }
      }
      cursor.advance();
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (item + u * t.rows < end) body(packs[u], vecs[u]);
    }
  }
}

// Threads t = row * width + column (width a power of two <= kBlockThreads): sums vals over the
// rows of each column. On return smem[column * kVals + v] holds the sums, for every thread.
// smem holds kBlockThreads * kVals values. The order of the additions is fixed.
template <int kVals, typename acc_t>
__device__ __forceinline__ void sum_block_columns(acc_t (&vals)[kVals], int width, acc_t* smem) {
  const int t = threadIdx.x;
  const int lane = t % kWarpSize;
  // Rows of a column inside one warp are `width` lanes apart: a butterfly over those lanes.
  for (int offset = kWarpSize / 2; offset >= width; offset /= 2) {
#pragma unroll
    for (int v = 0; v < kVals; ++v) vals[v] += __shfl_xor_sync(0xffffffffu, vals[v], offset);
  }
  // One value per column and group of threads (a warp when width < 32, else a row) ...
  const int group_width = width < kWarpSize ? kWarpSize : width;
  const int groups = kBlockThreads / group_width;
  if (width >= kWarpSize || lane < width) {
    const int slot = (t / group_width) * width + (t % width);
#pragma unroll
    for (int v = 0; v < kVals; ++v) smem[slot * kVals + v] = vals[v];
  }
  __syncthreads();
  // ... then the groups are added in order, in place into group 0's slots.
  for (int i = t; i < width * kVals; i += kBlockThreads) {
    acc_t s = smem[i];
    for (int g = 1; g < groups; ++g) s += smem[g * width * kVals + i];
    smem[i] = s;
  }
  __syncthreads();
}

// ------------------------------------------------------------------ element ops
//
// An op describes one pass: its inputs and outputs (activation pointers, null = not read or
// not written), the per-channel constants of a thread (Channel), and the per-element math;
// kUnroll (items whose loads are in flight together) and kMinBlocks (see kMinResidentBlocks)
// keep its kernels within their registers without spilling.
// Reduce ops give load_channel(c) and accumulate(); apply ops give finalize(c, totals, write)
// and apply(). kQuantities: per-channel sums a reduce op produces / an apply op consumes.

// mean and scale (w * invstd) of each BatchNorm branch of one channel and their one bias (b,
// plus the residual's when it is BatchNorm'ed), and the pre-activation
// act_in = (x - mean) * scale + bias + r_term that the output and the ReLU mask are computed from.
template <int kMode, typename acc_t>
struct ChannelAffine {
  static constexpr int kBranches = kMode == kBatchNormResidual ? 2 : 1;
  acc_t mean[kBranches];
  acc_t scale[kBranches];
  acc_t bias;

  // Branch 0 first: it sets the bias, branch 1 adds to it.
  __device__ __forceinline__ void set(int b, acc_t mean_b, acc_t invstd, acc_t w, acc_t bias_b) {
    mean[b] = mean_b;
    scale[b] = w * invstd;
    bias = b == 0 ? bias_b : bias + bias_b;
  }
  __device__ __forceinline__ acc_t pre_activation(acc_t x, acc_t r) const {
    acc_t y = bn_centered(x, mean[0], scale[0]) + bias;
    if constexpr (kMode == kAddResidual) y = y + r;
    if constexpr (kMode == kBatchNormResidual) y = y + bn_centered(r, mean[1], scale[1]);
    return y;
  }
};

// Training forward, pass 1: s1 = sum(x - pivot), s2 = sum((x - pivot)^2) per channel, and the
// same for the residual when it is BatchNorm'ed. Inputs: x [, r].
template <typename T, bool kResidualBN>
struct ForwardStatsOp {
  using scalar_t = T;
  using acc_t = acc_type<T>;
  static constexpr int kInputs = kResidualBN ? 2 : 1;
  static constexpr int kQuantities = 2 * kInputs;
  static constexpr int kUnroll = kResidualBN ? 2 : 4;
  static constexpr int kMinBlocks = kMinResidentBlocks;
  struct Channel {
    acc_t pivot[kInputs];
  };

  const T* input[kInputs];
  int64_t pivot_stride;  // offset of channel c's first element: c * pivot_stride

  __device__ __forceinline__ Channel load_channel(int64_t c) const {
    Channel ch;
#pragma unroll
    for (int b = 0; b < kInputs; ++b) ch.pivot[b] = bn_pivot(to_acc(input[b][c * pivot_stride]));
    return ch;
  }
  __device__ __forceinline__ void accumulate(const Channel& ch, const acc_t (&v)[kInputs],
                                             acc_t* acc) const {
#pragma unroll
    for (int b = 0; b < kInputs; ++b) {
      const acc_t d = v[b] - ch.pivot[b];
      acc[2 * b] += d;
      acc[2 * b + 1] += d * d;
    }
  }
};

// Forward, elementwise pass: out = act((x - mean) * scale + bias + r_term). Its prologue turns
// the shifted sums (batch_stats) or the running statistics (otherwise) into mean/invstd, writes
// save_stats and new_running, and gives each channel its mean, scale and bias. Inputs: x [, r];
// output: out.
template <typename T, int kMode>
struct ForwardApplyOp {
  using scalar_t = T;
  using acc_t = acc_type<T>;
  using Channel = ChannelAffine<kMode, acc_t>;
  static constexpr int kBranches = Channel::kBranches;
  static constexpr int kInputs = kMode == kNoResidual ? 1 : 2;
  static constexpr int kOutputs = 1;
  static constexpr int kQuantities = 2 * kBranches;
  // Three for the BatchNorm'ed residual: two branches' constants fill more registers.
  static constexpr int kUnroll = kMode == kBatchNormResidual ? 3 : 4;
  static constexpr int kMinBlocks = kMinResidentBlocks;

  const T* input[kInputs];
  T* output[kOutputs];
  // Per branch (x, then the BatchNorm'ed residual): (C,) arrays.
  const acc_t* weight[kBranches];
  const acc_t* bias[kBranches];
  const acc_t* running_mean[kBranches];  // null with batch_stats when not tracked
  const acc_t* running_var[kBranches];
  acc_t* save_stats;   // (B, 2, C)
  acc_t* new_running;  // (B, 2, C), null unless batch_stats and tracked
  int64_t channels;
  int64_t pivot_stride;
  acc_t m;  // values per channel, N*HW
  acc_t eps;
  acc_t momentum;
  bool batch_stats;
  bool relu;

  __device__ __forceinline__ Channel finalize(int64_t c, const acc_t* totals,
                                              bool write_outputs) const {
    Channel ch;
#pragma unroll
    for (int b = 0; b < kBranches; ++b) {
      acc_t mean, invstd;
      if (batch_stats) {
        acc_t var;
        const acc_t pivot = bn_pivot(to_acc(input[b][c * pivot_stride]));
        bn_stats_from_shifted_sums(m, totals[2 * b], totals[2 * b + 1], pivot, eps, &mean, &var,
                                   &invstd);
        if (write_outputs && new_running != nullptr) {
          acc_t r_mean = running_mean[b][c];
          acc_t r_var = running_var[b][c];
          bn_running_update(m, mean, var, momentum, &r_mean, &r_var);
          new_running[(2 * b) * channels + c] = r_mean;
          new_running[(2 * b + 1) * channels + c] = r_var;
        }
      } else {
        mean = running_mean[b][c];
        invstd = bn_invstd(running_var[b][c], eps);
      }
      if (write_outputs) {
        save_stats[(2 * b) * channels + c] = mean;
        save_stats[(2 * b + 1) * channels + c] = invstd;
      }
      ch.set(b, mean, invstd, weight[b][c], bias[b][c]);
    }
    return ch;
  }
  __device__ __forceinline__ void apply(const Channel& ch, const acc_t (&v)[kInputs],
                                        acc_t (&out)[kOutputs]) const {
    const acc_t y = ch.pre_activation(v[0], kInputs > 1 ? v[kInputs - 1] : acc_t(0));
    out[0] = relu ? relu_value(y) : y;
  }
};

// The parts of both backward passes: inputs dy, x [, r], the ReLU-masked gradient
// g = dy * [not act_in <= 0], and mean/invstd/scale/bias of a channel from save_stats.
template <typename T, int kMode>
struct BackwardOpBase {
  using scalar_t = T;
  using acc_t = acc_type<T>;
  static constexpr int kBranches = ChannelAffine<kMode, acc_t>::kBranches;
  static constexpr int kInputs = kMode == kNoResidual ? 2 : 3;
  static constexpr int kQuantities = 1 + kBranches;  // sum(g), sum(g * (x - mean)) [, of r]
  static constexpr int kUnroll = 2;
  static constexpr int kMinBlocks = kMode == kBatchNormResidual ? 1 : kMinResidentBlocks;

  // dy, x [, r]; r is null where nothing reads it (plain add without ReLU).
  const T* input[kInputs];
  const acc_t* weight[kBranches];
  const acc_t* bias[kBranches];
  const acc_t* save_stats;  // (B, 2, C): mean, invstd per branch
  int64_t channels;
  bool relu;

  // Sets branch b of channel c in affine from save_stats, weight and bias; returns its invstd.
  __device__ __forceinline__ acc_t load_branch(int b, int64_t c,
                                               ChannelAffine<kMode, acc_t>& affine) const {
    const acc_t mean = save_stats[(2 * b) * channels + c];
    const acc_t invstd = save_stats[(2 * b + 1) * channels + c];
    affine.set(b, mean, invstd, weight[b][c], bias[b][c]);
    return invstd;
  }
  static __device__ __forceinline__ acc_t residual_of(const acc_t (&v)[kInputs]) {
    return kInputs > 2 ? v[kInputs - 1] : acc_t(0);
  }
  __device__ __forceinline__ acc_t masked_grad(const ChannelAffine<kMode, acc_t>& affine,
                                               const acc_t (&v)[kInputs]) const {
    return relu ? relu_grad(affine.pre_activation(v[1], residual_of(v)), v[0]) : v[0];
  }
};

// Backward, pass 1: sum(g), sum(g * (x - mean)) [, sum(g * (r - r_mean))] per channel.
template <typename T, int kMode>
struct BackwardSumsOp : BackwardOpBase<T, kMode> {
  using Base = BackwardOpBase<T, kMode>;
  using typename Base::acc_t;
  using Base::kInputs;
  using Channel = ChannelAffine<kMode, acc_t>;

  __device__ __forceinline__ Channel load_channel(int64_t c) const {
    Channel ch;
#pragma unroll
    for (int b = 0; b < Channel::kBranches; ++b) this->load_branch(b, c, ch);
    return ch;
  }
  __device__ __forceinline__ void accumulate(const Channel& ch, const acc_t (&v)[kInputs],
                                             acc_t* acc) const {
    const acc_t g = this->masked_grad(ch, v);
    acc[0] += g;
    acc[1] += g * (v[1] - ch.mean[0]);
    if constexpr (kMode == kBatchNormResidual) acc[2] += g * (this->residual_of(v) - ch.mean[1]);
  }
};

// Backward, elementwise pass: dx = ((g - mean_g) - (x - mean)*invstd*mean_gxhat) * scale, and
// the residual's gradient (g for a plain add, the same form with its own coefficients when
// BatchNorm'ed). Its
// prologue writes the weight and bias gradients. Outputs: dx [, dr].
template <typename T, int kMode>
struct BackwardApplyOp : BackwardOpBase<T, kMode> {
  using Base = BackwardOpBase<T, kMode>;
  using typename Base::acc_t;
  using Base::kBranches;
  using Base::kInputs;
  static constexpr int kOutputs = kMode == kNoResidual ? 1 : 2;
  struct Channel {
    ChannelAffine<kMode, acc_t> affine;  // its mean and scale w * invstd
    acc_t invstd[kBranches];
    acc_t mean_g[kBranches];
    acc_t mean_gxhat[kBranches];
  };

  T* output[kOutputs];
  acc_t* grad_weight[kBranches];
  acc_t* grad_bias[kBranches];
  acc_t m;
  bool batch_stats;

  __device__ __forceinline__ Channel finalize(int64_t c, const acc_t* totals,
                                              bool write_outputs) const {
    Channel ch;
    const acc_t sum_g = totals[0];
#pragma unroll
    for (int b = 0; b < kBranches; ++b) {
      const acc_t invstd = this->load_branch(b, c, ch.affine);
      const acc_t sum_gc = totals[1 + b];
      bn_backward_coeffs(m, sum_g, sum_gc, invstd, batch_stats, &ch.mean_g[b],
                         &ch.mean_gxhat[b]);
      ch.invstd[b] = invstd;
      if (write_outputs) {
        grad_weight[b][c] = bn_weight_grad(sum_gc, invstd);
        grad_bias[b][c] = sum_g;
      }
    }
    return ch;
  }
  __device__ __forceinline__ void apply(const Channel& ch, const acc_t (&v)[kInputs],
                                        acc_t (&out)[kOutputs]) const {
    const acc_t g = this->masked_grad(ch.affine, v);
    out[0] = bn_input_grad(batch_stats, g, v[1], ch.affine.mean[0], ch.invstd[0],
                           ch.affine.scale[0], ch.mean_g[0], ch.mean_gxhat[0]);
    if constexpr (kMode == kAddResidual) out[kOutputs - 1] = g;
    if constexpr (kMode == kBatchNormResidual) {
      out[kOutputs - 1] =
          bn_input_grad(batch_stats, g, this->residual_of(v), ch.affine.mean[1], ch.invstd[1],
                        ch.affine.scale[1], ch.mean_g[1], ch.mean_gxhat[1]);
    }
  }
};

// ------------------------------------------------------------------ kernels

// Per-channel sums of Op's quantities over each split: partials[split][quantity][C].
template <class Op, int V, bool kChannelsLast>
__global__ void __launch_bounds__(kBlockThreads, Op::kMinBlocks)
    channel_reduce_kernel(const Op op, const TileGeometry geo,
                          typename Op::acc_t* __restrict__ partials) {
  using T = typename Op::scalar_t;
  using acc_t = typename Op::acc_t;
  constexpr int K = Op::kQuantities;
  constexpr int kSlots = kChannelsLast ? V : 1;  // channels a thread sums
  constexpr int kVals = kSlots * K;
  __shared__ acc_t smem[kBlockThreads * kVals];

  const ThreadTile t = thread_tile<kChannelsLast, V>(geo);
  acc_t acc[kVals] = {};
  if (t.active) {
    typename Op::Channel ch[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) ch[s] = op.load_channel(t.channel + s);
    for_each_item<V, kChannelsLast, Op::kUnroll>(
        geo, t, op.input, [&](const Pack<T, V> (&packs)[Op::kInputs], int64_t) {
#pragma unroll
          for (int l = 0; l < V; ++l) {
            acc_t v[Op::kInputs];
#pragma unroll
            for (int j = 0; j < Op::kInputs; ++j) v[j] = to_acc(packs[j].lane[l]);
            const int s = kChannelsLast ? l : 0;
            op.accumulate(ch[s], v, acc + s * K);
          }
        });
  }
  sum_block_columns(acc, t.columns, smem);
  for (int i = threadIdx.x; i < t.columns * kVals; i += kBlockThreads) {
    const int column = i / kVals;
    const int k = i % K;
    const int64_t c = kChannelsLast
                          ? (static_cast<int64_t>(blockIdx.x) * t.columns + column) * V +
                                (i / K) % kSlots
                          : static_cast<int64_t>(blockIdx.x);
    if (c < geo.channels) {
      partials[(static_cast<int64_t>(blockIdx.y) * K + k) * geo.channels + c] = smem[i];
    }
  }
}

// Elementwise pass. Prologue: the tile's per-channel totals over the `partial_splits` splits of
// a reduce kernel (none in eval forward), Op::finalize per channel (writing the per-channel
// outputs from split 0's blocks), the constants into shared memory and then registers.
template <class Op, int V, bool kChannelsLast>
__global__ void __launch_bounds__(kBlockThreads, Op::kMinBlocks)
    channel_apply_kernel(const Op op, const TileGeometry geo,
                         const typename Op::acc_t* __restrict__ partials, int partial_splits) {
  using T = typename Op::scalar_t;
  using acc_t = typename Op::acc_t;
  using Channel = typename Op::Channel;
  constexpr int K = Op::kQuantities;
  constexpr int kSlots = kChannelsLast ? V : 1;
  __shared__ acc_t smem[kBlockThreads * K];
  __shared__ Channel tile_channels[kChannelsLast ? kTileChannels : 1];

  const ThreadTile t = thread_tile<kChannelsLast, V>(geo);
  const int width = kChannelsLast ? t.columns * V : 1;  // channels of the tile
  const int64_t first_channel = kChannelsLast ? static_cast<int64_t>(blockIdx.x) * width
                                              : static_cast<int64_t>(blockIdx.x);
  if (partial_splits > 0) {
    // Thread (lane, j) sums splits lane, lane + lanes, ... of channel first_channel + j.
    const int j = threadIdx.x & (width - 1);
    const int lanes = kBlockThreads / width;
    acc_t totals[K] = {};
    if (first_channel + j < geo.channels) {
      const acc_t* p = partials + first_channel + j;
#pragma unroll 4
      for (int s = threadIdx.x / width; s < partial_splits; s += lanes) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          totals[k] += p[(static_cast<int64_t>(s) * K + k) * geo.channels];
        }
      }
    }
    sum_block_columns(totals, width, smem);
  }
  if (threadIdx.x < width && first_channel + threadIdx.x < geo.channels) {
    tile_channels[threadIdx.x] =
        op.finalize(first_channel + threadIdx.x, smem + threadIdx.x * K, blockIdx.y == 0);
  }
  __syncthreads();
  if (!t.active) return;

  Channel ch[kSlots];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) ch[s] = tile_channels[kChannelsLast ? t.column * V + s : 0];
  for_each_item<V, kChannelsLast, Op::kUnroll>(
      geo, t, op.input, [&](const Pack<T, V> (&packs)[Op::kInputs], int64_t vec) {
        Pack<T, V> results[Op::kOutputs];
#pragma unroll
        for (int l = 0; l < V; ++l) {
          acc_t v[Op::kInputs];
#pragma unroll
          for (int j = 0; j < Op::kInputs; ++j) v[j] = to_acc(packs[j].lane[l]);
          acc_t out[Op::kOutputs];
          op.apply(ch[kChannelsLast ? l : 0], v, out);
#pragma unroll
          for (int q = 0; q < Op::kOutputs; ++q) results[q].lane[l] = from_acc<T>(out[q]);
        }
#pragma unroll
        for (int q = 0; q < Op::kOutputs; ++q) {
          if (op.output[q] != nullptr) store_pack(op.output[q], vec, results[q]);
        }
      });
}

// ------------------------------------------------------------------ launch planning

struct LaunchPlan {
  TileGeometry geo;
  dim3 grid;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// Elements per vector: 16 bytes' worth when the vectorised dimension (C for channels_last, HW
// for NCHW) is a multiple of it and every activation pointer is 16-byte aligned, else 1.
int vector_width(const ActivationShape& s, int elem_size, std::initializer_list<const void*> ptrs) {
  const int v = kVectorBytes / elem_size;
  if ((s.channels_last ? s.C : s.HW) % v != 0) return 1;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % kVectorBytes != 0) return 1;
  }
  return v;
}

// Grid of a pass: channel tiles x splits of the items. The splits fill the device's block
// slots (sm_count x resident blocks) once: one wave, each block streaming one long range, and
// no second, partial wave that would leave most multiprocessors idle. Tiles beyond the slots
// get one split each; a split keeps at least kMinItemsPerThread items per thread.
LaunchPlan plan_launch(const ActivationShape& s, int V, int sm_count, int resident_per_sm) {
  LaunchPlan plan;
  TileGeometry& geo = plan.geo;
  geo.channels = s.C;
  int64_t tiles;
  if (s.channels_last) {
    geo.row_vectors = s.C / V;
    geo.items = s.N * s.HW;
    geo.tile_vectors = static_cast<int>(
        std::min<int64_t>(next_pow2(geo.row_vectors), std::max(1, kTileChannels / V)));
    tiles = ceil_div(geo.row_vectors, geo.tile_vectors);
  } else {
    geo.row_vectors = s.HW / V;
    geo.items = s.N * geo.row_vectors;
    geo.tile_vectors = 1;
    tiles = s.C;
  }
  const int64_t rows = kBlockThreads / geo.tile_vectors;
  const int64_t slots =
      static_cast<int64_t>(std::max(sm_count, 1)) * std::max(resident_per_sm, 1);
  const int64_t most = ceil_div(geo.items, rows * kMinItemsPerThread);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({slots / tiles, most, kMaxGridY}));
  plan.grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  return plan;
}

// plan_launch for `kernel`, with the blocks of it one multiprocessor holds at once.
template <typename Kernel>
cudaError_t plan_kernel(Kernel kernel, const ActivationShape& s, int V, int sm_count,
                        LaunchPlan* plan) {
  int resident = 0;
  const cudaError_t err =
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kBlockThreads, 0);
  if (err != cudaSuccess) return err;
  *plan = plan_launch(s, V, sm_count, resident);
  return cudaSuccess;
}

// Partials of a reduce kernel's plan: [split][quantity][C] in the accumulation type.
template <class Op>
size_t partials_bytes(const LaunchPlan& plan, int64_t channels) {
  return static_cast<size_t>(plan.grid.y) * Op::kQuantities * channels *
         sizeof(typename Op::acc_t);
}

// Scratch for the partials of reduce op Op's kernel variant; 0 where it cannot be planned (the
// launch then meets the same error).
template <class Op, int V, bool kChannelsLast>
size_t reduce_scratch_bytes(std::integral_constant<int, V>,
                            std::integral_constant<bool, kChannelsLast>, const ActivationShape& s,
                            int sm_count) {
  LaunchPlan plan;
  const cudaError_t err =
      plan_kernel(channel_reduce_kernel<Op, V, kChannelsLast>, s, V, sm_count, &plan);
  return err == cudaSuccess ? partials_bytes<Op>(plan, s.C) : 0;
}

// Launches reduce op `op` into partials (scratch_bytes of them at most); *splits: the splits
// of its grid, whose partials an apply kernel sums.
template <class Op, int V, bool kChannelsLast>
cudaError_t launch_reduce(const Op& op, std::integral_constant<int, V>,
                          std::integral_constant<bool, kChannelsLast>, const ActivationShape& s,
                          int sm_count, typename Op::acc_t* partials, size_t scratch_bytes,
                          cudaStream_t stream, int* splits) {
  const auto kernel = channel_reduce_kernel<Op, V, kChannelsLast>;
  LaunchPlan plan;
  const cudaError_t err = plan_kernel(kernel, s, V, sm_count, &plan);
  if (err != cudaSuccess) return err;
  if (partials_bytes<Op>(plan, s.C) > scratch_bytes) return cudaErrorInvalidValue;
  kernel<<<plan.grid, kBlockThreads, 0, stream>>>(op, plan.geo, partials);
  *splits = static_cast<int>(plan.grid.y);
  return cudaGetLastError();
}

// Launches apply op `op` with the partials of `partial_splits` splits (none in eval forward).
template <class Op, int V, bool kChannelsLast>
cudaError_t launch_apply(const Op& op, std::integral_constant<int, V>,
                         std::integral_constant<bool, kChannelsLast>, const ActivationShape& s,
                         int sm_count, const typename Op::acc_t* partials, int partial_splits,
                         cudaStream_t stream) {
  const auto kernel = channel_apply_kernel<Op, V, kChannelsLast>;
  LaunchPlan plan;
  const cudaError_t err = plan_kernel(kernel, s, V, sm_count, &plan);
  if (err != cudaSuccess) return err;
  kernel<<<plan.grid, kBlockThreads, 0, stream>>>(op, plan.geo, partials, partial_splits);
  return cudaGetLastError();
}

// dst[b]: the (C,) array of BatchNorm branch b, x's then (a second branch) the residual's.
template <typename P, int kBranches, typename Src>
void set_branches(P* (&dst)[kBranches], Src x_branch, Src residual_branch) {
  const Src src[2] = {x_branch, residual_branch};
  for (int b = 0; b < kBranches; ++b) dst[b] = static_cast<P*>(src[b]);
}

int64_t values_per_channel(const ActivationShape& s) { return s.N * s.HW; }

ResidualMode residual_mode(const void* residual, bool residual_bn) {
  if (residual == nullptr) return kNoResidual;
  return residual_bn ? kBatchNormResidual : kAddResidual;
}

// Calls f(std::integral_constant<int, V>, std::integral_constant<bool, channels_last>,
// std::integral_constant<int, mode>) so each combination is its own kernel.
template <typename T, typename F>
auto dispatch_variant(int vec, bool channels_last, ResidualMode mode, F&& f) {
  constexpr int kVec = kVectorBytes / sizeof(T);
  auto with_mode = [&](auto v_c, auto cl_c) {
    switch (mode) {
      case kNoResidual: return f(v_c, cl_c, std::integral_constant<int, kNoResidual>{});
      case kAddResidual: return f(v_c, cl_c, std::integral_constant<int, kAddResidual>{});
      default: return f(v_c, cl_c, std::integral_constant<int, kBatchNormResidual>{});
    }
  };
  auto with_layout = [&](auto v_c) {
    return channels_last ? with_mode(v_c, std::true_type{}) : with_mode(v_c, std::false_type{});
  };
  return vec == kVec ? with_layout(std::integral_constant<int, kVec>{})
                     : with_layout(std::integral_constant<int, 1>{});
}

// Calls f(T{}) with the element type of `kind`.
template <typename F>
auto dispatch_dtype(ScalarKind kind, F&& f) {
  switch (kind) {
    case ScalarKind::kHalf: return f(__half{});
    case ScalarKind::kBFloat16: return f(__nv_bfloat16{});
    case ScalarKind::kFloat: return f(float{});
    default: return f(double{});
  }
}

// ------------------------------------------------------------------ forward

template <typename T, int kMode>
using ForwardStatsOpFor = ForwardStatsOp<T, kMode == kBatchNormResidual>;

// Calls f(V, channels_last, mode) (integral constants) for the forward's kernel variant.
template <typename T, typename F>
auto dispatch_forward(const BnActForwardParams& p, F&& f) {
  return dispatch_variant<T>(vector_width(p.shape, sizeof(T), {p.x, p.residual, p.out}),
                             p.shape.channels_last, residual_mode(p.residual, p.residual_bn), f);
}

template <typename T>
size_t forward_scratch_bytes(const BnActForwardParams& p) {
  if (!p.batch_stats) return 0;
  return dispatch_forward<T>(p, [&](auto v_c, auto cl_c, auto mode_c) {
    return reduce_scratch_bytes<ForwardStatsOpFor<T, decltype(mode_c)::value>>(
        v_c, cl_c, p.shape, p.sm_count);
  });
}

template <typename T>
cudaError_t forward_launch(const BnActForwardParams& p, void* scratch, size_t scratch_bytes,
                           cudaStream_t stream) {
  using acc_t = acc_type<T>;
  const ActivationShape& s = p.shape;
  const T* x = static_cast<const T*>(p.x);
  const T* r = static_cast<const T*>(p.residual);
  const int64_t pivot_stride = s.channels_last ? 1 : s.HW;
  acc_t* partials = static_cast<acc_t*>(scratch);
  return dispatch_forward<T>(p, [&](auto v_c, auto cl_c, auto mode_c) -> cudaError_t {
    constexpr int kMode = decltype(mode_c)::value;
    int partial_splits = 0;
    if (p.batch_stats) {
      using StatsOp = ForwardStatsOpFor<T, kMode>;
      StatsOp op{};
      op.input[0] = x;
      if constexpr (StatsOp::kInputs > 1) op.input[1] = r;
      op.pivot_stride = pivot_stride;
      const cudaError_t err = launch_reduce(op, v_c, cl_c, s, p.sm_count, partials,
                                            scratch_bytes, stream, &partial_splits);
      if (err != cudaSuccess) return err;
    }
    using ApplyOp = ForwardApplyOp<T, kMode>;
    ApplyOp op{};
    op.input[0] = x;
    if constexpr (ApplyOp::kInputs > 1) op.input[1] = r;
    op.output[0] = static_cast<T*>(p.out);
    set_branches(op.weight, p.weight, p.residual_weight);
    set_branches(op.bias, p.bias, p.residual_bias);
    set_branches(op.running_mean, p.running_mean, p.residual_running_mean);
    set_branches(op.running_var, p.running_var, p.residual_running_var);
    op.save_stats = static_cast<acc_t*>(p.save_stats);
    op.new_running = p.batch_stats ? static_cast<acc_t*>(p.new_running) : nullptr;
    op.channels = s.C;
    op.pivot_stride = pivot_stride;
    op.m = static_cast<acc_t>(values_per_channel(s));
    op.eps = static_cast<acc_t>(p.eps);
    op.momentum = static_cast<acc_t>(p.momentum);
    op.batch_stats = p.batch_stats;
    op.relu = p.relu;
    return launch_apply(op, v_c, cl_c, s, p.sm_count, partials, partial_splits, stream);
  });
}

// ------------------------------------------------------------------ backward

// Calls f(V, channels_last, mode) (integral constants) for the backward's kernel variant.
template <typename T, typename F>
auto dispatch_backward(const BnActBackwardParams& p, F&& f) {
  return dispatch_variant<T>(
      vector_width(p.shape, sizeof(T),
                   {p.grad_out, p.x, p.residual, p.grad_input, p.grad_residual}),
      p.shape.channels_last, residual_mode(p.residual, p.residual_bn), f);
}

template <typename T>
size_t backward_scratch_bytes(const BnActBackwardParams& p) {
  return dispatch_backward<T>(p, [&](auto v_c, auto cl_c, auto mode_c) {
    return reduce_scratch_bytes<BackwardSumsOp<T, decltype(mode_c)::value>>(
        v_c, cl_c, p.shape, p.sm_count);
  });
}

// Fills the parts the two backward ops share.
template <typename Op>
void fill_backward_base(Op& op, const BnActBackwardParams& p) {
  using acc_t = typename Op::acc_t;
  using T = typename Op::scalar_t;
  op.input[0] = static_cast<const T*>(p.grad_out);
  op.input[1] = static_cast<const T*>(p.x);
  // The residual is read for the ReLU mask and for the BatchNorm'ed residual's sums.
  if constexpr (Op::kInputs > 2) {
    op.input[2] = (p.relu || p.residual_bn) ? static_cast<const T*>(p.residual) : nullptr;
  }
  set_branches(op.weight, p.weight, p.residual_weight);
  set_branches(op.bias, p.bias, p.residual_bias);
  op.save_stats = static_cast<const acc_t*>(p.save_stats);
  op.channels = p.shape.C;
  op.relu = p.relu;
}

template <typename T>
cudaError_t backward_launch(const BnActBackwardParams& p, void* scratch, size_t scratch_bytes,
                            cudaStream_t stream) {
  using acc_t = acc_type<T>;
  const ActivationShape& s = p.shape;
  acc_t* partials = static_cast<acc_t*>(scratch);
  return dispatch_backward<T>(p, [&](auto v_c, auto cl_c, auto mode_c) -> cudaError_t {
    constexpr int kMode = decltype(mode_c)::value;
    BackwardSumsOp<T, kMode> sums{};
    fill_backward_base(sums, p);
    int sum_splits = 0;
    const cudaError_t err = launch_reduce(sums, v_c, cl_c, s, p.sm_count, partials,
                                          scratch_bytes, stream, &sum_splits);
    if (err != cudaSuccess) return err;

    using ApplyOp = BackwardApplyOp<T, kMode>;
    ApplyOp op{};
    fill_backward_base(op, p);
    op.output[0] = static_cast<T*>(p.grad_input);
    if constexpr (ApplyOp::kOutputs > 1) op.output[1] = static_cast<T*>(p.grad_residual);
    set_branches(op.grad_weight, p.grad_weight, p.grad_residual_weight);
    set_branches(op.grad_bias, p.grad_bias, p.grad_residual_bias);
    op.m = static_cast<acc_t>(values_per_channel(s));
    op.batch_stats = p.batch_stats;
    return launch_apply(op, v_c, cl_c, s, p.sm_count, partials, sum_splits, stream);
  });
}

}  // namespace

size_t bn_act_forward_scratch_bytes(const BnActForwardParams& p) {
  return dispatch_dtype(p.shape.dtype,
                        [&](auto t) { return forward_scratch_bytes<decltype(t)>(p); });
}

size_t bn_act_backward_scratch_bytes(const BnActBackwardParams& p) {
  return dispatch_dtype(p.shape.dtype,
                        [&](auto t) { return backward_scratch_bytes<decltype(t)>(p); });
}

cudaError_t bn_act_forward_launch(const BnActForwardParams& p, void* scratch,
                                  size_t scratch_bytes, cudaStream_t stream) {
  return dispatch_dtype(p.shape.dtype, [&](auto t) {
    return forward_launch<decltype(t)>(p, scratch, scratch_bytes, stream);
  });
}

cudaError_t bn_act_backward_launch(const BnActBackwardParams& p, void* scratch,
                                   size_t scratch_bytes, cudaStream_t stream) {
  return dispatch_dtype(p.shape.dtype, [&](auto t) {
    return backward_launch<decltype(t)>(p, scratch, scratch_bytes, stream);
  });
}

}  // namespace cuda
}  // namespace resnet_fast
