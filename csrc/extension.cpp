// The Python module resnet_fast._C: what Python calls of the compiled code. The ops are defined
// in ops.cpp and their CPU and CUDA kernels registered in op_kernels.cpp, linked into the same
// module; the fused conv launcher of the cuda backend, which Python calls, is bound here when
// built with CUDA.
#include <torch/extension.h>

#include "call_signature.h"
#include "cpu/bn_act_cpu.h"
#include "cpu/conv_bn_act_cpu.h"
#include "op_kernels.h"
#ifdef RESNET_FAST_WITH_CUDA
#include "cuda/conv_bn_act_binding.h"
#endif

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resnet_fast compiled kernels (see resnet_fast/ops.py for the backend interface)";
  m.def("set_python_kernel", &resnet_fast::set_python_kernel,
        "Sets the Python kernel that runs the calls of a resnet_fast op which its C++ kernels "
        "leave to Python (the triton backend, the folded oneDNN eval call, the fused conv "
        "launchers)",
        py::arg("op"), py::arg("kernel"));
  m.def(
      "runs_composite",
      [](const at::Tensor& input, bool batch_stats, bool save_raw) {
        return resnet_fast::cpu::runs_composite(input.scalar_type(), batch_stats, save_raw);
      },
      "Whether the cpu backend runs a conv_bn_act call on `input` as PyTorch's conv composed "
      "with the bn_act kernels in C++ (else one folded oneDNN call)",
      py::arg("input"), py::arg("batch_stats"), py::arg("save_raw"));
  m.def("bn_stats_cpu", &resnet_fast::cpu::bn_stats_cpu,
        "Batch statistics (mean, invstd) and updated running statistics of a CPU activation",
        py::arg("x"), py::arg("running_mean"), py::arg("running_var"), py::arg("momentum"),
        py::arg("eps"));
  m.def("call_signature", &resnet_fast::call_signature,
        "The bytes that identify a fused call for measured dispatch's table of decided call "
        "sites (see resnet_fast/dispatch.py), or None when an item is not a tensor or None");
#ifdef RESNET_FAST_WITH_CUDA
  resnet_fast::register_conv_cuda_bindings(m);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
