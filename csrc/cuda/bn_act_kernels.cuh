// Launchers of the CUDA kernels of the fused BatchNorm (+ residual) + ReLU op.
//
// Plain C++ on raw pointers, sizes and a stream, so the kernels compile with nvcc alone and the
// torch binding (bn_act_binding.cpp) stays a thin layer of checks and allocations. The contract
// (what every argument means, which may be absent) is the backend interface in
// resnet_fast/ops.py; the math is csrc/bn_act_math.h.
//
// A launch needs a scratch buffer in device memory for its per-channel partial sums: ask
// bn_act_*_scratch_bytes() with the same parameters on the same device, allocate that many
// bytes (any allocation of torch's caching allocator is aligned enough), and pass the buffer
// and its size to the launcher, which refuses (cudaErrorInvalidValue) a buffer too small.
// Nothing in the scratch needs initialising. Launchers return the first CUDA error they meet.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace resnet_fast {
namespace cuda {

// Element type of the activations (x, residual, out, grad_out, grad_input, grad_residual).
// Per-channel tensors are of the accumulation type: double for kDouble, float otherwise.
enum class ScalarKind { kHalf, kBFloat16, kFloat, kDouble };

// A dense (N, C, H, W) activation: NCHW puts element (n, c, hw) at (n*C + c)*HW + hw,
// channels_last puts element (m, c), m = n*HW + hw, at m*C + c.
struct ActivationShape {
  int64_t N = 0;
  int64_t C = 0;
  int64_t HW = 0;
  bool channels_last = false;
  ScalarKind dtype = ScalarKind::kFloat;
};

// Arguments of the forward op. Per-channel pointers point at C values of the accumulation type;
// save_stats and new_running at (B, 2, C) of it, B = 2 with residual_bn, else 1.
struct BnActForwardParams {
  ActivationShape shape;
  const void* x = nullptr;
  const void* residual = nullptr;  // null: no residual
  void* out = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  // With batch_stats: both given iff the running statistics are tracked; otherwise always given.
  const void* running_mean = nullptr;
  const void* running_var = nullptr;
  // residual_bn only: the residual's BatchNorm parameters and running statistics.
  const void* residual_weight = nullptr;
  const void* residual_bias = nullptr;
  const void* residual_running_mean = nullptr;
  const void* residual_running_var = nullptr;
  void* save_stats = nullptr;   // [b][0] mean, [b][1] invstd
  void* new_running = nullptr;  // [b][0] mean, [b][1] var; null unless batch_stats and tracked
  bool residual_bn = false;
  bool batch_stats = false;
  bool relu = true;
  double momentum = 0.1;
  double eps = 1e-5;
  int sm_count = 1;  // multiprocessors of the device: sizes the grids
};

// Arguments of the backward op; save_stats is the forward's.
struct BnActBackwardParams {
  ActivationShape shape;
  const void* grad_out = nullptr;
  const void* x = nullptr;
  const void* residual = nullptr;  // null: no residual
  const void* weight = nullptr;
  const void* bias = nullptr;
  const void* residual_weight = nullptr;  // residual_bn only
  const void* residual_bias = nullptr;    // residual_bn only
  const void* save_stats = nullptr;
  void* grad_input = nullptr;
  void* grad_residual = nullptr;         // given iff residual is
  void* grad_weight = nullptr;           // (C,)
  void* grad_bias = nullptr;             // (C,)
  void* grad_residual_weight = nullptr;  // (C,), residual_bn only
  void* grad_residual_bias = nullptr;    // (C,), residual_bn only
  bool residual_bn = false;
  bool batch_stats = true;
  bool relu = true;
  int sm_count = 1;
};

// Bytes of scratch the launch with these parameters needs on the current device (0 for eval
// forward; 0 also when the device cannot be queried, and the launch then reports why).
size_t bn_act_forward_scratch_bytes(const BnActForwardParams& p);
size_t bn_act_backward_scratch_bytes(const BnActBackwardParams& p);

// Training forward: a statistics kernel (per-channel partial sums) and an apply kernel.
// Eval forward: the apply kernel alone. Backward: a reduction kernel and an apply kernel.
cudaError_t bn_act_forward_launch(const BnActForwardParams& p, void* scratch,
                                  size_t scratch_bytes, cudaStream_t stream);
cudaError_t bn_act_backward_launch(const BnActBackwardParams& p, void* scratch,
                                   size_t scratch_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace resnet_fast
