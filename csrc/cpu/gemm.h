// fp32 matrix products on row-major tiles for the CPU kernels.
//
// The attention kernels multiply small tiles (128 x 128 x 64) hundreds of times per call. Going
// through at::cpu::mm_out costs a tensor view per operand and a dispatch per product, about 2 us a
// call, 7% of a 128 x 128 x 64 product; this calls torch's own BLAS (MKL on x86-64) directly when
// torch exports it, with the same numerics, and falls back to at::cpu::addmm_ when it does not.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace fastgpt::cpu {

enum class Transpose : bool { no = false, yes = true };

// c = alpha * op(a) @ op(b) + beta * c, every matrix row-major with the given leading dimension
// (row stride); op(a) is m x k, op(b) is k x n, c is m x n. With beta == 0, c is only written.
void gemm(Transpose transpose_a, Transpose transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// The same for bf16 operands into an fp32 c, on the CPU's bf16 units (AMX or AVX512-BF16) through
// torch's MKL, about 2x the fp32 rate on 128 x 64 tiles here. Call only where bf16_gemm_available().
void gemm(Transpose transpose_a, Transpose transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c,
          int64_t ldc);

// bf16 products on the CPU's dot-product instructions (AVX512-BF16 VDPBF16PS), for operands the
// kernels lay out once and multiply many times. MKL's bf16 product packs both operands on every call,
// and on CPUs it does not tune for (AMD's) converts them to fp32 and runs its fp32 kernel.
//
// b in pairs: a k x n bf16 matrix stored as ceil(k / 2) rows of n pairs, element (i, j) at
// b[(i / 2) * ldb + 2 * j + i % 2] (ldb >= 2 n, in elements; an odd k's last pair padded with 0).
// c = alpha * a @ b (+ c where accumulate): a is m x 2 k_pairs, row-major with row stride lda,
// read in pairs of adjacent elements (any lda, any alignment); c is m x n, row stride ldc.
// Call only where bf16_pairs_available().
void gemm_bf16_pairs(int64_t m, int64_t n, int64_t k_pairs, float alpha, const c10::BFloat16* a, int64_t lda,
                     const c10::BFloat16* b, int64_t ldb, bool accumulate, float* c, int64_t ldc);

// Whether this CPU has AVX512-BF16's dot product VDPBF16PS (and the portable path is not forced).
bool bf16_dot_available();

// Whether bf16_dot_available() and this CPU has no AMX: on AMX, MKL's bf16 product (above) is the
// one to use.
bool bf16_pairs_available();

// Whether torch exports MKL's bf16 product and this CPU has bf16 units (and the portable path is not
// forced); where not, the kernels convert bf16 tiles to fp32 and use the fp32 gemm.
bool bf16_gemm_available();

// Which path gemm() takes: "blas" (torch's BLAS, called directly) or "aten" (at::cpu::addmm_).
const char* gemm_path();

// Test hook: route every fp32 gemm() through at::cpu::addmm_ even where the BLAS is available, and
// report the bf16 products unavailable.
void set_force_aten_gemm(bool enabled);

}  // namespace fastgpt::cpu
