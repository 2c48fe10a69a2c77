// The identity of a fused call for measured dispatch's table of decided call sites
// (resnet_fast/dispatch.py): what a call's argument checks and its implementation choice depend
// on, read in one pass at C++ speed.
#pragma once

#include <torch/extension.h>

namespace resnet_fast {

// Bytes that identify a call made on `items` (tensors and Nones, in a fixed order per op),
// together with the process state a decision depends on: the intra-op thread count, grad mode,
// autocast (CPU and CUDA), and the environment variables that select a backend or turn timing
// off. Per tensor: its Python type, dispatch keys, dtype, device, requires_grad, sizes and
// strides. None when an item is neither a tensor nor None (such a call is checked in full).
pybind11::object call_signature(const pybind11::args& items);

}  // namespace resnet_fast
