// The CPU and CUDA kernels of the resnet_fast ops (their schemas and autograd are in ops.cpp; the
// backward of conv_bn_act is the composite of conv_bn_act_backward.cpp). A call whose backend is
// the device's own ("cpu" on CPU tensors, "cuda" on CUDA ones) runs here, in C++: its arguments
// normalised (tensor_args.h), the bn_act kernels of that device (cpu/bn_act.cpp,
// cuda/bn_act_binding.cpp), the cpu backend's conv composite (cpu/conv_bn_act_cpu.cpp), the
// running statistics and batch counters updated.
// Every other call runs the op's Python kernel, which resnet_fast/ops.py sets with
// set_python_kernel: the Triton backend (under Triton's interpreter on CPU tensors), the folded
// oneDNN eval call of conv_bn_act (its folded-weight cache is resnet_fast/folded_weights.py), and
// the fused conv launchers of the triton and cuda backends, which share one Python composite.
#include "op_kernels.h"

#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <unordered_map>

#include "bn_act_args.h"
#include "cpu/bn_act_cpu.h"
#include "cpu/conv_bn_act_cpu.h"
#include "stack_args.h"
#include "tensor_args.h"
#ifdef RESNET_FAST_WITH_CUDA
#include "cuda/bn_act_binding.h"
#endif

namespace py = pybind11;

namespace resnet_fast {
namespace {

using OptTensor = std::optional<at::Tensor>;
using Stack = torch::jit::Stack;

// The Python kernels by op name ("bn_act", ...). Never destroyed: the Python objects must not
// be released after the interpreter has finalised.
std::unordered_map<std::string, py::object>& python_kernels() {
  static auto* kernels = new std::unordered_map<std::string, py::object>();
  return *kernels;
}

// The bn_act kernels of a device and the backend that names them: a call with that backend runs
// them here, in C++ (the other calls go to the Python kernels).
struct CpuKernels {
  static constexpr const char* kBackend = "cpu";
  static BnActForwardResult forward(const BnActForwardArgs& a) {
    return cpu::bn_act_forward_cpu(a);
  }
  static BnActBackwardResult backward(const BnActBackwardArgs& a) {
    return cpu::bn_act_backward_cpu(a);
  }
};

// Registered whether or not the extension has its CUDA kernels, so that other backends (triton)
// run on CUDA tensors either way; backend "cuda" then fails here, as resnet_fast.backends
// reports it unavailable.
struct CudaKernels {
  static constexpr const char* kBackend = "cuda";
#ifdef RESNET_FAST_WITH_CUDA
  static BnActForwardResult forward(const BnActForwardArgs& a) {
    return cuda::bn_act_forward_cuda(a);
  }
  static BnActBackwardResult backward(const BnActBackwardArgs& a) {
    return cuda::bn_act_backward_cuda(a);
  }
#else
  [[noreturn]] static void unavailable() {
    TORCH_CHECK(false, "resnet_fast was built without its CUDA kernels (no CUDA torch or nvcc "
                       "at build time, or RESNET_FAST_NO_CUDA=1): backend 'cuda' is unavailable");
  }
  static BnActForwardResult forward(const BnActForwardArgs&) { unavailable(); }
  static BnActBackwardResult backward(const BnActBackwardArgs&) { unavailable(); }
#endif
};

template <typename Kernels>
bool runs_here(const StackArgs& a) {
  return a.text("backend") == Kernels::kBackend;
}

// The op's Python kernel on the call's arguments; its results replace them on the stack.
void run_python_kernel(const c10::OperatorHandle& op, Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t n = schema.arguments().size();
  py::gil_scoped_acquire gil;
  const auto kernel = python_kernels().find(schema.operator_name().name.substr(
      std::char_traits<char>::length("resnet_fast::")));
  TORCH_CHECK(kernel != python_kernels().end(), schema.name(),
              ": no Python kernel is registered (resnet_fast.ops registers them at import)");
  py::tuple args(n);
  for (size_t i = 0; i < n; ++i) {
    args[i] = torch::jit::toPyObject(std::move(torch::jit::peek(*stack, i, n)));
  }
  torch::jit::drop(*stack, n);
  const py::tuple results = kernel->second(*args);
  const auto& returns = schema.returns();
  TORCH_INTERNAL_ASSERT(results.size() == returns.size(), schema.name(),
                        ": the Python kernel returned ", results.size(), " values");
  for (size_t i = 0; i < returns.size(); ++i) {
    stack->push_back(torch::jit::toIValue(results[i], returns[i].type()));
  }
}

// What a forward op updates when it tracks statistics: each branch's running (mean, var), from
// new_running's (B, 2, C) or (2, C) rows in `running`'s order, and the batch counters, as
// nn.BatchNorm2d does.
void update_running(const at::Tensor& new_running, std::initializer_list<OptTensor> running,
                    std::initializer_list<OptTensor> counters) {
  const at::Tensor rows = new_running.reshape({-1, new_running.size(-1)});
  int64_t row = 0;
  for (const OptTensor& t : running) {
    if (t.has_value()) t->copy_(rows[row++]);
  }
  for (const OptTensor& counter : counters) {
    if (counter.has_value()) counter->add_(1);
  }
}

// The arguments both BatchNorm ops take, normalised: the input dense in its layout (fmt), the
// residual dense in the same layout, the BatchNorm weights and biases materialised in the
// accumulation dtype (acc), the residual's only with residual_bn.
struct BnActOperands {
  explicit BnActOperands(const StackArgs& a)
      : fmt(memory_format_of(a.tensor("input"))),
        input(a.tensor("input").contiguous(fmt)),
        acc(acc_options(input)),
        C(input.size(1)),
        residual_bn(a.flag("residual_bn")),
        weight(affine_param(a.optional("weight"), C, 1.0, acc)),
        bias(affine_param(a.optional("bias"), C, 0.0, acc)),
        residual(dense(a.optional("residual"), fmt)),
        residual_weight(residual_param(a, "residual_weight", 1.0)),
        residual_bias(residual_param(a, "residual_bias", 0.0)) {}

  // The kernels' inputs: these with the call's batch_stats and relu flags.
  BnActInputs inputs(const StackArgs& a) const {
    return {input, weight, bias, residual, residual_weight, residual_bias, residual_bn,
            a.flag("batch_stats"), a.flag("relu")};
  }

  const at::MemoryFormat fmt;
  const at::Tensor input;
  const at::TensorOptions acc;
  const int64_t C;
  const bool residual_bn;
  const at::Tensor weight, bias;
  const OptTensor residual, residual_weight, residual_bias;

 private:
  OptTensor residual_param(const StackArgs& a, const char* name, double fill) const {
    return residual_bn ? OptTensor(affine_param(a.optional(name), C, fill, acc)) : OptTensor();
  }
};

template <typename Kernels>
void bn_act_kernel(const c10::OperatorHandle& op, Stack* stack) {
  StackArgs a(op, stack);
  if (!runs_here<Kernels>(a)) return run_python_kernel(op, stack);
  const BnActOperands o(a);
  const OptTensor rm = a.optional("running_mean"), rv = a.optional("running_var");
  const OptTensor rrm = a.optional("residual_running_mean");
  const OptTensor rrv = a.optional("residual_running_var");
  auto [out, save_stats, new_running] = Kernels::forward(
      {o.inputs(a), per_channel(rm, o.acc), per_channel(rv, o.acc), per_channel(rrm, o.acc),
       per_channel(rrv, o.acc), a.real("momentum"), a.real("eps")});
  if (a.flag("batch_stats") && rm.has_value()) {
    update_running(new_running, {rm, rv, rrm, rrv},
                   {a.optional("num_batches_tracked"), a.optional("residual_num_batches_tracked")});
  }
  a.finish({out, save_stats});
}

template <typename Kernels>
void bn_act_backward_kernel(const c10::OperatorHandle& op, Stack* stack) {
  StackArgs a(op, stack);
  if (!runs_here<Kernels>(a)) return run_python_kernel(op, stack);
  const BnActOperands o(a);
  auto [gx, gw, gb, gr, grw, grb] = Kernels::backward(
      {o.inputs(a), a.tensor("grad_out").contiguous(o.fmt), a.tensor("save_stats").contiguous()});
  a.finish({gx, gw, gb, gr, grw, grb});
}

// On CPU tensors: the cpu backend's conv composite in training (cpu/conv_bn_act_cpu.cpp); its
// folded oneDNN eval call and the other backends in Python. On CUDA tensors every call is
// Python's (the fused conv launchers' composite).
void conv_bn_act_kernel(const c10::OperatorHandle& op, Stack* stack) {
  StackArgs a(op, stack);
  const at::Tensor input = a.tensor("input");
  const bool batch_stats = a.flag("batch_stats");
  if (!runs_here<CpuKernels>(a) ||
      !cpu::runs_composite(input.scalar_type(), batch_stats, a.flag("save_raw"))) {
    return run_python_kernel(op, stack);
  }
  TORCH_CHECK_VALUE(!a.flag("defer") || batch_stats,
                    "defer=True needs batch statistics (training, or no running statistics)");
  const OptTensor rm = a.optional("running_mean"), rv = a.optional("running_var");
  auto [out, raw, save_stats, new_running] = cpu::conv_bn_act_forward_cpu(a);
  if (batch_stats && rm.has_value()) {
    update_running(new_running, {rm, rv}, {a.optional("num_batches_tracked")});
  }
  if (a.flag("recompute") && raw.numel()) raw = empty_acc(raw);  // backward runs the conv again
  a.finish({out, raw, save_stats});
}

template <void (*Kernel)(const c10::OperatorHandle&, Stack*)>
torch::CppFunction boxed() {
  return torch::CppFunction::makeFromBoxedFunction<Kernel>();
}

}  // namespace

void set_python_kernel(const std::string& op, py::object kernel) {
  python_kernels()[op] = std::move(kernel);
}

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("bn_act", boxed<bn_act_kernel<CpuKernels>>());
  m.impl("bn_act_backward", boxed<bn_act_backward_kernel<CpuKernels>>());
  m.impl("conv_bn_act", boxed<conv_bn_act_kernel>());
}

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("bn_act", boxed<bn_act_kernel<CudaKernels>>());
  m.impl("bn_act_backward", boxed<bn_act_backward_kernel<CudaKernels>>());
  m.impl("conv_bn_act", boxed<run_python_kernel>());
}

}  // namespace resnet_fast
