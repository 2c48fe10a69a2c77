// An op call's arguments on the dispatcher's stack, read by name, for the boxed kernels of the
// resnet_fast ops (op_kernels.cpp, conv_bn_act_backward.cpp, cpu/conv_bn_act_cpu.cpp).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <initializer_list>
#include <mutex>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace resnet_fast {

class StackArgs {
 public:
  StackArgs(const c10::OperatorHandle& op, torch::jit::Stack* stack)
      : schema_(op.schema()),
        positions_(positions(schema_)),
        stack_(*stack),
        count_(schema_.arguments().size()),
        base_(stack->size() - count_) {}

  const c10::IValue& operator[](const char* name) const {
    const auto it = positions_.find(name);
    TORCH_INTERNAL_ASSERT(it != positions_.end(), schema_.name(), " has no argument ", name);
    return stack_[base_ + it->second];
  }
  at::Tensor tensor(const char* name) const { return (*this)[name].toTensor(); }
  std::optional<at::Tensor> optional(const char* name) const {
    const c10::IValue& v = (*this)[name];
    return v.isNone() ? std::optional<at::Tensor>() : std::optional<at::Tensor>(v.toTensor());
  }
  bool flag(const char* name) const { return (*this)[name].toBool(); }
  double real(const char* name) const { return (*this)[name].toDouble(); }
  int64_t integer(const char* name) const { return (*this)[name].toInt(); }
  std::vector<int64_t> ints(const char* name) const { return (*this)[name].toIntVector(); }
  const std::string& text(const char* name) const { return (*this)[name].toStringRef(); }

  // Replaces the arguments with the call's results.
  void finish(std::initializer_list<at::Tensor> results) {
    torch::jit::drop(stack_, count_);
    for (const at::Tensor& t : results) stack_.emplace_back(t);
  }

 private:
  using Positions = std::unordered_map<std::string_view, size_t>;

  // The position of each argument of schema, by name: built at an op's first call (a schema
  // lives as long as its registration).
  static const Positions& positions(const c10::FunctionSchema& schema) {
    static std::mutex mutex;
    static std::unordered_map<const c10::FunctionSchema*, Positions> by_schema;
    std::lock_guard<std::mutex> lock(mutex);
    auto [it, added] = by_schema.try_emplace(&schema);
    if (added) {
      const auto& arguments = schema.arguments();
      for (size_t i = 0; i < arguments.size(); ++i) it->second.emplace(arguments[i].name(), i);
    }
    return it->second;
  }

  const c10::FunctionSchema& schema_;
  const Positions& positions_;
  torch::jit::Stack& stack_;
  const size_t count_;
  const size_t base_;
};

}  // namespace resnet_fast
