// CPU path of the fused conv + BatchNorm (+ residual) + ReLU op in training (and in eval where
// backward needs the conv output): PyTorch's convolution and convolution_backward composed with
// the bn_act kernels of bn_act.cpp. Nothing here is a new kernel; it runs in C++ so that a layer
// costs one call from Python per direction instead of a dozen small tensor operations. The
// arguments are the op's, normalised here (tensor_args.h) for the registered op and the C++
// autograd function alike.

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
  if (!in_stats.has_value() || !in_stats->defined()) return x;
  const auto acc = acc_options(x);
  const int64_t C = x.size(1);
  return bn_apply_cpu(x, *per_channel(in_stats, acc), affine_param(in_weight, C, 1.0, acc),
                      affine_param(in_bias, C, 0.0, acc), in_relu);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_act_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& conv_bias,
    const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
    const std::vector<int64_t>& dilation, int64_t groups,
    const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias,
    const std::optional<at::Tensor>& in_stats, bool in_relu,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, bool batch_stats, double momentum, double eps,
    bool relu, bool defer) {
  TORCH_CHECK(!defer || batch_stats,
              "resnet_fast cpu backend: defer needs batch statistics (training, or no running "
              "statistics)");
  const at::MemoryFormat fmt = memory_format_of(input);
  const at::Tensor x = input.contiguous(fmt);
  const auto acc = acc_options(x);
  const int64_t Cout = weight.size(0);
  const at::Tensor a = conv_input(x, in_weight, in_bias, in_stats, in_relu);
  const at::Tensor raw = at::convolution(a, weight, conv_bias, stride, padding, dilation,
                                         /*transposed=*/false, {0, 0}, groups)
                             .contiguous(fmt);
  const auto rm = per_channel(running_mean, acc), rv = per_channel(running_var, acc);
  if (defer) {
    auto [save_stats, new_running] = bn_stats_cpu(raw, rm, rv, momentum, eps);
    return {raw, empty_acc(x), save_stats, new_running};
  }
  auto [out, save_stats, new_running] = bn_act_forward_cpu(
      raw, affine_param(bn_weight, Cout, 1.0, acc), affine_param(bn_bias, Cout, 0.0, acc), rm,
      rv, dense(residual, fmt), std::nullopt, std::nullopt, std::nullopt, std::nullopt,
      /*residual_bn=*/false, batch_stats, momentum, eps, relu);
  return {out, raw, save_stats[0], new_running.numel() ? new_running[0] : empty_acc(x)};
}

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
                         bool input_grad) {
  const at::MemoryFormat fmt = memory_format_of(input);
  const at::Tensor x = input.contiguous(fmt);
  const auto acc = acc_options(x);
  const int64_t Cin = x.size(1), Cout = weight.size(0);
  // The conv's input is recomputed, not saved, when the input was normalised on load.
  const at::Tensor a = conv_input(x, in_weight, in_bias, in_stats, in_relu);
  at::Tensor grad_raw = grad_out;
  at::Tensor grad_bn_weight = empty_acc(x), grad_bn_bias = empty_acc(x);
  at::Tensor grad_residual = empty_acc(x);
  if (!defer) {
    const at::Tensor conv_out =
        raw.numel() ? raw
                    : at::convolution(a, weight, conv_bias, stride, padding, dilation,
                                      /*transposed=*/false, {0, 0}, groups)
                          .contiguous(fmt);
    auto grads = bn_act_backward_cpu(
        grad_out.contiguous(fmt), conv_out, affine_param(bn_weight, Cout, 1.0, acc),
        affine_param(bn_bias, Cout, 0.0, acc), dense(residual, fmt), std::nullopt, std::nullopt,
        save_stats.contiguous().unsqueeze(0), /*residual_bn=*/false, batch_stats, relu);
    grad_raw = std::get<0>(grads);
    grad_bn_weight = std::get<1>(grads);
    grad_bn_bias = std::get<2>(grads);
    grad_residual = std::get<3>(grads);
  }
  const bool has_conv_bias = conv_bias.has_value() && conv_bias->defined();
  const std::vector<int64_t> bias_sizes = {Cout};
  auto [grad_a, grad_weight, grad_conv_bias] = at::convolution_backward(
      grad_raw.contiguous(fmt), a, weight,
      has_conv_bias ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(), stride,
      padding, dilation, /*transposed=*/false, {0, 0}, groups,
      {input_grad, true, has_conv_bias});
  at::Tensor grad_input = input_grad ? grad_a : empty_acc(x);
  at::Tensor grad_in_weight = empty_acc(x), grad_in_bias = empty_acc(x);
  if (input_grad && in_stats.has_value() && in_stats->defined()) {
    auto grads = bn_act_backward_cpu(
        grad_a.contiguous(fmt), x, affine_param(in_weight, Cin, 1.0, acc),
        affine_param(in_bias, Cin, 0.0, acc), std::nullopt, std::nullopt, std::nullopt,
        per_channel(in_stats, acc)->unsqueeze(0), /*residual_bn=*/false,
        /*batch_stats=*/true, in_relu);
    grad_input = std::get<0>(grads);
    grad_in_weight = std::get<1>(grads);
    grad_in_bias = std::get<2>(grads);
  }
  return {input_grad ? grad_input.contiguous(fmt) : grad_input,
          grad_weight.contiguous(memory_format_of(weight)),
          has_conv_bias ? grad_conv_bias : empty_acc(x),
          grad_in_weight,
          grad_in_bias,
          grad_bn_weight,
          grad_bn_bias,
          grad_residual};
}

}  // namespace cpu
}  // namespace resnet_fast
