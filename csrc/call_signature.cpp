#include "call_signature.h"

#include <ATen/autocast_mode.h>
#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace py = pybind11;

namespace resnet_fast {
namespace {

// The environment variables whose values change which implementation a call runs.
constexpr const char* kSelectingVariables[] = {"RESNET_FAST_BACKEND", "RESNET_FAST_AUTOTUNE",
                                               "TRITON_INTERPRET"};

class SignatureWriter {
 public:
  void put(int64_t v) { bytes_.append(reinterpret_cast<const char*>(&v), sizeof v); }

  void put_text(const char* s) {  // -1 for unset, else the length and the characters
    if (s == nullptr) {
      put(-1);
      return;
    }
    const size_t n = std::strlen(s);
    put(static_cast<int64_t>(n));
    bytes_.append(s, n);
  }

  void put_tensor(PyObject* obj, const at::Tensor& t) {
    put(reinterpret_cast<int64_t>(Py_TYPE(obj)));
    put(static_cast<int64_t>(t.key_set().raw_repr()));
    put(static_cast<int64_t>(t.scalar_type()));
    put(static_cast<int64_t>(t.device().type()));
    put(t.device().index());
    put(t.requires_grad());
    put(t.dim());
    for (const int64_t s : t.sizes()) put(s);
    for (const int64_t s : t.strides()) put(s);
  }

  py::bytes result() const { return py::bytes(bytes_); }

 private:
  std::string bytes_;
};

}  // namespace

py::object call_signature(const py::args& items) {
  SignatureWriter w;
  w.put(at::get_num_threads());
  w.put(at::GradMode::is_enabled());
  for (const auto device : {at::kCPU, at::kCUDA}) {
    const bool on = at::autocast::is_autocast_enabled(device);
    w.put(on);
    if (on) w.put(static_cast<int64_t>(at::autocast::get_autocast_dtype(device)));
  }
  for (const char* name : kSelectingVariables) w.put_text(std::getenv(name));
  for (const py::handle item : items) {
    PyObject* obj = item.ptr();
    if (obj == Py_None) {
      w.put(-1);
    } else if (THPVariable_Check(obj)) {
      w.put_tensor(obj, THPVariable_Unpack(obj));
    } else {
      return py::none();
    }
  }
  return w.result();
}

}  // namespace resnet_fast
