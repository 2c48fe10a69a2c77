// Torch binding of the CUDA kernels of the fused BatchNorm (+ residual) + ReLU op.
#pragma once

#include <pybind11/pybind11.h>

namespace resnet_fast {

// Adds bn_act_forward_cuda and bn_act_backward_cuda to the extension module `m`.
void register_cuda_bindings(pybind11::module_& m);

}  // namespace resnet_fast
