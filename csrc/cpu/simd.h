// Portable SIMD for the CPU kernels' elementwise row loops, with a runtime choice of ISA.
//
// The extension is compiled for baseline x86-64 (no -mavx flags: it must load on any CPU).
// at::vec::Vectorized<float> is then its scalar fallback, measured ~2x slower than torch's own
// kernels here. Instead, row loops are written on GCC/Clang vector types (Floats: 16 lanes) in
// functions marked FASTGPT_CPU_DISPATCH: the compiler emits one clone per ISA (AVX-512, AVX2,
// baseline) and the loader picks the best the CPU has. Elsewhere the macro is empty and the
// same code compiles to baseline SIMD.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastgpt::cpu {

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define FASTGPT_CPU_DISPATCH __attribute__((target_clones("avx512f", "avx2", "default")))
// vectors are only passed between always-inlined helpers, never across an ABI boundary
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define FASTGPT_CPU_DISPATCH
#endif

constexpr int kLanes = 16;
typedef float Floats __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));

// loads/stores of the first `count` lanes (count <= kLanes); the other lanes read as 0
__attribute__((always_inline)) inline Floats load_lanes(const float* p, int64_t count = kLanes) {
  Floats v{};
  std::memcpy(&v, p, count * sizeof(float));
  return v;
}

__attribute__((always_inline)) inline void store_lanes(float* p, Floats v, int64_t count = kLanes) {
  std::memcpy(p, &v, count * sizeof(float));
}

// v with the lanes from `count` on set to 0 (a partial group's padding)
__attribute__((always_inline)) inline Floats first_lanes(Floats v, int64_t count) {
  const Ints lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return lane < static_cast<int32_t>(count) ? v : Floats{};
}

// body(j, count) for the lane groups of [0, n): full groups (count == kLanes, a constant after
// inlining, so loads and stores are single vector moves), then one partial group
template <typename Body>
__attribute__((always_inline)) inline void for_lanes(int64_t n, Body&& body) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) body(j, int64_t{kLanes});
  if (j < n) body(j, n - j);
}

__attribute__((always_inline)) inline float sum_lanes(Floats v) {
  float total = 0.f;
  for (int lane = 0; lane < kLanes; ++lane) total += v[lane];
  return total;
}

}  // namespace fastgpt::cpu
