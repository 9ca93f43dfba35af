// The backward kernels run by the host SIMT emulator, without torch, against a naive
// float64 backward: lets ctest run them under ASan/UBSan and ThreadSanitizer (the
// wgrad shared-memory accumulation, the reduce pass's block-uniform recompute, the
// float atomics). The full numerical matrix lives in tests/test_cuda_backward.py.
//
// Usage: conv_bwd_tests [fibers] [threads]   (default: both)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include <cuda_fp16.h>

#include "emu/conv_test_util.h"
#include "kernels/conv_bwd.h"

namespace {

int failures = 0;

using rk_test::Case;

// The tensors in the kernels' dtype: fp32 values kept as float, or as __half.
struct Buffer {
  bool half;
  std::vector<float> f;
  std::vector<__half> h;
  Buffer(bool half_, size_t size, float fill) : half(half_), f(size, fill), h(half_ ? size : 0) {
    for (auto& v : h) v = __float2half_rn(fill);
  }
  void set(const std::vector<float>& values) {  // rounds to the dtype
    f = values;
    if (half)
      for (size_t i = 0; i < f.size(); ++i) h[i] = __float2half_rn(f[i]), f[i] = __half2float(h[i]);
  }
  void* data() { return half ? static_cast<void*>(h.data()) : f.data(); }
  double at(size_t i) const { return half ? __half2float(h[i]) : f[i]; }
};

void expect(const char* what, const Case& k, const char* backend, double err, double tol) {
  if (!(err <= tol)) {
    std::fprintf(stderr, "[%s] %s: n=%d %dx%d c=%d groups=%d stride=%d half=%d: error %g > %g\n",
                 backend, what, k.n, k.h, k.w, k.c, k.groups, k.stride, k.half, err, tol);
    ++failures;
  }
}

// max |got − want| / (max |want| + tiny)
template <typename Got>
double rel_max(size_t size, Got got, const std::vector<double>& want) {
  double diff = 0, scale = 1e-30;
  for (size_t i = 0; i < size; ++i) {
    const double d = std::fabs(got(i) - want[i]);
    diff = std::isnan(d) ? INFINITY : std::fmax(diff, d);
    scale = std::fmax(scale, std::fabs(want[i]));
  }
  return diff / scale;
}

void run_case(const Case& k, const char* backend) {
  std::mt19937 rng(k.c * 17 + k.stride + k.half);
  std::normal_distribution<float> normal;
  const int cg = k.cg(), ho = k.h_out(), wo = k.w_out();
  const size_t in_size = static_cast<size_t>(k.n) * k.h * k.w * k.c;
  const size_t out_size = static_cast<size_t>(k.n) * ho * wo * k.c;
  const size_t pixels = out_size / k.c;
  std::vector<float> values(in_size);
  Buffer x(k.half, in_size, 0), wt(k.half, static_cast<size_t>(k.c) * 9 * cg, 0);
  for (float& v : values) v = normal(rng);
  x.set(values);
  values.assign(wt.f.size(), 0);
  for (float& v : values) v = normal(rng) / 6;
  wt.set(values);
  std::vector<float> gamma(k.c), beta(k.c);
  for (int c = 0; c < k.c; ++c) gamma[c] = 0.5f + 0.02f * c, beta[c] = 0.1f * (c % 5) - 0.2f;
  gamma[1] = 0.0f;  // one channel tile recomputes even when recovering

  // Float64 forward: c, batch statistics, y (rounded to the dtype), random dy.
  std::vector<double> c(out_size, 0.0), mean(k.c, 0.0), var(k.c, 0.0);
  rk_test::for_each_product(k, [&](size_t o, size_t i, size_t w) { c[o] += x.at(i) * wt.at(w); });
  for (size_t i = 0; i < out_size; ++i) mean[i % k.c] += c[i] / pixels;
  for (size_t i = 0; i < out_size; ++i) var[i % k.c] += (c[i] - mean[i % k.c]) * (c[i] - mean[i % k.c]) / pixels;
  std::vector<float> mean_f(k.c), var_f(k.c), invstd_f(k.c), y_values(out_size), dy_values(out_size);
  for (int co = 0; co < k.c; ++co)
    mean_f[co] = mean[co], var_f[co] = var[co], invstd_f[co] = 1 / std::sqrt(var_f[co] + 1e-5f);
  for (size_t i = 0; i < out_size; ++i) {
    const int co = i % k.c;
    y_values[i] = std::fmax((c[i] - mean[co]) * invstd_f[co] * gamma[co] + beta[co], 0.0);
    dy_values[i] = normal(rng);
  }
  Buffer y(k.half, out_size, 0), dy(k.half, out_size, 0);
  y.set(y_values);
  dy.set(dy_values);

  // Float64 backward.
  std::vector<double> sum_dz(k.c, 0.0), sum_dz_xhat(k.c, 0.0), dc(out_size), dx(in_size, 0.0),
      dw(wt.f.size(), 0.0);
  auto dz = [&](size_t i) { return y.at(i) > 0 ? dy.at(i) : 0.0; };
  auto xhat = [&](size_t i) { return (c[i] - mean[i % k.c]) * invstd_f[i % k.c]; };
  for (size_t i = 0; i < out_size; ++i) sum_dz[i % k.c] += dz(i), sum_dz_xhat[i % k.c] += dz(i) * xhat(i);
  std::vector<double> dz_scale(k.c), dc_shift(k.c), dc_xhat(k.c);
  for (int co = 0; co < k.c; ++co) {
    dz_scale[co] = gamma[co] * invstd_f[co];
    dc_shift[co] = dz_scale[co] * sum_dz[co] / pixels;
    dc_xhat[co] = dz_scale[co] * sum_dz_xhat[co] / pixels;
  }
  for (size_t i = 0; i < out_size; ++i) {
    const int co = i % k.c;
    dc[i] = dz_scale[co] * dz(i) - dc_shift[co] - dc_xhat[co] * xhat(i);
  }
  rk_test::for_each_product(k, [&](size_t o, size_t i, size_t w) {
    dx[i] += dc[o] * wt.at(w);
    dw[w] += dc[o] * x.at(i);
  });

  // The kernels, as the glue (csrc/conv_bn_relu.cpp) runs them in training.
  rk::ConvBwdParams b{};
  rk::ConvFwdParams& p = b.conv;
  p.x = x.data();
  p.wt = wt.data();
  p.n = k.n, p.h = k.h, p.w = k.w, p.c_in = k.c, p.c_out = k.c, p.groups = k.groups;
  p.stride = k.stride, p.h_out = ho, p.w_out = wo;
  p.dtype = k.half ? rk::DType::kFloat16 : rk::DType::kFloat32;
  b.dy = dy.data();
  b.y = y.data();
  b.gamma = gamma.data();
  b.beta = beta.data();
  b.mean = mean_f.data();
  b.var = var_f.data();
  b.eps = 1e-5f;
  const int blocks = rk::conv_fwd_blocks_x(p);
  const double tol = k.half ? 1e-2 : 1e-4;
  std::vector<float> partial(static_cast<size_t>(blocks) * k.c * 2), sums(2 * k.c);
  b.partial = partial.data();
  b.sum_dz = sums.data();
  b.sum_dz_xhat = sums.data() + k.c;
  b.count = static_cast<float>(pixels);
  for (bool recover : {true, false}) {
    std::fill(partial.begin(), partial.end(), NAN);
    std::fill(sums.begin(), sums.end(), NAN);
    b.recover_xhat = recover;
    rk::launch_bwd_reduce(b, nullptr);
    std::vector<double> want(sum_dz);
    want.insert(want.end(), sum_dz_xhat.begin(), sum_dz_xhat.end());
    expect(recover ? "reduce (recover)" : "reduce (recompute)", k, backend,
           rel_max(sums.size(), [&](size_t i) { return sums[i]; }, want), tol);
  }
  Buffer dc_k(k.half, out_size, NAN), dx_k(k.half, in_size, NAN);
  b.dc = dc_k.data();
  rk::launch_bwd_dc(b, nullptr);
  expect("dc", k, backend, rel_max(out_size, [&](size_t i) { return dc_k.at(i); }, dc), tol);
  b.dx = dx_k.data();
  // Each group's weights transposed with the taps flipped (read where dgrad_as_conv).
  std::vector<float> flipped(wt.f.size());
  for (int co = 0; co < k.c; ++co)
    for (int tap = 0; tap < 9; ++tap)
      for (int i = 0; i < cg; ++i)
        flipped[((co / cg * cg + i) * 9 + 8 - tap) * cg + co % cg] = wt.f[(co * 9 + tap) * cg + i];
  Buffer wt_dgrad(k.half, flipped.size(), 0);
  wt_dgrad.set(flipped);
  b.wt_dgrad = wt_dgrad.data();
  rk::launch_bwd_dgrad(b, rk::GradSource::kConvGrad, nullptr);
  expect("dgrad", k, backend, rel_max(in_size, [&](size_t i) { return dx_k.at(i); }, dx), tol);
  // The default split, and blocks looping over several pixel tiles (1 and 2 chunks).
  for (int chunks : {rk::wgrad_chunks(p), 1, 2})
  for (bool deterministic : {false, true}) {
    b.wgrad_chunks = chunks;
    b.deterministic = deterministic;
    std::vector<float> dw_k(static_cast<size_t>(deterministic ? b.wgrad_chunks : 1) * dw.size(),
                            deterministic ? NAN : 0.0f);
    b.dw = dw_k.data();
    rk::launch_bwd_wgrad(b, rk::GradSource::kConvGrad, nullptr);
    std::vector<double> total(dw.size(), 0.0);
    for (size_t i = 0; i < dw_k.size(); ++i) total[i % dw.size()] += dw_k[i];
    expect(deterministic ? "wgrad (partials)" : "wgrad (atomics)", k, backend,
           rel_max(dw.size(), [&](size_t i) { return total[i]; }, dw), tol);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const Case cases[] = {{2, 7, 5, 12, 3, 1, false}, {1, 8, 6, 24, 3, 2, false},
                        {3, 4, 5, 32, 8, 1, false}, {1, 5, 5, 36, 3, 2, false},
                        {2, 5, 5, 32, 2, 1, true},  {1, 7, 6, 32, 4, 2, true},
                        // more than one pixel tile (128 output pixels) per block in wgrad
                        {2, 12, 13, 8, 2, 1, false}, {1, 21, 25, 16, 1, 2, true},
                        // fp32 at 64 channels per group: the reduce block needs the
                        // shared-memory opt-in (16 KiB static + 36 KiB dynamic)
                        {1, 5, 4, 128, 2, 1, false},
                        // 80 channels per group: the generic kernels' channel chunks
                        {1, 4, 5, 160, 2, 2, false}};
  return rk_test::run_backends(argc, argv, "backward", &failures, [&](const char* backend) {
    for (const Case& k : cases) run_case(k, backend);
  });
}
