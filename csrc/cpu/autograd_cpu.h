// The CPU backend's eager entry points of resnet_fast::bn_act and resnet_fast::conv_bn_act: the
// ops' forward with their autograd formula as C++ autograd functions, so an eager call costs one
// call from Python and a backward none. Arguments and outputs are the ops' (resnet_fast/ops.py)
// without the trailing backend arguments; torch.compile and the dispatcher use the registered
// ops, whose CPU implementation calls the same C++ functions.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace resnet_fast {
namespace cpu {

// Returns (out, save_stats, new_running).
std::vector<at::Tensor> bn_act_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& residual_weight,
    const std::optional<at::Tensor>& residual_bias,
    const std::optional<at::Tensor>& residual_running_mean,
    const std::optional<at::Tensor>& residual_running_var, bool residual_bn, bool training,
    double momentum, double eps, bool relu);

// Returns (out, raw, save_stats, new_running): the op's training path and its eval path that
// keeps the conv output for backward (arguments as the op's without save_raw and backend; the
// folded oneDNN eval call stays in resnet_fast/ops.py).
std::vector<at::Tensor> conv_bn_act_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& conv_bias,
    const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
    const std::vector<int64_t>& dilation, int64_t groups,
    const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias,
    const std::optional<at::Tensor>& in_stats, bool in_batch_stats, bool in_relu,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, bool batch_stats, double momentum, double eps,
    bool relu, bool defer);

}  // namespace cpu
}  // namespace resnet_fast
