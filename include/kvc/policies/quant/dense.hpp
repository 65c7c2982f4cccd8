// kvc/policies/quant/dense.hpp: the no-op quantization slot: tokens kept as f16 K/V rows.
//
//   struct Config : kvc::DefaultConfig {};       // Quant = kvc::NoQuant
//   kvc::NoQuant::HeadStore store;                // [n, D] f16 keys and values + positions
//
// Stored in f16, the dtype engines cache and the bundled dumps hold; `bytes()` counts 2 bytes per
// element of K and V, plus 4 bytes per position as index bytes.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/ops/select.hpp"
#include "kvc/policies/concepts.hpp"

namespace kvc {

// Rows of f16 with a row width, the building block of every store's full-precision part.
class HalfRows {
 public:
  void reset(int width) {
    width_ = width;
    data_.clear();
  }
  int width() const { return width_; }
  int rows() const { return width_ == 0 ? 0 : static_cast<int>(data_.size() / width_); }
  void push(const float* row) {
    for (int c = 0; c < width_; ++c) data_.push_back(f16(row[c]));
  }
  void push_rows(HostView<const float, 2> rows, std::int64_t begin, std::int64_t end) {
    for (std::int64_t r = begin; r < end; ++r)
      for (int c = 0; c < width_; ++c) data_.push_back(f16(rows(r, c)));
  }
  float at(int row, int col) const {
    return static_cast<float>(data_[static_cast<std::size_t>(row) * width_ + col]);
  }
  // Copies rows [0, rows()) into out starting at out row `first`.
  void copy_to(HostView<float, 2> out, std::int64_t first) const {
    for (int r = 0; r < rows(); ++r)
      for (int c = 0; c < width_; ++c) out(first + r, c) = at(r, c);
  }
  void erase_front(int count) {
    data_.erase(data_.begin(), data_.begin() + static_cast<std::ptrdiff_t>(count) * width_);
  }
  void clear() { data_.clear(); }
  void gather(std::span<const std::int32_t> keep) { ops::compact_rows(Cpu{}, keep, data_, width_); }
  std::int64_t bytes() const { return static_cast<std::int64_t>(data_.size() * sizeof(f16)); }

 private:
  int width_ = 0;
  std::vector<f16> data_;  // [rows, width]
};

struct NoQuant {
  static constexpr std::string_view kName = "none";
  static constexpr PolicyKind kKind = PolicyKind::quant;
  void validate() const {}
  bool supports_decode_eviction() const { return true; }

  class HeadStore {
   public:
    void load(const NoQuant&, HostView<const float, 2> keys, HostView<const float, 2> values,
              std::span<const std::int32_t> positions) {
      const int d = static_cast<int>(keys.size(1));
      keys_.reset(d);
      values_.reset(d);
      keys_.push_rows(keys, 0, keys.size(0));
      values_.push_rows(values, 0, values.size(0));
      positions_.assign(positions.begin(), positions.end());
    }
    void append(const NoQuant&, const float* key, const float* value, std::int32_t position) {
      keys_.push(key);
      values_.push(value);
      positions_.push_back(position);
    }
    void after_step(const NoQuant&) {}
    int size() const { return static_cast<int>(positions_.size()); }
    std::span<const std::int32_t> positions() const { return positions_; }
    void keys(HostView<float, 2> out) const { keys_.copy_to(out, 0); }      // [n, D]
    void values(HostView<float, 2> out) const { values_.copy_to(out, 0); }  // [n, D]
    StorageBytes bytes() const {
      return {keys_.bytes() + values_.bytes(), 0,
              static_cast<std::int64_t>(positions_.size() * sizeof(std::int32_t))};
    }
    void gather(std::span<const std::int32_t> keep) {
      keys_.gather(keep);
      values_.gather(keep);
      ops::compact_rows(Cpu{}, keep, positions_, 1);
    }

   private:
    HalfRows keys_;                        // [n, D]
    HalfRows values_;                      // [n, D]
    std::vector<std::int32_t> positions_;  // [n]
  };
};
static_assert(QuantPolicy<NoQuant>);

}  // namespace kvc
