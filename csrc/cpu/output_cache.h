// fastgpt's cache of CPU buffers for large native-op outputs (output_cache.cpp says why it exists).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace fastgpt {

struct CpuOutputCacheStats {
  size_t allocated_bytes;  // held by live outputs
  size_t cached_bytes;     // freed outputs kept for reuse
  size_t limit_bytes;      // the most the cache keeps
};

// Outputs at least this large come from the cache; smaller ones from torch's allocator, where a
// freed block is reused before glibc would ever return its pages to the OS.
constexpr size_t kMinCachedBytes = size_t{64} << 10;

// A CPU tensor from the cache of huge-page buffers: a large output whose pages are already
// mapped when the last one of its size was freed.
at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::ScalarType dtype);
CpuOutputCacheStats cpu_output_cache_stats();
void set_cpu_output_cache_limit(size_t bytes);
void empty_cpu_output_cache();

}  // namespace fastgpt
