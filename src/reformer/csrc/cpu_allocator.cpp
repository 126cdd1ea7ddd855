// A caching CPU allocator for large tensors (see _memory.py for why and what it measured).
//
// A training step allocates the same few large temporaries over and over (per block of rows,
// per head slice, per half-layer). Through glibc they either come from fresh mmap pages that
// page-fault in on every reuse, or, with the mmap threshold raised, from the heap, where
// long-lived tensors landing between temporaries fragment it layer after layer. Here each
// request from min_bytes to max_bytes is rounded up to whole pages and served from a free
// list of blocks of exactly that size, mapped on the first miss and kept when freed: a step
// that repeats its allocations reuses the same pages without faults, and since each block is
// its own mapping, nothing can fragment. Other requests go to the allocator this one replaced.
//
// Cached bytes are capped (limit_bytes): a block freed over the cap is unmapped at once, and
// a miss first unmaps cached blocks of other sizes when the cache is full, so that pages no
// request uses are handed back rather than held.
#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <pthread.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr size_t kPage = 4096;

void deleter(void* data);

class CachingCpuAllocator final : public c10::Allocator {
 public:
  // The data pointer is its own context (PyTorch's raw_allocate, used by oneDNN's scratch
  // buffers, requires that), so the sizes of live blocks are looked up by address.
  c10::DataPtr allocate(size_t n) override {
    if (n == 0 || n < min_bytes_.load() || n > max_bytes_.load()) {
      return fallback_.load()->allocate(n);  // (mmap cannot map 0 bytes)
    }
    const size_t size = (n + kPage - 1) / kPage * kPage;
    void* data = take(size);
    if (data == nullptr) data = map(size);
    report(data, static_cast<int64_t>(size));
    return {data, data, &deleter, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void give_back(void* data) {
    size_t size = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = live_.find(data);
      if (found != live_.end()) {
        size = found->second;
        live_.erase(found);
        live_bytes_ -= size;
      }
    }
    if (size == 0) {  // raw_deallocate of a request this allocator passed on
      fallback_.load()->raw_deleter()(data);
      return;
    }
    report(data, -static_cast<int64_t>(size));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + size <= limit_bytes_) {
        free_[size].push_back(data);
        cached_bytes_ += size;
        return;
      }
    }
    munmap(data, size);
  }

  // Installs this allocator as PyTorch's CPU allocator (once) and sets its sizes; returns
  // whether PyTorch now uses it.
  bool install(size_t min_bytes, size_t max_bytes, size_t limit_bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    min_bytes_ = min_bytes;
    max_bytes_ = max_bytes;
    limit_bytes_ = limit_bytes;
    if (fallback_.load() == nullptr) {
      c10::Allocator* current = c10::GetCPUAllocator();
      if (current == this) return true;
      fallback_.store(current);
      c10::SetCPUAllocator(this, /*priority=*/1);
    }
    return c10::GetCPUAllocator() == this;
  }

  // Unmaps every cached block; returns the bytes handed back.
  size_t release() {
    std::unordered_map<size_t, std::vector<void*>> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_bytes_ = 0;
    }
    size_t bytes = 0;
    for (auto& [size, list] : blocks) {
      for (void* data : list) munmap(data, size);
      bytes += size * list.size();
    }
    return bytes;
  }

  std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(live_bytes_), static_cast<int64_t>(cached_bytes_),
            static_cast<int64_t>(live_bytes_ + cached_bytes_), maps_, hits_};
  }

  bool installed() const { return c10::GetCPUAllocator() == this; }

  std::mutex& mutex() { return mutex_; }

 private:
  // A cached block of exactly this size, or nullptr after counting a miss (the caller maps).
  void* take(size_t size) {
    std::vector<std::pair<void*, size_t>> spill;  // other sizes' blocks, unmapped for room
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = free_.find(size);
      if (found != free_.end() && !found->second.empty()) {
        void* data = found->second.back();
        found->second.pop_back();
        cached_bytes_ -= size;
        live_.emplace(data, size);
        live_bytes_ += size;
        ++hits_;
        return data;
      }
      // A miss maps new pages; when the cache is full, hand back other sizes' blocks first
      // so that resident memory does not grow by what the cache holds unused.
      for (auto it = free_.begin(); it != free_.end() && cached_bytes_ + size > limit_bytes_;) {
        auto& list = it->second;
        while (!list.empty() && cached_bytes_ + size > limit_bytes_) {
          spill.emplace_back(list.back(), it->first);
          cached_bytes_ -= it->first;
          list.pop_back();
        }
        it = list.empty() ? free_.erase(it) : std::next(it);
      }
      ++maps_;
    }
    for (auto [data, bytes] : spill) munmap(data, bytes);
    return nullptr;
  }

  void* map(size_t size) {
    void* data = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) {
      release();
      data = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    TORCH_CHECK(data != MAP_FAILED, "reformer CPU allocator: out of memory mapping ", size,
                " bytes; free memory, or set REFORMER_MALLOC=reuse to use PyTorch's allocator");
    std::lock_guard<std::mutex> lock(mutex_);
    live_.emplace(data, size);
    live_bytes_ += size;
    return data;
  }

  void report(void* data, int64_t delta) {
    size_t live, mapped;  // every mapped block is either live or cached
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live = live_bytes_;
      mapped = live_bytes_ + cached_bytes_;
    }
    c10::reportMemoryUsageToProfiler(data, delta, live, mapped,
                                     c10::Device(c10::DeviceType::CPU));
  }

  std::mutex mutex_;
  std::atomic<c10::Allocator*> fallback_{nullptr};  // the allocator replaced
  std::atomic<size_t> min_bytes_{SIZE_MAX}, max_bytes_{0};  // read unlocked by allocate
  size_t limit_bytes_ = 0;
  std::unordered_map<void*, size_t> live_;  // address -> bytes mapped
  std::unordered_map<size_t, std::vector<void*>> free_;  // bytes -> cached blocks
  size_t live_bytes_ = 0, cached_bytes_ = 0;
  int64_t maps_ = 0, hits_ = 0;
};

// Never destroyed: tensors freed during interpreter shutdown still call its deleter.
CachingCpuAllocator& cache() {
  static auto* instance = new CachingCpuAllocator();
  return *instance;
}

void deleter(void* data) { cache().give_back(data); }

// A fork while another thread holds the lock would leave the child's lock held forever.
void lock_for_fork() { cache().mutex().lock(); }
void unlock_after_fork() { cache().mutex().unlock(); }

bool cache_cpu_allocations(int64_t min_bytes, int64_t max_bytes, int64_t limit_bytes) {
  TORCH_CHECK(min_bytes >= 0 && max_bytes >= 0 && limit_bytes >= 0,
              "cache_cpu_allocations: sizes must be >= 0, got ", min_bytes, ", ", max_bytes,
              " and ", limit_bytes);
  static std::once_flag fork_handlers;
  std::call_once(fork_handlers,
                 [] { pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork); });
  return cache().install(static_cast<size_t>(min_bytes), static_cast<size_t>(max_bytes),
                         static_cast<size_t>(limit_bytes));
}

int64_t release_cached_cpu_blocks() { return static_cast<int64_t>(cache().release()); }

std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t> cpu_cache_stats() {
  return cache().stats();
}

bool cpu_cache_installed() { return cache().installed(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(reformer, m) {
  m.def("cache_cpu_allocations(int min_bytes, int max_bytes, int limit_bytes) -> bool",
        &cache_cpu_allocations);
  m.def("release_cached_cpu_blocks() -> int", &release_cached_cpu_blocks);
  m.def("cpu_cache_stats() -> (int, int, int, int, int)", &cpu_cache_stats);
  m.def("cpu_cache_installed() -> bool", &cpu_cache_installed);
}
