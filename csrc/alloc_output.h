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

struct CpuOutputCacheStats {
  size_t allocated_bytes;  // held by live outputs
  size_t cached_bytes;     // freed outputs kept for reuse
  size_t limit_bytes;      // the most the cache keeps
};

// A CPU tensor from fastgpt's cache of huge-page buffers (csrc/cpu_output_cache.cpp): a large
// output whose pages are already mapped when the last one of its size was freed.
at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::ScalarType dtype);
CpuOutputCacheStats cpu_output_cache_stats();
void set_cpu_output_cache_limit(size_t bytes);
void empty_cpu_output_cache();

// Outputs at least this large come from the cache; smaller ones from torch's allocator, where a
// freed block is reused before glibc would ever return its pages to the OS.
constexpr size_t kMinCachedBytes = size_t{64} << 10;

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
