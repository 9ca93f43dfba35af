// Forward kernels of the fused grouped 3x3 conv (padding 1) + BatchNorm + ReLU, NHWC.
//
// One source for nvcc (csrc/cuda/conv_fwd.cu) and for g++ against the host SIMT
// emulator (csrc/emulated/conv_fwd.cpp): each includes this file once, which also
// defines the launchers declared in conv_fwd.h. Torch-free: the launchers take a
// params struct of raw pointers; csrc/conv_bn_relu.cpp is the torch glue.
//
// Training has two strategies, both built from the same kernels; the
// glue picks one (csrc/conv_bn_relu.cpp):
//   "raw":       conv pass kStatsRaw writes the raw conv output and per-block
//                (count, mean, M2) partials; finalize_kernel merges the partials per
//                channel (Chan's formula in fp64, a fixed-order tree: deterministic,
//                parallel and stable for |mean| >> std) into mean/var and the folded
//                scale/shift;
//                normalize_kernel turns the raw output into relu(y * scale + shift)
//                in place. Reads the input once, moves the output three times.
//   "recompute": conv pass kStats (partials only), finalize, then conv pass kWrite
//                recomputes the conv and writes relu(conv * scale + shift) once.
//                Reads the input twice, writes the output once, never rounds the
//                raw conv output to fp16/bf16.
// Eval runs only kWrite, which folds the running statistics into scale/shift itself.
// The backward's dgrad at stride 1 is pass kConv of the conv of dc (conv_bwd.cuh).
//
// Work split: a block of kPixels threads covers kPixels output pixels (one per
// thread) and a tile of conv_tile() output channels (channel_tile: 32 on tensor
// cores, whole groups at 8 and 16 channels per group; on CUDA cores up to 16 of one
// group; grid.y = the tiles). Main loop: fp16/bf16 from 8 channels per
// group up on tensor cores (input rows and weights staged with cp.async, fragments
// by ldmatrix, mma.sync m16n8k16 with fp32 accumulation), everything else on CUDA
// cores (fp32 FMA, weights staged as fp32). Both leave the tile's conv results in
// shared memory for one epilogue (statistics or write).
#pragma once

#include "kernels/conv_common.cuh"
#include "kernels/conv_fwd.h"

namespace rk {
namespace detail {

// A conv pass's static shared memory: the conv results and eval's folded BatchNorm.
template <int TILE>
struct FwdShared {
  Tile<TILE> tile;
  float fold[2][TILE];  // scale, shift
};

// CG: channels per group (in = out), 0 for any other width; STRIDE: 1 or 2.
template <typename T, int CG, int STRIDE, Pass PASS>
__global__ void __launch_bounds__(kPixels, 4) conv_fwd_kernel(ConvFwdParams p) {
  constexpr int TILE = conv_tile<T, CG>();
  const ChannelTile t = channel_tile<CG, TILE>(p.c_out, p.groups);
  const int g = t.g, co0 = t.c0, co_count = t.count;

  // Eval folds BatchNorm here (scale = γ·rsqrt(var + ε), fp32, as torch.rsqrt did in
  // the glue before), published by the main loop's barriers: lane c < TILE of warp 0
  // computes channel c's scale and shift, and in pixel block 0 copies the channel's
  // running statistics to the op's returned ones (no copy launches in the glue). The
  // second pass of training takes finalize's.
  STATIC_SHARED(FwdShared<TILE>, shared);
  float(&fold)[2][TILE] = shared.fold;
  if constexpr (PASS == Pass::kWrite) {
    if (threadIdx.x < 32) {
      static_assert(TILE <= 32, "a lane of warp 0 per channel of the tile");
      const int c = imin(static_cast<int>(threadIdx.x), TILE - 1);
      const int at = co0 + imin(c, co_count - 1);
      const bool mine = static_cast<int>(threadIdx.x) < TILE && c < co_count;
      float scale, shift;
      if (p.scale != nullptr) {
        scale = load_global(p.scale + at, mine);
        shift = load_global(p.shift + at, mine);
      } else {
        const float mean = load_global(p.bn_mean + at, mine), var = load_global(p.bn_var + at, mine);
        scale = load_global(p.bn_gamma + at, mine) * inv_sqrt(var + p.eps);
        shift = load_global(p.bn_beta + at, mine) - mean * scale;
        const bool copy = mine && blockIdx.x == 0 && p.mean_out != nullptr;
        store_global(p.mean_out + (copy ? at : 0), mean, copy);
        store_global(p.var_out + (copy ? at : 0), var, copy);
      }
      store_shared(&fold[0][c], scale, mine);
      store_shared(&fold[1][c], shift, mine);
    }
  }

  // The main loop leaves conv(x) for (channel, pixel) of the tile in shared memory.
  Tile<TILE>& tile = shared.tile;
  conv_mainloop<T, CG, STRIDE, TILE, PASS == Pass::kConvUp>(p, g, co0, co_count, tile);
  __syncthreads();

  const long pixels = static_cast<long>(p.n) * p.h_out * p.w_out;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if constexpr (PASS != Pass::kStats) {
    // Pixel i of the block, channel co, as stored: relu(conv·scale + shift) or raw
    // (`live` false: a channel past the tile's end, read predicated off).
    auto value = [&](int co, int i, bool live) {
      const float v = load_shared(tile.at(co, i), live);
      if constexpr (PASS == Pass::kWrite)
        return from_float<T>(
            relu(fmaf(v, load_shared(&fold[0][co], live), load_shared(&fold[1][co], live))));
      return from_float<T>(v);
    };
    if constexpr (CG != 0) {  // 16-byte stores (TileVectors)
      using TV = TileVectors<T, TILE>;
      TV::for_each(pixels, co_count, [&](int i, int c0, long pix, bool live, bool valid) {
        T out[TV::kPer];
#pragma unroll
        for (int j = 0; j < TV::kPer; ++j) out[j] = value(c0 + j, i, live);
        TV::store(static_cast<T*>(p.y) + (valid ? pix * p.c_out + co0 + c0 : 0), out, valid);
      });
    } else {
      const long pix = static_cast<long>(blockIdx.x) * kPixels + threadIdx.x;
      const bool valid = pix < pixels;
      T* y = static_cast<T*>(p.y) + (valid ? pix * p.c_out + co0 : 0);
      for (int co = 0; co < co_count; ++co) store_global(y + co, value(co, threadIdx.x, true), valid);
    }
  }
  if constexpr (PASS == Pass::kStats || PASS == Pass::kStatsRaw) {
    // Per-channel (count, mean, M2) of this block's pixels, two-pass: warp w owns
    // channels w, w + 4, ...; lane l reads pixels l, l + 32, l + 64, l + 96 (a
    // conflict-free row of the tile) and the warp sums by shuffles, in a fixed order.
    const int count = static_cast<int>(
        imin(static_cast<long>(kPixels), pixels - static_cast<long>(blockIdx.x) * kPixels));
    for (int co = warp; co < TILE; co += kPixels / 32) {
      const bool mine = co < co_count;
      const int row = mine ? co : 0;
      float sum = 0.0f;
      for (int i = lane; i < kPixels; i += 32) sum += load_shared(tile.at(row, i), mine && i < count);
      const float mean = warp_sum(sum) / count;
      float m2 = 0.0f;
      for (int i = lane; i < kPixels; i += 32) {
        const float d = load_shared(tile.at(row, i), mine && i < count) - mean;
        m2 += i < count ? d * d : 0.0f;
      }
      m2 = warp_sum(m2);
      const bool first = mine && lane == 0;
      float* out = p.partial + (static_cast<long>(blockIdx.x) * p.c_out + co0 + (mine ? co : 0)) * 3;
      store_global(out, static_cast<float>(count), first);
      store_global(out + 1, mean, first);
      store_global(out + 2, m2, first);
    }
  }
}

// In place over an NHWC output: y = relu(y * scale[c] + shift[c]) (strategy "raw").
template <typename T>
__global__ void __launch_bounds__(256) normalize_kernel(ConvFwdParams p) {
  const long total = static_cast<long>(p.n) * p.h_out * p.w_out * p.c_out;
  T* y = static_cast<T*>(p.y);
  for (long i0 = static_cast<long>(blockIdx.x) * blockDim.x; i0 < total;
       i0 += static_cast<long>(gridDim.x) * blockDim.x) {
    const long i = i0 + threadIdx.x;
    const bool in = i < total;
    const int c = in ? static_cast<int>(i % p.c_out) : 0;
    const float v = to_float(load_global(y + (in ? i : 0), in));
    store_global(y + (in ? i : 0),
                 from_float<T>(relu(fmaf(v, load_global(p.scale + c, in),
                                         load_global(p.shift + c, in)))),
                 in);
  }
}

// Chan's merge of the moments (nb, mean_b, m2b) into (n, mean, m2), in fp64.
__device__ __forceinline__ void merge_moments(double& n, double& mean, double& m2, double nb,
                                              double mean_b, double m2b) {
  if (nb == 0.0) return;
  const double total = n + nb;
  const double delta = mean_b - mean;
  mean += delta * nb / total;
  m2 += m2b + delta * delta * n * nb / total;
  n = total;
}

constexpr int kFinalizeThreads = 64;

struct FinalizeShared {
  double n[kFinalizeThreads], mean[kFinalizeThreads], m2[kFinalizeThreads];
};

// A block per channel merges the pixel blocks' partials in a fixed order: thread t
// merges partials t, t + 64, ... in turn, then a tree over the threads (t with
// t + width, width halving). Deterministic (bit-identical across runs), fp64.
__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(FinalizeParams f) {
  const int c = blockIdx.x, tid = threadIdx.x;
  STATIC_SHARED(FinalizeShared, s);
  double n = 0.0, mean = 0.0, m2 = 0.0;
  for (int b0 = 0; b0 < f.blocks; b0 += kFinalizeThreads) {
    const int b = b0 + tid;
    const bool in = b < f.blocks;
    const float* part = f.partial + (in ? (static_cast<long>(b) * f.c_out + c) * 3 : 0);
    // A partial of count 0 (predicated off) merges as nothing.
    merge_moments(n, mean, m2, load_global(part, in), load_global(part + 1, in),
                  load_global(part + 2, in));
  }
  store_shared(&s.n[tid], n);
  store_shared(&s.mean[tid], mean);
  store_shared(&s.m2[tid], m2);
  for (int width = kFinalizeThreads / 2; width > 0; width /= 2) {
    __syncthreads();
    const bool active = tid < width;
    const int other = active ? tid + width : tid;
    double na = load_shared(&s.n[tid], active), ma = load_shared(&s.mean[tid], active),
           m2a = load_shared(&s.m2[tid], active);
    merge_moments(na, ma, m2a, load_shared(&s.n[other], active),
                  load_shared(&s.mean[other], active), load_shared(&s.m2[other], active));
    store_shared(&s.n[tid], na, active);
    store_shared(&s.mean[tid], ma, active);
    store_shared(&s.m2[tid], m2a, active);
  }
  const bool first = tid == 0;  // thread 0 writes the channel's results
  const double total = load_shared(&s.n[0], first), mean_all = load_shared(&s.mean[0], first);
  const double m2_all = load_shared(&s.m2[0], first);
  const double var = total > 0.0 ? m2_all / total : 1.0;
  const double scale = load_global(f.gamma + c, first) / sqrt(var + f.eps);
  store_global(f.mean + c, static_cast<float>(mean_all), first);
  store_global(f.var + c, static_cast<float>(var), first);
  store_global(f.scale + c, static_cast<float>(scale), first);
  store_global(f.shift + c, static_cast<float>(load_global(f.beta + c, first) - mean_all * scale),
               first);
}

template <typename T, int CG, int STRIDE>
void launch_typed(const ConvFwdParams& p, Pass pass, void* stream) {
  constexpr int TILE = conv_tile<T, CG>();
  const dim3 grid(conv_fwd_blocks_x(p), channel_tiles<CG, TILE>(p.c_out, p.groups));
  const size_t smem = mainloop_smem<T, CG>(p);
  void (*kernel)(ConvFwdParams) = pass == Pass::kStats ? conv_fwd_kernel<T, CG, STRIDE, Pass::kStats>
                                  : pass == Pass::kStatsRaw
                                      ? conv_fwd_kernel<T, CG, STRIDE, Pass::kStatsRaw>
                                      : conv_fwd_kernel<T, CG, STRIDE, Pass::kWrite>;
  if (pass == Pass::kConv || pass == Pass::kConvUp) {
    if constexpr (use_mma<T, CG>() && STRIDE == 1) {
      kernel = pass == Pass::kConv ? conv_fwd_kernel<T, CG, STRIDE, Pass::kConv>
                                   : conv_fwd_kernel<T, CG, STRIDE, Pass::kConvUp>;
    } else {
      throw std::invalid_argument(
          "resnext_kernels: Pass::kConv and kConvUp run fp16/bf16 at stride 1 on tensor cores "
          "only");
    }
  }
  prepare_shared_memory(kernel, sizeof(FwdShared<TILE>), smem);
  RK_LAUNCH(kernel, grid, dim3(kPixels), smem, as_stream(stream))(p);
}

// Widths with their own instantiation (instantiated_width); any other runs the
// generic (CG = 0) one.
template <typename T, int STRIDE>
void launch_width(const ConvFwdParams& p, Pass pass, void* stream) {
  switch (instantiated_width<T>(p)) {
    case 4: return launch_typed<T, 4, STRIDE>(p, pass, stream);
    case 8: return launch_typed<T, 8, STRIDE>(p, pass, stream);
    case 16: return launch_typed<T, 16, STRIDE>(p, pass, stream);
    case 32: return launch_typed<T, 32, STRIDE>(p, pass, stream);
    case 64: return launch_typed<T, 64, STRIDE>(p, pass, stream);
    default: return launch_typed<T, 0, STRIDE>(p, pass, stream);
  }
}

template <typename T>
void launch_stride(const ConvFwdParams& p, Pass pass, void* stream) {
  if (p.stride == 1) return launch_width<T, 1>(p, pass, stream);
  return launch_width<T, 2>(p, pass, stream);
}

}  // namespace detail

void launch_conv_fwd(const ConvFwdParams& params, Pass pass, void* stream) {
  const ConvFwdParams p = set_divisors(params);
  switch (p.dtype) {
    case DType::kFloat32: return detail::launch_stride<float>(p, pass, stream);
    case DType::kFloat16: return detail::launch_stride<__half>(p, pass, stream);
    case DType::kBFloat16: return detail::launch_stride<__nv_bfloat16>(p, pass, stream);
  }
}

void launch_normalize(const ConvFwdParams& p, void* stream) {
  const long total = static_cast<long>(p.n) * p.h_out * p.w_out * p.c_out;
  const dim3 grid(static_cast<unsigned>((total + 255) / 256 < 65535 ? (total + 255) / 256 : 65535));
  void (*kernel)(ConvFwdParams) = p.dtype == DType::kFloat32   ? detail::normalize_kernel<float>
                                  : p.dtype == DType::kFloat16 ? detail::normalize_kernel<__half>
                                                               : detail::normalize_kernel<__nv_bfloat16>;
  RK_LAUNCH(kernel, grid, dim3(256), 0, detail::as_stream(stream))(p);
}

void launch_finalize(const FinalizeParams& f, void* stream) {
  RK_LAUNCH(detail::finalize_kernel, dim3(f.c_out), dim3(detail::kFinalizeThreads), 0,
            detail::as_stream(stream))(f);
}

}  // namespace rk
