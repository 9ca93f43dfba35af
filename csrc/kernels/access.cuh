// The kernels' only ways to touch memory and the work the performance model counts.
//
// Under nvcc each helper is the plain access (a predicated-off one touches nothing
// and yields zero). Under the host emulator each also reports the lane's access to
// rk::emu::access (csrc/emu/count.h), which checks that every lane of a warp issues
// the same sequence of accesses and, while resnext-bench predict counts, groups them
// into warp instructions. So: never skip an access in some lanes of a warp; issue it
// with `pred` false instead (what a GPU does with a predicated instruction).
// cp_async and ldmatrix are the asynchronous copy into shared memory and the
// warp-wide fragment load that tensor-core loops stage their operands with.
#pragma once

#include "emu/simt.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace rk {

// What a predicated-off load yields: zero (spelled through the raw bits for the
// 16-bit types, whose default constructors may leave them uninitialised).
template <typename T>
__host__ __device__ __forceinline__ T zero_of() {
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw r;
    r.x = 0;
    return __half(r);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat16_raw r;
    r.x = 0;
    return __nv_bfloat16(r);
  } else {
    return T{};  // value-initialised: 0, or the zero vector (uint2, uint4)
  }
}

#if defined(__CUDACC__)

template <typename T>
__device__ __forceinline__ T load_global(const T* p, bool pred = true) {
  return pred ? *p : zero_of<T>();
}
template <typename T>
__device__ __forceinline__ void store_global(T* p, T v, bool pred = true) {
  if (pred) *p = v;
}
template <typename T>
__device__ __forceinline__ T load_shared(const T* p, bool pred = true) {
  return pred ? *p : zero_of<T>();
}
template <typename T>
__device__ __forceinline__ void store_shared(T* p, T v, bool pred = true) {
  if (pred) *p = v;
}
__device__ __forceinline__ void atomic_add_global(float* p, float v, bool pred = true) {
  if (pred) atomicAdd(p, v);
}
// fp32 multiply-add on the CUDA cores (counted under the emulator).
__device__ __forceinline__ float fma_count(float a, float b, float c) { return fmaf(a, b, c); }

// cp.async: BYTES (4, 8 or 16) from global `src` to shared `dst`, in flight until a
// cp_async_wait<N>() retires the group cp_async_commit() closed after it (then a
// __syncthreads before other threads read it). `pred` false reads nothing and
// writes zeros (src-size 0): the zero fill of a padding tap. `active` false issues
// the copy predicated off: nothing read or written (a loop's tail lanes).
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool pred = true,
                                         bool active = true) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
  if (!active) return;
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(pred ? 16 : 0)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src), "n"(BYTES),
                 "r"(pred ? BYTES : 0)
                 : "memory");
  }
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ldmatrix.sync.aligned.m8n8.x{X}[.trans].shared.b16: X 8x8 matrices of 16-bit
// values; lanes 8m..8m+7 give the 16-byte aligned rows of matrix m. Lane l gets,
// per matrix, row l/4's elements 2(l%4) and 2(l%4)+1 (TRANS: column l/4's), the
// lower in the low half: the mma.sync A fragment (x4) or B fragment (x2, TRANS
// from a [k][n] tile).
template <int X, bool TRANS = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[X], const void* row) {
  static_assert(X == 1 || X == 2 || X == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (X == 1 && !TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else if constexpr (X == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(a));
  } else if constexpr (X == 2 && !TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else if constexpr (X == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else if constexpr (!TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  }
}

// A persistent loop: `for (long it = 0; it < loop_iterations(n); ++it) {
// loop_iteration(it); ... } loop_done();`. The emulator may run fewer iterations
// while counting and weights the loop's work by the ratio.
__device__ __forceinline__ long loop_iterations(long n) { return n; }
__device__ __forceinline__ void loop_iteration(long) {}
__device__ __forceinline__ void loop_done() {}

#else  // host emulator

template <typename T>
inline T load_global(const T* p, bool pred = true, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  emu::access(emu::Space::kGlobal, emu::kLoad, p, sizeof(T), pred, file, line);
  return pred ? *p : zero_of<T>();
}
template <typename T>
inline void store_global(T* p, T v, bool pred = true, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  emu::access(emu::Space::kGlobal, emu::kStore, p, sizeof(T), pred, file, line);
  if (pred) *p = v;
}
template <typename T>
inline T load_shared(const T* p, bool pred = true, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  emu::access(emu::Space::kShared, emu::kLoad, p, sizeof(T), pred, file, line);
  return pred ? *p : zero_of<T>();
}
template <typename T>
inline void store_shared(T* p, T v, bool pred = true, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  emu::access(emu::Space::kShared, emu::kStore, p, sizeof(T), pred, file, line);
  if (pred) *p = v;
}
inline void atomic_add_global(float* p, float v, bool pred = true,
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu::access(emu::Space::kGlobal, emu::kAtomic, p, sizeof(float), pred, file, line);
  if (pred) atomicAdd(p, v);
}
inline float fma_count(float a, float b, float c) {
  emu::tracker.add_fma(emu::linear_tid, 1);
  return fmaf(a, b, c);
}
// cp.async: the global read (none when `pred` is false) and the shared write, as
// LDGSTS moves them; the copy itself is emulated in csrc/emu/simt.h (first: its
// checks name cp.async).
template <int BYTES>
inline void cp_async(void* dst, const void* src, bool pred = true, bool active = true,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
  if (active) emu::cp_async(dst, src, BYTES, pred, file);
  emu::access(emu::Space::kGlobal, emu::kLoad, src, BYTES, pred && active, file, line);
  emu::access(emu::Space::kShared, emu::kStore, dst, BYTES, active, file, line);
}
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group takes a count of groups left in flight");
  emu::cp_async_wait(N);
}
template <int X, bool TRANS = false>
inline void ldmatrix(uint32_t (&r)[X], const void* row, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  static_assert(X == 1 || X == 2 || X == 4, "ldmatrix loads 1, 2 or 4 matrices");
  emu::access(emu::Space::kShared, emu::kLoad, row, 16, emu::lane_id() < 8 * X, file, line, X);
  emu::ldmatrix(r, X, TRANS, row, file);
}
inline long loop_iterations(long n) { return emu::tracker.loop_iterations(emu::linear_tid, n); }
inline void loop_iteration(long it) { emu::tracker.loop_iteration(emu::linear_tid, it); }
inline void loop_done() { emu::tracker.loop_done(emu::linear_tid); }

#endif

}  // namespace rk
