// CPU path of the fused conv + BatchNorm (+ residual) + ReLU op's forward outside the folded
// oneDNN eval call: PyTorch's conv composed with the bn_act kernels in C++. Arguments and
// returned tensors are those of resnet_fast::conv_bn_act (resnet_fast/ops.py) without the
// trailing flags, normalised here: activations dense in the input's layout, absent BatchNorm
// weights and biases materialised, per-channel tensors in the accumulation dtype.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace resnet_fast {
namespace cpu {

// Returns (out, raw, save_stats (2, C), new_running (2, C) or empty). in_weight/in_bias/
// in_stats, when in_stats is given, normalise the input on load (the deferred BatchNorm of the
// previous layer).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_act_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& conv_bias,
    const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
    const std::vector<int64_t>& dilation, int64_t groups,
    const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias,
    const std::optional<at::Tensor>& in_stats, bool in_relu,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
    bool batch_stats, double momentum, double eps, bool relu, bool defer);

// The conv's input: x, or x normalised (and rectified) in one pass by the deferred BatchNorm of
// the previous layer, whose batch statistics are in_stats ((2, C): mean and invstd).
at::Tensor conv_input(const at::Tensor& x, const std::optional<at::Tensor>& in_weight,
                      const std::optional<at::Tensor>& in_bias,
                      const std::optional<at::Tensor>& in_stats, bool in_relu);

}  // namespace cpu
}  // namespace resnet_fast
