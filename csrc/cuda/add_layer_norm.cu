// Fused add + LayerNorm / RMSNorm, forward and backward, for fp32 / fp16 / bf16 rows.
//
// Work split: a row of n elements is cut into chunks of kChunk = 8 consecutive elements (one
// 16-byte load for fp16/bf16, two for fp32). Thread t of a row owns chunks t, t + T, t + 2T, ...
// (T = threads per row), up to K chunks, and keeps their values in registers between the
// passes of the row (sum, centered sum of squares, output), so every input is read once.
//   narrow rows (n <= 1024): one warp per row, 4 rows per block (blockDim = (32, 4)), K = 1, 2, 4;
//   wide rows (n <= 16384):  one block per row (blockDim = (T, 1)), K = 4, T = n / 32 rounded up
//                            to whole warps (<= 512).
// Statistics are fp32. 16-byte vector loads/stores are used when every pointer is 16-byte
// aligned, n % 8 == 0 and every row stride is a multiple of 8 elements; scalar loads otherwise.
// x / y / dy have the template element type T; residual, h, dh and dx are fp32 or T, chosen at
// run time (a warp-uniform branch), which keeps the number of instantiations small.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <initializer_list>

#include "launchers.h"

namespace fastgpt {
namespace cuda {
namespace {

constexpr int kChunk = 8;              // elements per chunk
constexpr int kWarpRowsPerBlock = 4;   // rows per block in warp-per-row mode
constexpr int kMaxThreadsPerRow = 512; // block-per-row mode: n <= 512 threads * 4 chunks * 8

// ---------------------------------------------------------------- element conversions

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Loads `valid` (<= 8) elements at p into out[0..7], zero-filling the rest; `vec`: one aligned
// 16-byte access per 16 bytes (then valid == 8).
template <typename T>
__device__ __forceinline__ void load_chunk(const T* p, int valid, bool vec, float (&out)[kChunk]) {
  if (vec) {
    constexpr int kPerVector = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < kChunk / kPerVector; ++v) {
      uint4 raw = reinterpret_cast<const uint4*>(p)[v];
      const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerVector; ++i) out[v * kPerVector + i] = to_float(elems[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) out[i] = i < valid ? to_float(p[i]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* p, int valid, bool vec, const float (&in)[kChunk]) {
  if (vec) {
    constexpr int kPerVector = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < kChunk / kPerVector; ++v) {
      uint4 raw;
      T* elems = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerVector; ++i) elems[i] = from_float<T>(in[v * kPerVector + i]);
      reinterpret_cast<uint4*>(p)[v] = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (i < valid) p[i] = from_float<T>(in[i]);
  }
}

// The same for a tensor whose dtype is known only at run time (residual, h, dh, dx).
__device__ __forceinline__ void load_chunk_any(const void* base, DType dtype, int64_t offset, int valid, bool vec,
                                               float (&out)[kChunk]) {
  switch (dtype) {
    case DType::kFloat32: load_chunk(static_cast<const float*>(base) + offset, valid, vec, out); break;
    case DType::kFloat16: load_chunk(static_cast<const __half*>(base) + offset, valid, vec, out); break;
    default: load_chunk(static_cast<const __nv_bfloat16*>(base) + offset, valid, vec, out); break;
  }
}

__device__ __forceinline__ void store_chunk_any(void* base, DType dtype, int64_t offset, int valid, bool vec,
                                                const float (&in)[kChunk]) {
  switch (dtype) {
    case DType::kFloat32: store_chunk(static_cast<float*>(base) + offset, valid, vec, in); break;
    case DType::kFloat16: store_chunk(static_cast<__half*>(base) + offset, valid, vec, in); break;
    default: store_chunk(static_cast<__nv_bfloat16*>(base) + offset, valid, vec, in); break;
  }
}

// ---------------------------------------------------------------- reductions

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the threads of one row, returned to every thread of the row. Warp mode
// (blockDim.x == 32): shuffles only. Block mode (blockDim.y == 1): the warps' sums go through
// `scratch` (32 floats of shared memory) and every thread adds them in the same order.
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < blockDim.x / 32; ++w) total += scratch[w];
  return total;
}

// Column of the first element of this thread's k-th chunk, and how many of its 8 are inside the row.
__device__ __forceinline__ int64_t chunk_column(int k) { return (int64_t(threadIdx.x) + int64_t(k) * blockDim.x) * kChunk; }
__device__ __forceinline__ int chunk_valid(int64_t col, int64_t n) {
  return col >= n ? 0 : (n - col >= kChunk ? kChunk : int(n - col));
}

// ---------------------------------------------------------------- forward

template <typename T, int K>
__global__ void __launch_bounds__(kMaxThreadsPerRow) add_layer_norm_forward_kernel(
    const T* __restrict__ x, int64_t x_row_stride,                           // (rows, n)
    const void* __restrict__ residual, DType residual_dtype, int64_t residual_row_stride,  // (rows, n)
    const float* __restrict__ weight,  // (n,) or nullptr
    const float* __restrict__ bias,    // (n,) or nullptr
    T* __restrict__ y,                 // (rows, n) contiguous
    void* __restrict__ h, DType h_dtype,  // (rows, n) contiguous
    float* __restrict__ mean_out,      // (rows,)
    float* __restrict__ rstd_out,      // (rows,)
    int64_t rows, int64_t n, float eps, bool is_rms_norm, bool vec) {
  __shared__ float scratch[32];
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // a whole warp (warp mode) or the whole block (block mode, grid == rows)

  // pass 1: h = x + residual (fp32 sum, stored in h's dtype), row sum
  float hv[K][kChunk];
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t col = chunk_column(k);
    const int valid = chunk_valid(col, n);
    float r[kChunk];
    if (valid > 0) {
      load_chunk(x + row * x_row_stride + col, valid, vec, hv[k]);
      load_chunk_any(residual, residual_dtype, row * residual_row_stride + col, valid, vec, r);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        hv[k][i] += r[i];  // both zero past the row end
        sum += hv[k][i];
      }
      store_chunk_any(h, h_dtype, row * n + col, valid, vec, hv[k]);
    } else {
#pragma unroll
      for (int i = 0; i < kChunk; ++i) hv[k][i] = 0.0f;
    }
  }
  const float mean = is_rms_norm ? 0.0f : row_sum(sum, scratch) / float(n);

  // pass 2: variance around the mean (two passes over registers: no cancellation)
  float squares = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int valid = chunk_valid(chunk_column(k), n);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      const float centered = hv[k][i] - mean;
      squares += i < valid ? centered * centered : 0.0f;
    }
  }
  const float rstd = rsqrtf(row_sum(squares, scratch) / float(n) + eps);

  // pass 3: y = (h - mean) * rstd * weight + bias
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t col = chunk_column(k);
    const int valid = chunk_valid(col, n);
    if (valid == 0) continue;
    float w[kChunk], b[kChunk];
    if (weight != nullptr) load_chunk(weight + col, valid, vec, w);
    if (bias != nullptr) load_chunk(bias + col, valid, vec, b);
    float out[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      float v = (hv[k][i] - mean) * rstd;
      if (weight != nullptr) v *= w[i];
      if (bias != nullptr) v += b[i];
      out[i] = v;
    }
    store_chunk(y + row * n + col, valid, vec, out);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// ---------------------------------------------------------------- backward

// Grid-strides over groups of blockDim.y rows. Each row slot (threadIdx.y) accumulates its rows'
// dy * xhat and dy per column in shared memory (`slot_sums`, (blockDim.y, 2, n) fp32; only the
// thread owning a column touches it in the loop), then the block adds its slots in a fixed order
// and writes one partial row per block: partial_dweight / partial_dbias (gridDim.x, n) fp32.
template <typename T, int K>
__global__ void __launch_bounds__(kMaxThreadsPerRow) add_layer_norm_backward_kernel(
    const T* __restrict__ dy, int64_t dy_row_stride,             // (rows, n)
    const void* __restrict__ dh, int64_t dh_row_stride,          // (rows, n) h_dtype, or nullptr
    const void* __restrict__ h, DType h_dtype, int64_t h_row_stride,  // (rows, n)
    const float* __restrict__ weight,  // (n,) or nullptr
    const float* __restrict__ mean,    // (rows,)
    const float* __restrict__ rstd,    // (rows,)
    void* __restrict__ dx,             // (rows, n) h_dtype, contiguous
    float* __restrict__ partial_dweight,  // (gridDim.x, n)
    float* __restrict__ partial_dbias,    // (gridDim.x, n)
    int64_t rows, int64_t n, bool is_rms_norm, bool vec, bool want_sums) {
  __shared__ float scratch[32];
  extern __shared__ float slot_sums[];  // (blockDim.y, 2, n) when want_sums
  float* dweight_sum = slot_sums + int64_t(threadIdx.y) * 2 * n;
  float* dbias_sum = dweight_sum + n;
  if (want_sums) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t col = chunk_column(k);
      for (int i = 0; i < chunk_valid(col, n); ++i) dweight_sum[col + i] = dbias_sum[col + i] = 0.0f;
    }
  }

  for (int64_t group = blockIdx.x; group * blockDim.y < rows; group += gridDim.x) {
    const int64_t row = group * blockDim.y + threadIdx.y;
    if (row >= rows) continue;  // whole warp (warp mode); never in block mode (blockDim.y == 1)
    const float row_mean = is_rms_norm ? 0.0f : mean[row];
    const float row_rstd = rstd[row];

    // pass 1: xhat in registers; row sums of g = dy * weight and of g * xhat
    float xhat[K][kChunk];
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t col = chunk_column(k);
      const int valid = chunk_valid(col, n);
      float g[kChunk], w[kChunk];
      if (valid > 0) {
        load_chunk_any(h, h_dtype, row * h_row_stride + col, valid, vec, xhat[k]);
        load_chunk(dy + row * dy_row_stride + col, valid, vec, g);
        if (weight != nullptr) load_chunk(weight + col, valid, vec, w);
      }
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const bool inside = i < valid;  // g, w and xhat are unset (or zero) outside the row
        xhat[k][i] = inside ? (xhat[k][i] - row_mean) * row_rstd : 0.0f;
        const float gi = !inside ? 0.0f : (weight != nullptr ? g[i] * w[i] : g[i]);
        sum_g += gi;
        sum_g_xhat += gi * xhat[k][i];
      }
    }
    const float mean_g = is_rms_norm ? 0.0f : row_sum(sum_g, scratch) / float(n);
    const float mean_g_xhat = row_sum(sum_g_xhat, scratch) / float(n);

    // pass 2: dx, and this row's share of dweight / dbias. dy is read again (a cache hit: the
    // row was just read) rather than kept, which keeps K = 4 within 128 registers.
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t col = chunk_column(k);
      const int valid = chunk_valid(col, n);
      if (valid == 0) continue;
      float dyv[kChunk], w[kChunk], dhv[kChunk];
      load_chunk(dy + row * dy_row_stride + col, valid, vec, dyv);
      if (weight != nullptr) load_chunk(weight + col, valid, vec, w);
      if (dh != nullptr) load_chunk_any(dh, h_dtype, row * dh_row_stride + col, valid, vec, dhv);
      float out[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const float g = weight != nullptr ? dyv[i] * w[i] : dyv[i];
        out[i] = (g - mean_g - xhat[k][i] * mean_g_xhat) * row_rstd + (dh != nullptr ? dhv[i] : 0.0f);
      }
      store_chunk_any(dx, h_dtype, row * n + col, valid, vec, out);
      if (want_sums) {
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {  // constant indices keep dyv / xhat in registers
          if (i < valid) {
            dweight_sum[col + i] += dyv[i] * xhat[k][i];
            dbias_sum[col + i] += dyv[i];
          }
        }
      }
    }
  }

  if (!want_sums) return;
  __syncthreads();  // every slot's sums are complete
  const int threads = blockDim.x * blockDim.y;
  for (int64_t col = threadIdx.y * blockDim.x + threadIdx.x; col < n; col += threads) {
    float dw = 0.0f, db = 0.0f;
    for (int slot = 0; slot < blockDim.y; ++slot) {
      dw += slot_sums[int64_t(slot) * 2 * n + col];
      db += slot_sums[int64_t(slot) * 2 * n + n + col];
    }
    partial_dweight[int64_t(blockIdx.x) * n + col] = dw;
    partial_dbias[int64_t(blockIdx.x) * n + col] = db;
  }
}

// out[col] = sum over blocks of partial[block, col], in block order (deterministic).
__global__ void sum_partials_kernel(const float* __restrict__ partial,  // (blocks, n)
                                    float* __restrict__ out,            // (n,)
                                    int64_t blocks, int64_t n) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n) return;
  float total = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) total += partial[b * n + col];
  out[col] = total;
}

// ---------------------------------------------------------------- launch configuration

struct RowConfig {
  int threads_per_row;  // blockDim.x
  int rows_per_block;   // blockDim.y
  int chunks;           // K: chunks of 8 per thread
};

RowConfig row_config(int64_t n) {
  if (n <= 32 * kChunk * 1) return {32, kWarpRowsPerBlock, 1};
  if (n <= 32 * kChunk * 2) return {32, kWarpRowsPerBlock, 2};
  if (n <= 32 * kChunk * 4) return {32, kWarpRowsPerBlock, 4};
  const int64_t threads = (n + 4 * kChunk - 1) / (4 * kChunk);
  return {int((threads + 31) / 32 * 32), 1, 4};
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte accesses are legal when every row starts on a 16-byte boundary.
bool can_vectorize(int64_t n, std::initializer_list<const void*> pointers, std::initializer_list<int64_t> row_strides) {
  if (n % kChunk != 0) return false;
  for (const void* p : pointers)
    if (!aligned16(p)) return false;
  for (int64_t s : row_strides)
    if (s % kChunk != 0) return false;
  return true;
}

// Every argument of one forward launch; run<T, K>() launches the matching instantiation.
struct ForwardLaunch {
  const void* x;
  int64_t x_row_stride;
  const void* residual;
  DType residual_dtype;
  int64_t residual_row_stride;
  const float *weight, *bias;
  void* y;
  void* h;
  DType h_dtype;
  float *mean, *rstd;
  int64_t rows, n;
  float eps;
  bool is_rms_norm, vec;
  RowConfig config;
  cudaStream_t stream;

  template <typename T, int K>
  cudaError_t run() const {
    const dim3 block(config.threads_per_row, config.rows_per_block);
    const int64_t blocks = (rows + config.rows_per_block - 1) / config.rows_per_block;
    add_layer_norm_forward_kernel<T, K><<<unsigned(blocks), block, 0, stream>>>(
        static_cast<const T*>(x), x_row_stride, residual, residual_dtype, residual_row_stride, weight, bias,
        static_cast<T*>(y), h, h_dtype, mean, rstd, rows, n, eps, is_rms_norm, vec);
    return cudaGetLastError();
  }
};

// Every argument of one backward launch (the per-block partial sums; not their reduction).
struct BackwardLaunch {
  const void* dy;
  int64_t dy_row_stride;
  const void* dh;
  int64_t dh_row_stride;
  const void* h;
  DType h_dtype;
  int64_t h_row_stride;
  const float *weight, *mean, *rstd;
  void* dx;
  float *partial_dweight, *partial_dbias;
  int64_t rows, n;
  bool is_rms_norm, vec, want_sums;
  RowConfig config;
  int64_t blocks;
  cudaStream_t stream;

  template <typename T, int K>
  cudaError_t run() const {
    const dim3 block(config.threads_per_row, config.rows_per_block);
    const size_t smem = want_sums ? size_t(config.rows_per_block) * 2 * n * sizeof(float) : 0;
    auto kernel = add_layer_norm_backward_kernel<T, K>;
    if (smem > 48 * 1024) {  // above the default limit a kernel must opt in
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (err != cudaSuccess) return err;
    }
    kernel<<<unsigned(blocks), block, smem, stream>>>(static_cast<const T*>(dy), dy_row_stride, dh, dh_row_stride,
                                                      h, h_dtype, h_row_stride, weight, mean, rstd, dx,
                                                      partial_dweight, partial_dbias, rows, n, is_rms_norm, vec,
                                                      want_sums);
    return cudaGetLastError();
  }
};

// launch.run<T, K>() for the run-time dtype and chunk count.
template <typename Launch>
cudaError_t dispatch(DType dtype, int chunks, const Launch& launch) {
  auto by_chunks = [&](auto type_tag) -> cudaError_t {
    using T = decltype(type_tag);
    switch (chunks) {
      case 1: return launch.template run<T, 1>();
      case 2: return launch.template run<T, 2>();
      default: return launch.template run<T, 4>();
    }
  };
  switch (dtype) {
    case DType::kFloat32: return by_chunks(float{});
    case DType::kFloat16: return by_chunks(__half{});
    default: return by_chunks(__nv_bfloat16{});
  }
}

}  // namespace

// ---------------------------------------------------------------- launchers

cudaError_t add_layer_norm_forward(const void* x, DType x_dtype, int64_t x_row_stride, const void* residual,
                                   DType residual_dtype, int64_t residual_row_stride, const float* weight,
                                   const float* bias, void* y, void* h, DType h_dtype, float* mean, float* rstd,
                                   int64_t rows, int64_t n, float eps, bool is_rms_norm, cudaStream_t stream) {
  if (n < 1 || n > kAddLayerNormMaxHidden || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if ((residual_dtype != x_dtype && residual_dtype != DType::kFloat32) ||
      (h_dtype != x_dtype && h_dtype != DType::kFloat32))
    return cudaErrorInvalidValue;
  const RowConfig config = row_config(n);
  const bool vec = can_vectorize(n, {x, residual, weight, bias, y, h}, {x_row_stride, residual_row_stride});
  const ForwardLaunch launch{x, x_row_stride, residual, residual_dtype, residual_row_stride, weight, bias, y, h,
                             h_dtype, mean, rstd, rows, n, eps, is_rms_norm, vec, config, stream};
  return dispatch(x_dtype, config.chunks, launch);
}

int64_t add_layer_norm_backward_blocks(int64_t rows, int64_t n) {
  const RowConfig config = row_config(n);
  const int64_t groups = (rows + config.rows_per_block - 1) / config.rows_per_block;
  // about 1024 threads per multiprocessor: enough loads in flight, and few partial rows to add up
  const int threads = config.threads_per_row * config.rows_per_block;
  const int64_t resident = int64_t(multiprocessor_count()) * (threads < 1024 ? 1024 / threads : 1);
  return groups < resident ? (groups > 0 ? groups : 1) : resident;
}

cudaError_t add_layer_norm_backward(const void* dy, DType dy_dtype, int64_t dy_row_stride, const void* dh,
                                    int64_t dh_row_stride, const void* h, DType h_dtype, int64_t h_row_stride,
                                    const float* weight, const float* mean, const float* rstd, void* dx,
                                    float* dweight, float* dbias, float* workspace, int64_t rows, int64_t n,
                                    bool is_rms_norm, cudaStream_t stream) {
  if (n < 1 || n > kAddLayerNormMaxHidden || rows < 0) return cudaErrorInvalidValue;
  if (h_dtype != dy_dtype && h_dtype != DType::kFloat32) return cudaErrorInvalidValue;
  const bool want_sums = dweight != nullptr || dbias != nullptr;
  if (want_sums && workspace == nullptr) return cudaErrorInvalidValue;
  const RowConfig config = row_config(n);
  const int64_t blocks = add_layer_norm_backward_blocks(rows, n);
  float* partial_dweight = workspace;
  float* partial_dbias = want_sums ? workspace + blocks * n : nullptr;
  if (rows > 0) {
    const bool vec = can_vectorize(n, {dy, dh, h, weight, dx}, {dy_row_stride, dh_row_stride, h_row_stride});
    const BackwardLaunch launch{dy, dy_row_stride, dh, dh_row_stride, h, h_dtype, h_row_stride, weight, mean, rstd,
                                dx, partial_dweight, partial_dbias, rows, n, is_rms_norm, vec, want_sums, config,
                                blocks, stream};
    cudaError_t err = dispatch(dy_dtype, config.chunks, launch);
    if (err != cudaSuccess) return err;
  } else if (want_sums) {  // no rows: the sums are zero
    cudaError_t err = cudaMemsetAsync(workspace, 0, sizeof(float) * 2 * blocks * n, stream);
    if (err != cudaSuccess) return err;
  }
  const int threads = 256;
  const unsigned column_blocks = unsigned((n + threads - 1) / threads);
  if (dweight != nullptr) sum_partials_kernel<<<column_blocks, threads, 0, stream>>>(partial_dweight, dweight, blocks, n);
  if (dbias != nullptr) sum_partials_kernel<<<column_blocks, threads, 0, stream>>>(partial_dbias, dbias, blocks, n);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastgpt
