// How the C++ kernels normalise their arguments, the rules resnet_fast/ops.py states for every
// backend: activations dense in the input's layout, per-channel tensors contiguous in the
// accumulation dtype (float64 for float64 activations, float32 otherwise).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace resnet_fast {

// The dense layout an op computes in and returns: x's own when x is dense in NCHW or
// channels_last, else channels_last for a 4-D tensor whose channels are adjacent (a strided
// view of channels_last data), else NCHW.
inline at::MemoryFormat memory_format_of(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  return x.dim() == 4 && x.stride(1) == 1 ? at::MemoryFormat::ChannelsLast
                                          : at::MemoryFormat::Contiguous;
}

inline at::TensorOptions acc_options(const at::Tensor& x) {
  return x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

// An absent output or gradient: a fresh empty tensor of the accumulation dtype.
inline at::Tensor empty_acc(const at::Tensor& x) { return at::empty({0}, acc_options(x)); }

// A per-channel tensor as the kernels take it (nullopt stays nullopt).
inline std::optional<at::Tensor> per_channel(const std::optional<at::Tensor>& t,
                                             const at::TensorOptions& acc) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->to(acc.dtype().toScalarType()).contiguous();
}

// An optional activation dense in fmt (nullopt stays nullopt).
inline std::optional<at::Tensor> dense(const std::optional<at::Tensor>& t, at::MemoryFormat fmt) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->contiguous(fmt);
}

// A BatchNorm weight or bias of C channels, materialised: fill where it is absent.
inline at::Tensor affine_param(const std::optional<at::Tensor>& t, int64_t C, double fill,
                               const at::TensorOptions& acc) {
  if (!t.has_value() || !t->defined()) return at::full({C}, fill, acc);
  return t->to(acc.dtype().toScalarType()).contiguous();
}

}  // namespace resnet_fast
