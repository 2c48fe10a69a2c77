// CPU path of the fused conv + BatchNorm (+ residual) + ReLU op in training (and in eval where
// backward needs the conv output): PyTorch's convolution and convolution_backward composed with
// the bn_act kernels of bn_act.cpp. Nothing here is a new kernel; it runs in C++ so that a layer
// costs one call from Python per direction instead of a dozen small tensor operations.

#include "conv_bn_act_cpu.h"

#include "bn_act_cpu.h"
#include "tensor_args.h"

namespace resnet_fast {
namespace cpu {
namespace {

// The conv's input: x, or x normalised (and rectified) by the deferred BatchNorm of the
// previous layer, whose batch statistics are in_stats.
at::Tensor conv_input(const at::Tensor& x, const std::optional<at::Tensor>& in_weight,
                      const std::optional<at::Tensor>& in_bias,
                      const std::optional<at::Tensor>& in_stats, bool in_relu) {
  if (!in_stats.has_value()) return x;
  TORCH_CHECK(in_weight.has_value() && in_bias.has_value(),
              "resnet_fast cpu backend: in_stats needs in_weight and in_bias");
  return bn_apply_cpu(x, *in_stats, *in_weight, *in_bias, in_relu);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_act_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& conv_bias,
    const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
    const std::vector<int64_t>& dilation, int64_t groups,
    const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias,
    const std::optional<at::Tensor>& in_stats, bool in_relu, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
    bool batch_stats, double momentum, double eps, bool relu, bool defer) {
  TORCH_CHECK(!defer || batch_stats,
              "resnet_fast cpu backend: defer needs batch statistics (training, or no running "
              "statistics)");
  const at::Tensor a = conv_input(x, in_weight, in_bias, in_stats, in_relu);
  const at::Tensor raw = at::convolution(a, weight, conv_bias, stride, padding, dilation,
                                         /*transposed=*/false, {0, 0}, groups)
                             .contiguous(memory_format_of(x));
  if (defer) {
    auto [save_stats, new_running] = bn_stats_cpu(raw, running_mean, running_var, momentum, eps);
    return {raw, empty_acc(x), save_stats, new_running};
  }
  auto [out, save_stats, new_running] = bn_act_forward_cpu(
      raw, bn_weight, bn_bias, running_mean, running_var, residual, std::nullopt, std::nullopt,
      std::nullopt, std::nullopt, /*residual_bn=*/false, batch_stats, momentum, eps, relu);
  return {out, raw, save_stats[0], new_running.numel() ? new_running[0] : empty_acc(x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
conv_bn_act_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                         const at::Tensor& weight, bool has_conv_bias,
                         const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                         const std::vector<int64_t>& dilation, int64_t groups,
                         const std::optional<at::Tensor>& in_weight,
                         const std::optional<at::Tensor>& in_bias,
                         const std::optional<at::Tensor>& in_stats, bool in_batch_stats,
                         bool in_relu, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                         const std::optional<at::Tensor>& residual, const at::Tensor& raw,
                         const at::Tensor& save_stats, bool batch_stats, bool relu, bool defer) {
  const at::MemoryFormat layout = memory_format_of(x);
  at::Tensor grad_raw = grad_out;
  at::Tensor grad_bn_weight = empty_acc(x), grad_bn_bias = empty_acc(x);
  at::Tensor grad_residual = empty_acc(x);
  if (!defer) {
    auto grads = bn_act_backward_cpu(grad_out.contiguous(layout), raw, bn_weight, bn_bias,
                                     residual, std::nullopt, std::nullopt,
                                     save_stats.contiguous().unsqueeze(0), /*residual_bn=*/false,
                                     batch_stats, relu);
    grad_raw = std::get<0>(grads);
    grad_bn_weight = std::get<1>(grads);
    grad_bn_bias = std::get<2>(grads);
    grad_residual = std::get<3>(grads);
  }
  // The conv's input is recomputed, not saved, when the input was normalised on load.
  const at::Tensor a = conv_input(x, in_weight, in_bias, in_stats, in_relu);
  const std::vector<int64_t> bias_sizes = {weight.size(0)};
  auto [grad_a, grad_weight, grad_conv_bias] = at::convolution_backward(
      grad_raw.contiguous(layout), a, weight,
      has_conv_bias ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(), stride,
      padding, dilation, /*transposed=*/false, {0, 0}, groups, {true, true, has_conv_bias});
  at::Tensor grad_input = grad_a;
  at::Tensor grad_in_weight = empty_acc(x), grad_in_bias = empty_acc(x);
  if (in_stats.has_value()) {
    auto grads = bn_act_backward_cpu(grad_a.contiguous(layout), x, *in_weight, *in_bias,
                                     std::nullopt, std::nullopt, std::nullopt,
                                     in_stats->contiguous().unsqueeze(0), /*residual_bn=*/false,
                                     in_batch_stats, in_relu);
    grad_input = std::get<0>(grads);
    grad_in_weight = std::get<1>(grads);
    grad_in_bias = std::get<2>(grads);
  }
  return {grad_input,     grad_weight,   has_conv_bias ? grad_conv_bias : empty_acc(x),
          grad_in_weight, grad_in_bias,  grad_bn_weight,
          grad_bn_bias,   grad_residual};
}

}  // namespace cpu
}  // namespace resnet_fast
