// CPU path of the fused conv + BatchNorm (+ residual) + ReLU op's forward in training (and in
// eval where backward needs the conv output): PyTorch's convolution composed with the bn_act
// kernels of bn_act.cpp, in C++ so that a layer costs no Python. The arguments are the op's,
// normalised here (tensor_args.h). Its backward is the composite every backend shares
// (../conv_bn_act_backward.cpp).

#include "conv_bn_act_cpu.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include "bn_act_cpu.h"
#include "../tensor_args.h"

namespace resnet_fast {
namespace cpu {

namespace {

// Whether oneDNN runs bfloat16 convolutions on this CPU (AVX-512 BW/VL/DQ, AVX-NE-CONVERT, ...),
// as PyTorch decides it; without, oneDNN's fused conv refuses bfloat16.
bool onednn_takes_bfloat16() {
  static const bool takes = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("mkldnn::_is_mkldnn_bf16_supported", "")
                                .typed<bool()>()
                                .call();
  return takes;
}

}  // namespace

bool runs_composite(at::ScalarType dtype, bool batch_stats, bool save_raw) {
  const bool folds = dtype == at::kFloat || (dtype == at::kBFloat16 && onednn_takes_bfloat16());
  return batch_stats || save_raw || !folds;
}

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
    const StackArgs& a) {
  const bool batch_stats = a.flag("batch_stats"), defer = a.flag("defer");
  TORCH_CHECK(!defer || batch_stats,
              "resnet_fast cpu backend: defer needs batch statistics (training, or no running "
              "statistics)");
  const at::Tensor input = a.tensor("input"), weight = a.tensor("weight");
  const at::MemoryFormat fmt = memory_format_of(input);
  const at::Tensor x = input.contiguous(fmt);
  const auto acc = acc_options(x);
  const int64_t Cout = weight.size(0);
  const at::Tensor conv_in = conv_input(x, a.optional("in_weight"), a.optional("in_bias"),
                                        a.optional("in_stats"), a.flag("in_relu"));
  const at::Tensor raw =
      at::convolution(conv_in, weight, a.optional("conv_bias"), a.ints("stride"),
                      a.ints("padding"), a.ints("dilation"), /*transposed=*/false, {0, 0},
                      a.integer("groups"))
          .contiguous(fmt);
  const auto rm = per_channel(a.optional("running_mean"), acc);
  const auto rv = per_channel(a.optional("running_var"), acc);
  const double momentum = a.real("momentum"), eps = a.real("eps");
  if (defer) {
    auto [save_stats, new_running] = bn_stats_cpu(raw, rm, rv, momentum, eps);
    return {raw, empty_acc(x), save_stats, new_running};
  }
  const BnActInputs in{raw, affine_param(a.optional("bn_weight"), Cout, 1.0, acc),
                       affine_param(a.optional("bn_bias"), Cout, 0.0, acc),
                       dense(a.optional("residual"), fmt), std::nullopt, std::nullopt,
                       /*residual_bn=*/false, batch_stats, a.flag("relu")};
  auto [out, save_stats, new_running] =
      bn_act_forward_cpu({in, rm, rv, std::nullopt, std::nullopt, momentum, eps});
  return {out, raw, save_stats[0], new_running.numel() ? new_running[0] : empty_acc(x)};
}

}  // namespace cpu
}  // namespace resnet_fast
