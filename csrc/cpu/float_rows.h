// Moving rows of fp32/fp16/bf16 tensors to and from fp32 scratch buffers on the CPU.
//
// The CPU kernels compute in fp32 on small row-major buffers that stay in cache; these helpers
// convert on the way in and out, so each kernel is written once for every input dtype and the
// dtype switch happens once per row, not per element.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace fastgpt::cpu {

typedef uint32_t Uints __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t Uint16s __attribute__((vector_size(kLanes * sizeof(uint16_t))));

// dst[j] = x[j] rounded to bf16 (to nearest, ties to even; NaN becomes 0x7FC0: c10::BFloat16's
// rounding) for the first `count` lanes
__attribute__((always_inline)) inline void store_bf16_lanes(at::BFloat16* dst, Floats x, int64_t count = kLanes) {
  Uints bits;
  std::memcpy(&bits, &x, sizeof bits);
  Uints rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  rounded = x == x ? rounded : Uints{} + 0x7FC0u;
  const Uint16s halves = __builtin_convertvector(rounded, Uint16s);
  std::memcpy(dst, &halves, count * sizeof(uint16_t));
}

// dst[j] = src[j] rounded to bf16 (as store_bf16_lanes) for j < n. Vector code: at::vec::convert is
// scalar in this baseline-x86-64 build.
FASTGPT_CPU_DISPATCH inline void round_to_bf16(const float* src, int64_t n, at::BFloat16* dst) {
  for_lanes(n, [&](int64_t j, int64_t count) { store_bf16_lanes(dst + j, load_lanes(src + j, count), count); });
}

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

// A contiguous row as fp32 values: the row itself when it is fp32 (no copy), else converted
// into `scratch` (n floats).
inline const float* fp32_row(const void* src, at::ScalarType dtype, int64_t n, float* scratch) {
  if (dtype == at::kFloat) return static_cast<const float*>(src);
  load_row(src, dtype, 1, n, scratch);
  return scratch;
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
      return round_to_bf16(src, n, static_cast<at::BFloat16*>(dst));
    default:
      TORCH_CHECK(false, "fastgpt native CPU kernels support float32, float16 and bfloat16, got ", dtype);
  }
}

// Where to compute a row of an output in `dtype`: in the output row itself when it is fp32, else
// in the fp32 `scratch` row that finish_output_row() then converts into it.
inline float* fp32_output_row(void* dst, at::ScalarType dtype, float* scratch) {
  return dtype == at::kFloat ? static_cast<float*>(dst) : scratch;
}

// Puts a row computed at fp32_output_row() into its output: nothing left to do for fp32.
inline void finish_output_row(const float* values, int64_t n, at::ScalarType dtype, void* dst) {
  if (values != dst) store_row(values, n, dtype, dst);
}

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
