// The policy-spec grammar and the registry's validation.
#include <catch2/catch.hpp>

#include "kvc/eval/registry.hpp"
#include "kvc/eval/spec.hpp"

TEST_CASE("spec grammar: stages, parameters, whitespace", "[spec]") {
  const auto stages =
      kvc::parse_spec(" snapkv( budget = 256 ,window=32,kernel=7,pool=max ) + kivi(bits=2) ");
  REQUIRE(stages.size() == 2);
  REQUIRE(stages[0].name == "snapkv");
  REQUIRE(stages[0].params.size() == 4);
  REQUIRE(stages[0].params[0] == std::pair<std::string, std::string>{"budget", "256"});
  REQUIRE(stages[0].params[3] == std::pair<std::string, std::string>{"pool", "max"});
  REQUIRE(stages[1].name == "kivi");
  REQUIRE(kvc::parse_spec("full")[0].params.empty());
  REQUIRE(kvc::parse_spec("full()")[0].params.empty());
}

TEST_CASE("spec grammar errors name the column", "[spec]") {
  REQUIRE_THROWS_WITH(kvc::parse_spec(""), Catch::Contains("empty policy spec"));
  REQUIRE_THROWS_WITH(kvc::parse_spec("snapkv(budget=1"),
                      Catch::Contains("at the end of the spec"));
  REQUIRE_THROWS_WITH(kvc::parse_spec("snapkv(budget)"),
                      Catch::Contains("expected '=' after parameter 'budget'"));
  REQUIRE_THROWS_WITH(kvc::parse_spec("snapkv kivi"), Catch::Contains("column 8"));
  REQUIRE_THROWS_WITH(kvc::parse_spec("SnapKV"), Catch::Contains("expected a policy name"));
  REQUIRE_THROWS_WITH(kvc::parse_spec("kivi(bits=2,bits=4)"),
                      Catch::Contains("'bits' given twice"));
  REQUIRE_THROWS_WITH(kvc::parse_spec("kivi(bits=)"),
                      Catch::Contains("expected a value for parameter 'bits'"));
}

TEST_CASE("registry: values reach the policies", "[spec][registry]") {
  const auto p = kvc::build_policies(
      "snapkv(budget=300,window=16,kernel=3,pool=max,gqa=repeat)+kivi(bits=4,vbits=2,group=64,"
      "residual=128)");
  const auto& snap = std::get<kvc::SnapKv>(p.eviction.policy);
  REQUIRE(snap.budget == 300);
  REQUIRE(snap.window == 16);
  REQUIRE(snap.kernel == 3);
  REQUIRE(snap.pool == kvc::ops::Pool::max);
  REQUIRE(snap.gqa == kvc::GqaMode::repeat);
  const auto& kivi = std::get<kvc::Kivi>(p.quant.policy);
  REQUIRE(kivi.key_bits == 4);
  REQUIRE(kivi.value_bits == 2);
  REQUIRE(kivi.group == 64);
  REQUIRE(kivi.residual == 128);
  const auto defaults = kvc::build_policies("streamingllm");
  REQUIRE(std::get<kvc::StreamingLlm>(defaults.eviction.policy).sink == 4);
  REQUIRE(std::get<kvc::StreamingLlm>(defaults.eviction.policy).recent == 512);
  REQUIRE(std::holds_alternative<kvc::NoQuant>(defaults.quant.policy));
}

TEST_CASE("registry errors list the valid names", "[spec][registry]") {
  REQUIRE_THROWS_WITH(kvc::build_policies("h3o"),
                      Catch::Contains("unknown policy 'h3o'") &&
                          Catch::Contains("full, streamingllm, snapkv, kivi"));
  REQUIRE_THROWS_WITH(kvc::build_policies("snapkv(budgte=3)"),
                      Catch::Contains("unknown parameter 'budgte'") &&
                          Catch::Contains("budget, window, kernel, pool, gqa"));
  REQUIRE_THROWS_WITH(kvc::build_policies("full(x=1)"), Catch::Contains("takes no parameters"));
  REQUIRE_THROWS_WITH(kvc::build_policies("snapkv(budget=-5)"),
                      Catch::Contains("budget must be > 0, got -5"));
  REQUIRE_THROWS_WITH(kvc::build_policies("snapkv(budget=12x)"),
                      Catch::Contains("'12x' is not an integer"));
  REQUIRE_THROWS_WITH(kvc::build_policies("snapkv(pool=median)"),
                      Catch::Contains("'median' is not one of avg, max"));
  REQUIRE_THROWS_WITH(kvc::build_policies("kivi(bits=3)"),
                      Catch::Contains("bits = 3 is not supported; allowed: {2, 4, 8}"));
  REQUIRE_THROWS_WITH(kvc::build_policies("snapkv+streamingllm"),
                      Catch::Contains("names two eviction policies"));
}
