// The C++ signatures of the resnet_fast ops (their schemas are in ops.cpp), and typed handles
// to call them through the dispatcher.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace resnet_fast {

using OptTensor = std::optional<at::Tensor>;
using TensorRef = const at::Tensor&;
using OptRef = const OptTensor&;

using BnActSig = std::tuple<at::Tensor, at::Tensor>(
    TensorRef, OptRef, OptRef, OptRef, OptRef, OptRef, OptRef, OptRef, OptRef, OptRef, OptRef,
    OptRef, bool, bool, double, double, bool, c10::string_view);
using BnActBackwardSig =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        TensorRef, TensorRef, OptRef, OptRef, OptRef, OptRef, OptRef, TensorRef, bool, bool,
        bool, c10::string_view);
using ConvBnActSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    TensorRef, TensorRef, OptRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
    OptRef, OptRef, OptRef, bool, OptRef, OptRef, OptRef, OptRef, OptRef, OptRef, bool, double,
    double, bool, bool, bool, bool, c10::string_view);
using ConvBnActBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                        at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    TensorRef, TensorRef, TensorRef, OptRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
    int64_t, OptRef, OptRef, OptRef, bool, OptRef, OptRef, OptRef, TensorRef, TensorRef, bool,
    bool, bool, bool, c10::string_view);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace resnet_fast
