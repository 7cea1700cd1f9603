// Attention forward on tensor cores (WMMA, fp16 / bf16 operands, fp32 accumulation), sm_80+.
//
// One block computes kBlockM = 64 query rows of one (batch, head); its 4 warps own 16 rows each.
// The block walks the keys kBlockN at a time (64 for head_dim <= 64, 32 above, to bound shared
// memory), with the online softmax of FlashAttention:
//   1. all 128 threads copy the K and V tiles (kBlockN x D) into shared memory (rows past seq_k
//      are zero, so masked probabilities multiply zeros, never garbage);
//   2. each warp computes its scores S = Q Kᵀ (16 x kBlockN) with WMMA 16x16x16 and stores them
//      to its private shared-memory tile (WMMA fragments have an opaque register layout, so the
//      softmax works on the stored tile);
//   3. lanes 2r and 2r+1 own row r of the warp's 16 rows: they mask, take the row max, rescale
//      the running sum and their half of the row's output accumulator, and write P = exp(S - max)
//      (rounded to T) over the scores they just read;
//   4. each warp adds P V into its output accumulator O (16 x D, fp32, shared memory: loaded
//      into WMMA accumulator fragments, multiplied into, stored back).
// At the end o = O / sum (0 for a row that saw no key) and lse = max + log(sum) (-inf for such a
// row). Scores are kept in the log2 domain (scale * log2(e) folded in) so exp is one exp2.
//
// Shared memory per block (elements of T unless said), every region 128-byte aligned and every
// 16-row fragment start 32-byte aligned as WMMA requires:
//   K tile  kBlockN x (D + 8)     (+8: rows start on different banks)
//   V tile  kBlockN x (D + 8)     (also stages the Q tile once, before the key loop)
//   S / P   4 warps x 16 x (kBlockN + 4) fp32; P (T, pitch kBlockN + 8) overwrites the warp's S
//   O       4 warps x 16 x (D + 4) fp32
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>

#include "launchers.h"

namespace fastgpt {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = kWarps * 16;  // query rows per block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr size_t round_up_128(size_t bytes) { return (bytes + 127) / 128 * 128; }

template <typename T, int D>
struct Tiles {
  static constexpr int kBlockN = D <= 64 ? 64 : 32;  // keys per iteration
  static constexpr int kKvPitch = D + 8;             // K / V / Q staging row pitch (elements)
  static constexpr int kSPitch = kBlockN + 4;        // fp32 scores
  static constexpr int kPPitch = kBlockN + 8;        // T probabilities, over the warp's scores
  static constexpr int kOPitch = D + 4;              // fp32 output accumulator
  static constexpr size_t kKvBytes = round_up_128(size_t(kBlockM > kBlockN ? kBlockM : kBlockN) * kKvPitch * sizeof(T));
  static constexpr size_t kSWarpBytes = 16 * kSPitch * sizeof(float);
  static constexpr size_t kOWarpBytes = 16 * kOPitch * sizeof(float);
  static constexpr size_t kKOffset = 0;
  static constexpr size_t kVOffset = kKOffset + kKvBytes;
  static constexpr size_t kSOffset = kVOffset + kKvBytes;
  static constexpr size_t kOOffset = kSOffset + round_up_128(kWarps * kSWarpBytes);
  static constexpr size_t kBytes = kOOffset + round_up_128(kWarps * kOWarpBytes);
  static_assert(16 * kPPitch * sizeof(T) <= kSWarpBytes, "P must fit over the warp's scores");
  static_assert(D % 16 == 0 && kBlockN % 16 == 0, "WMMA works on 16 x 16 x 16 tiles");
};

// Copies `rows` (<= kRows) rows of D elements from global memory (row r, column c at
// src[r * row_stride + c * dim_stride]) into a shared tile of pitch `pitch`; rows past `rows`
// up to kRows are zero. `vec`: dim_stride == 1 and every row 16-byte aligned (8-element copies).
template <typename T, int D, int kRows>
__device__ __forceinline__ void load_tile(T* tile, int pitch, const T* src, int64_t row_stride, int64_t dim_stride,
                                          int64_t rows, bool vec) {
  if (vec) {
    constexpr int kVectorsPerRow = D / 8;
    for (int idx = threadIdx.x; idx < kRows * kVectorsPerRow; idx += kThreads) {
      const int r = idx / kVectorsPerRow, c = idx % kVectorsPerRow * 8;
      uint4 value = make_uint4(0, 0, 0, 0);
      if (r < rows) value = *reinterpret_cast<const uint4*>(src + r * row_stride + c);
      *reinterpret_cast<uint4*>(tile + r * pitch + c) = value;
    }
  } else {
    for (int idx = threadIdx.x; idx < kRows * D; idx += kThreads) {
      const int r = idx / D, c = idx % D;
      tile[r * pitch + c] = r < rows ? src[r * row_stride + c * dim_stride] : from_float<T>(0.0f);
    }
  }
}

// grid.x = batch * heads * m_blocks (heaviest causal query blocks first); block = 128 threads.
// vec_mask: bit 0 / 1 / 2 set when q / k / v allow 16-byte copies.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(
    const T* __restrict__ q, Strides4 q_strides,  // (batch, heads, seq_q, D)
    const T* __restrict__ k, Strides4 k_strides,  // (batch, kv_heads, seq_k, D)
    const T* __restrict__ v, Strides4 v_strides,  // (batch, kv_heads, seq_k, D)
    T* __restrict__ o,                            // (batch, heads, seq_q, D) contiguous
    float* __restrict__ lse,                      // (batch, heads, seq_q) contiguous
    AttentionShape shape, bool causal, float scale_log2, int vec_mask) {
  using L = Tiles<T, D>;
  constexpr int kBlockN = L::kBlockN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* k_tile = reinterpret_cast<T*>(smem + L::kKOffset);
  T* v_tile = reinterpret_cast<T*>(smem + L::kVOffset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* s_tile = reinterpret_cast<float*>(smem + L::kSOffset + warp * L::kSWarpBytes);  // 16 x kSPitch
  T* p_tile = reinterpret_cast<T*>(s_tile);                                              // 16 x kPPitch
  float* o_tile = reinterpret_cast<float*>(smem + L::kOOffset + warp * L::kOWarpBytes);  // 16 x kOPitch

  const int64_t m_blocks = (shape.seq_q + kBlockM - 1) / kBlockM;
  const int64_t m_block = m_blocks - 1 - int64_t(blockIdx.x) % m_blocks;
  const int64_t batch_head = int64_t(blockIdx.x) / m_blocks;
  const int64_t b = batch_head / shape.heads, head = batch_head % shape.heads;
  const int64_t kv_head = head / (shape.heads / shape.kv_heads);
  const int64_t m0 = m_block * kBlockM;
  const int64_t causal_shift = shape.seq_k - shape.seq_q;  // query i sees keys j <= i + causal_shift
  // keys past the block's last row's horizon are skipped whole (n_end may be <= 0)
  const int64_t n_end = causal ? min(shape.seq_k, m0 + kBlockM + causal_shift) : shape.seq_k;

  // Q (64 x D) -> registers: staged through the V tile, then 16 x D per warp as D/16 fragments.
  load_tile<T, D, kBlockM>(v_tile, L::kKvPitch, q + b * q_strides.batch + head * q_strides.head + m0 * q_strides.seq,
                           q_strides.seq, q_strides.dim, shape.seq_q - m0, vec_mask & 1);
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q_frag[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wmma::load_matrix_sync(q_frag[kk], v_tile + warp * 16 * L::kKvPitch + kk * 16, L::kKvPitch);

  // Lanes 2r and 2r+1 own row r of this warp: columns c with c % 2 == half of S, P and O.
  const int row = lane / 2, half = lane % 2;
  const int64_t q_index = m0 + warp * 16 + row;
  float row_max = -INFINITY;  // running max of the row's scores (log2 domain)
  float row_sum = 0.0f;       // running sum of exp2(score - row_max)
  for (int c = half; c < D; c += 2) o_tile[row * L::kOPitch + c] = 0.0f;

  const T* k_head = k + b * k_strides.batch + kv_head * k_strides.head;
  const T* v_head = v + b * v_strides.batch + kv_head * v_strides.head;
  for (int64_t n0 = 0; n0 < n_end; n0 += kBlockN) {
    __syncthreads();  // the previous tiles (or the Q staging) are no longer read
    load_tile<T, D, kBlockN>(k_tile, L::kKvPitch, k_head + n0 * k_strides.seq, k_strides.seq, k_strides.dim,
                             shape.seq_k - n0, vec_mask & 2);
    load_tile<T, D, kBlockN>(v_tile, L::kKvPitch, v_head + n0 * v_strides.seq, v_strides.seq, v_strides.dim,
                             shape.seq_k - n0, vec_mask & 4);
    __syncthreads();

    // S = Q Kᵀ: K's rows are Kᵀ's columns, i.e. Kᵀ in column-major order with pitch kKvPitch.
#pragma unroll
    for (int j = 0; j < kBlockN / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag;
      wmma::fill_fragment(s_frag, 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> k_frag;
        wmma::load_matrix_sync(k_frag, k_tile + j * 16 * L::kKvPitch + kk * 16, L::kKvPitch);
        wmma::mma_sync(s_frag, q_frag[kk], k_frag, s_frag);
      }
      wmma::store_matrix_sync(s_tile + j * 16, s_frag, L::kSPitch, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of row `row`, this lane's columns c = 2 i + half.
    constexpr int kPerLane = kBlockN / 2;
    float scores[kPerLane];
    float tile_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c = 2 * i + half;
      const int64_t key = n0 + c;
      const bool visible = key < shape.seq_k && (!causal || key <= q_index + causal_shift);
      scores[i] = visible ? s_tile[row * L::kSPitch + c] * scale_log2 : -INFINITY;
      tile_max = fmaxf(tile_max, scores[i]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float new_max = fmaxf(row_max, tile_max);
    // a row that has seen no key yet keeps max -inf: subtract 0 instead, so exp2 gives 0, not NaN
    const float reference = new_max == -INFINITY ? 0.0f : new_max;
    const float alpha = exp2f(row_max - reference);  // 0 when row_max is -inf
    __syncwarp();  // every lane has read its scores before P overwrites them
    float tile_sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const float p = exp2f(scores[i] - reference);
      tile_sum += p;
      p_tile[row * L::kPPitch + 2 * i + half] = from_float<T>(p);
    }
    tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 1);
    row_sum = row_sum * alpha + tile_sum;
    row_max = new_max;
    for (int c = half; c < D; c += 2) o_tile[row * L::kOPitch + c] *= alpha;
    __syncwarp();

    // O += P V (P: 16 x kBlockN row-major; V: kBlockN x D row-major)
#pragma unroll
    for (int j = 0; j < D / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
      wmma::load_matrix_sync(o_frag, o_tile + j * 16, L::kOPitch, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(p_frag, p_tile + kk * 16, L::kPPitch);
        wmma::load_matrix_sync(v_frag, v_tile + kk * 16 * L::kKvPitch + j * 16, L::kKvPitch);
        wmma::mma_sync(o_frag, p_frag, v_frag, o_frag);
      }
      wmma::store_matrix_sync(o_tile + j * 16, o_frag, L::kOPitch, wmma::mem_row_major);
    }
    __syncwarp();
  }
  __syncwarp();

  if (q_index < shape.seq_q) {
    const int64_t out_row = batch_head * shape.seq_q + q_index;
    const float inv_sum = row_sum > 0.0f ? 1.0f / row_sum : 0.0f;  // a row that saw no key: o = 0
    for (int c = half; c < D; c += 2) o[out_row * D + c] = from_float<T>(o_tile[row * L::kOPitch + c] * inv_sum);
    if (half == 0) lse[out_row] = row_sum > 0.0f ? (row_max + log2f(row_sum)) * kLn2 : -INFINITY;
  }
}

bool can_copy_16_bytes(const void* base, const Strides4& s) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && s.dim == 1 && s.seq % 8 == 0 && s.head % 8 == 0 &&
         s.batch % 8 == 0;
}

template <typename T, int D>
cudaError_t launch_forward(const void* q, Strides4 q_strides, const void* k, Strides4 k_strides, const void* v,
                           Strides4 v_strides, void* o, float* lse, const AttentionShape& shape, bool causal,
                           float scale, cudaStream_t stream) {
  using L = Tiles<T, D>;
  auto kernel = attention_forward_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(L::kBytes));
  if (err != cudaSuccess) return err;
  const int64_t m_blocks = (shape.seq_q + kBlockM - 1) / kBlockM;
  const int64_t blocks = shape.batch * shape.heads * m_blocks;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int vec_mask = (can_copy_16_bytes(q, q_strides) ? 1 : 0) | (can_copy_16_bytes(k, k_strides) ? 2 : 0) |
                       (can_copy_16_bytes(v, v_strides) ? 4 : 0);
  kernel<<<unsigned(blocks), kThreads, L::kBytes, stream>>>(
      static_cast<const T*>(q), q_strides, static_cast<const T*>(k), k_strides, static_cast<const T*>(v), v_strides,
      static_cast<T*>(o), lse, shape, causal, scale * kLog2e, vec_mask);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_forward_for_dim(const void* q, Strides4 q_strides, const void* k, Strides4 k_strides,
                                   const void* v, Strides4 v_strides, void* o, float* lse,
                                   const AttentionShape& shape, bool causal, float scale, cudaStream_t stream) {
  switch (shape.head_dim) {
    case 32: return launch_forward<T, 32>(q, q_strides, k, k_strides, v, v_strides, o, lse, shape, causal, scale, stream);
    case 64: return launch_forward<T, 64>(q, q_strides, k, k_strides, v, v_strides, o, lse, shape, causal, scale, stream);
    case 96: return launch_forward<T, 96>(q, q_strides, k, k_strides, v, v_strides, o, lse, shape, causal, scale, stream);
    case 128: return launch_forward<T, 128>(q, q_strides, k, k_strides, v, v_strides, o, lse, shape, causal, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

const char* attention_unsupported(int64_t head_dim, DType dtype) {
  const auto listed = [](const auto& list, auto value) {
    for (const auto& item : list)
      if (item == value) return true;
    return false;
  };
  if (!listed(kAttentionDTypes, dtype)) return "the CUDA attention kernels take float16 or bfloat16 inputs only";
  if (!listed(kAttentionHeadDims, head_dim)) return "the CUDA attention kernels support head_dim 32, 64, 96 and 128 only";
  return nullptr;
}

int64_t attention_forward_workspace_floats(const AttentionShape& shape) {
  return shape.seq_q <= kDecodeMaxQueries ? attention_decode_workspace_floats(shape) : 0;
}

cudaError_t attention_forward(const void* q, Strides4 q_strides, const void* k, Strides4 k_strides, const void* v,
                              Strides4 v_strides, DType dtype, void* o, float* lse, float* workspace,
                              const AttentionShape& shape, bool causal, float scale, cudaStream_t stream) {
  if (attention_unsupported(shape.head_dim, dtype) != nullptr) return cudaErrorInvalidValue;
  if (shape.kv_heads < 1 || shape.heads % shape.kv_heads != 0) return cudaErrorInvalidValue;
  if (shape.batch * shape.heads * shape.seq_q == 0) return cudaSuccess;
  if (shape.seq_q <= kDecodeMaxQueries)
    return attention_decode_forward(q, q_strides, k, k_strides, v, v_strides, dtype, o, lse, workspace, shape, causal,
                                    scale, stream);
  if (dtype == DType::kFloat16)
    return launch_forward_for_dim<__half>(q, q_strides, k, k_strides, v, v_strides, o, lse, shape, causal, scale, stream);
  return launch_forward_for_dim<__nv_bfloat16>(q, q_strides, k, k_strides, v, v_strides, o, lse, shape, causal, scale,
                                               stream);
}

}  // namespace cuda
}  // namespace fastgpt
