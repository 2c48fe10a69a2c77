// CPU kernels of the fused BatchNorm (+ residual / + BatchNorm'ed residual) + ReLU op.
//
// Layouts: an activation is dense either in NCHW (element (n, c, hw) at (n*C + c)*HW + hw: a
// row of HW values belongs to one channel) or in channels_last (element (m, c) at m*C + c with
// m = n*HW + hw: a row holds one value of every channel). Both are walked row by row with
// at::vec vectors along the row; per-channel constants are broadcast (NCHW) or loaded as
// vectors (channels_last). The per-element and per-channel math is csrc/bn_act_math.h, shared
// with the CUDA kernels.
//
// Passes over memory, per activation element:
//   training forward: 1 read (statistics) + 1 read and 1 write (normalise, add, ReLU);
//   eval forward: 1 read and 1 write;
//   backward: 1 read of (dy, x[, r]) for the per-channel sums + 1 read of the same and 1 write
//   of dx (and of the residual's gradient).
// Sums are accumulated in acc_t vectors over short runs (one row in NCHW, at most kFlushRows
// rows in channels_last) and added into double totals, so float32 accumulation error stays that
// of a few hundred terms whatever the batch size.

#include "bn_act_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../bn_act_math.h"
#include "../tensor_args.h"

namespace resnet_fast {

// Vector overloads of the shared header's per-element helpers (the scalar ones live there),
// with the same non-finite semantics: NaN passes the ReLU, and its gradient where pre is NaN.
template <typename A>
inline at::vec::Vectorized<A> relu_value(at::vec::Vectorized<A> v) {
  const at::vec::Vectorized<A> zero(A(0));
  return at::vec::Vectorized<A>::blendv(v, zero, v < zero);
}
template <typename A>
inline at::vec::Vectorized<A> relu_grad(at::vec::Vectorized<A> pre, at::vec::Vectorized<A> dy) {
  const at::vec::Vectorized<A> zero(A(0));
  return at::vec::Vectorized<A>::blendv(dy, zero, pre <= zero);
}

namespace cpu {
namespace {

using at::vec::Vectorized;

enum ResidualMode { kNoResidual = 0, kAddResidual = 1, kBatchNormResidual = 2 };

// Rows of channels_last data accumulated in the pass's type before the sums move into double
// totals (the statistics pass accumulates in double throughout, the backward sums in acc_t).
constexpr int64_t kFlushRows = 256;
// Elements one task of an elementwise pass should get at least.
constexpr int64_t kGrainElements = 32768;

template <typename T>
struct is_vec : std::false_type {};
template <typename A>
struct is_vec<Vectorized<A>> : std::true_type {};

// Values in one T: a vector's lanes, or 1.
template <typename T>
constexpr int64_t lanes() {
  if constexpr (is_vec<T>::value) {
    return T::size();
  } else {
    return 1;
  }
}

// Load one value (T = acc_t) or one vector (T = Vectorized<acc_t>) of scalar_t as acc_t
// (acc_t is float or double; double vectors of narrower types are widened lane by lane).
template <typename T, typename scalar_t>
inline T load_as(const scalar_t* p) {
  if constexpr (!is_vec<T>::value) {
    return static_cast<T>(*p);
  } else if constexpr (std::is_same_v<typename T::value_type, scalar_t>) {
    return T::loadu(p);
  } else if constexpr (std::is_same_v<typename T::value_type, double>) {
    alignas(64) double wide[T::size()];
    for (int64_t i = 0; i < T::size(); ++i) wide[i] = static_cast<double>(p[i]);
    return T::loadu(wide);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    T out;
    at::vec::load_fp32_from_bf16(p, out);
    return out;
  } else {
    static_assert(std::is_same_v<scalar_t, at::Half>, "load_as: unsupported scalar type");
    T out;
    at::vec::load_fp32_from_fp16(p, out);
    return out;
  }
}

template <typename scalar_t, typename T>
inline void store_as(scalar_t* p, T v) {
  if constexpr (!is_vec<T>::value) {
    *p = static_cast<scalar_t>(v);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    at::vec::convert_float_bfloat16(v, v).store(p, T::size());
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    at::vec::convert_float_half(v, v).store(p, T::size());
  } else {
    v.store(p);
  }
}

// A per-channel array read at channel j: broadcast along an NCHW row (one channel), loaded as
// a vector of consecutive channels along a channels_last row.
template <bool kChannelsLast, typename acc_t>
struct ChannelArray {
  const acc_t* p;
  template <typename T>
  T get(int64_t j) const {
    if constexpr (!is_vec<T>::value) {
      return p[j];
    } else if constexpr (kChannelsLast) {
      return T::loadu(p + j);
    } else {
      return T(p[j]);
    }
  }
};

struct Shape {
  int64_t N, C, HW;
  int64_t m() const { return N * HW; }
};

// Adds to part[k * C + j + i] the sums over rows [r0, r1) of a channels_last tensor of the
// terms of the U consecutive values (T = acc_t) or vectors (T = Vectorized<acc_t>) of channels
// starting at j.
template <int U, int K, typename T, typename F>
inline void sum_rows(const F& f, int64_t r0, int64_t r1, int64_t C, int64_t j, double* part) {
  constexpr int64_t W = lanes<T>();
  std::array<std::array<T, K>, U> acc;
  for (auto& a : acc) a.fill(T(0));
  for (int64_t r = r0; r < r1; ++r) {
    for (int u = 0; u < U; ++u) f.template term<T>(r * C + j + u * W, j + u * W, acc[u]);
  }
  for (int u = 0; u < U; ++u) {
    for (int k = 0; k < K; ++k) {
      if constexpr (is_vec<T>::value) {
        using acc_t = typename T::value_type;
        std::array<acc_t, W> values;
        acc[u][k].store(values.data());
        for (int64_t i = 0; i < W; ++i) part[k * C + j + u * W + i] += values[i];
      } else {
        part[k * C + j + u] += acc[u][k];
      }
    }
  }
}

// Per-channel sums of K quantities over the m values of each channel, in double:
// out[k * C + c]. f.template term<T>(e, j, acc) adds the terms of element e (linear offset in
// the dense tensor) of channel accessor index j to acc (std::array<T, K>).
template <int K, bool kChannelsLast, typename acc_t, typename F>
void reduce_per_channel(const Shape& s, const F& f, double* out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C = s.C;
  if constexpr (!kChannelsLast) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      const F fl = f;  // see for_each_element
      for (int64_t c = c0; c < c1; ++c) {
        std::array<double, K> total{};
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t base = (n * C + c) * s.HW;
          std::array<Vec, K> vsum;
          vsum.fill(Vec(acc_t(0)));
          std::array<acc_t, K> ssum{};
          int64_t i = 0;
          for (; i + V <= s.HW; i += V) fl.template term<Vec>(base + i, c, vsum);
          for (; i < s.HW; ++i) fl.template term<acc_t>(base + i, c, ssum);
          for (int k = 0; k < K; ++k) {
            total[k] += static_cast<double>(
                at::vec::vec_reduce_all([](Vec a, Vec b) { return a + b; }, vsum[k]) + ssum[k]);
          }
        }
        for (int k = 0; k < K; ++k) out[k * C + c] = total[k];
      }
    });
  } else {
    const int64_t M = s.m();
    const int64_t blocks = std::min<int64_t>(M, 4 * at::get_num_threads());
    std::vector<double> partial(static_cast<size_t>(blocks * K * C), 0.0);
    // Channels in runs of kRun vectors (then single vectors, then single values), each run's
    // sums held in registers over flush_rows rows: every element is read once, and nothing but
    // the data is loaded in the inner loop. The rows a run walks span about 64 KB (at most
    // kFlushRows rows, at least 8), so the next run finds them in cache and in the TLB.
    constexpr int kRun = std::max(1, 8 / K);
    const int64_t flush_rows = std::clamp<int64_t>(16384 / C, 8, kFlushRows);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      const F fl = f;  // see for_each_element
      for (int64_t b = b0; b < b1; ++b) {
        double* part = partial.data() + b * K * C;
        const int64_t row_end = (b + 1) * M / blocks;
        for (int64_t row = b * M / blocks; row < row_end; row += flush_rows) {
          const int64_t rows_end = std::min(row + flush_rows, row_end);
          int64_t j = 0;
          for (; j + kRun * V <= C; j += kRun * V) {
            sum_rows<kRun, K, Vec>(fl, row, rows_end, C, j, part);
          }
          for (; j + V <= C; j += V) sum_rows<1, K, Vec>(fl, row, rows_end, C, j, part);
          for (; j < C; ++j) sum_rows<1, K, acc_t>(fl, row, rows_end, C, j, part);
        }
      }
    });
    at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t c = c0; c < c1; ++c) {
          double t = 0.0;
          for (int64_t b = 0; b < blocks; ++b) t += partial[(b * K + k) * C + c];
          out[k * C + c] = t;
        }
      }
    });
  }
}

// Runs f.template apply<T>(e, j) over every element, rows in parallel.
template <bool kChannelsLast, typename acc_t, typename F>
void for_each_element(const Shape& s, const F& f) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t rows = kChannelsLast ? s.m() : s.N * s.C;
  const int64_t row_len = kChannelsLast ? s.C : s.HW;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / row_len);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    // A local copy: at::vec's stores may alias anything, so members read through f would be
    // reloaded after every store; a local's stay in registers.
    const F fl = f;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * row_len;
      // NCHW rows index per-channel arrays by their channel, channels_last rows by position.
      const int64_t c = kChannelsLast ? 0 : r % s.C;
      int64_t i = 0;
      for (; i + V <= row_len; i += V) fl.template apply<Vec>(base + i, c + i * kChannelsLast);
      for (; i < row_len; ++i) fl.template apply<acc_t>(base + i, c + i * kChannelsLast);
    }
  });
}

// Per-channel mean and scale (w * invstd) of both BatchNorm branches and their one bias (b, plus
// the residual's when it is BatchNorm'ed), the constants every pass uses.
template <bool kChannelsLast, typename acc_t>
struct Affine {
  ChannelArray<kChannelsLast, acc_t> mean, scale, bias, r_mean, r_scale;
};

// Pre-activation value act_in = (x - mean) * scale + bias + r_term at element e, channel j.
template <int kMode, bool kChannelsLast, typename T, typename acc_t, typename scalar_t>
inline T pre_activation(const Affine<kChannelsLast, acc_t>& a, const scalar_t* x,
                        const scalar_t* r, int64_t e, int64_t j, T* r_value) {
  T v = bn_centered(load_as<T>(x + e), a.mean.template get<T>(j), a.scale.template get<T>(j)) +
          a.bias.template get<T>(j);
  if constexpr (kMode != kNoResidual) {
    *r_value = load_as<T>(r + e);
    if constexpr (kMode == kAddResidual) {
      v = v + *r_value;
    } else {
      v = v + bn_centered(*r_value, a.r_mean.template get<T>(j), a.r_scale.template get<T>(j));
    }
  }
  return v;
}

// ------------------------------------------------------------------ element functors

template <bool kChannelsLast, typename acc_t, typename scalar_t>
struct ShiftedMoments {  // sums of (x - pivot), (x - pivot)^2 [, the same for r]
  const scalar_t* x;
  const scalar_t* r;
  ChannelArray<kChannelsLast, acc_t> pivot, r_pivot;
  template <typename T, size_t K>
  void term(int64_t e, int64_t j, std::array<T, K>& acc) const {
    const T d = load_as<T>(x + e) - pivot.template get<T>(j);
    acc[0] = acc[0] + d;
    acc[1] = acc[1] + d * d;
    if constexpr (K == 4) {
      const T dr = load_as<T>(r + e) - r_pivot.template get<T>(j);
      acc[2] = acc[2] + dr;
      acc[3] = acc[3] + dr * dr;
    }
  }
};

template <int kMode, bool kChannelsLast, typename acc_t, typename scalar_t>
struct ForwardApply {
  const scalar_t* x;
  const scalar_t* r;
  scalar_t* out;
  Affine<kChannelsLast, acc_t> a;
  bool relu;
  template <typename T>
  void apply(int64_t e, int64_t j) const {
    T r_value;
    T v = pre_activation<kMode>(a, x, r, e, j, &r_value);
    store_as(out + e, relu ? relu_value(v) : v);
  }
};

// ReLU-masked gradient g at element e (also returns x and r there).
template <int kMode, bool kChannelsLast, typename T, typename acc_t, typename scalar_t>
inline T masked_grad(const Affine<kChannelsLast, acc_t>& a, const scalar_t* dy,
                     const scalar_t* x, const scalar_t* r, bool relu, int64_t e, int64_t j,
                     T* r_value) {
  const T g = load_as<T>(dy + e);
  if (!relu) {
    if constexpr (kMode != kNoResidual) *r_value = load_as<T>(r + e);
    return g;
  }
  return relu_grad(pre_activation<kMode>(a, x, r, e, j, r_value), g);
}

template <int kMode, bool kChannelsLast, typename acc_t, typename scalar_t>
struct BackwardSums {  // sum(g), sum(g * (x - mean)) [, sum(g * (r - r_mean))]
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* r;
  Affine<kChannelsLast, acc_t> a;
  ChannelArray<kChannelsLast, acc_t> mean, r_mean;
  bool relu;
  template <typename T, size_t K>
  void term(int64_t e, int64_t j, std::array<T, K>& acc) const {
    T r_value;
    const T g = masked_grad<kMode>(a, dy, x, r, relu, e, j, &r_value);
    acc[0] = acc[0] + g;
    acc[1] = acc[1] + g * (load_as<T>(x + e) - mean.template get<T>(j));
    if constexpr (kMode == kBatchNormResidual) {
      acc[2] = acc[2] + g * (r_value - r_mean.template get<T>(j));
    }
  }
};

template <int kMode, bool kChannelsLast, typename acc_t, typename scalar_t>
struct BackwardApply {
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* r;
  scalar_t* dx;
  scalar_t* dr;
  Affine<kChannelsLast, acc_t> a;
  // mean_g, mean_gxhat: bn_backward_coeffs per channel (a holds mean and scale = w * invstd)
  ChannelArray<kChannelsLast, acc_t> invstd, r_invstd, mean_g, mean_gxhat, r_mean_g,
      r_mean_gxhat;
  bool relu;
  bool batch_stats;
  template <typename T>
  void apply(int64_t e, int64_t j) const {
    T r_value;
    const T g = masked_grad<kMode>(a, dy, x, r, relu, e, j, &r_value);
    store_as(dx + e, bn_input_grad(batch_stats, g, load_as<T>(x + e), a.mean.template get<T>(j),
                                   invstd.template get<T>(j), a.scale.template get<T>(j),
                                   mean_g.template get<T>(j), mean_gxhat.template get<T>(j)));
    if constexpr (kMode == kAddResidual) {
      store_as(dr + e, g);
    } else if constexpr (kMode == kBatchNormResidual) {
      store_as(dr + e, bn_input_grad(batch_stats, g, r_value, a.r_mean.template get<T>(j),
                                     r_invstd.template get<T>(j), a.r_scale.template get<T>(j),
                                     r_mean_g.template get<T>(j),
                                     r_mean_gxhat.template get<T>(j)));
    }
  }
};

// ------------------------------------------------------------------ drivers

bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_activation(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device().is_cpu(), "resnet_fast cpu backend: ", name, " must be on the CPU");
  // Same dense layout as x (strides of size-1 dimensions do not matter: the kernels address
  // elements from the sizes and the layout alone).
  const bool same_layout = is_channels_last(x) ? t.is_contiguous(at::MemoryFormat::ChannelsLast)
                                               : t.is_contiguous();
  TORCH_CHECK(t.sizes() == x.sizes() && same_layout && t.scalar_type() == x.scalar_type(),
              "resnet_fast cpu backend: ", name, " must have input's shape, layout and dtype");
}

// The shape of x, checked to be a dense 4-D activation on the CPU.
Shape checked_shape(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "resnet_fast cpu backend: input must be 4-D, got ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "resnet_fast cpu backend: input must be dense NCHW or channels_last");
  TORCH_CHECK(x.device().is_cpu(), "resnet_fast cpu backend: input must be on the CPU");
  return {x.size(0), x.size(1), x.size(2) * x.size(3)};
}

// Calls f(std::integral_constant<bool, channels_last>) so kernels get the layout at compile time.
template <typename F>
void dispatch_layout(bool channels_last, const F& f) {
  if (channels_last) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Calls f(integral_constant<int, mode>, integral_constant<bool, channels_last>).
template <typename F>
void dispatch_mode_layout(int mode, bool channels_last, const F& f) {
  dispatch_layout(channels_last, [&](auto cl_c) {
    switch (mode) {
      case kNoResidual: f(std::integral_constant<int, kNoResidual>{}, cl_c); break;
      case kAddResidual: f(std::integral_constant<int, kAddResidual>{}, cl_c); break;
      default: f(std::integral_constant<int, kBatchNormResidual>{}, cl_c); break;
    }
  });
}

// Converts an array accessor between layouts (the pointer is the same).
template <bool kCL, typename acc_t>
ChannelArray<kCL, acc_t> as_layout(ChannelArray<true, acc_t> c) {
  return {c.p};
}

template <bool kCL, typename acc_t>
Affine<kCL, acc_t> as_layout(const Affine<true, acc_t>& a) {
  return {as_layout<kCL>(a.mean), as_layout<kCL>(a.scale), as_layout<kCL>(a.bias),
          as_layout<kCL>(a.r_mean), as_layout<kCL>(a.r_scale)};
}

int residual_mode(const std::optional<at::Tensor>& residual, bool residual_bn) {
  if (!residual.has_value()) return kNoResidual;
  return residual_bn ? kBatchNormResidual : kAddResidual;
}

// What the forward and the backward derive from their inputs.
struct Problem {
  Shape s;
  int mode;   // ResidualMode
  bool cl;    // channels_last
  int64_t B;  // BatchNorm branches: 2 with residual_bn
  at::TensorOptions acc;
};

// Checks the inputs, in this order: x a dense CPU activation, grad_out (when given) like x,
// residual_bn's residual, weight and bias given, the residual like x.
Problem checked_problem(const BnActInputs& in, const at::Tensor* grad_out) {
  const at::Tensor& x = in.x;
  const Shape s = checked_shape(x);
  if (grad_out != nullptr) check_activation("grad_out", *grad_out, x);
  TORCH_CHECK(!in.residual_bn || (in.residual.has_value() && in.residual_weight.has_value() &&
                                  in.residual_bias.has_value()),
              "resnet_fast cpu backend: residual_bn needs residual, its weight and bias");
  if (in.residual.has_value()) check_activation("residual", *in.residual, x);
  return {s, residual_mode(in.residual, in.residual_bn), is_channels_last(x),
          in.residual_bn ? 2 : 1, acc_options(x)};
}

// Fills the affine rows (mean, scale, bias, r_mean, r_scale; see Affine) from save_stats
// (mean, invstd per branch) and the branches' weight and bias.
template <typename acc_t>
void fill_affine(const acc_t* stats, int64_t branches, int64_t C,
                 const std::array<const at::Tensor*, 2>& weight,
                 const std::array<const at::Tensor*, 2>& bias, acc_t* affine) {
  for (int64_t br = 0; br < branches; ++br) {
    const acc_t* wp = weight[br]->data_ptr<acc_t>();
    const acc_t* bp = bias[br]->data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      const int64_t row = br == 0 ? 0 : 3;  // rows of this branch's mean and scale
      affine[row * C + c] = stats[(br * 2) * C + c];
      affine[(row + 1) * C + c] = wp[c] * stats[(br * 2 + 1) * C + c];
      affine[2 * C + c] = br == 0 ? bp[c] : affine[2 * C + c] + bp[c];
    }
  }
}

template <typename acc_t>
Affine<true, acc_t> affine_view(const acc_t* p, int64_t C) {
  return {{p}, {p + C}, {p + 2 * C}, {p + 3 * C}, {p + 4 * C}};
}

// Batch statistics of x (and of r when it is given: the BatchNorm'ed residual) in one read:
// stats (B, 2, C) gets (mean, invstd) per branch and, when nr is given, the branches' running
// statistics updated with momentum go to nr (B, 2, C).
template <typename scalar_t, typename acc_t>
void batch_statistics(const Shape& s, bool cl, const scalar_t* xp, const scalar_t* rp,
                      const std::array<const std::optional<at::Tensor>*, 2>& rm,
                      const std::array<const std::optional<at::Tensor>*, 2>& rv, bool tracks,
                      double momentum, double eps, acc_t* stats, acc_t* nr) {
  const int64_t C = s.C;
  const int64_t B = rp != nullptr ? 2 : 1;
  // Pivot of each channel: its first element (n = 0, hw = 0), or 0 where that is not finite.
  std::vector<double> pivots(static_cast<size_t>(2 * C), 0.0);
  const int64_t channel_step = cl ? 1 : s.HW;
  for (int64_t c = 0; c < C; ++c) {
    pivots[c] = bn_pivot(static_cast<double>(xp[c * channel_step]));
    if (rp != nullptr) pivots[C + c] = bn_pivot(static_cast<double>(rp[c * channel_step]));
  }
  // The shifted values and their squares in double: x - pivot is then exact, so the mean is
  // the correctly rounded mean of the data (as eager's double sums give it; a 1-ulp error in
  // the mean shows in the conv weight gradient that BatchNorm makes zero by symmetry), and
  // the squares of finite values near the float range do not overflow.
  std::vector<double> sums(static_cast<size_t>(4 * C));
  dispatch_layout(cl, [&](auto cl_c) {
    constexpr bool kCL = decltype(cl_c)::value;
    const ShiftedMoments<kCL, double, scalar_t> f{xp, rp, {pivots.data()}, {pivots.data() + C}};
    if (rp != nullptr) {
      reduce_per_channel<4, kCL, double>(s, f, sums.data());
    } else {
      reduce_per_channel<2, kCL, double>(s, f, sums.data());
    }
  });
  const double m = static_cast<double>(s.m());
  for (int64_t br = 0; br < B; ++br) {
    const double* s1 = sums.data() + (2 * br) * C;
    const double* s2 = s1 + C;
    for (int64_t c = 0; c < C; ++c) {
      double mean, var, invstd;
      bn_stats_from_shifted_sums<double>(m, s1[c], s2[c], pivots[br * C + c], eps, &mean, &var,
                                         &invstd);
      stats[(br * 2) * C + c] = static_cast<acc_t>(mean);
      stats[(br * 2 + 1) * C + c] = static_cast<acc_t>(invstd);
      if (tracks) {
        double r_mean = rm[br]->value().data_ptr<acc_t>()[c];
        double r_var = rv[br]->value().data_ptr<acc_t>()[c];
        // From the variance as saved (acc_t), as the GPU backends and eager update: a variance
        // past the float range is inf there, and momentum 0 then gives NaN, as in eager.
        bn_running_update<double>(m, mean, static_cast<acc_t>(var), momentum, &r_mean, &r_var);
        nr[(br * 2) * C + c] = static_cast<acc_t>(r_mean);
        nr[(br * 2 + 1) * C + c] = static_cast<acc_t>(r_var);
      }
    }
  }
}

}  // namespace

BnActForwardResult bn_act_forward_cpu(const BnActForwardArgs& a) {
  const BnActInputs& in = a.in;
  const at::Tensor& x = in.x;
  const Problem p = checked_problem(in, nullptr);
  const int64_t C = p.s.C;
  const std::array<const std::optional<at::Tensor>*, 2> rm = {&a.running_mean,
                                                              &a.residual_running_mean};
  const std::array<const std::optional<at::Tensor>*, 2> rv = {&a.running_var,
                                                              &a.residual_running_var};
  for (int64_t br = 0; br < p.B; ++br) {
    TORCH_CHECK(rm[br]->has_value() == rv[br]->has_value() &&
                    rm[br]->has_value() == a.running_mean.has_value(),
                "resnet_fast cpu backend: running statistics must be given for every branch or none");
  }
  TORCH_CHECK(in.batch_stats || a.running_mean.has_value(),
              "resnet_fast cpu backend: eval needs running statistics");
  const bool tracks = in.batch_stats && a.running_mean.has_value();

  at::Tensor save_stats = at::empty({p.B, 2, C}, p.acc);
  at::Tensor new_running = tracks ? at::empty({p.B, 2, C}, p.acc) : at::empty({0}, p.acc);
  at::Tensor out = at::empty_like(x);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = in.residual.has_value() ? in.residual->data_ptr<scalar_t>() : nullptr;
    acc_t* stats = save_stats.data_ptr<acc_t>();
    if (in.batch_stats) {
      batch_statistics<scalar_t, acc_t>(p.s, p.cl, xp, in.residual_bn ? rp : nullptr, rm, rv,
                                        tracks, a.momentum, a.eps, stats,
                                        tracks ? new_running.data_ptr<acc_t>() : nullptr);
    } else {
      for (int64_t br = 0; br < p.B; ++br) {
        const acc_t* mp = rm[br]->value().data_ptr<acc_t>();
        const acc_t* vp = rv[br]->value().data_ptr<acc_t>();
        for (int64_t c = 0; c < C; ++c) {
          stats[(br * 2) * C + c] = mp[c];
          stats[(br * 2 + 1) * C + c] = bn_invstd<acc_t>(vp[c], static_cast<acc_t>(a.eps));
        }
      }
    }
    std::vector<acc_t> affine(static_cast<size_t>(5 * C));  // see fill_affine
    acc_t* aff = affine.data();
    fill_affine<acc_t>(stats, p.B, C, {&in.weight, in.residual_bn ? &*in.residual_weight : nullptr},
                       {&in.bias, in.residual_bn ? &*in.residual_bias : nullptr}, aff);
    scalar_t* op = out.data_ptr<scalar_t>();
    dispatch_mode_layout(p.mode, p.cl, [&](auto mode_c, auto cl_c) {
      constexpr int kMode = decltype(mode_c)::value;
      constexpr bool kCL = decltype(cl_c)::value;
      const ForwardApply<kMode, kCL, acc_t, scalar_t> f{
          xp, rp, op, as_layout<kCL>(affine_view(aff, C)), in.relu};
      for_each_element<kCL, acc_t>(p.s, f);
    });
  });
  return {out, save_stats, new_running};
}

BnActBackwardResult bn_act_backward_cpu(const BnActBackwardArgs& a) {
  const BnActInputs& in = a.in;
  const at::Tensor& x = in.x;
  const Problem p = checked_problem(in, &a.grad_out);
  const int64_t C = p.s.C;
  const at::Tensor& save_stats = a.save_stats;
  TORCH_CHECK(save_stats.sizes() == at::IntArrayRef({p.B, 2, C}) && save_stats.is_contiguous() &&
                  save_stats.scalar_type() == p.acc.dtype().toScalarType(),
              "resnet_fast cpu backend: save_stats must be a contiguous (", p.B, ", 2, ", C,
              ") tensor of the accumulation dtype");

  at::Tensor grad_input = at::empty_like(x);
  at::Tensor grad_residual = in.residual.has_value() ? at::empty_like(x) : at::empty({0}, p.acc);
  at::Tensor grad_weight = at::empty({C}, p.acc);
  at::Tensor grad_bias = at::empty({C}, p.acc);
  at::Tensor grad_residual_weight = at::empty({in.residual_bn ? C : 0}, p.acc);
  at::Tensor grad_residual_bias = at::empty({in.residual_bn ? C : 0}, p.acc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dyp = a.grad_out.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = in.residual.has_value() ? in.residual->data_ptr<scalar_t>() : nullptr;
    const acc_t* stats = save_stats.data_ptr<acc_t>();
    const std::array<const at::Tensor*, 2> w = {&in.weight,
                                                in.residual_bn ? &*in.residual_weight : nullptr};
    std::vector<acc_t> affine(static_cast<size_t>(5 * C));  // see fill_affine
    acc_t* aff = affine.data();
    fill_affine<acc_t>(stats, p.B, C, w, {&in.bias, in.residual_bn ? &*in.residual_bias : nullptr},
                       aff);

    // sum(g), sum(g * (x - mean)) [, sum(g * (r - r_mean))]
    std::vector<double> sums(static_cast<size_t>(3 * C));
    dispatch_mode_layout(p.mode, p.cl, [&](auto mode_c, auto cl_c) {
      constexpr int kMode = decltype(mode_c)::value;
      constexpr bool kCL = decltype(cl_c)::value;
      const BackwardSums<kMode, kCL, acc_t, scalar_t> f{
          dyp, xp, rp, as_layout<kCL>(affine_view(aff, C)), {stats}, {stats + 2 * C}, in.relu};
      reduce_per_channel<kMode == kBatchNormResidual ? 3 : 2, kCL, acc_t>(p.s, f, sums.data());
    });

    const acc_t m = static_cast<acc_t>(p.s.m());
    // mean_g, mean_gxhat, then the residual's
    std::vector<acc_t> coeffs(static_cast<size_t>(4 * C));
    acc_t* k = coeffs.data();
    std::array<acc_t*, 2> gw = {grad_weight.data_ptr<acc_t>(),
                                in.residual_bn ? grad_residual_weight.data_ptr<acc_t>() : nullptr};
    std::array<acc_t*, 2> gb = {grad_bias.data_ptr<acc_t>(),
                                in.residual_bn ? grad_residual_bias.data_ptr<acc_t>() : nullptr};
    for (int64_t br = 0; br < p.B; ++br) {
      const double* sum_gc = sums.data() + (1 + br) * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t sum_g = static_cast<acc_t>(sums[c]);
        const acc_t gc = static_cast<acc_t>(sum_gc[c]);
        const acc_t invstd = stats[(br * 2 + 1) * C + c];
        gb[br][c] = sum_g;
        gw[br][c] = bn_weight_grad(gc, invstd);
        bn_backward_coeffs<acc_t>(m, sum_g, gc, invstd, in.batch_stats, k + (2 * br) * C + c,
                                  k + (2 * br + 1) * C + c);
      }
    }

    scalar_t* dxp = grad_input.data_ptr<scalar_t>();
    scalar_t* drp = in.residual.has_value() ? grad_residual.data_ptr<scalar_t>() : nullptr;
    dispatch_mode_layout(p.mode, p.cl, [&](auto mode_c, auto cl_c) {
      constexpr int kMode = decltype(mode_c)::value;
      constexpr bool kCL = decltype(cl_c)::value;
      const BackwardApply<kMode, kCL, acc_t, scalar_t> f{
          dyp, xp, rp, dxp, drp, as_layout<kCL>(affine_view(aff, C)), {stats + C},
          {stats + 3 * C}, {k}, {k + C}, {k + 2 * C}, {k + 3 * C}, in.relu, in.batch_stats};
      for_each_element<kCL, acc_t>(p.s, f);
    });
  });
  return {grad_input, grad_weight, grad_bias, grad_residual, grad_residual_weight,
          grad_residual_bias};
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x,
                                                const std::optional<at::Tensor>& running_mean,
                                                const std::optional<at::Tensor>& running_var,
                                                double momentum, double eps) {
  const Shape s = checked_shape(x);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "resnet_fast cpu backend: running_mean and running_var must both be given or none");
  const auto acc_opts = acc_options(x);
  const bool tracks = running_mean.has_value();
  at::Tensor save_stats = at::empty({2, s.C}, acc_opts);
  at::Tensor new_running = tracks ? at::empty({2, s.C}, acc_opts) : at::empty({0}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    batch_statistics<scalar_t, acc_t>(s, is_channels_last(x), x.data_ptr<scalar_t>(), nullptr,
                                      {&running_mean, nullptr}, {&running_var, nullptr}, tracks,
                                      momentum, eps, save_stats.data_ptr<acc_t>(),
                                      tracks ? new_running.data_ptr<acc_t>() : nullptr);
  });
  return {save_stats, new_running};
}

at::Tensor bn_apply_cpu(const at::Tensor& x, const at::Tensor& stats, const at::Tensor& weight,
                        const at::Tensor& bias, bool relu) {
  const Shape s = checked_shape(x);
  const auto acc_opts = acc_options(x);
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({2, s.C}) && stats.is_contiguous() &&
                  stats.scalar_type() == acc_opts.dtype().toScalarType(),
              "resnet_fast cpu backend: stats must be a contiguous (2, ", s.C,
              ") tensor of the accumulation dtype");
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> affine(static_cast<size_t>(5 * s.C));  // r_* unused
    acc_t* aff = affine.data();
    fill_affine<acc_t>(stats.data_ptr<acc_t>(), 1, s.C, {&weight, nullptr}, {&bias, nullptr},
                       aff);
    dispatch_layout(is_channels_last(x), [&](auto cl_c) {
      constexpr bool kCL = decltype(cl_c)::value;
      const ForwardApply<kNoResidual, kCL, acc_t, scalar_t> f{
          x.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(),
          as_layout<kCL>(affine_view(aff, s.C)), relu};
      for_each_element<kCL, acc_t>(s, f);
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace resnet_fast
