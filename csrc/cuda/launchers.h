// Launchers of fastgpt's CUDA kernels: plain C++ (raw pointers, sizes, strides, a stream).
//
// The .cu files include only CUDA headers and this one, so they compile with `nvcc -c` on a
// machine whose torch is a CPU build; csrc/cuda/bindings.cpp is the only torch-side caller.
// Every launcher enqueues on `stream` and returns the first CUDA error it met (cudaSuccess
// otherwise), or cudaErrorInvalidValue for arguments it does not support. Strides and sizes
// are in elements, not bytes.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "add_layer_norm_schedule.h"
#include "limits.h"

namespace fastgpt {
namespace cuda {

// Multiprocessors of the current device: sizes grids. Results do not depend on it, except the
// rounding of the add+LayerNorm backward's dweight / dbias (its partial rows; the same device
// gives the same bits).
inline int multiprocessor_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 108;  // an A100's count
  return count;
}

// ------------------------------------------------------------------------------ add + LayerNorm
// Rows are the leading dimensions flattened; row r of a tensor starts at ptr + r * row_stride and
// its n elements are contiguous (the binding makes a contiguous copy when the last stride is not 1
// or the leading dimensions do not flatten to one stride).

// h = x + residual; y = (h - mean) * rstd * weight + bias (RMS: mean = 0, no bias).
cudaError_t add_layer_norm_forward(
    const void* x, DType x_dtype, int64_t x_row_stride,                       // (rows, n)
    const void* residual, DType residual_dtype, int64_t residual_row_stride,  // (rows, n), x_dtype or fp32
    const float* weight,  // (n,) fp32 contiguous, or nullptr
    const float* bias,    // (n,) fp32 contiguous, or nullptr
    void* y,              // (rows, n) x_dtype, contiguous
    void* h, DType h_dtype,  // (rows, n) contiguous, x_dtype or fp32
    float* mean,          // (rows,) fp32 (zeros in RMS mode)
    float* rstd,          // (rows,) fp32
    int64_t rows, int64_t n, float eps, bool is_rms_norm, cudaStream_t stream);

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh, g = dy * weight, xhat = (h - mean) * rstd
// (RMS: no mean(g) term). dweight = sum_rows dy * xhat, dbias = sum_rows dy, deterministic and
// without atomics: `programs` programs (add_layer_norm_backward_programs(rows, n,
// multiprocessor_count()) sizes the grid; any count >= 1 gives correct sums) each write one fp32
// partial row to the workspace, then a second kernel adds the rows of each column in a fixed order
// (add_layer_norm_schedule.h) and stores dweight / dbias in their own dtype.
cudaError_t add_layer_norm_backward(
    const void* dy, DType dy_dtype, int64_t dy_row_stride,  // (rows, n)
    const void* dh, int64_t dh_row_stride,                  // (rows, n) h_dtype, or nullptr
    const void* h, DType h_dtype, int64_t h_row_stride,     // (rows, n)
    const float* weight,  // (n,) fp32 contiguous, or nullptr (then g = dy)
    const float* mean,    // (rows,) fp32 contiguous (ignored in RMS mode)
    const float* rstd,    // (rows,) fp32 contiguous
    void* dx,             // (rows, n) h_dtype, contiguous
    void* dweight, DType dweight_dtype,  // (n,), or nullptr when not wanted
    void* dbias, DType dbias_dtype,      // (n,), or nullptr when not wanted
    float* workspace,     // (2, programs, n) fp32 when dweight or dbias is wanted, else nullptr
    int64_t programs, int64_t rows, int64_t n, bool is_rms_norm, cudaStream_t stream);

// ------------------------------------------------------------------------------ attention
// q (batch, heads, seq_q, head_dim); k, v (batch, kv_heads, seq_k, head_dim), any strides;
// query head i reads kv head i / (heads / kv_heads). Causal masks bottom-right: query i sees
// keys j <= i + seq_k - seq_q; a row that sees no key gets o = 0 and lse = -inf.

struct AttentionShape {
  int64_t batch, heads, kv_heads, seq_q, seq_k, head_dim;
};

// Strides (elements) of one 4-d tensor, in the order (batch, head, seq, dim).
struct Strides4 {
  int64_t batch, head, seq, dim;
};

// nullptr when the kernels support this head dim / dtype, else a short reason.
const char* attention_unsupported(int64_t head_dim, DType dtype);

// Size (in floats) of the fp32 workspace the forward needs: > 0 when it takes the split-key
// decode path (few queries against a long key cache), 0 otherwise (pass nullptr then).
int64_t attention_forward_workspace_floats(const AttentionShape& shape);

cudaError_t attention_forward(
    const void* q, Strides4 q_strides,  // (batch, heads, seq_q, head_dim)
    const void* k, Strides4 k_strides,  // (batch, kv_heads, seq_k, head_dim)
    const void* v, Strides4 v_strides,  // (batch, kv_heads, seq_k, head_dim)
    DType dtype,                        // of q, k, v and o: kFloat16 or kBFloat16
    void* o,                            // (batch, heads, seq_q, head_dim) contiguous, dtype
    float* lse,                         // (batch, heads, seq_q) fp32 contiguous, natural log
    float* workspace,                   // attention_forward_workspace_floats(shape) floats, or nullptr
    const AttentionShape& shape, bool causal, float scale, cudaStream_t stream);

// The split-key (flash-decoding) path that attention_forward takes by itself for few queries
// (seq_q <= kDecodeMaxQueries): each block scores the query rows of one kv head (the heads of its
// GQA group times the queries, up to 8 per block) against one slice of the keys, reading that
// slice of K and V once with 16-byte loads, and writes a partial (o, lse) per row; a second
// kernel merges the slices by log-sum-exp.
constexpr int64_t kDecodeMaxQueries = 4;
int64_t attention_decode_workspace_floats(const AttentionShape& shape);
cudaError_t attention_decode_forward(const void* q, Strides4 q_strides, const void* k, Strides4 k_strides,
                                     const void* v, Strides4 v_strides, DType dtype, void* o, float* lse,
                                     float* workspace,  // attention_decode_workspace_floats(shape) floats
                                     const AttentionShape& shape, bool causal, float scale, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastgpt
