// Access tracking of the host SIMT emulator (fibers back-end), included by simt.h.
//
// Every device-memory access of a kernel goes through the helpers of
// csrc/kernels/access.cuh, which call rk::emu::access() here. Two uses:
//
//   * Uniformity (always on under the fibers back-end): the i-th access of every lane
//     of a warp must come from the same call site, and at each __syncthreads and warp
//     operation the warp's live lanes must have issued the same number of accesses.
//     A lane that skips an access (instead of issuing it predicated off) aborts with
//     both sites. On a GPU such a warp splits into divergent instructions; here it
//     would also make the grouping of accesses into warp instructions wrong.
//   * Counting (between count_begin and count_end, for resnext-bench predict): the
//     i-th accesses of a warp's lanes form one warp instruction; per launch the
//     emulator totals requests, 32-byte sectors, bytes asked for, 128-byte lines,
//     shared-memory wavefronts (by the per-phase bank rules below) against the
//     conflict-free ideal, mma and FMA work and atomics, and keeps each block's
//     distinct sectors in first-touch order (a per-block L1 model) as a trace for
//     the L2 model (resnext_kernels/bench/counters.py). Only a contiguous window of
//     the grid runs: warm-up blocks (their sectors prime the L2 model, nothing else
//     counts) then the counted blocks, centred in the grid; persistent loops run at
//     most `max_iterations` iterations, and what a block does inside the loop is
//     weighted by true / sampled iterations.
#pragma once

#include <dlfcn.h>

#include "emu/count_types.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <cstring>
#include <utility>
#include <unordered_map>
#include <vector>

namespace rk::emu {

enum class Space : uint8_t { kGlobal, kShared };
// Trace kind bits (resnext_kernels/bench/counters.py: READ, WRITE, ATOMIC).
enum Op : uint8_t { kLoad = 1, kStore = 2, kAtomic = 4 };

// Shared-memory wavefronts of one warp instruction in which the lanes of `mask` each
// access `bytes` (1..16) bytes at addr[lane]. Accesses of up to 4 bytes are served
// for the whole warp in one phase, 8-byte accesses per half warp and 16-byte ones per
// quarter warp; within a phase each of the 32 banks (4-byte words) serves one
// distinct word per wavefront, lanes reading the same word share it.
inline int smem_wavefronts(const uint64_t* addr, int bytes, uint32_t mask) {
  const int per_phase = bytes <= 4 ? 32 : bytes <= 8 ? 16 : 8;
  int total = 0;
  for (int p0 = 0; p0 < 32; p0 += per_phase) {
    uint64_t words[32][32];  // distinct words per bank (at most 32 lanes x 4 words)
    int per_bank[32] = {};
    int worst = 0;
    for (int lane = p0; lane < p0 + per_phase; ++lane) {
      if (!(mask >> lane & 1u)) continue;
      for (uint64_t w = addr[lane] / 4; w <= (addr[lane] + bytes - 1) / 4; ++w) {
        const int bank = static_cast<int>(w % 32);
        int i = 0;
        while (i < per_bank[bank] && words[bank][i] != w) ++i;
        if (i == per_bank[bank]) {  // a word this bank has not served yet in the phase
          words[bank][per_bank[bank]++] = w;
          worst = std::max(worst, per_bank[bank]);
        }
      }
    }
    total += worst;
  }
  return total;
}

// ldmatrix.x1/.x2/.x4: `matrices` 8x8 matrices of 16-bit values; lanes 8m..8m+7 give
// the 16-byte row addresses of matrix m (other lanes' addresses are ignored). Each
// matrix is one phase: a conflict-free matrix is one wavefront.
inline int ldmatrix_wavefronts(const uint64_t* addr, int matrices) {
  int total = 0;
  for (int m = 0; m < matrices; ++m) {
    uint64_t words[32];
    for (int row = 0; row < 8; ++row)
      for (int j = 0; j < 4; ++j) words[row * 4 + j] = addr[8 * m + row] + 4 * j;
    total += smem_wavefronts(words, 4, 0xffffffffu);
  }
  return total;
}

class Tracker {
 public:
  CountConfig config;
  std::vector<LaunchCounts> launches;

  // Called by the fibers back-end.
  void begin_launch(const void* kernel, dim3 grid, dim3 block, long* first, long* last) {
    active_ = true;
    threads_ = static_cast<int>(block.x * block.y * block.z);
    const long total = static_cast<long>(grid.x) * grid.y * grid.z;
    *first = 0;
    *last = total;
    counted_from_ = 0;
    if (!config.on) return;
    LaunchCounts l;
    Dl_info info;
    if (dladdr(reinterpret_cast<const void*>(kernel), &info) != 0 && info.dli_sname != nullptr)
      l.kernel = info.dli_sname;
    l.grid[0] = grid.x;
    l.grid[1] = grid.y;
    l.grid[2] = grid.z;
    l.threads = threads_;
    l.blocks = total;
    const long window = std::max(1L, config.window_blocks), warmup = config.warmup_blocks;
    if (total > window + warmup) {
      counted_from_ = std::clamp(total / 2 - window / 2, warmup, total - window);
      *first = counted_from_ - warmup;
      *last = counted_from_ + window;
    }
    l.warmup_blocks = counted_from_ - *first;
    l.counted_blocks = *last - counted_from_;
    l.window_start = static_cast<double>(counted_from_) / static_cast<double>(total);
    launches.push_back(std::move(l));
    entries_.clear();
    seq_ = 0;
  }

  void end_launch() {
    active_ = counting_ = counted_ = false;  // the threads back-end never counts
    if (!config.on) return;
    // Interleave persistent blocks by iteration, as they run (stable: block order within).
    std::stable_sort(entries_.begin(), entries_.end(), [](const Entry& a, const Entry& b) {
      return a.iteration < b.iteration;
    });
    LaunchCounts& l = launches.back();
    for (const Entry& e : entries_) {
      l.sector.push_back(e.sector);
      l.kind.push_back(e.kind);
      l.counted.push_back(e.counted);
      l.weight.push_back(e.weight);
    }
    entries_.clear();
  }

  void begin_block(long block) {
    warps_.assign((threads_ + 31) / 32, Warp());
    counting_ = config.on;
    counted_ = config.on && block >= counted_from_;
    block_sectors_.clear();
    // Each thread's place in a persistent loop (threads reach loop_done at different
    // times: the block's state must not leak between them).
    lanes_.assign(threads_, Lane());
  }

  void end_block(const unsigned* live) {
    segment_end(live);
    ++seq_;
  }

  // __syncthreads released (every live lane is at it): live[w] is warp w's live mask.
  void segment_end(const unsigned* live) {
    if (!active_) return;
    for (size_t w = 0; w < warps_.size(); ++w) {
      check_counts(static_cast<int>(w), live[w], "__syncthreads");
      if (counting_) flush(warps_[w]);
      warps_[w].leader.clear();
      warps_[w].instrs.clear();
      for (int& c : warps_[w].count) c = 0;
    }
  }

  // A warp operation released: the warp's live lanes must have issued equally many.
  void warp_sync(int warp, unsigned live, const char* site) {
    if (active_) check_counts(warp, live, site);
  }

  // One lane's access; `pred` false issues it predicated off (no memory touched).
  void access(Space space, Op op, const void* p, int bytes, bool pred, const char* file, int line,
              int matrices, int lane_linear) {
    if (!active_) return;
    Warp& w = warps_[lane_linear / 32];
    const int lane = lane_linear % 32;
    const size_t i = static_cast<size_t>(w.count[lane]++);
    if (i == w.leader.size()) {
      w.leader.push_back({file, line});
      if (counting_) {
        Instr in;
        in.space = space;
        in.op = op;
        in.bytes = static_cast<uint8_t>(bytes);
        in.matrices = static_cast<uint8_t>(matrices);
        in.weight = static_cast<float>(lanes_[lane_linear].weight);
        in.iteration = lanes_[lane_linear].iteration;
        w.instrs.push_back(in);
      }
    } else if (w.leader[i].line != line ||
               (w.leader[i].file != file && std::strcmp(w.leader[i].file, file) != 0)) {
      divergent_access(i, w.leader[i], file, line);
    }
    if (counting_ && pred) {
      Instr& in = w.instrs[i];
      in.mask |= 1u << lane;
      in.addr[lane] = reinterpret_cast<uint64_t>(p);
    }
  }

  // Whether the current block is counted (its work and accesses go into the totals).
  bool counted() const { return counted_; }

  // The calling thread's (`tid`: linear thread index) work and persistent loop.
  void add_mma(int tid, double executed, double useful) {
    if (!counted_) return;
    const double w = lanes_[tid].weight;
    block_.mma += w;
    block_.executed_macs += executed * w;
    block_.useful_macs += useful * w;
  }

  void add_fma(int tid, int n) {
    if (counted_) block_.fma += n * lanes_[tid].weight;
  }

  long loop_iterations(int tid, long iterations) {
    if (!counting_) return iterations;
    Lane& lane = lanes_[tid];
    if (config.max_iterations <= 0 || iterations <= config.max_iterations) {
      lane.loop_weight = 1.0;
      return iterations;
    }
    lane.loop_weight = static_cast<double>(iterations) / static_cast<double>(config.max_iterations);
    return config.max_iterations;
  }
  void loop_iteration(int tid, long it) {
    if (!counting_) return;
    lanes_[tid].iteration = it;
    lanes_[tid].weight = lanes_[tid].loop_weight;
  }
  void loop_done(int tid) {
    if (counting_) lanes_[tid].weight = 1.0;
  }

  // The counted block's aggregates, added to the launch at its end.
  void finish_block() {
    if (!counted_) {
      block_ = Totals();
      return;
    }
    LaunchCounts& l = launches.back();
    l.global_requests += block_.global_requests;
    l.global_sectors += block_.global_sectors;
    l.global_bytes += block_.global_bytes;
    l.global_wavefronts += block_.global_wavefronts;
    l.smem_wavefronts += block_.smem_wavefronts;
    l.smem_ideal_wavefronts += block_.smem_ideal_wavefronts;
    l.mma += block_.mma;
    l.executed_macs += block_.executed_macs;
    l.useful_macs += block_.useful_macs;
    l.fma += block_.fma;
    l.atomics += block_.atomics;
    block_ = Totals();
  }

 private:
  struct Site {
    const char* file;
    int line;
  };
  struct Instr {
    Space space = Space::kGlobal;
    Op op = kLoad;
    uint8_t bytes = 0, matrices = 0;
    uint32_t mask = 0;
    float weight = 1.0f;
    long iteration = 0;
    uint64_t addr[32] = {};
  };
  struct Warp {
    std::vector<Site> leader;
    std::vector<Instr> instrs;
    int count[32] = {};
  };
  struct Totals {
    double global_requests = 0, global_sectors = 0, global_bytes = 0, global_wavefronts = 0;
    double smem_wavefronts = 0, smem_ideal_wavefronts = 0;
    double mma = 0, executed_macs = 0, useful_macs = 0, fma = 0, atomics = 0;
  };
  struct Lane {
    double weight = 1.0, loop_weight = 1.0;
    long iteration = 0;
  };
  struct Entry {
    int64_t sector;
    uint8_t kind, counted;
    float weight;
    long iteration;
  };

  // Out of line, so that access() stays small (it runs once per emulated access).
  [[noreturn, gnu::cold, gnu::noinline]] static void divergent_access(size_t i, const Site& leader,
                                                                      const char* file, int line) {
    char what[512];
    std::snprintf(what, sizeof(what),
                  "divergent memory access: lanes of one warp issue different access "
                  "sequences (access %zu is %s:%d in one lane and %s:%d in another); issue "
                  "it predicated off instead of skipping it",
                  i, leader.file, leader.line, file, line);
    fail(what, file);
  }

  void check_counts(int warp, unsigned live, const char* site) {
    const Warp& w = warps_[warp];
    for (int lane = 0; lane < 32; ++lane) {
      if (!(live >> lane & 1u) || w.count[lane] == static_cast<int>(w.leader.size())) continue;
      char what[512];
      std::snprintf(what, sizeof(what),
                    "divergent memory access: lane %d of warp %d issued %d accesses before %s, "
                    "another lane %zu (the last at %s:%d); issue skipped accesses predicated off",
                    lane, warp, w.count[lane], site, w.leader.size(),
                    w.leader.empty() ? "?" : w.leader.back().file,
                    w.leader.empty() ? 0 : w.leader.back().line);
      fail(what, site);
    }
  }

  void flush(const Warp& w) {
    for (const Instr& in : w.instrs) {
      if (in.mask == 0) continue;
      const double wt = in.weight;
      if (in.space == Space::kShared) {
        const int waves = in.matrices ? ldmatrix_wavefronts(in.addr, in.matrices)
                                      : smem_wavefronts(in.addr, in.bytes, in.mask);
        if (counted_) {
          block_.smem_wavefronts += waves * wt;
          block_.smem_ideal_wavefronts +=
              (in.matrices ? in.matrices : ideal_wavefronts(in)) * wt;
        }
        continue;
      }
      uint64_t sectors[64], lines[64];
      std::pair<uint64_t, uint64_t> spans[32];
      int ns = 0, nl = 0, nb = 0;
      for (int lane = 0; lane < 32; ++lane) {
        if (!(in.mask >> lane & 1u)) continue;
        const uint64_t a = in.addr[lane], end = a + in.bytes;
        for (uint64_t s = a / 32; s <= (end - 1) / 32; ++s) sectors[ns++] = s;
        for (uint64_t l = a / 128; l <= (end - 1) / 128; ++l) lines[nl++] = l;
        spans[nb++] = {a, end};
      }
      std::sort(sectors, sectors + ns);
      ns = static_cast<int>(std::unique(sectors, sectors + ns) - sectors);
      std::sort(lines, lines + nl);
      nl = static_cast<int>(std::unique(lines, lines + nl) - lines);
      if (counted_) {
        block_.global_requests += wt;
        block_.global_sectors += ns * wt;
        block_.global_wavefronts += nl * wt;
        block_.global_bytes += distinct_bytes(spans, nb) * wt;
        if (in.op == kAtomic) block_.atomics += __builtin_popcount(in.mask) * wt;
      }
      for (int i = 0; i < ns; ++i) {
        const int64_t sector = static_cast<int64_t>(sectors[i]);
        auto [it, fresh] = block_sectors_.try_emplace(sector, entries_.size());
        if (fresh) {
          entries_.push_back({sector, in.op, static_cast<uint8_t>(counted_), in.weight,
                              in.iteration});
        } else {
          entries_[it->second].kind |= in.op;
        }
      }
    }
  }

  // Bytes covered by the union of the [begin, end) spans.
  static double distinct_bytes(std::pair<uint64_t, uint64_t>* spans, int n) {
    std::sort(spans, spans + n);
    double total = 0;
    uint64_t covered = 0;
    for (int i = 0; i < n; ++i) {
      const uint64_t from = std::max(spans[i].first, covered);
      if (spans[i].second > from) total += static_cast<double>(spans[i].second - from);
      covered = std::max(covered, spans[i].second);
    }
    return total;
  }

  static int ideal_wavefronts(const Instr& in) {
    std::pair<uint64_t, uint64_t> spans[32];
    int n = 0;
    for (int lane = 0; lane < 32; ++lane)
      if (in.mask >> lane & 1u) spans[n++] = {in.addr[lane], in.addr[lane] + in.bytes};
    const double bytes = distinct_bytes(spans, n);
    return std::max(1, static_cast<int>((bytes + 127) / 128));
  }

  bool active_ = false, counting_ = false, counted_ = false;
  int threads_ = 0;
  long counted_from_ = 0, seq_ = 0;
  std::vector<Lane> lanes_;
  std::vector<Warp> warps_;
  std::unordered_map<int64_t, size_t> block_sectors_;
  std::vector<Entry> entries_;
  Totals block_;
};

inline Tracker tracker;

// One lane's access (csrc/kernels/access.cuh); `matrices` > 0 for ldmatrix. A GPU
// faults on an access not aligned to its size (a float4 of a parameter view at an
// odd offset): so does the emulator.
[[noreturn, gnu::cold, gnu::noinline]] inline void misaligned(const void* p, int bytes,
                                                             const char* file, int line) {
  char what[160];
  std::snprintf(what, sizeof(what), "misaligned address: a %d-byte access at %p", bytes, p);
  char site[512];
  std::snprintf(site, sizeof(site), "%s:%d", file, line);
  fail(what, site);
}

inline void access(Space space, Op op, const void* p, int bytes, bool pred, const char* file,
                   int line, int matrices = 0) {
  if (pred && matrices == 0 && reinterpret_cast<uintptr_t>(p) % bytes != 0)
    misaligned(p, bytes, file, line);
  tracker.access(space, op, p, bytes, pred, file, line, matrices, linear_tid);
}

}  // namespace rk::emu
