// Split-key attention forward (flash-decoding) for few query rows against a long key cache.
//
// With seq_q <= 4 the tensor-core kernel would leave most of its 64-row tile empty and launch
// only batch * heads blocks; here the keys are cut into `splits` slices instead:
//   split kernel  grid (batch * heads * seq_q, splits), 4 warps: block (row, s) scores query row
//                 `row` against the keys of slice s. Warp w takes keys s0 + w, s0 + w + 4, ...;
//                 lane l holds elements [l * D/32, (l + 1) * D/32) of q, k and v, so one key's
//                 score is a warp-wide sum of shuffles; each warp keeps an online softmax, and
//                 the 4 warps merge through shared memory into a partial (o_s, lse_s).
//   merge kernel  grid (batch * heads * seq_q), D threads: o = sum_s exp(lse_s - lse) o_s with
//                 lse = log sum_s exp(lse_s); all slices empty (causal) -> o = 0, lse = -inf.
// CUDA cores only (a 1..4-row product has no use for 16-row tensor-core tiles); fp32 math.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "launchers.h"

namespace fastgpt {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kKeysPerSplitMin = 64;  // fewer keys per block would not pay for its merge
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

struct DecodePlan {
  int64_t splits;          // key slices per query row
  int64_t keys_per_split;  // keys in each slice (the last may be shorter)
};

// Enough blocks to fill the device about 4 times over, slices of at least kKeysPerSplitMin keys.
DecodePlan decode_plan(const AttentionShape& shape) {
  const int64_t rows = shape.batch * shape.heads * shape.seq_q;
  const int64_t target_blocks = 4 * int64_t(multiprocessor_count());
  const int64_t max_splits = (shape.seq_k + kKeysPerSplitMin - 1) / kKeysPerSplitMin;
  int64_t splits = (target_blocks + rows - 1) / rows;
  splits = splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
  const int64_t keys_per_split = (shape.seq_k + splits - 1) / splits;
  return {(shape.seq_k + keys_per_split - 1) / keys_per_split, keys_per_split};  // no empty last slice
}

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32, 4) attention_decode_split_kernel(
    const T* __restrict__ q, Strides4 q_strides,  // (batch, heads, seq_q, D)
    const T* __restrict__ k, Strides4 k_strides,  // (batch, kv_heads, seq_k, D)
    const T* __restrict__ v, Strides4 v_strides,  // (batch, kv_heads, seq_k, D)
    float* __restrict__ partial_o,    // (batch * heads * seq_q, splits, D): o of each slice, normalized
    float* __restrict__ partial_lse,  // (batch * heads * seq_q, splits): log2-sum-exp2 of each slice
    AttentionShape shape, bool causal, float scale_log2, int64_t keys_per_split) {
  constexpr int kPerLane = D / 32;
  __shared__ float warp_max[kWarps], warp_sum[kWarps];
  __shared__ float warp_acc[kWarps][D];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x;  // (batch * heads + head) * seq_q + i
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const int64_t i = row % shape.seq_q, batch_head = row / shape.seq_q;
  const int64_t b = batch_head / shape.heads, head = batch_head % shape.heads;
  const int64_t kv_head = head / (shape.heads / shape.kv_heads);

  // keys [key_begin, key_end) of this slice that the row may see
  const int64_t visible_end = causal ? min(shape.seq_k, i + shape.seq_k - shape.seq_q + 1) : shape.seq_k;
  const int64_t key_begin = split * keys_per_split;
  const int64_t key_end = min(key_begin + keys_per_split, visible_end);

  const T* q_row = q + b * q_strides.batch + head * q_strides.head + i * q_strides.seq;
  const T* k_head = k + b * k_strides.batch + kv_head * k_strides.head;
  const T* v_head = v + b * v_strides.batch + kv_head * v_strides.head;
  float q_reg[kPerLane], acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    q_reg[e] = to_float(q_row[(lane * kPerLane + e) * q_strides.dim]) * scale_log2;  // scores in log2 domain
    acc[e] = 0.0f;
  }
  float running_max = -INFINITY, running_sum = 0.0f;
  for (int64_t key = key_begin + warp; key < key_end; key += kWarps) {
    const T* k_row = k_head + key * k_strides.seq;
    const T* v_row = v_head + key * v_strides.seq;
    float score = 0.0f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) score += q_reg[e] * to_float(k_row[(lane * kPerLane + e) * k_strides.dim]);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) score += __shfl_xor_sync(0xffffffffu, score, offset);
    const float new_max = fmaxf(running_max, score);  // finite: score is
    const float alpha = exp2f(running_max - new_max), p = exp2f(score - new_max);
    running_sum = running_sum * alpha + p;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[e] = acc[e] * alpha + p * to_float(v_row[(lane * kPerLane + e) * v_strides.dim]);
    running_max = new_max;
  }

  // merge the 4 warps' softmax states
  if (lane == 0) {
    warp_max[warp] = running_max;
    warp_sum[warp] = running_sum;
  }
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) warp_acc[warp][lane * kPerLane + e] = acc[e];
  __syncthreads();
  float block_max = -INFINITY;
  for (int w = 0; w < kWarps; ++w) block_max = fmaxf(block_max, warp_max[w]);
  float* o_slice = partial_o + (row * splits + split) * D;
  if (block_max == -INFINITY) {  // no visible key in this slice
    for (int c = threadIdx.x; c < D; c += blockDim.x) o_slice[c] = 0.0f;
    if (threadIdx.x == 0) partial_lse[row * splits + split] = -INFINITY;
    return;
  }
  float block_sum = 0.0f;
  for (int w = 0; w < kWarps; ++w) block_sum += warp_sum[w] * exp2f(warp_max[w] - block_max);  // 0 for empty warps
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float value = 0.0f;
    for (int w = 0; w < kWarps; ++w) value += warp_acc[w][c] * exp2f(warp_max[w] - block_max);
    o_slice[c] = value / block_sum;
  }
  if (threadIdx.x == 0) partial_lse[row * splits + split] = block_max + log2f(block_sum);
}

// grid = batch * heads * seq_q rows, blockDim.x = D.
template <typename T>
__global__ void attention_decode_merge_kernel(const float* __restrict__ partial_o,    // (rows, splits, D)
                                              const float* __restrict__ partial_lse,  // (rows, splits), log2
                                              T* __restrict__ o,                      // (rows, D) contiguous
                                              float* __restrict__ lse,                // (rows,), natural log
                                              int64_t splits) {
  const int64_t row = blockIdx.x;
  const int D = blockDim.x, c = threadIdx.x;
  const float* row_lse = partial_lse + row * splits;
  float max_lse = -INFINITY;
  for (int64_t s = 0; s < splits; ++s) max_lse = fmaxf(max_lse, row_lse[s]);
  if (max_lse == -INFINITY) {  // the row sees no key (causal, seq_q > seq_k)
    o[row * D + c] = from_float<T>(0.0f);
    if (c == 0) lse[row] = -INFINITY;
    return;
  }
  float total = 0.0f, value = 0.0f;
  for (int64_t s = 0; s < splits; ++s) {
    const float weight = exp2f(row_lse[s] - max_lse);  // 0 for an empty slice
    total += weight;
    value += weight * partial_o[(row * splits + s) * D + c];
  }
  o[row * D + c] = from_float<T>(value / total);
  if (c == 0) lse[row] = (max_lse + log2f(total)) * kLn2;
}

template <typename T, int D>
cudaError_t launch_decode(const void* q, Strides4 q_strides, const void* k, Strides4 k_strides, const void* v,
                          Strides4 v_strides, void* o, float* lse, float* workspace, const AttentionShape& shape,
                          bool causal, float scale, cudaStream_t stream) {
  const DecodePlan plan = decode_plan(shape);
  const int64_t rows = shape.batch * shape.heads * shape.seq_q;
  if (rows > 0x7fffffff || plan.splits > 65535) return cudaErrorInvalidConfiguration;  // grid limits
  float* partial_o = workspace;
  float* partial_lse = workspace + rows * plan.splits * D;
  attention_decode_split_kernel<T, D><<<dim3(unsigned(rows), unsigned(plan.splits)), kWarps * 32, 0, stream>>>(
      static_cast<const T*>(q), q_strides, static_cast<const T*>(k), k_strides, static_cast<const T*>(v), v_strides,
      partial_o, partial_lse, shape, causal, scale * kLog2e, plan.keys_per_split);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  attention_decode_merge_kernel<T><<<unsigned(rows), D, 0, stream>>>(partial_o, partial_lse, static_cast<T*>(o), lse,
                                                                     plan.splits);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_decode_for_dim(const void* q, Strides4 q_strides, const void* k, Strides4 k_strides,
                                  const void* v, Strides4 v_strides, void* o, float* lse, float* workspace,
                                  const AttentionShape& shape, bool causal, float scale, cudaStream_t stream) {
  switch (shape.head_dim) {
    case 32: return launch_decode<T, 32>(q, q_strides, k, k_strides, v, v_strides, o, lse, workspace, shape, causal, scale, stream);
    case 64: return launch_decode<T, 64>(q, q_strides, k, k_strides, v, v_strides, o, lse, workspace, shape, causal, scale, stream);
    case 96: return launch_decode<T, 96>(q, q_strides, k, k_strides, v, v_strides, o, lse, workspace, shape, causal, scale, stream);
    case 128: return launch_decode<T, 128>(q, q_strides, k, k_strides, v, v_strides, o, lse, workspace, shape, causal, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int64_t attention_decode_workspace_floats(const AttentionShape& shape) {
  const DecodePlan plan = decode_plan(shape);
  return shape.batch * shape.heads * shape.seq_q * plan.splits * (shape.head_dim + 1);
}

cudaError_t attention_decode_forward(const void* q, Strides4 q_strides, const void* k, Strides4 k_strides,
                                     const void* v, Strides4 v_strides, DType dtype, void* o, float* lse,
                                     float* workspace, const AttentionShape& shape, bool causal, float scale,
                                     cudaStream_t stream) {
  if (workspace == nullptr) return cudaErrorInvalidValue;
  if (dtype == DType::kFloat16)
    return launch_decode_for_dim<__half>(q, q_strides, k, k_strides, v, v_strides, o, lse, workspace, shape, causal,
                                         scale, stream);
  if (dtype == DType::kBFloat16)
    return launch_decode_for_dim<__nv_bfloat16>(q, q_strides, k, k_strides, v, v_strides, o, lse, workspace, shape,
                                                causal, scale, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastgpt
