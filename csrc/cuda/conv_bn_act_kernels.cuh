// Launcher of the CUTLASS implicit-GEMM conv2d (forward) with the BatchNorm fusions.
//
// Plain C++ on raw pointers, sizes and a stream, so the kernels compile with nvcc and CUTLASS's
// headers alone and the torch binding (conv_bn_act_binding.cpp) stays a thin layer of checks
// and allocations. One launch computes, for activations x (N, H, W, C) and weights (K, R, S, C),
// both dense and channels-innermost (NHWC / KRSC), the output y (N, P, Q, K), NHWC:
//
//   prologue  a[n,h,w,c] = act_in(x[n,h,w,c] * in_scale[c] + in_shift[c])   (on the loaded tile)
//             taps that fall into the zero padding stay exactly 0 (after the transform)
//   conv      acc[n,p,q,k] = sum_{r,s,c} a[n, p*sh - ph + r*dh, q*sw - pw + s*dw, c] * w[k,r,s,c]
//   epilogue  v = acc * out_scale[k] + out_shift[k] (+ residual[n,p,q,k]); y = act_out(v)
//   stats     optionally, per output channel k, the mean and the biased variance of v over the
//             N*P*Q output positions (before y is rounded to the element type)
//
// act_* is ReLU or the identity; ReLU keeps NaN. Each per-channel pointer is float32 and may be
// null: a null scale multiplies by 1, a null shift adds 0. The prologue is on when any of
// in_scale, in_shift, in_relu is set. A conv bias folds into out_shift (the binding does it).
// The three BatchNorm fusions are uses of this one launch:
//   eval / frozen BN:     out_scale, out_shift (+ residual) (+ relu); one pass, one store
//   training statistics:  out_shift = conv bias (or null), stats set; y is the pre-BN conv output
//   mainloop fusion:      in_scale, in_shift, in_relu = the previous BatchNorm's apply + ReLU,
//                         combined with either epilogue above
//
// Statistics need a scratch buffer in device memory: ask conv_bn_act_scratch_bytes() with the
// same parameters, allocate that many bytes (8-byte aligned; any allocation of torch's caching
// allocator is), and pass it with its size; nothing in it needs initialising. Without stats the
// scratch may be null. Launchers return the first CUDA error they meet; a problem the kernels do
// not support returns cudaErrorInvalidValue, and conv_bn_act_unsupported_reason() says why.
//
// Supported: float16 and bfloat16 tensors, groups == 1, C and K multiples of 8, R and S at most
// 32, any stride / padding / dilation, tensors of fewer than 2^31 elements, and a device of
// compute capability 8.0 or newer (the kernels are SM80 tensor-op kernels; they run on SM90).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace resnet_fast {
namespace cuda {

enum class ConvElement { kHalf, kBFloat16 };

// Sizes of a 2-D convolution; P and Q must be the output size the others imply.
struct Conv2dGeometry {
  int N = 0, H = 0, W = 0, C = 0;  // input, NHWC
  int K = 0, R = 0, S = 0;         // weights, KRSC
  int P = 0, Q = 0;                // output (N, P, Q, K), NHWC
  int pad_h = 0, pad_w = 0;
  int stride_h = 1, stride_w = 1;
  int dilation_h = 1, dilation_w = 1;
};

struct ConvBnActParams {
  Conv2dGeometry geometry;
  ConvElement element = ConvElement::kHalf;  // of x, weight, residual and y
  const void* x = nullptr;
  const void* weight = nullptr;
  // Prologue (per input channel, C values each).
  const float* in_scale = nullptr;
  const float* in_shift = nullptr;
  bool in_relu = false;
  // Epilogue (per output channel, K values each).
  const float* out_scale = nullptr;
  const float* out_shift = nullptr;
  const void* residual = nullptr;  // (N, P, Q, K) like y; null: none
  bool relu = false;
  void* y = nullptr;
  float* stats = nullptr;  // (2, K): [0] mean, [1] biased variance of v; null: no statistics
};

// Null when the launch with these parameters can run on the current device; otherwise a short
// sentence (static storage) naming what is not supported.
const char* conv_bn_act_unsupported_reason(const ConvBnActParams& p);

// Bytes of scratch the launch needs (0 without statistics).
size_t conv_bn_act_scratch_bytes(const ConvBnActParams& p);

// The conv kernel, and with statistics a small kernel merging its per-tile partial statistics.
cudaError_t conv_bn_act_launch(const ConvBnActParams& p, void* scratch, size_t scratch_bytes,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace resnet_fast
