// Known-answer tests of the emulator's access counting (csrc/emu/count.h) and of the
// access helpers (csrc/kernels/access.cuh): the shared-memory bank rules, and small
// kernels whose requests, sectors, coalescing, wavefronts and mma work are known
// (among them a cp.async + ldmatrix + mma product, swizzled and not).
// Fibers back-end only (counting needs it). Built and run by CMake/ctest
// (target count_tests). Exit status 0 when all pass.
#include "emu/count_types.h"
#include "kernels/conv_common.cuh"
#include "emu/abort_test.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <random>
#include <string>

namespace {

using rk::emu::testing::aborts_with;

int failures = 0;

#define CHECK_EQ(got, want)                                                             \
  do {                                                                                  \
    const double got_ = (got), want_ = (want);                                          \
    if (std::fabs(got_ - want_) > 1e-9 * std::fabs(want_)) {                            \
      std::fprintf(stderr, "%s:%d: %s = %g, expected %g\n", __FILE__, __LINE__, #got, got_, \
                   want_);                                                              \
      ++failures;                                                                       \
    }                                                                                   \
  } while (0)

#define CHECK(cond)                                                       \
  do {                                                                    \
    if (!(cond)) {                                                        \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                         \
    }                                                                     \
  } while (0)

// ---- the bank rules ----------------------------------------------------------------

void test_bank_rules() {
  uint64_t a[32];
  auto lanes = [&](uint64_t stride) {
    for (int l = 0; l < 32; ++l) a[l] = 4096 + l * stride;
  };
  lanes(4);  // 32 consecutive words
  CHECK_EQ(rk::emu::smem_wavefronts(a, 4, 0xffffffffu), 1);
  lanes(0);  // broadcast
  CHECK_EQ(rk::emu::smem_wavefronts(a, 4, 0xffffffffu), 1);
  lanes(128);  // every lane in bank 0, distinct words: 32-way
  CHECK_EQ(rk::emu::smem_wavefronts(a, 4, 0xffffffffu), 32);
  lanes(8);  // 64-bit, consecutive: one wavefront per half warp
  CHECK_EQ(rk::emu::smem_wavefronts(a, 8, 0xffffffffu), 2);
  lanes(16);  // 128-bit, consecutive: one per quarter warp
  CHECK_EQ(rk::emu::smem_wavefronts(a, 16, 0xffffffffu), 4);
  lanes(128);  // 128-bit rows 128 B apart: 8 distinct words per bank in each quarter
  CHECK_EQ(rk::emu::smem_wavefronts(a, 16, 0xffffffffu), 32);
  CHECK_EQ(rk::emu::smem_wavefronts(a, 4, 0x1u), 1);  // one lane
  CHECK_EQ(rk::emu::smem_wavefronts(a, 4, 0u), 0);    // none

  // ldmatrix.x4: 8 rows of 16 B per matrix.
  for (int l = 0; l < 32; ++l) a[l] = 4096 + l * 16;  // rows packed: conflict-free
  CHECK_EQ(rk::emu::ldmatrix_wavefronts(a, 4), 4);
  for (int l = 0; l < 32; ++l) a[l] = 4096 + l * 128;  // rows 128 B apart: 8-way
  CHECK_EQ(rk::emu::ldmatrix_wavefronts(a, 4), 32);
  for (int l = 0; l < 32; ++l) a[l] = 4096 + l * 128 + 16 * (l % 8);  // chunk ^= row: swizzled
  CHECK_EQ(rk::emu::ldmatrix_wavefronts(a, 4), 4);
  CHECK_EQ(rk::emu::ldmatrix_wavefronts(a, 1), 1);  // .x1 reads lanes 0-7 only
}

// ---- small kernels -------------------------------------------------------------------

__global__ void copy_kernel(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  rk::store_global(out + i, rk::load_global(in + i));
}

__global__ void gather_kernel(const float* in, float* out, int stride) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  rk::store_global(out + i, rk::load_global(in + static_cast<long>(i) * stride));
}

__global__ void tail_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  rk::store_global(out + i, rk::load_global(in + i, i < n), i < n);
}

__global__ void conflict_kernel(float* out) {
  STATIC_SHARED(float, s, [32 * 32]);
  rk::store_shared(s + threadIdx.x * 32, 1.0f);  // every lane in bank 0
  __syncthreads();
  rk::store_global(out + threadIdx.x, rk::load_shared(s + threadIdx.x));  // conflict-free
}

__global__ void mma_kernel(float* out) {
  // A: 16 x 16 with only k < 9 non-zero (a 9-deep K padded to 16); B all ones.
  const int g = rk::emu::lane_id() / 4, t = rk::emu::lane_id() % 4;
  (void)g;
  uint32_t a[4], b[2];
  const uint32_t one = 0x3C00u;  // fp16 1.0
  auto pair = [&](int k) { return (k < 9 ? one : 0u) | (k + 1 < 9 ? one : 0u) << 16; };
  a[0] = a[1] = pair(2 * t);
  a[2] = a[3] = pair(2 * t + 8);
  b[0] = b[1] = one | one << 16;
  float d[4] = {0, 0, 0, 0};
  rk::detail::mma_m16n8k16<__half>(d, a, b);
  rk::store_global(out + threadIdx.x, d[0]);
}

__global__ void loop_kernel(const float* in, float* out, long n) {
  float sum = 0.0f;
  const long iterations = rk::loop_iterations(n);
  for (long it = 0; it < iterations; ++it) {
    rk::loop_iteration(it);
    sum = rk::fma_count(rk::load_global(in + it * 32 + threadIdx.x), 2.0f, sum);
  }
  rk::loop_done();
  rk::store_global(out + threadIdx.x, sum);
}

// A persistent loop with a barrier inside: every thread's accesses keep the loop's
// weight until that thread leaves the loop (the first thread out must not reset it
// for the others).
__global__ void loop_barrier_kernel(const float* in, float* out, long n) {
  float sum = 0.0f;
  const long iterations = rk::loop_iterations(n);
  for (long it = 0; it < iterations; ++it) {
    rk::loop_iteration(it);
    __syncthreads();
    sum = rk::fma_count(rk::load_global(in + it * 64 + threadIdx.x), 2.0f, sum);
  }
  rk::loop_done();
  rk::store_global(out + threadIdx.x, sum);
}

__global__ void divergent_kernel(const float* in, float* out) {
  float v = rk::load_global(in + threadIdx.x);
  if (threadIdx.x == 3) v += rk::load_global(in);  // skipped by the other lanes
  rk::store_global(out + threadIdx.x, v);
}

__global__ void misaligned_vector_kernel(const float* in, float* out) {
  const float4 v = rk::load_global(reinterpret_cast<const float4*>(in + 1));  // 4-byte aligned
  rk::store_global(out + threadIdx.x, v.x);
}

__global__ void skipped_before_barrier_kernel(const float* in, float* out) {
  float v = 0.0f;
  if (threadIdx.x % 2 == 0) v = rk::load_global(in + threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = v;
}

// One warp stages a 16 x 64 bf16 A tile (rows of 128 B) and a 64 x 8 B tile with
// 16-byte cp.async copies, builds the fragments with ldmatrix (A: .x4 per 16-deep k
// step; B: .x2.trans) and multiplies them with mma.sync into D (16 x 8, fp32).
// kSwizzled puts A's 16-byte chunk c of row r at chunk c ^ (r % 8); kPlain leaves it
// at c (8-way conflicts: a matrix's 8 rows share one chunk column); kWrongSwizzle
// stages swizzled and reads plain (the planted bug: a wrong product).
enum class Layout { kSwizzled, kPlain, kWrongSwizzle };

template <Layout L>
__global__ void ldmatrix_gemm_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b, float* d) {
  STATIC_SHARED(__nv_bfloat16, sa, [16 * 64]);
  STATIC_SHARED(__nv_bfloat16, sb, [64 * 8]);
  const int lane = rk::emu::lane_id();
  auto chunk = [](int row, int c, bool swizzled) {  // element offset of a 16-byte chunk
    return 8 * (8 * row + (swizzled ? c ^ (row % 8) : c));
  };
  for (int i = lane; i < 16 * 8; i += 32)
    rk::cp_async<16>(sa + chunk(i / 8, i % 8, L != Layout::kPlain), a + 8 * i);
  for (int i = lane; i < 64; i += 32) rk::cp_async<16>(sb + 8 * i, b + 8 * i);
  rk::cp_async_commit();
  rk::cp_async_wait<0>();
  __syncthreads();
  float acc[4] = {0, 0, 0, 0};
  for (int ks = 0; ks < 4; ++ks) {
    // Matrices 0-3: rows 0-7 / 8-15 at k 0-7, then the same at k 8-15 (a[0..3]).
    const int row = lane % 8 + 8 * (lane / 8 % 2), c = 2 * ks + lane / 16;
    uint32_t fa[4], fb[2];
    rk::ldmatrix<4>(fa, sa + chunk(row, c, L == Layout::kSwizzled));
    rk::ldmatrix<2, true>(fb, sb + 8 * (16 * ks + lane % 16));
    rk::detail::mma_m16n8k16<__nv_bfloat16>(acc, fa, fb);
  }
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) rk::store_global(d + 8 * (g + 8 * (i / 2)) + 2 * t + i % 2, acc[i]);
}

rk::emu::LaunchCounts count_one(const std::function<void()>& launch, long window = 1 << 20,
                                long warmup = 0, long iterations = 0) {
  rk::emu::CountConfig config;
  config.window_blocks = window;
  config.warmup_blocks = warmup;
  config.max_iterations = iterations;
  rk::emu::count_begin(config);
  launch();
  std::vector<rk::emu::LaunchCounts> launches = rk::emu::count_end();
  if (launches.size() != 1) {
    std::fprintf(stderr, "expected one counted launch, got %zu\n", launches.size());
    std::abort();
  }
  return launches[0];
}

template <Layout L>
bool gemm_right(rk::emu::LaunchCounts* counts) {
  alignas(128) static __nv_bfloat16 a[16 * 64], b[64 * 8];
  alignas(128) static float d[16 * 8];
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> small(-8, 8);  // exact in bf16 and in the fp32 sums
  float fa[16 * 64], fb[64 * 8];
  for (int i = 0; i < 16 * 64; ++i) a[i] = __float2bfloat16_rn(fa[i] = small(rng));
  for (int i = 0; i < 64 * 8; ++i) b[i] = __float2bfloat16_rn(fb[i] = small(rng));
  for (float& v : d) v = NAN;
  *counts =
      count_one([&] { RK_LAUNCH(ldmatrix_gemm_kernel<L>, dim3(1), dim3(32), 0, 0)(a, b, d); });
  bool right = true;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double want = 0;
      for (int k = 0; k < 64; ++k) want += static_cast<double>(fa[64 * m + k]) * fb[8 * k + n];
      right &= d[8 * m + n] == want;
    }
  return right;
}

void test_ldmatrix_gemm() {
  rk::emu::LaunchCounts l;
  CHECK(gemm_right<Layout::kSwizzled>(&l));
  CHECK_EQ(l.mma, 4);
  CHECK_EQ(l.global_requests, 4 + 2 + 4);  // A and B copies, D stores
  CHECK_EQ(l.global_bytes, 16 * 64 * 2 + 64 * 8 * 2 + 16 * 8 * 4);
  // Copies' shared writes: 6 x 4 quarter warps; ldmatrix: 4 x (4 + 2) matrices.
  CHECK_EQ(l.smem_wavefronts, 24 + 24);
  CHECK_EQ(l.smem_ideal_wavefronts, 24 + 24);
  CHECK(gemm_right<Layout::kPlain>(&l));
  CHECK_EQ(l.smem_wavefronts, 24 + 4 * (4 * 8 + 2));  // A's matrices 8-way
  CHECK_EQ(l.smem_ideal_wavefronts, 24 + 24);
  CHECK(!gemm_right<Layout::kWrongSwizzle>(&l));
}

void test_coalesced_copy() {
  alignas(128) static float in[256], out[256];
  const auto l = count_one([&] { RK_LAUNCH(copy_kernel, dim3(2), dim3(128), 0, 0)(in, out); });
  CHECK_EQ(l.global_requests, 16);   // 8 warps x (load + store)
  CHECK_EQ(l.global_sectors, 64);    // 4 sectors per request
  CHECK_EQ(l.global_bytes, 16 * 128);
  CHECK_EQ(l.global_wavefronts, 16);  // one 128-byte line per request
  CHECK_EQ(l.sector.size(), 64u);     // 32 sectors read + 32 written, each once
  CHECK_EQ(l.counted_blocks, 2);
}

void test_strided_gather() {
  alignas(128) static float in[32 * 32], out[32];
  const auto l =
      count_one([&] { RK_LAUNCH(gather_kernel, dim3(1), dim3(32), 0, 0)(in, out, 32); });
  CHECK_EQ(l.global_requests, 2);
  CHECK_EQ(l.global_sectors, 32 + 4);  // a sector per lane, then a coalesced store
  CHECK_EQ(l.global_bytes, 2 * 128);
  CHECK_EQ(l.global_wavefronts, 32 + 1);
}

void test_predicated_tail() {
  alignas(128) static float in[64], out[64];
  const auto l =
      count_one([&] { RK_LAUNCH(tail_kernel, dim3(1), dim3(64), 0, 0)(in, out, 40); });
  CHECK_EQ(l.global_requests, 4);       // the second warp's 8 live lanes still issue
  CHECK_EQ(l.global_bytes, 2 * 40 * 4);  // predicated-off lanes ask for nothing
  CHECK_EQ(l.global_sectors, 2 * 5);
}

void test_bank_conflict() {
  alignas(128) static float out[32];
  const auto l = count_one([&] { RK_LAUNCH(conflict_kernel, dim3(1), dim3(32), 0, 0)(out); });
  CHECK_EQ(l.smem_wavefronts, 32 + 1);
  CHECK_EQ(l.smem_ideal_wavefronts, 1 + 1);
}

void test_padded_mma() {
  alignas(128) static float out[32];
  const auto l = count_one([&] { RK_LAUNCH(mma_kernel, dim3(1), dim3(32), 0, 0)(out); });
  CHECK_EQ(l.mma, 1);
  CHECK_EQ(l.executed_macs, 16 * 8 * 16);
  CHECK_EQ(l.useful_macs, 16 * 8 * 9);
  CHECK_EQ(out[0], 9.0f);  // the product itself: 9 ones
}

void test_window() {
  alignas(128) static float in[1000 * 32], out[1000 * 32];
  const auto l = count_one(
      [&] { RK_LAUNCH(copy_kernel, dim3(1000), dim3(32), 0, 0)(in, out); }, 100, 50);
  CHECK_EQ(l.blocks, 1000);
  CHECK_EQ(l.counted_blocks, 100);
  CHECK_EQ(l.warmup_blocks, 50);
  CHECK_EQ(l.window_start, 0.45);  // centred: blocks 450..549, warm-up 400..449
  CHECK_EQ(l.global_requests, 200);
  CHECK_EQ(l.sector.size(), 150u * 8);  // warm-up blocks' sectors are in the trace
  long counted = 0;
  for (uint8_t c : l.counted) counted += c;
  CHECK_EQ(counted, 100 * 8);
  CHECK_EQ(l.sector[0], reinterpret_cast<uintptr_t>(in + 400 * 32) / 32);
}

void test_persistent_loop() {
  alignas(128) static float in[10 * 32], out[32];
  for (int i = 0; i < 10 * 32; ++i) in[i] = static_cast<float>(i);
  const auto l = count_one(
      [&] { RK_LAUNCH(loop_kernel, dim3(1), dim3(32), 0, 0)(in, out, 10L); }, 1 << 20, 0, 2);
  CHECK_EQ(l.global_requests, 10 + 1);  // 2 sampled iterations weighted x5, then the store
  CHECK_EQ(l.fma, 10 * 32);
  CHECK_EQ(out[0], 2.0f * (in[0] + in[32]));  // only 2 iterations ran
  CHECK_EQ(l.weight[0], 5.0f);
}

void test_persistent_loop_with_barrier() {
  alignas(128) static float in[10 * 64], out[64];
  const auto l = count_one(
      [&] { RK_LAUNCH(loop_barrier_kernel, dim3(1), dim3(64), 0, 0)(in, out, 10L); }, 1 << 20,
      0, 2);
  CHECK_EQ(l.global_requests, 2 * (10 + 1));  // two warps: 10 loads (weighted), one store
  CHECK_EQ(l.fma, 10 * 64);
}

void test_divergence_aborts() {
  alignas(128) static float in[32], out[32];
  CHECK(aborts_with([&] { RK_LAUNCH(divergent_kernel, dim3(1), dim3(32), 0, 0)(in, out); },
                    "divergent memory access"));
  CHECK(aborts_with(
      [&] { RK_LAUNCH(skipped_before_barrier_kernel, dim3(1), dim3(32), 0, 0)(in, out); },
      "divergent memory access"));
  CHECK(aborts_with(
      [&] { RK_LAUNCH(misaligned_vector_kernel, dim3(1), dim3(32), 0, 0)(in, out); },
      "misaligned address: a 16-byte access"));
}

}  // namespace

int main() {
  test_bank_rules();
  test_coalesced_copy();
  test_strided_gather();
  test_predicated_tail();
  test_bank_conflict();
  test_padded_mma();
  test_ldmatrix_gemm();
  test_window();
  test_persistent_loop();
  test_persistent_loop_with_barrier();
  test_divergence_aborts();
  if (failures) std::fprintf(stderr, "%d check(s) failed\n", failures);
  return failures ? 1 : 0;
}
