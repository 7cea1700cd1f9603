// Moving rows of fp32/fp16/bf16 tensors to and from fp32 scratch buffers on the CPU.
//
// The CPU kernels compute in fp32 on small row-major buffers that stay in cache; these helpers
// convert on the way in and out, so each kernel is written once for every input dtype and the
// dtype switch happens once per row, not per element.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace fastgpt::cpu {

template <typename T>
inline void load_row_typed(const T* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    at::vec::convert(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]);
  }
}

// dst[i] = float(src[i * stride]) for i < n; src points at elements of dtype `dtype`.
inline void load_row(const void* src, at::ScalarType dtype, int64_t stride, int64_t n, float* dst) {
  switch (dtype) {
    case at::kFloat:
      if (stride == 1) {
        std::memcpy(dst, src, n * sizeof(float));
      } else {
        load_row_typed(static_cast<const float*>(src), stride, n, dst);
      }
      return;
    case at::kHalf:
      return load_row_typed(static_cast<const at::Half*>(src), stride, n, dst);
    case at::kBFloat16:
      return load_row_typed(static_cast<const at::BFloat16*>(src), stride, n, dst);
    default:
      TORCH_CHECK(false, "fastgpt native CPU kernels support float32, float16 and bfloat16, got ", dtype);
  }
}

// dst[i] = src[i] rounded to `dtype`, for a contiguous destination row of n elements.
inline void store_row(const float* src, int64_t n, at::ScalarType dtype, void* dst) {
  switch (dtype) {
    case at::kFloat:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case at::kHalf:
      return at::vec::convert(src, static_cast<at::Half*>(dst), n);
    case at::kBFloat16:
      return at::vec::convert(src, static_cast<at::BFloat16*>(dst), n);
    default:
      TORCH_CHECK(false, "fastgpt native CPU kernels support float32, float16 and bfloat16, got ", dtype);
  }
}

// memcpy with non-temporal stores (x86 SSE2, every x86-64 CPU; plain memcpy elsewhere): lines of
// dst are written without first being read into cache (no read-for-ownership) and without
// evicting what the kernel still reads. For large outputs only: dst is then not in cache for
// whoever reads it next. Measured on a 2-core Xeon, add+LayerNorm forward at (8192, 1024) fp32
// into warm buffers: 8-10 ms with ordinary stores, 4 ms with these. Call end_streaming() before
// another thread may read what this one streamed.
inline void stream_copy(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const size_t head = std::min(bytes, static_cast<size_t>(-reinterpret_cast<uintptr_t>(d) % 16));
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  for (; bytes >= 16; d += 16, s += 16, bytes -= 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  }
  std::memcpy(d, s, bytes);
#else
  std::memcpy(dst, src, bytes);
#endif
}

// Orders this thread's streamed stores before its later stores (and the parallel region's end).
inline void end_streaming() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Writes rows of a contiguous output in `dtype`: with non-temporal stores when the output is
// large (see stream_copy), else ordinary ones. One per thread: it owns a staging row for the
// fp16/bf16 conversion.
class RowWriter {
 public:
  RowWriter(at::ScalarType dtype, int64_t n, bool streaming)
      : dtype_(dtype), n_(n), streaming_(streaming), staging_(streaming ? n * sizeof(float) : 0) {}
  ~RowWriter() {
    if (streaming_) end_streaming();
  }

  void write(const float* values, void* dst) {
    if (!streaming_) return store_row(values, n_, dtype_, dst);
    const void* converted = values;
    if (dtype_ != at::kFloat) {
      store_row(values, n_, dtype_, staging_.data());
      converted = staging_.data();
    }
    stream_copy(dst, converted, n_ * at::elementSize(dtype_));
  }

 private:
  at::ScalarType dtype_;
  int64_t n_;
  bool streaming_;
  std::vector<char> staging_;
};

// values rounded to `dtype` and back to fp32, in place (staging holds n elements of dtype)
inline void round_row(float* values, int64_t n, at::ScalarType dtype, void* staging) {
  if (dtype == at::kFloat) return;
  store_row(values, n, dtype, staging);
  load_row(staging, dtype, 1, n, values);
}

// Address of element `index` of a tensor's storage, for the byte arithmetic of row pointers.
inline const char* element_ptr(const at::Tensor& t, int64_t index) {
  return static_cast<const char*>(t.const_data_ptr()) + index * static_cast<int64_t>(t.element_size());
}

inline char* mutable_element_ptr(const at::Tensor& t, int64_t index) {
  return static_cast<char*>(t.data_ptr()) + index * static_cast<int64_t>(t.element_size());
}

}  // namespace fastgpt::cpu
