// JSON value, a recursive-descent parser over bytes and a printer (see kvc/eval/json.hpp).
#include "kvc/eval/json.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <system_error>
#include <unordered_set>

#include "kvc/core/error.hpp"

namespace kvc::json {
namespace {

constexpr double kMaxExactInteger = 9007199254740992.0;  // 2^53

std::string quoted_keys(const Object& object) {
  if (object.empty()) return "none";
  std::string out;
  const std::size_t shown = std::min<std::size_t>(object.size(), 20);
  for (std::size_t i = 0; i < shown; ++i) {
    if (i) out += ", ";
    out += '"' + object[i].first + '"';
  }
  if (shown < object.size()) out += ", ... (" + std::to_string(object.size()) + " in all)";
  return out;
}

// Length of the UTF-8 sequence starting at text[pos], or 0 if it is not valid UTF-8 (overlong
// forms, surrogates and code points above U+10FFFF are invalid).
std::size_t utf8_sequence_length(std::string_view text, std::size_t pos) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(pos);
  if (lead < 0x80) return 1;
  std::size_t length;
  std::uint32_t code;
  if (lead >= 0xc2 && lead <= 0xdf) {
    length = 2, code = lead & 0x1fu;
  } else if (lead >= 0xe0 && lead <= 0xef) {
    length = 3, code = lead & 0x0fu;
  } else if (lead >= 0xf0 && lead <= 0xf4) {
    length = 4, code = lead & 0x07u;
  } else {
    return 0;
  }
  if (pos + length > text.size()) return 0;
  for (std::size_t i = 1; i < length; ++i) {
    if ((byte(pos + i) & 0xc0u) != 0x80u) return 0;
    code = (code << 6) | (byte(pos + i) & 0x3fu);
  }
  if (length == 3 && (code < 0x800 || (code >= 0xd800 && code <= 0xdfff))) return 0;
  if (length == 4 && (code < 0x10000 || code > 0x10ffff)) return 0;
  return length;
}

void append_utf8(std::string& out, std::uint32_t code) {
  if (code < 0x80) {
    out += static_cast<char>(code);
  } else if (code < 0x800) {
    out += static_cast<char>(0xc0 | (code >> 6));
    out += static_cast<char>(0x80 | (code & 0x3f));
  } else if (code < 0x10000) {
    out += static_cast<char>(0xe0 | (code >> 12));
    out += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (code & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (code >> 18));
    out += static_cast<char>(0x80 | ((code >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (code & 0x3f));
  }
}

// Decimal exponent of the leading nonzero digit of a JSON number literal (already validated), e.g.
// 2 for "123.4", -3 for "0.0012e0", 400 for "1e400". A literal of zeros gives the minimum int.
long decimal_magnitude(std::string_view literal) {
  if (literal[0] == '-') literal.remove_prefix(1);
  const std::size_t e = literal.find_first_of("eE");
  long exponent = 0;
  if (e != std::string_view::npos) {
    // Clamped: the exponent only has to decide the sign of the final sum.
    for (char d : literal.substr(e + 1))
      if (d >= '0' && d <= '9') exponent = std::min(exponent * 10 + (d - '0'), 100000000L);
    if (literal.substr(e + 1, 1) == "-") exponent = -exponent;
  }
  const std::string_view mantissa = literal.substr(0, e);
  const std::size_t dot = mantissa.find('.');
  const std::string_view integer = mantissa.substr(0, dot);
  const std::string_view fraction =
      dot == std::string_view::npos ? std::string_view{} : mantissa.substr(dot + 1);
  if (const std::size_t i = integer.find_first_not_of('0'); i != std::string_view::npos)
    return static_cast<long>(integer.size() - 1 - i) + exponent;
  if (const std::size_t j = fraction.find_first_not_of('0'); j != std::string_view::npos)
    return -static_cast<long>(j + 1) + exponent;
  return std::numeric_limits<long>::min();
}

class Parser {
 public:
  explicit Parser(std::string_view text) : text_(text) {}

  Value parse_document() {
    skip_space();
    Value v = value(0);
    skip_space();
    if (pos_ != text_.size()) fail("the end of the JSON text");
    return v;
  }

 private:
  [[noreturn]] void fail(std::string_view expected) const {
    std::string found;
    if (pos_ >= text_.size()) {
      found = "the end of the input";
    } else {
      const unsigned char c = static_cast<unsigned char>(text_[pos_]);
      if (c >= 0x20 && c < 0x7f) {
        found = std::string("'") + static_cast<char>(c) + "'";
      } else {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", c);
        found = std::string("byte ") + hex;
      }
    }
    KVC_FAIL("JSON parse error at byte ", pos_, ": expected ", expected, ", found ", found);
  }

  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return text_[pos_]; }

  void skip_space() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r'))
      ++pos_;
  }

  void expect_word(std::string_view word) {
    for (char c : word) {
      if (at_end() || peek() != c) fail(std::string("'") + std::string(word) + "'");
      ++pos_;
    }
  }

  Value value(int depth) {
    if (at_end()) fail("a JSON value");
    switch (peek()) {
      case '{':
        return object(depth + 1);
      case '[':
        return array(depth + 1);
      case '"':
        return Value(string());
      case 't':
        expect_word("true");
        return Value(true);
      case 'f':
        expect_word("false");
        return Value(false);
      case 'n':
        expect_word("null");
        return Value();
      default:
        if (peek() == '-' || (peek() >= '0' && peek() <= '9')) return Value(number());
        fail("a JSON value (object, array, string, number, true, false or null)");
    }
  }

  void check_depth(int depth) const {
    if (depth > kMaxDepth)
      KVC_FAIL("JSON parse error at byte ", pos_, ": nesting deeper than ", kMaxDepth,
               " levels (arrays and objects)");
  }

  Value object(int depth) {
    check_depth(depth);
    ++pos_;  // '{'
    Object members;
    std::unordered_set<std::string> seen;
    skip_space();
    if (!at_end() && peek() == '}') {
      ++pos_;
      return Value(std::move(members));
    }
    while (true) {
      skip_space();
      if (at_end() || peek() != '"') fail("a string key");
      const std::size_t key_offset = pos_;
      std::string key = string();
      if (!seen.insert(key).second)
        KVC_FAIL("JSON parse error at byte ", key_offset, ": duplicate object key \"", key, "\"");
      skip_space();
      if (at_end() || peek() != ':') fail("':' after an object key");
      ++pos_;
      skip_space();
      Value v = value(depth);
      members.emplace_back(std::move(key), std::move(v));
      skip_space();
      if (!at_end() && peek() == ',') {
        ++pos_;
        continue;
      }
      if (!at_end() && peek() == '}') {
        ++pos_;
        break;
      }
      fail("',' or '}' in an object");
    }
    return Value(std::move(members));
  }

  Value array(int depth) {
    check_depth(depth);
    ++pos_;  // '['
    Array elements;
    skip_space();
    if (!at_end() && peek() == ']') {
      ++pos_;
      return Value(std::move(elements));
    }
    while (true) {
      skip_space();
      elements.push_back(value(depth));
      skip_space();
      if (!at_end() && peek() == ',') {
        ++pos_;
        continue;
      }
      if (!at_end() && peek() == ']') {
        ++pos_;
        break;
      }
      fail("',' or ']' in an array");
    }
    return Value(std::move(elements));
  }

  std::uint32_t hex4() {
    std::uint32_t code = 0;
    for (int i = 0; i < 4; ++i) {
      if (at_end()) fail("4 hex digits after \\u");
      const char c = peek();
      std::uint32_t digit;
      if (c >= '0' && c <= '9') {
        digit = static_cast<std::uint32_t>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        digit = static_cast<std::uint32_t>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        digit = static_cast<std::uint32_t>(c - 'A' + 10);
      } else {
        fail("4 hex digits after \\u");
      }
      code = code * 16 + digit;
      ++pos_;
    }
    return code;
  }

  std::string string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (at_end()) fail("'\"' closing the string");
      const unsigned char c = static_cast<unsigned char>(peek());
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) fail("an escaped control character (raw control characters are not allowed)");
      if (c == '\\') {
        const std::size_t escape_offset = pos_;
        ++pos_;
        if (at_end()) fail("an escape character after '\\'");
        const char e = peek();
        ++pos_;
        switch (e) {
          case '"':
            out += '"';
            break;
          case '\\':
            out += '\\';
            break;
          case '/':
            out += '/';
            break;
          case 'b':
            out += '\b';
            break;
          case 'f':
            out += '\f';
            break;
          case 'n':
            out += '\n';
            break;
          case 'r':
            out += '\r';
            break;
          case 't':
            out += '\t';
            break;
          case 'u': {
            std::uint32_t code = hex4();
            if (code >= 0xdc00 && code <= 0xdfff)
              KVC_FAIL("JSON parse error at byte ", escape_offset, ": lone low surrogate \\u",
                       std::string(text_.substr(escape_offset + 2, 4)),
                       " (expected a high surrogate \\uD800-\\uDBFF first)");
            if (code >= 0xd800 && code <= 0xdbff) {
              if (text_.substr(pos_, 2) != "\\u")
                KVC_FAIL("JSON parse error at byte ", pos_, ": expected a \\uDC00-\\uDFFF low ",
                         "surrogate after the high surrogate at byte ", escape_offset);
              pos_ += 2;
              const std::size_t low_offset = pos_ - 2;
              const std::uint32_t low = hex4();
              if (low < 0xdc00 || low > 0xdfff)
                KVC_FAIL("JSON parse error at byte ", low_offset, ": expected a \\uDC00-\\uDFFF ",
                         "low surrogate after the high surrogate at byte ", escape_offset);
              code = 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00);
            }
            append_utf8(out, code);
            break;
          }
          default:
            --pos_;
            fail("one of \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX");
        }
        continue;
      }
      const std::size_t length = utf8_sequence_length(text_, pos_);
      if (length == 0) fail("valid UTF-8");
      out.append(text_.substr(pos_, length));
      pos_ += length;
    }
  }

  double number() {
    const std::size_t start = pos_;
    const auto digits = [&] {
      const std::size_t from = pos_;
      while (!at_end() && peek() >= '0' && peek() <= '9') ++pos_;
      return pos_ - from;
    };
    if (peek() == '-') ++pos_;
    if (at_end()) fail("a digit");
    if (peek() == '0') {
      ++pos_;
      if (!at_end() && peek() >= '0' && peek() <= '9')
        fail("'.', 'e' or the end of the number (no leading zeros)");
    } else if (digits() == 0) {
      fail("a digit");
    }
    if (!at_end() && peek() == '.') {
      ++pos_;
      if (digits() == 0) fail("a digit after '.'");
    }
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      ++pos_;
      if (!at_end() && (peek() == '+' || peek() == '-')) ++pos_;
      if (digits() == 0) fail("a digit in the exponent");
    }
    double x = 0;
    const std::string_view literal = text_.substr(start, pos_ - start);
    const auto [end, ec] = std::from_chars(literal.data(), literal.data() + literal.size(), x);
    if (ec == std::errc::result_out_of_range) {
      // Rounds to zero or to infinity. Underflow is fine (the nearest double is +-0); overflow is
      // an error, since JSON cannot hold infinity.
      if (decimal_magnitude(literal) > 0)
        KVC_FAIL("JSON parse error at byte ", start, ": number ", literal,
                 " is out of the range of a double (|x| <= 1.7976931348623157e308)");
      x = literal[0] == '-' ? -0.0 : 0.0;
    } else if (ec != std::errc() || end != literal.data() + literal.size()) {
      KVC_FAIL("JSON parse error at byte ", start, ": malformed number ", literal);
    }
    return x;
  }

  std::string_view text_;
  std::size_t pos_ = 0;
};

void dump_string(std::string& out, std::string_view s) {
  out += '"';
  std::size_t pos = 0;
  while (pos < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[pos]);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          char escape[8];
          std::snprintf(escape, sizeof escape, "\\u%04x", c);
          out += escape;
        } else {
          const std::size_t length = utf8_sequence_length(s, pos);
          KVC_CHECK(length != 0, "json::dump: string is not valid UTF-8 at byte ", pos,
                    " (JSON text must be UTF-8)");
          out.append(s.substr(pos, length));
          pos += length;
          continue;
        }
    }
    ++pos;
  }
  out += '"';
}

void dump_number(std::string& out, double x) {
  KVC_CHECK(std::isfinite(x), "json::dump: number ", x,
            " is not finite; JSON has no NaN or infinity (allowed: finite doubles)");
  char buffer[64];
  if (x == 0 && std::signbit(x)) {
    out += "-0";  // keeps the sign through a round trip
  } else if (x == std::trunc(x) && std::fabs(x) < kMaxExactInteger) {
    std::snprintf(buffer, sizeof buffer, "%lld", static_cast<long long>(x));
    out += buffer;
  } else {
    // Shortest text that reads back to the same double (what "%.17g" trimmed to the fewest digits
    // gives, without the trial loop).
    const auto [end, ec] = std::to_chars(buffer, buffer + sizeof buffer, x);
    KVC_CHECK(ec == std::errc(), "json::dump: cannot format number ", x);
    out.append(buffer, end);
  }
}

void dump_value(std::string& out, const Value& v, int indent, int level) {
  const auto newline = [&](int at_level) {
    if (indent < 0) return;
    out += '\n';
    out.append(static_cast<std::size_t>(indent) * static_cast<std::size_t>(at_level), ' ');
  };
  switch (v.type()) {
    case Type::null:
      out += "null";
      return;
    case Type::boolean:
      out += v.as_bool() ? "true" : "false";
      return;
    case Type::number:
      dump_number(out, v.as_number());
      return;
    case Type::string:
      dump_string(out, v.as_string());
      return;
    case Type::array: {
      const Array& a = v.as_array();
      out += '[';
      for (std::size_t i = 0; i < a.size(); ++i) {
        if (i) out += ',';
        newline(level + 1);
        dump_value(out, a[i], indent, level + 1);
      }
      if (!a.empty()) newline(level);
      out += ']';
      return;
    }
    case Type::object: {
      const Object& o = v.as_object();
      out += '{';
      for (std::size_t i = 0; i < o.size(); ++i) {
        if (i) out += ',';
        newline(level + 1);
        dump_string(out, o[i].first);
        out += indent < 0 ? ":" : ": ";
        dump_value(out, o[i].second, indent, level + 1);
      }
      if (!o.empty()) newline(level);
      out += '}';
      return;
    }
  }
}

}  // namespace

std::string_view type_name(Type type) {
  switch (type) {
    case Type::null:
      return "null";
    case Type::boolean:
      return "boolean";
    case Type::number:
      return "number";
    case Type::string:
      return "string";
    case Type::array:
      return "array";
    case Type::object:
      return "object";
  }
  return "?";
}

Value::Value(Object o) {
  std::unordered_set<std::string_view> seen;
  for (const auto& [key, unused] : o)
    KVC_CHECK(seen.insert(key).second, "JSON object built with duplicate key \"", key, "\"");
  data_ = std::move(o);
}

#define KVC_JSON_EXPECT(wanted)                                                              \
  KVC_CHECK(type() == Type::wanted, "expected a JSON ", type_name(Type::wanted), ", got a ", \
            type_name(type()))

bool Value::as_bool() const {
  KVC_JSON_EXPECT(boolean);
  return std::get<bool>(data_);
}
double Value::as_number() const {
  KVC_JSON_EXPECT(number);
  return std::get<double>(data_);
}
std::int64_t Value::as_int64() const {
  const double x = as_number();
  KVC_CHECK(x == std::trunc(x) && std::fabs(x) <= kMaxExactInteger, "expected an integer, got ", x,
            " (allowed: integral numbers with |x| <= 2^53)");
  return static_cast<std::int64_t>(x);
}
const std::string& Value::as_string() const {
  KVC_JSON_EXPECT(string);
  return std::get<std::string>(data_);
}
const Array& Value::as_array() const {
  KVC_JSON_EXPECT(array);
  return std::get<Array>(data_);
}
Array& Value::as_array() {
  KVC_JSON_EXPECT(array);
  return std::get<Array>(data_);
}
const Object& Value::as_object() const {
  KVC_JSON_EXPECT(object);
  return std::get<Object>(data_);
}
Object& Value::as_object() {
  KVC_JSON_EXPECT(object);
  return std::get<Object>(data_);
}
#undef KVC_JSON_EXPECT

const Value* Value::find(std::string_view key) const {
  for (const auto& [name, value] : as_object())
    if (name == key) return &value;
  return nullptr;
}
Value* Value::find(std::string_view key) {
  for (auto& [name, value] : as_object())
    if (name == key) return &value;
  return nullptr;
}
const Value& Value::at(std::string_view key) const {
  const Value* v = find(key);
  KVC_CHECK(v != nullptr, "JSON object has no key \"", key,
            "\" (keys present: ", quoted_keys(as_object()), ")");
  return *v;
}
Value& Value::at(std::string_view key) {
  Value* v = find(key);
  KVC_CHECK(v != nullptr, "JSON object has no key \"", key,
            "\" (keys present: ", quoted_keys(as_object()), ")");
  return *v;
}
Value& Value::set(std::string_view key, Value value) {
  if (is_null()) data_ = Object{};
  if (Value* existing = find(key)) {
    *existing = std::move(value);
    return *existing;
  }
  Object& o = as_object();
  o.emplace_back(std::string(key), std::move(value));
  return o.back().second;
}

const Value& Value::at(std::size_t index) const {
  const Array& a = as_array();
  KVC_CHECK(index < a.size(), "JSON array index ", index, " out of range [0, ", a.size(), ")");
  return a[index];
}
Value& Value::push_back(Value value) {
  if (is_null()) data_ = Array{};
  Array& a = as_array();
  a.push_back(std::move(value));
  return a.back();
}

std::size_t Value::size() const {
  if (is_array()) return as_array().size();
  KVC_CHECK(is_object(), "size() of a JSON ", type_name(type()), "; allowed: array, object");
  return as_object().size();
}

Value parse(std::string_view text) { return Parser(text).parse_document(); }

std::string dump(const Value& value, int indent) {
  std::string out;
  dump_value(out, value, indent, 0);
  return out;
}

}  // namespace kvc::json
