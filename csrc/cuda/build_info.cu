// Records, from the compiler itself, which CUDA version and architectures were
// compiled into resnext_kernels._C. Torch-free: nvcc compiles it in seconds.
#include <cuda_runtime_api.h>

#include "build_info.h"

namespace resnext_kernels {

CudaBuildInfo cuda_build_info() {
  CudaBuildInfo info;
  info.cuda_runtime_version = CUDART_VERSION;
  info.nvcc_version = 1000 * __CUDACC_VER_MAJOR__ + 10 * __CUDACC_VER_MINOR__;
  // nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) in every compilation pass.
  info.archs = {__CUDA_ARCH_LIST__};
  return info;
}

}  // namespace resnext_kernels
