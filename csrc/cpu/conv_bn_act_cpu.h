// CPU path of the fused conv + BatchNorm (+ residual) + ReLU op's forward outside the folded
// oneDNN eval call: PyTorch's conv composed with the bn_act kernels in C++. Its arguments are
// those of a resnet_fast::conv_bn_act call (resnet_fast/ops.py), read off the dispatcher's stack
// (../stack_args.h; save_raw, recompute and backend are its caller's) and normalised here:
// activations dense in the input's layout, absent BatchNorm weights and biases materialised,
// per-channel tensors in the accumulation dtype. The returned tensors are the op's and the
// updated running statistics.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../stack_args.h"

namespace resnet_fast {
namespace cpu {

// Returns (out, raw, save_stats (2, C), new_running (2, C) or empty) of the call whose arguments
// are `a`. in_weight/in_bias/in_stats, when in_stats is given, normalise the input on load (the
// deferred BatchNorm of the previous layer).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_act_forward_cpu(
    const StackArgs& a);

// The conv's input: x, or x normalised (and rectified) in one pass by the deferred BatchNorm of
// the previous layer, whose batch statistics are in_stats ((2, C): mean and invstd).
at::Tensor conv_input(const at::Tensor& x, const std::optional<at::Tensor>& in_weight,
                      const std::optional<at::Tensor>& in_bias,
                      const std::optional<at::Tensor>& in_stats, bool in_relu);

// Whether the cpu backend runs a conv layer of activation dtype `dtype` as PyTorch's conv
// composed with the bn_act kernels, in C++: in training (batch statistics), when backward needs
// the conv output, or for a dtype oneDNN's fused conv does not take (bfloat16 only where the CPU
// has oneDNN's bfloat16 support); otherwise (eval) it is one folded oneDNN call.
bool runs_composite(at::ScalarType dtype, bool batch_stats, bool save_raw);

}  // namespace cpu
}  // namespace resnet_fast
