// Torch binding of the CUTLASS conv2d + BatchNorm fusions (conv_bn_act_kernels.cu).
#pragma once

#include <pybind11/pybind11.h>

namespace resnet_fast {

// Adds conv2d_bn_act_cuda to the extension module `m`.
void register_conv_cuda_bindings(pybind11::module_& m);

}  // namespace resnet_fast
