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

// ReLU that propagates NaN as torch.relu does (fmaxf(NaN, 0) would return 0).
__device__ __forceinline__ float relu(float v) { return v > 0.0f || v != v ? v : 0.0f; }

// Output channels per block: the group's width when it is smaller than kCoTile.
template <int CG>
__host__ __device__ constexpr int co_tile() {
  return CG > 0 && CG < kCoTile ? CG : kCoTile;
}

// Tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate) for half-precision
// inputs from 8 channels per group up; CUDA-core FMA otherwise (fp32 stays fp32-exact).
template <typename T, int CG>
__host__ __device__ constexpr bool use_mma() {
  return !std::is_same_v<T, float> && CG >= 8;
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
// The host branch (emulator) gathers the warp's fragments, rebuilds A, B and D and
// computes this lane's part, so the same kernel line runs in the CPU tests.
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
  unsigned char all_a[32][16], all_b[32][16], all_d[32][16];
  ::rk::emu::warp_gather_all(a, sizeof(a), all_a, RK_EMU_SITE);
  ::rk::emu::warp_gather_all(b, sizeof(b), all_b, RK_EMU_SITE);
  ::rk::emu::warp_gather_all(d, sizeof(d), all_d, RK_EMU_SITE);
  auto half_at = [](const unsigned char* regs, int reg, int j) {
    uint16_t raw;
    std::memcpy(&raw, regs + 4 * reg + 2 * j, 2);
    if constexpr (std::is_same_v<T, __half>) {
      __half_raw h;
      h.x = raw;
      return __half2float(__half(h));
    } else {
      __nv_bfloat16_raw h;
      h.x = raw;
      return __bfloat162float(__nv_bfloat16(h));
    }
  };
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    float acc[4];
    std::memcpy(acc, all_d[lane], sizeof(acc));
    for (int j = 0; j < 2; ++j) {
      A[g][2 * t + j] = half_at(all_a[lane], 0, j);
      A[g + 8][2 * t + j] = half_at(all_a[lane], 1, j);
      A[g][2 * t + 8 + j] = half_at(all_a[lane], 2, j);
      A[g + 8][2 * t + 8 + j] = half_at(all_a[lane], 3, j);
      B[2 * t + j][g] = half_at(all_b[lane], 0, j);
      B[2 * t + 8 + j][g] = half_at(all_b[lane], 1, j);
      C[g][2 * t + j] = acc[j];
      C[g + 8][2 * t + j] = acc[2 + j];
    }
  }
  if (::rk::emu::lane_id() == 0) {  // the warp's instruction, counted once
    double useful = 0;
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8; ++n)
        for (int k = 0; k < 16; ++k) useful += A[m][k] != 0.0f && B[k][n] != 0.0f;
    ::rk::emu::tracker.add_mma(::rk::emu::linear_tid, 16 * 8 * 16, useful);
  }
  const int g = ::rk::emu::lane_id() / 4, t = ::rk::emu::lane_id() % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i / 2) * 8, col = 2 * t + i % 2;
    float sum = C[row][col];
    for (int k = 0; k < 16; ++k) sum = fmaf(A[row][k], B[k][col], sum);
    d[i] = sum;
  }
#endif
}

// Shared layout of one block: [TILE] x [kPixels] fp32 results, the epilogue's input.
template <int TILE>
struct Tile {
  float vals[TILE][kPixels];
};

// Channels staged in shared memory per step where a loop runs over a group's
// channels in chunks (widths without their own instantiation: ResNet's 64-512,
// the ResNeXt paper's 2x40d at 320); the fixed widths (<= 64) take one step.
template <int CG>
__host__ __device__ constexpr int channel_chunk() {
  return CG ? CG : 64;
}

// Main loop on CUDA cores: thread t computes pixel t of the block for every channel
// of the tile. The weights are staged as fp32, [TILE][3][3][chunk], one chunk of the
// group's input channels at a time.
template <typename T, int CG, int STRIDE, int TILE>
__device__ __forceinline__ void fma_mainloop(const ConvFwdParams& p, int g, int co0, int co_count,
                                             float (&vals)[TILE][kPixels]) {
  const int cg_in = CG ? CG : p.c_in / p.groups;
  const int taps = 9 * cg_in;
  DYNAMIC_SHARED(float, w_s);
  const T* w = static_cast<const T*>(p.wt) + static_cast<long>(co0) * taps;

  const long pixels = static_cast<long>(p.n) * p.h_out * p.w_out;
  const long pix = static_cast<long>(blockIdx.x) * kPixels + threadIdx.x;
  const bool valid = pix < pixels;
  const int ow = static_cast<int>(pix % p.w_out);
  const int oh = static_cast<int>(pix / p.w_out % p.h_out);
  const long img = pix / (static_cast<long>(p.w_out) * p.h_out);
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
  for (int co = 0; co < TILE; ++co) store_shared(&vals[co][threadIdx.x], acc[co]);
}

// Main loop on tensor cores: an implicit GEMM per group, M = pixels, N = channels of
// the tile, K = 9·cg_in (tap-major, zero-padded to a multiple of 16). Warp w owns
// pixels [32w, 32w + 32) of the block: two m16 tiles x TILE/8 n8 tiles.
template <typename T, int CG, int STRIDE, int TILE>
__device__ __forceinline__ void mma_mainloop(const ConvFwdParams& p, int g, int co0, int co_count,
                                             float (&vals)[TILE][kPixels]) {
  static_assert(TILE % 8 == 0 && CG >= 8, "the tensor-core path takes 8k channels per group");
  constexpr int K = 9 * CG;
  constexpr int KPAD = (K + 15) / 16 * 16;
  constexpr int NT = TILE / 8;
  // Weights as T, [TILE][KPAD] (K = tap-major, channel-minor), zero padded.
  DYNAMIC_SHARED(T, w_s);
  const T* w = static_cast<const T*>(p.wt) + static_cast<long>(co0) * K;
  for (int i0 = 0; i0 < TILE * KPAD; i0 += kPixels) {
    const int i = i0 + threadIdx.x;
    const int n = i / KPAD, k = i % KPAD;
    const bool in_tile = i < TILE * KPAD && n < co_count && k < K;
    store_shared(w_s + i, load_global(w + (in_tile ? n * K + k : 0), in_tile), i < TILE * KPAD);
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int lg = lane / 4, lt = lane % 4;
  const long pixels = static_cast<long>(p.n) * p.h_out * p.w_out;
  const T* x = static_cast<const T*>(p.x);
  // The two rows (pixels) of each m16 tile this lane loads: lg and lg + 8.
  long base[2][2];  // offset of input pixel (img, oh*S - 1, ow*S - 1), or -1 when out of range
  int oh0[2][2], ow0[2][2];
  for (int mt = 0; mt < 2; ++mt)
    for (int r = 0; r < 2; ++r) {
      const long pix = static_cast<long>(blockIdx.x) * kPixels + warp * 32 + mt * 16 + lg + 8 * r;
      if (pix < pixels) {
        const int ow = static_cast<int>(pix % p.w_out);
        const int oh = static_cast<int>(pix / p.w_out % p.h_out);
        const long img = pix / (static_cast<long>(p.w_out) * p.h_out);
        oh0[mt][r] = oh * STRIDE - 1;
        ow0[mt][r] = ow * STRIDE - 1;
        base[mt][r] = img * p.h * p.w;
      } else {
        base[mt][r] = -1;
        oh0[mt][r] = ow0[mt][r] = 0;
      }
    }
  auto load = [&](int mt, int r, int k) -> uint32_t {  // A[row][k] as 16 bits, 0 off the image
    const int tap = k / CG, ci = k % CG;
    const int ih = oh0[mt][r] + tap / 3, iw = ow0[mt][r] + tap % 3;
    const bool inside =
        k < K && base[mt][r] >= 0 && ih >= 0 && ih < p.h && iw >= 0 && iw < p.w;
    const long at = inside ? (base[mt][r] + static_cast<long>(ih) * p.w + iw) * p.c_in + g * CG + ci
                           : 0;
    return bits16(load_global(x + at, inside));
  };

  float acc[2][NT][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

  for (int k0 = 0; k0 < KPAD; k0 += 16) {
    uint32_t b[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const T* col = w_s + (nt * 8 + lg) * KPAD + k0 + 2 * lt + 8 * h;
        b[nt][h] = bits16(load_shared(col)) | bits16(load_shared(col + 1)) << 16;
      }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      uint32_t a[4];
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) {
        const int r = reg % 2, k = k0 + 2 * lt + 8 * (reg / 2);
        a[reg] = load(mt, r, k) | load(mt, r, k + 1) << 16;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma_m16n8k16<T>(acc[mt][nt], a, b[nt]);
    }
  }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        store_shared(&vals[nt * 8 + 2 * lt + i % 2][warp * 32 + mt * 16 + lg + 8 * (i / 2)],
                     acc[mt][nt][i]);
}

// conv(x) for the tile's channels [co0, co0 + co_count) of group g and the block's
// kPixels pixels, into vals (shared); the caller synchronises before reading it.
template <typename T, int CG, int STRIDE, int TILE>
__device__ __forceinline__ void conv_mainloop(const ConvFwdParams& p, int g, int co0,
                                              int co_count, float (&vals)[TILE][kPixels]) {
  if constexpr (use_mma<T, CG>()) {
    mma_mainloop<T, CG, STRIDE, TILE>(p, g, co0, co_count, vals);
  } else {
    fma_mainloop<T, CG, STRIDE, TILE>(p, g, co0, co_count, vals);
  }
}

// Dynamic shared memory of conv_mainloop: the tile's weights (one channel chunk).
template <typename T, int CG>
inline size_t mainloop_smem(const ConvFwdParams& p) {
  const int k = 9 * (p.c_in / p.groups);
  return use_mma<T, CG>() ? sizeof(T) * co_tile<CG>() * ((k + 15) / 16 * 16)
                          : sizeof(float) * co_tile<CG>() * 9 *
                                imin(p.c_in / p.groups, channel_chunk<CG>());
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
