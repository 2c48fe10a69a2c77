// Torch binding of the CUDA kernels of the fused BatchNorm (+ residual) + ReLU op
// (bn_act_kernels.cu): cheap argument checks, the outputs and the scratch buffer allocated with
// torch on the input's device, and the launch on the current stream. The op's CUDA kernel
// (../op_kernels.cpp) calls these with the arguments it has normalised (../bn_act_args.h); the
// contract (layouts, returned tensors) is the backend interface documented in
// resnet_fast/ops.py.
#include "bn_act_binding.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <optional>
#include <tuple>

#include "bn_act_kernels.cuh"

namespace resnet_fast {
namespace cuda {
namespace {

#define RF_CHECK(cond, ...) TORCH_CHECK(cond, "resnet_fast cuda backend: ", __VA_ARGS__)

ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return ScalarKind::kHalf;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kFloat: return ScalarKind::kFloat;
    case at::kDouble: return ScalarKind::kDouble;
    default: RF_CHECK(false, "input dtype must be float16, bfloat16, float32 or float64, got ", t);
  }
}

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Dense in both layouts (H = W = 1, or C = 1) counts as NCHW.
bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

ActivationShape activation_shape(const at::Tensor& x) {
  RF_CHECK(x.is_cuda(), "input must be a CUDA tensor, got one on ", x.device());
  RF_CHECK(x.dim() == 4, "input must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  RF_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
           "input must be dense NCHW or channels_last");
  RF_CHECK(x.numel() > 0, "input must not be empty");
  ActivationShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.HW = x.size(2) * x.size(3);
  s.channels_last = is_channels_last(x);
  s.dtype = scalar_kind(x.scalar_type());
  return s;
}

// An activation-shaped tensor (residual, grad_out) must match the input exactly.
void check_like_input(const char* name, const at::Tensor& t, const at::Tensor& x) {
  RF_CHECK(t.device() == x.device(), name, " must be on the input's device ", x.device(),
           ", got ", t.device());
  // Same dense layout as x (strides of size-1 dimensions do not matter: the kernels address
  // elements from the sizes and the layout alone).
  const bool same_layout = is_channels_last(x) ? t.is_contiguous(at::MemoryFormat::ChannelsLast)
                                               : t.is_contiguous();
  RF_CHECK(t.sizes() == x.sizes() && same_layout && t.scalar_type() == x.scalar_type(),
           name, " must have the input's shape, layout and dtype");
}

void check_per_channel(const char* name, const at::Tensor& t, const at::Tensor& x) {
  RF_CHECK(t.device() == x.device(), name, " must be on the input's device ", x.device(),
           ", got ", t.device());
  RF_CHECK(t.scalar_type() == acc_dtype(x) && t.is_contiguous() && t.numel() == x.size(1),
           name, " must be a contiguous (C,) tensor of ", acc_dtype(x), " with C = ", x.size(1));
}

void check_optional_per_channel(const char* name, const std::optional<at::Tensor>& t,
                                const at::Tensor& x) {
  if (t.has_value()) check_per_channel(name, *t, x);
}

const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

// The memory format the op layer's fake kernels give activation outputs: the input's.
at::Tensor empty_like_input(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(is_channels_last(x)
                                                            ? at::MemoryFormat::ChannelsLast
                                                            : at::MemoryFormat::Contiguous));
}

int multiprocessor_count(const at::Tensor& x) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, x.get_device()));
  return count;
}

// The residual like x; with residual_bn, it and its BatchNorm's weight and bias given.
void check_residual(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                    const std::optional<at::Tensor>& residual_weight,
                    const std::optional<at::Tensor>& residual_bias, bool residual_bn) {
  if (residual.has_value()) check_like_input("residual", *residual, x);
  if (!residual_bn) return;
  RF_CHECK(residual.has_value() && residual_weight.has_value() && residual_bias.has_value(),
           "residual_bn needs residual, residual_weight and residual_bias");
  check_per_channel("residual_weight", *residual_weight, x);
  check_per_channel("residual_bias", *residual_bias, x);
}

// Launches p for x's device on the current stream, with a scratch buffer of the size the launch
// asks for.
template <typename Params>
void launch_with_scratch(Params& p, const at::Tensor& x, size_t (*scratch_bytes)(const Params&),
                         cudaError_t (*launch)(const Params&, void*, size_t, cudaStream_t)) {
  p.sm_count = multiprocessor_count(x);
  const size_t bytes = scratch_bytes(p);
  const at::Tensor scratch =
      at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  C10_CUDA_CHECK(launch(p, scratch.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

BnActForwardResult bn_act_forward_cuda(const BnActForwardArgs& a) {
  const at::Tensor& x = a.in.x;
  const at::Tensor &weight = a.in.weight, &bias = a.in.bias;
  const auto &residual = a.in.residual, &residual_weight = a.in.residual_weight,
             &residual_bias = a.in.residual_bias;
  const auto &running_mean = a.running_mean, &running_var = a.running_var;
  const auto &residual_running_mean = a.residual_running_mean,
             &residual_running_var = a.residual_running_var;
  const bool residual_bn = a.in.residual_bn, batch_stats = a.in.batch_stats, relu = a.in.relu;
  const double momentum = a.momentum, eps = a.eps;
  const ActivationShape shape = activation_shape(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  check_per_channel("weight", weight, x);
  check_per_channel("bias", bias, x);
  check_optional_per_channel("running_mean", running_mean, x);
  check_optional_per_channel("running_var", running_var, x);
  RF_CHECK(running_mean.has_value() == running_var.has_value(),
           "running_mean and running_var must be given together");
  RF_CHECK(batch_stats || running_mean.has_value(), "eval needs running statistics");
  check_residual(x, residual, residual_weight, residual_bias, residual_bn);
  if (residual_bn) {
    check_optional_per_channel("residual_running_mean", residual_running_mean, x);
    check_optional_per_channel("residual_running_var", residual_running_var, x);
    RF_CHECK(residual_running_mean.has_value() == running_mean.has_value() &&
                 residual_running_var.has_value() == running_mean.has_value(),
             "running statistics must be given for both BatchNorm branches or neither");
  }

  const int64_t branches = residual_bn ? 2 : 1;
  const bool tracks = batch_stats && running_mean.has_value();
  const auto acc_options = x.options().dtype(acc_dtype(x));
  at::Tensor out = empty_like_input(x);
  at::Tensor save_stats = at::empty({branches, 2, shape.C}, acc_options);
  at::Tensor new_running =
      tracks ? at::empty({branches, 2, shape.C}, acc_options) : at::empty({0}, acc_options);

  BnActForwardParams p;
  p.shape = shape;
  p.x = x.data_ptr();
  p.residual = data_or_null(residual);
  p.out = out.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = bias.data_ptr();
  p.running_mean = data_or_null(running_mean);
  p.running_var = data_or_null(running_var);
  if (residual_bn) {
    p.residual_weight = residual_weight->data_ptr();
    p.residual_bias = residual_bias->data_ptr();
    p.residual_running_mean = data_or_null(residual_running_mean);
    p.residual_running_var = data_or_null(residual_running_var);
  }
  p.save_stats = save_stats.data_ptr();
  p.new_running = tracks ? new_running.data_ptr() : nullptr;
  p.residual_bn = residual_bn;
  p.batch_stats = batch_stats;
  p.relu = relu;
  p.momentum = momentum;
  p.eps = eps;
  launch_with_scratch(p, x, bn_act_forward_scratch_bytes, bn_act_forward_launch);
  return {out, save_stats, new_running};
}

BnActBackwardResult bn_act_backward_cuda(const BnActBackwardArgs& a) {
  const at::Tensor &grad_out = a.grad_out, &x = a.in.x, &save_stats = a.save_stats;
  const at::Tensor &weight = a.in.weight, &bias = a.in.bias;
  const auto &residual = a.in.residual, &residual_weight = a.in.residual_weight,
             &residual_bias = a.in.residual_bias;
  const bool residual_bn = a.in.residual_bn, batch_stats = a.in.batch_stats, relu = a.in.relu;
  const ActivationShape shape = activation_shape(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  check_like_input("grad_out", grad_out, x);
  check_per_channel("weight", weight, x);
  check_per_channel("bias", bias, x);
  check_residual(x, residual, residual_weight, residual_bias, residual_bn);
  const int64_t branches = residual_bn ? 2 : 1;
  RF_CHECK(save_stats.device() == x.device() && save_stats.scalar_type() == acc_dtype(x) &&
               save_stats.is_contiguous() &&
               save_stats.sizes() == at::IntArrayRef({branches, 2, shape.C}),
           "save_stats must be a contiguous (", branches, ", 2, ", shape.C, ") tensor of ",
           acc_dtype(x), " on the input's device");

  const auto acc_options = x.options().dtype(acc_dtype(x));
  at::Tensor grad_input = empty_like_input(x);
  at::Tensor grad_weight = at::empty({shape.C}, acc_options);
  at::Tensor grad_bias = at::empty({shape.C}, acc_options);
  at::Tensor grad_residual =
      residual.has_value() ? empty_like_input(x) : at::empty({0}, acc_options);
  at::Tensor grad_residual_weight = at::empty({residual_bn ? shape.C : 0}, acc_options);
  at::Tensor grad_residual_bias = at::empty({residual_bn ? shape.C : 0}, acc_options);

  BnActBackwardParams p;
  p.shape = shape;
  p.grad_out = grad_out.data_ptr();
  p.x = x.data_ptr();
  p.residual = data_or_null(residual);
  p.weight = weight.data_ptr();
  p.bias = bias.data_ptr();
  p.save_stats = save_stats.data_ptr();
  p.grad_input = grad_input.data_ptr();
  p.grad_residual = residual.has_value() ? grad_residual.data_ptr() : nullptr;
  p.grad_weight = grad_weight.data_ptr();
  p.grad_bias = grad_bias.data_ptr();
  if (residual_bn) {
    p.residual_weight = residual_weight->data_ptr();
    p.residual_bias = residual_bias->data_ptr();
    p.grad_residual_weight = grad_residual_weight.data_ptr();
    p.grad_residual_bias = grad_residual_bias.data_ptr();
  }
  p.residual_bn = residual_bn;
  p.batch_stats = batch_stats;
  p.relu = relu;
  launch_with_scratch(p, x, bn_act_backward_scratch_bytes, bn_act_backward_launch);
  return {grad_input, grad_weight, grad_bias, grad_residual, grad_residual_weight,
          grad_residual_bias};
}

}  // namespace cuda
}  // namespace resnet_fast
