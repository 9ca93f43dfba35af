// Torch glue of the forward and backward kernels (csrc/kernels/conv_fwd.cuh,
// conv_bwd.cuh), compiled twice:
//
//   * into resnext_kernels._C (nvcc kernels): the CUDA implementation of
//     resnext_kernels::conv_bn_relu_cuda and its _backward, _backward_reduce and
//     _backward_apply ops;
//   * with RESNEXT_EMULATED into resnext_kernels._C_emulated (the same kernels
//     compiled by g++ against the host SIMT emulator): the CPU implementation of
//     the resnext_kernels::conv_bn_relu_cuda_emulated ops.
//
// The op schemas are defined in Python (resnext_kernels/ops.py); this file only
// registers implementations. The Python layer has already validated the arguments
// (resnext_kernels.functional.check_arguments); the checks here guard direct calls
// of the op and name the argument.
#include <ATen/record_function.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>

#include "kernels/conv_bwd.h"
#include "kernels/conv_fwd.h"
#include "kernels/probe.h"

#ifdef RESNEXT_EMULATED
#include "emu/count_types.h"
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

// How the backward's reduce pass gets x̂ (csrc/kernels/conv_bwd.h): "recover" from
// the saved output or "recompute" the conv, from RESNEXT_BWD_XHAT (read at each
// call). Unset: recompute. Recovering saves a conv pass but puts one estimate of x̂
// in the sums and another (recomputed) in dc; in fp16/bf16 that cost 3x PyTorch's
// accuracy in dγ. Whether the saved pass is worth it in fp32 is for a GPU
// measurement to say (docs/kernels.md).
bool recover_xhat() {
  const char* value = std::getenv("RESNEXT_BWD_XHAT");
  if (value == nullptr) return false;
  if (std::strcmp(value, "recover") == 0) return true;
  RK_CHECK(std::strcmp(value, "recompute") == 0,
           "RESNEXT_BWD_XHAT must be recover or recompute; got '", value, "'");
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

void check_nchw(const char* name, const at::Tensor& t, at::IntArrayRef shape,
                const at::Tensor& input) {
  RK_CHECK(t.sizes() == shape, name, " must have shape ", shape, "; got ", t.sizes());
  RK_CHECK(t.scalar_type() == input.scalar_type() && t.device() == input.device(), name,
           " must match the input's dtype and device");
}

#ifdef RESNEXT_EMULATED
// Tests run here: poison what the kernels must write, so unwritten elements show.
// Under the profiler its fill is the child of this scope, which the performance
// model leaves out (counters.POISON_SCOPE): a GPU build does not run it. While
// resnext-bench predict counts, each launch runs only a window of its grid, so later
// kernels read what skipped blocks never wrote: zeros there, as NaN would send
// data-dependent paths (the packed groups' non-finite reruns) where a real run
// never goes.
void poison(at::Tensor& t) {
  RECORD_FUNCTION("resnext_kernels::poison", std::vector<c10::IValue>());
  t.fill_(rk::emu::counting() ? 0.0 : std::numeric_limits<double>::quiet_NaN());
}
#else
void poison(at::Tensor&) {}
#endif

// The checked shapes of one call and the kernels' view of its input and weight:
// input as NHWC, weight as [C_out, 3, 3, C_in / groups].
struct Conv {
  at::Tensor x, w_ohwi;
  int64_t n, c_in, h, w, c_out, h_out, w_out;
  rk::ConvFwdParams p{};
  void* stream = nullptr;
#ifndef RESNEXT_EMULATED
  std::optional<c10::cuda::CUDAGuard> guard;
#endif

  Conv(const at::Tensor& input, const at::Tensor& weight, int64_t stride, int64_t groups) {
    p.dtype = kernel_dtype(input);
    RK_CHECK(input.dim() == 4, "input must be 4-D [N, C, H, W]; got ", input.sizes());
    RK_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2; got ", stride);
    RK_CHECK(groups > 0 && input.size(1) % groups == 0, "groups=", groups,
             " must be positive and divide the input channels ", input.size(1));
    n = input.size(0), c_in = input.size(1), h = input.size(2), w = input.size(3);
    c_out = weight.size(0);
    RK_CHECK(weight.dim() == 4 && weight.size(1) == c_in / groups && weight.size(2) == 3 &&
                 weight.size(3) == 3 && c_out % groups == 0,
             "weight must have shape [C_out, ", c_in / groups,
             ", 3, 3] with C_out divisible by ", groups, "; got ", weight.sizes());
    RK_CHECK(weight.scalar_type() == input.scalar_type() && weight.device() == input.device(),
             "weight must match the input's dtype and device");
    h_out = (h - 1) / stride + 1, w_out = (w - 1) / stride + 1;
    const int64_t tiles = (std::max(c_in, c_out) / groups + rk::kCoTile - 1) / rk::kCoTile;
    RK_CHECK(groups * tiles <= 65535, "too many channel tiles (", groups * tiles,
             ") for one grid");
    RK_CHECK(n * h * w < (int64_t{1} << 31) * rk::kPixels / 2,
             "input too large: N * H * W = ", n * h * w);
    RK_CHECK(h < (int64_t{1} << 24) && w < (int64_t{1} << 24),
             "input height and width must each be below 2^24; got ", h, " x ", w);
#ifndef RESNEXT_EMULATED
    guard.emplace(input.device());
    stream = c10::cuda::getCurrentCUDAStream().stream();
#endif
    x = input.contiguous(at::MemoryFormat::ChannelsLast);
    w_ohwi = weight.permute({0, 2, 3, 1}).contiguous();
    // The tensor-core loops copy 16-byte chunks (cp.async): a view that starts off a
    // 16-byte boundary is copied first.
    if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0)
      x = x.clone(at::MemoryFormat::ChannelsLast);
    if (reinterpret_cast<uintptr_t>(w_ohwi.data_ptr()) % 16 != 0) w_ohwi = w_ohwi.clone();
    p.x = x.data_ptr();
    p.wt = w_ohwi.data_ptr();
    p.n = static_cast<int>(n);
    p.h = static_cast<int>(h);
    p.w = static_cast<int>(w);
    p.c_in = static_cast<int>(c_in);
    p.c_out = static_cast<int>(c_out);
    p.groups = static_cast<int>(groups);
    p.stride = static_cast<int>(stride);
    p.h_out = static_cast<int>(h_out);
    p.w_out = static_cast<int>(w_out);
  }

  bool empty() const { return n * h_out * w_out == 0; }
  std::vector<int64_t> out_shape() const { return {n, c_out, h_out, w_out}; }
};

at::Tensor fp32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// fp32, contiguous and 16-byte aligned: kernels read these per-channel vectors as
// float4 (a parameter may be a view at any offset).
at::Tensor fp32_aligned(const at::Tensor& t) {
  at::Tensor f = fp32(t);
  return reinterpret_cast<uintptr_t>(f.data_ptr()) % 16 == 0 ? f : f.clone();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t stride, int64_t groups, double eps,
    bool training) {
  Conv conv(input, weight, stride, groups);
  const int64_t c_out = conv.c_out;
  check_vector("bn_weight", bn_weight, c_out, input);
  check_vector("bn_bias", bn_bias, c_out, input);
  RK_CHECK(training || (running_mean.has_value() && running_var.has_value()),
           "running_mean and running_var are required when training=False");
  rk::ConvFwdParams& p = conv.p;
  at::Tensor out = at::empty(conv.out_shape(),
                             input.options().memory_format(at::MemoryFormat::ChannelsLast));
  poison(out);
  p.y = out.data_ptr();
  const auto f32 = input.options().dtype(at::kFloat);
  const at::Tensor gamma = fp32(bn_weight), beta = fp32(bn_bias);

  at::Tensor mean, var, scale, shift, running_m, running_v;
  bool written = false;  // out already holds the final values
  if (training) {
    // finalize writes every channel's statistics; with no pixels they stay (0, 1).
    mean = conv.empty() ? at::zeros({c_out}, f32) : at::empty({c_out}, f32);
    var = conv.empty() ? at::ones({c_out}, f32) : at::empty({c_out}, f32);
    poison(mean);
    poison(var);
    scale = at::empty({c_out}, f32);
    shift = at::empty({c_out}, f32);
    if (!conv.empty()) {
      const bool raw = raw_strategy(p.dtype);
      const int blocks = rk::conv_fwd_blocks_x(p);
      at::Tensor partial = at::empty({blocks, c_out, 3}, f32);
      poison(partial);
      p.partial = partial.data_ptr<float>();
      rk::launch_conv_fwd(p, raw ? rk::Pass::kStatsRaw : rk::Pass::kStats, conv.stream);
      check_launch();
      rk::FinalizeParams f{partial.data_ptr<float>(), blocks, static_cast<int>(c_out),
                           gamma.data_ptr<float>(), beta.data_ptr<float>(),
                           static_cast<float>(eps), mean.data_ptr<float>(),
                           var.data_ptr<float>(), scale.data_ptr<float>(),
                           shift.data_ptr<float>()};
      rk::launch_finalize(f, conv.stream);
      check_launch();
      if (raw) {
        p.scale = scale.data_ptr<float>();
        p.shift = shift.data_ptr<float>();
        rk::launch_normalize(p, conv.stream);
        check_launch();
        written = true;
      }
    }
  } else {
    check_vector("running_mean", *running_mean, c_out, input);
    check_vector("running_var", *running_var, c_out, input);
    // The kWrite pass folds scale and shift from the running statistics itself and
    // copies them to the returned mean and var (fresh tensors: an op's outputs never
    // alias its inputs): no torch ops between, none at all for fp32 statistics.
    running_m = fp32(*running_mean);  // live until the launch reads them
    running_v = fp32(*running_var);
    if (conv.empty()) {
      mean = running_m.clone();
      var = running_v.clone();
    } else {
      mean = at::empty({c_out}, f32);
      var = at::empty({c_out}, f32);
      poison(mean);
      poison(var);
      p.mean_out = mean.data_ptr<float>();
      p.var_out = var.data_ptr<float>();
    }
    p.bn_gamma = gamma.data_ptr<float>();
    p.bn_beta = beta.data_ptr<float>();
    p.bn_mean = running_m.data_ptr<float>();
    p.bn_var = running_v.data_ptr<float>();
    p.eps = static_cast<float>(eps);
  }
  if (!conv.empty() && !written) {
    p.scale = training ? scale.data_ptr<float>() : nullptr;
    p.shift = training ? shift.data_ptr<float>() : nullptr;
    rk::launch_conv_fwd(p, rk::Pass::kWrite, conv.stream);
    check_launch();
  }
  if (!channels_last_output(input)) out = out.contiguous();
  return {out, mean, var};
}

// ---- backward (csrc/kernels/conv_bwd.cuh) ------------------------------------

// The kernels' view of a backward call: the forward's tensors (NHWC) and the
// per-channel vectors in fp32.
struct Backward {
  Conv conv;
  at::Tensor dy, y, gamma, beta, mean, var32;
  rk::ConvBwdParams b{};

  Backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
           const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& out,
           const at::Tensor& mean_, const at::Tensor& var, int64_t stride, int64_t groups,
           double eps)
      : conv(input, weight, stride, groups) {
    const int64_t c_out = conv.c_out;
    check_nchw("grad_out", grad_out, conv.out_shape(), input);
    check_nchw("out", out, conv.out_shape(), input);
    check_vector("bn_weight", bn_weight, c_out, input);
    check_vector("bn_bias", bn_bias, c_out, input);
    check_vector("mean", mean_, c_out, input);
    check_vector("var", var, c_out, input);
    dy = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
    y = out.contiguous(at::MemoryFormat::ChannelsLast);
    gamma = fp32_aligned(bn_weight);
    beta = fp32(bn_bias);
    mean = fp32(mean_);
    var32 = fp32_aligned(var);
    b.conv = conv.p;
    b.dy = dy.data_ptr();
    b.y = y.data_ptr();
    b.gamma = gamma.data_ptr<float>();
    b.beta = beta.data_ptr<float>();
    b.mean = mean.data_ptr<float>();
    b.var = var32.data_ptr<float>();
    b.eps = static_cast<float>(eps);
    b.recover_xhat = recover_xhat();
  }

  at::TensorOptions f32() const { return conv.x.options().dtype(at::kFloat); }

  // (Σdz, Σdz·x̂) per channel: block partials from the kernel, merged in block order
  // by a second one.
  std::tuple<at::Tensor, at::Tensor> reduce() {
    if (conv.empty()) return {at::zeros({conv.c_out}, f32()), at::zeros({conv.c_out}, f32())};
    at::Tensor partial = at::empty({rk::conv_fwd_blocks_x(conv.p), conv.c_out, 2}, f32());
    at::Tensor sum_dz = at::empty({conv.c_out}, f32()), sum_dz_xhat = at::empty({conv.c_out}, f32());
    poison(partial);
    poison(sum_dz);
    poison(sum_dz_xhat);
    b.partial = partial.data_ptr<float>();
    b.sum_dz = sum_dz.data_ptr<float>();
    b.sum_dz_xhat = sum_dz_xhat.data_ptr<float>();
    rk::launch_bwd_reduce(b, conv.stream);
    check_launch();
    return {sum_dz, sum_dz_xhat};
  }

  // Input and weight gradients. With sums: dc from the batch sums over `count`
  // pixels (training; a dc pass writes dc). Without: the eval gradient
  // dc = γ·invstd·dz, formed while loading.
  std::tuple<at::Tensor, at::Tensor> apply(const std::optional<std::pair<at::Tensor, at::Tensor>>& sums,
                                           int64_t count, bool want_input, bool want_weight,
                                           const at::Tensor& input, const at::Tensor& weight) {
    at::Tensor sum_dz, sum_dz_xhat, dc;
    rk::GradSource source = rk::GradSource::kMaskedGrad;
    if (sums.has_value() && !conv.empty()) {
      sum_dz = fp32(sums->first);
      sum_dz_xhat = fp32(sums->second);
      b.sum_dz = sum_dz.data_ptr<float>();
      b.sum_dz_xhat = sum_dz_xhat.data_ptr<float>();
      b.count = static_cast<float>(count);
      dc = at::empty(conv.out_shape(),
                     conv.x.options().memory_format(at::MemoryFormat::ChannelsLast));
      poison(dc);
      b.dc = dc.data_ptr();
      rk::launch_bwd_dc(b, conv.stream);
      check_launch();
      source = rk::GradSource::kConvGrad;
    } else if (want_input && !conv.empty() &&
               rk::dgrad_as_conv(conv.p, rk::GradSource::kConvGrad)) {
      // Eval where dgrad is the forward's conv: dc as a tensor (read by wgrad too).
      dc = at::empty(conv.out_shape(),
                     conv.x.options().memory_format(at::MemoryFormat::ChannelsLast));
      poison(dc);
      b.dc = dc.data_ptr();
      rk::launch_bwd_masked_dc(b, conv.stream);
      check_launch();
      source = rk::GradSource::kConvGrad;
    }
    at::Tensor grad_input = input.new_empty({0}), grad_weight = weight.new_empty({0});
    if (want_input) {
      grad_input = at::empty({conv.n, conv.c_in, conv.h, conv.w},
                             conv.x.options().memory_format(at::MemoryFormat::ChannelsLast));
      poison(grad_input);
      if (!conv.empty()) {
        at::Tensor wt_dgrad;
        if (rk::dgrad_as_conv(b.conv, source)) {  // OHWI [G, o, 3, 3, i] -> [G, i, 3, 3, o], flipped
          const int64_t g = conv.p.groups, cg = conv.c_in / g;
          wt_dgrad = conv.w_ohwi.view({g, cg, 3, 3, cg}).flip({2, 3}).permute({0, 4, 2, 3, 1})
                         .contiguous();
          b.wt_dgrad = wt_dgrad.data_ptr();
        }
        b.dx = grad_input.data_ptr();
        rk::launch_bwd_dgrad(b, source, conv.stream);
        check_launch();
      } else {
        grad_input.zero_();
      }
      if (!channels_last_output(input)) grad_input = grad_input.contiguous();
    }
    if (want_weight) {
      const int64_t k_size = 9 * (conv.c_in / conv.p.groups);
      at::Tensor dw;
      if (conv.empty()) {
        dw = at::zeros({conv.c_out, k_size}, f32());
      } else {
        b.wgrad_chunks = rk::wgrad_chunks(conv.p);
        b.deterministic = at::globalContext().deterministicAlgorithms();
        if (b.deterministic) {
          at::Tensor partial = at::empty({b.wgrad_chunks, conv.c_out, k_size}, f32());
          poison(partial);
          b.dw = partial.data_ptr<float>();
          rk::launch_bwd_wgrad(b, source, conv.stream);
          check_launch();
          dw = partial.sum(0);
        } else {
          dw = at::zeros({conv.c_out, k_size}, f32());
          b.dw = dw.data_ptr<float>();
          rk::launch_bwd_wgrad(b, source, conv.stream);
          check_launch();
        }
      }
      grad_weight = dw.view({conv.c_out, 3, 3, k_size / 9})
                        .permute({0, 3, 1, 2})
                        .to(weight.scalar_type())
                        .contiguous();
    }
    return {grad_input, grad_weight};
  }
};

int64_t batch_count(const Backward& bw) { return bw.conv.n * bw.conv.h_out * bw.conv.w_out; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& out,
    const at::Tensor& mean, const at::Tensor& var, int64_t stride, int64_t groups, double eps,
    bool training, std::array<bool, 4> output_mask) {
  Backward bw(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride, groups, eps);
  const bool want_conv = output_mask[0] || output_mask[1];
  std::optional<std::pair<at::Tensor, at::Tensor>> sums;
  if (output_mask[2] || output_mask[3] || (training && want_conv)) {
    auto [sum_dz, sum_dz_xhat] = bw.reduce();
    sums.emplace(sum_dz, sum_dz_xhat);
  }
  at::Tensor grad_input = input.new_empty({0}), grad_weight = weight.new_empty({0});
  if (want_conv) {
    std::tie(grad_input, grad_weight) =
        bw.apply(training ? sums : std::nullopt, std::max<int64_t>(batch_count(bw), 1),
                 output_mask[0], output_mask[1], input, weight);
  }
  const at::Tensor grad_bn_weight =
      output_mask[2] ? sums->second.to(bn_weight.scalar_type()) : bn_weight.new_empty({0});
  const at::Tensor grad_bn_bias =
      output_mask[3] ? sums->first.to(bn_bias.scalar_type()) : bn_bias.new_empty({0});
  return {grad_input, grad_weight, grad_bn_weight, grad_bn_bias};
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& out,
    const at::Tensor& mean, const at::Tensor& var, int64_t stride, int64_t groups, double eps) {
  Backward bw(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride, groups, eps);
  return bw.reduce();
}

std::tuple<at::Tensor, at::Tensor> backward_apply(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& out,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& sum_dz,
    const at::Tensor& sum_dz_xhat, int64_t count, int64_t stride, int64_t groups, double eps,
    std::array<bool, 2> output_mask) {
  Backward bw(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride, groups, eps);
  check_vector("sum_dz", sum_dz, bw.conv.c_out, input);
  check_vector("sum_dz_xhat", sum_dz_xhat, bw.conv.c_out, input);
  RK_CHECK(count > 0, "count must be positive; got ", count);
  return bw.apply(std::make_pair(sum_dz, sum_dz_xhat), count, output_mask[0], output_mask[1],
                  input, weight);
}

// The calibration probe (csrc/kernels/probe.cuh): `blocks` blocks of mma.sync loops
// into out (blocks x kProbeThreads floats); returns the multiply-adds launched.
int64_t mma_probe(at::Tensor& out, int64_t blocks, int64_t iterations) {
  RK_CHECK(blocks > 0 && iterations > 0, "blocks and iterations must be positive; got ",
           blocks, " and ", iterations);
  RK_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() &&
               out.numel() == blocks * rk::kProbeThreads,
           "out must be a contiguous float32 tensor of ", blocks * rk::kProbeThreads,
           " elements");
  void* stream = nullptr;
#ifndef RESNEXT_EMULATED
  c10::cuda::CUDAGuard guard(out.device());
  stream = c10::cuda::getCurrentCUDAStream().stream();
#endif
  rk::launch_mma_probe(out.data_ptr<float>(), static_cast<int>(blocks),
                       static_cast<int>(iterations), stream);
  check_launch();
  return rk::mma_probe_macs(static_cast<int>(blocks), static_cast<int>(iterations));
}

}  // namespace

TORCH_LIBRARY_IMPL(resnext_kernels, RK_DISPATCH_KEY, m) {
  m.impl("mma_probe", &mma_probe);
  m.impl("conv_bn_relu_" RK_BACKEND, &forward);
  m.impl("conv_bn_relu_" RK_BACKEND "_backward", &backward);
  m.impl("conv_bn_relu_" RK_BACKEND "_backward_reduce", &backward_reduce);
  m.impl("conv_bn_relu_" RK_BACKEND "_backward_apply", &backward_apply);
}

}  // namespace resnext_kernels

#ifdef RESNEXT_EMULATED
namespace {

template <typename T>
py::bytes as_bytes(const std::vector<T>& v) {
  return py::bytes(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// Each counted launch as a dict (resnext_kernels/bench/count_cuda.py reads it).
py::list count_end() {
  py::list out;
  for (const rk::emu::LaunchCounts& l : rk::emu::count_end()) {
    py::dict d;
    d["kernel"] = l.kernel;
    d["grid"] = py::make_tuple(l.grid[0], l.grid[1], l.grid[2]);
    d["threads"] = l.threads;
    d["blocks"] = l.blocks;
    d["counted_blocks"] = l.counted_blocks;
    d["warmup_blocks"] = l.warmup_blocks;
    d["window_start"] = l.window_start;
    d["global_requests"] = l.global_requests;
    d["global_sectors"] = l.global_sectors;
    d["global_bytes"] = l.global_bytes;
    d["global_wavefronts"] = l.global_wavefronts;
    d["smem_wavefronts"] = l.smem_wavefronts;
    d["smem_ideal_wavefronts"] = l.smem_ideal_wavefronts;
    d["mma"] = l.mma;
    d["executed_macs"] = l.executed_macs;
    d["useful_macs"] = l.useful_macs;
    d["fma"] = l.fma;
    d["atomics"] = l.atomics;
    d["sector"] = as_bytes(l.sector);
    d["kind"] = as_bytes(l.kind);
    d["counted"] = as_bytes(l.counted);
    d["weight"] = as_bytes(l.weight);
    out.append(d);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The CUDA kernels compiled for the host SIMT emulator (tests and resnext-bench predict)";
  m.def(
      "count_begin",
      [](long window_blocks, long warmup_blocks, long max_iterations) {
        rk::emu::CountConfig c;
        c.window_blocks = window_blocks;
        c.warmup_blocks = warmup_blocks;
        c.max_iterations = max_iterations;
        rk::emu::count_begin(c);
      },
      "Count every launch from now on: `window_blocks` blocks of each grid after "
      "`warmup_blocks` warm-up blocks, persistent loops cut to `max_iterations` (0: all).",
      py::arg("window_blocks"), py::arg("warmup_blocks"), py::arg("max_iterations"));
  m.def("count_end", &count_end, "Stop counting; one dict per launch since count_begin.");
}
#endif
