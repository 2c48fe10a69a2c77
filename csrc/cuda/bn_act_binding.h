// The CUDA entry points of the fused BatchNorm (+ residual) + ReLU op (bn_act_binding.cpp),
// which the op's CUDA kernel calls (../op_kernels.cpp): the arguments of ../bn_act_args.h on
// CUDA tensors, the results the CPU entry points' (../cpu/bn_act_cpu.h).
#pragma once

#include "../bn_act_args.h"

namespace resnet_fast {
namespace cuda {

BnActForwardResult bn_act_forward_cuda(const BnActForwardArgs& a);

BnActBackwardResult bn_act_backward_cuda(const BnActBackwardArgs& a);

}  // namespace cuda
}  // namespace resnet_fast
