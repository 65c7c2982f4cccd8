// `kvc eval --device cuda` (kvc/eval/evaluate_cuda.hpp) against `--device cpu` on the bundled real
// dump: the same protocol, so bytes (payload, parameters, index) must be equal exactly and the
// kept positions identical (attn_recall equal up to the order of a double sum; SnapKV may move a
// near-tie token, which tests/cuda/test_kv_cache_cuda.cpp bounds). rel_error, derived: the GPU
// rounds every attention output to f16 (relative u = 2^-11 per element, so ||o_gpu - o_cpu|| <=
// u ||o_cpu|| from rounding alone, and ||o_cpu|| <= (1 + rel_cpu) ||o_full||); the kernels' own
// arithmetic differs from the CPU reference by far less (checked per element in
// test_kv_cache_cuda.cpp), for which another u is allowed: |rel_gpu - rel_cpu| <= 2u (1 + rel_cpu).
#include <catch2/catch.hpp>
#include <cmath>
#include <string>
#include <vector>

#include "cuda/support.hpp"
#include "kvc/core/error.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/eval/evaluate.hpp"
#include "kvc/eval/evaluate_cuda.hpp"

namespace {

void require_same_result(const kvc::PolicyResult& cpu, const kvc::PolicyResult& gpu,
                         bool near_ties) {
  INFO(cpu.spec << ": cpu rel_error " << cpu.rel_error << " recall " << cpu.attn_recall
                << " | cuda rel_error " << gpu.rel_error << " recall " << gpu.attn_recall);
  REQUIRE(gpu.spec == cpu.spec);
  REQUIRE(gpu.bytes == cpu.bytes);
  REQUIRE(gpu.full_bytes == cpu.full_bytes);
  REQUIRE(gpu.index_bytes == cpu.index_bytes);
  REQUIRE(gpu.host_bytes == cpu.host_bytes);
  REQUIRE(gpu.bits_per_value == cpu.bits_per_value);
  const double u = std::ldexp(1.0, -11);
  REQUIRE(std::fabs(gpu.rel_error - cpu.rel_error) <= 2 * u * (1 + cpu.rel_error));
  // Identical positions give the same recall up to the summation order of doubles; a SnapKV
  // near-tie swaps two tokens of nearly equal prompt score, whose decode attention mass may differ.
  REQUIRE(std::fabs(gpu.attn_recall - cpu.attn_recall) <= (near_ties ? 1e-3 : 1e-12));
  REQUIRE(gpu.layers.size() == cpu.layers.size());
  for (std::size_t l = 0; l < cpu.layers.size(); ++l)
    REQUIRE(gpu.layers[l].bytes == cpu.layers[l].bytes);
}

}  // namespace

TEST_CASE("kvc eval --device cuda matches --device cpu on the bundled data", "[cuda][eval_cuda]") {
  const kvc::KvDump dump = kvc::load_dump(kvc::test::dump_path());
  const std::vector<std::string> specs = {
      "full",
      "streamingllm(sink=4,recent=124)",
      "snapkv(budget=128)",
      "h2o(heavy=64,recent=64)",
      "kivi(bits=2)",
      "kivi(bits=4,group=64)",
      "int8",
      "int4(sym=false,group=32)",
      "fp8",
      "snapkv(budget=128)+kivi(bits=2)",
      "streamingllm(sink=4,recent=124)+int8",
      "h2o(variant=prefill,budget=128,window=8)+fp8(kind=e5m2,scope=tensor)",
  };
  kvc::EvalOptions cpu_options;
  kvc::EvalOptions gpu_options;
  gpu_options.device = kvc::EvalDevice::cuda;
  const kvc::EvalResult cpu = kvc::evaluate(dump, specs, cpu_options);
  const kvc::EvalResult gpu = kvc::evaluate_cuda(dump, specs, gpu_options);
  REQUIRE(gpu.device.rfind("cuda: ", 0) == 0);
  REQUIRE(gpu.prefix == cpu.prefix);
  REQUIRE(gpu.policies.size() == specs.size());
  for (std::size_t i = 0; i < specs.size(); ++i)
    require_same_result(cpu.policies[i], gpu.policies[i],
                        specs[i].find("snapkv") != std::string::npos);
}

TEST_CASE("kvc eval --device cuda names what it cannot run", "[cuda][eval_cuda]") {
  const kvc::KvDump dump = kvc::load_dump(kvc::test::dump_path());
  kvc::EvalOptions options;
  options.device = kvc::EvalDevice::cuda;
  using Catch::Matchers::Contains;
  REQUIRE_THROWS_WITH(kvc::evaluate_cuda(dump, {"pyramidkv(budget=128)"}, options),
                      Contains("pyramidkv") && Contains("no cuda path"));
  REQUIRE_THROWS_WITH(kvc::evaluate_cuda(dump, {"snapkv(budget=128)+kvmerger"}, options),
                      Contains("kvmerger") && Contains("no cuda path"));
  REQUIRE_THROWS_WITH(kvc::evaluate_cuda(dump, {"vidkv"}, options), Contains("no cuda path"));
  REQUIRE_THROWS_WITH(kvc::evaluate_cuda(dump, {"h2o(heavy=8,recent=8)+int8"}, options),
                      Contains("h2o") && Contains("int_per_token"));
  kvc::EvalOptions reindexed = options;
  reindexed.positions = kvc::PositionMode::reindexed;
  REQUIRE_THROWS_WITH(kvc::evaluate_cuda(dump, {"streamingllm"}, reindexed), Contains("reindexed"));
}
