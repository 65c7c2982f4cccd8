// kvc/core/view.hpp: non-owning strided views that carry their shape and memory space.
//
//   std::vector<float> buf(2 * 5 * 64);
//   kvc::HostView<float, 3> keys = kvc::make_view(buf.data(), {2, 5, 64});  // [Hkv, T, D]
//   float x = keys(1, 4, 63);
//   kvc::HostView<float, 2> head1 = keys.sub(1);                               // [T, D]
//
// A view's memory space is part of its type, so a host view cannot be handed to a CUDA op.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "kvc/core/error.hpp"

namespace kvc {

enum class MemorySpace { Host, Device };

template <class T, int Rank, MemorySpace Space = MemorySpace::Host>
struct View {
  static_assert(Rank >= 1, "a view has at least one dimension");
  using Element = T;
  static constexpr int kRank = Rank;
  static constexpr MemorySpace kSpace = Space;

  T* data = nullptr;
  std::array<std::int64_t, Rank> shape{};
  std::array<std::int64_t, Rank> strides{};  // in elements

  std::int64_t size(int dim) const { return shape[dim]; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  bool contiguous() const {
    std::int64_t expected = 1;
    for (int d = Rank - 1; d >= 0; --d) {
      if (shape[d] != 1 && strides[d] != expected) return false;
      expected *= shape[d];
    }
    return true;
  }
  template <class... Index>
  T& operator()(Index... index) const {
    static_assert(sizeof...(Index) == Rank, "one index per dimension");
    static_assert(Space == MemorySpace::Host, "element access is host-only");
    const std::int64_t idx[] = {static_cast<std::int64_t>(index)...};
    std::int64_t offset = 0;
    for (int d = 0; d < Rank; ++d) offset += idx[d] * strides[d];
    return data[offset];
  }
  // Drops the leading dimension at index i.
  auto sub(std::int64_t i) const {
    static_assert(Rank >= 2, "sub() of a rank-1 view");
    View<T, Rank - 1, Space> out;
    out.data = data + i * strides[0];
    for (int d = 1; d < Rank; ++d) {
      out.shape[d - 1] = shape[d];
      out.strides[d - 1] = strides[d];
    }
    return out;
  }
  // The view restricted to [begin, end) along dimension dim.
  View slice(int dim, std::int64_t begin, std::int64_t end) const {
    KVC_CHECK(0 <= begin && begin <= end && end <= shape[dim], "slice [", begin, ", ", end,
              ") out of range for dimension ", dim, " of size ", shape[dim]);
    View out = *this;
    out.data = data + begin * strides[dim];
    out.shape[dim] = end - begin;
    return out;
  }
  template <class U = T>
  requires(!std::is_const_v<U>) operator View<const U, Rank, Space>() const {
    return View<const U, Rank, Space>{data, shape, strides};
  }
};

template <class T, int Rank>
using HostView = View<T, Rank, MemorySpace::Host>;
template <class T, int Rank>
using DeviceView = View<T, Rank, MemorySpace::Device>;

template <MemorySpace Space = MemorySpace::Host, class T, std::size_t Rank>
View<T, static_cast<int>(Rank), Space> make_view(T* data, const std::int64_t (&shape)[Rank]) {
  View<T, static_cast<int>(Rank), Space> v;
  v.data = data;
  std::int64_t stride = 1;
  for (int d = static_cast<int>(Rank) - 1; d >= 0; --d) {
    v.shape[d] = shape[d];
    v.strides[d] = stride;
    stride *= shape[d];
  }
  return v;
}

template <class T, std::size_t Rank>
DeviceView<T, static_cast<int>(Rank)> make_device_view(T* data, const std::int64_t (&shape)[Rank]) {
  return make_view<MemorySpace::Device>(data, shape);
}

}  // namespace kvc
