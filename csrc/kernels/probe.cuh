// Throughput probe for the performance model's calibration (resnext-bench device):
// every warp issues `iterations` rounds of kChains independent mma.sync m16n8k16
// (bf16 in, fp32 accumulate) on register operands and writes its accumulators, so
// the tensor-core rate of mma.sync is timed without memory traffic. One source for
// nvcc and the emulator (csrc/cuda/probe.cu, csrc/emulated/probe.cpp).
#pragma once

#include "kernels/conv_common.cuh"
#include "kernels/probe.h"

namespace rk {
namespace detail {

constexpr int kProbeChains = 4;  // independent accumulators per warp: hides the mma latency

__global__ void __launch_bounds__(kProbeThreads) mma_probe_kernel(float* out, int iterations) {
  const uint32_t seed = threadIdx.x * 2654435761u;
  uint32_t a[4], b[2];
  for (int i = 0; i < 4; ++i) a[i] = (seed >> i) & 0x3f803f80u;  // bf16 pairs in [0, 2)
  for (int i = 0; i < 2; ++i) b[i] = (seed >> (i + 4)) & 0x3f803f80u;
  float acc[kProbeChains][4] = {};
  for (int it = 0; it < iterations; ++it)
#pragma unroll
    for (int c = 0; c < kProbeChains; ++c) mma_m16n8k16<__nv_bfloat16>(acc[c], a, b);
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < kProbeChains; ++c)
#pragma unroll
    for (int i = 0; i < 4; ++i) sum += acc[c][i];
  store_global(out + static_cast<long>(blockIdx.x) * kProbeThreads + threadIdx.x, sum);
}

}  // namespace detail

void launch_mma_probe(float* out, int blocks, int iterations, void* stream) {
  RK_LAUNCH(detail::mma_probe_kernel, dim3(blocks), dim3(kProbeThreads), 0,
            detail::as_stream(stream))(out, iterations);
}

long mma_probe_macs(int blocks, int iterations) {
  return static_cast<long>(blocks) * (kProbeThreads / 32) * iterations * detail::kProbeChains *
         16 * 8 * 16;
}

}  // namespace rk
