// C++ autograd functions of the CPU backend (see autograd_cpu.h). Their forward and backward are
// the ops' formulas of resnet_fast/ops.py: normalise the arguments (tensor_args.h), run the
// kernels, save the pre-BN activations and statistics, and map the kernels' gradients back to
// the inputs that take one.

#include "autograd_cpu.h"

#include <torch/autograd.h>

#include "bn_act_cpu.h"
#include "conv_bn_act_cpu.h"
#include "tensor_args.h"

namespace resnet_fast {
namespace cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> given(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The gradient of an input that takes one, in its dtype; undefined otherwise.
at::Tensor grad_for(const at::Tensor& input, const at::Tensor& grad) {
  if (!input.defined() || !input.requires_grad()) return at::Tensor();
  return grad.to(input.scalar_type());
}

struct BnActFunction : public torch::autograd::Function<BnActFunction> {
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
      const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
      const std::optional<at::Tensor>& residual_weight,
      const std::optional<at::Tensor>& residual_bias,
      const std::optional<at::Tensor>& residual_running_mean,
      const std::optional<at::Tensor>& residual_running_var, bool residual_bn, bool training,
      double momentum, double eps, bool relu) {
    const at::MemoryFormat fmt = memory_format_of(input);
    const at::Tensor x = input.contiguous(fmt);
    const auto acc = acc_options(x);
    const int64_t C = x.size(1);
    auto outputs = bn_act_forward_cpu(
        x, affine_param(weight, C, 1.0, acc), affine_param(bias, C, 0.0, acc),
        per_channel(running_mean, acc), per_channel(running_var, acc), dense(residual, fmt),
        residual_bn ? given(affine_param(residual_weight, C, 1.0, acc)) : std::nullopt,
        residual_bn ? given(affine_param(residual_bias, C, 0.0, acc)) : std::nullopt,
        per_channel(residual_running_mean, acc), per_channel(residual_running_var, acc),
        residual_bn, training, momentum, eps, relu);
    const at::Tensor& save_stats = std::get<1>(outputs);
    ctx->mark_non_differentiable({save_stats, std::get<2>(outputs)});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            residual.value_or(at::Tensor()),
                            residual_weight.value_or(at::Tensor()),
                            residual_bias.value_or(at::Tensor()), save_stats});
    ctx->saved_data["residual_bn"] = residual_bn;
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    return {std::get<0>(outputs), save_stats, std::get<2>(outputs)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(15);
    if (!grad_outputs[0].defined()) return grads;  // the output did not reach the loss
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &bias = saved[2];
    const at::Tensor &residual = saved[3], &residual_weight = saved[4];
    const at::Tensor &residual_bias = saved[5], &save_stats = saved[6];
    const bool residual_bn = ctx->saved_data["residual_bn"].toBool();
    const at::MemoryFormat fmt = memory_format_of(input);
    const at::Tensor x = input.contiguous(fmt);
    const auto acc = acc_options(x);
    const int64_t C = x.size(1);
    auto [gx, gw, gb, gr, grw, grb] = bn_act_backward_cpu(
        grad_outputs[0].contiguous(fmt), x, affine_param(given(weight), C, 1.0, acc),
        affine_param(given(bias), C, 0.0, acc), dense(given(residual), fmt),
        residual_bn ? given(affine_param(given(residual_weight), C, 1.0, acc)) : std::nullopt,
        residual_bn ? given(affine_param(given(residual_bias), C, 0.0, acc)) : std::nullopt,
        save_stats.contiguous(), residual_bn, ctx->saved_data["training"].toBool(),
        ctx->saved_data["relu"].toBool());
    grads[0] = gx;
    grads[1] = grad_for(weight, gw);
    grads[2] = grad_for(bias, gb);
    grads[5] = residual.defined() ? gr.to(residual.scalar_type()) : at::Tensor();
    grads[6] = grad_for(residual_weight, grw);
    grads[7] = grad_for(residual_bias, grb);
    return grads;
  }
};

struct ConvBnActFunction : public torch::autograd::Function<ConvBnActFunction> {
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
      const std::optional<at::Tensor>& conv_bias, const std::vector<int64_t>& stride,
      const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, int64_t groups,
      const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias,
      const std::optional<at::Tensor>& in_stats, bool in_batch_stats, bool in_relu,
      const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
      const std::optional<at::Tensor>& running_mean,
      const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
      bool batch_stats, double momentum, double eps, bool relu, bool defer) {
    auto outputs = conv_bn_act_forward_cpu(
        input, weight, conv_bias, stride, padding, dilation, groups, in_weight, in_bias,
        in_stats, in_relu, bn_weight, bn_bias, running_mean, running_var, residual, batch_stats,
        momentum, eps, relu, defer);
    const at::Tensor &raw = std::get<1>(outputs), &save_stats = std::get<2>(outputs);
    ctx->mark_non_differentiable({raw, save_stats, std::get<3>(outputs)});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, weight, in_weight.value_or(at::Tensor()),
                            in_bias.value_or(at::Tensor()), in_stats.value_or(at::Tensor()),
                            bn_weight.value_or(at::Tensor()), bn_bias.value_or(at::Tensor()),
                            residual.value_or(at::Tensor()), raw, save_stats});
    ctx->saved_data["has_conv_bias"] = conv_bias.has_value() && conv_bias->defined();
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["in_batch_stats"] = in_batch_stats;
    ctx->saved_data["in_relu"] = in_relu;
    ctx->saved_data["batch_stats"] = batch_stats;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["defer"] = defer;
    return {std::get<0>(outputs), raw, save_stats, std::get<3>(outputs)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(22);
    if (!grad_outputs[0].defined()) return grads;  // the output did not reach the loss
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &in_weight = saved[2];
    const at::Tensor &in_bias = saved[3], &in_stats = saved[4], &bn_weight = saved[5];
    const at::Tensor &bn_bias = saved[6], &residual = saved[7], &raw = saved[8];
    const at::Tensor& save_stats = saved[9];
    auto& data = ctx->saved_data;
    const bool has_conv_bias = data["has_conv_bias"].toBool();
    const bool defer = data["defer"].toBool();
    auto [gi, gw, gcb, giw, gib, gbw, gbb, gr] = conv_bn_act_backward_cpu(
        grad_outputs[0], input, weight, has_conv_bias, data["stride"].toIntVector(),
        data["padding"].toIntVector(), data["dilation"].toIntVector(), data["groups"].toInt(),
        given(in_weight), given(in_bias), given(in_stats), data["in_batch_stats"].toBool(),
        data["in_relu"].toBool(), given(bn_weight), given(bn_bias), given(residual), raw,
        save_stats, data["batch_stats"].toBool(), data["relu"].toBool(), defer);
    grads[0] = grad_for(input, gi);
    grads[1] = grad_for(weight, gw);
    grads[2] = has_conv_bias ? gcb : at::Tensor();
    grads[7] = grad_for(in_weight, giw);
    grads[8] = grad_for(in_bias, gib);
    // Deferred, the BatchNorm's parameters get their gradients from the conv normalising on load.
    grads[12] = defer ? at::Tensor() : grad_for(bn_weight, gbw);
    grads[13] = defer ? at::Tensor() : grad_for(bn_bias, gbb);
    grads[16] = grad_for(residual, gr);
    return grads;
  }
};

}  // namespace

std::vector<at::Tensor> bn_act_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& residual_weight,
    const std::optional<at::Tensor>& residual_bias,
    const std::optional<at::Tensor>& residual_running_mean,
    const std::optional<at::Tensor>& residual_running_var, bool residual_bn, bool training,
    double momentum, double eps, bool relu) {
  return BnActFunction::apply(input, weight, bias, running_mean, running_var, residual,
                              residual_weight, residual_bias, residual_running_mean,
                              residual_running_var, residual_bn, training, momentum, eps, relu);
}

std::vector<at::Tensor> conv_bn_act_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& conv_bias,
    const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
    const std::vector<int64_t>& dilation, int64_t groups,
    const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias,
    const std::optional<at::Tensor>& in_stats, bool in_batch_stats, bool in_relu,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, bool batch_stats, double momentum, double eps,
    bool relu, bool defer) {
  return ConvBnActFunction::apply(input, weight, conv_bias, stride, padding, dilation, groups,
                                  in_weight, in_bias, in_stats, in_batch_stats, in_relu,
                                  bn_weight, bn_bias, running_mean, running_var, residual,
                                  batch_stats, momentum, eps, relu, defer);
}

}  // namespace cpu
}  // namespace resnet_fast
