// The kernels' only ways to touch memory and the work the performance model counts.
//
// Under nvcc each helper is the plain access (a predicated-off one touches nothing
// and yields zero). Under the host emulator each also reports the lane's access to
// rk::emu::access (csrc/emu/count.h), which checks that every lane of a warp issues
// the same sequence of accesses and, while resnext-bench predict counts, groups them
// into warp instructions. So: never skip an access in some lanes of a warp; issue it
// with `pred` false instead (what a GPU does with a predicated instruction).
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
    return T(0);
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
inline long loop_iterations(long n) { return emu::tracker.loop_iterations(emu::linear_tid, n); }
inline void loop_iteration(long it) { emu::tracker.loop_iteration(emu::linear_tid, it); }
inline void loop_done() { emu::tracker.loop_done(emu::linear_tid); }

#endif

}  // namespace rk
