// kvc::json: parsing, printing, round trips and error positions.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numbers>
#include <random>
#include <string>

#include "kvc/core/error.hpp"
#include "kvc/eval/json.hpp"

namespace json = kvc::json;
using Catch::Matchers::Contains;

namespace {

std::uint64_t bits_of(double x) {
  std::uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

// The message of the kvc::Error thrown by parse(text), or "" if it did not throw.
std::string parse_error(std::string_view text) {
  try {
    json::parse(text);
  } catch (const kvc::Error& e) {
    return e.message();
  }
  return "";
}

}  // namespace

TEST_CASE("json parses every value type and keeps object order", "[json]") {
  const json::Value v =
      json::parse(R"( {"z": 1, "a": [true, false, null, -2.5e3, "s"], "m": {"x": {}}, "e": []} )");
  REQUIRE(v.is_object());
  REQUIRE(v.size() == 4);
  const json::Object& members = v.as_object();
  CHECK(members[0].first == "z");
  CHECK(members[1].first == "a");
  CHECK(members[2].first == "m");
  CHECK(members[3].first == "e");
  CHECK(v.at("z").as_number() == 1.0);
  const json::Value& a = v.at("a");
  REQUIRE(a.size() == 5);
  CHECK(a.at(0).as_bool() == true);
  CHECK(a.at(1).as_bool() == false);
  CHECK(a.at(2).is_null());
  CHECK(a.at(3).as_number() == -2500.0);
  CHECK(a.at(4).as_string() == "s");
  CHECK(v.at("m").at("x").is_object());
  CHECK(v.at("m").at("x").size() == 0);
  CHECK(v.at("e").is_array());
  CHECK(v.find("missing") == nullptr);
  CHECK(v.find("z") != nullptr);
  CHECK(v.contains("e"));
}

TEST_CASE("json dump: compact and indented layouts", "[json]") {
  json::Value v;
  v.set("name", "kvc");
  v.set("n", 3);
  json::Value& list = v.set("list", json::Value::array());
  list.push_back(1.5);
  list.push_back(nullptr);
  v.set("empty", json::Value::object());
  v.set("n", 4);  // replaces, keeps the position
  CHECK(json::dump(v) == R"({"name":"kvc","n":4,"list":[1.5,null],"empty":{}})");
  CHECK(json::dump(v, 2) ==
        "{\n  \"name\": \"kvc\",\n  \"n\": 4,\n  \"list\": [\n    1.5,\n    null\n  ],\n"
        "  \"empty\": {}\n}");
  CHECK(json::dump(json::Value::array(), 1) == "[]");
  CHECK(json::parse(json::dump(v, 2)) == v);
  CHECK(json::parse(json::dump(v)) == v);
}

TEST_CASE("json numbers: integers print without a decimal point", "[json]") {
  CHECK(json::dump(3.0) == "3");
  CHECK(json::dump(-42) == "-42");
  CHECK(json::dump(0.0) == "0");
  CHECK(json::dump(-0.0) == "-0");
  CHECK(json::dump(1e15) == "1000000000000000");
  CHECK(json::dump(9007199254740991.0) == "9007199254740991");  // 2^53 - 1
  CHECK(json::dump(0.5) == "0.5");
  CHECK(json::dump(0.1) == "0.1");
  CHECK(json::dump(1e300) == "1e+300");
  CHECK(json::dump(10000.0) == "10000");
}

TEST_CASE("json numbers: parse(dump(x)) reproduces x bit for bit", "[json]") {
  std::vector<double> values = {0.1,
                                1.0 / 3.0,
                                -std::numbers::pi,
                                1e-300,
                                5e-324,  // smallest subnormal
                                std::numeric_limits<double>::max(),
                                -std::numeric_limits<double>::max(),
                                std::numeric_limits<double>::min(),
                                9007199254740992.0,  // 2^53: printed via the shortest form
                                9007199254740994.0,
                                123456789012345678.0,
                                -0.0,
                                0.30000000000000004,
                                1.7976931348623157e308};
  std::mt19937_64 rng(20240611);
  for (int i = 0; i < 20000; ++i) {
    const std::uint64_t u = rng();
    double x;
    std::memcpy(&x, &u, sizeof x);
    if (std::isfinite(x)) values.push_back(x);
  }
  for (const double x : values) {
    const std::string text = json::dump(x);
    const double back = json::parse(text).as_number();
    INFO("x = " << x << " text = " << text);
    REQUIRE(bits_of(back) == bits_of(x));
    REQUIRE(text.size() <= 24);  // shortest form, never a padded %.17g
  }
}

TEST_CASE("json dump refuses NaN and infinities", "[json]") {
  CHECK_THROWS_WITH(json::dump(std::nan("")), Contains("not finite"));
  CHECK_THROWS_WITH(json::dump(json::Array{1, HUGE_VAL}), Contains("not finite"));
  CHECK_THROWS_WITH(json::dump(-HUGE_VAL), Contains("not finite"));
}

TEST_CASE("json string escapes, \\u and surrogate pairs", "[json]") {
  CHECK(json::parse(R"("a\"b\\c\/d\b\f\n\r\t")").as_string() == "a\"b\\c/d\b\f\n\r\t");
  CHECK(json::parse(R"("\u00e9")").as_string() == "\xc3\xa9");
  CHECK(json::parse(R"("\u20AC")").as_string() == "\xe2\x82\xac");
  CHECK(json::parse(R"("\ud83d\ude00")").as_string() == "\xf0\x9f\x98\x80");  // U+1F600
  CHECK(json::parse(R"("\u0000x")").as_string() == std::string("\0x", 2));
  CHECK(json::parse("\"\xc3\xa9\"").as_string() == "\xc3\xa9");  // raw UTF-8 passes through

  // dump escapes what it must and keeps UTF-8 as is.
  CHECK(json::dump(std::string("q\"\\\n\x01\xc3\xa9", 7)) == "\"q\\\"\\\\\\n\\u0001\xc3\xa9\"");
  const std::string all_bytes_ascii = [] {
    std::string s;
    for (int c = 1; c < 128; ++c) s += static_cast<char>(c);
    return s;
  }();
  CHECK(json::parse(json::dump(all_bytes_ascii)).as_string() == all_bytes_ascii);
  CHECK(json::parse(json::dump("\xf0\x9f\x98\x80")).as_string() == "\xf0\x9f\x98\x80");

  CHECK_THAT(parse_error(R"("\ude00")"), Contains("byte 1") && Contains("lone low surrogate"));
  CHECK_THAT(parse_error(R"("\ud83d")"), Contains("byte 7") && Contains("low surrogate"));
  CHECK_THAT(parse_error(R"("\ud83d\u0041")"), Contains("byte 7") && Contains("low surrogate"));
  CHECK_THAT(parse_error(R"("\u12G4")"), Contains("byte 5") && Contains("4 hex digits"));
  CHECK_THAT(parse_error(R"("\x")"), Contains("byte 2") && Contains("\\uXXXX"));
  CHECK_THAT(parse_error("\"a\nb\""), Contains("byte 2") && Contains("control character"));
  CHECK_THAT(parse_error("\"\xc3\x28\""), Contains("byte 1") && Contains("UTF-8"));
  CHECK_THAT(parse_error("\"\xed\xa0\x80\""), Contains("byte 1") && Contains("UTF-8"));
  CHECK_THROWS_WITH(json::dump(std::string("\xff")), Contains("not valid UTF-8"));
}

TEST_CASE("json parse errors name the byte offset and what was expected", "[json]") {
  CHECK_THAT(parse_error(""), Contains("byte 0") && Contains("a JSON value"));
  CHECK_THAT(parse_error("   "), Contains("byte 3") && Contains("the end of the input"));
  CHECK_THAT(parse_error("[1, 2,]"),
             Contains("byte 6") && Contains("a JSON value") && Contains("found ']'"));
  CHECK_THAT(parse_error(R"({"a" 1})"), Contains("byte 5") && Contains("':'"));
  CHECK_THAT(parse_error(R"({"a": 1,})"), Contains("byte 8") && Contains("a string key"));
  CHECK_THAT(parse_error(R"({"a": 1 "b": 2})"), Contains("byte 8") && Contains("',' or '}'"));
  CHECK_THAT(parse_error("[1 2]"), Contains("byte 3") && Contains("',' or ']'"));
  CHECK_THAT(parse_error("01"), Contains("byte 1") && Contains("no leading zeros"));
  CHECK_THAT(parse_error("1 2"), Contains("byte 2") && Contains("the end of the JSON text"));
  CHECK_THAT(parse_error("-"), Contains("byte 1") && Contains("a digit"));
  CHECK_THAT(parse_error("1."), Contains("byte 2") && Contains("a digit after '.'"));
  CHECK_THAT(parse_error("1e+"), Contains("byte 3") && Contains("exponent"));
  CHECK_THAT(parse_error("tru"), Contains("byte 3") && Contains("'true'"));
  CHECK_THAT(parse_error("nul!"), Contains("byte 3") && Contains("'null'"));
  CHECK_THAT(parse_error("\"abc"), Contains("byte 4") && Contains("closing the string"));
  CHECK_THAT(parse_error("[1] x"), Contains("byte 4"));
  CHECK_THAT(parse_error("\x01"), Contains("byte 0") && Contains("byte 0x01"));
  CHECK_THAT(parse_error(R"({"k": 1, "k": 2})"),
             Contains("byte 9") && Contains("duplicate") && Contains("\"k\""));
  CHECK_THAT(parse_error("1e400"), Contains("byte 0") && Contains("out of the range"));
  CHECK_THAT(parse_error("-1e400"), Contains("out of the range"));
  CHECK(json::parse("1e-400").as_number() == 0.0);
  CHECK(std::signbit(json::parse("-1e-400").as_number()));
  CHECK(json::parse("0.000000000000000000000000000001e-300").as_number() == 0.0);
  CHECK_THAT(parse_error("123456789e305"), Contains("out of the range"));
  CHECK(json::parse("0.001e308").as_number() == 1e305);
}

TEST_CASE("json nesting is limited to 256 levels", "[json]") {
  const auto nested = [](int depth) {
    return std::string(static_cast<std::size_t>(depth), '[') +
           std::string(static_cast<std::size_t>(depth), ']');
  };
  const json::Value ok = json::parse(nested(json::kMaxDepth));
  CHECK(ok.is_array());
  CHECK_THAT(parse_error(nested(json::kMaxDepth + 1)),
             Contains("byte 256") && Contains("deeper than 256"));
  std::string objects;
  for (int i = 0; i < json::kMaxDepth + 1; ++i) objects += "{\"a\":";
  CHECK_THAT(parse_error(objects), Contains("deeper than 256"));
}

TEST_CASE("json accessors name the key or type that is wrong", "[json]") {
  const json::Value v = json::parse(R"({"theta": 10000, "name": "m", "ratio": 0.5})");
  CHECK_THROWS_WITH(v.at("rope"),
                    Contains("no key \"rope\"") && Contains("\"theta\"") && Contains("\"ratio\""));
  CHECK_THROWS_WITH(v.at("name").as_number(), Contains("expected a JSON number, got a string"));
  CHECK_THROWS_WITH(v.at("theta").as_string(), Contains("expected a JSON string, got a number"));
  CHECK_THROWS_WITH(v.at("theta").at("x"), Contains("expected a JSON object, got a number"));
  CHECK(v.at("theta").as_int64() == 10000);
  CHECK_THROWS_WITH(v.at("ratio").as_int64(), Contains("expected an integer, got 0.5"));
  CHECK_THROWS_WITH(json::parse("[1]").at(std::size_t{1}), Contains("index 1 out of range [0, 1)"));
  CHECK_THROWS_WITH(json::Value(3).size(), Contains("size() of a JSON number"));
  CHECK_THROWS_WITH((json::Value(json::Object{{"a", 1}, {"a", 2}})),
                    Contains("duplicate key \"a\""));
}

TEST_CASE("json equality is deep and order-sensitive for objects", "[json]") {
  CHECK(json::parse(R"({"a": [1, {"b": null}]})") == json::parse(R"({"a":[1,{"b":null}]})"));
  CHECK_FALSE(json::parse(R"({"a": 1, "b": 2})") == json::parse(R"({"b": 2, "a": 1})"));
  CHECK_FALSE(json::parse("1") == json::parse("\"1\""));
  CHECK_FALSE(json::parse("[1, 2]") == json::parse("[1, 2, 3]"));
}
