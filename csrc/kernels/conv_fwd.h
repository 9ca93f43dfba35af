// Torch-free interface of the forward kernels (csrc/kernels/conv_fwd.cuh): the
// params structs and the launchers, for the torch glue (csrc/conv_bn_relu.cpp).
#pragma once

namespace rk {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Division by a divisor fixed for a launch as a multiply-high, an add and a shift
// (Granlund and Montgomery's method for invariant divisors): for 0 <= n < 2^31,
// n / d == (umulhi(n, mul) + n) >> shift. A run-time `/` costs a ~20-instruction
// sequence (and a 64-bit one a call); the launchers set these on the host.
struct FastDiv {
  unsigned d = 1, mul = 1, shift = 0;

  static FastDiv of(unsigned d) {
    FastDiv f;
    if (d == 0) return f;  // an empty shape: nothing is launched
    f.d = d;
    while ((1ull << f.shift) < d) ++f.shift;  // ceil(log2 d)
    f.mul = static_cast<unsigned>((((1ull << f.shift) - d) << 32) / d + 1);
    return f;
  }
#if defined(__CUDACC__)
  __host__ __device__
#endif
  int operator()(int n) const {
    const unsigned u = static_cast<unsigned>(n);
    return static_cast<int>((static_cast<unsigned>((static_cast<unsigned long long>(u) * mul) >> 32) + u) >>
                            shift);
  }
};

// The run-time divisors of the conv kernels' pixel indexing (see set_divisors).
struct Divisors {
  FastDiv w_out, h_out;
  FastDiv width;  // staged columns, W + 2
  FastDiv rows;   // staged rows per image, (H_out - 1)·stride + 3
};

struct ConvFwdParams {
  const void* x;        // input [N, H, W, C_in] (NHWC), dtype
  const void* wt;       // weight [C_out, 3, 3, C_in / groups], dtype
  void* y;              // output [N, H_out, W_out, C_out] (NHWC), dtype
  const float* scale;   // [C_out]: y = relu(conv * scale + shift); or nullptr (eval):
  const float* shift;   // [C_out]   the kWrite pass folds them from the four below
  const float* bn_gamma;  // [C_out] scale = gamma / sqrt(var + eps), shift =
  const float* bn_beta;   // [C_out]   beta - mean * scale, once per block and channel
  const float* bn_mean;   // [C_out] running statistics, fp32
  const float* bn_var;    // [C_out]
  float* mean_out;        // [C_out] eval: the blocks of pixel block 0 copy bn_mean and
  float* var_out;         //   bn_var here (the statistics the op returns); or nullptr
  float eps;
  float* partial;       // [blocks_x, C_out, 3]: per pixel block (count, mean, M2) (training)
  int n, h, w, c_in, c_out, groups, stride, h_out, w_out;
  DType dtype;
  Divisors div;  // set by the launchers from the shape above
};

// `p` with its divisors set from its shape.
inline ConvFwdParams set_divisors(ConvFwdParams p) {
  p.div = {FastDiv::of(p.w_out), FastDiv::of(p.h_out), FastDiv::of(p.w + 2),
           FastDiv::of((p.h_out - 1) * p.stride + 3)};
  return p;
}

struct FinalizeParams {
  const float* partial;  // [blocks, C_out, 3] from the statistics pass
  int blocks, c_out;
  const float* gamma;    // [C_out] BatchNorm weight, fp32
  const float* beta;     // [C_out] BatchNorm bias, fp32
  float eps;
  float* mean;           // [C_out] out: batch mean
  float* var;            // [C_out] out: biased batch variance
  float* scale;          // [C_out] out: gamma * rsqrt(var + eps)
  float* shift;          // [C_out] out: beta - mean * scale
};

// What a conv pass does after its main loop.
enum class Pass {
  kStats,     // per-block (count, mean, M2) partials only (training, strategy "recompute")
  kStatsRaw,  // partials and the raw conv output into y (training, strategy "raw")
  kWrite,     // y = relu(conv * scale + shift) (eval; second pass of "recompute")
  kConv,      // the raw conv output into y, no statistics: the backward's dgrad at
              // stride 1 on tensor cores (launch_bwd_dgrad; fp16/bf16 at the
              // tensor-core widths and stride 1 only, std::invalid_argument otherwise)
  kConvUp,    // kConv of x upsampled by 2 with zeros (x has ((H + 1) / 2, (W + 1) / 2)
              // pixels, H x W the conv's input): the backward's dgrad at stride 2
};

constexpr int kPixels = 128;  // threads per block, one output pixel each
constexpr int kCoTile = 16;   // output channels per block

// Launch a conv pass, the statistics merge, or the in-place normalise + ReLU of a
// raw output (y = relu(y * scale + shift)). `stream` is a cudaStream_t (ignored by
// the emulator, whose launches run to completion). Defined once per library in
// conv_fwd.cuh.
void launch_conv_fwd(const ConvFwdParams& p, Pass pass, void* stream);
void launch_finalize(const FinalizeParams& f, void* stream);
void launch_normalize(const ConvFwdParams& p, void* stream);

// Pixel blocks of a conv pass (grid.x); also the number of per-block partials the
// statistics and the backward's sums merge.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int conv_fwd_blocks_x(const ConvFwdParams& p) {
  const long pixels = static_cast<long>(p.n) * p.h_out * p.w_out;
  return static_cast<int>((pixels + kPixels - 1) / kPixels);
}

}  // namespace rk
