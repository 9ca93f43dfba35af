// Tests of the emulated cp.async and ldmatrix (csrc/emu/simt.h, behind the helpers of
// csrc/kernels/access.cuh), for both back-ends and both cp.async landing modes
// (RK_EMU_CP_ASYNC=wait|issue): the PTX fragment layout of every ldmatrix variant,
// zero fill, inactive copies, commit and wait groups, and the bugs they must show: a
// wait after the read, a missing wait, and a tile's copies issued while other
// threads still read the buffer (write-after-read). Built and run by CMake/ctest (target async_tests).
#include "kernels/access.cuh"
#include "emu/abort_test.h"
#include "emu/conv_test_util.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace {

using rk::emu::testing::aborts_with;

int failures = 0;
const char* backend = "fibers";
const char* mode = "wait";

#define CHECK(cond)                                                                       \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "%s:%d [%s, cp.async lands at %s]: CHECK failed: %s\n", __FILE__, \
                   __LINE__, backend, mode, #cond);                                       \
      ++failures;                                                                         \
    }                                                                                     \
  } while (0)

bool lands_at_issue() { return std::strcmp(mode, "issue") == 0; }

bool is_poison(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits == 0xFFFFFFFFu;
}

// ---- ldmatrix ------------------------------------------------------------------
// Two warps; each stages its X matrices' 8 rows at scattered 16-byte slots of a
// shared buffer (row r of matrix m at slot perm[8m + r] of the warp's 32), then every
// lane hands ldmatrix its row's address; the registers go to out[thread * X + m].
// Element (m, r, c) holds code(warp, m, r, c).
__host__ __device__ uint16_t code(int warp, int m, int r, int c) {
  return static_cast<uint16_t>(4096 * warp + 512 * m + 64 * r + c + 1);
}

template <int X, bool TRANS>
__global__ void ldmatrix_kernel(const int* perm, uint32_t* out) {
  STATIC_SHARED(uint16_t, s, [2 * 32 * 8]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint16_t* mine = s + warp * 32 * 8;
  for (int i = lane; i < 8 * X * 8; i += 32) {
    const int m = i / 64, r = i / 8 % 8, c = i % 8;
    rk::store_shared(mine + 8 * perm[8 * m + r] + c, code(warp, m, r, c));
  }
  __syncthreads();
  uint32_t regs[X];
  // Lanes past 8X point at an odd address: ldmatrix must ignore it.
  const void* row = lane < 8 * X ? static_cast<const void*>(mine + 8 * perm[lane])
                                 : static_cast<const void*>(mine + 1);
  rk::ldmatrix<X, TRANS>(regs, row);
  for (int m = 0; m < X; ++m) out[threadIdx.x * X + m] = regs[m];
}

template <int X, bool TRANS>
void check_ldmatrix() {
  std::mt19937 rng(1234 + 10 * X + TRANS);
  std::vector<int> perm(32);
  for (int i = 0; i < 32; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<uint32_t> out(64 * X, 0xDEADBEEFu);
  RK_LAUNCH((ldmatrix_kernel<X, TRANS>), dim3(1), dim3(64), 0, 0)(perm.data(), out.data());
  bool ok = true;
  for (int t = 0; t < 64; ++t) {
    const int warp = t / 32, g = t % 32 / 4, q = t % 4;
    for (int m = 0; m < X; ++m) {
      // The PTX ISA's figure for ldmatrix: thread l holds row l/4, columns 2(l%4) and
      // 2(l%4)+1 of each matrix; .trans holds the same of the transposed matrix.
      const uint32_t lo = TRANS ? code(warp, m, 2 * q, g) : code(warp, m, g, 2 * q);
      const uint32_t hi = TRANS ? code(warp, m, 2 * q + 1, g) : code(warp, m, g, 2 * q + 1);
      ok &= out[t * X + m] == (lo | hi << 16);
    }
  }
  CHECK(ok);
}

__global__ void ldmatrix_misaligned_kernel(uint32_t* out) {
  STATIC_SHARED(uint16_t, s, [32 * 8 + 8]);
  uint32_t r[1];
  rk::ldmatrix<1>(r, s + 8 * (threadIdx.x % 8) + 4);  // 8 bytes off
  out[threadIdx.x] = r[0];
}

__global__ void ldmatrix_global_kernel(const uint16_t* g, uint32_t* out) {
  uint32_t r[1];
  rk::ldmatrix<1>(r, g + 8 * (threadIdx.x % 8));
  out[threadIdx.x] = r[0];
}

__global__ void ldmatrix_exited_kernel(uint32_t* out) {
  STATIC_SHARED(uint16_t, s, [32 * 8]);
  if (threadIdx.x >= 16) return;
  uint32_t r[1];
  rk::ldmatrix<1>(r, s + 8 * (threadIdx.x % 8));
  out[threadIdx.x] = r[0];
}

// ---- cp.async ------------------------------------------------------------------
// 64 threads stage 64 chunks of 4 floats with 16-byte copies over a buffer holding
// an older tile (-7), the chunks from `valid` on zero-filled; each thread then reads
// another thread's chunk.
enum class Stage { kCorrect, kWaitAfterRead };

template <Stage S>
__global__ void stage_kernel(const float* src, float* out, int valid) {
  STATIC_SHARED(float, s, [64 * 4]);
  const int t = threadIdx.x;
  for (int j = 0; j < 4; ++j) rk::store_shared(s + 4 * t + j, -7.0f);
  __syncthreads();
  rk::cp_async<16>(s + 4 * t, src + 4 * t, t < valid);
  rk::cp_async_commit();
  if constexpr (S == Stage::kCorrect) rk::cp_async_wait<0>();
  __syncthreads();
  const int from = (t + 17) % 64;
  for (int j = 0; j < 4; ++j) out[4 * t + j] = rk::load_shared(s + 4 * from + j);
  if constexpr (S == Stage::kWaitAfterRead) rk::cp_async_wait<0>();
}

void check_stage() {
  std::vector<float> src(256), out(256, -1.0f);
  for (int i = 0; i < 256; ++i) src[i] = 0.5f + i;
  const int valid = 45;
  RK_LAUNCH(stage_kernel<Stage::kCorrect>, dim3(2), dim3(64), 0, 0)(src.data(), out.data(), valid);
  bool ok = true;
  for (int t = 0; t < 64; ++t) {
    const int from = (t + 17) % 64;
    for (int j = 0; j < 4; ++j) ok &= out[4 * t + j] == (from < valid ? src[4 * from + j] : 0.0f);
  }
  CHECK(ok);
}

// A copy issued with `active` false touches nothing: odd threads' slots keep their
// older value (-7), neither poisoned nor zero-filled.
__global__ void inactive_kernel(const float* src, float* out) {
  STATIC_SHARED(float, s, [64]);
  const int t = threadIdx.x;
  rk::store_shared(s + t, -7.0f);
  __syncthreads();
  rk::cp_async<4>(s + t, src + t, true, t % 2 == 0);
  rk::cp_async_commit();
  rk::cp_async_wait<0>();
  __syncthreads();
  out[t] = rk::load_shared(s + (t + 1) % 64);
}

void check_inactive() {
  std::vector<float> src(64), out(64, 0.0f);
  for (int i = 0; i < 64; ++i) src[i] = 1.5f + i;
  RK_LAUNCH(inactive_kernel, dim3(1), dim3(64), 0, 0)(src.data(), out.data());
  bool ok = true;
  for (int t = 0; t < 64; ++t) {
    const int from = (t + 1) % 64;
    ok &= out[t] == (from % 2 == 0 ? src[from] : -7.0f);
  }
  CHECK(ok);
}

// The planted bug: the wait after the read. Landing at the wait, a thread reads the
// poison of the issue, not the older tile, wherever the chunk's owner has not reached
// its wait yet (fibers: owners that run later); landing at issue hides the bug.
void check_wait_after_read() {
  std::vector<float> src(256, 3.0f), out(256, -1.0f);
  RK_LAUNCH(stage_kernel<Stage::kWaitAfterRead>, dim3(1), dim3(64), 0, 0)
      (src.data(), out.data(), 64);
  int poisoned = 0, right = 0;
  for (float v : out) {
    poisoned += is_poison(v);
    right += v == 3.0f;
  }
  if (lands_at_issue()) CHECK(right == 256);
  else CHECK(poisoned > 0 && poisoned + right == 256);
}

// Commit groups: copies a, b (two commits) and c (not committed) into one thread's
// own slots; what the thread reads after each wait.
__global__ void groups_kernel(const float* src, float* out) {
  STATIC_SHARED(float, s, [32 * 3]);
  const int t = threadIdx.x;
  float* mine = s + 3 * t;
  rk::cp_async<4>(mine + 0, src + 0);
  rk::cp_async_commit();
  rk::cp_async<4>(mine + 1, src + 1);
  rk::cp_async_commit();
  rk::cp_async<4>(mine + 2, src + 2);
  rk::cp_async_wait<1>();  // a only
  for (int j = 0; j < 3; ++j) out[9 * t + j] = rk::load_shared(mine + j);
  rk::cp_async_wait<0>();  // a and b; c is not committed
  for (int j = 0; j < 3; ++j) out[9 * t + 3 + j] = rk::load_shared(mine + j);
  rk::cp_async_commit();
  rk::cp_async_wait<0>();
  for (int j = 0; j < 3; ++j) out[9 * t + 6 + j] = rk::load_shared(mine + j);
}

void check_groups() {
  const std::vector<float> src = {1.0f, 2.0f, 3.0f};
  std::vector<float> out(32 * 9, -1.0f);
  RK_LAUNCH(groups_kernel, dim3(1), dim3(32), 0, 0)(src.data(), out.data());
  const bool early = lands_at_issue();
  bool ok = true;
  for (int t = 0; t < 32; ++t) {
    const float* o = out.data() + 9 * t;
    // After wait<1>: a; after wait<0>: a and b (landing at issue: all three).
    ok &= o[0] == 1.0f && (early ? o[1] == 2.0f : is_poison(o[1]));
    ok &= early ? o[2] == 3.0f : is_poison(o[2]);
    ok &= o[3] == 1.0f && o[4] == 2.0f && (early ? o[5] == 3.0f : is_poison(o[5]));
    ok &= o[6] == 1.0f && o[7] == 2.0f && o[8] == 3.0f;
  }
  CHECK(ok);
}

// A single-buffered loop over `tiles` tiles of 64 floats: out[t] = the sum over the
// tiles of element (t + 1) % 64. With BARRIER false the next tile's copies start
// while other threads still read the current one (the write-after-read bug).
template <bool BARRIER>
__global__ void pipeline_kernel(const float* src, float* out, int tiles) {
  STATIC_SHARED(float, buf, [64]);
  const int t = threadIdx.x;
  rk::cp_async<4>(buf + t, src + t);
  rk::cp_async_commit();
  float acc = 0.0f;
  for (int i = 0; i < tiles; ++i) {
    rk::cp_async_wait<0>();
    __syncthreads();
    acc += rk::load_shared(buf + (t + 1) % 64);
    if constexpr (BARRIER) __syncthreads();
    rk::cp_async<4>(buf + t, src + 64 * (i + 1) + t, i + 1 < tiles);
    rk::cp_async_commit();
  }
  rk::cp_async_wait<0>();
  out[64 * blockIdx.x + t] = acc;
}

// Whether each of the two blocks (the emulator's fibers run block 1's threads in
// reverse) summed right.
template <bool BARRIER>
std::vector<bool> pipeline_right() {
  const int tiles = 5;
  std::vector<float> src(64 * (tiles + 1)), out(128, -1.0f);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<float>(i % 97) + 0.25f;
  RK_LAUNCH(pipeline_kernel<BARRIER>, dim3(2), dim3(64), 0, 0)(src.data(), out.data(), tiles);
  std::vector<bool> right(2, true);
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 64; ++t) {
      float want = 0.0f;
      for (int i = 0; i < tiles; ++i) want += src[64 * i + (t + 1) % 64];
      right[b] = right[b] && out[64 * b + t] == want;
    }
  return right;
}

__global__ void cp_async_unwaited_kernel(const float* src) {
  STATIC_SHARED(float, s, [4 * 32]);
  rk::cp_async<16>(s + 4 * threadIdx.x, src + 4 * threadIdx.x);
  rk::cp_async_commit();
}

__global__ void cp_async_misaligned_kernel(const float* src) {
  STATIC_SHARED(float, s, [4 * 32 + 4]);
  rk::cp_async<16>(s + 4 * threadIdx.x + 1, src + 4 * threadIdx.x);
  rk::cp_async_commit();
  rk::cp_async_wait<0>();
}

__global__ void cp_async_to_global_kernel(float* dst, const float* src) {
  rk::cp_async<16>(dst + 4 * threadIdx.x, src + 4 * threadIdx.x);
  rk::cp_async_commit();
  rk::cp_async_wait<0>();
}

void check_aborts() {
  std::vector<uint32_t> out(64);
  alignas(16) static uint16_t g[32 * 8];
  alignas(16) static float src[4 * 32 + 4], dst[4 * 32];
  CHECK(aborts_with(
      [&] { RK_LAUNCH(ldmatrix_misaligned_kernel, dim3(1), dim3(32), 0, 0)(out.data()); },
      "ldmatrix row address not 16-byte aligned"));
  CHECK(aborts_with(
      [&] { RK_LAUNCH(ldmatrix_global_kernel, dim3(1), dim3(32), 0, 0)(g, out.data()); },
      "ldmatrix row outside the block's shared memory"));
  CHECK(aborts_with([&] { RK_LAUNCH(ldmatrix_exited_kernel, dim3(1), dim3(32), 0, 0)(out.data()); },
                    "ldmatrix needs every lane of the warp"));
  CHECK(aborts_with([&] { RK_LAUNCH(cp_async_unwaited_kernel, dim3(1), dim3(32), 0, 0)(src); },
                    "cp.async copies no cp_async_wait retired"));
  CHECK(aborts_with([&] { RK_LAUNCH(cp_async_misaligned_kernel, dim3(1), dim3(32), 0, 0)(src); },
                    "cp.async address not aligned to the copy's size"));
  CHECK(aborts_with(
      [&] { RK_LAUNCH(cp_async_to_global_kernel, dim3(1), dim3(32), 0, 0)(dst, src); },
      "cp.async destination outside the block's shared memory"));
  CHECK(aborts_with([&] {
          setenv("RK_EMU_CP_ASYNC", "never", 1);
          RK_LAUNCH(cp_async_unwaited_kernel, dim3(1), dim3(32), 0, 0)(src);
        },
        "RK_EMU_CP_ASYNC must be wait or issue"));
}

void run_all(const char* name, bool planted_races) {
  backend = name;
  check_ldmatrix<1, false>();
  check_ldmatrix<1, true>();
  check_ldmatrix<2, false>();
  check_ldmatrix<2, true>();
  check_ldmatrix<4, false>();
  check_ldmatrix<4, true>();
  for (const char* m : {"wait", "issue"}) {
    mode = m;
    setenv("RK_EMU_CP_ASYNC", m, 1);
    check_stage();
    check_inactive();
    check_groups();
    CHECK(pipeline_right<true>() == std::vector<bool>({true, true}));
    if (planted_races) {  // real data races: only the deterministic back-end runs them
      check_wait_after_read();
      CHECK(pipeline_right<false>() == std::vector<bool>({false, false}));
    }
  }
  mode = "wait";
  unsetenv("RK_EMU_CP_ASYNC");
  check_aborts();
}

}  // namespace

// Usage: async_tests [fibers] [threads]   (default: both; ThreadSanitizer runs `threads`)
int main(int argc, char** argv) {
  return rk_test::run_backends(argc, argv, "cp.async / ldmatrix", &failures,
                               [](const char* name) {
                                 run_all(name, std::strcmp(name, "fibers") == 0);
                               });
}
