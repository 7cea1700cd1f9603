// See gemm.h.
#include "gemm.h"

#include <ATen/ATen.h>
#include <ATen/ops/addmm_cpu_dispatch.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTGPT_BF16_PAIRS 1
#endif

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

// The Fortran BLAS entry point that torch's own CPU matmul calls (exported by libtorch_cpu when it
// is built with MKL or OpenBLAS). Weak: where no loaded library defines it, it is null and gemm()
// takes the ATen path instead of failing to load.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

// MKL's bf16 x bf16 -> fp32 product (CBLAS; LP64 integers, as torch links MKL). Weak, as above.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                                       const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                                       int ldc) __attribute__((weak));

namespace fastgpt::cpu {
namespace {

constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;

std::atomic<bool> force_aten_gemm{false};

bool blas_available() {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  return sgemm_ != nullptr;
#else
  return false;  // blas_gemm's integer passing below relies on little-endian layout
#endif
}

at::Tensor row_major_view(const float* data, int64_t rows, int64_t cols, int64_t ld, Transpose transpose) {
  // stored as (rows, cols) of op's input; the view is op(x)
  at::Tensor stored = at::from_blob(const_cast<float*>(data), {rows, cols}, {ld, 1},
                                    at::TensorOptions().dtype(at::kFloat));
  return transpose == Transpose::yes ? stored.t() : stored;
}

void aten_gemm(Transpose transpose_a, Transpose transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
               const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const bool ta = transpose_a == Transpose::yes, tb = transpose_b == Transpose::yes;
  at::Tensor a_view = row_major_view(a, ta ? k : m, ta ? m : k, lda, transpose_a);
  at::Tensor b_view = row_major_view(b, tb ? n : k, tb ? k : n, ldb, transpose_b);
  at::Tensor c_view = row_major_view(c, m, n, ldc, Transpose::no);
  at::cpu::addmm_(c_view, a_view, b_view, beta, alpha);  // beta == 0 ignores c's old values, NaN included
}

void blas_gemm(Transpose transpose_a, Transpose transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
               const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  // BLAS is column-major: the row-major c = op(a) op(b) is the column-major c^T = op(b)^T op(a)^T,
  // so the operands swap places and keep their transpose flags.
  const char ta = transpose_a == Transpose::yes ? 'T' : 'N', tb = transpose_b == Transpose::yes ? 'T' : 'N';
  // The sizes are held in 64-bit integers and passed as int*: an LP64 BLAS reads the low 32 bits,
  // an ILP64 one all 64, and on a little-endian machine both read the same value (all < 2^31).
  const int64_t sizes[6] = {n, m, k, ldb, lda, ldc};
  const int* as_int = reinterpret_cast<const int*>(sizes);
  sgemm_(&tb, &ta, as_int, as_int + 2, as_int + 4, &alpha, b, as_int + 6, a, as_int + 8, &beta, c, as_int + 10);
}

bool cpu_has_bf16_units() {
#if defined(__GNUC__) && defined(__x86_64__)
  return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

// Linux hands out AMX tile state only to processes that ask for it (torch asks too, in its own
// bf16 kernels); without it MKL quietly uses AVX512-BF16, about 1.4x slower here. Failing is harmless.
void request_amx() {
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchRequestXcompPermission = 0x1023, kXfeatureTileData = 18;
  syscall(SYS_arch_prctl, kArchRequestXcompPermission, kXfeatureTileData);
#endif
}

bool bf16_product_usable() {
  static const bool usable = [] {
    if (cblas_gemm_bf16bf16f32 == nullptr || !cpu_has_bf16_units()) return false;
    request_amx();
    return true;
  }();
  return usable;
}

#ifdef FASTGPT_BF16_PAIRS
#define FASTGPT_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// rows [0, kRows) of c for columns [first, min(n, first + 64)): kRows x 4 vectors of 16 fp32 sums in
// registers (24 of the 32 at 6 rows), each step one pair of a broadcast against 4 vectors of b
template <int kRows>
FASTGPT_BF16_TARGET void pairs_block(int64_t first, int64_t n, int64_t k_pairs, float alpha, const uint16_t* a,
                                     int64_t lda, const uint16_t* b, int64_t ldb, bool accumulate, float* c,
                                     int64_t ldc) {
  __mmask16 lanes[4];
  for (int v = 0; v < 4; ++v) {
    const int64_t left = n - first - 16 * v;
    lanes[v] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
  }
  __m512 sums[kRows][4];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) sums[r][v] = _mm512_setzero_ps();
  }
  const uint16_t* b_column = b + 2 * first;
  for (int64_t i = 0; i < k_pairs; ++i) {
    const uint16_t* b_pairs = b_column + i * ldb;
    __m512i columns[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) columns[v] = _mm512_maskz_loadu_epi32(lanes[v], b_pairs + 32 * v);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * i, sizeof pair);
      const __m512bh row_pair = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) sums[r][v] = _mm512_dpbf16_ps(sums[r][v], row_pair, (__m512bh)columns[v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      float* out = c + r * ldc + first + 16 * v;
      __m512 value = _mm512_mul_ps(sums[r][v], scale);
      if (accumulate) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(lanes[v], out));
      _mm512_mask_storeu_ps(out, lanes[v], value);
    }
  }
}

void pairs_rows(int rows, int64_t first, int64_t n, int64_t k_pairs, float alpha, const uint16_t* a, int64_t lda,
                const uint16_t* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  switch (rows) {
    case 1: return pairs_block<1>(first, n, k_pairs, alpha, a, lda, b, ldb, accumulate, c, ldc);
    case 2: return pairs_block<2>(first, n, k_pairs, alpha, a, lda, b, ldb, accumulate, c, ldc);
    case 3: return pairs_block<3>(first, n, k_pairs, alpha, a, lda, b, ldb, accumulate, c, ldc);
    case 4: return pairs_block<4>(first, n, k_pairs, alpha, a, lda, b, ldb, accumulate, c, ldc);
    case 5: return pairs_block<5>(first, n, k_pairs, alpha, a, lda, b, ldb, accumulate, c, ldc);
    default: return pairs_block<6>(first, n, k_pairs, alpha, a, lda, b, ldb, accumulate, c, ldc);
  }
}
#endif

}  // namespace

void gemm(Transpose transpose_a, Transpose transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const bool ta = transpose_a == Transpose::yes, tb = transpose_b == Transpose::yes;
  // what BLAS accepts: 32-bit sizes, and each row stride at least its row's length (at least 1)
  const bool blas_can = m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
                        ldc <= INT_MAX && lda >= std::max<int64_t>(1, ta ? m : k) &&
                        ldb >= std::max<int64_t>(1, tb ? k : n) && ldc >= std::max<int64_t>(1, n);
  if (blas_can && blas_available() && !force_aten_gemm.load(std::memory_order_relaxed)) {
    blas_gemm(transpose_a, transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    aten_gemm(transpose_a, transpose_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

bool bf16_gemm_available() { return bf16_product_usable() && !force_aten_gemm.load(std::memory_order_relaxed); }

void gemm(Transpose transpose_a, Transpose transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  TORCH_CHECK(bf16_gemm_available(), "fastgpt: bf16 gemm called where it is unavailable");
  if (m == 0 || n == 0) return;
  const bool ta = transpose_a == Transpose::yes, tb = transpose_b == Transpose::yes;
  cblas_gemm_bf16bf16f32(kCblasRowMajor, ta ? kCblasTrans : kCblasNoTrans, tb ? kCblasTrans : kCblasNoTrans,
                         static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha,
                         reinterpret_cast<const uint16_t*>(a), static_cast<int>(lda),
                         reinterpret_cast<const uint16_t*>(b), static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

bool bf16_dot_available() {
#ifdef FASTGPT_BF16_PAIRS
  static const bool usable = __builtin_cpu_supports("avx512bf16");
  return usable && !force_aten_gemm.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

bool bf16_pairs_available() {
#ifdef FASTGPT_BF16_PAIRS
  // where the CPU has AMX, MKL's bf16 product runs on it (bf16_gemm_available) and is left to that
  static const bool has_amx = __builtin_cpu_supports("amx-bf16");
  return !has_amx && bf16_dot_available();
#else
  return false;
#endif
}

void gemm_bf16_pairs(int64_t m, int64_t n, int64_t k_pairs, float alpha, const c10::BFloat16* a, int64_t lda,
                     const c10::BFloat16* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  TORCH_CHECK(bf16_pairs_available(), "fastgpt: gemm_bf16_pairs called where AVX512-BF16 is unavailable");
#ifdef FASTGPT_BF16_PAIRS
  if (n <= 0) return;
  const auto* a_bits = reinterpret_cast<const uint16_t*>(a);
  const auto* b_bits = reinterpret_cast<const uint16_t*>(b);
  // the 64 columns of a block stay in cache while every block of 6 rows passes over them
  for (int64_t first = 0; first < n; first += 64) {
    for (int64_t first_row = 0; first_row < m; first_row += 6) {
      pairs_rows(static_cast<int>(std::min<int64_t>(6, m - first_row)), first, n, k_pairs, alpha,
                 a_bits + first_row * lda, lda, b_bits, ldb, accumulate, c + first_row * ldc, ldc);
    }
  }
#endif
}

const char* gemm_path() { return blas_available() && !force_aten_gemm.load() ? "blas" : "aten"; }

void set_force_aten_gemm(bool enabled) { force_aten_gemm.store(enabled); }

}  // namespace fastgpt::cpu
