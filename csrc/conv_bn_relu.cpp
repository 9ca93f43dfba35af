// Torch glue of the forward kernels (csrc/kernels/conv_fwd.cuh), compiled twice:
//
//   * into resnext_kernels._C (nvcc kernels): the CUDA implementation of
//     resnext_kernels::conv_bn_relu_cuda;
//   * with RESNEXT_EMULATED into resnext_kernels._C_emulated (the same kernels
//     compiled by g++ against the host SIMT emulator): the CPU implementation of
//     resnext_kernels::conv_bn_relu_cuda_emulated.
//
// The op schemas are defined in Python (resnext_kernels/ops.py); this file only
// registers implementations. The Python layer has already validated the arguments
// (resnext_kernels.functional.check_arguments); the checks here guard direct calls
// of the op and name the argument.
#include <torch/extension.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "kernels/conv_fwd.h"

#ifdef RESNEXT_EMULATED
#define RK_BACKEND "cuda_emulated"
#define RK_DISPATCH_KEY CPU
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define RK_BACKEND "cuda"
#define RK_DISPATCH_KEY CUDA
#endif

#define RK_CHECK(cond, ...) \
  TORCH_CHECK_VALUE(cond, "resnext_kernels::conv_bn_relu_" RK_BACKEND ": ", __VA_ARGS__)

namespace resnext_kernels {
namespace {

rk::DType kernel_dtype(const at::Tensor& input) {
  switch (input.scalar_type()) {
    case at::kFloat: return rk::DType::kFloat32;
    case at::kHalf: return rk::DType::kFloat16;
    case at::kBFloat16: return rk::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "resnext_kernels::conv_bn_relu_" RK_BACKEND
                       ": input must be float32, float16 or bfloat16; got ", input.scalar_type());
  }
}

// The memory format of the output: the input's (as resnext_kernels.reference.memory_format_of).
bool channels_last_output(const at::Tensor& input) {
  if (input.is_contiguous()) return false;
  if (input.is_contiguous(at::MemoryFormat::ChannelsLast)) return true;
  return input.stride(1) < input.stride(3);
}

// Training strategy (csrc/kernels/conv_fwd.cuh): "raw" or "recompute", from the
// environment variable RESNEXT_TRAIN_STRATEGY (read at each call, for tests and
// benchmarks). Unset: "raw" for float32 (the conv pass is compute-bound, so
// re-running it costs more than moving the output twice more), "recompute" for
// float16/bfloat16, whose raw conv output would be rounded to 8-11 bits before
// normalising — with |mean| >> std that loses the signal (found by
// tests/test_fuzz.py). docs/kernels.md has the numbers.
bool raw_strategy(rk::DType dtype) {
  const char* value = std::getenv("RESNEXT_TRAIN_STRATEGY");
  if (value == nullptr) return dtype == rk::DType::kFloat32;
  if (std::strcmp(value, "raw") == 0) return true;
  RK_CHECK(std::strcmp(value, "recompute") == 0,
           "RESNEXT_TRAIN_STRATEGY must be raw or recompute; got '", value, "'");
  return false;
}

void check_launch() {
#ifndef RESNEXT_EMULATED
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

void check_vector(const char* name, const at::Tensor& t, int64_t c_out, const at::Tensor& input) {
  RK_CHECK(t.dim() == 1 && t.size(0) == c_out, name, " must have shape [", c_out, "]; got ",
           t.sizes());
  RK_CHECK(t.device() == input.device(), name, " must be on ", input.device(), "; got ",
           t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, int64_t groups, double eps,
    bool training) {
  const rk::DType dtype = kernel_dtype(input);
  RK_CHECK(input.dim() == 4, "input must be 4-D [N, C, H, W]; got ", input.sizes());
  RK_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2; got ", stride);
  RK_CHECK(groups > 0 && input.size(1) % groups == 0, "groups=", groups,
           " must be positive and divide the input channels ", input.size(1));
  const int64_t n = input.size(0), c_in = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t c_out = weight.size(0);
  RK_CHECK(weight.dim() == 4 && weight.size(1) == c_in / groups && weight.size(2) == 3 &&
               weight.size(3) == 3 && c_out % groups == 0,
           "weight must have shape [C_out, ", c_in / groups, ", 3, 3] with C_out divisible by ",
           groups, "; got ", weight.sizes());
  RK_CHECK(weight.scalar_type() == input.scalar_type() && weight.device() == input.device(),
           "weight must match the input's dtype and device");
  check_vector("bn_weight", bn_weight, c_out, input);
  check_vector("bn_bias", bn_bias, c_out, input);
  RK_CHECK(training || (running_mean.has_value() && running_var.has_value()),
           "running_mean and running_var are required when training=False");
  const int64_t h_out = (h - 1) / stride + 1, w_out = (w - 1) / stride + 1;
  const int64_t tiles = (c_out / groups + rk::kCoTile - 1) / rk::kCoTile;
  RK_CHECK(groups * tiles <= 65535, "too many channel tiles (", groups * tiles, ") for one grid");
  RK_CHECK(n * h_out * w_out < (int64_t{1} << 31) * rk::kPixels / 2,
           "input too large: N * H_out * W_out = ", n * h_out * w_out);

#ifdef RESNEXT_EMULATED
  void* stream = nullptr;
#else
  const c10::cuda::CUDAGuard guard(input.device());
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
#endif
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w_ohwi = weight.permute({0, 2, 3, 1}).contiguous();
  at::Tensor out = at::empty({n, c_out, h_out, w_out},
                             input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto f32 = input.options().dtype(at::kFloat);
  const at::Tensor gamma = bn_weight.to(at::kFloat).contiguous();
  const at::Tensor beta = bn_bias.to(at::kFloat).contiguous();

  rk::ConvFwdParams p{};
  p.x = x.data_ptr();
  p.wt = w_ohwi.data_ptr();
  p.y = out.data_ptr();
  p.n = static_cast<int>(n);
  p.h = static_cast<int>(h);
  p.w = static_cast<int>(w);
  p.c_in = static_cast<int>(c_in);
  p.c_out = static_cast<int>(c_out);
  p.groups = static_cast<int>(groups);
  p.stride = static_cast<int>(stride);
  p.h_out = static_cast<int>(h_out);
  p.w_out = static_cast<int>(w_out);
  p.dtype = dtype;
  const bool empty = n * h_out * w_out == 0;
#ifdef RESNEXT_EMULATED
  // Tests run here: poison what the kernels must write, so unwritten elements show.
  out.fill_(std::numeric_limits<double>::quiet_NaN());
#endif

  at::Tensor mean, var, scale, shift;
  bool written = false;  // out already holds the final values
  if (training) {
    mean = at::zeros({c_out}, f32);
    var = at::ones({c_out}, f32);
    scale = at::empty({c_out}, f32);
    shift = at::empty({c_out}, f32);
    if (!empty) {
      const bool raw = raw_strategy(dtype);
      const int blocks = rk::conv_fwd_blocks_x(p);
      at::Tensor partial = at::empty({blocks, c_out, 3}, f32);
#ifdef RESNEXT_EMULATED
      partial.fill_(std::numeric_limits<float>::quiet_NaN());
#endif
      p.partial = partial.data_ptr<float>();
      rk::launch_conv_fwd(p, raw ? rk::Pass::kStatsRaw : rk::Pass::kStats, stream);
      check_launch();
      rk::FinalizeParams f{partial.data_ptr<float>(), blocks, static_cast<int>(c_out),
                           gamma.data_ptr<float>(), beta.data_ptr<float>(),
                           static_cast<float>(eps), mean.data_ptr<float>(),
                           var.data_ptr<float>(), scale.data_ptr<float>(),
                           shift.data_ptr<float>()};
      rk::launch_finalize(f, stream);
      check_launch();
      if (raw) {
        p.scale = scale.data_ptr<float>();
        p.shift = shift.data_ptr<float>();
        rk::launch_normalize(p, stream);
        check_launch();
        written = true;
      }
    }
  } else {
    check_vector("running_mean", *running_mean, c_out, input);
    check_vector("running_var", *running_var, c_out, input);
    mean = running_mean->to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    var = running_var->to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    scale = (gamma * (var + eps).rsqrt()).contiguous();
    shift = (beta - mean * scale).contiguous();
  }
  if (!empty && !written) {
    p.scale = scale.data_ptr<float>();
    p.shift = shift.data_ptr<float>();
    rk::launch_conv_fwd(p, rk::Pass::kWrite, stream);
    check_launch();
  }
  if (!channels_last_output(input)) out = out.contiguous();
  return {out, mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnext_kernels, RK_DISPATCH_KEY, m) {
  m.impl("conv_bn_relu_" RK_BACKEND, &forward);
}

}  // namespace resnext_kernels

#ifdef RESNEXT_EMULATED
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The CUDA forward kernels compiled for the host SIMT emulator (tests only)";
}
#endif
