// CPU entry points of the fused BatchNorm (+ residual) + ReLU op; the contract (arguments,
// layouts, returned tensors) is the backend interface documented in resnet_fast/ops.py, the
// arguments those of ../bn_act_args.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../bn_act_args.h"

namespace resnet_fast {
namespace cpu {

BnActForwardResult bn_act_forward_cpu(const BnActForwardArgs& a);

BnActBackwardResult bn_act_backward_cpu(const BnActBackwardArgs& a);

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
