// CUTLASS implicit-GEMM conv2d forward with the BatchNorm fusions of resnet_fast (the contract
// is conv_bn_act_kernels.cuh).
//
// The conv is CUTLASS's SM80 tensor-op implicit GEMM (GEMM M = N*P*Q output positions, GEMM N = K
// output channels, GEMM K = R*S*C taps): threadblock tile 128x128x32, four 64x64 warps,
// mma.sync 16x8x16 with fp32 accumulators, 4-stage cp.async pipeline, CUTLASS's "optimized"
// activation and filter tile iterators (DefaultConv2dFprop). Four kernels are instantiated:
// {float16, bfloat16} x {stock mainloop, mainloop with the input prologue}; every epilogue
// option (scale, shift, residual, ReLU, statistics) is a runtime switch of one epilogue, so the
// build compiles four CUTLASS kernels per architecture rather than one per combination.
//
// Input prologue (mainloop fusion). The stock way to fuse a per-channel transform into the
// mainloop (CUTLASS's fprop-fusion mainloop) transforms warp fragments with packed f16x2 math on
// half-precision scale/bias and recognises out-of-bounds taps by a NaN bit pattern written into
// shared memory. resnet_fast does it differently, for precision and for bfloat16:
//   * x is copied into shared memory by cp.async with zero-fill for every tap the iterator
//     masks off (padding, rows past N*P*Q, channels past C), as in the stock mainloop; each
//     thread records, per pipeline stage, which of its 16-byte copies were real loads;
//   * when a stage has landed (after the thread's cp.async.wait, before the barrier that hands
//     the stage to the warps) each thread rewrites in place the copies it made itself and that
//     were real loads: a = act(x * scale[c] + shift[c]) computed in fp32 and rounded once to the
//     element type. Zero-filled (padded / out-of-range) copies are left alone, so padding stays
//     exactly zero after the transform, whatever the shift;
//   * scale and shift of all C input channels sit in a table in shared memory (8*C bytes,
//     loaded once per CTA while the first stages are in flight), so the transform of a copy is
//     four 16-byte shared loads, eight FMAs and the conversions.
// Each element of the tile is transformed once per CTA (not once per warp that reads it), and
// the barrier it needs is the one the pipeline already has. Its cost is the latency of that
// rewrite at each stage boundary; measure on a GPU before tuning it (e.g. by transforming one
// stage ahead).
//
// Epilogue. One epilogue of resnet_fast's own, built on CUTLASS's tensor-op epilogue pieces
// (accumulators staged through shared memory, then one thread owns 8 consecutive output
// channels of a row at a time): v = acc * scale[k] + shift[k], + residual, ReLU, one 16-byte
// store per 8 channels. With statistics it also reduces the tile: every value v of a tile is
// shifted by a per-tile, per-channel pivot (the tile's first row, so the pivot is a value of the
// same data), and the threads sum (v - pivot) and (v - pivot)^2 in fp32; summing the threads'
// partials in a fixed order gives per tile and channel a mean and an M2 (sum of squared
// deviations), written to the scratch buffer as [tile][K] float2. A second, small kernel merges
// the tiles of each channel with Chan's pairwise formula (in a fixed order: deterministic) into
// the mean and the biased variance. No raw sum of squares of unshifted values is formed
// anywhere, so data whose mean is large against its spread keeps its variance.
#include "conv_bn_act_kernels.cuh"

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cutlass/arch/memory.h"
#include "cutlass/array.h"
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/kernel/default_conv2d_fprop.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/epilogue/threadblock/default_epilogue_tensor_op.h"
#include "cutlass/epilogue/threadblock/epilogue_base.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/numeric_types.h"

#include "../bn_act_math.h"

namespace resnet_fast {
namespace cuda {
namespace {

// ------------------------------------------------------------------ configuration

using ThreadblockShape = cutlass::gemm::GemmShape<128, 128, 32>;
using WarpShape = cutlass::gemm::GemmShape<64, 64, 32>;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;
constexpr int kStages = 4;
constexpr int kAlignment = 8;  // elements of one 16-byte access: C and K are multiples of it
using Swizzle = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>;
constexpr int kMaxFilterExtent = 32;  // the optimized activation iterator keeps R and S in masks

// CUTLASS's stock pieces for one element type: the mainloop (Mma) and the iterators it uses.
// The output operator only gives the default epilogue its shape; resnet_fast's epilogue below
// replaces it.
template <typename Element>
struct StockConv {
  using ShapeOp = cutlass::epilogue::thread::LinearCombination<Element, kAlignment, float, float>;
  using Default = cutlass::conv::kernel::DefaultConv2dFprop<
      Element, cutlass::layout::TensorNHWC, Element, cutlass::layout::TensorNHWC, Element,
      cutlass::layout::TensorNHWC, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      ThreadblockShape, WarpShape, InstructionShape, ShapeOp, Swizzle, kStages,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
      cutlass::conv::StrideSupport::kUnity, kAlignment, kAlignment>;
  using Mma = typename Default::Mma;
  using WarpMma = typename Default::WarpMmaTensorOp;
  using EpilogueParts = cutlass::epilogue::threadblock::DefaultEpilogueTensorOp<
      ThreadblockShape, WarpMma, 1, ShapeOp, kAlignment>;
};

// ------------------------------------------------------------------ mainloop with the prologue

// The prologue's per-input-channel constants. Null pointers mean 1 and 0.
struct PrologueArgs {
  const float* scale = nullptr;
  const float* shift = nullptr;
  bool relu = false;
};

// Bytes of the per-CTA table of the prologue: per group of 8 channels, 8 scales then 8 shifts.
inline size_t prologue_table_bytes(int C) { return size_t(C) * 2 * sizeof(float); }

// A multistage mainloop like CUTLASS's ImplicitGemmMultistage (same iterators, same shared
// memory layout, same warp-level MMA), plus the in-place transform of the A tile described in
// the file comment.
template <typename StockMma>
class PrologueMainloop : public StockMma::Base {
 public:
  using Base = typename StockMma::Base;  // the stock mainloop's CUTLASS MmaBase
  using typename Base::Shape;
  using typename Base::Policy;
  using typename Base::Operator;
  using Base::kStages;
  using Base::kWarpGemmIterations;
  using IteratorA = typename StockMma::IteratorA;
  using IteratorB = typename StockMma::IteratorB;
  using SmemIteratorA = typename StockMma::SmemIteratorA;
  using SmemIteratorB = typename StockMma::SmemIteratorB;
  using FragmentC = typename Operator::FragmentC;
  using Element = typename IteratorA::Element;

  static constexpr int kThreads = IteratorA::ThreadMap::kThreads;
  static constexpr int kCopiesA = IteratorA::ThreadMap::Iterations::kCount;
  static constexpr int kCopiesB = IteratorB::ThreadMap::Iterations::kCount;
  static constexpr int kCopiesPerGroupA =
      (kCopiesA + kWarpGemmIterations - 1) / kWarpGemmIterations;
  static constexpr int kCopiesPerGroupB =
      (kCopiesB + kWarpGemmIterations - 1) / kWarpGemmIterations;
  static constexpr int kChannelsPerCopy = IteratorA::ThreadMap::kElementsPerAccess;
  static constexpr int kBytesA = cutlass::sizeof_bits<Element>::value * kChannelsPerCopy / 8;
  static constexpr int kBytesB =
      cutlass::sizeof_bits<typename IteratorB::Element>::value *
      IteratorB::ThreadMap::kElementsPerAccess / 8;
  static constexpr unsigned kStageMask = (1u << kCopiesA) - 1u;
  using Vector = cutlass::Array<Element, kChannelsPerCopy>;

  static_assert(IteratorA::kAccessesPerVector == 1 && IteratorB::kAccessesPerVector == 1,
                "one cp.async per thread-map access");
  static_assert(IteratorA::ThreadMap::Iterations::kContiguous == 1,
                "a thread keeps the same channels for all its copies of a stage");
  static_assert(kChannelsPerCopy == 8 && kBytesA == 16, "16-byte copies of 8 channels");
  static_assert(kCopiesA * kStages <= 32, "the copies' valid bits fit one register");
  static_assert(Policy::kPartitionsK == 1, "no split of the warp tile along GEMM K");
  static_assert(!cutlass::arch::detail::UseStagedAccumulation<Operator>::value,
                "plain accumulation");

  CUTLASS_DEVICE
  PrologueMainloop(typename Base::SharedStorage& storage, int thread_idx, int warp_idx,
                   int lane_idx)
      : Base(storage, thread_idx, warp_idx, lane_idx),
        smem_A_(storage.operand_A_ref(), thread_idx),
        smem_B_(storage.operand_B_ref(), thread_idx),
        smem_A_origin_(storage.operand_A_ref(), thread_idx),
        thread_idx_(thread_idx),
        channel_offset_(IteratorA::ThreadMap::initial_offset(thread_idx).contiguous()) {
    const int warp_mn = warp_idx % (Base::WarpCount::kM * Base::WarpCount::kN);
    const int warp_k = warp_idx / (Base::WarpCount::kM * Base::WarpCount::kN);
    const int warp_m = warp_mn % Base::WarpCount::kM;
    const int warp_n = warp_mn / Base::WarpCount::kM;
    this->warp_tile_iterator_A_.add_tile_offset({warp_m, kWarpGemmIterations * warp_k});
    this->warp_tile_iterator_B_.add_tile_offset({kWarpGemmIterations * warp_k, warp_n});
  }

  // gemm_k_iterations tiles of GEMM K; RS = R*S (a tile is one filter tap and 32 channels, taps
  // innermost, so tile t holds channels (t / RS) * 32 + [0, 32)); table: 16-byte aligned
  // shared memory of prologue_table_bytes(C).
  CUTLASS_DEVICE
  void operator()(int gemm_k_iterations, FragmentC& accum, IteratorA iterator_A,
                  IteratorB iterator_B, PrologueArgs const& prologue, int C, int RS,
                  float* table) {
    CUTLASS_PRAGMA_UNROLL
    for (int stage = 0; stage < kStages - 1; ++stage, --gemm_k_iterations) {
      CUTLASS_PRAGMA_UNROLL
      for (int group = 0; group < kWarpGemmIterations; ++group) {
        copy_group(iterator_A, iterator_B, stage, group);
      }
      iterator_A.advance();
      iterator_B.advance();
      smem_A_.add_tile_offset({0, 1});
      smem_B_.add_tile_offset({1, 0});
      cutlass::arch::cp_async_fence();
    }

    // The table, while the first stages are in flight.
    for (int c = thread_idx_; c < C; c += kThreads) {
      float* entry = table + (c / kChannelsPerCopy) * (2 * kChannelsPerCopy) + c % kChannelsPerCopy;
      entry[0] = prologue.scale != nullptr ? __ldg(prologue.scale + c) : 1.f;
      entry[kChannelsPerCopy] = prologue.shift != nullptr ? __ldg(prologue.shift + c) : 0.f;
    }

    accum.clear();
    cutlass::arch::cp_async_wait<kStages - 2>();
    __syncthreads();  // the table is complete
    int channel_base = 0;
    int tap = 0;
    transform_stage(0, channel_base, table, prologue.relu);
    next_tile(channel_base, tap, RS);
    __syncthreads();  // stage 0 is transformed

    typename Operator::FragmentA loaded_A[2];
    typename Operator::FragmentB loaded_B[2];
    typename Operator::TransformedFragmentA warp_A[2];
    typename Operator::TransformedFragmentB warp_B[2];
    Operator warp_mma;

    this->warp_tile_iterator_A_.set_kgroup_index(0);
    this->warp_tile_iterator_B_.set_kgroup_index(0);
    this->warp_tile_iterator_A_.load(loaded_A[0]);
    this->warp_tile_iterator_B_.load(loaded_B[0]);
    ++this->warp_tile_iterator_A_;
    ++this->warp_tile_iterator_B_;

    int write_stage = kStages - 1;
    int read_stage = 0;
    copy_group(iterator_A, iterator_B, write_stage, 0);
    warp_mma.transform(warp_A[0], warp_B[0], loaded_A[0], loaded_B[0]);

    CUTLASS_GEMM_LOOP
    for (; gemm_k_iterations > (-kStages + 1);) {
      CUTLASS_PRAGMA_UNROLL
      for (int warp_k = 0; warp_k < kWarpGemmIterations; ++warp_k) {
        const int next_k = (warp_k + 1) % kWarpGemmIterations;
        this->warp_tile_iterator_A_.set_kgroup_index(next_k);
        this->warp_tile_iterator_B_.set_kgroup_index(next_k);
        this->warp_tile_iterator_A_.load(loaded_A[(warp_k + 1) % 2]);
        this->warp_tile_iterator_B_.load(loaded_B[(warp_k + 1) % 2]);
        ++this->warp_tile_iterator_A_;
        ++this->warp_tile_iterator_B_;
        if (warp_k > 0) {
          warp_mma.transform(warp_A[warp_k % 2], warp_B[warp_k % 2], loaded_A[warp_k % 2],
                             loaded_B[warp_k % 2]);
        }

        // The next group of copies of the stage being written (group 0 goes to the stage
        // after the boundary below).
        copy_group(iterator_A, iterator_B, write_stage, next_k);

        warp_mma(accum, warp_A[warp_k % 2], warp_B[warp_k % 2], accum);

        if (warp_k + 1 == kWarpGemmIterations) {
          warp_mma.transform(warp_A[(warp_k + 1) % 2], warp_B[(warp_k + 1) % 2],
                             loaded_A[(warp_k + 1) % 2], loaded_B[(warp_k + 1) % 2]);
        }

        if (warp_k + 2 == kWarpGemmIterations) {
          // Stage boundary: the next stage to read has landed (for this thread's copies);
          // transform them, then the barrier hands the stage to every warp.
          cutlass::arch::cp_async_fence();
          cutlass::arch::cp_async_wait<kStages - 2>();
          const int next_read = read_stage + 1 == kStages ? 0 : read_stage + 1;
          transform_stage(next_read, channel_base, table, prologue.relu);
          next_tile(channel_base, tap, RS);
          __syncthreads();

          iterator_A.advance();
          iterator_B.advance();
          smem_A_.add_tile_offset({0, 1});
          smem_B_.add_tile_offset({1, 0});
          if (write_stage == kStages - 1) {
            smem_A_.add_tile_offset({0, -kStages});
            smem_B_.add_tile_offset({-kStages, 0});
            write_stage = 0;
          } else {
            ++write_stage;
          }
          if (read_stage == kStages - 1) {
            this->warp_tile_iterator_A_.add_tile_offset(
                {0, -kStages * Policy::kPartitionsK * kWarpGemmIterations});
            this->warp_tile_iterator_B_.add_tile_offset(
                {-kStages * Policy::kPartitionsK * kWarpGemmIterations, 0});
            read_stage = 0;
          } else {
            ++read_stage;
          }
          --gemm_k_iterations;
        }
      }
    }

    cutlass::arch::cp_async_fence();
    cutlass::arch::cp_async_wait<0>();
    __syncthreads();
  }

 private:
  // Issues this thread's copies of group `group` of a stage (the copies of a stage are spread
  // over the warp-level k-steps, as in the stock mainloop) and records which were real loads.
  CUTLASS_DEVICE
  void copy_group(IteratorA& iterator_A, IteratorB& iterator_B, int stage, int group) {
    const int first_A = group * kCopiesPerGroupA;
    iterator_A.set_iteration_index(first_A);
    smem_A_.set_iteration_index(first_A);
    if (group == 0) {
      valid_bits_ &= ~(kStageMask << (stage * kCopiesA));
    }
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kCopiesPerGroupA; ++j) {
      if (first_A + j < kCopiesA) {
        const bool valid = iterator_A.valid();
        cutlass::arch::cp_async_zfill<kBytesA, StockMma::kCacheOpA>(smem_A_.get(),
                                                                    iterator_A.get(), valid);
        valid_bits_ |= unsigned(valid) << (stage * kCopiesA + first_A + j);
        ++iterator_A;
        ++smem_A_;
      }
    }
    const int first_B = group * kCopiesPerGroupB;
    iterator_B.set_iteration_index(first_B);
    smem_B_.set_iteration_index(first_B);
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kCopiesPerGroupB; ++j) {
      if (first_B + j < kCopiesB) {
        cutlass::arch::cp_async_zfill<kBytesB, StockMma::kCacheOpB>(
            smem_B_.get(), iterator_B.get(), iterator_B.valid());
        ++iterator_B;
        ++smem_B_;
      }
    }
  }

  CUTLASS_DEVICE
  static void next_tile(int& channel_base, int& tap, int RS) {
    if (++tap == RS) {
      tap = 0;
      channel_base += Shape::kK;
    }
  }

  // Rewrites this thread's real loads of `stage`: its channels are channel_base +
  // channel_offset_ + [0, 8), below C whenever the load was real.
  CUTLASS_DEVICE
  void transform_stage(int stage, int channel_base, float const* table, bool relu) const {
    const unsigned bits = (valid_bits_ >> (stage * kCopiesA)) & kStageMask;
    if (bits == 0u) {
      return;
    }
    const int channel = channel_base + channel_offset_;
    const float4* entry = reinterpret_cast<const float4*>(table + 2 * channel);
    const float4 scale_lo = entry[0], scale_hi = entry[1], shift_lo = entry[2], shift_hi = entry[3];
    const float scale[8] = {scale_lo.x, scale_lo.y, scale_lo.z, scale_lo.w,
                            scale_hi.x, scale_hi.y, scale_hi.z, scale_hi.w};
    const float shift[8] = {shift_lo.x, shift_lo.y, shift_lo.z, shift_lo.w,
                            shift_hi.x, shift_hi.y, shift_hi.z, shift_hi.w};
    cutlass::NumericArrayConverter<float, Element, kChannelsPerCopy> to_float;
    cutlass::NumericArrayConverter<Element, float, kChannelsPerCopy> to_element;

    SmemIteratorA it(smem_A_origin_);
    it.add_tile_offset({0, stage});
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kCopiesA; ++j) {
      if (bits & (1u << j)) {
        it.set_iteration_index(j);
        Vector* slot = reinterpret_cast<Vector*>(it.get());
        cutlass::Array<float, kChannelsPerCopy> v = to_float(*slot);
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < kChannelsPerCopy; ++e) {
          const float a = fmaf(v[e], scale[e], shift[e]);
          v[e] = relu ? relu_value(a) : a;
        }
        *slot = to_element(v);
      }
    }
  }

  SmemIteratorA smem_A_;
  SmemIteratorB smem_B_;
  SmemIteratorA smem_A_origin_;  // stage 0, for revisiting a stage's copies
  int thread_idx_;
  int channel_offset_;    // this thread's first channel within a tile
  unsigned valid_bits_ = 0u;  // bit stage * kCopiesA + j: copy j of `stage` was a real load
};

// ------------------------------------------------------------------ epilogue

struct EpilogueArgs {
  const float* scale = nullptr;  // K values or null (1)
  const float* shift = nullptr;  // K values or null (0)
  bool residual = false;
  bool relu = false;
  float2* partials = nullptr;  // [tiles_m][K] (mean, M2) per tile and channel; null: no stats
};

template <typename Element, typename WarpMma>
class BnActEpilogue
    : public cutlass::epilogue::threadblock::EpilogueBase<
          ThreadblockShape, typename WarpMma::Shape, 1,
          typename StockConv<Element>::EpilogueParts::AccumulatorFragmentIterator,
          typename StockConv<Element>::EpilogueParts::WarpTileIterator,
          typename StockConv<Element>::EpilogueParts::Padding,
          StockConv<Element>::EpilogueParts::kFragmentsPerIteration> {
 public:
  using Parts = typename StockConv<Element>::EpilogueParts;
  using Base = cutlass::epilogue::threadblock::EpilogueBase<
      ThreadblockShape, typename WarpMma::Shape, 1, typename Parts::AccumulatorFragmentIterator,
      typename Parts::WarpTileIterator, typename Parts::Padding, Parts::kFragmentsPerIteration>;
  using OutputTileIterator = typename Parts::OutputTileIterator;
  using AccumulatorFragmentIterator = typename Parts::AccumulatorFragmentIterator;
  using SharedLoadIterator = typename Parts::SharedLoadIterator;
  using typename Base::AccumulatorTile;
  using ThreadMap = typename OutputTileIterator::ThreadMap;
  using Fragment = typename OutputTileIterator::Fragment;

  static constexpr int kThreads = ThreadMap::kThreads;
  static constexpr int kAccess = ThreadMap::kElementsPerAccess;
  static constexpr int kColumnAccesses = ThreadMap::Iterations::kColumn;
  static constexpr int kColumns = kColumnAccesses * kAccess;  // output channels per thread
  static constexpr int kFragmentElements = Fragment::kElements;
  static constexpr int kTileRows = ThreadblockShape::kM;
  static constexpr int kTileColumns = ThreadblockShape::kN;
  // Threads that own the same channels of a tile (the compacted arrangement CUTLASS's output
  // thread map gives: thread t owns channels (t % kThreadsPerRow) * kColumns + [0, kColumns);
  // the launcher checks this on the host before the first launch).
  static constexpr int kThreadsPerRow = kTileColumns / kColumns;
  static constexpr int kThreadRows = kThreads / kThreadsPerRow;

  static_assert(kColumnAccesses == 1, "one 16-byte access of 8 channels per row and thread");
  static_assert(kThreads % kThreadsPerRow == 0, "threads cover whole rows of channels");
  static_assert(kFragmentElements % kColumns == 0, "whole rows per fragment");

  struct SharedStorage {
    union Reuse {
      typename Base::SharedStorage staging;       // accumulators on their way to the threads
      float sums[2][kThreadRows][kTileColumns];   // then the threads' statistics partials
    } reuse;
    float pivot[kTileColumns];
  };

  CUTLASS_DEVICE
  BnActEpilogue(SharedStorage& storage, int thread_idx, int warp_idx, int lane_idx)
      : Base(storage.reuse.staging, thread_idx, warp_idx, lane_idx),
        storage_(storage),
        shared_load_iterator_(storage.reuse.staging.reference(), thread_idx),
        thread_idx_(thread_idx) {}

  // destination and residual start at the tile (tile_offset); tile_m is the tile's GEMM-M
  // index, K the number of output channels, rows the number of output positions N*P*Q.
  CUTLASS_DEVICE
  void operator()(EpilogueArgs const& args, OutputTileIterator destination,
                  AccumulatorTile const& accumulators, OutputTileIterator residual,
                  cutlass::MatrixCoord const& tile_offset, int tile_m, int K, int rows) {
    const bool stats = args.partials != nullptr;
    const int first_column = destination.thread_start_column();

    float scale[kColumns];
    float shift[kColumns];
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kColumns; ++j) {
      const int k = first_column + j;
      const bool inside = k < K;
      scale[j] = (args.scale != nullptr && inside) ? __ldg(args.scale + k) : 1.f;
      shift[j] = (args.shift != nullptr && inside) ? __ldg(args.shift + k) : 0.f;
    }
    float pivot[kColumns];
    float sum[kColumns];
    float sum_sq[kColumns];
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kColumns; ++j) {
      pivot[j] = 0.f;
      sum[j] = 0.f;
      sum_sq[j] = 0.f;
    }
    if (stats) {
      for (int c = thread_idx_; c < kTileColumns; c += kThreads) {
        storage_.pivot[c] = 0.f;  // a valid (if less robust) pivot should a column be missed
      }
    }

    AccumulatorFragmentIterator accumulator_iterator(accumulators);
    cutlass::NumericArrayConverter<Element, float, kFragmentElements> to_element;

    CUTLASS_PRAGMA_UNROLL
    for (int iter = 0; iter < OutputTileIterator::kIterations; ++iter) {
      Fragment residual_fragment;
      residual_fragment.clear();
      if (args.residual) {
        residual.load(residual_fragment);
        ++residual;
      }

      __syncthreads();
      typename AccumulatorFragmentIterator::Fragment accumulator_fragment;
      accumulator_iterator.load(accumulator_fragment);
      ++accumulator_iterator;
      this->warp_tile_iterator_.store(accumulator_fragment);
      __syncthreads();

      typename SharedLoadIterator::Fragment staged;
      shared_load_iterator_.load(staged);

      cutlass::Array<float, kFragmentElements> v;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kFragmentElements; ++i) {
        const int j = i % kColumns;
        float value = fmaf(float(staged[i]), scale[j], shift[j]);
        if (args.residual) {
          value += float(residual_fragment[i]);
        }
        v[i] = args.relu ? relu_value(value) : value;
      }

      if (stats) {
        if (iter == 0) {
          // The tile's first row, seen in the first iteration, is the pivot of its columns.
          CUTLASS_PRAGMA_UNROLL
          for (int r = 0; r < kFragmentElements / kColumns; ++r) {
            if (destination.thread_start_row() + row_offset(r) == tile_offset.row()) {
              CUTLASS_PRAGMA_UNROLL
              for (int j = 0; j < kColumns; ++j) {
                storage_.pivot[first_column - tile_offset.column() + j] = v[r * kColumns + j];
              }
            }
          }
          __syncthreads();
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < kColumns; ++j) {
            pivot[j] = storage_.pivot[first_column - tile_offset.column() + j];
          }
        }
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kFragmentElements / kColumns; ++r) {
          if (destination.thread_start_row() + row_offset(r) < rows) {
            CUTLASS_PRAGMA_UNROLL
            for (int j = 0; j < kColumns; ++j) {
              const float d = v[r * kColumns + j] - pivot[j];
              sum[j] += d;
              sum_sq[j] = fmaf(d, d, sum_sq[j]);
            }
          }
        }
      }

      destination.store(to_element(v));
      ++destination;
    }

    if (stats) {
      reduce_tile(args.partials, tile_offset, tile_m, K, rows, first_column, sum, sum_sq);
    }
  }

 private:
  // Row of fragment row r relative to the thread's start row of the current iteration (the
  // order PredicatedTileIterator loads and stores a fragment in).
  CUTLASS_DEVICE
  static int row_offset(int r) {
    const int row = r % ThreadMap::Iterations::kRow;
    const int group = (r / ThreadMap::Iterations::kRow) % ThreadMap::Iterations::kGroup;
    const int cluster = r / (ThreadMap::Iterations::kRow * ThreadMap::Iterations::kGroup);
    return row * ThreadMap::Delta::kRow + group * ThreadMap::Delta::kGroup +
           cluster * ThreadMap::Delta::kCluster;
  }

  // Sums the threads' shifted partials of each column in a fixed order and writes the tile's
  // (mean, M2) per channel.
  CUTLASS_DEVICE
  void reduce_tile(float2* partials, cutlass::MatrixCoord const& tile_offset, int tile_m, int K,
                   int rows, int first_column, float const (&sum)[kColumns],
                   float const (&sum_sq)[kColumns]) {
    __syncthreads();  // the staging buffer, which the sums reuse, has been read
    const int slot = thread_idx_ / kThreadsPerRow;
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kColumns; ++j) {
      storage_.reuse.sums[0][slot][first_column - tile_offset.column() + j] = sum[j];
      storage_.reuse.sums[1][slot][first_column - tile_offset.column() + j] = sum_sq[j];
    }
    __syncthreads();
    const int tile_rows = min(kTileRows, rows - tile_offset.row());
    const float count = float(tile_rows);
    for (int c = thread_idx_; c < kTileColumns; c += kThreads) {
      const int k = tile_offset.column() + c;
      if (k < K) {
        float s1 = 0.f;
        float s2 = 0.f;
        CUTLASS_PRAGMA_UNROLL
        for (int t = 0; t < kThreadRows; ++t) {
          s1 += storage_.reuse.sums[0][t][c];
          s2 += storage_.reuse.sums[1][t][c];
        }
        const float shift_mean = s1 / count;
        const float m2_raw = s2 - s1 * shift_mean;
        const float m2 = m2_raw < 0.f ? 0.f : m2_raw;  // >= 0 up to rounding; NaN is kept
        partials[size_t(tile_m) * size_t(K) + size_t(k)] =
            make_float2(storage_.pivot[c] + shift_mean, m2);
      }
    }
  }

  SharedStorage& storage_;
  SharedLoadIterator shared_load_iterator_;
  int thread_idx_;
};

// ------------------------------------------------------------------ the conv kernel

template <typename Element_, bool kPrologue>
struct ConvBnActKernel {
  using Element = Element_;
  using Stock = StockConv<Element>;
  using Mma = std::conditional_t<kPrologue, PrologueMainloop<typename Stock::Mma>,
                                 typename Stock::Mma>;
  using Epilogue = BnActEpilogue<Element, typename Stock::WarpMma>;
  using IteratorA = typename Mma::IteratorA;
  using IteratorB = typename Mma::IteratorB;
  using OutputTileIterator = typename Epilogue::OutputTileIterator;
  static constexpr int kThreads = 32 * Mma::WarpCount::kCount;
  static_assert(kThreads == Epilogue::kThreads, "mainloop and epilogue share the threads");

  struct Params {
    cutlass::conv::Conv2dProblemSize problem;
    cutlass::gemm::GemmCoord tiled_shape;
    int swizzle_log_tile = 0;
    int gemm_k_iterations = 0;
    typename IteratorA::Params iterator_A;
    const Element* x = nullptr;
    typename IteratorB::Params iterator_B;
    const Element* weight = nullptr;
    typename OutputTileIterator::Params iterator_y;
    Element* y = nullptr;
    const Element* residual = nullptr;
    EpilogueArgs epilogue;
    PrologueArgs prologue;
  };

  union SharedStorage {
    typename Mma::SharedStorage main_loop;
    typename Epilogue::SharedStorage epilogue;
  };

  // Dynamic shared memory of a launch: the storage, then (prologue) the channel table.
  static constexpr size_t kTableOffset = (sizeof(SharedStorage) + 15) / 16 * 16;
  static size_t shared_bytes(int C) {
    return kPrologue ? kTableOffset + prologue_table_bytes(C) : sizeof(SharedStorage);
  }

  CUTLASS_DEVICE
  static void run(Params const& params, char* smem) {
    SharedStorage& storage = *reinterpret_cast<SharedStorage*>(smem);
    const cutlass::gemm::GemmCoord tile = Swizzle::get_tile_offset(params.swizzle_log_tile);
    if (tile.m() >= params.tiled_shape.m() || tile.n() >= params.tiled_shape.n()) {
      return;
    }
    const int thread_idx = threadIdx.x;
    const int warp_idx = cutlass::canonical_warp_idx_sync();
    const int lane_idx = threadIdx.x % 32;

    IteratorA iterator_A(params.iterator_A, params.problem, params.x, thread_idx,
                         cutlass::MatrixCoord(tile.m() * ThreadblockShape::kM, 0));
    IteratorB iterator_B(params.iterator_B, params.problem, params.weight, thread_idx,
                         cutlass::MatrixCoord(0, tile.n() * ThreadblockShape::kN));

    Mma mma(storage.main_loop, thread_idx, warp_idx, lane_idx);
    typename Mma::FragmentC accumulators;
    if constexpr (kPrologue) {
      mma(params.gemm_k_iterations, accumulators, iterator_A, iterator_B, params.prologue,
          params.problem.C, params.problem.R * params.problem.S,
          reinterpret_cast<float*>(smem + kTableOffset));
    } else {
      accumulators.clear();
      mma(params.gemm_k_iterations, accumulators, iterator_A, iterator_B, accumulators);
    }

    const int rows = params.problem.N * params.problem.P * params.problem.Q;
    const cutlass::MatrixCoord extent(rows, params.problem.K);
    const cutlass::MatrixCoord tile_offset(tile.m() * ThreadblockShape::kM,
                                           tile.n() * ThreadblockShape::kN);
    OutputTileIterator destination(params.iterator_y, params.y, extent, thread_idx, tile_offset);
    OutputTileIterator residual(params.iterator_y, const_cast<Element*>(params.residual), extent,
                                thread_idx, tile_offset);
    Epilogue epilogue(storage.epilogue, thread_idx, warp_idx, lane_idx);
    epilogue(params.epilogue, destination, accumulators, residual, tile_offset, tile.m(),
             params.problem.K, rows);
  }
};

template <typename Kernel>
__global__ void __launch_bounds__(Kernel::kThreads)
    conv_bn_act_kernel(const __grid_constant__ typename Kernel::Params params) {
  extern __shared__ __align__(16) char smem[];
  Kernel::run(params, smem);
}

// ------------------------------------------------------------------ statistics merge

constexpr int kMergeChannels = 8;  // channels per block
constexpr int kMergeLanes = 32;    // threads per channel, each merging a strided set of tiles
constexpr int kMergeThreads = kMergeChannels * kMergeLanes;

// Chan et al.'s pairwise update: (n, mean, m2) absorbs a disjoint part (nb, mean_b, m2_b).
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb,
                                           float mean_b, float m2_b) {
  if (nb <= 0.f) {
    return;
  }
  const float total = n + nb;
  const float delta = mean_b - mean;
  const float weight = nb / total;
  mean = fmaf(delta, weight, mean);
  m2 += m2_b + delta * delta * n * weight;
  n = total;
}

// partials: [tiles][K] (mean, M2) of tiles of 128 rows (the last one holds the rest of `rows`);
// stats: (2, K) mean and biased variance.
__global__ void __launch_bounds__(kMergeThreads)
    merge_tile_statistics_kernel(const float2* __restrict__ partials, int tiles, int rows, int K,
                                 float* __restrict__ stats) {
  __shared__ float part_n[kMergeLanes][kMergeChannels];
  __shared__ float part_mean[kMergeLanes][kMergeChannels];
  __shared__ float part_m2[kMergeLanes][kMergeChannels];
  const int c_local = threadIdx.x % kMergeChannels;
  const int lane = threadIdx.x / kMergeChannels;
  const int k = blockIdx.x * kMergeChannels + c_local;
  float n = 0.f;
  float mean = 0.f;
  float m2 = 0.f;
  if (k < K) {
    for (int t = lane; t < tiles; t += kMergeLanes) {
      const float2 p = partials[size_t(t) * size_t(K) + size_t(k)];
      const int tile_rows = min(ThreadblockShape::kM, rows - t * ThreadblockShape::kM);
      chan_merge(n, mean, m2, float(tile_rows), p.x, p.y);
    }
  }
  part_n[lane][c_local] = n;
  part_mean[lane][c_local] = mean;
  part_m2[lane][c_local] = m2;
  __syncthreads();
  if (lane == 0 && k < K) {
    for (int l = 1; l < kMergeLanes; ++l) {
      chan_merge(n, mean, m2, part_n[l][c_local], part_mean[l][c_local], part_m2[l][c_local]);
    }
    stats[k] = mean;
    stats[K + k] = m2 / float(rows);
  }
}

// ------------------------------------------------------------------ host side

int tiles_m(const Conv2dGeometry& g) {
  const int64_t rows = int64_t(g.N) * g.P * g.Q;
  return int((rows + ThreadblockShape::kM - 1) / ThreadblockShape::kM);
}

cutlass::conv::Conv2dProblemSize problem_size(const Conv2dGeometry& g) {
  return cutlass::conv::Conv2dProblemSize(g.N, g.H, g.W, g.C, g.K, g.R, g.S, g.P, g.Q, g.pad_h,
                                          g.pad_w, g.stride_h, g.stride_w, g.dilation_h,
                                          g.dilation_w,
                                          cutlass::conv::Mode::kCrossCorrelation, 1, 1);
}

// The statistics reduction relies on the output thread map's arrangement (see BnActEpilogue):
// checked once per process and element type on the host.
template <typename Kernel>
bool epilogue_thread_map_as_assumed() {
  using Epilogue = typename Kernel::Epilogue;
  using ThreadMap = typename Epilogue::ThreadMap;
  static const bool ok = [] {
    for (int t = 0; t < Epilogue::kThreads; ++t) {
      const cutlass::MatrixCoord start = ThreadMap::initial_offset(t);
      if (start.column() != (t % Epilogue::kThreadsPerRow) * Epilogue::kColumns) {
        return false;
      }
    }
    return true;
  }();
  return ok;
}

template <typename Kernel>
cudaError_t launch_kernel(const ConvBnActParams& p, float2* partials, cudaStream_t stream) {
  using Element = typename Kernel::Element;
  const Conv2dGeometry& g = p.geometry;
  typename Kernel::Params params;
  params.problem = problem_size(g);
  params.tiled_shape = Swizzle::get_tiled_shape(
      cutlass::conv::Operator::kFprop, params.problem,
      {ThreadblockShape::kM, ThreadblockShape::kN, ThreadblockShape::kK}, 1);
  params.swizzle_log_tile = Swizzle::get_log_tile(params.tiled_shape);
  params.gemm_k_iterations = cutlass::conv::implicit_gemm_k_iterations(
      cutlass::conv::Operator::kFprop, ThreadblockShape::kK, params.problem);
  params.iterator_A = Kernel::IteratorA::getParams(
      params.problem, cutlass::layout::TensorNHWC::packed({g.N, g.H, g.W, g.C}));
  params.x = static_cast<const Element*>(p.x);
  params.iterator_B = typename Kernel::IteratorB::Params(
      params.problem, cutlass::layout::TensorNHWC::packed({g.K, g.R, g.S, g.C}));
  params.weight = static_cast<const Element*>(p.weight);
  params.iterator_y = typename Kernel::OutputTileIterator::Params(cutlass::layout::RowMajor(g.K));
  params.y = static_cast<Element*>(p.y);
  params.residual = static_cast<const Element*>(p.residual);
  params.epilogue.scale = p.out_scale;
  params.epilogue.shift = p.out_shift;
  params.epilogue.residual = p.residual != nullptr;
  params.epilogue.relu = p.relu;
  params.epilogue.partials = partials;
  params.prologue.scale = p.in_scale;
  params.prologue.shift = p.in_shift;
  params.prologue.relu = p.in_relu;

  if (partials != nullptr && !epilogue_thread_map_as_assumed<Kernel>()) {
    return cudaErrorNotSupported;
  }
  const size_t smem = Kernel::shared_bytes(g.C);
  auto* kernel = conv_bn_act_kernel<Kernel>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) {
    return err;
  }
  const dim3 grid = Swizzle::get_grid_shape(params.tiled_shape);
  kernel<<<grid, Kernel::kThreads, smem, stream>>>(params);
  return cudaGetLastError();
}

// Calls f(ConvBnActKernel<Element, prologue>{}) with the kernel of p's element type (float16
// or bfloat16) and input prologue.
template <typename F>
auto dispatch_kernel(const ConvBnActParams& p, F&& f) {
  const bool prologue = p.in_scale != nullptr || p.in_shift != nullptr || p.in_relu;
  auto with_element = [&](auto element) {
    using Element = decltype(element);
    return prologue ? f(ConvBnActKernel<Element, true>{}) : f(ConvBnActKernel<Element, false>{});
  };
  return p.element == ConvElement::kHalf ? with_element(cutlass::half_t{})
                                         : with_element(cutlass::bfloat16_t{});
}

int output_extent(int in, int pad, int dilation, int filter, int stride) {
  return (in + 2 * pad - dilation * (filter - 1) - 1) / stride + 1;
}

}  // namespace

const char* conv_bn_act_unsupported_reason(const ConvBnActParams& p) {
  const Conv2dGeometry& g = p.geometry;
  if (p.element != ConvElement::kHalf && p.element != ConvElement::kBFloat16) {
    return "the CUTLASS kernels take float16 or bfloat16 tensors";
  }
  if (p.x == nullptr || p.weight == nullptr || p.y == nullptr) {
    return "x, weight and y must be given";
  }
  if (g.N < 1 || g.H < 1 || g.W < 1 || g.C < 1 || g.K < 1 || g.R < 1 || g.S < 1 || g.P < 1 ||
      g.Q < 1) {
    return "every size must be positive";
  }
  if (g.pad_h < 0 || g.pad_w < 0 || g.stride_h < 1 || g.stride_w < 1 || g.dilation_h < 1 ||
      g.dilation_w < 1) {
    return "padding must be >= 0, stride and dilation >= 1";
  }
  if (g.P != output_extent(g.H, g.pad_h, g.dilation_h, g.R, g.stride_h) ||
      g.Q != output_extent(g.W, g.pad_w, g.dilation_w, g.S, g.stride_w)) {
    return "P and Q must be the output size the input, filter, padding, stride and dilation give";
  }
  if (g.C % kAlignment != 0 || g.K % kAlignment != 0) {
    return "input and output channels must be multiples of 8";
  }
  if (g.R > kMaxFilterExtent || g.S > kMaxFilterExtent) {
    return "filter height and width must be at most 32";
  }
  constexpr int64_t kMaxElements = (int64_t(1) << 31) - 1;
  if (int64_t(g.N) * g.H * g.W * g.C > kMaxElements ||
      int64_t(g.N) * g.P * g.Q * g.K > kMaxElements ||
      int64_t(g.K) * g.R * g.S * g.C > kMaxElements) {
    return "tensors must have fewer than 2^31 elements";
  }
  const cutlass::conv::Conv2dProblemSize problem = problem_size(g);
  const bool accepted = dispatch_kernel(p, [&](auto kernel) {
    using Kernel = decltype(kernel);
    return Kernel::IteratorA::can_implement(problem) == cutlass::Status::kSuccess &&
           Kernel::IteratorB::can_implement(problem) == cutlass::Status::kSuccess;
  });
  if (!accepted) {
    return "CUTLASS's conv iterators do not accept this problem";
  }

  int device = 0;
  int major = 0;
  int smem_limit = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess) {
    return "the current CUDA device cannot be queried";
  }
  if (major < 8) {
    return "the CUTLASS kernels need a GPU of compute capability 8.0 or newer";
  }
  const size_t smem =
      dispatch_kernel(p, [&](auto kernel) { return decltype(kernel)::shared_bytes(g.C); });
  if (smem > size_t(smem_limit)) {
    return "too many input channels for the input prologue's table in shared memory";
  }
  return nullptr;
}

size_t conv_bn_act_scratch_bytes(const ConvBnActParams& p) {
  if (p.stats == nullptr) {
    return 0;
  }
  return size_t(tiles_m(p.geometry)) * size_t(p.geometry.K) * sizeof(float2);
}

cudaError_t conv_bn_act_launch(const ConvBnActParams& p, void* scratch, size_t scratch_bytes,
                               cudaStream_t stream) {
  if (conv_bn_act_unsupported_reason(p) != nullptr) {
    return cudaErrorInvalidValue;
  }
  float2* partials = nullptr;
  if (p.stats != nullptr) {
    if (scratch == nullptr || scratch_bytes < conv_bn_act_scratch_bytes(p) ||
        reinterpret_cast<uintptr_t>(scratch) % alignof(float2) != 0) {
      return cudaErrorInvalidValue;
    }
    partials = static_cast<float2*>(scratch);
  }
  const cudaError_t err = dispatch_kernel(
      p, [&](auto kernel) { return launch_kernel<decltype(kernel)>(p, partials, stream); });
  if (err != cudaSuccess || partials == nullptr) {
    return err;
  }
  const Conv2dGeometry& g = p.geometry;
  const int rows = g.N * g.P * g.Q;
  const int blocks = (g.K + kMergeChannels - 1) / kMergeChannels;
  merge_tile_statistics_kernel<<<blocks, kMergeThreads, 0, stream>>>(partials, tiles_m(g), rows,
                                                                     g.K, p.stats);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace resnet_fast
