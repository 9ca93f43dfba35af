// Shared by the torch-free kernel tests (test_conv_fwd.cpp, test_conv_bwd.cpp): the
// test case, NHWC indexing, the naive convolution's index walk and the emulator
// back-end loop (which test_async.cpp uses too).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace rk_test {

struct Case {
  int n, h, w, c, groups, stride;
  bool half;  // fp16 tensors (the tensor-core path from 8 channels per group)
  int cg() const { return c / groups; }
  int h_out() const { return (h - 1) / stride + 1; }
  int w_out() const { return (w - 1) / stride + 1; }
};

inline size_t nhwc(int n, int h, int w, int c, int H, int W, int C) {
  return ((static_cast<size_t>(n) * H + h) * W + w) * C + c;
}

// Calls fn(output index, input index, weight index) for every product x·w of the
// grouped 3x3 conv (padding 1): NHWC tensors, [C_out][3][3][Cg] weights.
template <typename Fn>
void for_each_product(const Case& k, Fn fn) {
  const int cg = k.cg(), ho = k.h_out(), wo = k.w_out();
  for (int n = 0; n < k.n; ++n)
    for (int oh = 0; oh < ho; ++oh)
      for (int ow = 0; ow < wo; ++ow)
        for (int co = 0; co < k.c; ++co)
          for (int tap = 0; tap < 9; ++tap) {
            const int ih = oh * k.stride - 1 + tap / 3, iw = ow * k.stride - 1 + tap % 3;
            if (ih < 0 || ih >= k.h || iw < 0 || iw >= k.w) continue;
            const size_t out = nhwc(n, oh, ow, co, ho, wo, k.c);
            for (int ci = 0; ci < cg; ++ci)
              fn(out, nhwc(n, ih, iw, co / cg * cg + ci, k.h, k.w, k.c),
                 (static_cast<size_t>(co) * 9 + tap) * cg + ci);
          }
}

// Runs run(backend) for each emulator back-end named on the command line (both when
// none is), with RK_EMU_BACKEND set; returns main's exit status from *failures.
template <typename Run>
int run_backends(int argc, char** argv, const char* what, const int* failures, Run run) {
  for (const char* backend : {"fibers", "threads"}) {
    bool wanted = argc == 1;
    for (int i = 1; i < argc; ++i) wanted |= std::strcmp(argv[i], backend) == 0;
    if (!wanted) continue;
    setenv("RK_EMU_BACKEND", backend, 1);
    run(backend);
  }
  std::printf("emulated %s kernel tests: %s\n", what, *failures ? "FAILED" : "all passed");
  return *failures ? 1 : 0;
}

}  // namespace rk_test
