// Forward kernels of the fused grouped 3x3 conv (padding 1) + BatchNorm + ReLU, NHWC.
//
// One source for nvcc (csrc/cuda/conv_fwd.cu) and for g++ against the host SIMT
// emulator (csrc/emulated/conv_fwd.cpp): each includes this file once, which also
// defines the launchers declared in conv_fwd.h. Torch-free: the launchers take a
// params struct of raw pointers; csrc/conv_bn_relu.cpp is the torch glue.
//
// Training uses two passes over the input (NOTES §5, strategy "statistics, then
// recompute"): conv_fwd_kernel<STATS=true> writes per-block (count, mean, M2)
// partials, finalize_kernel merges them per channel (Chan's formula, fixed order:
// deterministic and stable for |mean| >> std) into mean/var and the folded
// scale/shift, and conv_fwd_kernel<STATS=false> recomputes the conv and writes
// relu(conv * scale + shift) once. Eval folds the running statistics into
// scale/shift and runs only the second kernel.
//
// Work split: a block of kPixels threads covers kPixels output pixels (one per
// thread) and a tile of min(channels per group, kCoTile) output channels of one
// group (grid.y = groups x channel tiles); its weights sit in shared memory as
// fp32; accumulation is fp32 FMA. Tensor cores (mma.sync) are not used yet.
#pragma once

#include "emu/simt.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/conv_fwd.h"

namespace rk {

namespace detail {

template <typename T>
__device__ __forceinline__ T imin(T a, T b) { return a < b ? a : b; }

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Output channels per block: the group's width when it is smaller than kCoTile.
template <int CG>
__host__ __device__ constexpr int co_tile() {
  return CG > 0 && CG < kCoTile ? CG : kCoTile;
}

// CG: channels per group (in = out), 0 for any other width; STRIDE: 1 or 2.
template <typename T, int CG, int STRIDE, bool STATS>
__global__ void __launch_bounds__(kPixels) conv_fwd_kernel(ConvFwdParams p) {
  constexpr int TILE = co_tile<CG>();
  const int cg_in = CG ? CG : p.c_in / p.groups;
  const int cg_out = CG ? CG : p.c_out / p.groups;
  const int tiles = (cg_out + TILE - 1) / TILE;
  const int g = blockIdx.y / tiles;
  const int co0 = g * cg_out + (blockIdx.y % tiles) * TILE;  // first output channel
  const int co_count = imin(TILE, g * cg_out + cg_out - co0);
  const int taps = 9 * cg_in;

  // This tile's weights as fp32, [TILE][3][3][cg_in]; rows past co_count are 0.
  DYNAMIC_SHARED(float, w_s);
  const T* w = static_cast<const T*>(p.wt) + static_cast<long>(co0) * taps;
  for (int i = threadIdx.x; i < TILE * taps; i += kPixels)
    w_s[i] = i < co_count * taps ? to_float(w[i]) : 0.0f;
  __syncthreads();

  const long pixels = static_cast<long>(p.n) * p.h_out * p.w_out;
  const long pix = static_cast<long>(blockIdx.x) * kPixels + threadIdx.x;
  float acc[TILE];
#pragma unroll
  for (int co = 0; co < TILE; ++co) acc[co] = 0.0f;
  if (pix < pixels) {
    const int ow = static_cast<int>(pix % p.w_out);
    const int oh = static_cast<int>(pix / p.w_out % p.h_out);
    const long img = pix / (static_cast<long>(p.w_out) * p.h_out);
    const T* x = static_cast<const T*>(p.x);
    for (int kh = 0; kh < 3; ++kh) {
      const int ih = oh * STRIDE - 1 + kh;
      if (ih < 0 || ih >= p.h) continue;
      for (int kw = 0; kw < 3; ++kw) {
        const int iw = ow * STRIDE - 1 + kw;
        if (iw < 0 || iw >= p.w) continue;
        const T* xp = x + ((img * p.h + ih) * p.w + iw) * p.c_in + g * cg_in;
        const float* wp = w_s + (kh * 3 + kw) * cg_in;
        for (int ci = 0; ci < cg_in; ++ci) {
          const float xv = to_float(xp[ci]);
#pragma unroll
          for (int co = 0; co < TILE; ++co) acc[co] = fmaf(xv, wp[co * taps + ci], acc[co]);
        }
      }
    }
  }

  if constexpr (STATS) {
    // Per-channel (count, mean, M2) of this block's pixels, two-pass from shared memory.
    __shared__ float vals[TILE][kPixels];
#pragma unroll
    for (int co = 0; co < TILE; ++co) vals[co][threadIdx.x] = acc[co];
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < co_count) {
      const int co = threadIdx.x;
      const int count = static_cast<int>(
          imin(static_cast<long>(kPixels), pixels - static_cast<long>(blockIdx.x) * kPixels));
      float sum = 0.0f;
      for (int i = 0; i < count; ++i) sum += vals[co][i];
      const float mean = sum / count;
      float m2 = 0.0f;
      for (int i = 0; i < count; ++i) {
        const float d = vals[co][i] - mean;
        m2 = fmaf(d, d, m2);
      }
      float* out = p.partial + (static_cast<long>(blockIdx.x) * p.c_out + co0 + co) * 3;
      out[0] = static_cast<float>(count);
      out[1] = mean;
      out[2] = m2;
    }
  } else if (pix < pixels) {
    T* y = static_cast<T*>(p.y) + pix * p.c_out + co0;
#pragma unroll  // constant indices keep acc[] in registers
    for (int co = 0; co < TILE; ++co)
      if (co < co_count)
        y[co] = from_float<T>(fmaxf(fmaf(acc[co], p.scale[co0 + co], p.shift[co0 + co]), 0.0f));
  }
}

// One thread per channel: merge the blocks' partials in block order (Chan), in fp64.
__global__ void finalize_kernel(FinalizeParams f) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= f.c_out) return;
  double n = 0.0, mean = 0.0, m2 = 0.0;
  for (int b = 0; b < f.blocks; ++b) {
    const float* part = f.partial + (static_cast<long>(b) * f.c_out + c) * 3;
    const double nb = part[0];
    if (nb == 0.0) continue;
    const double total = n + nb;
    const double delta = part[1] - mean;
    mean += delta * nb / total;
    m2 += part[2] + delta * delta * n * nb / total;
    n = total;
  }
  const double var = n > 0.0 ? m2 / n : 1.0;
  const double scale = f.gamma[c] / sqrt(var + f.eps);
  f.mean[c] = static_cast<float>(mean);
  f.var[c] = static_cast<float>(var);
  f.scale[c] = static_cast<float>(scale);
  f.shift[c] = static_cast<float>(f.beta[c] - mean * scale);
}

#if defined(__CUDACC__)
inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }
#else
inline void* as_stream(void* stream) { return stream; }
#endif

template <typename T, int CG, int STRIDE>
void launch_typed(const ConvFwdParams& p, bool stats, void* stream) {
  constexpr int TILE = co_tile<CG>();
  const int cg_out = p.c_out / p.groups;
  const dim3 grid(conv_fwd_blocks_x(p), p.groups * ((cg_out + TILE - 1) / TILE));
  const size_t smem = sizeof(float) * TILE * 9 * (p.c_in / p.groups);
  void (*kernel)(ConvFwdParams) =
      stats ? conv_fwd_kernel<T, CG, STRIDE, true> : conv_fwd_kernel<T, CG, STRIDE, false>;
  RK_LAUNCH(kernel, grid, dim3(kPixels), smem, as_stream(stream))(p);
}

// Widths with their own instantiation; any other runs the generic (CG = 0) one.
template <typename T, int STRIDE>
void launch_width(const ConvFwdParams& p, bool stats, void* stream) {
  const int cg_in = p.c_in / p.groups, cg_out = p.c_out / p.groups;
  switch (cg_in == cg_out ? cg_in : 0) {
    case 4: return launch_typed<T, 4, STRIDE>(p, stats, stream);
    case 8: return launch_typed<T, 8, STRIDE>(p, stats, stream);
    case 16: return launch_typed<T, 16, STRIDE>(p, stats, stream);
    case 32: return launch_typed<T, 32, STRIDE>(p, stats, stream);
    case 64: return launch_typed<T, 64, STRIDE>(p, stats, stream);
    default: return launch_typed<T, 0, STRIDE>(p, stats, stream);
  }
}

template <typename T>
void launch_stride(const ConvFwdParams& p, bool stats, void* stream) {
  if (p.stride == 1) return launch_width<T, 1>(p, stats, stream);
  return launch_width<T, 2>(p, stats, stream);
}

}  // namespace detail

void launch_conv_fwd(const ConvFwdParams& p, bool stats, void* stream) {
  switch (p.dtype) {
    case DType::kFloat32: return detail::launch_stride<float>(p, stats, stream);
    case DType::kFloat16: return detail::launch_stride<__half>(p, stats, stream);
    case DType::kBFloat16: return detail::launch_stride<__nv_bfloat16>(p, stats, stream);
  }
}

void launch_finalize(const FinalizeParams& f, void* stream) {
  const int threads = 128;
  RK_LAUNCH(detail::finalize_kernel, dim3((f.c_out + threads - 1) / threads), dim3(threads), 0,
            detail::as_stream(stream))(f);
}

}  // namespace rk
