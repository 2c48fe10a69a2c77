// The arguments of the bn_act kernels that every device's entry points take (the CPU ones in
// cpu/bn_act_cpu.h, the CUDA ones in cuda/bn_act_binding.h), normalised by the op's kernel
// (op_kernels.cpp, tensor_args.h): activations dense in the input's layout, weights and biases
// materialised, per-channel tensors contiguous in the accumulation dtype. The contract (layouts,
// returned tensors) is the backend interface documented in resnet_fast/ops.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace resnet_fast {

// The tensors and flags the forward and the backward both take. The residual's weight and bias
// are read only with residual_bn, which needs them and the residual.
struct BnActInputs {
  at::Tensor x, weight, bias;
  std::optional<at::Tensor> residual, residual_weight, residual_bias;
  bool residual_bn;
  bool batch_stats;
  bool relu;
};

// The running statistics of each branch are given for every branch or none (the residual's only
// with residual_bn).
struct BnActForwardArgs {
  BnActInputs in;
  std::optional<at::Tensor> running_mean, running_var;
  std::optional<at::Tensor> residual_running_mean, residual_running_var;
  double momentum;
  double eps;
};

struct BnActBackwardArgs {
  BnActInputs in;
  at::Tensor grad_out;
  at::Tensor save_stats;
};

// (out, save_stats, new_running).
using BnActForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// (grad_input, grad_weight, grad_bias, grad_residual, grad_residual_weight, grad_residual_bias).
using BnActBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

}  // namespace resnet_fast
