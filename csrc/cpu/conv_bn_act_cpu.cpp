// CPU path of the fused conv + BatchNorm (+ residual) + ReLU op's forward in training (and in
// eval where backward needs the conv output): PyTorch's convolution composed with the bn_act
// kernels of bn_act.cpp, in C++ so that a layer costs no Python. The arguments are the op's,
// normalised here (tensor_args.h). Its backward is the composite every backend shares
// (../conv_bn_act_backward.cpp).

#include "conv_bn_act_cpu.h"

#include "bn_act_cpu.h"
#include "tensor_args.h"

namespace resnet_fast {
namespace cpu {

at::Tensor conv_input(const at::Tensor& x, const std::optional<at::Tensor>& in_weight,
                      const std::optional<at::Tensor>& in_bias,
                      const std::optional<at::Tensor>& in_stats, bool in_relu) {
  if (!in_stats.has_value() || !in_stats->defined()) return x;
  const auto acc = acc_options(x);
  const int64_t C = x.size(1);
  return bn_apply_cpu(x, *per_channel(in_stats, acc), affine_param(in_weight, C, 1.0, acc),
                      affine_param(in_bias, C, 0.0, acc), in_relu);
}

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

}  // namespace cpu
}  // namespace resnet_fast
