// CPU entry points of the fused BatchNorm (+ residual) + ReLU op; the contract (arguments,
// layouts, returned tensors) is the backend interface documented in resnet_fast/ops.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace resnet_fast {
namespace cpu {

// Returns (out, save_stats, new_running).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_weight,
    const std::optional<at::Tensor>& residual_bias,
    const std::optional<at::Tensor>& residual_running_mean,
    const std::optional<at::Tensor>& residual_running_var, bool residual_bn, bool training,
    double momentum, double eps, bool relu);

// Returns (grad_input, grad_weight, grad_bias, grad_residual, grad_residual_weight,
// grad_residual_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bn_act_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                    const std::optional<at::Tensor>& residual_weight,
                    const std::optional<at::Tensor>& residual_bias, const at::Tensor& save_stats,
                    bool residual_bn, bool training, bool relu);

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
