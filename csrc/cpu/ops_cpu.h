// What Python sees of the registered CPU kernels of the resnet_fast ops (ops_cpu.cpp).
#pragma once

#include <torch/extension.h>

#include <string>

namespace resnet_fast {
namespace cpu {

// Sets the Python kernel of `op` ("bn_act", "bn_act_backward", "conv_bn_act",
// "conv_bn_act_backward"): it runs the calls on CPU tensors that the C++ kernels leave to
// Python (see ops_cpu.cpp).
void set_python_kernel(const std::string& op, pybind11::object kernel);

// Whether the cpu backend runs a conv layer of activation dtype `dtype` as PyTorch's conv
// composed with the bn_act kernels, in C++: in training (batch statistics), when backward needs
// the conv output, or for a dtype oneDNN's fused conv does not take; otherwise (eval) it is one
// folded oneDNN call.
bool runs_composite(at::ScalarType dtype, bool batch_stats, bool save_raw);

}  // namespace cpu
}  // namespace resnet_fast
