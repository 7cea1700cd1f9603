// Output allocation shared by every native kernel (CPU and CUDA bindings).
//
// All tensors a native op returns are allocated through alloc_output(), so one test hook
// (_set_poison_outputs in the Python module) can fill them with NaN before the kernel runs:
// an element the kernel forgets to write then fails the numerical tests.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace fastgpt {

// Defined in csrc/extension.cpp; the flag is process-wide and off by default.
bool poison_outputs_enabled();
void set_poison_outputs(bool enabled);

// Asks Linux to back a large fresh CPU tensor with transparent huge pages before its first
// write (no-op elsewhere): first-touch page faults otherwise cost more than a memory-bound
// kernel's own work (measured: two fresh 32 MiB outputs, 32 ms of faults with 4 KiB pages).
void advise_huge_pages(const at::Tensor& fresh);

inline at::Tensor alloc_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (out.is_cpu()) advise_huge_pages(out);
  if (poison_outputs_enabled() && out.is_floating_point()) {
    out.fill_(NAN);
  }
  return out;
}

}  // namespace fastgpt
