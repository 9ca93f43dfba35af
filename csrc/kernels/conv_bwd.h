// Torch-free interface of the backward kernels (csrc/kernels/conv_bwd.cuh): the
// params struct and the launchers, for the torch glue (csrc/conv_bn_relu.cpp).
#pragma once

#include "kernels/conv_fwd.h"

namespace rk {

// Notation: c = conv(x) (recomputed, never saved), x̂ = (c − mean)·invstd with
// invstd = rsqrt(var + eps) (fp32, as the eval forward folds it), y = relu(γ·x̂ + β)
// (the saved forward output), dz = dy·[y > 0] (ReLU + BN-affine gradient), dc the
// gradient of c:
//   dc = dz_scale·dz − dc_shift − dc_xhat·x̂,
// with dz_scale = γ·invstd and, in training, dc_shift = dz_scale·Σdz/M and
// dc_xhat = dz_scale·Σdz·x̂/M (M = count = N·H_out·W_out, or the global batch's
// pixels when the sums are all-reduced); in eval both are 0. The kernels form these
// per-channel constants themselves (no torch ops between the launches).
struct ConvBwdParams {
  ConvFwdParams conv;    // x, wt (OHWI), shapes and dtype of the forward; conv.y unused
  const void* dy;        // gradient of the output [N, H_out, W_out, C_out] (NHWC), dtype
  const void* y;         // the forward's output, same layout
  const float* gamma;    // [C_out] BatchNorm weight
  const float* beta;     // [C_out] BatchNorm bias
  const float* mean;     // [C_out] the statistics the forward normalised with
  const float* var;      // [C_out]
  float eps;
  float* sum_dz;         // [C_out] Σdz: written by the reduce pass, read by the dc pass
  float* sum_dz_xhat;    // [C_out] Σdz·x̂: likewise
  float count;           // M, the pixels the sums run over (dc pass)
  void* dc;              // [N, H_out, W_out, C_out] dtype: dc, written by the dc pass (training)
  void* dx;              // [N, H, W, C_in] dtype: the input gradient
  const void* wt_dgrad;  // [C_in, 3, 3, C_out/groups] dtype: each group's weights
                         // transposed, the taps flipped: wt_dgrad[g·Cg + i][kh][kw][o] =
                         // wt[g·Cg + o][2 − kh][2 − kw][i] (read where dgrad_as_conv)
  float* dw;             // fp32 weight gradient, OHWI: [C_out, 9·C_in/groups] (atomic), or
                         // [wgrad_chunks, C_out, 9·C_in/groups] partials (deterministic)
  float* partial;        // [conv_fwd_blocks_x, C_out, 2]: per block (Σdz, Σdz·x̂) (reduce's
                         // scratch)
  int wgrad_chunks;      // blocks along the pixels in wgrad (grid.x), see wgrad_chunks()
  bool deterministic;    // wgrad writes per-chunk partials instead of float atomics
  bool recover_xhat;     // reduce recovers x̂ from y where it can (see below), else
                         // recomputes c for every channel
};

// Where dgrad and wgrad take dc from.
enum class GradSource {
  kConvGrad,    // the dc tensor written by the dc pass (training)
  kMaskedGrad,  // formed while loading: dz_scale·dy·[y > 0] (eval: dc_shift = dc_xhat = 0)
};

// With recover_xhat, the reduce pass recovers x̂ from the saved output,
// x̂ = (y − β)/γ where y > 0 (the only pixels whose dz is non-zero), for channels
// with |γ| ≥ kRecoverMinGamma and |β| ≤ kRecoverMaxRatio·|γ|: there the rounding of
// y costs at most (|x̂| + kRecoverMaxRatio) units of y's precision. Channel tiles
// holding any other channel (γ ≈ 0, or β dominating) recompute c instead. The glue
// recomputes by default (RESNEXT_BWD_XHAT=recover opts in): recovered x̂ in the sums
// next to recomputed x̂ in dc lost accuracy against PyTorch in fp16/bf16
// (docs/kernels.md).
constexpr float kRecoverMinGamma = 1e-3f;
constexpr float kRecoverMaxRatio = 4.0f;

// The most floats the deterministic wgrad partials may take (64 MiB).
constexpr long kWgradPartialFloats = 16L << 20;

// Σdz and Σdz·x̂ per channel into b.sum_dz and b.sum_dz_xhat: per-block partials into
// b.partial (conv_fwd_blocks_x(b.conv) blocks), then merged in block order in fp64
// (a second launch; deterministic).
void launch_bwd_reduce(const ConvBwdParams& b, void* stream);
// dc into b.dc (training), recomputing the conv, from b.sum_dz, b.sum_dz_xhat, b.count.
void launch_bwd_dc(const ConvBwdParams& b, void* stream);
// Eval's dc = dz_scale·dy·[y > 0] into b.dc, where dgrad_as_conv(p, kConvGrad) (the
// conv reads dc as a tensor): fp16/bf16, C_out a multiple of 8 (std::invalid_argument
// otherwise).
void launch_bwd_masked_dc(const ConvBwdParams& b, void* stream);
// The input gradient into b.dx: a grouped transposed conv of dc. Where the forward
// runs on tensor cores only from a dc tensor (kConvGrad; std::invalid_argument for
// kMaskedGrad there: launch_bwd_masked_dc first).
void launch_bwd_dgrad(const ConvBwdParams& b, GradSource source, void* stream);
// Whether launch_bwd_dgrad runs the forward's tensor-core conv of dc with
// b.wt_dgrad: a transposed conv is the stride-1 conv with each group's weights
// transposed and the taps flipped, of dc itself at stride 1 (Pass::kConv) and of dc
// upsampled by 2 with zeros at stride 2 (Pass::kConvUp). For a dc tensor (training,
// or eval after launch_bwd_masked_dc), fp16/bf16 at the widths the forward runs on
// tensor cores. std::invalid_argument there without b.wt_dgrad.
bool dgrad_as_conv(const ConvFwdParams& p, GradSource source);
// The weight gradient into b.dw (see ConvBwdParams::dw): Σ over pixels of x ⋆ dc.
void launch_bwd_wgrad(const ConvBwdParams& b, GradSource source, void* stream);

// Blocks along the pixels in wgrad: enough blocks to fill a GPU, at most one per
// pixel tile, and partials within kWgradPartialFloats.
int wgrad_chunks(const ConvFwdParams& p);

}  // namespace rk
