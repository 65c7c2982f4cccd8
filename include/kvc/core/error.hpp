// kvc/core/error.hpp: the one exception type of the library and the argument-check macro.
//
//   KVC_CHECK(budget > 0, "budget must be > 0, got ", budget);
//   try { ... } catch (const kvc::Error& e) { std::cerr << e.what() << '\n'; }
//
// Messages name the bad value and the allowed set; file and line are kept apart so tools can print
// the message alone.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace kvc {

class Error : public std::runtime_error {
 public:
  Error(std::string message, const char* file = "", int line = 0)
      : std::runtime_error(message), message_(std::move(message)), file_(file), line_(line) {}
  const std::string& message() const noexcept { return message_; }
  const char* file() const noexcept { return file_; }
  int line() const noexcept { return line_; }

 private:
  std::string message_;
  const char* file_;
  int line_;
};

// A failure reported by the CUDA runtime (a call or a launch), as opposed to a bad argument.
class CudaError : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}
}  // namespace detail

// Throws kvc::Error with the concatenation of the message parts.
template <class... Parts>
[[noreturn]] void fail_at(const char* file, int line, Parts&&... parts) {
  throw Error(detail::concat(std::forward<Parts>(parts)...), file, line);
}

}  // namespace kvc

#define KVC_FAIL(...) ::kvc::fail_at(__FILE__, __LINE__, __VA_ARGS__)
#define KVC_CHECK(cond, ...)            \
  do {                                  \
    if (!(cond)) KVC_FAIL(__VA_ARGS__); \
  } while (false)
