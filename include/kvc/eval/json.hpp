// kvc/eval/json.hpp: a small JSON value (objects keep insertion order), a strict parser and a
// printer. Used for safetensors headers, a dump's meta.json and the CLI's --json report.
//
//   kvc::json::Value meta = kvc::json::parse(R"({"rope_theta": 10000, "model": "tiny"})");
//   double theta = meta.at("rope_theta").as_number();       // throws naming a missing key
//   meta.set("tokens", 512);                                 // appends (or replaces) a member
//   std::string text = kvc::json::dump(meta, 1);             // pretty, one space per level
//
// The parser follows RFC 8259 strictly: no comments, no trailing commas, no leading zeros, strings
// must be valid UTF-8 without raw control characters, \uXXXX escapes must pair surrogates,
// duplicate object keys and nesting deeper than kMaxDepth are rejected. Errors are kvc::Error
// naming the byte offset and what was expected there. Numbers are doubles; dump() prints them so
// that parse(dump(v)) == v, and refuses NaN and infinities (JSON has no spelling for them).
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace kvc::json {

inline constexpr int kMaxDepth = 256;  // nesting of arrays and objects accepted by parse()

enum class Type { null, boolean, number, string, array, object };
std::string_view type_name(Type type);  // "null", "boolean", "number", ...

class Value;
using Array = std::vector<Value>;
using Member = std::pair<std::string, Value>;
using Object = std::vector<Member>;  // in insertion order; keys are unique

class Value {
 public:
  Value() = default;  // null
  Value(std::nullptr_t) {}
  Value(bool b) : data_(b) {}
  template <class Number>
  requires(std::integral<Number> || std::floating_point<Number>) &&
      (!std::same_as<Number, bool>)Value(Number x) : data_(static_cast<double>(x)) {}
  Value(const char* s) : data_(std::string(s)) {}
  Value(std::string_view s) : data_(std::string(s)) {}
  Value(std::string s) : data_(std::move(s)) {}
  Value(Array a) : data_(std::move(a)) {}
  Value(Object o);  // throws kvc::Error on a duplicate key

  static Value array() { return Value(Array{}); }
  static Value object() { return Value(Object{}); }

  Type type() const { return static_cast<Type>(data_.index()); }
  bool is_null() const { return type() == Type::null; }
  bool is_bool() const { return type() == Type::boolean; }
  bool is_number() const { return type() == Type::number; }
  bool is_string() const { return type() == Type::string; }
  bool is_array() const { return type() == Type::array; }
  bool is_object() const { return type() == Type::object; }

  // Each throws kvc::Error naming the expected and the actual type.
  bool as_bool() const;
  double as_number() const;
  std::int64_t as_int64() const;  // also throws unless the number is integral and |x| <= 2^53
  const std::string& as_string() const;
  const Array& as_array() const;
  Array& as_array();
  const Object& as_object() const;
  Object& as_object();

  // Objects. at() throws kvc::Error naming the missing key and the keys present; find() returns
  // nullptr when the key is absent. Both throw if this is not an object.
  const Value& at(std::string_view key) const;
  Value& at(std::string_view key);
  const Value* find(std::string_view key) const;
  Value* find(std::string_view key);
  bool contains(std::string_view key) const { return find(key) != nullptr; }
  // Replaces the member `key` if present, else appends it; returns the stored value. A null Value
  // becomes an empty object first, so `Value v; v.set("a", 1);` builds {"a": 1}.
  Value& set(std::string_view key, Value value);

  // Arrays. at(i) throws kvc::Error when i is out of range. push_back turns null into an array.
  const Value& at(std::size_t index) const;
  Value& push_back(Value value);

  std::size_t size() const;  // members of an object, elements of an array; throws otherwise

  // Deep equality; numbers compare with == (so -0 == 0), objects compare in order.
  friend bool operator==(const Value& a, const Value& b) { return a.data_ == b.data_; }

 private:
  std::variant<std::nullptr_t, bool, double, std::string, Array, Object> data_;
};

// Parses one JSON text (surrounding whitespace allowed, nothing else after it).
Value parse(std::string_view text);

// Prints `value`. indent < 0: compact, no spaces. indent >= 0: one member or element per line,
// indented by `indent` spaces per level, ": " after keys (Python's json.dumps(indent=n) layout).
// Throws kvc::Error for NaN, infinities and strings that are not valid UTF-8.
std::string dump(const Value& value, int indent = -1);

}  // namespace kvc::json
