// Runs CUDA kernels on the CPU, for tests on machines without a GPU. A .cu file, its launches
// rewritten from kernel<<<grid, block, smem, stream>>>(args) to
// cuda_on_cpu::launch({grid, block, smem, stream}, kernel, args) (tests/test_cuda_sources.py does
// it), is compiled with g++ after this header and its launchers are called with host memory.
// Blocks run one after another; the threads of a block are fibers (ucontext) on one OS thread,
// switched only at __syncthreads and warp shuffles, in an order drawn at random at every switch
// (cuda_on_cpu::schedule_random): a result that depends on the order of threads between barriers
// (a missing barrier, a race in shared memory) shows up as different bits from seed to seed.
// Exited threads leave the barriers, as on the GPU. What it cannot show: speed, register or
// shared-memory limits, memory-model subtleties beyond barriers, device math rounding (exp2f,
// rsqrtf and the fp16 conversions are the host's).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

namespace cuda_on_cpu {

struct Barrier {
  int expected = 0, arrived = 0;
  unsigned generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  uint3 thread_idx;
  int warp = 0, lane = 0;
  bool done = false;
  Barrier* waiting = nullptr;
  unsigned wait_generation = 0;
};

struct Block {
  dim3 block_dim, grid_dim;
  uint3 block_idx;
  std::vector<Fiber> fibers;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> shuffle_slots;  // 32 per warp
  std::function<void()> body;
  ucontext_t scheduler;
};

inline Block* current_block = nullptr;
inline Fiber* current_fiber = nullptr;
inline std::mt19937 schedule_random(1);
inline int multiprocessors = 2;  // what cudaDeviceGetAttribute reports

inline void release_if_complete(Barrier& b) {
  if (b.arrived > 0 && b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
  }
}

inline void wait(Barrier& b) {
  Fiber* self = current_fiber;
  const unsigned generation = b.generation;
  ++b.arrived;
  release_if_complete(b);
  if (b.generation != generation) return;  // the last one to arrive goes on
  self->waiting = &b;
  self->wait_generation = generation;
  swapcontext(&self->context, &current_block->scheduler);
}

inline void fiber_entry() {
  current_block->body();
  Fiber* self = current_fiber;
  self->done = true;
  --current_block->block_barrier.expected;
  release_if_complete(current_block->block_barrier);
  Barrier& warp = current_block->warp_barriers[self->warp];
  --warp.expected;
  release_if_complete(warp);
  swapcontext(&self->context, &current_block->scheduler);  // never resumed
}

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
};

template <typename Kernel, typename... Args>
void launch(const LaunchConfig& config, Kernel kernel, Args... args) {
  const int threads = int(config.block.x * config.block.y * config.block.z);
  if (threads % 32 != 0 || threads > 1024) {
    std::fprintf(stderr, "cuda_on_cpu: block of %d threads is not whole warps\n", threads);
    std::abort();
  }
  Block block;
  block.block_dim = config.block;
  block.grid_dim = config.grid;
  block.body = [&] { kernel(args...); };
  block.fibers.resize(threads);
  for (Fiber& f : block.fibers) f.stack.resize(64 * 1024);
  block.warp_barriers.resize(threads / 32);
  block.shuffle_slots.resize(threads);
  current_block = &block;
  for (unsigned bz = 0; bz < config.grid.z; ++bz)
    for (unsigned by = 0; by < config.grid.y; ++by)
      for (unsigned bx = 0; bx < config.grid.x; ++bx) {
        block.block_idx = make_uint3(bx, by, bz);
        block.block_barrier = Barrier{threads, 0, 0};
        for (Barrier& w : block.warp_barriers) w = Barrier{32, 0, 0};
        for (int t = 0; t < threads; ++t) {
          Fiber& f = block.fibers[t];
          f.thread_idx = make_uint3(t % config.block.x, (t / config.block.x) % config.block.y,
                                    t / (config.block.x * config.block.y));
          f.warp = t / 32;
          f.lane = t % 32;
          f.done = false;
          f.waiting = nullptr;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.data();
          f.context.uc_stack.ss_size = f.stack.size();
          f.context.uc_link = nullptr;
          makecontext(&f.context, fiber_entry, 0);
        }
        std::vector<int> order(threads);
        for (int t = 0; t < threads; ++t) order[t] = t;
        for (;;) {
          bool any_ran = false, all_done = true;
          std::shuffle(order.begin(), order.end(), schedule_random);
          for (int t : order) {
            Fiber& f = block.fibers[t];
            if (f.done) continue;
            all_done = false;
            if (f.waiting != nullptr && f.waiting->generation == f.wait_generation) continue;
            f.waiting = nullptr;
            current_fiber = &f;
            swapcontext(&block.scheduler, &f.context);
            any_ran = true;
          }
          if (all_done) break;
          if (!any_ran) {
            std::fprintf(stderr, "cuda_on_cpu: deadlock in block (%u, %u, %u): threads wait at different barriers\n",
                         bx, by, bz);
            std::abort();
          }
        }
      }
  current_block = nullptr;
  current_fiber = nullptr;
}

}  // namespace cuda_on_cpu

// ---------------------------------------------------------------- the device side

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static  // one block at a time: a static of the kernel is its block's
#define threadIdx (::cuda_on_cpu::current_fiber->thread_idx)
#define blockIdx (::cuda_on_cpu::current_block->block_idx)
#define blockDim (::cuda_on_cpu::current_block->block_dim)
#define gridDim (::cuda_on_cpu::current_block->grid_dim)

inline void __syncthreads() { cuda_on_cpu::wait(cuda_on_cpu::current_block->block_barrier); }

template <typename V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask, int width = 32) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "a shuffle moves at most 8 bytes");
  using namespace cuda_on_cpu;
  if (mask != 0xffffffffu || width != 32) {
    std::fprintf(stderr, "cuda_on_cpu: only full-warp shuffles are emulated\n");
    std::abort();
  }
  uint64_t* slots = current_block->shuffle_slots.data() + current_fiber->warp * 32;
  Barrier& warp = current_block->warp_barriers[current_fiber->warp];
  std::memcpy(&slots[current_fiber->lane], &value, sizeof(V));
  wait(warp);
  V result;
  std::memcpy(&result, &slots[current_fiber->lane ^ lane_mask], sizeof(V));
  wait(warp);
  return result;
}

inline float rsqrtf_on_cpu(float x) { return 1.0f / std::sqrt(x); }
#define rsqrtf rsqrtf_on_cpu
using std::max;
using std::min;

// ---------------------------------------------------------------- the runtime

// defined once, in the translation unit that defines CUDA_ON_CPU_RUNTIME
#ifdef CUDA_ON_CPU_RUNTIME
extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? cuda_on_cpu::multiprocessors : 0;
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
}
#endif
