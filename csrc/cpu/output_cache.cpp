// A small cache of CPU buffers for the outputs of fastgpt's native ops.
//
// Why: glibc serves each allocation of 32 MiB or more with a fresh mmap and unmaps it on free, and
// it returns the top of its heap to the OS whenever more than its trim threshold lies free there,
// which a loop that allocates and frees outputs of a few MiB crosses every iteration. Either way
// the next output is new memory, and the first write to each 4 KiB page faults and has the kernel
// zero it. For a memory-bound op that costs more than the op itself (measured here: two fresh
// 32 MiB outputs take 15-19 ms of faults, against 2 ms to fill the same buffers again; a 256x1024
// fp32 add+LayerNorm took 480 faults and 880 us per call, against 0 faults and 160 us with this
// cache). So, as PyTorch's CUDA caching allocator does for GPU memory, outputs of at least
// kMinCachedBytes come from this cache: a freed one is kept for the next output of the same size
// class while the cache holds at most its limit (FASTGPT_CPU_CACHE_MB, default 256; 0 turns
// caching off). Buffers of 2 MiB or more are 2 MiB aligned and advised as transparent huge pages.
// Allocations and frees are reported to the torch profiler like the default CPU allocator's, so
// profiled memory stays true.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <ATen/EmptyTensor.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "output_cache.h"

namespace fastgpt {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kSmallGranule = size_t{64} << 10;  // size classes below a huge page: waste at most this
constexpr size_t kDefaultLimitBytes = size_t{256} << 20;

// The size class of an output of nbytes: whole huge pages, or whole granules below one huge page.
size_t size_class(size_t nbytes) {
  const size_t granule = nbytes >= kHugePage ? kHugePage : kSmallGranule;
  return (nbytes + granule - 1) / granule * granule;
}

size_t limit_from_environment() {
  const char* text = std::getenv("FASTGPT_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return kDefaultLimitBytes;
  char* end = nullptr;
  const long long megabytes = std::strtoll(text, &end, 10);
  TORCH_CHECK(end != text && *end == '\0' && megabytes >= 0,
              "FASTGPT_CPU_CACHE_MB must be a whole number of MiB (0 turns the cache off), got '", text, "'");
  return static_cast<size_t>(megabytes) << 20;
}

struct Block {
  void* ptr;
  size_t size;  // its size class
};

class CachingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t size = size_class(nbytes);
    Block* block = take_cached(size);
    if (block == nullptr) block = new Block{fresh_buffer(size), size};
    {
      std::lock_guard<std::mutex> guard(mutex_);
      allocated_bytes_ += size;
      report(block->ptr, static_cast<int64_t>(size));
    }
    return {block->ptr, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  CpuOutputCacheStats stats() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {allocated_bytes_, cached_bytes_, limit_bytes_};
  }

  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    limit_bytes_ = bytes;
    free_cached_locked(limit_bytes_);
  }

  void empty() {
    std::lock_guard<std::mutex> guard(mutex_);
    free_cached_locked(0);
  }

 private:
  static void release(void* context) { instance().give_back(static_cast<Block*>(context)); }

  void give_back(Block* block) {
    std::lock_guard<std::mutex> guard(mutex_);
    allocated_bytes_ -= block->size;
    report(block->ptr, -static_cast<int64_t>(block->size));
    if (cached_bytes_ + block->size <= limit_bytes_) {
      cached_.emplace(block->size, block);
      cached_bytes_ += block->size;
    } else {
      std::free(block->ptr);
      delete block;
    }
  }

  Block* take_cached(size_t size) {
    std::lock_guard<std::mutex> guard(mutex_);
    auto found = cached_.find(size);
    if (found == cached_.end()) return nullptr;
    Block* block = found->second;
    cached_.erase(found);
    cached_bytes_ -= size;
    return block;
  }

  void* fresh_buffer(size_t size) {
    const size_t alignment = size >= kHugePage ? kHugePage : c10::gAlignment;
    void* ptr = nullptr;
    if (posix_memalign(&ptr, alignment, size) != 0) {
      empty();  // memory held in the cache may be what is missing
      TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&ptr, alignment, size) == 0,
                       "fastgpt: out of CPU memory allocating ", size, " bytes for an output");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (size >= kHugePage) madvise(ptr, size, MADV_HUGEPAGE);  // advice only: the buffer works without it
#endif
    return ptr;
  }

  void free_cached_locked(size_t keep_bytes) {
    while (cached_bytes_ > keep_bytes && !cached_.empty()) {
      auto largest = std::prev(cached_.end());
      cached_bytes_ -= largest->second->size;
      std::free(largest->second->ptr);
      delete largest->second;
      cached_.erase(largest);
    }
  }

  void report(void* ptr, int64_t delta) {
    c10::reportMemoryUsageToProfiler(ptr, delta, allocated_bytes_, allocated_bytes_ + cached_bytes_,
                                     c10::Device(c10::DeviceType::CPU));
  }

  std::mutex mutex_;
  std::multimap<size_t, Block*> cached_;  // free buffers by size
  size_t allocated_bytes_ = 0, cached_bytes_ = 0;
  size_t limit_bytes_ = limit_from_environment();

 public:
  // Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
  static CachingAllocator& instance() {
    static CachingAllocator* allocator = new CachingAllocator();
    return *allocator;
  }
};

}  // namespace

at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_generic(sizes, &CachingAllocator::instance(),
                                              c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt));
}

CpuOutputCacheStats cpu_output_cache_stats() { return CachingAllocator::instance().stats(); }

void set_cpu_output_cache_limit(size_t bytes) { CachingAllocator::instance().set_limit(bytes); }

void empty_cpu_output_cache() { CachingAllocator::instance().empty(); }

}  // namespace fastgpt
