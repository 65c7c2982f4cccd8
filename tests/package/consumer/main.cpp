// A downstream program built against an installed (or build-tree) kvc package. Exits non-zero when
// a result is wrong; every expected value is computed by hand below.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/core/view.hpp"
#include "kvc/ops/attention.hpp"
#include "kvc/ops/quantize.hpp"
#ifdef KVC_CONSUMER_WITH_CUDA
#include "kvc/core/cuda_runtime.hpp"
#endif

namespace {

int failures = 0;

void expect_near(const char* what, double got, double want, double tolerance) {
  if (!(std::fabs(got - want) <= tolerance)) {
    std::printf("FAIL %s: got %.9g, want %.9g (tolerance %g)\n", what, got, want, tolerance);
    ++failures;
  }
}

// Group {0, 1, 2, 3} at 2 bits: min 0, scale (3 - 0) / 3 = 1, so the codes are the values.
void check_quantize_group() {
  const std::vector<float> x = {0.0f, 1.0f, 2.0f, 3.0f};
  std::vector<std::uint8_t> codes(x.size(), 0xFF);
  const kvc::ops::GroupParams params = kvc::ops::quantize_group(kvc::Cpu{}, x, 2, codes);
  expect_near("quantize_group scale", static_cast<float>(params.scale), 1.0, 0.0);
  expect_near("quantize_group minimum", static_cast<float>(params.minimum), 0.0, 0.0);
  for (std::size_t i = 0; i < x.size(); ++i)
    expect_near("quantize_group code", codes[i], x[i], 0.0);
}

// Hq = 2 query heads sharing Hkv = 1 KV head, n = 2 keys, D = 2, scale 1/sqrt(2).
// Head 0: q = (1, 0), logits (1, 0)/sqrt(2); head 1: q = (0, 2), logits (0, 2)/sqrt(2).
void check_decode_attention() {
  const std::vector<float> q = {1, 0, 0, 2};    // [Hq=2, D=2]
  const std::vector<float> k = {1, 0, 0, 1};    // [Hkv=1, n=2, D=2]
  const std::vector<float> v = {10, 0, 0, 20};  // [Hkv=1, n=2, D=2]
  std::vector<float> out(4, -1.0f);             // [Hq=2, D=2]
  kvc::ops::decode_attention(
      kvc::Cpu{}, kvc::make_view(q.data(), {2, 2}), kvc::make_view(k.data(), {1, 2, 2}),
      kvc::make_view(v.data(), {1, 2, 2}), kvc::make_view(out.data(), {2, 2}));
  const double s = 1.0 / std::sqrt(2.0);
  const double p0 = 1.0 / (1.0 + std::exp(-s));        // head 0: weight of key 0
  const double p1 = 1.0 / (1.0 + std::exp(-2.0 * s));  // head 1: weight of key 1
  expect_near("decode_attention out[0][0]", out[0], 10.0 * p0, 1e-4);
  expect_near("decode_attention out[0][1]", out[1], 20.0 * (1.0 - p0), 1e-4);
  expect_near("decode_attention out[1][0]", out[2], 10.0 * (1.0 - p1), 1e-4);
  expect_near("decode_attention out[1][1]", out[3], 20.0 * p1, 1e-4);
}

}  // namespace

int main() {
  try {
    check_quantize_group();
    check_decode_attention();
#ifdef KVC_CONSUMER_WITH_CUDA
    std::printf("kvc::cuda linked; CUDA devices visible: %d\n", kvc::cuda_runtime::device_count());
#endif
  } catch (const kvc::Error& e) {
    std::printf("FAIL: kvc::Error: %s\n", e.what());
    return 1;
  }
  if (failures != 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("kvc consumer: all checks passed\n");
  return 0;
}
