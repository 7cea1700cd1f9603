// How the add+LayerNorm kernels split rows over threads and programs, and the order in which the
// backward adds the dweight / dbias partial sums. Plain C++ (CUDA qualifiers only under nvcc), so
// the kernels and a host test compiled with g++ (tests/test_cuda_sources.py) share one definition.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTGPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTGPT_HOST_DEVICE inline
#endif

namespace fastgpt {
namespace cuda {

constexpr int kChunk = 8;              // elements per chunk: one 16-byte load for fp16/bf16
constexpr int kWarpRowsPerBlock = 4;   // forward: rows per block in warp-per-row mode
constexpr int kMaxThreadsPerRow = 512; // block-per-row mode: n <= 512 threads * 4 chunks * 8
constexpr int kBackwardThreads = 512;  // threads per backward program (rows side by side)
constexpr int kBackwardProgramsPerSM = 2;

// How one row is spread over threads: thread t of a row owns chunks t, t + T, ..., t + (K-1) T
// (T = threads_per_row), the same columns in every row.
struct RowConfig {
  int threads_per_row;  // blockDim.x
  int rows_per_block;   // blockDim.y in the forward
  int chunks;           // K: chunks of 8 per thread
};

inline RowConfig row_config(int64_t n) {
  if (n <= 32 * kChunk * 1) return {32, kWarpRowsPerBlock, 1};
  if (n <= 32 * kChunk * 2) return {32, kWarpRowsPerBlock, 2};
  if (n <= 32 * kChunk * 4) return {32, kWarpRowsPerBlock, 4};
  const int64_t threads = (n + 4 * kChunk - 1) / (4 * kChunk);
  return {int((threads + 31) / 32 * 32), 1, 4};
}

// Backward: blockDim = (T, R), R = kBackwardThreads / T rows side by side (R slots).
inline int backward_rows_per_program(int64_t n) { return kBackwardThreads / row_config(n).threads_per_row; }

// Backward grid: one program per group of R rows, at most kBackwardProgramsPerSM per multiprocessor
// (each writes one partial row of dweight / dbias, so this also bounds the rows the second kernel
// adds). At least 1, so that zero rows still write zero partial sums.
inline int64_t add_layer_norm_backward_programs(int64_t rows, int64_t n, int multiprocessors) {
  const int64_t rows_per_program = backward_rows_per_program(n);
  const int64_t groups = (rows + rows_per_program - 1) / rows_per_program;
  const int64_t cap = int64_t(multiprocessors > 0 ? multiprocessors : 1) * kBackwardProgramsPerSM;
  return groups < 1 ? 1 : (groups < cap ? groups : cap);
}

// ---------------------------------------------------------------- adding the partial rows
// The second backward kernel adds P partial rows per column: kSumLanes lanes each add every
// kSumLanes-th row in row order (lane_sum), then a binary tree adds the lane sums (tree_step with
// width kSumLanes / 2, ..., 2, 1; after each width, lanes < width hold the pair sums). The order
// depends only on P, so the result has the same bits for the same partial rows.

constexpr int kSumLanes = 16;    // partial rows added side by side
constexpr int kSumColumns = 32;  // columns per program of the second kernel (128 bytes per row)

// Sum of partial[lane * n + col], partial[(lane + kSumLanes) * n + col], ... (rows < programs).
FASTGPT_HOST_DEVICE float lane_sum(const float* partial, int64_t programs, int64_t n, int64_t col, int lane) {
  float sum = 0.0f;
  for (int64_t row = lane; row < programs; row += kSumLanes) sum += partial[row * n + col];
  return sum;
}

// One level of the tree: lane < width adds the sum of lane + width (lane sums `stride` floats
// apart). Each level reads only lanes that no lane of that level writes.
FASTGPT_HOST_DEVICE void tree_step(float* lane_sums, int stride, int lane, int width) {
  if (lane < width) lane_sums[lane * stride] += lane_sums[(lane + width) * stride];
}

}  // namespace cuda
}  // namespace fastgpt
