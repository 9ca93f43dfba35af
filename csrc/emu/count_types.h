// The emulator's access counts as the torch glue sees them (no CUDA headers): the
// counting switch of resnext-bench predict (csrc/emu/count.h does the counting).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rk::emu {

// What a counted launch did (aggregates over the counted blocks, in-loop work
// weighted by true / sampled iterations) and its L1-filtered sector trace.
struct LaunchCounts {
  std::string kernel;  // mangled symbol (dladdr), "" when unknown
  unsigned grid[3] = {1, 1, 1};
  int threads = 0;
  long blocks = 0, counted_blocks = 0, warmup_blocks = 0;
  double window_start = 0.0;  // fraction of the grid before the counted blocks
  double global_requests = 0, global_sectors = 0, global_bytes = 0, global_wavefronts = 0;
  double smem_wavefronts = 0, smem_ideal_wavefronts = 0;
  double mma = 0, executed_macs = 0, useful_macs = 0, fma = 0, atomics = 0;
  // Trace, launch order: warm-up blocks, then counted blocks; persistent blocks
  // interleaved by loop iteration, as they run.
  std::vector<int64_t> sector;
  std::vector<uint8_t> kind, counted;
  std::vector<float> weight;
};

struct CountConfig {
  bool on = false;
  long window_blocks = 0, warmup_blocks = 0;
  long max_iterations = 0;
};

// Starts counting every launch (fibers back-end; aborts under threads); clears
// what an earlier count recorded.
void count_begin(const CountConfig& config);
// Stops counting and returns one record per launch since count_begin.
std::vector<LaunchCounts> count_end();
// Whether counting is on (between count_begin and count_end).
bool counting();

}  // namespace rk::emu
