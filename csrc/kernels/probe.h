// Torch-free interface of the calibration probe (csrc/kernels/probe.cuh).
#pragma once

namespace rk {

constexpr int kProbeThreads = 128;

// out: blocks * kProbeThreads floats. `stream` as in conv_fwd.h.
void launch_mma_probe(float* out, int blocks, int iterations, void* stream);
// The multiply-adds one launch performs.
long mma_probe_macs(int blocks, int iterations);

}  // namespace rk
