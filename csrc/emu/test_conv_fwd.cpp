// The forward kernels run by the host SIMT emulator, without torch, against a naive
// float64 convolution: lets ctest run them under ASan/UBSan (out-of-bounds halo
// reads, uninitialised shared memory) and ThreadSanitizer (missing barriers, on the
// threads back-end). The full numerical matrix lives in tests/test_cuda_forward.py.
//
// Usage: conv_fwd_tests [fibers] [threads]   (default: both)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include <cuda_fp16.h>

#include "emu/conv_test_util.h"
#include "kernels/conv_fwd.h"

namespace {

int failures = 0;

using rk_test::Case;

// Naive conv in double.
std::vector<double> conv_ref(const Case& k, const std::vector<float>& x, const std::vector<float>& wt) {
  std::vector<double> out(static_cast<size_t>(k.n) * k.h_out() * k.w_out() * k.c, 0.0);
  rk_test::for_each_product(k, [&](size_t o, size_t i, size_t w) {
    out[o] += static_cast<double>(x[i]) * wt[w];
  });
  return out;
}

void run_case(const Case& k, const char* backend, bool raw) {
  std::mt19937 rng(k.c * 31 + k.stride);
  std::normal_distribution<float> normal;
  const int cg = k.cg(), h_out = k.h_out(), w_out = k.w_out();
  std::vector<float> x(static_cast<size_t>(k.n) * k.h * k.w * k.c), wt(static_cast<size_t>(k.c) * 9 * cg);
  // Half cases: values rounded to fp16, so the float64 reference sees the same inputs.
  auto round = [&](float v) { return k.half ? __half2float(__float2half_rn(v)) : v; };
  for (float& v : x) v = round(normal(rng) + 3.0f);
  for (float& v : wt) v = round(normal(rng) / 6.0f);
  std::vector<__half> x_h(x.size()), wt_h(wt.size()), y_h;
  for (size_t i = 0; i < x.size(); ++i) x_h[i] = __float2half_rn(x[i]);
  for (size_t i = 0; i < wt.size(); ++i) wt_h[i] = __float2half_rn(wt[i]);
  std::vector<float> gamma(k.c), beta(k.c);
  for (int c = 0; c < k.c; ++c) gamma[c] = 0.5f + 0.01f * c, beta[c] = 0.1f * (c % 7) - 0.3f;

  rk::ConvFwdParams p{};
  p.x = k.half ? static_cast<const void*>(x_h.data()) : x.data();
  p.wt = k.half ? static_cast<const void*>(wt_h.data()) : wt.data();
  p.n = k.n, p.h = k.h, p.w = k.w, p.c_in = k.c, p.c_out = k.c, p.groups = k.groups;
  p.stride = k.stride, p.h_out = h_out, p.w_out = w_out;
  p.dtype = k.half ? rk::DType::kFloat16 : rk::DType::kFloat32;
  const int blocks = rk::conv_fwd_blocks_x(p);
  std::vector<float> partial(static_cast<size_t>(blocks) * k.c * 3, NAN);
  std::vector<float> mean(k.c), var(k.c), scale(k.c), shift(k.c);
  std::vector<float> y(static_cast<size_t>(k.n) * h_out * w_out * k.c, NAN);
  y_h.assign(y.size(), __float2half_rn(NAN));
  p.y = k.half ? static_cast<void*>(y_h.data()) : y.data();
  p.partial = partial.data();
  rk::launch_conv_fwd(p, raw ? rk::Pass::kStatsRaw : rk::Pass::kStats, nullptr);
  rk::FinalizeParams f{partial.data(), blocks, k.c, gamma.data(), beta.data(), 1e-5f,
                       mean.data(), var.data(), scale.data(), shift.data()};
  rk::launch_finalize(f, nullptr);
  p.scale = scale.data();
  p.shift = shift.data();
  if (raw) {
    rk::launch_normalize(p, nullptr);
  } else {
    rk::launch_conv_fwd(p, rk::Pass::kWrite, nullptr);
  }
  if (k.half)
    for (size_t i = 0; i < y.size(); ++i) y[i] = __half2float(y_h[i]);
  const double out_tol = k.half ? 2e-3 : 1e-4;

  const std::vector<double> c = conv_ref(k, x, wt);
  const size_t count = c.size() / k.c;
  double worst = 0;
  for (int co = 0; co < k.c; ++co) {
    double m = 0, v = 0;
    for (size_t i = 0; i < count; ++i) m += c[i * k.c + co];
    m /= count;
    for (size_t i = 0; i < count; ++i) v += (c[i * k.c + co] - m) * (c[i * k.c + co] - m);
    v /= count;
    worst = std::fmax(worst, std::fabs(mean[co] - m) / (1 + std::fabs(m)));
    worst = std::fmax(worst, std::fabs(var[co] - v) / v);
    const double s = gamma[co] / std::sqrt(v + 1e-5);
    for (size_t i = 0; i < count; ++i) {
      const double want = std::fmax((c[i * k.c + co] - m) * s + beta[co], 0.0);
      const double got = y[i * k.c + co];
      if (!(std::fabs(got - want) <= out_tol * (1 + std::fabs(want)))) worst = std::fmax(worst, 1.0);
    }
  }
  if (!(worst < 1e-4)) {
    std::fprintf(stderr, "[%s, %s] n=%d %dx%d c=%d groups=%d stride=%d half=%d: worst error %g\n",
                 backend, raw ? "raw" : "recompute", k.n, k.h, k.w, k.c, k.groups, k.stride,
                 k.half, worst);
    ++failures;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const Case cases[] = {{2, 7, 5, 12, 3, 1, false}, {1, 9, 7, 24, 3, 2, false},
                        {2, 5, 6, 64, 2, 1, false},  {1, 6, 5, 36, 3, 2, false},
                        {3, 3, 4, 32, 8, 1, false},  {2, 5, 5, 32, 2, 1, false},
                        {1, 4, 5, 128, 2, 2, false}, {2, 5, 5, 16, 2, 1, true},
                        {1, 5, 3, 64, 2, 2, true}};
  return rk_test::run_backends(argc, argv, "forward", &failures, [&](const char* backend) {
    for (const Case& k : cases)
      for (bool raw : {true, false}) run_case(k, backend, raw);
  });
}
