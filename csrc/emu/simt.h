// Host SIMT emulation: lets one CUDA C++ kernel source compile with g++ and run on
// the CPU, so that the test suite executes every kernel without a GPU.
//
// Test infrastructure only: correct, deterministic and strict, not fast.
//
// Under nvcc this header only defines the portability macros (RK_LAUNCH,
// STATIC_SHARED, DYNAMIC_SHARED) and the shared-memory limits. Under a host compiler
// it provides:
//   * __global__/__device__/__host__/__forceinline__/__launch_bounds__ as no-ops;
//     static shared memory is declared with STATIC_SHARED(T, name[, dims]), a
//     function-static variable (blocks run one at a time, so it is exactly one copy
//     per block) that registers itself with the launch; plain __shared__ does not
//     compile, so no shared variable escapes the accounting. Static and dynamic
//     shared memory are poisoned with 0xFF before each block;
//   * CUDA's shared-memory rules, enforced per launch: static + dynamic bytes at most
//     48 KiB unless the kernel opted in (set_max_dynamic_shared, the stand-in for
//     cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize)); with the
//     opt-in, dynamic bytes at most the opted-in size and static + opted-in bytes
//     at most the device's per-block maximum (RK_EMU_SMEM_OPTIN bytes, default
//     232448 = 227 KiB as on sm_90; sm_80 has 163 KiB, sm_86/89 99 KiB). A launch
//     that breaks a rule aborts with the sizes, as it would fail on a GPU;
//   * threadIdx/blockIdx/blockDim/gridDim as thread_local, set per CUDA thread;
//   * two interchangeable back-ends, chosen with RK_EMU_BACKEND=fibers|threads:
//       fibers (default): every CUDA thread is a ucontext fiber on one OS thread,
//         scheduled cooperatively at barriers; deterministic; odd blocks run their
//         threads in reverse order, so a missing barrier shows up either way;
//       threads: one OS thread per CUDA thread (reused across blocks), so
//         ThreadSanitizer sees real concurrency;
//   * __syncthreads() recording its call site: two different sites meeting in one
//     barrier phase abort ("divergent barrier"); threads that returned leave the
//     barrier count, as on a GPU; no progress at all aborts ("deadlock");
//   * warp operations (__shfl_sync/_up/_down/_xor with width, __ballot_sync,
//     __any_sync, __all_sync, __syncwarp) exchanging values between
//     two warp barriers; a mask that does not cover every live lane of the warp aborts;
//   * atomicAdd/Sub/Max/Min/Exch/CAS on 32/64-bit integers, float and double, and
//     atomicAdd on __half and __nv_bfloat16 (16-bit CAS loop);
//   * cp.async (commit and wait groups, landing at the wait or at the issue) and
//     ldmatrix, behind the helpers of csrc/kernels/access.cuh.
// Not emulated: other inline PTX, wmma, TMA, cooperative groups; kernels put such
// code behind a helper with an `#ifdef __CUDA_ARCH__` host branch (as mma.sync).
#pragma once

#include <cstddef>

namespace rk {
// Shared memory a block may use without opting in (static + dynamic), on every GPU.
constexpr size_t kDefaultSharedBytes = 48 * 1024;
}  // namespace rk

#if defined(__CUDACC__)

#define RK_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define STATIC_SHARED(T, name, ...) __shared__ __align__(16) T name __VA_ARGS__
#define DYNAMIC_SHARED(T, name)                              \
  extern __shared__ __align__(16) unsigned char rk_smem_[]; \
  T* name = reinterpret_cast<T*>(rk_smem_)

#else  // host emulation

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <setjmp.h>
#include <ucontext.h>
#include <vector_types.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Static shared memory goes through STATIC_SHARED, which the launch accounts for.
#define __shared__ rk_emu_declare_static_shared_memory_with_STATIC_SHARED
#define __launch_bounds__(...)

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace rk::emu {

[[noreturn]] inline void fail(const char* what, const char* site) {
  std::fprintf(stderr, "rk::emu: %s at %s (block %u,%u,%u thread %u,%u,%u)\n", what,
               site ? site : "?", blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x,
               threadIdx.y, threadIdx.z);
  std::fflush(stderr);
  std::abort();
}

// A warp exchange's slots: what each lane published (exited lanes' slots are stale).
constexpr int kSlotBytes = 32;
using WarpSlots = unsigned char[32][kSlotBytes];

// Reads the slots between an exchange's two warp barriers: fn(ctx, slots, live mask).
struct SlotReader {
  void (*fn)(void* ctx, const WarpSlots& slots, unsigned live);
  void* ctx;
};

// One block's execution: the barrier and warp-exchange primitives of a back-end.
class Block {
 public:
  virtual ~Block() = default;
  virtual void sync_threads(const char* site) = 0;
  // Every live lane of the calling warp publishes `bytes` (<= kSlotBytes) of `value`;
  // once all have, each lane runs `read` on the 32 slots (no lane writes a slot until
  // every lane has read). Returns the warp's live-lane mask.
  virtual unsigned warp_exchange(unsigned mask, const void* value, int bytes, SlotReader read,
                                 const char* site) = 0;
};

inline thread_local Block* current_block = nullptr;
inline thread_local int linear_tid = 0;  // x + y*bx + z*bx*by
inline unsigned char* dynamic_smem = nullptr;

// warp_exchange with a callable read(slots, live).
template <typename F>
unsigned exchange(unsigned mask, const void* value, int bytes, F&& read, const char* site) {
  using Read = std::remove_reference_t<F>;
  const SlotReader reader{[](void* ctx, const WarpSlots& slots, unsigned live) {
                            (*static_cast<Read*>(ctx))(slots, live);
                          },
                          const_cast<void*>(static_cast<const void*>(&read))};
  return current_block->warp_exchange(mask, value, bytes, reader, site);
}

}  // namespace rk::emu

#include "emu/count.h"

namespace rk::emu {

inline int block_threads(dim3 b) { return static_cast<int>(b.x * b.y * b.z); }

inline dim3 thread_index(int linear, dim3 b) {
  return dim3(linear % b.x, linear / b.x % b.y, linear / (b.x * b.y));
}

// Per-warp exchange slots and the live-lane bookkeeping both back-ends share.
struct WarpState {
  WarpSlots slot;
  unsigned live = 0;      // lanes that have not returned
  unsigned arrived = 0;   // lanes waiting at the current warp barrier
  uint64_t generation = 0;  // warp barriers completed (threads back-end)
  const char* site = nullptr;
};

inline unsigned initial_live(int warp, int nthreads) {
  int lanes = nthreads - warp * 32;
  return lanes >= 32 ? 0xffffffffu : ((1u << lanes) - 1u);
}

// ---------------------------------------------------------------- fibers ------
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define RK_EMU_FAST_SWITCH 0
#else
#define RK_EMU_FAST_SWITCH 1
#endif

class FiberBlock final : public Block {
 public:
  enum State { kReady, kAtBarrier, kAtWarp, kDone };

  struct Fiber {
    ucontext_t ctx;
    jmp_buf jump;
    bool started = false;
    State state = kReady;
    const char* site = nullptr;
  };

  static constexpr size_t kStackBytes = 256 * 1024;

  FiberBlock(dim3 block, const std::function<void()>& body, bool reverse)
      : block_(block), body_(body), n_(block_threads(block)), fibers_(n_),
        warps_((n_ + 31) / 32) {
    for (int w = 0; w < static_cast<int>(warps_.size()); ++w) warps_[w].live = initial_live(w, n_);
    for (int i = 0; i < n_; ++i) order_.push_back(reverse ? n_ - 1 - i : i);
  }

  void run() {
    std::vector<std::unique_ptr<char[]>>& stacks = stack_pool();
    while (static_cast<int>(stacks.size()) < n_) stacks.emplace_back(new char[kStackBytes]);
    for (int i = 0; i < n_; ++i) {
      Fiber& f = fibers_[i];
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stacks[i].get();
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = &scheduler_;
      makecontext(&f.ctx, reinterpret_cast<void (*)()>(&FiberBlock::entry), 2,
                  static_cast<unsigned>(reinterpret_cast<uintptr_t>(this) & 0xffffffffu),
                  static_cast<unsigned>(reinterpret_cast<uintptr_t>(this) >> 32));
    }
    while (true) {
      bool progress = false;
      for (int i : order_) {
        if (fibers_[i].state != kReady) continue;
        resume(i);
        progress = true;
      }
      if (release_warps() | release_barrier()) progress = true;
      if (all_done()) {
        tracker.end_block(live_masks().data());
        return;
      }
      if (!progress) fail("deadlock: no thread can make progress", last_site_);
    }
  }

  void sync_threads(const char* site) override {
    Fiber& f = fibers_[running_];
    f.state = kAtBarrier;
    f.site = site;
    yield();
  }

  unsigned warp_exchange(unsigned mask, const void* value, int bytes, SlotReader read,
                         const char* site) override {
    WarpState& w = warps_[running_ / 32];
    if ((mask & w.live) != w.live) fail("warp mask does not cover every live lane", site);
    std::memcpy(w.slot[running_ % 32], value, bytes);
    wait_warp(site);
    const unsigned live = w.live;
    read.fn(read.ctx, w.slot, live);
    wait_warp(site);  // nobody overwrites a slot before every lane has read it
    return live;
  }

 private:
  // The fibers' stacks, kept for the OS thread's later blocks and launches: a fresh
  // 256 KiB stack per fiber and block cost a page fault per touched page (most of
  // a small launch's time).
  static std::vector<std::unique_ptr<char[]>>& stack_pool() {
    thread_local std::vector<std::unique_ptr<char[]>> stacks;
    return stacks;
  }

  static void entry(unsigned lo, unsigned hi) {
    auto* self = reinterpret_cast<FiberBlock*>(static_cast<uintptr_t>(lo) |
                                               (static_cast<uintptr_t>(hi) << 32));
    self->body_();
    Fiber& f = self->fibers_[self->running_];
    f.state = kDone;
    self->warps_[self->running_ / 32].live &= ~(1u << (self->running_ % 32));
#if RK_EMU_FAST_SWITCH
    _longjmp(self->scheduler_jump_, 1);  // the fiber's stack is abandoned
#endif
  }  // returns to uc_link (the scheduler)

  // A fiber starts with swapcontext (its own stack); later switches use
  // _setjmp/_longjmp, which skip swapcontext's signal-mask system calls (most of
  // the emulator's time otherwise). Sanitizers keep swapcontext, which they follow.
  void resume(int i) {
    running_ = i;
    threadIdx = thread_index(i, block_);
    linear_tid = i;
#if RK_EMU_FAST_SWITCH
    if (_setjmp(scheduler_jump_) != 0) return;
    Fiber& f = fibers_[i];
    if (f.started) _longjmp(f.jump, 1);
    f.started = true;
    swapcontext(&scheduler_, &f.ctx);
#else
    swapcontext(&scheduler_, &fibers_[i].ctx);
#endif
  }

  void yield() {
#if RK_EMU_FAST_SWITCH
    if (_setjmp(fibers_[running_].jump) == 0) _longjmp(scheduler_jump_, 1);
#else
    swapcontext(&fibers_[running_].ctx, &scheduler_);
#endif
  }

  void wait_warp(const char* site) {
    Fiber& f = fibers_[running_];
    f.state = kAtWarp;
    f.site = site;
    last_site_ = site;
    yield();
  }

  bool release_warps() {
    bool released = false;
    for (int w = 0; w < static_cast<int>(warps_.size()); ++w) {
      unsigned live = warps_[w].live, waiting = 0;
      for (int lane = 0; lane < 32; ++lane)
        if ((live >> lane & 1u) && fibers_[w * 32 + lane].state == kAtWarp) waiting |= 1u << lane;
      if (live && waiting == live) {
        const char* site = fibers_[w * 32 + __builtin_ctz(live)].site;
        tracker.warp_sync(w, live, site);
        for (int lane = 0; lane < 32; ++lane) {
          if (!(live >> lane & 1u)) continue;
          if (fibers_[w * 32 + lane].site != site) {
            std::fprintf(stderr, "rk::emu: warp operations at %s and %s\n", site,
                         fibers_[w * 32 + lane].site);
            fail("divergent warp operation (lanes of one warp at different call sites)", site);
          }
          fibers_[w * 32 + lane].state = kReady;
        }
        released = true;
      }
    }
    return released;
  }

  bool release_barrier() {
    const char* site = nullptr;
    for (const Fiber& f : fibers_) {
      if (f.state == kDone) continue;
      if (f.state != kAtBarrier) return false;
      if (site == nullptr) site = f.site;
      else if (std::strcmp(site, f.site) != 0) {
        std::fprintf(stderr, "rk::emu: barriers at %s and %s\n", site, f.site);
        fail("divergent barrier (__syncthreads at different call sites)", f.site);
      }
    }
    if (site == nullptr) return false;
    last_site_ = site;
    tracker.segment_end(live_masks().data());
    for (Fiber& f : fibers_)
      if (f.state == kAtBarrier) f.state = kReady;
    return true;
  }

  std::vector<unsigned> live_masks() const {
    std::vector<unsigned> live(warps_.size());
    for (size_t w = 0; w < warps_.size(); ++w) live[w] = warps_[w].live;
    return live;
  }

  bool all_done() const {
    for (const Fiber& f : fibers_)
      if (f.state != kDone) return false;
    return true;
  }

  dim3 block_;
  std::function<void()> body_;
  int n_;
  std::vector<Fiber> fibers_;
  std::vector<WarpState> warps_;
  std::vector<int> order_;
  ucontext_t scheduler_;
  jmp_buf scheduler_jump_;
  int running_ = 0;
  const char* last_site_ = nullptr;
};

// ---------------------------------------------------------------- threads -----
class ThreadBlock final : public Block {
 public:
  explicit ThreadBlock(int n) : n_(n), warps_((n + 31) / 32), warp_cv_(warps_.size()) {}

  void start() {
    live_ = n_;
    waiting_ = 0;
    site_ = nullptr;
    for (int w = 0; w < static_cast<int>(warps_.size()); ++w) {
      warps_[w] = WarpState();
      warps_[w].live = initial_live(w, n_);
    }
  }

  void sync_threads(const char* site) override {
    std::unique_lock<std::mutex> lock(mutex_);
    if (waiting_ == 0) site_ = site;
    else if (std::strcmp(site_, site) != 0) {
      std::fprintf(stderr, "rk::emu: barriers at %s and %s\n", site_, site);
      fail("divergent barrier (__syncthreads at different call sites)", site);
    }
    wait_for_all(lock, waiting_, live_, generation_);
  }

  unsigned warp_exchange(unsigned mask, const void* value, int bytes, SlotReader read,
                         const char* site) override {
    WarpState& w = warps_[linear_tid / 32];
    std::unique_lock<std::mutex> lock(mutex_);
    if ((mask & w.live) != w.live) fail("warp mask does not cover every live lane", site);
    std::memcpy(w.slot[linear_tid % 32], value, bytes);
    warp_barrier(lock, w, site);
    const unsigned live = w.live;
    read.fn(read.ctx, w.slot, live);
    warp_barrier(lock, w, site);
    return live;
  }

  void thread_exit() {
    std::unique_lock<std::mutex> lock(mutex_);
    --live_;
    WarpState& w = warps_[linear_tid / 32];
    w.live &= ~(1u << (linear_tid % 32));
    if (waiting_ > 0 && waiting_ == live_) release(generation_, waiting_);
    if (w.arrived && w.arrived == w.live) {
      w.arrived = 0;
      ++w.generation;
      warp_cv_[linear_tid / 32].notify_all();
    }
    cv_.notify_all();
  }

 private:
  void release(uint64_t& generation, int& waiting) {
    ++generation;
    waiting = 0;
    cv_.notify_all();
  }

  void wait_for_all(std::unique_lock<std::mutex>& lock, int& waiting, int& live,
                    uint64_t& generation) {
    uint64_t gen = generation;
    if (++waiting == live) {
      release(generation, waiting);
      return;
    }
    cv_.wait(lock, [&] { return generation != gen; });
  }

  void warp_barrier(std::unique_lock<std::mutex>& lock, WarpState& w, const char* site) {
    if (w.arrived == 0) w.site = site;
    else if (w.site != site) {
      std::fprintf(stderr, "rk::emu: warp operations at %s and %s\n", w.site, site);
      fail("divergent warp operation (lanes of one warp at different call sites)", site);
    }
    w.arrived |= 1u << (linear_tid % 32);
    uint64_t gen = w.generation;
    std::condition_variable& cv = warp_cv_[linear_tid / 32];
    if (w.arrived == w.live) {
      w.arrived = 0;
      ++w.generation;
      cv.notify_all();
      return;
    }
    cv.wait(lock, [&] { return w.generation != gen; });
  }

  int n_;
  std::vector<WarpState> warps_;
  std::mutex mutex_;
  std::condition_variable cv_;  // the block barrier
  std::vector<std::condition_variable> warp_cv_;  // each warp's barrier: wakes only its lanes
  int live_ = 0, waiting_ = 0;
  uint64_t generation_ = 0;
  const char* site_ = nullptr;
};

// ------------------------------------------------------- shared memory ------
// The per-block maximum a kernel may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin).
inline size_t max_shared_optin() {
  const char* v = std::getenv("RK_EMU_SMEM_OPTIN");
  if (v == nullptr) return 232448;  // sm_90: 227 KiB
  char* end = nullptr;
  const unsigned long long bytes = std::strtoull(v, &end, 10);
  if (end == v || *end != '\0' || bytes < kDefaultSharedBytes)
    fail("RK_EMU_SMEM_OPTIN must be a byte count of at least 49152", v);
  return static_cast<size_t>(bytes);
}

// cudaFuncAttributeMaxDynamicSharedMemorySize of each kernel that opted in.
struct SharedOptIns {
  std::mutex mutex;
  std::vector<std::pair<const void*, size_t>> sizes;
};
inline SharedOptIns& shared_opt_ins() {
  static SharedOptIns o;
  return o;
}

// The stand-in for cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, bytes).
inline void set_max_dynamic_shared(const void* kernel, size_t bytes) {
  if (bytes > max_shared_optin()) fail("dynamic shared memory opt-in above the device maximum",
                                       "set_max_dynamic_shared");
  SharedOptIns& o = shared_opt_ins();
  std::lock_guard<std::mutex> lock(o.mutex);
  for (auto& [k, size] : o.sizes)
    if (k == kernel) {
      size = bytes;
      return;
    }
  o.sizes.emplace_back(kernel, bytes);
}

inline bool opted_in_size(const void* kernel, size_t* bytes) {
  SharedOptIns& o = shared_opt_ins();
  std::lock_guard<std::mutex> lock(o.mutex);
  for (const auto& [k, size] : o.sizes)
    if (k == kernel) {
      *bytes = size;
      return true;
    }
  return false;
}

// The shared memory of the launch in progress: its static variables (registered by
// STATIC_SHARED as each block first reaches them), its dynamic size and opt-in.
struct LaunchShared {
  std::mutex mutex;
  long block = -1;                    // block whose static variables are poisoned
  std::vector<std::pair<void*, size_t>> vars;
  std::vector<void*> poisoned;        // variables poisoned for `block`
  size_t static_bytes = 0, dynamic_bytes = 0, opt_in = 0;
  bool opted_in = false;
};
inline LaunchShared launch_shared;

// Aborts when the launch breaks CUDA's rules (the GPU launch would fail).
inline void check_shared_rules(const char* site) {
  const LaunchShared& l = launch_shared;
  char what[256];
  if (!l.opted_in && l.static_bytes + l.dynamic_bytes > kDefaultSharedBytes) {
    std::snprintf(what, sizeof(what),
                  "shared memory %zu bytes (%zu static + %zu dynamic) above the 48 KiB default "
                  "without a cudaFuncAttributeMaxDynamicSharedMemorySize opt-in",
                  l.static_bytes + l.dynamic_bytes, l.static_bytes, l.dynamic_bytes);
    fail(what, site);
  }
  if (l.opted_in && l.dynamic_bytes > l.opt_in) {
    std::snprintf(what, sizeof(what),
                  "dynamic shared memory %zu bytes above the kernel's opt-in of %zu bytes",
                  l.dynamic_bytes, l.opt_in);
    fail(what, site);
  }
  if (l.opted_in && l.static_bytes + l.opt_in > max_shared_optin()) {
    std::snprintf(what, sizeof(what),
                  "shared memory %zu bytes (%zu static + %zu opted-in dynamic) above the "
                  "device's per-block maximum of %zu bytes",
                  l.static_bytes + l.opt_in, l.static_bytes, l.opt_in, max_shared_optin());
    fail(what, site);
  }
}

// STATIC_SHARED's registration: counts the variable once per launch, checks the
// rules, and poisons it when the first thread of a block reaches it.
inline void declare_static_shared(void* var, size_t bytes, long block, const char* site) {
  LaunchShared& l = launch_shared;
  std::lock_guard<std::mutex> lock(l.mutex);
  bool known = false;
  for (const auto& [v, size] : l.vars) known |= v == var;
  if (!known) {
    l.vars.emplace_back(var, bytes);
    l.static_bytes += bytes;
    check_shared_rules(site);
  }
  if (l.block != block) {
    l.block = block;
    l.poisoned.clear();
  }
  for (void* v : l.poisoned)
    if (v == var) return;
  std::memset(var, 0xFF, bytes);
  l.poisoned.push_back(var);
}

// Whether [p, p + bytes) lies in the launch's shared memory (dynamic or static).
inline bool is_shared(const void* p, size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(p);
  LaunchShared& l = launch_shared;
  if (b >= dynamic_smem && b + bytes <= dynamic_smem + l.dynamic_bytes) return true;
  std::lock_guard<std::mutex> lock(l.mutex);
  for (const auto& [v, size] : l.vars) {
    const auto* base = static_cast<const unsigned char*>(v);
    if (b >= base && b + bytes <= base + size) return true;
  }
  return false;
}

// ------------------------------------------------------------ async copies ---
// cp.async (cp_async / cp_async_commit / cp_async_wait in csrc/kernels/access.cuh).
// Each CUDA thread keeps its copies in flight until a wait retires their group.
// RK_EMU_CP_ASYNC says when the bytes reach shared memory:
//   wait  (default) the destination is poisoned (0xFF) at issue and the bytes land
//         at the wait that retires the copy: the latest moment a GPU may write
//         them. A missing or too-loose wait reads poison, and so does a thread
//         still reading the destination's old contents after the issue;
//   issue the bytes land at issue, the earliest moment: a thread still reading the
//         old contents (the barrier before the next tile's copies missing) reads
//         the new ones.
// A thread that ends with copies no wait retired aborts, as do a destination
// outside the block's shared memory and addresses not aligned to the copy's size.
struct AsyncCopy {
  unsigned char* dst;
  unsigned char bytes[16];
  int size;
  long group;  // the commit that closes it: the thread's commit count at issue
};
struct AsyncThread {
  std::vector<AsyncCopy> copies;
  long committed = 0;
};
inline std::vector<AsyncThread> async_threads;  // one per CUDA thread of a block
inline bool async_lands_at_issue = false;

inline bool cp_async_lands_at_issue() {
  const char* v = std::getenv("RK_EMU_CP_ASYNC");
  if (v == nullptr || std::strcmp(v, "wait") == 0) return false;
  if (std::strcmp(v, "issue") == 0) return true;
  fail("RK_EMU_CP_ASYNC must be wait or issue", v);
}

// One lane's copy of `size` bytes; `pred` false writes zeros and reads nothing.
inline void cp_async(void* dst, const void* src, int size, bool pred, const char* site) {
  if (reinterpret_cast<uintptr_t>(dst) % size != 0 ||
      (pred && reinterpret_cast<uintptr_t>(src) % size != 0))
    fail("cp.async address not aligned to the copy's size", site);
  if (!is_shared(dst, size)) fail("cp.async destination outside the block's shared memory", site);
  AsyncCopy c{static_cast<unsigned char*>(dst), {}, size, async_threads[linear_tid].committed};
  if (pred) std::memcpy(c.bytes, src, size);
  if (async_lands_at_issue) {
    std::memcpy(c.dst, c.bytes, size);
    c.size = 0;  // landed: only the bookkeeping stays
  } else {
    std::memset(c.dst, 0xFF, size);
  }
  async_threads[linear_tid].copies.push_back(c);
}

inline void cp_async_commit() { ++async_threads[linear_tid].committed; }

// cp.async.wait_group n: every copy but those of the newest n commits (and those
// not committed yet) has landed.
inline void cp_async_wait(int n) {
  AsyncThread& t = async_threads[linear_tid];
  size_t kept = 0;
  for (AsyncCopy& c : t.copies) {
    if (c.group < t.committed - n) std::memcpy(c.dst, c.bytes, c.size);
    else t.copies[kept++] = c;
  }
  t.copies.resize(kept);
}

inline void async_thread_end() {
  if (!async_threads[linear_tid].copies.empty())
    fail("thread ended with cp.async copies no cp_async_wait retired", "cp_async");
  async_threads[linear_tid].committed = 0;
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].b16 for the calling lane: lanes
// 8m..8m+7 give the 16-byte rows of matrix m (the other lanes' addresses are
// ignored). Lane l receives, per matrix, row l/4's 16-bit elements 2(l%4) and
// 2(l%4)+1 (.trans: column l/4's), the lower in the low half.
inline void ldmatrix(uint32_t* out, int matrices, bool trans, const void* row, const char* site) {
  const int lane = linear_tid % 32;
  if (lane < 8 * matrices) {
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
      fail("ldmatrix row address not 16-byte aligned", site);
    if (!is_shared(row, 16)) fail("ldmatrix row outside the block's shared memory", site);
  }
  auto read = [&](const WarpSlots& slots, unsigned live) {
    if (live != 0xffffffffu) fail("ldmatrix needs every lane of the warp", site);
    auto element = [&](int m, int r, int c) {
      const unsigned char* base;
      std::memcpy(&base, slots[8 * m + r], sizeof(base));
      uint16_t v;
      std::memcpy(&v, base + 2 * c, 2);
      return static_cast<uint32_t>(v);
    };
    const int g = lane / 4, t = lane % 4;
    for (int m = 0; m < matrices; ++m)
      out[m] = trans ? element(m, 2 * t, g) | element(m, 2 * t + 1, g) << 16
                     : element(m, g, 2 * t) | element(m, g, 2 * t + 1) << 16;
  };
  exchange(0xffffffffu, &row, sizeof(row), read, site);
}

inline bool use_threads() {
  const char* v = std::getenv("RK_EMU_BACKEND");
  if (v == nullptr || std::strcmp(v, "fibers") == 0) return false;
  if (std::strcmp(v, "threads") == 0) return true;
  fail("RK_EMU_BACKEND must be fibers or threads", v);
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Runs `kernel(args...)` over the grid, one block at a time.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, void (*kernel)(Params...), Args&&... args) {
  std::lock_guard<std::mutex> guard(launch_mutex());
  const int n = block_threads(block);
  if (n <= 0 || n > 1024) fail("block size must be 1..1024 threads", "launch");
  launch_shared.block = -1;
  launch_shared.vars.clear();
  launch_shared.static_bytes = 0;
  launch_shared.dynamic_bytes = smem;
  launch_shared.opted_in = opted_in_size(reinterpret_cast<const void*>(kernel),
                                         &launch_shared.opt_in);
  check_shared_rules("launch");
  std::vector<unsigned char> smem_bytes(smem + 16);
  async_threads.assign(n, AsyncThread());
  async_lands_at_issue = cp_async_lands_at_issue();
  auto body = [&] {
    kernel(static_cast<Params>(args)...);
    async_thread_end();
  };
  auto set_block = [&](long b) {
    blockIdx = dim3(b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y));
    blockDim = block;
    gridDim = grid;
  };
  const long blocks = static_cast<long>(grid.x) * grid.y * grid.z;
  dynamic_smem = smem_bytes.data();
  if (!use_threads()) {
    long first = 0, last = blocks;
    tracker.begin_launch(reinterpret_cast<const void*>(kernel), grid, block, &first, &last);
    for (long b = first; b < last; ++b) {
      set_block(b);
      std::memset(smem_bytes.data(), 0xFF, smem_bytes.size());
      FiberBlock fb(block, body, b % 2 == 1);
      current_block = &fb;
      tracker.begin_block(b);
      fb.run();
      tracker.finish_block();
    }
    current_block = nullptr;
    tracker.end_launch();
    return;
  }
  if (tracker.config.on) fail("counting accesses needs the fibers back-end", "launch");
  ThreadBlock tb(n);
  std::mutex start_mutex;
  std::condition_variable start_cv;
  long started = -1;   // block index the workers may run
  int finished = 0;    // workers done with it
  std::vector<std::thread> workers;
  for (int t = 0; t < n; ++t) {
    workers.emplace_back([&, t] {
      for (long b = 0; b < blocks; ++b) {
        {
          std::unique_lock<std::mutex> lock(start_mutex);
          start_cv.wait(lock, [&] { return started >= b; });
        }
        set_block(b);
        threadIdx = thread_index(t, block);
        linear_tid = t;
        current_block = &tb;
        body();
        tb.thread_exit();
        std::lock_guard<std::mutex> lock(start_mutex);
        if (++finished == n) start_cv.notify_all();
      }
    });
  }
  for (long b = 0; b < blocks; ++b) {
    std::unique_lock<std::mutex> lock(start_mutex);
    std::memset(smem_bytes.data(), 0xFF, smem_bytes.size());
    tb.start();
    finished = 0;
    started = b;
    start_cv.notify_all();
    start_cv.wait(lock, [&] { return finished == n; });
  }
  for (std::thread& w : workers) w.join();
}

// `value` of lane `src` (one warp-wide exchange).
template <typename T>
T warp_op(unsigned mask, T value, int src, const char* site) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>,
                "warp exchange of a trivially copyable value of at most 16 bytes");
  T out;
  exchange(mask, &value, sizeof(T), [&](const WarpSlots& slots, unsigned live) {
    if (!(live >> src & 1u)) fail("warp shuffle reads an exited lane", site);
    std::memcpy(&out, slots[src], sizeof(T));
  }, site);
  return out;
}

inline int lane_id() { return linear_tid % 32; }

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} (T: __half or __nv_bfloat16) for
// the calling lane, in the fragment layout of rk::detail::mma_m16n8k16
// (csrc/kernels/conv_common.cuh): the warp exchanges its A and B fragments once; a
// lane's own d is its part of C, and it computes its four results with fmaf over k
// in order. Counted once per warp (lane 0), with the products whose factors are both
// non-zero when counting.
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                  const char* site) {
  uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const int lane = lane_id(), g = lane / 4, t = lane % 4;
  float out[4];
  double useful = 0;
  exchange(0xffffffffu, mine, sizeof(mine), [&](const WarpSlots& slots, unsigned live) {
    if (live != 0xffffffffu) fail("mma.sync needs every lane of the warp", site);
    auto half = [&](int from, int reg, int k) {
      uint32_t bits;
      std::memcpy(&bits, slots[from] + 4 * reg, 4);
      const uint16_t raw = static_cast<uint16_t>(bits >> (16 * (k % 2)));
      if constexpr (std::is_same_v<T, __half>) {
        __half_raw h;
        h.x = raw;
        return __half2float(__half(h));
      } else {
        __nv_bfloat16_raw h;
        h.x = raw;
        return __bfloat162float(__nv_bfloat16(h));
      }
    };
    // A[row][k]: lane 4·(row % 8) + (k % 8) / 2, register row / 8 + 2·(k / 8);
    // B[k][n]: lane 4n + (k % 8) / 2, register 4 + k / 8.
    auto A = [&](int row, int k) { return half(4 * (row % 8) + (k % 8) / 2, row / 8 + 2 * (k / 8), k); };
    auto B = [&](int k, int n) { return half(4 * n + (k % 8) / 2, 4 + k / 8, k); };
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i / 2) * 8, col = 2 * t + i % 2;
      float sum = d[i];
      for (int k = 0; k < 16; ++k) sum = fmaf(A(row, k), B(k, col), sum);
      out[i] = sum;
    }
    if (lane == 0 && tracker.counted())
      for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 8; ++n)
          for (int k = 0; k < 16; ++k) useful += A(m, k) != 0.0f && B(k, n) != 0.0f;
  }, site);
  for (int i = 0; i < 4; ++i) d[i] = out[i];
  if (lane == 0) tracker.add_mma(linear_tid, 16 * 8 * 16, useful);  // the warp's instruction
}

}  // namespace rk::emu

#define RK_EMU_STR2(x) #x
#define RK_EMU_STR(x) RK_EMU_STR2(x)
#define RK_EMU_SITE __FILE__ ":" RK_EMU_STR(__LINE__)

#define __syncthreads() ::rk::emu::current_block->sync_threads(RK_EMU_SITE)
#define RK_LAUNCH(kernel, grid, block, smem, stream) \
  ::rk::emu::Launcher(grid, block, smem, stream, kernel)
#define DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::rk::emu::dynamic_smem)
#define STATIC_SHARED(T, name, ...)                                                        \
  alignas(16) static T name __VA_ARGS__;                                                   \
  ::rk::emu::declare_static_shared(&name, sizeof(name),                                    \
                                   static_cast<long>(blockIdx.x) +                         \
                                       static_cast<long>(gridDim.x) *                      \
                                           (blockIdx.y + static_cast<long>(gridDim.y) * blockIdx.z), \
                                   RK_EMU_SITE)

namespace rk::emu {

template <typename Kernel>
struct Launcher;
template <typename Stream, typename Kernel>
Launcher(dim3, dim3, size_t, Stream, Kernel) -> Launcher<Kernel>;

template <typename Kernel>
struct Launcher {
  dim3 grid, block;
  size_t smem;
  Kernel kernel;
  template <typename Stream>  // ignored: launches run to completion
  Launcher(dim3 g, dim3 b, size_t s, Stream, Kernel k) : grid(g), block(b), smem(s), kernel(k) {}
  template <typename... Args>
  void operator()(Args&&... args) const {
    launch(grid, block, smem, kernel, std::forward<Args>(args)...);
  }
};

}  // namespace rk::emu

// Warp operations. Each is one warp-wide exchange: the calling lanes must be every
// live lane of the warp and must all be at the same call site.
#define __shfl_sync(...) ::rk::emu::shfl_idx(RK_EMU_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) ::rk::emu::shfl_up(RK_EMU_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) ::rk::emu::shfl_down(RK_EMU_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) ::rk::emu::shfl_xor(RK_EMU_SITE, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::rk::emu::ballot(RK_EMU_SITE, mask, pred)
#define __any_sync(mask, pred) (::rk::emu::ballot(RK_EMU_SITE, mask, pred) != 0u)
#define __all_sync(mask, pred) ::rk::emu::all(RK_EMU_SITE, mask, pred)
#define __syncwarp(...) ::rk::emu::syncwarp(RK_EMU_SITE __VA_OPT__(, ) __VA_ARGS__)

namespace rk::emu {

// Source lane within a segment of `width` lanes (width a power of two <= 32).
inline int segment_base(int width) { return lane_id() & ~(width - 1); }

template <typename T>
T shfl_idx(const char* site, unsigned mask, T var, int src, int width = 32) {
  return warp_op(mask, var, segment_base(width) + (src & (width - 1)), site);
}

template <typename T>
T shfl_up(const char* site, unsigned mask, T var, unsigned delta, int width = 32) {
  int in_segment = (lane_id() & (width - 1)) - static_cast<int>(delta);
  return warp_op(mask, var, in_segment >= 0 ? lane_id() - static_cast<int>(delta) : lane_id(), site);
}

template <typename T>
T shfl_down(const char* site, unsigned mask, T var, unsigned delta, int width = 32) {
  int in_segment = (lane_id() & (width - 1)) + static_cast<int>(delta);
  return warp_op(mask, var, in_segment < width ? lane_id() + static_cast<int>(delta) : lane_id(), site);
}

template <typename T>
T shfl_xor(const char* site, unsigned mask, T var, int lane_mask, int width = 32) {
  int src = lane_id() ^ lane_mask;
  return warp_op(mask, var, (src & ~(width - 1)) == segment_base(width) ? src : lane_id(), site);
}

// Bits of the live lanes whose predicate is non-zero; also returns the live mask.
inline unsigned ballot_live(const char* site, unsigned mask, int pred, unsigned* live) {
  const int mine = pred != 0;
  unsigned result = 0;
  *live = exchange(mask, &mine, sizeof(mine), [&](const WarpSlots& slots, unsigned lanes) {
    for (int lane = 0; lane < 32; ++lane) {
      int theirs;
      std::memcpy(&theirs, slots[lane], sizeof(theirs));
      if ((lanes >> lane & 1u) && theirs) result |= 1u << lane;
    }
  }, site);
  return result;
}

inline unsigned ballot(const char* site, unsigned mask, int pred) {
  unsigned live;
  return ballot_live(site, mask, pred, &live);
}

inline bool all(const char* site, unsigned mask, int pred) {
  unsigned live;
  return ballot_live(site, mask, pred, &live) == live;
}

inline void syncwarp(const char* site, unsigned mask = 0xffffffffu) {
  unsigned live;
  ballot_live(site, mask, 0, &live);
}

}  // namespace rk::emu

// Atomics: std::atomic_ref on the host (real atomics for the threads back-end).
namespace rk::emu {

template <typename T, typename F>
T atomic_update(T* address, F update) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (!ref.compare_exchange_weak(old, update(old))) {
  }
  return old;
}

// 16-bit floating types: a compare-and-swap loop on the raw bits.
template <typename T, typename ToFloat, typename FromFloat>
T atomic_add_16(T* address, T value, ToFloat to_float, FromFloat from_float) {
  static_assert(sizeof(T) == 2);
  auto* bits = reinterpret_cast<uint16_t*>(address);
  uint16_t old = atomic_update(bits, [&](uint16_t cur) {
    T cur_value;
    std::memcpy(static_cast<void*>(&cur_value), &cur, 2);
    T sum = from_float(to_float(cur_value) + to_float(value));
    uint16_t out;
    std::memcpy(&out, static_cast<const void*>(&sum), 2);
    return out;
  });
  T result;
  std::memcpy(static_cast<void*>(&result), &old, 2);
  return result;
}

}  // namespace rk::emu

template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
inline __half atomicAdd(__half* address, __half value) {
  return ::rk::emu::atomic_add_16(address, value, [](__half h) { return __half2float(h); },
                                  [](float f) { return __float2half_rn(f); });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* address, __nv_bfloat16 value) {
  return ::rk::emu::atomic_add_16(address, value,
                                  [](__nv_bfloat16 h) { return __bfloat162float(h); },
                                  [](float f) { return __float2bfloat16_rn(f); });
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline T atomicSub(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_sub(value);
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline T atomicMax(T* address, T value) {
  return ::rk::emu::atomic_update(address, [&](T cur) { return cur < value ? value : cur; });
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline T atomicMin(T* address, T value) {
  return ::rk::emu::atomic_update(address, [&](T cur) { return value < cur ? value : cur; });
}
template <typename T>
inline T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value);
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;  // the old value either way
}

#endif  // __CUDACC__
