// The backward of resnet_fast::conv_bn_act, one composite for every backend and device: the
// BatchNorm (+ residual) + ReLU backward through the bn_act_backward op (the backend's kernels),
// the conv's through ATen's convolution_backward on the conv's input (normalised again when it
// was a deferred BatchNorm: never saved), then the input BatchNorm's backward, again through
// the op. Registered for CPU and CUDA tensors alike.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/conv_bn_act_cpu.h"
#include "op_signatures.h"
#include "stack_args.h"
#include "tensor_args.h"

namespace resnet_fast {
namespace {

// The conv's input: x, or x normalised (and rectified) by its deferred BatchNorm, whose batch
// statistics are in_stats: the cpu backend's one-pass kernel, else ATen in the statistics'
// dtype, returned in x's dtype and layout.
at::Tensor conv_input(const at::Tensor& x, const OptTensor& in_weight, const OptTensor& in_bias,
                      const OptTensor& in_stats, bool in_relu, const std::string& backend) {
  if (!in_stats.has_value()) return x;
  if (backend == "cpu") return cpu::conv_input(x, in_weight, in_bias, in_stats, in_relu);
  const at::Tensor mean = (*in_stats)[0], invstd = (*in_stats)[1];
  const at::Tensor scale = in_weight.has_value() ? in_weight->to(invstd.scalar_type()) * invstd
                                                 : invstd;
  const at::Tensor shift = in_bias.has_value() ? in_bias->to(scale.scalar_type()) - mean * scale
                                               : -mean * scale;
  at::Tensor y = at::addcmul(shift.view({1, -1, 1, 1}), x, scale.view({1, -1, 1, 1}));
  if (in_relu) y.relu_();
  return y.to(x.scalar_type()).contiguous(memory_format_of(x));
}

void conv_bn_act_backward_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  static const auto bn_act_backward =
      op_handle<BnActBackwardSig>("resnet_fast::bn_act_backward");
  StackArgs a(op, stack);
  const std::string backend = a.text("backend");
  const at::Tensor input = a.tensor("input"), weight = a.tensor("weight");
  const OptTensor conv_bias = a.optional("conv_bias");
  const OptTensor in_weight = a.optional("in_weight"), in_bias = a.optional("in_bias");
  const OptTensor in_stats = a.optional("in_stats");
  const bool in_relu = a.flag("in_relu"), input_grad = a.flag("input_grad");
  const std::vector<int64_t> stride = a.ints("stride"), padding = a.ints("padding");
  const std::vector<int64_t> dilation = a.ints("dilation");
  const int64_t groups = a.integer("groups");
  const at::MemoryFormat fmt = memory_format_of(input);
  const at::Tensor x = input.contiguous(fmt);
  const int64_t Cout = weight.size(0);
  const at::Tensor conv_in = conv_input(x, in_weight, in_bias, in_stats, in_relu, backend);

  at::Tensor grad_raw = a.tensor("grad_out");
  at::Tensor grad_bn_weight = empty_acc(x), grad_bn_bias = empty_acc(x);
  at::Tensor grad_residual = empty_acc(x);
  if (!a.flag("defer")) {
    at::Tensor raw = a.tensor("raw");
    if (!raw.numel()) {  // not kept by the forward: the conv once more
      raw = at::convolution(conv_in, weight, conv_bias, stride, padding, dilation,
                            /*transposed=*/false, {0, 0}, groups)
                .contiguous(fmt);
    }
    std::tie(grad_raw, grad_bn_weight, grad_bn_bias, grad_residual, std::ignore, std::ignore) =
        bn_act_backward.call(grad_raw.contiguous(fmt), raw, a.optional("bn_weight"),
                             a.optional("bn_bias"), a.optional("residual"), std::nullopt,
                             std::nullopt, a.tensor("save_stats").contiguous().unsqueeze(0),
                             /*residual_bn=*/false, a.flag("batch_stats"), a.flag("relu"),
                             backend);
  }
  const bool has_conv_bias = conv_bias.has_value();
  const std::vector<int64_t> bias_sizes = {Cout};
  auto [grad_a, grad_weight, grad_conv_bias] = at::convolution_backward(
      grad_raw.contiguous(fmt), conv_in, weight,
      has_conv_bias ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(), stride,
      padding, dilation, /*transposed=*/false, {0, 0}, groups,
      {input_grad, true, has_conv_bias});
  at::Tensor grad_input = input_grad ? grad_a.contiguous(fmt) : empty_acc(x);
  at::Tensor grad_in_weight = empty_acc(x), grad_in_bias = empty_acc(x);
  if (input_grad && in_stats.has_value()) {
    std::tie(grad_input, grad_in_weight, grad_in_bias, std::ignore, std::ignore, std::ignore) =
        bn_act_backward.call(grad_input, x, in_weight, in_bias, std::nullopt, std::nullopt,
                             std::nullopt, in_stats->to(acc_options(x).dtype().toScalarType()).unsqueeze(0),
                             /*residual_bn=*/false, /*batch_stats=*/true, in_relu, backend);
    grad_input = grad_input.contiguous(fmt);
  }
  a.finish({grad_input, grad_weight.contiguous(memory_format_of(weight)),
            has_conv_bias ? grad_conv_bias : empty_acc(x), grad_in_weight, grad_in_bias,
            grad_bn_weight, grad_bn_bias, grad_residual});
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("conv_bn_act_backward",
         torch::CppFunction::makeFromBoxedFunction<conv_bn_act_backward_kernel>());
}

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("conv_bn_act_backward",
         torch::CppFunction::makeFromBoxedFunction<conv_bn_act_backward_kernel>());
}

}  // namespace resnet_fast
