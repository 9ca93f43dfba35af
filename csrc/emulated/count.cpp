// The counting switch (csrc/emu/count_types.h) of the emulated kernels.
#include "emu/simt.h"

namespace rk::emu {

void count_begin(const CountConfig& config) {
  std::lock_guard<std::mutex> guard(launch_mutex());
  if (use_threads()) fail("counting accesses needs the fibers back-end", "count_begin");
  tracker.config = config;
  tracker.config.on = true;
  tracker.launches.clear();
}

bool counting() {
  std::lock_guard<std::mutex> guard(launch_mutex());
  return tracker.config.on;
}

std::vector<LaunchCounts> count_end() {
  std::lock_guard<std::mutex> guard(launch_mutex());
  tracker.config = CountConfig();
  std::vector<LaunchCounts> out;
  out.swap(tracker.launches);
  return out;
}

}  // namespace rk::emu
