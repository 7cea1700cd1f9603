// Fused add + LayerNorm / RMSNorm, forward and backward, for fp32 / fp16 / bf16 rows.
//
// Work split: a row of n elements is cut into chunks of kChunk = 8 consecutive elements (one
// 16-byte load for fp16/bf16, two for fp32). Thread t of a row owns chunks t, t + T, t + 2T, ...
// (T = threads per row), up to K chunks (row_config in add_layer_norm_schedule.h):
//   narrow rows (n <= 1024): one warp per row, K = 1, 2, 4;
//   wide rows (n <= 16384):  T = n / 32 rounded up to whole warps (<= 512), K = 4.
// Forward: blockDim = (32, 4) for narrow rows, (T, 1) for wide ones, one row per (block, y); a
// thread keeps its values in registers between the passes of the row (sum, centered sum of
// squares, output), so every input is read once.
// Backward: a bounded grid (<= 2 programs per multiprocessor) of (T, 512 / T) threads striding
// over rows, then a second kernel adding the programs' partial dweight / dbias rows in a fixed
// order: see add_layer_norm_backward_kernel.
// Statistics are fp32. 16-byte vector loads/stores are used when every pointer is 16-byte
// aligned, n % 8 == 0 and every row stride is a multiple of 8 elements; scalar loads otherwise.
// x / y / dy have the template element type T; residual, h, dh and dx are fp32 or T, chosen at
// run time (a warp-uniform branch), which keeps the number of instantiations small.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <initializer_list>

#include "add_layer_norm_schedule.h"
#include "launchers.h"

namespace fastgpt {
namespace cuda {
namespace {

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

// Rounds values to what a tensor of `dtype` stores (h: the statistics are those of h as stored).
__device__ __forceinline__ void round_chunk_to(DType dtype, float (&values)[kChunk]) {
  if (dtype == DType::kFloat32) return;
#pragma unroll
  for (int i = 0; i < kChunk; ++i)
    values[i] = dtype == DType::kFloat16 ? __half2float(__float2half_rn(values[i]))
                                         : __bfloat162float(__float2bfloat16_rn(values[i]));
}

// ---------------------------------------------------------------- reductions

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the threads of one row (threadIdx.y), returned to every thread of the row. Warp
// mode (blockDim.x == 32): shuffles only. Rows of several warps: the warps' sums go through
// `scratch` (32 floats of shared memory, blockDim.x * blockDim.y <= 1024) and every thread adds
// its row's in warp order; every thread of the block must call it (barriers).
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int warps_per_row = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* row_scratch = scratch + threadIdx.y * warps_per_row;
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) row_scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps_per_row; ++w) total += row_scratch[w];
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

  // pass 1: h = x + residual (fp32 sum, rounded to h's dtype as stored), row sum
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
      for (int i = 0; i < kChunk; ++i) hv[k][i] += r[i];  // both zero past the row end
      round_chunk_to(h_dtype, hv[k]);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) sum += hv[k][i];
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
//
// Grid: P = add_layer_norm_backward_programs(rows, n, multiprocessors) = min(ceil(rows / R),
// 2 x multiprocessors) programs of blockDim = (T, R): T threads per row as in the forward
// (row_config), R = 512 / T rows side by side ("slots"). Program p takes the row groups p, p + P,
// p + 2P, ... (group g is rows gR .. gR + R - 1; slot s gets row gR + s), computes dx row by row,
// and each thread adds its columns' dy * xhat and dy over its rows in registers, in row order (a
// thread owns the same columns in every row). At the end the program adds its R slots per column
// in slot order (through shared memory) and writes one partial row: partials (2, P, n) fp32,
// dweight's rows then dbias's. add_layer_norm_sum_partials_kernel then adds the P rows of each
// column in the fixed order of add_layer_norm_schedule.h (lanes of every 16th row, then a binary
// tree) and writes dweight / dbias in the parameters' dtype. No atomics: the same inputs and P
// give the same bits.
template <typename T, int K>
__global__ void __launch_bounds__(kBackwardThreads) add_layer_norm_backward_kernel(
    const T* __restrict__ dy, int64_t dy_row_stride,             // (rows, n)
    const void* __restrict__ dh, int64_t dh_row_stride,          // (rows, n) h_dtype, or nullptr
    const void* __restrict__ h, DType h_dtype, int64_t h_row_stride,  // (rows, n)
    const float* __restrict__ weight,  // (n,) or nullptr
    const float* __restrict__ mean,    // (rows,)
    const float* __restrict__ rstd,    // (rows,)
    void* __restrict__ dx,             // (rows, n) h_dtype, contiguous
    float* __restrict__ partials,      // (2, gridDim.x, n), or nullptr when no sums are wanted
    int64_t rows, int64_t n, bool is_rms_norm, bool vec) {
  __shared__ float scratch[32];
  float dweight_sum[K][kChunk], dbias_sum[K][kChunk];  // this thread's columns, over its rows
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int i = 0; i < kChunk; ++i) dweight_sum[k][i] = dbias_sum[k][i] = 0.0f;

  // The loop bounds depend on blockIdx only: every thread runs every iteration (row_sum's barriers).
  for (int64_t group = blockIdx.x; group * blockDim.y < rows; group += gridDim.x) {
    const int64_t row = group * blockDim.y + threadIdx.y;
    const int64_t row_n = row < rows ? n : 0;  // a slot past the last row touches no column
    const float row_mean = is_rms_norm || row_n == 0 ? 0.0f : mean[row];
    const float row_rstd = row_n == 0 ? 0.0f : rstd[row];

    // pass 1: row sums of g = dy * weight and of g * xhat, xhat = (h - mean) * rstd. Two chunks'
    // loads at a time: all K = 4 at once would not fit in 128 registers beside the column sums.
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
#pragma unroll 2
    for (int k = 0; k < K; ++k) {
      const int64_t col = chunk_column(k);
      const int valid = chunk_valid(col, row_n);
      if (valid == 0) continue;
      float hv[kChunk], g[kChunk], w[kChunk];
      load_chunk_any(h, h_dtype, row * h_row_stride + col, valid, vec, hv);
      load_chunk(dy + row * dy_row_stride + col, valid, vec, g);
      if (weight != nullptr) load_chunk(weight + col, valid, vec, w);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {  // zero past the row end
        const float gi = weight != nullptr ? g[i] * w[i] : g[i];
        sum_g += gi;
        sum_g_xhat += i < valid ? gi * ((hv[i] - row_mean) * row_rstd) : 0.0f;
      }
    }
    const float mean_g = is_rms_norm ? 0.0f : row_sum(sum_g, scratch) / float(n);
    const float mean_g_xhat = row_sum(sum_g_xhat, scratch) / float(n);

    // pass 2: dx, and this row's dy * xhat and dy. h and dy are read again (cache hits: the row
    // was just read) rather than kept, which leaves the registers to the column sums.
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t col = chunk_column(k);
      const int valid = chunk_valid(col, row_n);
      if (valid == 0) continue;
      float hv[kChunk], dyv[kChunk], w[kChunk], dhv[kChunk];
      load_chunk_any(h, h_dtype, row * h_row_stride + col, valid, vec, hv);
      load_chunk(dy + row * dy_row_stride + col, valid, vec, dyv);
      if (weight != nullptr) load_chunk(weight + col, valid, vec, w);
      if (dh != nullptr) load_chunk_any(dh, h_dtype, row * dh_row_stride + col, valid, vec, dhv);
      float out[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const float xhat = i < valid ? (hv[i] - row_mean) * row_rstd : 0.0f;
        const float g = weight != nullptr ? dyv[i] * w[i] : dyv[i];
        out[i] = (g - mean_g - xhat * mean_g_xhat) * row_rstd + (dh != nullptr ? dhv[i] : 0.0f);
        dweight_sum[k][i] += dyv[i] * xhat;
        dbias_sum[k][i] += dyv[i];  // zero past the row end
      }
      store_chunk_any(dx, h_dtype, row * n + col, valid, vec, out);
    }
  }
  if (partials == nullptr) return;

  // Add the R slots per column in slot order, one chunk index k at a time: slot s's sums for the
  // columns kT*8 .. (k+1)T*8 - 1 go to stage[q][s][.], then each thread adds whole columns.
  __shared__ __align__(16) float stage[2][kBackwardThreads * kChunk];
  const int slot_columns = blockDim.x * kChunk;
  const int threads = blockDim.x * blockDim.y;
  float* partial_dweight = partials + int64_t(blockIdx.x) * n;
  float* partial_dbias = partials + (int64_t(gridDim.x) + blockIdx.x) * n;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    __syncthreads();  // the previous round's readers are done with stage
    float4* dweight_stage = reinterpret_cast<float4*>(stage[0] + threadIdx.y * slot_columns + threadIdx.x * kChunk);
    float4* dbias_stage = reinterpret_cast<float4*>(stage[1] + threadIdx.y * slot_columns + threadIdx.x * kChunk);
#pragma unroll
    for (int v = 0; v < kChunk / 4; ++v) {
      dweight_stage[v] = make_float4(dweight_sum[k][4 * v], dweight_sum[k][4 * v + 1], dweight_sum[k][4 * v + 2],
                                     dweight_sum[k][4 * v + 3]);
      dbias_stage[v] = make_float4(dbias_sum[k][4 * v], dbias_sum[k][4 * v + 1], dbias_sum[k][4 * v + 2],
                                   dbias_sum[k][4 * v + 3]);
    }
    __syncthreads();
    for (int c = threadIdx.y * blockDim.x + threadIdx.x; c < slot_columns; c += threads) {
      const int64_t col = int64_t(k) * slot_columns + c;
      if (col >= n) break;
      float dw = 0.0f, db = 0.0f;
      for (int slot = 0; slot < blockDim.y; ++slot) {
        dw += stage[0][slot * slot_columns + c];
        db += stage[1][slot * slot_columns + c];
      }
      partial_dweight[col] = dw;
      partial_dbias[col] = db;
    }
  }
}

// Writes v as element i of a tensor whose dtype is known only at run time.
__device__ __forceinline__ void store_any(void* base, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(base)[i] = v; break;
    case DType::kFloat16: static_cast<__half*>(base)[i] = __float2half_rn(v); break;
    default: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v); break;
  }
}

// Grid (ceil(n / 32), 2), blockDim = (32, 16): program (x, q) adds the P partial rows of columns
// 32x .. 32x + 31 of dweight (q = 0) or dbias (q = 1) in the order of add_layer_norm_schedule.h:
// lane y (threadIdx.y) adds rows y, y + 16, ... in row order, then a binary tree over the 16 lane
// sums (8, 4, 2, 1 pairs). fp32 sums, stored in the output's dtype.
__global__ void __launch_bounds__(kSumColumns * kSumLanes) add_layer_norm_sum_partials_kernel(
    const float* __restrict__ partials,  // (2, programs, n)
    int64_t programs, int64_t n,
    void* __restrict__ dweight, DType dweight_dtype,  // (n,), or nullptr
    void* __restrict__ dbias, DType dbias_dtype) {    // (n,), or nullptr
  __shared__ float lane_sums[kSumLanes][kSumColumns];
  void* out = blockIdx.y == 0 ? dweight : dbias;
  if (out == nullptr) return;  // the whole block
  const int64_t col = int64_t(blockIdx.x) * kSumColumns + threadIdx.x;
  const float* partial = partials + int64_t(blockIdx.y) * programs * n;
  lane_sums[threadIdx.y][threadIdx.x] = col < n ? lane_sum(partial, programs, n, col, threadIdx.y) : 0.0f;
  for (int width = kSumLanes / 2; width > 0; width /= 2) {
    __syncthreads();
    tree_step(&lane_sums[0][threadIdx.x], kSumColumns, threadIdx.y, width);
  }
  // lane 0 wrote lane_sums[0] last itself
  if (threadIdx.y == 0 && col < n) store_any(out, blockIdx.y == 0 ? dweight_dtype : dbias_dtype, col, lane_sums[0][threadIdx.x]);
}

// ---------------------------------------------------------------- launch configuration

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

// Every argument of one backward launch (the per-program partial sums; not their reduction).
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
  float* partials;
  int64_t rows, n;
  bool is_rms_norm, vec;
  RowConfig config;
  int64_t programs;
  cudaStream_t stream;

  template <typename T, int K>
  cudaError_t run() const {
    const dim3 block(config.threads_per_row, backward_rows_per_program(n));
    add_layer_norm_backward_kernel<T, K><<<unsigned(programs), block, 0, stream>>>(
        static_cast<const T*>(dy), dy_row_stride, dh, dh_row_stride, h, h_dtype, h_row_stride, weight, mean, rstd,
        dx, partials, rows, n, is_rms_norm, vec);
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

cudaError_t add_layer_norm_backward(const void* dy, DType dy_dtype, int64_t dy_row_stride, const void* dh,
                                    int64_t dh_row_stride, const void* h, DType h_dtype, int64_t h_row_stride,
                                    const float* weight, const float* mean, const float* rstd, void* dx,
                                    void* dweight, DType dweight_dtype, void* dbias, DType dbias_dtype,
                                    float* workspace, int64_t programs, int64_t rows, int64_t n, bool is_rms_norm,
                                    cudaStream_t stream) {
  if (n < 1 || n > kAddLayerNormMaxHidden || rows < 0 || programs < 1 || programs > INT32_MAX)
    return cudaErrorInvalidValue;
  if (h_dtype != dy_dtype && h_dtype != DType::kFloat32) return cudaErrorInvalidValue;
  const bool want_sums = dweight != nullptr || dbias != nullptr;
  if (want_sums && workspace == nullptr) return cudaErrorInvalidValue;
  const RowConfig config = row_config(n);
  float* partials = want_sums ? workspace : nullptr;
  if (rows > 0) {
    const bool vec = can_vectorize(n, {dy, dh, h, weight, dx}, {dy_row_stride, dh_row_stride, h_row_stride});
    const BackwardLaunch launch{dy, dy_row_stride, dh, dh_row_stride, h, h_dtype, h_row_stride, weight, mean, rstd,
                                dx, partials, rows, n, is_rms_norm, vec, config, programs, stream};
    cudaError_t err = dispatch(dy_dtype, config.chunks, launch);
    if (err != cudaSuccess) return err;
  } else if (want_sums) {  // no rows: the sums are zero
    cudaError_t err = cudaMemsetAsync(workspace, 0, sizeof(float) * 2 * programs * n, stream);
    if (err != cudaSuccess) return err;
  }
  if (!want_sums) return cudaSuccess;
  const dim3 grid(unsigned((n + kSumColumns - 1) / kSumColumns), 2);
  add_layer_norm_sum_partials_kernel<<<grid, dim3(kSumColumns, kSumLanes), 0, stream>>>(
      partials, programs, n, dweight, dweight_dtype, dbias, dbias_dtype);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastgpt
