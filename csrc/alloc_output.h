// Output allocation shared by every native kernel (CPU and CUDA bindings).
//
// All tensors a native op returns are allocated through alloc_output(), so one test hook
// (_set_poison_outputs in the Python module) can fill them with NaN before the kernel runs:
// an element the kernel forgets to write then fails the numerical tests.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "cpu/output_cache.h"

namespace fastgpt {

// Defined in csrc/extension.cpp; the flag is process-wide and off by default.
bool poison_outputs_enabled();
void set_poison_outputs(bool enabled);

inline at::Tensor alloc_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  at::Tensor out = options.device().is_cpu() && nbytes >= kMinCachedBytes
                       ? empty_cpu_output(sizes, options.dtype().toScalarType())
                       : at::empty(sizes, options);
  if (poison_outputs_enabled() && out.is_floating_point()) {
    out.fill_(NAN);
  }
  return out;
}

}  // namespace fastgpt
