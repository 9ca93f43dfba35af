// Unit tests of the host SIMT emulator (csrc/emu/simt.h), for both back-ends.
// Built and run by CMake/ctest (target emu_tests). Exit status 0 when all pass.
#include "emu/simt.h"
#include "emu/abort_test.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <string>

namespace {

using rk::emu::testing::aborts_with;

int failures = 0;
const char* backend = "fibers";

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "%s:%d [%s]: CHECK failed: %s\n", __FILE__, __LINE__,      \
                   backend, #cond);                                                   \
      ++failures;                                                                     \
    }                                                                                 \
  } while (0)

constexpr unsigned kFull = 0xffffffffu;

__global__ void rotate_kernel(int* out) {
  STATIC_SHARED(int, s, [256]);
  int t = threadIdx.x, n = blockDim.x;
  s[t] = t + 1000 * static_cast<int>(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * n + t] = s[(t + 1) % n];
}

__global__ void rotate_no_barrier_kernel(int* out) {
  STATIC_SHARED(int, s, [256]);
  int t = threadIdx.x, n = blockDim.x;
  s[t] = t + 1000 * static_cast<int>(blockIdx.x);
  out[blockIdx.x * n + t] = s[(t + 1) % n];
}

__global__ void early_exit_kernel(int* out, int k) {
  STATIC_SHARED(int, s, [256]);
  int t = threadIdx.x;
  if (t >= k) return;
  s[t] = t * 3;
  __syncthreads();
  out[t] = s[(t + 1) % k];
  __syncthreads();
  out[t] += 1;
}

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void index_kernel(int* out) {
  int linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int block = blockIdx.x + gridDim.x * blockIdx.y;
  int n = blockDim.x * blockDim.y * blockDim.z;
  out[block * n + linear] = 1000000 * blockIdx.y + 10000 * blockIdx.x + 100 * threadIdx.z +
                            10 * threadIdx.y + threadIdx.x;
}

__global__ void warp_ops_kernel(int* out) {
  int lane = threadIdx.x % 32;
  int* o = out + threadIdx.x * 8;
  int v = lane + 1;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFull, v, offset);
  o[0] = v;  // 528 everywhere
  int d = lane + 1;
  for (int offset = 16; offset > 0; offset /= 2) d += __shfl_down_sync(kFull, d, offset);
  o[1] = d;  // lane 0: 528
  int scan = lane + 1;
  for (int offset = 1; offset < 32; offset *= 2) {
    int up = __shfl_up_sync(kFull, scan, offset);
    if (lane >= offset) scan += up;
  }
  o[2] = scan;  // inclusive prefix sum
  o[3] = __shfl_sync(kFull, lane * 10, 3, 16);  // width 16: 30 or 190
  o[4] = static_cast<int>(__ballot_sync(kFull, lane % 2));
  o[5] = __any_sync(kFull, lane == 5);
  o[6] = __all_sync(kFull, lane < 40) + 2 * __all_sync(kFull, lane < 31);
  double x = __shfl_xor_sync(kFull, lane * 0.5, 1);
  o[7] = static_cast<int>(x * 2);  // (lane ^ 1)
  __syncwarp();
}

__global__ void ballot_exited_kernel(unsigned* out) {
  int lane = threadIdx.x % 32;
  if (lane >= 20) return;
  out[threadIdx.x] = __ballot_sync(kFull, lane % 2 == 0);
}

__global__ void partial_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 0);
}

__global__ void shfl_from_exited_kernel(int* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_sync(kFull, static_cast<int>(threadIdx.x), 31);
}

__global__ void divergent_warp_kernel(int* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(kFull, 1, 1);
  } else {
    out[threadIdx.x] = __shfl_xor_sync(kFull, 2, 1);
  }
}

__global__ void deadlock_kernel() {
  if (threadIdx.x < 16) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

__global__ void atomics_kernel(float* f, __half* h, __nv_bfloat16* b, int* mx, unsigned* cas,
                               unsigned long long* ull) {
  atomicAdd(f, 1.0f);
  atomicAdd(h, __float2half_rn(1.0f));
  atomicAdd(b, __float2bfloat16_rn(1.0f));
  atomicMax(mx, static_cast<int>(threadIdx.x + blockIdx.x * blockDim.x));
  atomicAdd(ull, 2ull);
  unsigned expected = 0, old;
  while ((old = atomicCAS(cas, expected, expected + 1u)) != expected) expected = old;
}

// The rest of the emulator's atomics: Sub, Min, Exch (each thread's old value is
// distinct, so exactly one thread sees the initial value), and double Add.
__global__ void more_atomics_kernel(int* sub, int* mn, int* exch, int* saw_initial, double* d) {
  const int t = threadIdx.x + blockIdx.x * blockDim.x;
  atomicSub(sub, 3);
  atomicMin(mn, 1000 - t);
  if (atomicExch(exch, t) == -1) atomicAdd(saw_initial, 1);
  atomicAdd(d, 0.5);
}

__global__ void dynamic_shared_kernel(int* poisoned) {
  DYNAMIC_SHARED(float, buf);
  int t = threadIdx.x;
  poisoned[blockIdx.x * blockDim.x + t] = std::isnan(buf[t]);
  __syncthreads();
  buf[t] = 1.0f;
}

template <typename T>
void fill(std::vector<T>& v, T x) {
  std::fill(v.begin(), v.end(), x);
}

void test_barrier_and_blocks() {
  std::vector<int> out(3 * 128, -1);
  RK_LAUNCH(rotate_kernel, dim3(3), dim3(128), 0, 0)(out.data());
  bool ok = true;
  for (int b = 0; b < 3; ++b)
    for (int t = 0; t < 128; ++t) ok &= out[b * 128 + t] == (t + 1) % 128 + 1000 * b;
  CHECK(ok);
}

void test_missing_barrier_is_visible() {
  // Fibers: even blocks run threads in order, odd blocks in reverse, so one of
  // them reads neighbours' slots before they are written.
  std::vector<int> out(2 * 64, -1);
  RK_LAUNCH(rotate_no_barrier_kernel, dim3(2), dim3(64), 0, 0)(out.data());
  int wrong = 0;
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 64; ++t) wrong += out[b * 64 + t] != (t + 1) % 64 + 1000 * b;
  CHECK(wrong > 0);
}

void test_early_exit() {
  std::vector<int> out(96, -1);
  RK_LAUNCH(early_exit_kernel, dim3(1), dim3(96), 0, 0)(out.data(), 40);
  bool ok = true;
  for (int t = 0; t < 40; ++t) ok &= out[t] == (t + 1) % 40 * 3 + 1;
  for (int t = 40; t < 96; ++t) ok &= out[t] == -1;
  CHECK(ok);
}

void test_indexing() {
  std::vector<int> out(6 * 64, -1);
  RK_LAUNCH(index_kernel, dim3(3, 2), dim3(8, 4, 2), 0, 0)(out.data());
  bool ok = true;
  for (int by = 0; by < 2; ++by)
    for (int bx = 0; bx < 3; ++bx)
      for (int z = 0; z < 2; ++z)
        for (int y = 0; y < 4; ++y)
          for (int x = 0; x < 8; ++x)
            ok &= out[(bx + 3 * by) * 64 + x + 8 * (y + 4 * z)] ==
                  1000000 * by + 10000 * bx + 100 * z + 10 * y + x;
  CHECK(ok);
}

void test_warp_ops() {
  std::vector<int> out(64 * 8, -1);
  RK_LAUNCH(warp_ops_kernel, dim3(1), dim3(64), 0, 0)(out.data());
  for (int t = 0; t < 64; ++t) {
    int lane = t % 32;
    const int* o = out.data() + t * 8;
    CHECK(o[0] == 528);
    if (lane == 0) CHECK(o[1] == 528);
    CHECK(o[2] == (lane + 1) * (lane + 2) / 2);
    CHECK(o[3] == (lane < 16 ? 30 : 190));
    CHECK(static_cast<unsigned>(o[4]) == 0xAAAAAAAAu);
    CHECK(o[5] == 1);
    CHECK(o[6] == 1);
    CHECK(o[7] == (lane ^ 1));
  }
}

void test_ballot_with_exited_lanes() {
  std::vector<unsigned> out(64, 7u);
  RK_LAUNCH(ballot_exited_kernel, dim3(1), dim3(64), 0, 0)(out.data());
  for (int t = 0; t < 64; ++t) CHECK(out[t] == (t % 32 < 20 ? 0x55555u : 7u));
}

void test_atomics() {
  float f = 0;
  __half h = __float2half_rn(0.0f);
  __nv_bfloat16 b = __float2bfloat16_rn(0.0f);
  int mx = -1;
  unsigned cas = 0;
  unsigned long long ull = 0;
  RK_LAUNCH(atomics_kernel, dim3(2), dim3(64), 0, 0)(&f, &h, &b, &mx, &cas, &ull);
  CHECK(f == 128.0f);
  CHECK(__half2float(h) == 128.0f);
  CHECK(__bfloat162float(b) == 128.0f);
  CHECK(mx == 127);
  CHECK(cas == 128u);
  CHECK(ull == 256ull);

  int sub = 0, mn = 1 << 20, exch = -1, saw_initial = 0;
  double d = 0;
  RK_LAUNCH(more_atomics_kernel, dim3(2), dim3(64), 0, 0)(&sub, &mn, &exch, &saw_initial, &d);
  CHECK(sub == -384);
  CHECK(mn == 1000 - 127);
  CHECK(exch >= 0 && exch < 128);
  CHECK(saw_initial == 1);
  CHECK(d == 64.0);
}

void test_dynamic_shared_poison() {
  std::vector<int> out(2 * 32, -1);
  RK_LAUNCH(dynamic_shared_kernel, dim3(2), dim3(32), 32 * sizeof(float), 0)(out.data());
  bool ok = true;
  for (int i = 0; i < 64; ++i) ok &= out[i] == 1;  // NaN before each block writes
  CHECK(ok);
}

// 40 KiB of static shared memory plus `dynamic` bytes; out[block] = the first word
// of the static array as the block found it (poisoned: -1), then written. ID: one
// kernel per opt-in state (an opt-in lasts for the process).
template <int ID>
__global__ void big_static_kernel(int* out) {
  STATIC_SHARED(int, s, [10 * 1024]);
  DYNAMIC_SHARED(int, d);
  if (threadIdx.x == 0) {
    out[blockIdx.x] = s[0];
    s[0] = 7;
    d[0] = 7;
  }
}

// CUDA's shared-memory rules (static + dynamic over 48 KiB needs the opt-in; never
// above the device's per-block maximum) and the poisoning of static shared memory.
void test_shared_memory_rules() {
  void (*const k0)(int*) = big_static_kernel<0>;
  void (*const k1)(int*) = big_static_kernel<1>;
  const void* kernel = reinterpret_cast<const void*>(k1);
  std::vector<int> out(2, 0);
  RK_LAUNCH(k0, dim3(2), dim3(32), 8 * 1024, 0)(out.data());  // 48 KiB: fine
  CHECK(out[0] == -1 && out[1] == -1);  // the static array is poisoned before each block
  CHECK(aborts_with([&] { RK_LAUNCH(k0, dim3(1), dim3(32), 8 * 1024 + 4, 0)(out.data()); },
                    "above the 48 KiB default without a cudaFuncAttributeMaxDynamicSharedMemorySize opt-in"));
  CHECK(aborts_with([&] {
          rk::emu::set_max_dynamic_shared(kernel, 190 * 1024);  // 40 + 190 KiB > 227 KiB
          RK_LAUNCH(k1, dim3(1), dim3(32), 16 * 1024, 0)(out.data());
        },
        "above the device's per-block maximum of 232448 bytes"));
  CHECK(aborts_with([&] {
          rk::emu::set_max_dynamic_shared(kernel, 16 * 1024);
          RK_LAUNCH(k1, dim3(1), dim3(32), 16 * 1024 + 4, 0)(out.data());
        },
        "above the kernel's opt-in of 16384 bytes"));
  CHECK(aborts_with([&] {  // an sm_86 / sm_89 device: 99 KiB
          setenv("RK_EMU_SMEM_OPTIN", "101376", 1);
          rk::emu::set_max_dynamic_shared(kernel, 64 * 1024);
          RK_LAUNCH(k1, dim3(1), dim3(32), 64 * 1024, 0)(out.data());
        },
        "above the device's per-block maximum of 101376 bytes"));
  rk::emu::set_max_dynamic_shared(kernel, 180 * 1024);
  out.assign(2, 0);
  RK_LAUNCH(k1, dim3(2), dim3(32), 180 * 1024, 0)(out.data());
  CHECK(out[0] == -1 && out[1] == -1);
}

void test_aborts() {
  std::vector<int> out(64);
  CHECK(aborts_with([] { RK_LAUNCH(divergent_barrier_kernel, dim3(1), dim3(64), 0, 0)(); },
                    "divergent barrier"));
  CHECK(aborts_with([&] { RK_LAUNCH(partial_mask_kernel, dim3(1), dim3(32), 0, 0)(out.data()); },
                    "does not cover every live lane"));
  CHECK(aborts_with([&] { RK_LAUNCH(shfl_from_exited_kernel, dim3(1), dim3(32), 0, 0)(out.data()); },
                    "reads an exited lane"));
  CHECK(aborts_with([&] { RK_LAUNCH(divergent_warp_kernel, dim3(1), dim3(32), 0, 0)(out.data()); },
                    "divergent warp operation"));
  CHECK(aborts_with([] { RK_LAUNCH(rotate_kernel, dim3(1), dim3(2048), 0, 0)(nullptr); },
                    "block size must be 1..1024"));
}

void run_all(const char* name) {
  backend = name;
  setenv("RK_EMU_BACKEND", name, 1);
  test_barrier_and_blocks();
  test_early_exit();
  test_indexing();
  test_warp_ops();
  test_ballot_with_exited_lanes();
  test_atomics();
  test_dynamic_shared_poison();
  test_shared_memory_rules();
  test_aborts();
}

}  // namespace

// Usage: emu_tests [fibers] [threads]   (default: both; ThreadSanitizer runs `threads`)
int main(int argc, char** argv) {
  bool fibers = argc == 1, threads = argc == 1;
  for (int i = 1; i < argc; ++i) {
    fibers |= std::strcmp(argv[i], "fibers") == 0;
    threads |= std::strcmp(argv[i], "threads") == 0;
  }
  if (fibers) {
    run_all("fibers");
    // Only the deterministic back-end guarantees these two.
    test_missing_barrier_is_visible();
    CHECK(aborts_with([] { RK_LAUNCH(deadlock_kernel, dim3(1), dim3(32), 0, 0)(); }, "deadlock"));
  }
  if (threads) run_all("threads");
  std::printf("emulator tests: %s\n", failures ? "FAILED" : "all passed");
  return failures ? 1 : 0;
}
