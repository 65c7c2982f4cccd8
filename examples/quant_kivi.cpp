// Quantization example: KIVI 2-bit on the bundled real dump, layer 3: prefill 256 tokens, decode 64
// more, and compare the attention output with the uncompressed one at every step.
//
//   ./example_quant_kivi [tests/data/seq0]
#include <cmath>
#include <iostream>
#include <vector>

#include "kvc/cache/kv_cache.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/ops/attention.hpp"
#include "kvc/policies/quant/kivi.hpp"

int main(int argc, char** argv) try {
  const kvc::KvDump dump = kvc::load_dump(argc > 1 ? argv[1] : "tests/data/seq0");
  struct Config : kvc::DefaultConfig {
    using Quant = kvc::Kivi;
  };
  const kvc::CacheShape shape{dump.layers, dump.q_heads, dump.kv_heads, dump.head_dim};
  kvc::KVCache<Config, kvc::Cpu> cache{
      shape, kvc::Kivi{.key_bits = 2, .value_bits = 2, .group = 32, .residual = 32}};
  const int layer = 3, prompt = 256, steps = 64, hq = dump.q_heads, d = dump.head_dim;
  const auto q = dump.q(layer), k = dump.k(layer), v = dump.v(layer);
  cache.prefill(layer, k.slice(1, 0, prompt), v.slice(1, 0, prompt), q.slice(1, 0, prompt));
  cache.compress(layer);
  const auto bytes = cache.bytes(layer);

  std::vector<float> compressed(hq * d), exact(hq * d);
  double error = 0, norm = 0;
  for (int t = prompt; t < prompt + steps; ++t) {
    // Token t of a [H, T, D] tensor as an [H, D] view.
    auto token = [t](kvc::HostView<const float, 3> x) {
      return kvc::HostView<const float, 2>{
          x.data + t * x.strides[1], {x.shape[0], x.shape[2]}, {x.strides[0], x.strides[2]}};
    };
    cache.append(layer, token(k), token(v));
    cache.attend(layer, token(q), kvc::make_view(compressed.data(), {hq, d}));
    kvc::ops::decode_attention(kvc::Cpu{}, token(q), k.slice(1, 0, t + 1), v.slice(1, 0, t + 1),
                               kvc::make_view(exact.data(), {hq, d}));
    for (int i = 0; i < hq * d; ++i) {
      error += (compressed[i] - exact[i]) * (compressed[i] - exact[i]);
      norm += exact[i] * exact[i];
    }
    cache.step(layer);  // KIVI flushes after the forward
  }
  std::cout << "KIVI-2 on layer " << layer << ": bytes after prefill " << bytes.stored()
            << " (payload " << bytes.payload << ", scales/mins " << bytes.params << ") vs f16 "
            << 2 * dump.kv_heads * prompt * d * 2 << "; relative output error over " << steps
            << " steps " << std::sqrt(error / norm) << '\n';
  return 0;
} catch (const kvc::Error& e) {
  std::cerr << "error: " << e.what() << '\n';
  return 1;
}
