// CPU entry points of the fused BatchNorm (+ residual) + ReLU op; the contract (arguments,
// layouts, returned tensors) is the backend interface documented in resnet_fast/ops.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace resnet_fast {
namespace cpu {

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

// Returns (out, save_stats, new_running).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_forward_cpu(const BnActForwardArgs& a);

// Returns (grad_input, grad_weight, grad_bias, grad_residual, grad_residual_weight,
// grad_residual_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bn_act_backward_cpu(const BnActBackwardArgs& a);

// Batch statistics of x alone: returns (save_stats (2, C): mean and invstd, new_running: the
// running (mean, var) updated with momentum, (2, C), or empty when none are given).
std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x,
                                                const std::optional<at::Tensor>& running_mean,
                                                const std::optional<at::Tensor>& running_var,
                                                double momentum, double eps);

// act(batch_norm(x)) with known statistics (stats (2, C): mean and invstd) in one pass; weight
// and bias are materialised per-channel tensors of the accumulation dtype.
at::Tensor bn_apply_cpu(const at::Tensor& x, const at::Tensor& stats, const at::Tensor& weight,
                        const at::Tensor& bias, bool relu);

}  // namespace cpu
}  // namespace resnet_fast
