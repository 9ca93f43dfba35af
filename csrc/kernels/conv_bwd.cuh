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
//   dgrad:   dx = transposed grouped conv of dc. On tensor cores: the forward's
//            stride-1 conv of dc (Pass::kConv; at stride 2 of dc upsampled by 2
//            with zeros, kConvUp) with each group's weights transposed and the taps
//            flipped (wt_dgrad, made by the glue). Otherwise thread per input
//            pixel, a tile of input channels per block; stride 2 keeps only taps
//            landing on an output pixel (input rows/columns the forward never
//            reached get 0).
//   wgrad:   dw[co][tap][ci] = Σ_pixels dc·x: blocks split the pixels into
//            wgrad_chunks chunks; each accumulates its chunk (on tensor cores in
//            registers, bwd_wgrad_mma_kernel; on CUDA cores in shared memory), then
//            adds it to dw with float atomics, or (deterministic) writes it as a
//            partial that the glue sums in chunk order.
// In eval dgrad and wgrad form dc = dz_scale·dy·[y > 0] while loading (no dc pass,
// no dc tensor, no recomputed conv), except on tensor cores, where dgrad is the
// conv: there an elementwise pass (masked dc) writes dc for both.
#pragma once

#include "kernels/conv_bwd.h"
#include "kernels/conv_common.cuh"

namespace rk {
namespace detail {

__device__ __forceinline__ bool recoverable(float gamma, float beta) {
  return fabsf(gamma) >= kRecoverMinGamma && fabsf(beta) <= kRecoverMaxRatio * fabsf(gamma);
}

// invstd = rsqrt(var + eps) of channel c (conv_bwd.h).
__device__ __forceinline__ float invstd_of(const ConvBwdParams& b, int c, bool pred) {
  return inv_sqrt(load_global(b.var + c, pred) + b.eps);
}

// dz_scale = γ·invstd of channel c.
__device__ __forceinline__ float dz_scale_of(const ConvBwdParams& b, int c, bool pred) {
  return load_global(b.gamma + c, pred) * invstd_of(b, c, pred);
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
    const float scale = dz_scale_of(b, c, pred);
    return on ? scale * dy : 0.0f;
  }
}

template <int TILE>
struct ReduceShared {
  Tile<TILE> c;                      // the recomputed conv (where the block recomputes)
  float k[2][TILE];                  // per channel: (mean, invstd) there, else (β, γ)
  float part[kPixels / 32][TILE][2];  // per warp and channel: (Σdz, Σdz·x̂)
  int recompute;
};

// Per (pixel block, channel tile): Σdz and Σdz·x̂ over the block's pixels. Each
// thread sums its own elements in registers, the lanes holding the same channels
// combine by shuffles, and warp 0 adds the warps' sums in order (deterministic).
template <typename T, int CG, int STRIDE>
__global__ void __launch_bounds__(kPixels, 4) bwd_reduce_kernel(ConvBwdParams b) {
  constexpr int TILE = conv_tile<T, CG>();
  static_assert(TILE <= 32, "a lane of warp 0 per channel of the tile");
  const ConvFwdParams& p = b.conv;
  const ChannelTile t = channel_tile<CG, TILE>(p.c_out, p.groups);
  STATIC_SHARED(ReduceShared<TILE>, s);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int lane_co = imin(lane, TILE - 1);
  const bool lane_mine = lane < t.count;  // warp 0: lane co holds channel co
  if (warp == 0) {  // the block recomputes c unless every channel's x̂ is recoverable
    const int c = t.c0 + (lane_mine ? lane : 0);
    const float gamma = load_global(b.gamma + c, lane_mine);
    const float beta = load_global(b.beta + c, lane_mine);
    const bool recompute =
        __any_sync(0xffffffffu, lane_mine && (!b.recover_xhat || !recoverable(gamma, beta)));
    const float mean = load_global(b.mean + c, lane_mine && recompute);
    const float invstd = invstd_of(b, c, lane_mine && recompute);
    store_shared(&s.k[0][lane_co], recompute ? mean : beta, lane_mine);
    store_shared(&s.k[1][lane_co], recompute ? invstd : gamma, lane_mine);
    store_shared(&s.recompute, static_cast<int>(recompute), lane == 0);
  }
  __syncthreads();
  const bool recomputed = load_shared(&s.recompute);  // block-uniform
  if (recomputed) {
    conv_mainloop<T, CG, STRIDE, TILE>(p, t.g, t.c0, t.count, s.c);
    __syncthreads();
  }
  const long pixels = static_cast<long>(p.n) * p.h_out * p.w_out;
  // Adds dz and dz·x̂ of the tile's channel co (constants k0, k1) at block pixel i (0
  // where not `valid`).
  auto add = [&](float& sum_dz, float& sum_dz_xhat, float k0, float k1, int co, int i, float y,
                 float dy, bool live, bool valid) {
    const float dz = y > 0.0f ? dy : 0.0f;
    float xhat;
    if (recomputed) {
      xhat = (load_shared(s.c.at(co, i), live) - k0) * k1;
    } else {
      xhat = (y - k0) / k1;
    }
    sum_dz += valid ? dz : 0.0f;
    sum_dz_xhat += valid ? dz * xhat : 0.0f;
  };
  if constexpr (CG != 0) {  // 16-byte loads (TileVectors); a thread keeps kPer channels
    using TV = TileVectors<T, TILE>;
    const int c0 = TV::first_channel();
    float k0[TV::kPer], k1[TV::kPer], sum_dz[TV::kPer] = {}, sum_dz_xhat[TV::kPer] = {};
#pragma unroll
    for (int j = 0; j < TV::kPer; ++j) {  // the constants of this thread's channels, in registers
      k0[j] = load_shared(&s.k[0][c0 + j], c0 < t.count);
      k1[j] = load_shared(&s.k[1][c0 + j], c0 < t.count);
    }
    TV::for_each(pixels, t.count, [&](int i, int c0, long pix, bool live, bool valid) {
      const long at = valid ? pix * p.c_out + t.c0 + c0 : 0;
      T ys[TV::kPer], dys[TV::kPer];
      TV::load(ys, static_cast<const T*>(b.y) + at, valid);
      TV::load(dys, static_cast<const T*>(b.dy) + at, valid);
#pragma unroll
      for (int j = 0; j < TV::kPer; ++j)
        add(sum_dz[j], sum_dz_xhat[j], k0[j], k1[j], c0 + j, i, to_float(ys[j]), to_float(dys[j]),
            live, valid);
    });
#pragma unroll
    for (int j = 0; j < TV::kPer; ++j) {
      const float warp_dz = warp_sum<TV::V>(sum_dz[j]);
      const float warp_dz_xhat = warp_sum<TV::V>(sum_dz_xhat[j]);
      store_shared(&s.part[warp][c0 + j][0], warp_dz, lane < TV::V);
      store_shared(&s.part[warp][c0 + j][1], warp_dz_xhat, lane < TV::V);
    }
  } else {  // thread per pixel, the channels in turn
    const long pix = static_cast<long>(blockIdx.x) * kPixels + threadIdx.x;
    const bool valid = pix < pixels;
    for (int co = 0; co < t.count; ++co) {
      const long i = valid ? pix * p.c_out + t.c0 + co : 0;
      const float y = to_float(load_global(static_cast<const T*>(b.y) + i, valid));
      const float dy = to_float(load_global(static_cast<const T*>(b.dy) + i, y > 0.0f));
      float sum_dz = 0.0f, sum_dz_xhat = 0.0f;
      add(sum_dz, sum_dz_xhat, load_shared(&s.k[0][co]), load_shared(&s.k[1][co]), co, threadIdx.x,
          y, dy, true, valid);
      sum_dz = warp_sum(sum_dz);
      sum_dz_xhat = warp_sum(sum_dz_xhat);
      store_shared(&s.part[warp][co][0], sum_dz, lane == 0);
      store_shared(&s.part[warp][co][1], sum_dz_xhat, lane == 0);
    }
  }
  __syncthreads();
  if (warp == 0) {  // lane co: channel co's sums over the warps, in warp order
    float sum_dz = 0.0f, sum_dz_xhat = 0.0f;
    for (int w = 0; w < kPixels / 32; ++w) {
      sum_dz += load_shared(&s.part[w][lane_co][0], lane_mine);
      sum_dz_xhat += load_shared(&s.part[w][lane_co][1], lane_mine);
    }
    float* out = b.partial + (static_cast<long>(blockIdx.x) * p.c_out + t.c0 + lane_co) * 2;
    store_global(out, sum_dz, lane_mine);
    store_global(out + 1, sum_dz_xhat, lane_mine);
  }
}

constexpr int kSumsThreads = 64;

struct SumsShared {
  double dz[kSumsThreads], dz_xhat[kSumsThreads];
};

// A block per channel merges the reduce pass's per-block partials in a fixed order,
// in fp64: thread t adds partials t, t + 64, ... in turn, then a tree over the
// threads (t with t + width, width halving). Deterministic.
__global__ void __launch_bounds__(kSumsThreads) bwd_sums_kernel(ConvBwdParams b) {
  const ConvFwdParams& p = b.conv;
  const int c = blockIdx.x, tid = threadIdx.x;
  STATIC_SHARED(SumsShared, s);
  const long blocks = conv_fwd_blocks_x(p);
  double dz = 0.0, dz_xhat = 0.0;
  for (long b0 = 0; b0 < blocks; b0 += kSumsThreads) {
    const long block = b0 + tid;
    const bool in = block < blocks;
    const float2 part =
        load_global(reinterpret_cast<const float2*>(b.partial) + (in ? block * p.c_out + c : 0), in);
    dz += part.x;
    dz_xhat += part.y;
  }
  store_shared(&s.dz[tid], dz);
  store_shared(&s.dz_xhat[tid], dz_xhat);
  for (int width = kSumsThreads / 2; width > 0; width /= 2) {
    __syncthreads();
    const bool active = tid < width;
    const int other = active ? tid + width : tid;
    dz = load_shared(&s.dz[tid], active) + load_shared(&s.dz[other], active);
    dz_xhat = load_shared(&s.dz_xhat[tid], active) + load_shared(&s.dz_xhat[other], active);
    store_shared(&s.dz[tid], dz, active);
    store_shared(&s.dz_xhat[tid], dz_xhat, active);
  }
  store_global(b.sum_dz + c, static_cast<float>(dz), tid == 0);  // thread 0 holds the total
  store_global(b.sum_dz_xhat + c, static_cast<float>(dz_xhat), tid == 0);
}

template <int TILE>
struct DcShared {
  Tile<TILE> c;       // the recomputed conv
  float k[4][TILE];   // per channel: mean, dz_scale, dc_xhat·invstd, dc_shift (conv_bwd.h)
};

template <typename T, int CG, int STRIDE>
__global__ void __launch_bounds__(kPixels, 4) bwd_dc_kernel(ConvBwdParams b) {
  constexpr int TILE = conv_tile<T, CG>();
  static_assert(TILE <= 32, "a lane of warp 0 per channel of the tile");
  const ConvFwdParams& p = b.conv;
  const ChannelTile t = channel_tile<CG, TILE>(p.c_out, p.groups);
  STATIC_SHARED(DcShared<TILE>, s);
  if (threadIdx.x < 32) {  // lane co: channel co's constants, published by the main loop's barriers
    const int lane = threadIdx.x, co = imin(lane, TILE - 1);
    const bool mine = lane < t.count;
    const int c = t.c0 + (mine ? lane : 0);
    const float invstd = invstd_of(b, c, mine);
    const float dz_scale = load_global(b.gamma + c, mine) * invstd;
    store_shared(&s.k[0][co], load_global(b.mean + c, mine), mine);
    store_shared(&s.k[1][co], dz_scale, mine);
    store_shared(&s.k[2][co], dz_scale * load_global(b.sum_dz_xhat + c, mine) / b.count * invstd,
                 mine);
    store_shared(&s.k[3][co], dz_scale * load_global(b.sum_dz + c, mine) / b.count, mine);
  }
  conv_mainloop<T, CG, STRIDE, TILE>(p, t.g, t.c0, t.count, s.c);
  __syncthreads();
  const long pixels = static_cast<long>(p.n) * p.h_out * p.w_out;
  // The constants of the tile's channel co, and dc there at block pixel i from y, dy
  // and c: dz_scale·dz − c_scale·(c − mean) − dc_shift, c_scale = dc_xhat·invstd.
  struct Constants {
    float mean, dz_scale, c_scale, dc_shift;
  };
  auto constants = [&](int co, bool live) {
    return Constants{load_shared(&s.k[0][co], live), load_shared(&s.k[1][co], live),
                     load_shared(&s.k[2][co], live), load_shared(&s.k[3][co], live)};
  };
  auto dc = [&](const Constants& k, int co, int i, float y, float dy, bool live) {
    const float centred = load_shared(s.c.at(co, i), live) - k.mean;
    const float dz = y > 0.0f ? dy : 0.0f;
    return from_float<T>(fmaf(k.dz_scale, dz, -fmaf(k.c_scale, centred, k.dc_shift)));
  };
  if constexpr (CG != 0) {  // 8-byte loads and stores (TileVectors)
    using TV = TileVectors<T, TILE, 8>;
    const int c0 = TV::first_channel();
    Constants k[TV::kPer];  // this thread's channels', in registers
#pragma unroll
    for (int j = 0; j < TV::kPer; ++j) k[j] = constants(c0 + j, c0 < t.count);
    TV::for_each(pixels, t.count, [&](int i, int c0, long pix, bool live, bool valid) {
      const long at = valid ? pix * p.c_out + t.c0 + c0 : 0;
      T ys[TV::kPer], dys[TV::kPer], out[TV::kPer];
      TV::load(ys, static_cast<const T*>(b.y) + at, valid);
      TV::load(dys, static_cast<const T*>(b.dy) + at, valid);
#pragma unroll
      for (int j = 0; j < TV::kPer; ++j)
        out[j] = dc(k[j], c0 + j, i, to_float(ys[j]), to_float(dys[j]), live);
      TV::store(static_cast<T*>(b.dc) + at, out, valid);
    });
  } else {
    const long pix = static_cast<long>(blockIdx.x) * kPixels + threadIdx.x;
    const bool valid = pix < pixels;
    for (int co = 0; co < t.count; ++co) {
      const long i = valid ? pix * p.c_out + t.c0 + co : 0;
      const float y = to_float(load_global(static_cast<const T*>(b.y) + i, valid));
      const float dy = to_float(load_global(static_cast<const T*>(b.dy) + i, y > 0.0f));
      store_global(static_cast<T*>(b.dc) + i, dc(constants(co, true), co, threadIdx.x, y, dy, true),
                   valid);
    }
  }
}

// Eval's dc as a tensor, for dgrad as the forward's conv: dc = dz_scale·dy·[y > 0],
// one 16-byte vector (8 channels) a thread, grid-stride.
template <typename T>
__global__ void __launch_bounds__(256) bwd_masked_dc_kernel(ConvBwdParams b) {
  using TV = TileVectors<T, 8>;
  const ConvFwdParams& p = b.conv;
  const long vectors = static_cast<long>(p.n) * p.h_out * p.w_out * (p.c_out / TV::kPer);
  for (long v0 = static_cast<long>(blockIdx.x) * blockDim.x; v0 < vectors;
       v0 += static_cast<long>(gridDim.x) * blockDim.x) {
    const long v = v0 + threadIdx.x;
    const bool in = v < vectors;
    const long at = in ? v * TV::kPer : 0;
    const int c0 = static_cast<int>(at % p.c_out);
    T ys[TV::kPer], dys[TV::kPer], out[TV::kPer];
    TV::load(ys, static_cast<const T*>(b.y) + at, in);
    TV::load(dys, static_cast<const T*>(b.dy) + at, in);
    float scale[TV::kPer];  // dz_scale from 16-byte loads of γ and var
    for (int h = 0; h < TV::kPer; h += 4) {
      const float4 gamma = load_global(reinterpret_cast<const float4*>(b.gamma + c0 + h), in);
      const float4 var = load_global(reinterpret_cast<const float4*>(b.var + c0 + h), in);
      scale[h] = gamma.x * inv_sqrt(var.x + b.eps), scale[h + 1] = gamma.y * inv_sqrt(var.y + b.eps);
      scale[h + 2] = gamma.z * inv_sqrt(var.z + b.eps), scale[h + 3] = gamma.w * inv_sqrt(var.w + b.eps);
    }
#pragma unroll
    for (int j = 0; j < TV::kPer; ++j)
      out[j] = from_float<T>(to_float(ys[j]) > 0.0f ? scale[j] * to_float(dys[j]) : 0.0f);
    TV::store(static_cast<T*>(b.dc) + at, out, in);
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

// wgrad on CUDA cores (fp32 and the generic width). Block (chunk, channel tile,
// input-channel chunk): the tile's [TILE][9][cn] weight gradient for input channels
// [ci0, ci0 + cn) of the group over the pixel tiles chunk, chunk + wgrad_chunks, ...
// accumulated in shared memory (each entry owned by one thread), then added to dw
// (atomics) or written as a partial.
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
  const long pixel_tiles = conv_fwd_blocks_x(p);
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

// wgrad on tensor cores (fp16/bf16, the widths use_mma takes). A block owns a tile
// of 32 output channels and 32 staged input channels (grid.z: the halves of a
// 64-channel group) and, persistent, the pixel tiles chunk, chunk + wgrad_chunks, ...
// of 128 pixels. Per pixel tile it stages dc ([pixel][channel], chunk-swizzled; in
// eval formed from dy and y while staging) and the input rows the tile's pixels
// read (stage_rows: the forward's staging and swizzle, zeros at the padding), then
// runs, per tap, dw_tap[co][ci] += Σ_pixels dc[pixel][co]·x[pixel + tap][ci] as
// mma.sync with K = the pixels: A = dc^T and B = the tap-shifted input rows, both by
// ldmatrix.trans from their [pixel][channel] tiles. Warp w owns n8 tile w (input
// channels 8w .. 8w + 7 of the staged ones) for every tap, with the m16 tile of its
// group (up to 16 channels per group, where entries of other groups are computed and
// dropped) or both (32 and 64). Its accumulators ([9][MI][4]) cover the whole
// pixel range, then go to dw with float atomics or as the chunk's partial.
// Entries across groups never mix: a D entry is one (co, ci) pair's own sum, so
// packing needs no zeros in the operands; pixels past the end read zero rows of
// both (0 × Inf would otherwise be NaN).
template <typename T, int CG, int STRIDE, GradSource SOURCE>
__global__ void __launch_bounds__(kPixels, 4) bwd_wgrad_mma_kernel(ConvBwdParams b) {
  constexpr int CW = mma_width<CG>(), TILE = conv_tile<T, CG>(), SC = 4;
  constexpr int MI = CW <= 16 ? 1 : 2;  // m16 tiles a warp
  static_assert(TILE == 8 * SC && kPixels == 128, "32 channels of dc and x per block, 4 warps");
  const ConvFwdParams& p = b.conv;
  const ChannelTile t = channel_tile<CG, TILE>(p.c_out, p.groups);
  const int ci0 = t.g * CG + 8 * SC * blockIdx.z;  // the first staged input channel
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int mi0 = MI == 1 ? warp / 2 : 0;

  DYNAMIC_SHARED(T, smem);
  T* const dc_s = smem;                    // [kPixels][TILE]
  T* const zero = dc_s + kPixels * TILE;   // a staged pixel of zeros
  T* const x_s = zero + 8 * SC;            // the staged rows
  STATIC_SHARED(float, scale_s, [TILE]);   // eval: dz_scale of the tile's channels
  // dc chunk c (8 channels) of pixel i: swizzled by pixel bits 1-2, so that the 8
  // rows of an ldmatrix matrix (8 neighbouring pixels) take 8 bank groups.
  auto dc_at = [&](int i, int c) { return dc_s + (i * SC + (c ^ (i >> 1 & 3))) * 8; };
  store_shared(reinterpret_cast<uint4*>(zero) + threadIdx.x % SC, uint4{0u, 0u, 0u, 0u},
               threadIdx.x < SC);
  if constexpr (SOURCE == GradSource::kMaskedGrad) {
    const bool mine = static_cast<int>(threadIdx.x) < t.count;
    store_shared(scale_s + (mine ? threadIdx.x : 0),
                 dz_scale_of(b, t.c0 + (mine ? threadIdx.x : 0), mine), mine);
  }

  float acc[9][MI][4];
#pragma unroll
  for (int tap = 0; tap < 9; ++tap)
#pragma unroll
    for (int m = 0; m < MI; ++m)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[tap][m][i] = 0.0f;

  const Staging st = staging(p);
  const long pixels = static_cast<long>(p.n) * p.h_out * p.w_out;
  const long pixel_tiles = conv_fwd_blocks_x(p);
  const long iterations =
      loop_iterations(blockIdx.x < pixel_tiles ? (pixel_tiles - 1 - blockIdx.x) / gridDim.x + 1 : 0);
  for (long it = 0; it < iterations; ++it) {
    loop_iteration(it);
    const long tile = blockIdx.x + it * gridDim.x;
    const BlockStart start = block_start(p, tile);
    __syncthreads();  // the previous tile's readers are done
    stage_rows<T, SC, STRIDE>(p, st, start, block_rows(p, st, start, tile), ci0, x_s);
    for (int j0 = 0; j0 < kPixels * SC; j0 += kPixels) {
      const int j = j0 + threadIdx.x, i = j / SC, c = j % SC;
      const long pix = tile * kPixels + i;
      const bool live = pix < pixels && 8 * c < t.count;
      const long at = live ? pix * p.c_out + t.c0 + 8 * c : 0;
      if constexpr (SOURCE == GradSource::kConvGrad) {
        cp_async<16>(dc_at(i, c), static_cast<const T*>(b.dc) + at, live);
      } else {  // dc = dz_scale·dy where y > 0 (NaN y: 0, as in the reference)
        const uint4 yv = load_global(reinterpret_cast<const uint4*>(static_cast<const T*>(b.y) + at), live);
        const uint4 dyv = load_global(reinterpret_cast<const uint4*>(static_cast<const T*>(b.dy) + at), live);
        T ys[8], dys[8], out[8];
        std::memcpy(ys, &yv, sizeof(ys));
        std::memcpy(dys, &dyv, sizeof(dys));
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float scale = load_shared(scale_s + 8 * c + e);
          out[e] = from_float<T>(to_float(ys[e]) > 0.0f ? scale * to_float(dys[e]) : 0.0f);
        }
        uint4 packed;
        std::memcpy(&packed, out, sizeof(packed));
        store_shared(reinterpret_cast<uint4*>(dc_at(i, c)), packed);
      }
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    const int last = static_cast<int>(imin(static_cast<long>(kPixels), pixels - tile * kPixels)) - 1;
#pragma unroll 1
    for (int kq = 0; kq < kPixels / 32; ++kq) {  // 32 pixels: two k16 steps
      uint32_t a[MI][2][4];
#pragma unroll
      for (int m = 0; m < MI; ++m)
#pragma unroll
        for (int ks = 0; ks < 2; ++ks)
          ldmatrix<4, true>(a[m][ks], dc_at(32 * kq + 16 * ks + lane % 8 + 8 * (lane / 16),
                                            2 * (mi0 + m) + lane / 8 % 2));
      // This lane's B row: pixel 32·kq + lane (matrices 0-3: the two steps' k 0-7, 8-15).
      const int i = 32 * kq + lane;
      int pos0;
      const int row = staged_row(p, st, start, imin(i, last), &pos0);
#pragma unroll
      for (int tap = 0; tap < 9; ++tap) {
        const int kh = tap / 3, kw = tap % 3;
        const int pos = pos0 + (STRIDE == 1 ? kw : kw % 2 * st.half + kw / 2);
        const T* src = i > last ? zero
                                : x_s + swizzled<SC>((row + kh) * st.width + pos,
                                                     (row + kh) / STRIDE * st.w_out + pos, warp);
        uint32_t r[4];
        ldmatrix<4, true>(r, src);
        const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
#pragma unroll
        for (int m = 0; m < MI; ++m) {
          mma_m16n8k16<T>(acc[tap][m], a[m][0], b0);
          mma_m16n8k16<T>(acc[tap][m], a[m][1], b1);
        }
      }
    }
  }
  loop_done();
  // D[co][ci] entries: d[i] at co 16·mi + lane / 4 + 8·(i / 2), ci 8·warp + 2·(lane % 4) + i % 2;
  // only pairs of one group are dw entries.
  const long k_size = 9L * CG;
  float* const dw = b.dw + (b.deterministic ? static_cast<long>(blockIdx.x) * p.c_out * k_size : 0);
#pragma unroll
  for (int tap = 0; tap < 9; ++tap)
#pragma unroll
    for (int m = 0; m < MI; ++m)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int co = 16 * (mi0 + m) + lane / 4 + 8 * (i / 2);
        const int ci = ci0 + 8 * warp + 2 * (lane % 4) + i % 2;
        const bool mine = co < t.count && (t.c0 + co) / CG == ci / CG;
        const long at = mine ? (t.c0 + co) * k_size + tap * CG + ci % CG : 0;
        if (b.deterministic) {  // kernel-uniform
          store_global(dw + at, acc[tap][m][i], mine);
        } else {
          atomic_add_global(dw + at, acc[tap][m][i], mine);
        }
      }
}

template <typename T, int CG, int STRIDE>
struct BwdLauncher {
  static constexpr int TILE = co_tile<CG>();            // dgrad, wgrad
  static constexpr int CONV_TILE = conv_tile<T, CG>();  // reduce, dc (the forward's loop)
  static constexpr bool kTensorCores = use_mma<T, CG>();

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
    prepare_shared_memory(kernel, sizeof(DcShared<CONV_TILE>), smem);
    RK_LAUNCH(kernel, conv_grid<CONV_TILE>(b.conv), dim3(kPixels), smem, as_stream(stream))(b);
  }

  // CUDA cores only: on tensor cores dgrad is the forward's conv of a dc tensor
  // (launch_bwd_dgrad).
  static void dgrad(const ConvBwdParams& b, GradSource source, void* stream) {
    if constexpr (kTensorCores) {
      throw std::invalid_argument(
          "resnext_kernels: at this width and dtype dgrad runs as the conv of a dc tensor "
          "(GradSource::kConvGrad; in eval launch_bwd_masked_dc writes it)");
    } else {
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
  }

  // wgrad's grid: `chunks` pixel chunks x channel tiles x input-channel parts.
  static dim3 wgrad_grid(const ConvFwdParams& p, int chunks) {
    if constexpr (kTensorCores) {
      return dim3(chunks, channel_tiles<CG, CONV_TILE>(p.c_out, p.groups), CG == 64 ? 2 : 1);
    } else {
      const int cg_in = p.c_in / p.groups;
      return dim3(chunks, conv_grid<TILE>(p).y,
                  (cg_in + channel_chunk<CG>() - 1) / channel_chunk<CG>());
    }
  }

  static void wgrad(const ConvBwdParams& b, GradSource source, void* stream) {
    const ConvFwdParams& p = b.conv;
    if constexpr (kTensorCores) {
      void (*kernel)(ConvBwdParams) =
          source == GradSource::kConvGrad
              ? bwd_wgrad_mma_kernel<T, CG, STRIDE, GradSource::kConvGrad>
              : bwd_wgrad_mma_kernel<T, CG, STRIDE, GradSource::kMaskedGrad>;
      const size_t smem = sizeof(T) * (kPixels * CONV_TILE + CONV_TILE +
                                       static_cast<size_t>(staged_rows(p)) * staging(p).width *
                                           CONV_TILE);
      prepare_shared_memory(kernel, sizeof(float) * CONV_TILE, smem);
      RK_LAUNCH(kernel, wgrad_grid(p, b.wgrad_chunks), dim3(kPixels), smem,
                as_stream(stream))(b);
    } else {
      void (*kernel)(ConvBwdParams) =
          source == GradSource::kConvGrad
              ? bwd_wgrad_kernel<T, CG, STRIDE, GradSource::kConvGrad>
              : bwd_wgrad_kernel<T, CG, STRIDE, GradSource::kMaskedGrad>;
      const int cg_in = p.c_in / p.groups;
      const size_t smem = sizeof(float) * TILE * 9 * imin(cg_in, channel_chunk<CG>());
      prepare_shared_memory(kernel, sizeof(WgradShared<TILE>), smem);
      RK_LAUNCH(kernel, wgrad_grid(p, b.wgrad_chunks), dim3(kPixels), smem,
                as_stream(stream))(b);
    }
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
  RK_LAUNCH(detail::bwd_sums_kernel, dim3(b.conv.c_out), dim3(detail::kSumsThreads), 0,
            detail::as_stream(stream))(b);
}

void launch_bwd_dc(const ConvBwdParams& params, void* stream) {
  ConvBwdParams b = params;
  b.conv = set_divisors(b.conv);
  detail::dispatch(b.conv, [&](auto launcher) { launcher.dc(b, stream); });
}

void launch_bwd_masked_dc(const ConvBwdParams& b, void* stream) {
  const ConvFwdParams& p = b.conv;
  if (p.dtype == DType::kFloat32 || p.c_out % 8 != 0)
    throw std::invalid_argument("resnext_kernels: the masked dc pass takes fp16/bf16 with C_out % 8 == 0");
  const long vectors = static_cast<long>(p.n) * p.h_out * p.w_out * (p.c_out / 8);
  const long blocks = (vectors + 255) / 256;
  const dim3 grid(static_cast<unsigned>(blocks < 65535 ? blocks : 65535));
  void (*kernel)(ConvBwdParams) = p.dtype == DType::kFloat16
                                      ? detail::bwd_masked_dc_kernel<__half>
                                      : detail::bwd_masked_dc_kernel<__nv_bfloat16>;
  RK_LAUNCH(kernel, grid, dim3(256), 0, detail::as_stream(stream))(b);
}

bool dgrad_as_conv(const ConvFwdParams& p, GradSource source) {
  if (source != GradSource::kConvGrad) return false;
  bool mma = false;
  detail::dispatch(p, [&](auto launcher) { mma = launcher.kTensorCores; });
  return mma;
}

void launch_bwd_dgrad(const ConvBwdParams& b, GradSource source, void* stream) {
  if (dgrad_as_conv(b.conv, source)) {
    if (b.wt_dgrad == nullptr)
      throw std::invalid_argument("resnext_kernels: dgrad on tensor cores needs wt_dgrad");
    // A stride-1 conv from dc (C_in = C_out) to dx, of dc itself at stride 1 and of
    // dc upsampled by 2 with zeros at stride 2.
    ConvFwdParams p = b.conv;
    p.x = b.dc;
    p.wt = b.wt_dgrad;
    p.y = b.dx;
    p.stride = 1, p.h_out = p.h, p.w_out = p.w;
    launch_conv_fwd(p, b.conv.stride == 1 ? Pass::kConv : Pass::kConvUp, stream);
    return;
  }
  detail::dispatch(b.conv, [&](auto launcher) { launcher.dgrad(b, source, stream); });
}

void launch_bwd_wgrad(const ConvBwdParams& params, GradSource source, void* stream) {
  ConvBwdParams b = params;
  b.conv = set_divisors(b.conv);
  detail::dispatch(b.conv, [&](auto launcher) { launcher.wgrad(b, source, stream); });
}

int wgrad_chunks(const ConvFwdParams& p) {
  constexpr long kTargetBlocks = 2048;  // ~16 per SM on an H200's 132 SMs
  const long pixel_tiles = conv_fwd_blocks_x(p);
  long tiles = 1;  // blocks per pixel chunk
  detail::dispatch(p, [&](auto launcher) {
    const dim3 grid = launcher.wgrad_grid(p, 1);
    tiles = static_cast<long>(grid.y) * grid.z;
  });
  const long weight = static_cast<long>(p.c_out) * 9 * (p.c_in / p.groups);
  long chunks = (kTargetBlocks + tiles - 1) / tiles;
  if (chunks > pixel_tiles) chunks = pixel_tiles;
  if (chunks * weight > kWgradPartialFloats) chunks = kWgradPartialFloats / weight;
  return static_cast<int>(chunks < 1 ? 1 : chunks);
}

}  // namespace rk
