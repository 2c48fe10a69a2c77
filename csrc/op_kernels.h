// What Python sees of the C++ kernels of the resnet_fast ops (op_kernels.cpp).
#pragma once

#include <torch/extension.h>

#include <string>

namespace resnet_fast {

// Sets the Python kernel of `op` ("bn_act", "bn_act_backward", "conv_bn_act"): it runs the calls
// that the C++ kernels leave to Python (see op_kernels.cpp).
void set_python_kernel(const std::string& op, pybind11::object kernel);

}  // namespace resnet_fast
