// The Python module resnext_kernels._C: build information for
// resnext_kernels.available_backends() and resnext-bench. Op schemas are defined
// once, in Python (resnext_kernels/ops.py); kernel families compiled in here add
// their implementations with TORCH_LIBRARY_IMPL in their own launcher files.
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "build_info.h"

namespace py = pybind11;

namespace resnext_kernels {
namespace {

// Kernel families compiled into this library.
#ifdef RESNEXT_WITH_CUDA
const std::vector<std::string> kKernelFamilies = {"conv_fwd", "conv_bwd"};
#else
const std::vector<std::string> kKernelFamilies = {};
#endif

py::dict build_info() {
  py::dict info;
  info["torch_version"] = std::string(TORCH_VERSION);
  info["compiler"] = std::string(__VERSION__);
  info["kernel_families"] = kKernelFamilies;
#ifdef RESNEXT_WITH_CUDA
  const CudaBuildInfo cuda = cuda_build_info();
  info["with_cuda"] = true;
  info["cuda_version"] = std::to_string(cuda.cuda_runtime_version / 1000) + "." +
                         std::to_string(cuda.cuda_runtime_version % 1000 / 10);
  info["nvcc_version"] = std::to_string(cuda.nvcc_version / 1000) + "." +
                         std::to_string(cuda.nvcc_version % 1000 / 10);
  info["cuda_archs"] = cuda.archs;
#else
  info["with_cuda"] = false;
  info["cuda_version"] = py::none();
  info["nvcc_version"] = py::none();
  info["cuda_archs"] = std::vector<int>{};
#endif
  return info;
}

}  // namespace
}  // namespace resnext_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resnext_kernels native library: build information and kernel registrations";
  m.def("build_info", &resnext_kernels::build_info,
        "Versions, CUDA architectures and kernel families compiled into this library.");
}
