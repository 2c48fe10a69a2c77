// Torch binding of the CUTLASS conv2d + BatchNorm fusions (conv_bn_act_kernels.cu): argument
// checks, x / residual made channels_last and the weight KRSC-dense, the conv bias folded into
// the epilogue's shift, the outputs and the statistics scratch allocated with torch on x's
// device, and the launch on the current stream. The contract is the one of the Triton launcher
// resnet_fast/triton/conv_bn_act.py (conv2d_bn_act); this backend takes float16 and bfloat16
// with groups == 1 and channel counts that are multiples of 8.
#include "conv_bn_act_binding.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "conv_bn_act_kernels.cuh"

namespace resnet_fast {
namespace cuda {
namespace {

#define RF_CONV_CHECK(cond, ...) \
  TORCH_CHECK(cond, "resnet_fast cuda backend (conv2d_bn_act_cuda): ", __VA_ARGS__)
#define RF_CONV_CHECK_VALUE(cond, ...) \
  TORCH_CHECK_VALUE(cond, "resnet_fast cuda backend (conv2d_bn_act_cuda): ", __VA_ARGS__)
#define RF_CONV_CHECK_TYPE(cond, ...) \
  TORCH_CHECK_TYPE(cond, "resnet_fast cuda backend (conv2d_bn_act_cuda): ", __VA_ARGS__)

ConvElement conv_element(const at::Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  RF_CONV_CHECK_TYPE(t != at::kFloat && t != at::kDouble, "x has dtype ", t,
                     "; the CUTLASS kernels take float16 or bfloat16: use backend='triton'");
  RF_CONV_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16, "x must be float16 or bfloat16, got ",
                     t);
  return t == at::kHalf ? ConvElement::kHalf : ConvElement::kBFloat16;
}

std::pair<int, int> pair_of(const std::vector<int64_t>& v, const char* name) {
  RF_CONV_CHECK_VALUE(v.size() == 2, name, " must have 2 ints, got ", v.size());
  for (int64_t e : v) {
    RF_CONV_CHECK_VALUE(
        e >= std::numeric_limits<int>::min() && e <= std::numeric_limits<int>::max(), name,
        " value ", e, " is out of range");
  }
  return {static_cast<int>(v[0]), static_cast<int>(v[1])};
}

// A (size,) float32 per-channel tensor on x's device, made contiguous; nullopt stays nullopt.
std::optional<at::Tensor> per_channel(const std::optional<at::Tensor>& t, const char* name,
                                      int64_t size, const at::Tensor& x) {
  if (!t.has_value()) return std::nullopt;
  RF_CONV_CHECK_VALUE(t->device() == x.device(), name, " is on ", t->device(), ", x on ",
                      x.device());
  RF_CONV_CHECK_VALUE(t->dim() == 1 && t->size(0) == size, name, " must have shape (", size,
                      ",), got ", t->sizes());
  RF_CONV_CHECK_TYPE(t->scalar_type() == at::kFloat, name,
                     " must be float32 (the accumulation dtype), got ", t->scalar_type());
  return t->contiguous();
}

const float* float_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

}  // namespace

// (y, stats): y = act(conv2d(prologue(x)) * out_scale + out_shift + residual), channels_last in
// x's dtype; stats the (2, Cout) float32 mean and biased variance of conv2d(...) + conv_bias
// when `stats`, else an empty tensor.
std::tuple<at::Tensor, at::Tensor> conv2d_bn_act_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& conv_bias,
    const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
    const std::vector<int64_t>& dilation, int64_t groups,
    const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift,
    bool in_relu, const std::optional<at::Tensor>& out_scale,
    const std::optional<at::Tensor>& out_shift, const std::optional<at::Tensor>& residual,
    bool relu, bool stats) {
  // ---- arguments
  RF_CONV_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  RF_CONV_CHECK_VALUE(x.dim() == 4, "x must be 4-D (N, Cin, H, W), got shape ", x.sizes());
  const ConvElement element = conv_element(x);
  RF_CONV_CHECK_VALUE(weight.device() == x.device(), "weight is on ", weight.device(), ", x on ",
                      x.device());
  RF_CONV_CHECK_VALUE(weight.dim() == 4,
                      "weight must be 4-D (Cout, Cin/groups, KH, KW), got shape ", weight.sizes());
  RF_CONV_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype ",
                     x.scalar_type(), ", got ", weight.scalar_type());
  RF_CONV_CHECK_VALUE(groups == 1, "groups=", groups,
                      " is not supported by the CUTLASS kernels (groups == 1 only): "
                      "use backend='triton'");
  const auto [stride_h, stride_w] = pair_of(stride, "stride");
  const auto [pad_h, pad_w] = pair_of(padding, "padding");
  const auto [dilation_h, dilation_w] = pair_of(dilation, "dilation");
  RF_CONV_CHECK_VALUE(stride_h >= 1 && stride_w >= 1, "stride must be positive, got ",
                      at::IntArrayRef(stride));
  RF_CONV_CHECK_VALUE(pad_h >= 0 && pad_w >= 0, "padding must be non-negative, got ",
                      at::IntArrayRef(padding));
  RF_CONV_CHECK_VALUE(dilation_h >= 1 && dilation_w >= 1, "dilation must be positive, got ",
                      at::IntArrayRef(dilation));

  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = weight.size(0), R = weight.size(2), S = weight.size(3);
  RF_CONV_CHECK_VALUE(weight.size(1) == C, "weight.shape[1] = ", weight.size(1),
                      " must equal x's ", C, " input channels (groups == 1)");
  RF_CONV_CHECK_VALUE(K >= 1 && R >= 1 && S >= 1, "weight must have a positive size, got ",
                      weight.sizes());
  RF_CONV_CHECK_VALUE(C % 8 == 0, "x's ", C,
                      " input channels must be a multiple of 8 for the CUTLASS kernels: "
                      "use backend='triton'");
  RF_CONV_CHECK_VALUE(K % 8 == 0, "weight's ", K,
                      " output channels must be a multiple of 8 for the CUTLASS kernels: "
                      "use backend='triton'");
  const int64_t P = (H + 2 * pad_h - dilation_h * (R - 1) - 1) / stride_h + 1;
  const int64_t Q = (W + 2 * pad_w - dilation_w * (S - 1) - 1) / stride_w + 1;
  RF_CONV_CHECK_VALUE(P >= 1 && Q >= 1, "x's ", H, "x", W, " image (padding ",
                      at::IntArrayRef(padding), ") is smaller than the ", R, "x", S,
                      " kernel at dilation ", at::IntArrayRef(dilation),
                      ": output ", P, "x", Q);

  const c10::cuda::CUDAGuard device_guard(x.device());
  std::optional<at::Tensor> bias;
  if (conv_bias.has_value()) {
    RF_CONV_CHECK_TYPE(conv_bias->scalar_type() == x.scalar_type() ||
                           conv_bias->scalar_type() == at::kFloat,
                       "conv_bias must be ", x.scalar_type(), " or float32, got ",
                       conv_bias->scalar_type());
    bias = per_channel(conv_bias->to(at::kFloat), "conv_bias", K, x);
  }
  RF_CONV_CHECK_VALUE(in_scale.has_value() == in_shift.has_value(),
                      "in_scale and in_shift must be given together");
  RF_CONV_CHECK_VALUE(out_scale.has_value() == out_shift.has_value(),
                      "out_scale and out_shift must be given together");
  RF_CONV_CHECK_VALUE(!in_relu || in_scale.has_value(),
                      "in_relu needs the prologue: give in_scale and in_shift");
  const auto in_scale_c = per_channel(in_scale, "in_scale", C, x);
  const auto in_shift_c = per_channel(in_shift, "in_shift", C, x);
  const auto out_scale_c = per_channel(out_scale, "out_scale", K, x);
  const auto out_shift_c = per_channel(out_shift, "out_shift", K, x);
  std::optional<at::Tensor> residual_c;
  if (residual.has_value()) {
    RF_CONV_CHECK_VALUE(residual->device() == x.device(), "residual is on ", residual->device(),
                        ", x on ", x.device());
    RF_CONV_CHECK_VALUE(residual->sizes() == at::IntArrayRef({N, K, P, Q}),
                        "residual must have the output's shape (", N, ", ", K, ", ", P, ", ", Q,
                        "), got ", residual->sizes());
    RF_CONV_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), "residual must have x's dtype ",
                       x.scalar_type(), ", got ", residual->scalar_type());
    residual_c = residual->contiguous(at::MemoryFormat::ChannelsLast);
  }
  RF_CONV_CHECK_VALUE(!stats || (!out_scale.has_value() && !residual.has_value() && !relu),
                      "stats=True needs the bare conv output: no out_scale/out_shift, residual "
                      "or relu");

  constexpr int64_t kMaxElements = std::numeric_limits<int32_t>::max();
  RF_CONV_CHECK_VALUE(x.numel() <= kMaxElements && weight.numel() <= kMaxElements &&
                          N * K * P * Q <= kMaxElements,
                      "x, weight and the output must have fewer than 2^31 elements");

  // ---- outputs
  at::Tensor y = at::empty({N, K, P, Q}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto float_options = x.options().dtype(at::kFloat);
  at::Tensor statistics = stats ? at::empty({2, K}, float_options) : at::empty({0}, float_options);
  if (N == 0) {
    if (stats) statistics.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, statistics};
  }

  // The conv bias folds into the epilogue's shift: (acc + b) * s + t = acc * s + (b * s + t).
  std::optional<at::Tensor> shift = out_shift_c;
  if (bias.has_value()) {
    shift = out_scale_c.has_value() ? at::addcmul(*out_shift_c, *bias, *out_scale_c) : *bias;
  }

  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor wc = weight.contiguous(at::MemoryFormat::ChannelsLast);  // (K, R, S, C) dense

  ConvBnActParams p;
  p.geometry.N = static_cast<int>(N);
  p.geometry.H = static_cast<int>(H);
  p.geometry.W = static_cast<int>(W);
  p.geometry.C = static_cast<int>(C);
  p.geometry.K = static_cast<int>(K);
  p.geometry.R = static_cast<int>(R);
  p.geometry.S = static_cast<int>(S);
  p.geometry.P = static_cast<int>(P);
  p.geometry.Q = static_cast<int>(Q);
  p.geometry.pad_h = pad_h;
  p.geometry.pad_w = pad_w;
  p.geometry.stride_h = stride_h;
  p.geometry.stride_w = stride_w;
  p.geometry.dilation_h = dilation_h;
  p.geometry.dilation_w = dilation_w;
  p.element = element;
  p.x = xc.data_ptr();
  p.weight = wc.data_ptr();
  p.in_scale = float_data(in_scale_c);
  p.in_shift = float_data(in_shift_c);
  p.in_relu = in_relu;
  p.out_scale = float_data(out_scale_c);
  p.out_shift = float_data(shift);
  p.residual = residual_c.has_value() ? residual_c->data_ptr() : nullptr;
  p.relu = relu;
  p.y = y.data_ptr();
  p.stats = stats ? statistics.data_ptr<float>() : nullptr;

  const char* reason = conv_bn_act_unsupported_reason(p);
  RF_CONV_CHECK(reason == nullptr, reason == nullptr ? "" : reason);

  const size_t scratch_bytes = conv_bn_act_scratch_bytes(p);
  at::Tensor scratch =
      at::empty({static_cast<int64_t>(scratch_bytes)}, x.options().dtype(at::kByte));
  C10_CUDA_CHECK(conv_bn_act_launch(p, scratch_bytes > 0 ? scratch.data_ptr() : nullptr,
                                    scratch_bytes, c10::cuda::getCurrentCUDAStream()));
  return {y, statistics};
}

}  // namespace cuda

void register_conv_cuda_bindings(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("conv2d_bn_act_cuda", &cuda::conv2d_bn_act_cuda,
        "CUTLASS conv2d (float16/bfloat16, groups == 1) with the input BatchNorm (+ ReLU) "
        "applied on load and BatchNorm (+ residual + ReLU) or per-channel statistics in the "
        "epilogue; returns (y, stats)",
        py::arg("x"), py::arg("weight"), py::arg("conv_bias"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"),
        py::arg("in_scale") = py::none(), py::arg("in_shift") = py::none(),
        py::arg("in_relu") = false, py::arg("out_scale") = py::none(),
        py::arg("out_shift") = py::none(), py::arg("residual") = py::none(),
        py::arg("relu") = false, py::arg("stats") = false);
}

}  // namespace resnet_fast
