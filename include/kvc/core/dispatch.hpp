// kvc/core/dispatch.hpp: runtime value -> compile-time constant, through one list per axis.
//
//   using KiviBits = kvc::ValueList<2, 4, 8>;
//   kvc::dispatch<KiviBits>(bits, "kivi bits", [&](auto b) { pack<decltype(b)::value>(...); });
//
// The same lists drive explicit instantiations, so what can be dispatched and what is compiled
// cannot drift apart. An unlisted value throws kvc::Error naming the value and the allowed set.
#pragma once

#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

#include "kvc/core/error.hpp"

namespace kvc {

template <int... Values>
struct ValueList {
  static constexpr int kSize = sizeof...(Values);
  static constexpr bool contains(int v) { return ((v == Values) || ...); }
  static std::string describe() {
    std::ostringstream out;
    out << '{';
    int i = 0;
    ((out << (i++ ? ", " : "") << Values), ...);
    out << '}';
    return out.str();
  }
  // Calls f(std::integral_constant<int, V>{}) for every V in the list.
  template <class F>
  static void for_each(F&& f) {
    (f(std::integral_constant<int, Values>{}), ...);
  }
};

namespace detail {
template <int First, int... Rest, class F>
decltype(auto) dispatch_impl(ValueList<First, Rest...> list, int value, const char* what, F&& f) {
  using Result = decltype(f(std::integral_constant<int, First>{}));
  auto reject = [&] {
    KVC_FAIL(what, " = ", value, " is not supported; allowed: ", decltype(list)::describe());
  };
  if constexpr (std::is_void_v<Result>) {
    const bool done =
        ((value == First ? (f(std::integral_constant<int, First>{}), true) : false) || ... ||
         (value == Rest ? (f(std::integral_constant<int, Rest>{}), true) : false));
    if (!done) reject();
  } else {
    Result result{};
    const bool done =
        ((value == First ? (result = f(std::integral_constant<int, First>{}), true) : false) ||
         ... || (value == Rest ? (result = f(std::integral_constant<int, Rest>{}), true) : false));
    if (!done) reject();
    return result;
  }
}
}  // namespace detail

template <class List, class F>
decltype(auto) dispatch(int value, const char* what, F&& f) {
  return detail::dispatch_impl(List{}, value, what, std::forward<F>(f));
}

}  // namespace kvc
