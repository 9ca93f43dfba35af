// Build information of resnext_kernels._C, kept free of torch headers so that
// the CUDA translation units can provide their part without including torch.
#pragma once

#include <vector>

namespace resnext_kernels {

// What nvcc compiled into this library. Defined in csrc/cuda/build_info.cu, so it
// exists only when the CUDA sources are built (RESNEXT_WITH_CUDA).
struct CudaBuildInfo {
  int cuda_runtime_version;  // CUDART_VERSION, e.g. 13000 for CUDA 13.0
  int nvcc_version;          // 1000 * major + 10 * minor of the compiling nvcc
  std::vector<int> archs;    // __CUDA_ARCH_LIST__: 800, 900, ... as compiled
};

CudaBuildInfo cuda_build_info();

}  // namespace resnext_kernels
