// Split-key attention forward (flash-decoding) for few query rows against a long key cache.
//
// With seq_q <= 4 the tensor-core kernel would leave most of its 64-row tile empty and launch
// only batch * heads blocks; here the keys are cut into `splits` slices instead, and the query
// rows that read the same K/V head (the heads of a GQA group times the seq_q queries) are scored
// together, so a slice of K and V is read once per group of up to 8 rows:
//   split kernel  grid (batch * kv_heads * row_tiles, splits), 4 warps: block (tile, s) scores
//                 the R (1, 2, 4 or 8) rows of one tile of a kv head's query rows, ordered (head
//                 in group, query), against the keys of slice s. A key is read by a group of L =
//                 D/8 lanes (rounded up to a power of two; 16 for D = 96, 4 lanes idle), lane j
//                 holding elements [8j, 8j + 8) of q, k and v: one 16-byte load of k and of v per
//                 lane per key (element-wise loads when the K/V layout does not allow them). The
//                 32 / L key groups of a warp take consecutive keys; the block's groups g =
//                 0 .. 4*32/L - 1 take keys s0 + g, s0 + g + groups, ... A key's score is a
//                 shuffle sum over its L lanes; each group keeps an online softmax per row, and
//                 the groups merge through shared memory into a partial (o_s, lse_s) per row.
//   merge kernel  grid (batch * heads * seq_q), D threads: o = sum_s exp(lse_s - lse) o_s with
//                 lse = log sum_s exp(lse_s); all slices empty (causal) -> o = 0, lse = -inf.
// CUDA cores only (a 1..8-row product has no use for 16-row tensor-core tiles); fp32 math.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention_decode_plan.h"
#include "launchers.h"

namespace fastgpt {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kElemsPerLane = 8;      // one 16-byte load of fp16 / bf16
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Lanes that read one key row of D elements, 8 each (a power of two, so groups never straddle).
__host__ __device__ constexpr int lanes_per_key(int d) { return d <= 32 ? 4 : (d <= 64 ? 8 : 16); }

DecodePlan decode_plan_for(const AttentionShape& shape) {
  return decode_plan(shape.batch, shape.heads, shape.kv_heads, shape.seq_q, shape.seq_k, multiprocessor_count());
}

// Loads elements [first, first + 8) of a row (zeros at and past D): one 16-byte load when `vec`.
template <typename T, int D>
__device__ __forceinline__ void load_row_chunk(const T* row, int64_t dim_stride, int first, bool vec,
                                               float (&out)[kElemsPerLane]) {
  if (first >= D) {
#pragma unroll
    for (int e = 0; e < kElemsPerLane; ++e) out[e] = 0.0f;
  } else if (vec) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + first);
    const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < kElemsPerLane; ++e) out[e] = to_float(elems[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kElemsPerLane; ++e) out[e] = to_float(row[(first + e) * dim_stride]);
  }
}

// Blocks per multiprocessor the split kernel is compiled for: its registers grow with the rows.
__host__ __device__ constexpr int split_blocks_per_sm(int rows) { return rows <= 2 ? 4 : (rows <= 4 ? 3 : 2); }

template <typename T, int D, int R>
__global__ void __launch_bounds__(kWarps * 32, split_blocks_per_sm(R)) attention_decode_split_kernel(
    const T* __restrict__ q, Strides4 q_strides,  // (batch, heads, seq_q, D)
    const T* __restrict__ k, Strides4 k_strides,  // (batch, kv_heads, seq_k, D)
    const T* __restrict__ v, Strides4 v_strides,  // (batch, kv_heads, seq_k, D)
    float* __restrict__ partial_o,    // (batch * heads * seq_q, splits, D): o of each slice, normalized
    float* __restrict__ partial_lse,  // (batch * heads * seq_q, splits): log2-sum-exp2 of each slice
    AttentionShape shape, bool causal, float scale_log2, int64_t keys_per_split, int64_t row_tiles, bool vec) {
  constexpr int kLanes = lanes_per_key(D);
  constexpr int kGroups = kWarps * 32 / kLanes;  // key groups per block
  __shared__ float group_max[kGroups][R], group_sum[kGroups][R];
  __shared__ float group_acc[kGroups][R][D];
  __shared__ float row_scale[kGroups][R];  // exp2(group max - block max) / block sum
  __shared__ float row_lse[R];
  const int group = threadIdx.x / kLanes, first = (threadIdx.x % kLanes) * kElemsPerLane;
  const int64_t tile = blockIdx.x % row_tiles, batch_kv_head = blockIdx.x / row_tiles;
  const int64_t b = batch_kv_head / shape.kv_heads, kv_head = batch_kv_head % shape.kv_heads;
  const int64_t group_heads = shape.heads / shape.kv_heads, group_rows = group_heads * shape.seq_q;
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const int64_t key_begin = split * keys_per_split;

  // this tile's rows: row r is (head kv_head * group_heads + g, query i) with g * seq_q + i = tile R + r
  float q_reg[R][kElemsPerLane];
  int visible_keys[R];  // keys [key_begin, key_begin + visible_keys) of the slice; 0 for a padding row
  int64_t key_end = key_begin;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t group_row = tile * R + r;
    const int64_t head = kv_head * group_heads + group_row / shape.seq_q, i = group_row % shape.seq_q;
    const int64_t visible_end = group_row >= group_rows ? 0
                                : causal                ? min(shape.seq_k, i + shape.seq_k - shape.seq_q + 1)
                                                        : shape.seq_k;
    const int64_t slice_end = min(key_begin + keys_per_split, visible_end);
    visible_keys[r] = slice_end > key_begin ? int(slice_end - key_begin) : 0;
    key_end = max(key_end, slice_end);
    if (group_row < group_rows) {
      const T* q_row = q + b * q_strides.batch + head * q_strides.head + i * q_strides.seq;
      load_row_chunk<T, D>(q_row, q_strides.dim, first, false, q_reg[r]);
    } else {
      load_row_chunk<T, D>(q, 0, D, false, q_reg[r]);  // zeros
    }
#pragma unroll
    for (int e = 0; e < kElemsPerLane; ++e) q_reg[r][e] *= scale_log2;  // scores in log2 domain
  }

  const T* k_head = k + b * k_strides.batch + kv_head * k_strides.head;
  const T* v_head = v + b * v_strides.batch + kv_head * v_strides.head;
  float running_max[R], running_sum[R], acc[R][kElemsPerLane];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    running_max[r] = -INFINITY;
    running_sum[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < kElemsPerLane; ++e) acc[r][e] = 0.0f;
  }
  // the loop bounds are uniform over the block, so every lane of a warp shuffles together
  for (int64_t base = key_begin; base < key_end; base += kGroups) {
    const int64_t key = base + group;
    const int key_offset = int(key - key_begin);
    const bool in_slice = key < key_end;
    float kf[kElemsPerLane], vf[kElemsPerLane];
    load_row_chunk<T, D>(k_head + key * k_strides.seq, k_strides.dim, in_slice ? first : D, vec, kf);
    load_row_chunk<T, D>(v_head + key * v_strides.seq, v_strides.dim, in_slice ? first : D, vec, vf);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float score = 0.0f;
#pragma unroll
      for (int e = 0; e < kElemsPerLane; ++e) score += q_reg[r][e] * kf[e];
#pragma unroll
      for (int offset = kLanes / 2; offset > 0; offset >>= 1) score += __shfl_xor_sync(0xffffffffu, score, offset);
      const bool visible = key_offset < visible_keys[r];
      // a row that has seen no key keeps max = -inf, sum = 0, acc = 0
      const float new_max = visible ? fmaxf(running_max[r], score) : running_max[r];
      const float alpha = visible ? exp2f(running_max[r] - new_max) : 1.0f;  // exp2(-inf) = 0
      const float p = visible ? exp2f(score - new_max) : 0.0f;
      running_sum[r] = running_sum[r] * alpha + p;
#pragma unroll
      for (int e = 0; e < kElemsPerLane; ++e) acc[r][e] = acc[r][e] * alpha + p * vf[e];
      running_max[r] = new_max;
    }
  }

  // merge the groups' softmax states, row by row, in group order
  const bool leader = threadIdx.x % kLanes == 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (leader) {
      group_max[group][r] = running_max[r];
      group_sum[group][r] = running_sum[r];
    }
    if (first < D) {
#pragma unroll
      for (int e = 0; e < kElemsPerLane; ++e) group_acc[group][r][first + e] = acc[r][e];
    }
  }
  __syncthreads();
  if (threadIdx.x < R) {
    const int r = threadIdx.x;
    float block_max = -INFINITY;
    for (int g = 0; g < kGroups; ++g) block_max = fmaxf(block_max, group_max[g][r]);
    float block_sum = 0.0f;
    for (int g = 0; g < kGroups; ++g) {
      const float weight = group_max[g][r] == -INFINITY ? 0.0f : exp2f(group_max[g][r] - block_max);
      row_scale[g][r] = weight;
      block_sum += group_sum[g][r] * weight;
    }
    for (int g = 0; g < kGroups; ++g) row_scale[g][r] = block_sum > 0.0f ? row_scale[g][r] / block_sum : 0.0f;
    row_lse[r] = block_max == -INFINITY ? -INFINITY : block_max + log2f(block_sum);  // -inf: no visible key
  }
  __syncthreads();
  for (int item = threadIdx.x; item < R * D; item += blockDim.x) {
    const int r = item / D, c = item % D;
    const int64_t group_row = tile * R + r;
    if (group_row >= group_rows) break;  // items are in row order
    float value = 0.0f;
    for (int g = 0; g < kGroups; ++g) value += group_acc[g][r][c] * row_scale[g][r];
    const int64_t head = kv_head * group_heads + group_row / shape.seq_q, i = group_row % shape.seq_q;
    const int64_t row = (b * shape.heads + head) * shape.seq_q + i;
    partial_o[(row * splits + split) * D + c] = value;
    if (c == 0) partial_lse[row * splits + split] = row_lse[r];
  }
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

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte loads of K / V rows: unit element stride and every row start on a 16-byte boundary.
bool can_vectorize(const void* p, const Strides4& strides) {
  return aligned16(p) && strides.dim == 1 && strides.seq % kElemsPerLane == 0 &&
         strides.head % kElemsPerLane == 0 && strides.batch % kElemsPerLane == 0;
}

template <typename T, int D, int R>
cudaError_t launch_split(const DecodePlan& plan, const void* q, Strides4 q_strides, const void* k, Strides4 k_strides,
                         const void* v, Strides4 v_strides, float* partial_o, float* partial_lse,
                         const AttentionShape& shape, bool causal, float scale, cudaStream_t stream) {
  const int64_t blocks = shape.batch * shape.kv_heads * plan.row_tiles;
  const bool vec = can_vectorize(k, k_strides) && can_vectorize(v, v_strides);
  attention_decode_split_kernel<T, D, R><<<dim3(unsigned(blocks), unsigned(plan.splits)), kWarps * 32, 0, stream>>>(
      static_cast<const T*>(q), q_strides, static_cast<const T*>(k), k_strides, static_cast<const T*>(v), v_strides,
      partial_o, partial_lse, shape, causal, scale * kLog2e, plan.keys_per_split, plan.row_tiles, vec);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_decode(const void* q, Strides4 q_strides, const void* k, Strides4 k_strides, const void* v,
                          Strides4 v_strides, void* o, float* lse, float* workspace, const AttentionShape& shape,
                          bool causal, float scale, cudaStream_t stream) {
  const DecodePlan plan = decode_plan_for(shape);
  const int64_t rows = shape.batch * shape.heads * shape.seq_q;
  if (rows > 0x7fffffff || shape.batch * shape.kv_heads * plan.row_tiles > 0x7fffffff || plan.splits > 65535 ||
      plan.keys_per_split > 0x7fffffff)
    return cudaErrorInvalidConfiguration;  // grid limits
  float* partial_o = workspace;
  float* partial_lse = workspace + rows * plan.splits * D;
  const auto split = [&](auto launch) {
    return launch(plan, q, q_strides, k, k_strides, v, v_strides, partial_o, partial_lse, shape, causal, scale, stream);
  };
  cudaError_t err;
  switch (plan.tile_rows) {
    case 1: err = split(launch_split<T, D, 1>); break;
    case 2: err = split(launch_split<T, D, 2>); break;
    case 4: err = split(launch_split<T, D, 4>); break;
    default: err = split(launch_split<T, D, kDecodeMaxTileRows>); break;
  }
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
  const DecodePlan plan = decode_plan_for(shape);
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
