// The policy-spec parser: a hand-written scanner over the small grammar in kvc/eval/spec.hpp.
#include "kvc/eval/spec.hpp"

#include <cctype>

#include "kvc/core/error.hpp"

namespace kvc {
namespace {

class SpecScanner {
 public:
  explicit SpecScanner(std::string_view text) : text_(text) {}

  std::vector<StageSpec> parse() {
    std::vector<StageSpec> stages;
    skip_space();
    KVC_CHECK(!at_end(), "empty policy spec");
    while (true) {
      stages.push_back(stage());
      skip_space();
      if (at_end()) break;
      expect('+', "'+' between stages or the end of the spec");
      skip_space();
    }
    return stages;
  }

 private:
  StageSpec stage() {
    StageSpec s;
    s.name = identifier("a policy name");
    skip_space();
    if (!at_end() && peek() == '(') {
      ++pos_;
      skip_space();
      if (!at_end() && peek() == ')') {
        ++pos_;
        return s;
      }
      while (true) {
        std::string key = identifier("a parameter name");
        skip_space();
        expect('=', "'=' after parameter '" + key + "'");
        skip_space();
        std::string value = raw_value(key);
        for (const auto& [existing, unused] : s.params)
          KVC_CHECK(existing != key, "policy spec '", text_, "': parameter '", key,
                    "' given twice in ", s.name, "(...)");
        s.params.emplace_back(std::move(key), std::move(value));
        skip_space();
        if (!at_end() && peek() == ',') {
          ++pos_;
          skip_space();
          continue;
        }
        expect(')', "',' or ')' in the parameters of " + s.name);
        break;
      }
    }
    return s;
  }

  std::string identifier(const char* what) {
    const std::size_t begin = pos_;
    while (!at_end() && (std::islower(static_cast<unsigned char>(peek())) ||
                         std::isdigit(static_cast<unsigned char>(peek())) || peek() == '_'))
      ++pos_;
    if (pos_ == begin) fail_here(std::string("expected ") + what + " ([a-z0-9_])");
    return std::string(text_.substr(begin, pos_ - begin));
  }

  std::string raw_value(const std::string& key) {
    const std::size_t begin = pos_;
    while (!at_end() && peek() != ',' && peek() != ')' && peek() != '(' && peek() != '+') ++pos_;
    std::string_view value = text_.substr(begin, pos_ - begin);
    while (!value.empty() && std::isspace(static_cast<unsigned char>(value.back())))
      value.remove_suffix(1);
    if (value.empty()) fail_here("expected a value for parameter '" + key + "'");
    return std::string(value);
  }

  void expect(char c, const std::string& what) {
    if (at_end() || peek() != c) fail_here("expected " + what);
    ++pos_;
  }
  [[noreturn]] void fail_here(const std::string& what) const {
    if (at_end()) KVC_FAIL("policy spec '", text_, "': ", what, " at the end of the spec");
    KVC_FAIL("policy spec '", text_, "': ", what, ", found '", peek(), "' at column ", pos_ + 1);
  }
  void skip_space() {
    while (!at_end() && std::isspace(static_cast<unsigned char>(peek()))) ++pos_;
  }
  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return text_[pos_]; }

  std::string_view text_;
  std::size_t pos_ = 0;
};

}  // namespace

std::vector<StageSpec> parse_spec(std::string_view spec) { return SpecScanner(spec).parse(); }

}  // namespace kvc
