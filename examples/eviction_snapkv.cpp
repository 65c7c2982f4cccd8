// Eviction example: SnapKV on the bundled real dump, layer 0. Compresses a 384-token prompt to 128
// tokens per KV head and prints which positions survived and the bytes before and after.
//
//   ./example_eviction_snapkv [tests/data/seq0]
#include <iostream>

#include "kvc/cache/kv_cache.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/policies/eviction/snapkv.hpp"

int main(int argc, char** argv) try {
  const kvc::KvDump dump = kvc::load_dump(argc > 1 ? argv[1] : "tests/data/seq0");
  struct Config : kvc::DefaultConfig {
    using Eviction = kvc::SnapKv;
  };
  const kvc::CacheShape shape{dump.layers, dump.q_heads, dump.kv_heads, dump.head_dim};
  kvc::KVCache<Config, kvc::Cpu> cache{
      shape, kvc::SnapKv{.budget = 128, .window = 16, .kernel = 7, .pool = kvc::ops::Pool::max}};
  const int prompt = 384;
  const int layer = 0;
  cache.prefill(layer, dump.k(layer).slice(1, 0, prompt), dump.v(layer).slice(1, 0, prompt),
                dump.q(layer).slice(1, 0, prompt));
  cache.compress(layer);
  for (int h = 0; h < cache.storage_heads(layer); ++h) {
    std::cout << "KV head " << h << " keeps " << cache.tokens(layer, h) << " of " << prompt
              << " tokens; first positions:";
    const auto positions = cache.positions(layer, h);
    for (std::size_t i = 0; i < 12 && i < positions.size(); ++i) std::cout << ' ' << positions[i];
    std::cout << " ...\n";
  }
  std::cout << "bytes (f16 K+V): " << cache.bytes(layer).stored() << " instead of "
            << 2 * dump.kv_heads * prompt * dump.head_dim * 2 << '\n';
  return 0;
} catch (const kvc::Error& e) {
  std::cerr << "error: " << e.what() << '\n';
  return 1;
}
