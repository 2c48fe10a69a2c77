// The Python module resnet_fast._C: CPU kernels always, CUDA kernels when built with CUDA. The
// ops themselves are defined in ops.cpp, linked into the same module.
#include <torch/extension.h>

#include "cpu/bn_act_cpu.h"
#include "cpu/conv_bn_act_cpu.h"
#ifdef RESNET_FAST_WITH_CUDA
#include "cuda/bn_act_binding.h"
#include "cuda/conv_bn_act_binding.h"
#endif

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resnet_fast compiled kernels (see resnet_fast/ops.py for the backend interface)";
  m.def("bn_act_forward_cpu", &resnet_fast::cpu::bn_act_forward_cpu,
        "Fused BatchNorm (+ residual) + ReLU forward on CPU tensors", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("residual"), py::arg("residual_weight"), py::arg("residual_bias"),
        py::arg("residual_running_mean"), py::arg("residual_running_var"),
        py::arg("residual_bn"), py::arg("training"), py::arg("momentum"), py::arg("eps"),
        py::arg("relu"));
  m.def("bn_act_backward_cpu", &resnet_fast::cpu::bn_act_backward_cpu,
        "Gradients of the fused BatchNorm (+ residual) + ReLU on CPU tensors",
        py::arg("grad_out"), py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("residual"), py::arg("residual_weight"), py::arg("residual_bias"),
        py::arg("save_stats"), py::arg("residual_bn"), py::arg("training"), py::arg("relu"));
  m.def("bn_stats_cpu", &resnet_fast::cpu::bn_stats_cpu,
        "Batch statistics (mean, invstd) and updated running statistics of a CPU activation",
        py::arg("x"), py::arg("running_mean"), py::arg("running_var"), py::arg("momentum"),
        py::arg("eps"));
  m.def("bn_apply_cpu", &resnet_fast::cpu::bn_apply_cpu,
        "BatchNorm (+ ReLU) with known statistics on a CPU activation", py::arg("x"),
        py::arg("stats"), py::arg("weight"), py::arg("bias"), py::arg("relu"));
  m.def("conv_bn_act_forward_cpu", &resnet_fast::cpu::conv_bn_act_forward_cpu,
        "Conv + BatchNorm (+ residual) + ReLU on CPU tensors (training, and eval keeping the "
        "conv output)",
        py::arg("input"), py::arg("weight"), py::arg("conv_bias"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("in_weight"),
        py::arg("in_bias"), py::arg("in_stats"), py::arg("in_relu"), py::arg("bn_weight"),
        py::arg("bn_bias"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("residual"), py::arg("batch_stats"), py::arg("momentum"), py::arg("eps"),
        py::arg("relu"), py::arg("defer"));
  m.def("conv_bn_act_backward_cpu", &resnet_fast::cpu::conv_bn_act_backward_cpu,
        "Gradients of conv_bn_act_forward_cpu", py::arg("grad_out"), py::arg("input"),
        py::arg("weight"), py::arg("has_conv_bias"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"), py::arg("in_weight"), py::arg("in_bias"),
        py::arg("in_stats"), py::arg("in_relu"), py::arg("bn_weight"), py::arg("bn_bias"),
        py::arg("residual"), py::arg("raw"), py::arg("save_stats"), py::arg("batch_stats"),
        py::arg("relu"), py::arg("defer"), py::arg("input_grad"));
#ifdef RESNET_FAST_WITH_CUDA
  resnet_fast::register_cuda_bindings(m);
  resnet_fast::register_conv_cuda_bindings(m);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
