// fp32 matrix products on row-major tiles for the CPU kernels.
//
// The attention kernels multiply small tiles (128 x 128 x 64) hundreds of times per call. Going
// through at::cpu::mm_out costs a tensor view per operand and a dispatch per product, about 2 us a
// call, 7% of a 128 x 128 x 64 product; this calls torch's own BLAS (MKL on x86-64) directly when
// torch exports it, with the same numerics, and falls back to at::cpu::addmm_ when it does not.
#pragma once

#include <cstdint>

namespace fastgpt::cpu {

enum class Transpose : bool { no = false, yes = true };

// c = alpha * op(a) @ op(b) + beta * c, every matrix row-major with the given leading dimension
// (row stride); op(a) is m x k, op(b) is k x n, c is m x n. With beta == 0, c is only written.
void gemm(Transpose transpose_a, Transpose transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Which path gemm() takes: "blas" (torch's BLAS, called directly) or "aten" (at::cpu::addmm_).
const char* gemm_path();

// Test hook: route every gemm() through at::cpu::addmm_ even where the BLAS is available.
void set_force_aten_gemm(bool enabled);

}  // namespace fastgpt::cpu
