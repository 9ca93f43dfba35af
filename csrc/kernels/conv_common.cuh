// Device building blocks shared by the forward (conv_fwd.cuh) and backward
// (conv_bwd.cuh) kernels: dtype conversions, the NaN-propagating ReLU, the tile
// shapes, the tensor-core MMA helper (with its emulated host branch) and the two
// conv main loops, which leave conv(x) for a tile of (channel, pixel) in shared
// memory. Header-only templates: each kernel file includes it.
#pragma once

#include "emu/simt.h"
#include "kernels/access.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

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

// 1/sqrt(v): the MUFU.RSQ-based rsqrtf on a GPU (as torch.rsqrt on CUDA), exact on the host.
__device__ __forceinline__ float inv_sqrt(float v) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(v);
#else
  return 1.0f / std::sqrt(v);
#endif
}

// ReLU that propagates NaN as torch.relu does (fmaxf(NaN, 0) would return 0).
__device__ __forceinline__ float relu(float v) { return v > 0.0f || v != v ? v : 0.0f; }

// Output channels per block: the group's width when it is smaller than kCoTile.
template <int CG>
__host__ __device__ constexpr int co_tile() {
  return CG > 0 && CG < kCoTile ? CG : kCoTile;
}

// Tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate) for half-precision
// inputs from 4 channels per group up; CUDA-core FMA otherwise (fp32 stays fp32-exact).
template <typename T, int CG>
__host__ __device__ constexpr bool use_mma() {
  return !std::is_same_v<T, float> && CG >= 4;
}

// The group width the tensor cores see: at 4 channels per group a pair of groups,
// packed block-diagonally (the weights zero across the pair), as one of 8.
template <int CG>
__host__ __device__ constexpr int mma_width() {
  return CG == 4 ? 8 : CG;
}

// Output channels per block of the conv passes (forward, and the backward passes
// that recompute the conv): 32 on tensor cores (a warp: two m16 x four n8 tiles),
// whole groups at 8 and 16 channels per group, so that a block stages 64 bytes of
// each pixel and stores 64; otherwise co_tile (its fp32 accumulators are registers
// per thread and channel).
template <typename T, int CG>
__host__ __device__ constexpr int conv_tile() {
  return use_mma<T, CG>() ? 32 : co_tile<CG>();
}

// The output channels of a block: tile blockIdx.y of TILE channels. A tile is a
// part of one group where a group is at least TILE wide, and whole consecutive
// groups where it is narrower (TILE / CG of them; the last tile may hold fewer).
struct ChannelTile {
  int g, c0, count;  // (first) group, first channel, channels in the tile
};

template <int CG, int TILE>
__host__ __device__ inline int channel_tiles(int channels, int groups) {
  const int per_group = CG ? CG : channels / groups;
  if (CG != 0 && TILE > CG) return (channels + TILE - 1) / TILE;
  return groups * ((per_group + TILE - 1) / TILE);
}

template <int CG, int TILE>
__device__ __forceinline__ ChannelTile channel_tile(int channels, int groups) {
  if constexpr (CG != 0 && TILE > CG) {
    const int c0 = blockIdx.y * TILE;
    return {c0 / CG, c0, imin(TILE, channels - c0)};
  } else {
    const int per_group = CG ? CG : channels / groups;
    const int tiles = (per_group + TILE - 1) / TILE;
    const int g = blockIdx.y / tiles;
    const int c0 = g * per_group + (blockIdx.y % tiles) * TILE;
    return {g, c0, imin(TILE, g * per_group + per_group - c0)};
  }
}

template <typename T>
__device__ __forceinline__ uint32_t bits16(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return static_cast<__half_raw>(v).x;
  } else {
    return static_cast<__nv_bfloat16_raw>(v).x;
  }
}

// D += A·B for one warp: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.
// Fragments (PTX ISA; g = lane / 4, t = lane % 4; two 16-bit values per register,
// the lower column / row in the low half):
//   a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]                         d[2], d[3] = D[g+8][2t, 2t+1]
// The host branch (emulator) exchanges the warp's A and B fragments and computes
// this lane's part (rk::emu::mma_m16n8k16), so the same kernel line runs in the CPU
// tests.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif !defined(__CUDACC__)
  ::rk::emu::mma_m16n8k16<T>(d, a, b, RK_EMU_SITE);
#endif
}

// Shared layout of one block: [TILE] x [kPixels] fp32 results, the epilogue's input.
// Channel c's row is XOR-swizzled in pixel bits 3 and 4 by swizzle(c), so that the
// warp instructions that touch several channels at once are conflict-free: the mma
// accumulator stores (channels 2t and 2t + 1 for t = lane % 4, of one n8 tile) and
// the epilogue's vector reads (channels k·TILE/V + j for the V vectors k of a pixel:
// 2 or 4 vectors of 8 channels, 2 or 4 of 4). A warp reading one channel's row (the
// statistics, the CUDA-core loop) reads a permutation of it; the backward reduce's
// lanes, one channel each at one pixel, take 4 banks (8-way where 32 channels).
template <int TILE>
struct Tile {
  float vals[TILE][kPixels];

  __host__ __device__ static constexpr int swizzle(int c) {
    return 8 * (((c >> 1 ^ c >> 2 ^ c >> 4) & 1) | ((c >> 2 ^ c >> 3) & 1) << 1);
  }
  __device__ __forceinline__ float* at(int c, int i) { return &vals[c][i ^ swizzle(c)]; }
};

// The epilogues' vectors of a block's tile of channels, at the widths with their
// own instantiation (CG != 0): a pixel's tile of channels is contiguous and aligned
// to the vectors' size (C_out and the tile's first channel are multiples of their
// channel count): V vectors of 16 bytes (one of 8 at 4 channels of fp16/bf16). The V
// lanes of a pixel take its vectors side by side, so a warp access touches 32/V whole
// pixels, one 128-byte line each. A tile of whole groups may end early
// (co_count < TILE, at a multiple of 8 channels: whole vectors). BYTES: 8 halves the
// registers an epilogue holds per vector (the dc pass: 16 spilled), and its warp
// accesses still cover whole 64-byte runs of a pixel.
template <typename T, int TILE, int BYTES = (TILE * static_cast<int>(sizeof(T)) < 16 ? 8 : 16)>
struct TileVectors {
  static constexpr int kBytes = BYTES;
  static constexpr int kPer = kBytes / static_cast<int>(sizeof(T));  // channels a vector
  static constexpr int V = TILE / kPer;
  using Vec = std::conditional_t<kBytes == 16, uint4, uint2>;

  // fn(i, c0, pix, live, valid) for this thread's vectors: pixel i of the block (pix
  // in the tensor), the tile's channels [c0, c0 + kPer); `live`: inside the tile,
  // `valid`: that and a pixel of the tensor.
  template <typename Fn>
  __device__ __forceinline__ static void for_each(long pixels, int co_count, Fn&& fn) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, c0 = first_channel();
    for (int s = 0; s < V; ++s) {
      const int i = warp * 32 + s * (32 / V) + lane / V;
      const long pix = static_cast<long>(blockIdx.x) * kPixels + i;
      const bool live = c0 < co_count;
      fn(i, c0, pix, live, pix < pixels && live);
    }
  }
  // The first of this thread's channels, the same in every one of its vectors: lanes
  // l and l' of a warp hold the same channels where l % V == l' % V.
  __device__ __forceinline__ static int first_channel() { return threadIdx.x % V * kPer; }
  __device__ __forceinline__ static void load(T (&v)[kPer], const T* at, bool pred) {
    const Vec packed = load_global(reinterpret_cast<const Vec*>(at), pred);
    std::memcpy(v, &packed, kBytes);
  }
  __device__ __forceinline__ static void store(T* at, const T (&v)[kPer], bool pred) {
    Vec packed;
    std::memcpy(&packed, v, kBytes);
    store_global(reinterpret_cast<Vec*>(at), packed, pred);
  }
};

// v summed over the lanes of the warp that share this lane's residue mod APART (a
// power of two; 1: the whole warp), by shuffles in a fixed order.
template <int APART = 1>
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset >= APART; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Channels staged in shared memory per step where a loop runs over a group's
// channels in chunks (widths without their own instantiation: ResNet's 64-512,
// the ResNeXt paper's 2x40d at 320); the fixed widths (<= 64) take one step.
template <int CG>
__host__ __device__ constexpr int channel_chunk() {
  return CG ? CG : 64;
}

// The tensor-core main loop's staged input: every padded input row its block's
// pixels read, whole (columns iw = -1 .. W, so the taps need no bounds checks), in
// the channels of the block's groups. Padded input row r of image i (ih = r - 1) is
// "virtual row" i·rows_per_image + r, so that output row oh of image i reads
// virtual rows i·rows_per_image + oh·S + kh, and consecutive images' rows follow one
// another: a block stages one contiguous range of virtual rows.
struct Staging {
  int rows_per_image;  // (H_out - 1)·S + 3 padded input rows
  int width;           // W + 2 staged columns
  int half;            // stride 2: odd columns start here (even ones first)
  int w_out;           // the swizzle's key: (row / S)·W_out + position (staged_at)
};

__host__ __device__ inline Staging staging(const ConvFwdParams& p) {
  return {(p.h_out - 1) * p.stride + 3, p.w + 2, (p.w + 3) / 2, p.w_out};
}

// Where a block's pixels start: the image, output row and column of its first pixel
// p0 = 128·block, without a 64-bit division: with block = bq·W_out + br,
// p0 = 128·bq·W_out + 128·br, so its row is 128·bq + ⌊128·br / W_out⌋; the image
// likewise from bq = cq·H_out + cr (the glue keeps H_out, W_out < 2^24).
struct BlockStart {
  long img;
  int oh, ow;
};

__host__ __device__ inline BlockStart block_start(const ConvFwdParams& p, long block) {
  const int bq = p.div.w_out(static_cast<int>(block)), t = (static_cast<int>(block) - bq * p.w_out) * kPixels;
  const int tq = p.div.w_out(t), cq = p.div.h_out(bq);
  const int u = (bq - cq * p.h_out) * kPixels + tq, uq = p.div.h_out(u);
  return {static_cast<long>(cq) * kPixels + uq, u - uq * p.h_out, t - tq * p.w_out};
}

// Pixel `i` (0 <= i < kPixels) of the block starting at `b`.
struct Pixel {
  long img;
  int oh, ow;
};

__host__ __device__ inline Pixel block_pixel(const ConvFwdParams& p, const BlockStart& b, int i) {
  const int off = b.ow + i, dr = p.div.w_out(off);
  const int oh = b.oh + dr, dimg = p.div.h_out(oh);
  return {b.img + dimg, oh - dimg * p.h_out, off - dr * p.w_out};
}

// Staged row of tap row kh = 0 for the pixel `i` pixels into the block, and its
// output column. The block's first staged row is virtual row
// img·rows_per_image + oh·S of its first pixel.
__host__ __device__ inline int staged_row(const ConvFwdParams& p, const Staging& st,
                                          const BlockStart& b, int i, int* ow) {
  const Pixel q = block_pixel(p, b, i);
  *ow = q.ow;
  return static_cast<int>(q.img - b.img) * st.rows_per_image + (q.oh - b.oh) * p.stride;
}

// The number of staged rows of a block: through tap row 2 of its last pixel.
__host__ __device__ inline int block_rows(const ConvFwdParams& p, const Staging& st,
                                          const BlockStart& b, long block) {
  const long pixels = static_cast<long>(p.n) * p.h_out * p.w_out;
  const long left = pixels - block * kPixels;
  int ow;
  return staged_row(p, st, b, static_cast<int>(left < kPixels ? left : kPixels) - 1, &ow) + 3;
}

// Main loop on CUDA cores: thread t computes pixel t of the block for every channel
// of the tile. The weights are staged as fp32, [TILE][3][3][chunk], one chunk of the
// group's input channels at a time.
template <typename T, int CG, int STRIDE, int TILE>
__device__ __forceinline__ void fma_mainloop(const ConvFwdParams& p, int g, int co0, int co_count,
                                             Tile<TILE>& tile) {
  const int cg_in = CG ? CG : p.c_in / p.groups;
  const int taps = 9 * cg_in;
  DYNAMIC_SHARED(float, w_s);
  const T* w = static_cast<const T*>(p.wt) + static_cast<long>(co0) * taps;

  const long pixels = static_cast<long>(p.n) * p.h_out * p.w_out;
  const bool valid = static_cast<long>(blockIdx.x) * kPixels + threadIdx.x < pixels;
  const Pixel q = block_pixel(p, block_start(p, blockIdx.x), threadIdx.x);
  const int ow = q.ow, oh = q.oh;
  const long img = q.img;
  const T* x = static_cast<const T*>(p.x) + g * cg_in;
  float acc[TILE];
#pragma unroll
  for (int co = 0; co < TILE; ++co) acc[co] = 0.0f;
  for (int c0 = 0; c0 < cg_in; c0 += channel_chunk<CG>()) {
    const int cn = imin(channel_chunk<CG>(), cg_in - c0);
    const int staged = TILE * 9 * cn;
    __syncthreads();  // the previous chunk's readers are done
    for (int i0 = 0; i0 < staged; i0 += kPixels) {
      const int i = i0 + threadIdx.x;
      const int co = i / (9 * cn), tap = i / cn % 9, ci = i % cn;
      const bool in_tile = i < staged && co < co_count;
      const float v = to_float(load_global(w + (in_tile ? co * taps + tap * cg_in + c0 + ci : 0),
                                           in_tile));
      store_shared(w_s + i, v, i < staged);
    }
    __syncthreads();
    for (int kh = 0; kh < 3; ++kh) {
      const int ih = oh * STRIDE - 1 + kh;
      for (int kw = 0; kw < 3; ++kw) {
        const int iw = ow * STRIDE - 1 + kw;
        // Lanes outside the image (padding) or past the last pixel issue the loads
        // predicated off and multiply zeros.
        const bool inside = valid && ih >= 0 && ih < p.h && iw >= 0 && iw < p.w;
        const T* xp = x + (inside ? ((img * p.h + ih) * p.w + iw) * p.c_in + c0 : 0);
        const float* wp = w_s + (kh * 3 + kw) * cn;
        for (int ci = 0; ci < cn; ++ci) {
          const float xv = to_float(load_global(xp + ci, inside));
#pragma unroll
          for (int co = 0; co < TILE; ++co)
            acc[co] = fma_count(xv, load_shared(wp + co * 9 * cn + ci), acc[co]);
        }
      }
    }
  }
#pragma unroll  // constant indices keep acc[] in registers
  for (int co = 0; co < TILE; ++co) store_shared(tile.at(co, threadIdx.x), acc[co]);
}

// Element offset of channels [8c, 8c + 8) of staged column `col` in staged row
// `row`. At stride 2 the even columns come first, then the odd ones, so that
// neighbouring output pixels read neighbouring 16-byte chunks. The chunk index is
// XOR-swizzled with a key, (row / S)·W_out + position, that grows by one from an
// output pixel to the next one, across the end of an output row too (where the
// position falls back by W_out − 1 and the row moves on by S), so that the 8 rows of
// an ldmatrix matrix (8 neighbouring pixels, one tap, one chunk) fall in 8 different
// bank groups, wrapping rows included at stride 1 (a staged pixel is 64 or 128
// bytes: CHUNKS 4 or 8; at stride 2 a wrapped matrix may take two wavefronts).
template <int CHUNKS>
__device__ __forceinline__ int swizzled(int line, int key, int c) {
  return (line * CHUNKS + (c ^ (key / (8 / CHUNKS) % CHUNKS))) * 8;
}

template <int CHUNKS, int STRIDE>
__device__ __forceinline__ int staged_at(const Staging& st, int row, int col, int c) {
  const int pos = STRIDE == 1 ? col : (col % 2) * st.half + col / 2;
  return swizzled<CHUNKS>(row * st.width + pos, row / STRIDE * st.w_out + pos, c);
}

// Staged chunk i of a block (thread i % kPixels copies it): its row, column and
// 16-byte chunk.
template <int SC>
__device__ __forceinline__ void staged_chunk(const ConvFwdParams& p, const Staging& st, int i,
                                             int& row, int& col, int& c) {
  const int q = i / SC;
  row = p.div.width(q), col = q - row * st.width, c = i % SC;
}

// Copies (cp.async, uncommitted) the `rows` staged input rows of the pixel block
// starting at `start` into x_s: SC chunks a pixel, channels [c0, c0 + 8·SC) of x,
// zeros at the padding and past C_in (the last tile's groups may end early). UP: the
// input is x upsampled by 2 with zeros, x of ((H + 1) / 2, (W + 1) / 2) pixels:
// (ih, iw) holds x[ih / 2][iw / 2] where both are even, zeros elsewhere.
template <typename T, int SC, int STRIDE, bool UP = false>
__device__ __forceinline__ void stage_rows(const ConvFwdParams& p, const Staging& st,
                                           const BlockStart& start, int rows, int c0, T* x_s) {
  const T* x = static_cast<const T*>(p.x) + c0;
  const int staged = rows * st.width * SC;
  for (int i0 = 0; i0 < staged; i0 += kPixels) {
    const int i = i0 + threadIdx.x;
    int row, col, c;
    staged_chunk<SC>(p, st, i, row, col, c);
    const int r = start.oh * p.stride + row;  // padded row of the block's first image, onwards
    const int dimg = p.div.rows(r);
    const long img = start.img + dimg;
    const int ih = r - dimg * st.rows_per_image - 1, iw = col - 1;
    const bool inside = i < staged && img < p.n && ih >= 0 && ih < p.h && iw >= 0 && iw < p.w &&
                        c0 + 8 * c < p.c_in && (!UP || (ih % 2 == 0 && iw % 2 == 0));
    const int h = UP ? (p.h + 1) / 2 : p.h, w = UP ? (p.w + 1) / 2 : p.w;
    const long at = inside ? ((img * h + ih / (UP ? 2 : 1)) * w + iw / (UP ? 2 : 1)) * p.c_in + 8 * c : 0;
    cp_async<16>(x_s + (i < staged ? staged_at<SC, STRIDE>(st, row, col, c) : 0), x + at, inside,
                 i < staged);
  }
}

// Channels of a staged input pixel on tensor cores: the tile's groups' (TILE) where
// a tile holds whole groups, the whole group's (CG) where a tile is part of one.
template <int CG, int TILE>
__host__ __device__ constexpr int staged_channels() {
  return TILE > CG ? TILE : CG;
}

// Weight rows in shared memory: K (of the width the tensor cores see) rounded up to
// 16, plus 8 so that a row is an odd number of 16-byte chunks and ldmatrix's 8 rows
// hit 8 different bank groups.
template <int CG>
__host__ __device__ constexpr int weight_row() {
  return (9 * mma_width<CG>() + 15) / 16 * 16 + 8;
}

// Whether v is an infinity or a NaN.
__device__ __forceinline__ bool non_finite(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits & 0x7f800000u) == 0x7f800000u;
}

// Main loop on tensor cores: an implicit GEMM per group, M = pixels, N = the group's
// channels in the tile, K = 9·cg_in (tap-major, zero-padded to a multiple of 16),
// for each of the tile's TILE / CG groups at 8 and 16 channels per group (one
// otherwise; at 4, pairs of groups as one of 8 with block-diagonal weights:
// mma_width). The block copies its weights ([TILE][weight_row]) and its input rows
// (staging(), the tile's groups' channels, swizzled, zeros at the padding) into
// shared memory with cp.async (16 bytes; the packed weights 8), then each warp
// builds its fragments with ldmatrix (A: the 16 pixels' tap-shifted rows; B: the
// weight rows) for two m16 tiles (its 32 pixels) x TILE/8 n8 tiles.
//
// Packed pairs and non-finite inputs: an Inf or NaN in one group's input would reach
// the other group's outputs through the zero weights (0 x Inf = NaN). It makes its
// pixel's results non-finite in every channel of the pair, so the block votes on its
// results: where any is not finite, it runs the loop twice more, with the staged
// channels of the pairs' odd, then even, groups zeroed, and keeps the even, then odd,
// groups' results: the products and the NaN pattern of one group at a time.
template <typename T, int CG, int STRIDE, int TILE, bool UP = false>
__device__ __forceinline__ void mma_mainloop(const ConvFwdParams& p, int g, int co0, int co_count,
                                             Tile<TILE>& tile) {
  static_assert(TILE % 8 == 0 && (CG == 4 || CG % 8 == 0) && CG <= 64,
                "the tensor-core path takes 4, 8, 16, 32 or 64 channels per group");
  constexpr bool PACKED = CG == 4;
  constexpr int CW = mma_width<CG>();
  constexpr int K = 9 * CW, KPAD = (K + 15) / 16 * 16, KS = weight_row<CG>();
  constexpr int GT = TILE > CW ? TILE / CW : 1;  // (packed) groups in the tile
  constexpr int NT = TILE / 8, NG = NT / GT;     // n8 tiles: all, and a group's
  constexpr int SC = staged_channels<CW, TILE>() / 8;  // 16-byte chunks a staged pixel
  const Staging st = staging(p);
  const BlockStart start = block_start(p, blockIdx.x);
  const int rows = block_rows(p, st, start, blockIdx.x);
  DYNAMIC_SHARED(T, smem);
  T* const w_s = smem;                     // [TILE][KS]
  T* const x_s = smem + TILE * KS;         // [rows][width][8·SC], swizzled
  T* const zero = x_s + static_cast<long>(rows) * st.width * SC * 8;  // a staged pixel of zeros
  int* const votes = reinterpret_cast<int*>(zero + 8 * SC);  // packed: a flag per warp

  // Weight row n, copied V elements at a time: its group's taps (9·CG, tap-major).
  // Packed, a tap's 4 weights go to half n / 4 % 2 of its 8 k (the row's group's
  // channels in the pair), zeros to the other half; zeros to the K padding.
  constexpr int V = PACKED ? 4 : 8;
  const T* w = static_cast<const T*>(p.wt) + static_cast<long>(co0) * 9 * CG;
  for (int i0 = 0; i0 < TILE * (KPAD / V); i0 += kPixels) {
    const int i = i0 + threadIdx.x;
    const int n = i / (KPAD / V), k = i % (KPAD / V) * V;
    const bool active = i < TILE * (KPAD / V);
    const bool real = active && n < co_count && k < K && (!PACKED || k / 4 % 2 == n / 4 % 2);
    cp_async<sizeof(T) * V>(w_s + (active ? n * KS + k : 0),
                            w + (real ? n * 9 * CG + (PACKED ? k / 8 * CG : k) : 0), real, active);
  }
  const int staged = rows * st.width * SC;
  // Zeros over half h (4 channels: the pairs' even or odd groups) of this thread's chunks.
  auto zero_half = [&](int h) {
    for (int i0 = 0; i0 < staged; i0 += kPixels) {
      const int i = i0 + threadIdx.x;
      int row, col, c;
      staged_chunk<SC>(p, st, i, row, col, c);
      T* const at = x_s + (i < staged ? staged_at<SC, STRIDE>(st, row, col, c) : 0) + 4 * h;
      store_shared(reinterpret_cast<uint2*>(at), uint2{0u, 0u}, i < staged);
    }
  };

  // ldmatrix rows of this lane: matrix q = lane / 8 of the x4 A load is rows
  // 8·(q % 2) .. + 7 of the m16 tile at k + 8·(q / 2); of the B load, weight row
  // lane % 8 (+ 8 for the second n8 tile) at k + 8·(lane / 8 % 2). Per m16 tile, the
  // lane's pixel's staged row offsets (times the width, and as the swizzle key's row)
  // for the three tap rows and its position at tap (kh, 0); a pixel past the last
  // one reads the last one's rows (its accumulators are never stored).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long left =
      static_cast<long>(p.n) * p.h_out * p.w_out - static_cast<long>(blockIdx.x) * kPixels;
  const int last = static_cast<int>(left < kPixels ? left : kPixels) - 1;
  int line[2][3], key[2][3], pos0[2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    const int i = imin(warp * 32 + mt * 16 + lane % 8 + 8 * (lane / 8 % 2), last);
    const int row = staged_row(p, st, start, i, &pos0[mt]);  // stride 2: even columns first
#pragma unroll
    for (int kh = 0; kh < 3; ++kh) {
      line[mt][kh] = (row + kh) * st.width;
      key[mt][kh] = (row + kh) / STRIDE * st.w_out;
    }
  }
  // The A row of tap `tap` (constant once unrolled), staged channels [8c, 8c + 8).
  auto a_row = [&](int mt, int tap, int c) {
    const int kh = tap / 3, kw = tap % 3;
    const int pos = pos0[mt] + (STRIDE == 1 ? kw : kw % 2 * st.half + kw / 2);
    return x_s + swizzled<SC>(line[mt][kh] + pos, key[mt][kh] + pos, c);
  };
  const T* w_row = w_s + (lane % 8 + 8 * (lane / 16 % 2)) * KS + 8 * (lane / 8 % 2);
  // At 8 channels (CW) a k16 step spans taps t (lanes 0-15) and t + 1 (lanes 16-31)
  // of a group; the last one's second half is K padding and reads the zeros. The
  // lane's A rows for the five tap pairs, of staged chunk 0, as offsets from x_s:
  // chunk gi's are a_off ^ 8·gi (the swizzle XORs the chunk index, SC is a power of
  // two and the zeros are SC chunks), so the K loop computes no addresses.
  int a_off[2][5] = {};
  if constexpr (CW == 8) {
    const int zero_off = static_cast<int>(zero - x_s);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int j = 0; j < 5; ++j) {
        const int lo = static_cast<int>(a_row(mt, 2 * j, 0) - x_s);
        const int hi = 2 * j + 1 < 9 ? static_cast<int>(a_row(mt, 2 * j + 1, 0) - x_s) : zero_off;
        a_off[mt][j] = lane < 16 ? lo : hi;
      }
  }

  // keep: whose results a run stores: -1 every channel's; packed, 0 or 1 the pairs'
  // even or odd groups' (accumulator columns 2t, 2t + 1 of an n8 tile lie in half
  // t / 2, t = lane % 4). The first run stages the input (its copies retire the
  // weights' too), the packed reruns zero a half of it, the second one restaged.
  for (int keep = -1;;) {
    if (keep != 0) {
      stage_rows<T, SC, STRIDE, UP>(p, st, start, rows, g * CG, x_s);
      cp_async<16>(zero + 8 * (threadIdx.x % SC), p.x, false, threadIdx.x < SC);
      cp_async_commit();
      cp_async_wait<0>();
    }
    if (PACKED && keep >= 0) zero_half(1 - keep);
    __syncthreads();
    float acc[2][NT][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

    // One k16 step at k0 of group gi of the tile, from the two m16 tiles' A rows.
    auto step = [&](int gi, int k0, const T* const (&a_rows)[2]) {
      uint32_t b[NG][2];
      if constexpr (NG == 1) {
        ldmatrix<2>(b[0], w_row + 8 * gi * KS + k0);
      } else {
#pragma unroll
        for (int q = 0; q < NG; q += 2) {  // n8 tiles q and q + 1: weight rows 8q .. 8q + 15
          uint32_t r[4];
          ldmatrix<4>(r, w_row + 8 * (gi * NG + q) * KS + k0);
          b[q][0] = r[0], b[q][1] = r[1], b[q + 1][0] = r[2], b[q + 1][1] = r[3];
        }
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        uint32_t a[4];
        ldmatrix<4>(a, a_rows[mt]);
#pragma unroll
        for (int q = 0; q < NG; ++q) mma_m16n8k16<T>(acc[mt][gi * NG + q], a, b[q]);
      }
    };
    if constexpr (CW == 8) {
#pragma unroll
      for (int j = 0; j < 5; ++j) {
#pragma unroll
        for (int gi = 0; gi < GT; ++gi) {
          const T* a_rows[2] = {x_s + (a_off[0][j] ^ 8 * gi), x_s + (a_off[1][j] ^ 8 * gi)};
          step(gi, 16 * j, a_rows);
        }
      }
    } else {
#pragma unroll
      for (int tap = 0; tap < 9; ++tap) {
#pragma unroll
        for (int c = 0; c < CW / 8; c += 2) {
#pragma unroll
          for (int gi = 0; gi < GT; ++gi) {
            const int chunk_c = gi * (CW / 8) + c + lane / 16;
            const T* a_rows[2] = {a_row(0, tap, chunk_c), a_row(1, tap, chunk_c)};
            step(gi, tap * CW + 8 * c, a_rows);
          }
        }
      }
    }
    if constexpr (PACKED) {
      if (keep < 0) {  // the vote: a sum of every result of the block (an overflow reruns too)
        float sum = 0.0f;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) sum += acc[mt][nt][i];
        store_shared(votes + warp, __any_sync(0xffffffffu, non_finite(sum)) ? 1 : 0, lane == 0);
        __syncthreads();
        bool any = false;
        for (int v = 0; v < kPixels / 32; ++v) any = any || load_shared(votes + v) != 0;
        if (any) {
          keep = 0;
          continue;
        }
      }
    }
    const bool stored = keep < 0 || lane % 4 / 2 == keep;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          store_shared(
              tile.at(nt * 8 + 2 * (lane % 4) + i % 2, warp * 32 + mt * 16 + lane / 4 + 8 * (i / 2)),
              acc[mt][nt][i], stored);
    if (!PACKED || keep != 0) break;
    __syncthreads();  // every warp's reads of the staged input are done
    keep = 1;
  }
}

// conv(x) for the tile's channels [co0, co0 + co_count) of group g and the block's
// kPixels pixels, into the tile (shared); the caller synchronises before reading it.
template <typename T, int CG, int STRIDE, int TILE, bool UP = false>
__device__ __forceinline__ void conv_mainloop(const ConvFwdParams& p, int g, int co0,
                                              int co_count, Tile<TILE>& tile) {
  if constexpr (use_mma<T, CG>()) {
    mma_mainloop<T, CG, STRIDE, TILE, UP>(p, g, co0, co_count, tile);
  } else {
    static_assert(!UP, "an upsampled input runs on tensor cores only");
    fma_mainloop<T, CG, STRIDE, TILE>(p, g, co0, co_count, tile);
  }
}

// The most rows any block of the launch stages (block_rows). Blocks start 128 pixels
// apart, so their offsets in the image repeat after H_out·W_out blocks; the last block
// may be cut short, never longer.
inline int staged_rows(const ConvFwdParams& p) {
  const Staging st = staging(p);
  const long blocks = conv_fwd_blocks_x(p);
  const long period = static_cast<long>(p.h_out) * p.w_out;
  int most = 0;
  for (long b = 0; b < blocks && b <= period; ++b) {
    const int rows = block_rows(p, st, block_start(p, b), b);
    most = rows > most ? rows : most;
  }
  return most;
}

// The group width of a call's instantiation (CG), or 0 for the generic one: 4 on
// tensor cores needs an even number of groups (a 16-byte chunk holds a pair).
template <typename T>
inline int instantiated_width(const ConvFwdParams& p) {
  const int cg = p.c_in / p.groups;
  if (p.c_out / p.groups != cg || (cg == 4 && use_mma<T, 4>() && p.c_in % 8 != 0)) return 0;
  return cg == 4 || cg == 8 || cg == 16 || cg == 32 || cg == 64 ? cg : 0;
}

// Dynamic shared memory of conv_mainloop: tensor cores, the tile's weights, the
// staged input rows and a staged pixel of zeros and, packed, 16 bytes of votes;
// CUDA cores, the tile's weights (one channel chunk).
template <typename T, int CG>
inline size_t mainloop_smem(const ConvFwdParams& p) {
  if constexpr (use_mma<T, CG>())
    return sizeof(T) * (conv_tile<T, CG>() * weight_row<CG>() +
                        (static_cast<size_t>(staged_rows(p)) * staging(p).width + 1) *
                            staged_channels<mma_width<CG>(), conv_tile<T, CG>()>() +
                        (CG == 4 ? 8 : 0));
  return sizeof(float) * co_tile<CG>() * 9 * imin(p.c_in / p.groups, channel_chunk<CG>());
}

#if defined(__CUDACC__)
inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }
#else
inline void* as_stream(void* stream) { return stream; }
#endif

#if defined(__CUDACC__)
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("resnext_kernels: ") + what + " failed: " +
                             cudaGetErrorString(status));
}
#endif

// CUDA's shared-memory rules before a launch, the same code on a GPU and in the
// emulator (which enforces the rules, so a CPU test fails where a GPU launch would):
// static + dynamic bytes above the 48 KiB default need the kernel's
// cudaFuncAttributeMaxDynamicSharedMemorySize opt-in, and no block may use more than
// the device's per-block maximum. Once per (kernel, device) the kernel opts in to
// everything the device allows beside its static storage; `static_bytes` is that
// storage as its launcher sizes it (STATIC_SHARED), and on a GPU the compiled
// kernel's own figure (cudaFuncGetAttributes) when larger. Throws
// std::runtime_error when the block cannot fit (the launchers keep every supported
// shape far below that) or a CUDA call fails.
template <typename Kernel>
inline void prepare_shared_memory(Kernel kernel, size_t static_bytes, size_t dynamic_bytes) {
  struct Prepared {
    const void* kernel;
    int device;
    size_t static_bytes, max_bytes;
  };
  static std::mutex mutex;
  static std::vector<Prepared> prepared;
  const void* id = reinterpret_cast<const void*>(kernel);
  int device = 0;
#if defined(__CUDACC__)
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
#endif
  std::lock_guard<std::mutex> lock(mutex);
  const Prepared* found = nullptr;
  for (const Prepared& p : prepared)
    if (p.kernel == id && p.device == device) found = &p;
  if (found == nullptr) {
#if defined(__CUDACC__)
    cudaFuncAttributes attr;
    check_cuda(cudaFuncGetAttributes(&attr, kernel), "cudaFuncGetAttributes");
    if (attr.sharedSizeBytes > static_bytes) static_bytes = attr.sharedSizeBytes;
    int optin = 0;
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
    const size_t max_bytes = static_cast<size_t>(optin);
#else
    const size_t max_bytes = ::rk::emu::max_shared_optin();
#endif
    const size_t max_dynamic = max_bytes > static_bytes ? max_bytes - static_bytes : 0;
    if (static_bytes + max_dynamic > kDefaultSharedBytes) {
#if defined(__CUDACC__)
      check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(max_dynamic)),
                 "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
#else
      ::rk::emu::set_max_dynamic_shared(id, max_dynamic);
#endif
    }
    prepared.push_back({id, device, static_bytes, max_bytes});
    found = &prepared.back();
  }
  if (found->static_bytes + dynamic_bytes > found->max_bytes)
    throw std::runtime_error("resnext_kernels: a block needs " +
                             std::to_string(found->static_bytes + dynamic_bytes) +
                             " bytes of shared memory, above this device's per-block maximum of " +
                             std::to_string(found->max_bytes));
}

}  // namespace detail
}  // namespace rk
