// CPU path of the fused conv + BatchNorm (+ residual) + ReLU op outside the folded oneDNN eval
// call: PyTorch's conv composed with the bn_act kernels in C++, so a layer costs one call from
// Python per direction. Arguments and returned tensors are those of resnet_fast::conv_bn_act and
// its backward op (resnet_fast/ops.py) without the trailing flags, normalised here: activations
// dense in the input's layout, absent BatchNorm weights and biases materialised, per-channel
// tensors in the accumulation dtype.
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

// Returns (grad_input, grad_weight, grad_conv_bias, grad_in_weight, grad_in_bias,
// grad_bn_weight, grad_bn_bias, grad_residual): grad_input in the input's layout, grad_weight
// in the weight's; absent gradients are empty. An empty raw (the forward did not keep it) is
// recomputed: the conv once more, on the input it normalises for the weight gradient anyway.
// Without input_grad the input side (grad_input, and the input BatchNorm's grad_in_weight and
// grad_in_bias) is not computed and comes back empty: the conv's data gradient is skipped.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
conv_bn_act_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                         const at::Tensor& weight,
                         const std::optional<at::Tensor>& conv_bias,
                         const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                         const std::vector<int64_t>& dilation, int64_t groups,
                         const std::optional<at::Tensor>& in_weight,
                         const std::optional<at::Tensor>& in_bias,
                         const std::optional<at::Tensor>& in_stats, bool in_relu,
                         const std::optional<at::Tensor>& bn_weight,
                         const std::optional<at::Tensor>& bn_bias,
                         const std::optional<at::Tensor>& residual, const at::Tensor& raw,
                         const at::Tensor& save_stats, bool batch_stats, bool relu, bool defer,
                         bool input_grad);

}  // namespace cpu
}  // namespace resnet_fast
