// The resnet_fast op library: the schemas of the four ops and the autograd formulas of the two
// differentiable ones. Their CPU and CUDA kernels are registered in op_kernels.cpp (the conv
// backward's in conv_bn_act_backward.cpp), the fake kernels from Python, in resnet_fast/ops.py,
// which documents what each op computes (every backend chosen by the trailing `backend`
// argument).
//
// The forward ops update the running statistics and batch counters they are given in place, as
// nn.BatchNorm2d does around aten's batch_norm: a training step dispatches one op per fused layer
// and no update around it (torch.compile functionalises the update). The autograd formulas are
// C++ so that a fused layer costs no Python beyond its kernel's launch in either direction.

#include <torch/autograd.h>
#include <torch/library.h>

#include "op_signatures.h"

#include <optional>
#include <string>
#include <tuple>

namespace resnet_fast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<Tensor> given(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

Tensor or_undefined(const OptTensor& t) { return t.value_or(Tensor()); }

// The gradient of an input that takes one, in its dtype; undefined otherwise.
Tensor grad_for(const Tensor& input, const Tensor& grad) {
  if (!input.defined() || !input.requires_grad()) return Tensor();
  return grad.to(input.scalar_type());
}

// The running statistics and counters an op updated: their versions move, as for an in-place op.
void bump_versions(std::initializer_list<const OptTensor*> tensors) {
  for (const OptTensor* t : tensors) {
    if (t->has_value() && (*t)->defined() && !(*t)->is_inference()) {
      torch::autograd::impl::bump_version(**t);
    }
  }
}

using SavedData = decltype(AutogradContext::saved_data);

// An autograd Function whose backward calls the op Derived::kBackward (of signature BackwardSig):
// the gradients of Derived's kInputs forward inputs, none when its output did not reach the
// loss, else those Derived::input_grads sets from the op, the output's gradient and what forward
// saved.
template <typename Derived, typename BackwardSig>
struct FusedFunction : public torch::autograd::Function<Derived> {
  using BackwardOp = c10::TypedOperatorHandle<BackwardSig>;

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op = op_handle<BackwardSig>(Derived::kBackward);
    variable_list grads(Derived::kInputs);
    if (grad_outputs[0].defined()) {
      Derived::input_grads(op, grad_outputs[0], ctx->get_saved_variables(), ctx->saved_data,
                           grads);
    }
    return grads;
  }
};

struct BnActFunction : public FusedFunction<BnActFunction, BnActBackwardSig> {
  static constexpr const char* kBackward = "resnet_fast::bn_act_backward";
  static constexpr size_t kInputs = 18;

  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
      const OptTensor& running_mean, const OptTensor& running_var,
      const OptTensor& num_batches_tracked, const OptTensor& residual,
      const OptTensor& residual_weight, const OptTensor& residual_bias,
      const OptTensor& residual_running_mean, const OptTensor& residual_running_var,
      const OptTensor& residual_num_batches_tracked, bool residual_bn, bool batch_stats,
      double momentum, double eps, bool relu, const std::string& backend) {
    static const auto op = op_handle<BnActSig>("resnet_fast::bn_act");
    Tensor out, save_stats;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, save_stats) =
          op.call(input, weight, bias, running_mean, running_var, num_batches_tracked,
                  residual, residual_weight, residual_bias, residual_running_mean,
                  residual_running_var, residual_num_batches_tracked, residual_bn, batch_stats,
                  momentum, eps, relu, backend);
    }
    ctx->mark_non_differentiable({save_stats});
    ctx->set_materialize_grads(false);  // the statistics output takes no gradient
    ctx->save_for_backward({input, or_undefined(weight), or_undefined(bias),
                            or_undefined(residual), or_undefined(residual_weight),
                            or_undefined(residual_bias), save_stats});
    ctx->saved_data["residual_bn"] = residual_bn;
    ctx->saved_data["batch_stats"] = batch_stats;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["backend"] = backend;
    return {out, save_stats};
  }

  static void input_grads(const BackwardOp& op, const Tensor& grad_out, const variable_list& saved,
                          SavedData& data, variable_list& grads) {
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2];
    const Tensor &residual = saved[3], &residual_weight = saved[4], &residual_bias = saved[5];
    auto [gx, gw, gb, gr, grw, grb] =
        op.call(grad_out, input, given(weight), given(bias), given(residual),
                given(residual_weight), given(residual_bias), saved[6],
                data["residual_bn"].toBool(), data["batch_stats"].toBool(), data["relu"].toBool(),
                data["backend"].toStringRef());
    grads[0] = gx;
    grads[1] = grad_for(weight, gw);
    grads[2] = grad_for(bias, gb);
    grads[6] = residual.defined() ? gr.to(residual.scalar_type()) : Tensor();
    grads[7] = grad_for(residual_weight, grw);
    grads[8] = grad_for(residual_bias, grb);
  }
};

std::tuple<Tensor, Tensor> bn_act_autograd(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, const OptTensor& residual,
    const OptTensor& residual_weight, const OptTensor& residual_bias,
    const OptTensor& residual_running_mean, const OptTensor& residual_running_var,
    const OptTensor& residual_num_batches_tracked, bool residual_bn, bool batch_stats,
    double momentum, double eps, bool relu, c10::string_view backend) {
  const variable_list outputs = BnActFunction::apply(
      input, weight, bias, running_mean, running_var, num_batches_tracked, residual,
      residual_weight, residual_bias, residual_running_mean, residual_running_var,
      residual_num_batches_tracked, residual_bn, batch_stats, momentum, eps, relu,
      std::string(backend));
  if (batch_stats) {
    bump_versions({&running_mean, &running_var, &num_batches_tracked, &residual_running_mean,
                   &residual_running_var, &residual_num_batches_tracked});
  }
  return {outputs[0], outputs[1]};
}

struct ConvBnActFunction : public FusedFunction<ConvBnActFunction, ConvBnActBackwardSig> {
  static constexpr const char* kBackward = "resnet_fast::conv_bn_act_backward";
  static constexpr size_t kInputs = 25;

  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const Tensor& weight,
      const OptTensor& conv_bias, at::IntArrayRef stride, at::IntArrayRef padding,
      at::IntArrayRef dilation, int64_t groups, const OptTensor& in_weight,
      const OptTensor& in_bias, const OptTensor& in_stats, bool in_relu,
      const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
      const OptTensor& running_var, const OptTensor& num_batches_tracked,
      const OptTensor& residual, bool batch_stats, double momentum, double eps, bool relu,
      bool defer, bool save_raw, bool recompute, const std::string& backend) {
    static const auto op = op_handle<ConvBnActSig>("resnet_fast::conv_bn_act");
    Tensor out, raw, save_stats;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, raw, save_stats) =
          op.call(input, weight, conv_bias, stride, padding, dilation, groups, in_weight,
                  in_bias, in_stats, in_relu, bn_weight, bn_bias, running_mean,
                  running_var, num_batches_tracked, residual, batch_stats, momentum, eps, relu,
                  defer, save_raw, recompute, backend);
    }
    ctx->mark_non_differentiable({raw, save_stats});
    ctx->set_materialize_grads(false);  // as for bn_act
    ctx->save_for_backward({input, weight, or_undefined(conv_bias), or_undefined(in_weight),
                            or_undefined(in_bias), or_undefined(in_stats),
                            or_undefined(bn_weight), or_undefined(bn_bias),
                            or_undefined(residual), raw, save_stats});
    auto& data = ctx->saved_data;
    data["stride"] = stride.vec();
    data["padding"] = padding.vec();
    data["dilation"] = dilation.vec();
    data["groups"] = groups;
    data["in_relu"] = in_relu;
    data["batch_stats"] = batch_stats;
    data["relu"] = relu;
    data["defer"] = defer;
    // The input side (the conv's data gradient, the input BatchNorm's) only where it is wanted:
    // not for a network's first conv, whose input is the data.
    const auto wants_grad = [](const OptTensor& t) { return t.has_value() && t->requires_grad(); };
    data["input_grad"] = input.requires_grad() || wants_grad(in_weight) || wants_grad(in_bias);
    data["backend"] = backend;
    return {out, raw, save_stats};
  }

  static void input_grads(const BackwardOp& op, const Tensor& grad_out, const variable_list& saved,
                          SavedData& data, variable_list& grads) {
    const Tensor &input = saved[0], &weight = saved[1], &conv_bias = saved[2];
    const Tensor &in_weight = saved[3], &in_bias = saved[4], &in_stats = saved[5];
    const Tensor &bn_weight = saved[6], &bn_bias = saved[7], &residual = saved[8];
    const bool defer = data["defer"].toBool();
    const std::vector<int64_t> stride = data["stride"].toIntVector();
    const std::vector<int64_t> padding = data["padding"].toIntVector();
    const std::vector<int64_t> dilation = data["dilation"].toIntVector();
    auto [gi, gw, gcb, giw, gib, gbw, gbb, gr] =
        op.call(grad_out, input, weight, given(conv_bias), stride, padding, dilation,
                data["groups"].toInt(), given(in_weight), given(in_bias), given(in_stats),
                data["in_relu"].toBool(), given(bn_weight), given(bn_bias), given(residual),
                saved[9], saved[10], data["batch_stats"].toBool(), data["relu"].toBool(), defer,
                data["input_grad"].toBool(), data["backend"].toStringRef());
    grads[0] = grad_for(input, gi);
    grads[1] = grad_for(weight, gw);
    grads[2] = grad_for(conv_bias, gcb);
    grads[7] = grad_for(in_weight, giw);
    grads[8] = grad_for(in_bias, gib);
    // Deferred, the BatchNorm's parameters get their gradients from the conv normalising on load.
    grads[11] = defer ? Tensor() : grad_for(bn_weight, gbw);
    grads[12] = defer ? Tensor() : grad_for(bn_bias, gbb);
    grads[16] = grad_for(residual, gr);
  }
};

std::tuple<Tensor, Tensor, Tensor> conv_bn_act_autograd(
    const Tensor& input, const Tensor& weight, const OptTensor& conv_bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const OptTensor& in_weight, const OptTensor& in_bias, const OptTensor& in_stats,
    bool in_relu, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, const OptTensor& residual, bool batch_stats,
    double momentum, double eps, bool relu, bool defer, bool save_raw, bool recompute,
    c10::string_view backend) {
  const variable_list outputs = ConvBnActFunction::apply(
      input, weight, conv_bias, stride, padding, dilation, groups, in_weight, in_bias, in_stats,
      in_relu, bn_weight, bn_bias, running_mean, running_var,
      num_batches_tracked, residual, batch_stats, momentum, eps, relu, defer, save_raw,
      recompute, std::string(backend));
  if (batch_stats) bump_versions({&running_mean, &running_var, &num_batches_tracked});
  return {outputs[0], outputs[1], outputs[2]};
}

}  // namespace

TORCH_LIBRARY(resnet_fast, m) {
  m.def(
      "bn_act(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, Tensor? residual, "
      "Tensor? residual_weight, Tensor? residual_bias, Tensor(d!)? residual_running_mean, "
      "Tensor(e!)? residual_running_var, Tensor(f!)? residual_num_batches_tracked, "
      "bool residual_bn, bool batch_stats, float momentum, float eps, bool relu, str backend) "
      "-> (Tensor, Tensor)");
  m.def(
      "bn_act_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor? residual, Tensor? residual_weight, Tensor? residual_bias, Tensor save_stats, "
      "bool residual_bn, bool batch_stats, bool relu, str backend) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "conv_bn_act(Tensor input, Tensor weight, Tensor? conv_bias, int[] stride, int[] padding, "
      "int[] dilation, int groups, Tensor? in_weight, Tensor? in_bias, Tensor? in_stats, "
      "bool in_relu, Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, Tensor? residual, "
      "bool batch_stats, float momentum, float eps, bool relu, bool defer, "
      "bool save_raw, bool recompute, str backend) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "conv_bn_act_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor? conv_bias, "
      "int[] stride, int[] padding, int[] dilation, int groups, Tensor? in_weight, "
      "Tensor? in_bias, Tensor? in_stats, bool in_relu, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor? residual, Tensor raw, Tensor save_stats, bool batch_stats, bool relu, "
      "bool defer, bool input_grad, str backend) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(resnet_fast, Autograd, m) {
  m.impl("bn_act", &bn_act_autograd);
  m.impl("conv_bn_act", &conv_bn_act_autograd);
}

}  // namespace resnet_fast
