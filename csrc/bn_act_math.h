// Per-channel and per-element math of the fused BatchNorm + (add) + ReLU ops.
//
// Shared by the C++ CPU kernels (csrc/cpu/) and the CUDA kernels (csrc/cuda/), so the CPU
// tests check the exact expressions the GPU runs. No torch header: plain C++ that nvcc and
// the host compiler both accept. Per-element helpers are templates on the value type so the
// CPU kernels can instantiate them with at::vec::Vectorized<acc_t> as well as with scalars.
//
// Notation, per channel c over the m = N*H*W values of that channel:
//   mean = sum(x) / m,  var = sum((x - mean)^2) / m (biased, used to normalise),
//   invstd = 1 / sqrt(var + eps),  xhat = (x - mean) * invstd,
//   y = act(w * xhat + b + r_term)  =  act((x - mean) * scale + b + r_term)
//     with scale = w * invstd, and r_term = 0 (no residual), r (plain residual) or
//     (r - r_mean) * r_scale + r_b (residual that is itself BatchNorm'ed; its r_b is added to
//     b once per channel, so the kernels hold one bias for both branches).
//   x is centred before it is scaled, as eager's (x - mean) * invstd: the folded form
//   x * scale + (b - mean * scale) loses about ulp(|mean| * scale) where the mean is large
//   against the spread (a constant channel: scale = w / sqrt(eps)).
//
// Backward, with g = dy * [not (pre-activation <= 0)] (the ReLU mask, recomputed from x and r):
//   grad_b = sum(g),  grad_w = sum(g * xhat) = invstd * sum(g * (x - mean)),
//   batch statistics:  dx = w * invstd * (g - sum(g)/m - xhat * sum(g * xhat)/m)
//   fixed statistics (eval): dx = w * invstd * g
// Both are one elementwise pass once the channel's sums are known:
//   dx = ((g - mean_g) - xhat * mean_gxhat) * scale,  mean_g = sum(g)/m,
//   mean_gxhat = sum(g * xhat)/m (both 0 with fixed statistics), scale = w * invstd,
// with xhat formed per element as (x - mean) * invstd (bn_backward_coeffs() gives mean_g and
// mean_gxhat), for dx and for the BN'ed residual's gradient. g is centred before it is scaled,
// as in eager's (dy - mean(dy) - ...) * invstd * w: where xhat is 0 (a constant channel) the
// gradients of a channel then cancel exactly, as eager's do, and a weight gradient that is 0 by
// symmetry comes out 0 rather than rounding. Centring x before scaling keeps dx accurate when
// the channel's mean is large against its spread (x * k_x + k_c would cancel
// catastrophically), and normalising before the coefficient keeps it for huge values
// (|x| ~ 1e30: a single coefficient of (x - mean), ~ invstd^2, would underflow).
//
// Non-finite values follow eager PyTorch: relu(NaN) is NaN, the gradient passes where the
// pre-activation is NaN (threshold_backward zeroes it only where the value is <= 0), a channel
// whose sums are NaN or inf gets a NaN variance (never clamped to 0), and with fixed statistics
// dx does not read x at all, so a NaN or inf input gives a finite dx as in eager.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RF_HOST_DEVICE inline
#endif

namespace resnet_fast {

// ---------------------------------------------------------------- per element

// The BatchNorm transform of one value before its bias: (x - mean) * scale, scale = w * invstd.
// Every backend forms the pre-activation in one order: (x - mean) * scale + bias, then + r or
// + (r - r_mean) * r_scale.
template <typename T>
RF_HOST_DEVICE T bn_centered(T x, T mean, T scale) {
  return (x - mean) * scale;
}

// max(v, 0) that keeps NaN (fmax and most vector max instructions drop it).
RF_HOST_DEVICE float relu_value(float v) { return v < 0.f ? 0.f : v; }
RF_HOST_DEVICE double relu_value(double v) { return v < 0.0 ? 0.0 : v; }

// Gradient through the ReLU: 0 where the pre-activation is <= 0, else dy (PyTorch's
// threshold_backward: zero gradient at exactly 0, dy where the value is NaN).
RF_HOST_DEVICE float relu_grad(float pre, float dy) { return pre <= 0.f ? 0.f : dy; }
RF_HOST_DEVICE double relu_grad(double pre, double dy) { return pre <= 0.0 ? 0.0 : dy; }

// dx = ((g - mean_g) - (x - mean) * invstd * mean_gxhat) * scale with batch statistics,
// dx = g * scale with fixed ones (see bn_backward_coeffs); the fixed form leaves x out, so a
// non-finite x cannot reach dx.
template <typename T>
RF_HOST_DEVICE T bn_input_grad(bool batch_stats, T g, T x, T mean, T invstd, T scale, T mean_g,
                               T mean_gxhat) {
  return batch_stats ? ((g - mean_g) - ((x - mean) * invstd) * mean_gxhat) * scale : g * scale;
}

// ---------------------------------------------------------------- per channel

// The pivot of a channel's shifted sums: its first value, or 0 when that is inf or NaN
// (shifting by inf would make the channel's finite values NaN where eager's mean is inf).
template <typename A>
RF_HOST_DEVICE A bn_pivot(A first) {
  return first - first == A(0) ? first : A(0);
}

// Shifted sums: s1 = sum(x - pivot), s2 = sum((x - pivot)^2) over m values. Shifting by a
// value of the channel (its first element) keeps the variance exact for data whose mean is
// large against its spread, where raw sum / sum-of-squares would cancel catastrophically.
// The per-channel finish runs in double, the mean rounded once: where finite values overflow
// a float s2 (|x| ~ 1e30), d * d stays finite and the variance comes out +inf as eager's does,
// not inf - inf; an inf or NaN value of x makes s1 non-finite and the variance NaN, also as in
// eager.
template <typename A>
RF_HOST_DEVICE void bn_stats_from_shifted_sums(A m, A s1, A s2, A pivot, A eps,
                                               A* mean, A* var, A* invstd) {
  const double d = static_cast<double>(s1) / static_cast<double>(m);
  double v = static_cast<double>(s2) / static_cast<double>(m) - d * d;
  v = v < 0.0 ? 0.0 : v;  // rounding can make it slightly negative; NaN stays NaN
  *mean = static_cast<A>(static_cast<double>(pivot) + d);
  *var = static_cast<A>(v);
  *invstd = static_cast<A>(1.0 / std::sqrt(v + static_cast<double>(eps)));
}

// The normalising factor of a variance: 1 / sqrt(var + eps) (running variance in eval).
template <typename A>
RF_HOST_DEVICE A bn_invstd(A var, A eps) {
  return A(1) / std::sqrt(var + eps);
}

// nn.BatchNorm2d's running update: exponential average with factor `momentum`, the variance
// term unbiased (m / (m - 1)); m == 1 cannot happen in training (rejected up front).
template <typename A>
RF_HOST_DEVICE void bn_running_update(A m, A mean, A var, A momentum, A* running_mean,
                                      A* running_var) {
  const A unbiased = var * m / (m - A(1));
  *running_mean = (A(1) - momentum) * *running_mean + momentum * mean;
  *running_var = (A(1) - momentum) * *running_var + momentum * unbiased;
}

// grad_w = sum(g * xhat) = invstd * sum(g * (x - mean)), from the channel's sum_gc.
template <typename A>
RF_HOST_DEVICE A bn_weight_grad(A sum_gc, A invstd) {
  return sum_gc * invstd;
}

// The centring terms of dx (see bn_input_grad) from the channel's sums sum_g = sum(g),
// sum_gc = sum(g * (x - mean)): with batch statistics the mean and invstd depend on x, which
// adds mean_g = mean(g) and mean_gxhat = mean(g * xhat); with fixed statistics both are 0.
template <typename A>
RF_HOST_DEVICE void bn_backward_coeffs(A m, A sum_g, A sum_gc, A invstd, bool batch_stats,
                                       A* mean_g, A* mean_gxhat) {
  *mean_g = batch_stats ? sum_g / m : A(0);
  *mean_gxhat = batch_stats ? sum_gc * invstd / m : A(0);
}

}  // namespace resnet_fast
