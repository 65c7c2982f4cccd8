// kvc/policies/quant/coupled.hpp: Coupled Quantization (CQ, ALGORITHMS.md section 12): the D
// channels of a key (value) are split into D/c contiguous groups of c "coupled" channels; each
// c-channel sub-vector is stored as the b-bit index of its nearest centroid in a codebook learned
// offline by k-means (`kvc calibrate cq`). b/c bits per channel: CQ-8c8b = 1 bit per channel.
//
//   kvc::CqCodebook book = kvc::read_cq_codebook("codebook.safetensors");  //
//   kvc/eval/cq_codebook.hpp struct Config : kvc::DefaultConfig { using Quant = kvc::CoupledQuant;
//   }; kvc::KVCache<Config, kvc::Cpu> cache{shape, kvc::CoupledQuant{.codebook = &book, .window =
//   32}};
//   // `book` must outlive the cache: the policy only points at it.
//
// Codebook ownership: a policy is trivially copyable, so it holds a raw pointer to an immutable
// CqCodebook that someone else owns. `kvc eval` (the registry) loads each codebook file once into a
// process-lifetime, never-modified table (kvc::shared_cq_codebook) and hands out pointers to it;
// library users own their CqCodebook and keep it alive while any cache uses the policy.
//
// Parameters: codebook (required; a missing one is a kvc::Error naming `kvc calibrate cq`),
// window = 32 (most recent tokens kept in f16, a sliding window as in the paper's 1-bit setting).
// Channel count c, code width b and the key space come from the codebook: c, b in {1, 2, 4, 8},
// D % c == 0. Keys are encoded in the space the codebook was calibrated in: "prerope" (the default
// of `kvc calibrate cq`: the cached post-RoPE key is rotated back by -position, encoded, and the
// decoded centroid rotated by +position, so codebooks are position-independent) or "postrope"
// (encoded as cached). RoPE theta and convention are the calibration dump's, recorded in the file.
// When it acts: at prefill compression and after every decode step, every token older than the
// window is encoded (oldest first); tokens never come back to f16.
// State per storage head: K and V codes [n_coded, words_per_token] uint32, the f16 window,
// positions. Determinism: nearest centroid by squared Euclidean distance accumulated in float, ties
// to the lower code. Storage (docs/formats.md, "Coupled Quantization"): per token the D/c codes of
// b bits are packed LSB-first into ceil(D/c * b / 32) uint32 words; bytes() counts codes + the f16
// window as payload; the codebook is a per-model constant (like the weights) and is not counted per
// cache.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvc/ops/quantize.hpp"
#include "kvc/ops/rope.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/quant/dense.hpp"

namespace kvc {

enum class CqKeySpace { prerope, postrope };

// Centroids of every (layer, KV head, channel group) for keys and values.
struct CqCodebook {
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int channels = 8;  // c, coupled channels per group
  int bits = 8;      // b, bits per code; 2^b centroids
  CqKeySpace key_space = CqKeySpace::prerope;
  ops::Rope rope{};
  std::vector<float> keys;    // [L, Hkv, D/c, 2^b, c]
  std::vector<float> values;  // [L, Hkv, D/c, 2^b, c]

  int groups() const { return head_dim / channels; }
  int centroids() const { return 1 << bits; }
  std::size_t table_size() const {
    return static_cast<std::size_t>(layers) * kv_heads * groups() * centroids() * channels;
  }
  // The [2^b, c] centroid table of one (tensor, layer, head, group).
  const float* table(bool key, int layer, int head, int group) const {
    const std::size_t offset =
        ((static_cast<std::size_t>(layer) * kv_heads + head) * groups() + group) *
        static_cast<std::size_t>(centroids()) * channels;
    return (key ? keys.data() : values.data()) + offset;
  }
  void validate() const {
    KVC_CHECK(channels == 1 || channels == 2 || channels == 4 || channels == 8,
              "cq codebook: channels c = ", channels, " is not supported; allowed: {1, 2, 4, 8}");
    KVC_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "cq codebook: bits b = ", bits,
              " is not supported; allowed: {1, 2, 4, 8}");
    KVC_CHECK(layers >= 1 && kv_heads >= 1 && head_dim >= 1 && head_dim % channels == 0,
              "cq codebook: layers = ", layers, ", kv_heads = ", kv_heads,
              ", head_dim = ", head_dim,
              " must be positive with head_dim a multiple of channels = ", channels);
    KVC_CHECK(keys.size() == table_size() && values.size() == table_size(),
              "cq codebook: tables hold ", keys.size(), " and ", values.size(),
              " floats; expected L*Hkv*(D/c)*2^b*c = ", table_size());
  }
};

// Index of the centroid of `table` [k, c] nearest to x [c] (squared Euclidean, float
// accumulation, ties to the lower index).
inline int cq_nearest(const float* x, const float* table, int k, int c) {
  int best = 0;
  float best_distance = 0;
  for (int j = 0; j < k; ++j) {
    float distance = 0;
    for (int i = 0; i < c; ++i) {
      const float diff = x[i] - table[j * c + i];
      distance += diff * diff;
    }
    if (j == 0 || distance < best_distance) best = j, best_distance = distance;
  }
  return best;
}

// uint32 words holding one token's D/c codes of b bits.
inline int cq_words_per_token(int head_dim, int channels, int bits) {
  return static_cast<int>(ops::words_for(head_dim / channels, bits));
}

struct CoupledQuant {
  static constexpr std::string_view kName = "cq";
  static constexpr PolicyKind kKind = PolicyKind::quant;

  const CqCodebook* codebook = nullptr;  // not owned; immutable; must outlive every cache using it
  int window = 32;

  void validate() const {
    KVC_CHECK(codebook != nullptr,
              "cq: no codebook given; Coupled Quantization needs calibration: run `kvc calibrate "
              "cq --data DUMP --channels c --bits b --out codebook.safetensors` and pass "
              "cq(codebook=codebook.safetensors)");
    codebook->validate();
    KVC_CHECK(window >= 0, "cq: window = ", window, " must be >= 0");
  }
  // Every token's codes stand alone, so single tokens can be evicted.
  bool supports_decode_eviction() const { return true; }

  class HeadStore {
   public:
    // Which (layer, KV head) this store holds: selects its codebook tables. KVCache calls it
    // before load().
    void locate(const CoupledQuant& q, int layer, int kv_head) {
      const CqCodebook& book = *q.codebook;
      KVC_CHECK(layer >= 0 && layer < book.layers && kv_head >= 0 && kv_head < book.kv_heads,
                "cq: the codebook covers ", book.layers, " layers x ", book.kv_heads,
                " KV heads; the cache asks for layer ", layer, ", KV head ", kv_head,
                " (calibrate on a dump of the same model)");
      layer_ = layer;
      head_ = kv_head;
    }

    void load(const CoupledQuant& q, HostView<const float, 2> keys, HostView<const float, 2> values,
              std::span<const std::int32_t> positions) {
      const CqCodebook& book = *q.codebook;
      KVC_CHECK(layer_ >= 0,
                "cq: the store was not told its layer and head (locate() before load)");
      head_dim_ = static_cast<int>(keys.size(1));
      KVC_CHECK(head_dim_ == book.head_dim, "cq: the codebook is for head_dim ", book.head_dim,
                ", the cache has head_dim ", head_dim_);
      words_ = cq_words_per_token(head_dim_, book.channels, book.bits);
      key_codes_.clear(), value_codes_.clear(), coded_ = 0;
      key_window_.reset(head_dim_);
      value_window_.reset(head_dim_);
      key_window_.push_rows(keys, 0, keys.size(0));
      value_window_.push_rows(values, 0, values.size(0));
      positions_.assign(positions.begin(), positions.end());
      encode_old(q);
    }
    void append(const CoupledQuant&, const float* key, const float* value, std::int32_t position) {
      key_window_.push(key);
      value_window_.push(value);
      positions_.push_back(position);
    }
    void after_step(const CoupledQuant& q) { encode_old(q); }

    int size() const { return static_cast<int>(positions_.size()); }
    std::span<const std::int32_t> positions() const { return positions_; }
    int coded_tokens() const { return coded_; }
    int window_tokens() const { return key_window_.rows(); }
    std::span<const std::uint32_t> key_codes() const { return key_codes_; }      // [n_coded, W]
    std::span<const std::uint32_t> value_codes() const { return value_codes_; }  // [n_coded, W]

    // Dequantized keys [n, D]: coded tokens (centroids, rotated back to their position for a
    // pre-RoPE codebook), then the f16 window.
    void keys(HostView<float, 2> out) const {
      decode(true, key_codes_, out);
      if (coded_ > 0 && book_->key_space == CqKeySpace::prerope)
        ops::rope_rotate(Cpu{}, book_->rope, out.slice(0, 0, coded_),
                         std::span<const std::int32_t>(positions_).first(coded_));
      key_window_.copy_to(out, coded_);
    }
    void values(HostView<float, 2> out) const {  // [n, D]
      decode(false, value_codes_, out);
      value_window_.copy_to(out, coded_);
    }

    StorageBytes bytes() const {
      StorageBytes b;
      b.payload = static_cast<std::int64_t>((key_codes_.size() + value_codes_.size()) *
                                            sizeof(std::uint32_t)) +
                  key_window_.bytes() + value_window_.bytes();
      b.index = static_cast<std::int64_t>(positions_.size() * sizeof(std::int32_t));
      return b;
    }

    void gather(std::span<const std::int32_t> keep) {
      std::vector<std::int32_t> coded_keep, window_keep;
      for (const auto i : keep) {
        if (i < coded_)
          coded_keep.push_back(i);
        else
          window_keep.push_back(i - coded_);
      }
      ops::compact_rows(Cpu{}, coded_keep, key_codes_, words_);
      ops::compact_rows(Cpu{}, coded_keep, value_codes_, words_);
      coded_ = static_cast<int>(coded_keep.size());
      key_window_.gather(window_keep);
      value_window_.gather(window_keep);
      ops::compact_rows(Cpu{}, keep, positions_, 1);
    }

   private:
    // Encodes the oldest window tokens until at most q.window remain.
    void encode_old(const CoupledQuant& q) {
      book_ = q.codebook;
      const int excess = key_window_.rows() - q.window;
      if (excess <= 0) return;
      const int c = book_->channels, groups = book_->groups(), k = book_->centroids();
      std::vector<float> key(head_dim_), value(head_dim_);
      std::vector<std::uint8_t> codes(groups);
      for (int r = 0; r < excess; ++r) {
        for (int i = 0; i < head_dim_; ++i) key[i] = key_window_.at(r, i);
        for (int i = 0; i < head_dim_; ++i) value[i] = value_window_.at(r, i);
        if (book_->key_space == CqKeySpace::prerope) {
          const std::int32_t back = -positions_[coded_ + r];
          ops::rope_rotate(Cpu{}, book_->rope, make_view(key.data(), {1, head_dim_}),
                           std::span<const std::int32_t>(&back, 1));
        }
        for (const bool is_key : {true, false}) {
          const float* row = is_key ? key.data() : value.data();
          for (int g = 0; g < groups; ++g)
            codes[g] = static_cast<std::uint8_t>(
                cq_nearest(row + g * c, book_->table(is_key, layer_, head_, g), k, c));
          auto& store = is_key ? key_codes_ : value_codes_;
          const std::size_t offset = store.size();
          store.resize(offset + words_);
          ops::pack_codes(codes, book_->bits, std::span<std::uint32_t>(store).subspan(offset));
        }
      }
      key_window_.erase_front(excess);
      value_window_.erase_front(excess);
      coded_ += excess;
    }
    void decode(bool is_key, const std::vector<std::uint32_t>& store,
                HostView<float, 2> out) const {
      if (coded_ == 0) return;
      const int c = book_->channels, groups = book_->groups();
      std::vector<std::uint8_t> codes(groups);
      for (int t = 0; t < coded_; ++t) {
        ops::unpack_codes(std::span<const std::uint32_t>(store).subspan(
                              static_cast<std::size_t>(t) * words_, words_),
                          book_->bits, codes);
        for (int g = 0; g < groups; ++g) {
          const float* centroid = book_->table(is_key, layer_, head_, g) + codes[g] * c;
          for (int i = 0; i < c; ++i) out(t, g * c + i) = centroid[i];
        }
      }
    }

    const CqCodebook* book_ = nullptr;
    int layer_ = -1, head_ = -1, head_dim_ = 0, words_ = 0;
    std::vector<std::uint32_t> key_codes_;    // [n_coded, words_per_token]
    std::vector<std::uint32_t> value_codes_;  // [n_coded, words_per_token]
    int coded_ = 0;
    HalfRows key_window_;                  // [<= window after each step, D], f16
    HalfRows value_window_;                // [<= window after each step, D], f16
    std::vector<std::int32_t> positions_;  // [n]: coded tokens first, then the window
  };
};
static_assert(QuantPolicy<CoupledQuant>);

}  // namespace kvc
