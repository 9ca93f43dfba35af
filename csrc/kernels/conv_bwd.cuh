// Backward kernels of the fused grouped 3x3 conv (padding 1) + BatchNorm + ReLU, NHWC.
//
// One source for nvcc (csrc/cuda/conv_bwd.cu) and g++ + the host SIMT emulator
// (csrc/emulated/conv_bwd.cpp), like conv_fwd.cuh, whose main loops it reuses
// (conv_common.cuh). Saved for backward: the input x, the output y and per-channel
// vectors; the conv output c is never stored. Notation in conv_bwd.h.
//
//   reduce:  per (pixel block, channel tile) partial sums Σdz and Σdz·x̂, with x̂
//            from c recomputed by the forward main loop (default), or recovered
//            from y where y > 0 (opt-in; tiles holding a channel whose γ makes that
//            unsafe recompute anyway). Recovering reads only dy and y. The glue
//            merges the partials in block order (fp64).
//   dc:      training only: dc needs x̂ at every pixel, also where the ReLU zeroed
//            y, so this pass recomputes c (forward main loop) and writes
//            dc = dz_scale·dz − dc_shift − dc_xhat·x̂ once, which dgrad and wgrad
//            read (docs/kernels.md has the byte count against recomputing c in both).
//   dgrad:   dx = transposed grouped conv of dc: thread per input pixel, a tile of
//            input channels per block; stride 2 keeps only taps landing on an
//            output pixel (input rows/columns the forward never reached get 0).
//   wgrad:   dw[co][tap][ci] = Σ_pixels dc·x: blocks split the pixels into
//            wgrad_chunks chunks; each accumulates its chunk in shared memory, then
//            adds it to dw with float atomics, or (deterministic) writes it as a
//            partial that the glue sums in chunk order.
// In eval dgrad and wgrad form dc = dz_scale·dy·[y > 0] while loading (no dc pass,
// no dc tensor, no recomputed conv).
#pragma once

#include "kernels/conv_bwd.h"
#include "kernels/conv_common.cuh"

namespace rk {
namespace detail {

__device__ __forceinline__ bool recoverable(float gamma, float beta) {
  return fabsf(gamma) >= kRecoverMinGamma && fabsf(beta) <= kRecoverMaxRatio * fabsf(gamma);
}

// dc at output element i (NHWC offset, channel c); 0 with `pred` false.
template <typename T, GradSource SOURCE>
__device__ __forceinline__ float load_dc(const ConvBwdParams& b, long i, int c, bool pred) {
  if (!pred) i = 0, c = 0;
  if constexpr (SOURCE == GradSource::kConvGrad) {
    return to_float(load_global(static_cast<const T*>(b.dc) + i, pred));
  } else {
    // dy is read only where the ReLU let the gradient through.
    const bool on = to_float(load_global(static_cast<const T*>(b.y) + i, pred)) > 0.0f;
    const float dy = to_float(load_global(static_cast<const T*>(b.dy) + i, on));
    const float scale = load_global(b.dz_scale + c, pred);
    return on ? scale * dy : 0.0f;
  }
}

template <int TILE>
struct ReduceShared {
  Tile<TILE> xhat_dz;  // c when recomputed, then dz·x̂
  Tile<TILE> dz;
  int recompute;
};

template <typename T, int CG, int STRIDE>
__global__ void __launch_bounds__(kPixels, 4) bwd_reduce_kernel(ConvBwdParams b) {
  constexpr int TILE = conv_tile<T, CG>();
  const ConvFwdParams& p = b.conv;
  const ChannelTile t = channel_tile<CG, TILE>(p.c_out, p.groups);
  STATIC_SHARED(ReduceShared<TILE>, s);
  Tile<TILE>& xhat_dz = s.xhat_dz;
  Tile<TILE>& dz_s = s.dz;
  int& recompute = s.recompute;
  if (threadIdx.x < 32) {  // thread 0 decides; warp 0's other lanes run along predicated off
    const bool first = threadIdx.x == 0;
    int any = !b.recover_xhat;
    for (int co = 0; co < t.count; ++co)
      any |= !recoverable(load_global(b.gamma + t.c0 + co, first),
                          load_global(b.beta + t.c0 + co, first));
    store_shared(&recompute, any, first);
  }
  __syncthreads();
  if (load_shared(&recompute)) {  // block-uniform
    conv_mainloop<T, CG, STRIDE, TILE>(p, t.g, t.c0, t.count, xhat_dz);
    __syncthreads();
  }
  const bool recomputed = load_shared(&recompute);
  const long pixels = static_cast<long>(p.n) * p.h_out * p.w_out;
  const long pix = static_cast<long>(blockIdx.x) * kPixels + threadIdx.x;
  const bool valid = pix < pixels;
  for (int co = 0; co < t.count; ++co) {
    const int c = t.c0 + co;
    const long i = valid ? pix * p.c_out + c : 0;
    const float y = to_float(load_global(static_cast<const T*>(b.y) + i, valid));
    const float dy = to_float(load_global(static_cast<const T*>(b.dy) + i, y > 0.0f));
    const float dz = y > 0.0f ? dy : 0.0f;
    float xhat;
    if (recomputed) {  // block-uniform
      xhat = (load_shared(xhat_dz.at(co, threadIdx.x)) - load_global(b.mean + c)) *
             load_global(b.invstd + c);
    } else {
      xhat = (y - load_global(b.beta + c)) / load_global(b.gamma + c);
    }
    store_shared(dz_s.at(co, threadIdx.x), valid ? dz : 0.0f);
    store_shared(xhat_dz.at(co, threadIdx.x), valid ? dz * xhat : 0.0f);
  }
  __syncthreads();
  if (threadIdx.x < 32) {  // lane co of warp 0 sums channel co
    const int co = threadIdx.x;
    const bool mine = co < t.count;
    const int count = static_cast<int>(
        imin(static_cast<long>(kPixels), pixels - static_cast<long>(blockIdx.x) * kPixels));
    float sum_dz = 0.0f, sum_dz_xhat = 0.0f;
    for (int i = 0; i < count; ++i) {
      sum_dz += load_shared(dz_s.at(mine ? co : 0, i), mine);
      sum_dz_xhat += load_shared(xhat_dz.at(mine ? co : 0, i), mine);
    }
    float* out = b.partial + (static_cast<long>(blockIdx.x) * p.c_out + t.c0 + (mine ? co : 0)) * 2;
    store_global(out, sum_dz, mine);
    store_global(out + 1, sum_dz_xhat, mine);
  }
}

template <typename T, int CG, int STRIDE>
__global__ void __launch_bounds__(kPixels, 4) bwd_dc_kernel(ConvBwdParams b) {
  constexpr int TILE = conv_tile<T, CG>();
  const ConvFwdParams& p = b.conv;
  const ChannelTile t = channel_tile<CG, TILE>(p.c_out, p.groups);
  STATIC_SHARED(Tile<TILE>, tile);
  conv_mainloop<T, CG, STRIDE, TILE>(p, t.g, t.c0, t.count, tile);
  __syncthreads();
  const long pixels = static_cast<long>(p.n) * p.h_out * p.w_out;
  const long pix = static_cast<long>(blockIdx.x) * kPixels + threadIdx.x;
  const bool valid = pix < pixels;
  for (int co = 0; co < t.count; ++co) {
    const int c = t.c0 + co;
    const long i = valid ? pix * p.c_out + c : 0;
    const float xhat = (load_shared(tile.at(co, threadIdx.x)) - load_global(b.mean + c)) *
                       load_global(b.invstd + c);
    const bool on = to_float(load_global(static_cast<const T*>(b.y) + i, valid)) > 0.0f;
    const float dy = to_float(load_global(static_cast<const T*>(b.dy) + i, on));
    const float dz = on ? dy : 0.0f;
    store_global(static_cast<T*>(b.dc) + i,
                 from_float<T>(fmaf(load_global(b.dz_scale + c), dz,
                                    -fmaf(load_global(b.dc_xhat + c), xhat,
                                          load_global(b.dc_shift + c)))),
                 valid);
  }
}

// Thread per input pixel, TILE input channels of one group per block (grid.y =
// groups x channel tiles). Weights staged as fp32 [chunk][9][TILE], one chunk of the
// group's output channels at a time.
template <typename T, int CG, int STRIDE, GradSource SOURCE>
__global__ void __launch_bounds__(kPixels, 4) bwd_dgrad_kernel(ConvBwdParams b) {
  constexpr int TILE = co_tile<CG>();
  const ConvFwdParams& p = b.conv;
  const int cg_in = CG ? CG : p.c_in / p.groups;
  const int cg_out = CG ? CG : p.c_out / p.groups;
  const ChannelTile t = channel_tile<CG, TILE>(p.c_in, p.groups);
  const int ci0 = t.c0 - t.g * cg_in;  // within the group

  DYNAMIC_SHARED(float, w_s);
  const long pixels = static_cast<long>(p.n) * p.h * p.w;
  const long pix = static_cast<long>(blockIdx.x) * kPixels + threadIdx.x;
  const bool valid = pix < pixels;
  const int iw = static_cast<int>(pix % p.w);
  const int ih = static_cast<int>(pix / p.w % p.h);
  const long img = pix / (static_cast<long>(p.w) * p.h);
  float acc[TILE];
#pragma unroll
  for (int ci = 0; ci < TILE; ++ci) acc[ci] = 0.0f;
  for (int c0 = 0; c0 < cg_out; c0 += channel_chunk<CG>()) {
    const int cn = imin(channel_chunk<CG>(), cg_out - c0);
    const int staged = cn * 9 * TILE;
    const T* w = static_cast<const T*>(p.wt) + (static_cast<long>(t.g) * cg_out + c0) * 9 * cg_in;
    __syncthreads();  // the previous chunk's readers are done
    for (int i0 = 0; i0 < staged; i0 += kPixels) {
      const int i = i0 + threadIdx.x;
      const int ci = i % TILE, row = i / TILE;  // row = co * 9 + tap
      const bool in_tile = i < staged && ci < t.count;
      const float v = to_float(
          load_global(w + (in_tile ? static_cast<long>(row) * cg_in + ci0 + ci : 0), in_tile));
      store_shared(w_s + i, v, i < staged);
    }
    __syncthreads();
    for (int kh = 0; kh < 3; ++kh) {
      const int row = ih + 1 - kh;  // = oh * STRIDE for a tap that reaches an output pixel
      for (int kw = 0; kw < 3; ++kw) {
        const int col = iw + 1 - kw;
        // Taps that reach no output pixel (and lanes past the last pixel) issue
        // their loads predicated off and multiply zeros.
        const bool reaches = valid && row >= 0 && row % STRIDE == 0 && row / STRIDE < p.h_out &&
                             col >= 0 && col % STRIDE == 0 && col / STRIDE < p.w_out;
        const long o = reaches ? ((img * p.h_out + row / STRIDE) * p.w_out + col / STRIDE) *
                                         p.c_out +
                                     static_cast<long>(t.g) * cg_out + c0
                               : 0;
        const float* wp = w_s + (kh * 3 + kw) * TILE;
        for (int co = 0; co < cn; ++co) {
          const float v = load_dc<T, SOURCE>(b, o + co, t.g * cg_out + c0 + co, reaches);
#pragma unroll
          for (int ci = 0; ci < TILE; ++ci)
            acc[ci] = fma_count(v, load_shared(wp + co * 9 * TILE + ci), acc[ci]);
        }
      }
    }
  }
  T* dx = static_cast<T*>(b.dx) + (valid ? pix * p.c_in + t.c0 : 0);
#pragma unroll  // constant indices keep acc[] in registers
  for (int ci = 0; ci < TILE; ++ci)
    if (ci < t.count) store_global(dx + ci, from_float<T>(acc[ci]), valid);  // block-uniform test
}

template <int TILE>
struct WgradShared {
  float dc[TILE][kPixels];
  long base[kPixels];  // input offset of image (pixel's img, 0, 0)
  int oh0[kPixels], ow0[kPixels];
};

// Block (chunk, channel tile, input-channel chunk): the tile's [TILE][9][cn] weight
// gradient for input channels [ci0, ci0 + cn) of the group over the pixel tiles
// chunk, chunk + wgrad_chunks, ... accumulated in shared memory (each entry owned by
// one thread), then added to dw (atomics) or written as a partial.
template <typename T, int CG, int STRIDE, GradSource SOURCE>
__global__ void __launch_bounds__(kPixels, 4) bwd_wgrad_kernel(ConvBwdParams b) {
  constexpr int TILE = co_tile<CG>();
  const ConvFwdParams& p = b.conv;
  const int cg_in = CG ? CG : p.c_in / p.groups;
  const int k_size = 9 * cg_in;
  const ChannelTile t = channel_tile<CG, TILE>(p.c_out, p.groups);
  const int ci0 = blockIdx.z * channel_chunk<CG>();
  const int cn = imin(channel_chunk<CG>(), cg_in - ci0);
  const int entries = t.count * 9 * cn;

  DYNAMIC_SHARED(float, acc_s);  // [t.count][9][cn]
  STATIC_SHARED(WgradShared<TILE>, s);
  for (int e0 = 0; e0 < entries; e0 += kPixels)
    store_shared(acc_s + e0 + threadIdx.x, 0.0f, e0 + static_cast<int>(threadIdx.x) < entries);

  const T* x = static_cast<const T*>(p.x) + t.g * cg_in + ci0;
  const long pixels = static_cast<long>(p.n) * p.h_out * p.w_out;
  const long pixel_tiles = (pixels + kPixels - 1) / kPixels;
  // Persistent over the pixel tiles blockIdx.x, blockIdx.x + gridDim.x, ...
  const long iterations =
      loop_iterations(blockIdx.x < pixel_tiles ? (pixel_tiles - 1 - blockIdx.x) / gridDim.x + 1 : 0);
  for (long it = 0; it < iterations; ++it) {
    loop_iteration(it);
    const long tile = blockIdx.x + it * gridDim.x;
    __syncthreads();  // the previous tile's readers are done
    const long pix = tile * kPixels + threadIdx.x;
    const bool valid = pix < pixels;
    const int ow = static_cast<int>(pix % p.w_out);
    const int oh = static_cast<int>(pix / p.w_out % p.h_out);
    store_shared(&s.base[threadIdx.x], pix / (static_cast<long>(p.w_out) * p.h_out) * p.h * p.w,
                 valid);
    store_shared(&s.oh0[threadIdx.x], oh * STRIDE - 1, valid);
    store_shared(&s.ow0[threadIdx.x], ow * STRIDE - 1, valid);
    for (int co = 0; co < t.count; ++co)
      store_shared(&s.dc[co][threadIdx.x],
                   load_dc<T, SOURCE>(b, pix * p.c_out + t.c0 + co, t.c0 + co, valid), valid);
    __syncthreads();
    const int count = static_cast<int>(imin(static_cast<long>(kPixels), pixels - tile * kPixels));
    for (int e0 = 0; e0 < entries; e0 += kPixels) {
      const int e = e0 + threadIdx.x;
      const bool mine = e < entries;
      const int co = mine ? e / (9 * cn) : 0, tap = e / cn % 9, ci = e % cn;
      const int kh = tap / 3, kw = tap % 3;
      float sum = 0.0f;
      for (int i = 0; i < count; ++i) {
        const int ih = load_shared(&s.oh0[i], mine) + kh, iw = load_shared(&s.ow0[i], mine) + kw;
        const long base = load_shared(&s.base[i], mine);
        const bool inside = mine && ih >= 0 && ih < p.h && iw >= 0 && iw < p.w;
        const long at = inside ? (base + static_cast<long>(ih) * p.w + iw) * p.c_in + ci : 0;
        const float xv = to_float(load_global(x + at, inside));
        sum = fma_count(load_shared(&s.dc[co][i], mine), xv, sum);
      }
      store_shared(acc_s + (mine ? e : 0), load_shared(acc_s + (mine ? e : 0), mine) + sum, mine);
    }
  }
  loop_done();
  for (int e0 = 0; e0 < entries; e0 += kPixels) {
    const int e = e0 + threadIdx.x;
    const bool mine = e < entries;
    const int co = mine ? e / (9 * cn) : 0, tap = e / cn % 9, ci = e % cn;
    const long at = static_cast<long>(t.c0 + co) * k_size + tap * cg_in + ci0 + ci;
    const float v = load_shared(acc_s + (mine ? e : 0), mine);
    if (b.deterministic) {  // kernel-uniform
      store_global(b.dw + static_cast<long>(blockIdx.x) * p.c_out * k_size + at, v, mine);
    } else {
      atomic_add_global(b.dw + at, v, mine);
    }
  }
}

template <typename T, int CG, int STRIDE>
struct BwdLauncher {
  static constexpr int TILE = co_tile<CG>();            // dgrad, wgrad
  static constexpr int CONV_TILE = conv_tile<T, CG>();  // reduce, dc (the forward's loop)

  template <int TILE_>
  static dim3 conv_grid(const ConvFwdParams& p) {
    return dim3(conv_fwd_blocks_x(p), channel_tiles<CG, TILE_>(p.c_out, p.groups));
  }

  static void reduce(const ConvBwdParams& b, void* stream) {
    void (*kernel)(ConvBwdParams) = bwd_reduce_kernel<T, CG, STRIDE>;
    const size_t smem = mainloop_smem<T, CG>(b.conv);
    prepare_shared_memory(kernel, sizeof(ReduceShared<CONV_TILE>), smem);
    RK_LAUNCH(kernel, conv_grid<CONV_TILE>(b.conv), dim3(kPixels), smem, as_stream(stream))(b);
  }

  static void dc(const ConvBwdParams& b, void* stream) {
    void (*kernel)(ConvBwdParams) = bwd_dc_kernel<T, CG, STRIDE>;
    const size_t smem = mainloop_smem<T, CG>(b.conv);
    prepare_shared_memory(kernel, sizeof(Tile<CONV_TILE>), smem);
    RK_LAUNCH(kernel, conv_grid<CONV_TILE>(b.conv), dim3(kPixels), smem, as_stream(stream))(b);
  }

  static void dgrad(const ConvBwdParams& b, GradSource source, void* stream) {
    const ConvFwdParams& p = b.conv;
    void (*kernel)(ConvBwdParams) = source == GradSource::kConvGrad
                                        ? bwd_dgrad_kernel<T, CG, STRIDE, GradSource::kConvGrad>
                                        : bwd_dgrad_kernel<T, CG, STRIDE, GradSource::kMaskedGrad>;
    const long pixels = static_cast<long>(p.n) * p.h * p.w;
    const dim3 grid(static_cast<unsigned>((pixels + kPixels - 1) / kPixels),
                    p.groups * ((p.c_in / p.groups + TILE - 1) / TILE));
    const size_t smem = sizeof(float) * imin(p.c_out / p.groups, channel_chunk<CG>()) * 9 * TILE;
    prepare_shared_memory(kernel, 0, smem);
    RK_LAUNCH(kernel, grid, dim3(kPixels), smem, as_stream(stream))(b);
  }

  static void wgrad(const ConvBwdParams& b, GradSource source, void* stream) {
    const ConvFwdParams& p = b.conv;
    void (*kernel)(ConvBwdParams) = source == GradSource::kConvGrad
                                        ? bwd_wgrad_kernel<T, CG, STRIDE, GradSource::kConvGrad>
                                        : bwd_wgrad_kernel<T, CG, STRIDE, GradSource::kMaskedGrad>;
    const int cg_in = p.c_in / p.groups;
    const dim3 grid(b.wgrad_chunks, conv_grid<TILE>(p).y,
                    (cg_in + channel_chunk<CG>() - 1) / channel_chunk<CG>());
    const size_t smem = sizeof(float) * TILE * 9 * imin(cg_in, channel_chunk<CG>());
    prepare_shared_memory(kernel, sizeof(WgradShared<TILE>), smem);
    RK_LAUNCH(kernel, grid, dim3(kPixels), smem, as_stream(stream))(b);
  }
};

// The launcher for the input's dtype, stride and group width (widths with their own
// instantiation as in the forward; any other runs the generic CG = 0 one).
template <typename Fn>
void dispatch(const ConvFwdParams& p, Fn&& fn) {
  auto by_width = [&](auto type, auto stride) {
    using T = decltype(type);
    constexpr int S = decltype(stride)::value;
    switch (instantiated_width<T>(p)) {
      case 4: return fn(BwdLauncher<T, 4, S>{});
      case 8: return fn(BwdLauncher<T, 8, S>{});
      case 16: return fn(BwdLauncher<T, 16, S>{});
      case 32: return fn(BwdLauncher<T, 32, S>{});
      case 64: return fn(BwdLauncher<T, 64, S>{});
      default: return fn(BwdLauncher<T, 0, S>{});
    }
  };
  auto by_stride = [&](auto type) {
    if (p.stride == 1) return by_width(type, std::integral_constant<int, 1>{});
    return by_width(type, std::integral_constant<int, 2>{});
  };
  switch (p.dtype) {
    case DType::kFloat32: return by_stride(float{});
    case DType::kFloat16: return by_stride(__half{});
    case DType::kBFloat16: return by_stride(__nv_bfloat16{});
  }
}

}  // namespace detail

void launch_bwd_reduce(const ConvBwdParams& params, void* stream) {
  ConvBwdParams b = params;
  b.conv = set_divisors(b.conv);
  detail::dispatch(b.conv, [&](auto launcher) { launcher.reduce(b, stream); });
}

void launch_bwd_dc(const ConvBwdParams& params, void* stream) {
  ConvBwdParams b = params;
  b.conv = set_divisors(b.conv);
  detail::dispatch(b.conv, [&](auto launcher) { launcher.dc(b, stream); });
}

void launch_bwd_dgrad(const ConvBwdParams& b, GradSource source, void* stream) {
  detail::dispatch(b.conv, [&](auto launcher) { launcher.dgrad(b, source, stream); });
}

void launch_bwd_wgrad(const ConvBwdParams& b, GradSource source, void* stream) {
  detail::dispatch(b.conv, [&](auto launcher) { launcher.wgrad(b, source, stream); });
}

int wgrad_chunks(const ConvFwdParams& p) {
  constexpr long kTargetBlocks = 2048;  // ~16 per SM on an H200's 132 SMs
  const long pixel_tiles = conv_fwd_blocks_x(p);
  const long cg_in = p.c_in / p.groups;  // blocks per pixel chunk: channel tiles x input chunks
  const long tiles = static_cast<long>(p.groups) * ((p.c_out / p.groups + kCoTile - 1) / kCoTile) *
                     ((cg_in + detail::channel_chunk<0>() - 1) / detail::channel_chunk<0>());
  const long weight = static_cast<long>(p.c_out) * 9 * cg_in;
  long chunks = (kTargetBlocks + tiles - 1) / tiles;
  if (chunks > pixel_tiles) chunks = pixel_tiles;
  if (chunks * weight > kWgradPartialFloats) chunks = kWgradPartialFloats / weight;
  return static_cast<int>(chunks < 1 ? 1 : chunks);
}

}  // namespace rk
