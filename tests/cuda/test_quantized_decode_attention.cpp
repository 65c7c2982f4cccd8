// Decode attention over quantized caches on the GPU (KIVI 2/4-bit, per-token INT8/INT4, FP8)
// against the CPU reference of the same op on the same bytes: caches are built by the library's
// own CPU policies (Kivi, IntPerToken, Fp8 head stores), copied head after head into the layout of
// kvc/ops/quantized_attention.hpp, and read by both backends. Real dump and random awkward shapes
// (ragged lengths per sequence and per KV head, residual-only and one-token caches, lengths that
// are not multiples of the group or the tile, decode-time flushes); every element is checked,
// outputs are poisoned before each run.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <vector>

#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/ops/quantized_attention.hpp"
#include "kvc/policies/quant/fp8.hpp"
#include "kvc/policies/quant/int_per_token.hpp"
#include "kvc/policies/quant/kivi.hpp"

namespace {

namespace rt = kvc::cuda_runtime;
using kvc::MemorySpace;

// K/V rows of one (sequence, KV head) as the policy sees them: the prefill part and the tokens
// appended afterwards one decode step at a time.
struct HeadInput {
  std::vector<float> keys, values;  // [n, D]
  int n = 0, prefill = 0;           // tokens, of which the first `prefill` are loaded at once
};

struct Problem {
  int batch = 0, q_heads = 0, kv_heads = 0, d = 0;
  std::vector<kvc::bf16> q;      // [B, Hq, D]
  std::vector<HeadInput> heads;  // [B * Hkv]
  int max_length() const {
    int m = 0;
    for (const auto& h : heads) m = std::max(m, h.n);
    return m;
  }
};

// Per (sequence, KV head): the dequantized cache (for the tolerance) and parameter magnitudes.
struct HeadBounds {
  std::vector<float> keys, values;  // [n, D] as the store dequantizes them
  float key_min_abs = 0, value_min_abs = 0;
};

// One packed array of the cache: per (sequence, KV head) a slot of `capacity` elements.
template <class T>
struct Packed {
  std::vector<T> data;
  std::int64_t capacity = 0;
  int heads = 0;
  void init(int batch, int kv_heads, std::int64_t cap) {
    heads = kv_heads;
    capacity = std::max<std::int64_t>(cap, 1);
    // Slots rounded up to 16 bytes so every slot starts aligned like the first.
    const std::int64_t per16 = std::max<std::int64_t>(1, 16 / static_cast<std::int64_t>(sizeof(T)));
    capacity = (capacity + per16 - 1) / per16 * per16;
    data.assign(static_cast<std::size_t>(batch * kv_heads * capacity), T{});
  }
  T* slot(int b, int h) { return data.data() + (b * heads + h) * capacity; }
  kvc::ops::CachePart<const T> host() const { return {data.data(), heads * capacity, capacity}; }
};

struct Uploads {
  std::vector<rt::DeviceBuffer> buffers;
  template <class T>
  const T* put(const std::vector<T>& x) {
    buffers.emplace_back(std::max<std::size_t>(x.size() * sizeof(T), 16));
    rt::copy_host_to_device(buffers.back().data(), x.data(), x.size() * sizeof(T), kvc::Cuda{});
    return buffers.back().as<const T>();
  }
  template <class T>
  kvc::ops::CachePart<const T> part(const Packed<T>& p) {
    return {put(p.data), p.heads * p.capacity, p.capacity};
  }
  kvc::DeviceView<const std::int32_t, 2> counts(const std::vector<std::int32_t>& c, int b, int h) {
    return kvc::make_device_view(put(c), {b, h});
  }
};

std::vector<float> to_float(const std::vector<kvc::bf16>& x) {
  std::vector<float> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = static_cast<float>(x[i]);
  return out;
}

using GpuRun = std::function<void(kvc::DeviceView<const kvc::bf16, 3>,
                                  kvc::DeviceView<kvc::bf16, 3>, kvc::DeviceView<float, 1>)>;

// The problem's q on the device, the output and the workspace filled with `poison` bytes, the GPU
// op run on them; returns the output [B, Hq, D].
std::vector<kvc::bf16> run_gpu(const Problem& pb, const GpuRun& gpu_run, unsigned char poison) {
  const std::int64_t b = pb.batch, hq = pb.q_heads, d = pb.d;
  rt::DeviceBuffer q(pb.q.size() * sizeof(kvc::bf16));
  rt::copy_host_to_device(q.data(), pb.q.data(), q.bytes(), kvc::Cuda{});
  rt::DeviceBuffer out(static_cast<std::size_t>(b * hq * d) * sizeof(kvc::bf16));
  rt::fill_bytes(out.data(), poison, out.bytes(), kvc::Cuda{});
  const std::size_t ws = kvc::ops::quantized_decode_attention_workspace_floats(
      pb.batch, pb.q_heads, pb.kv_heads, pb.d, pb.max_length());
  rt::DeviceBuffer workspace(std::max<std::size_t>(ws, 1) * sizeof(float));
  rt::fill_bytes(workspace.data(), poison, workspace.bytes(), kvc::Cuda{});
  gpu_run(kvc::make_device_view(q.as<const kvc::bf16>(), {b, hq, d}),
          kvc::make_device_view(out.as<kvc::bf16>(), {b, hq, d}),
          kvc::make_device_view(workspace.as<float>(), {static_cast<std::int64_t>(ws)}));
  std::vector<kvc::bf16> result(static_cast<std::size_t>(b * hq * d));
  rt::copy_device_to_host(result.data(), out.data(), out.bytes(), kvc::Cuda{});
  rt::synchronize(kvc::Cuda{});
  return result;
}

// Runs a GPU op (given the poisoned output and a workspace) and compares every element with the
// CPU reference. Tolerance, derived per (sequence, KV head) from the types: the output is rounded
// to bf16 (u = 2^-8 relative); the kernels fold scale and minimum out of the dot products
// (sum (q s) code + sum q m instead of sum q (code s + m)), so every score differs from the
// reference's fp32 dequantized products by at most about (D + 16) 2^-24 A, with A = max_t
// sum_c |q_c| (|k_tc| + 2 max|m|) times the softmax scale (the factor 4 below covers the log2(e)
// rescaling and the reference's own rounding); a score error e moves the output by at most 2 e V,
// V = max|v| + 2 max|m_v|, and the fp32 value sums add (n + 64) 2^-24 V, twice over for the two
// levels of merging.
void compare(const Problem& pb, const std::vector<HeadBounds>& bounds,
             const std::vector<float>& reference_out, const GpuRun& gpu_run, const char* what) {
  const std::int64_t hq = pb.q_heads, d = pb.d;
  const int group = pb.q_heads / pb.kv_heads;
  const std::vector<kvc::bf16> result = run_gpu(pb, gpu_run, 0xFF);  // poison: NaN in bf16

  const auto qf = to_float(pb.q);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  double worst_excess = -INFINITY, worst_gpu = 0, worst_ref = 0, worst_tol = 0;
  std::int64_t worst_index = -1;
  for (int s = 0; s < pb.batch; ++s)
    for (int hk = 0; hk < pb.kv_heads; ++hk) {
      const HeadBounds& hb = bounds[s * pb.kv_heads + hk];
      const int n = pb.heads[s * pb.kv_heads + hk].n;
      double v_bound = 0;
      for (float x : hb.values) v_bound = std::max(v_bound, static_cast<double>(std::fabs(x)));
      v_bound += 2.0 * hb.value_min_abs;
      for (int gq = 0; gq < group; ++gq) {
        const std::int64_t head = hk * group + gq;
        double a = 0;
        for (int t = 0; t < n; ++t) {
          double row = 0;
          for (int c = 0; c < d; ++c)
            row += std::fabs(qf[(s * hq + head) * d + c]) *
                   (std::fabs(hb.keys[static_cast<std::size_t>(t) * d + c]) + 2.0 * hb.key_min_abs);
          a = std::max(a, row);
        }
        const double score_error = 4.0 * (d + 16) * std::ldexp(1.0, -24) * a * scale;
        const double absolute =
            2.0 * score_error * v_bound + 2.0 * (n + 64) * std::ldexp(1.0, -24) * v_bound;
        for (int c = 0; c < d; ++c) {
          const std::int64_t i = (s * hq + head) * d + c;
          const double gpu = static_cast<float>(result[i]);
          const double ref = reference_out[i];
          const double tol =
              std::ldexp(1.0, -8) * std::fabs(ref) + (1 + std::ldexp(1.0, -8)) * absolute;
          const double excess = std::isnan(gpu) ? INFINITY : std::fabs(gpu - ref) - tol;
          if (excess > worst_excess) {
            worst_excess = excess, worst_index = i, worst_gpu = gpu, worst_ref = ref,
            worst_tol = tol;
          }
        }
      }
    }
  INFO(what << ": B=" << pb.batch << " Hq=" << pb.q_heads << " Hkv=" << pb.kv_heads << " D=" << pb.d
            << " max n=" << pb.max_length() << "; worst element " << worst_index << ": gpu "
            << worst_gpu << " vs reference " << worst_ref << " (tolerance " << worst_tol
            << ", excess " << worst_excess << ")");
  REQUIRE(worst_excess <= 0.0);
}

// Feeds one head's rows to a policy store: prefill, then one append + after_step per token.
template <class Policy>
typename Policy::HeadStore fill_store(const Policy& policy, const HeadInput& in, int d) {
  typename Policy::HeadStore store;
  std::vector<std::int32_t> positions(in.n);
  for (int t = 0; t < in.n; ++t) positions[t] = t;
  store.load(policy, kvc::make_view(in.keys.data(), {in.prefill, d}),
             kvc::make_view(in.values.data(), {in.prefill, d}),
             std::span(positions.data(), in.prefill));
  for (int t = in.prefill; t < in.n; ++t) {
    store.append(policy, &in.keys[static_cast<std::size_t>(t) * d],
                 &in.values[static_cast<std::size_t>(t) * d], t);
    store.after_step(policy);
  }
  return store;
}

template <class Store>
HeadBounds dequantized(const Store& store, int n, int d) {
  HeadBounds hb;
  hb.keys.resize(static_cast<std::size_t>(n) * d);
  hb.values.resize(hb.keys.size());
  if (n > 0) {
    store.keys(kvc::make_view(hb.keys.data(), {n, d}));
    store.values(kvc::make_view(hb.values.data(), {n, d}));
  }
  return hb;
}

float max_abs(std::span<const float> x) {
  float m = 0;
  for (float v : x) m = std::max(m, std::fabs(v));
  return m;
}

void copy_rows_f16(const std::vector<float>& rows, int first, int count, int d, kvc::f16* dst) {
  for (int t = 0; t < count; ++t)
    for (int c = 0; c < d; ++c)
      dst[t * d + c] = kvc::f16(rows[static_cast<std::size_t>(first + t) * d + c]);
}

// The CPU reference's output [B, Hq, D] over a host cache description (NaN-filled first).
template <class HostCache>
std::vector<float> cpu_reference(const Problem& pb, const HostCache& host) {
  std::vector<float> out(static_cast<std::size_t>(pb.batch) * pb.q_heads * pb.d, NAN);
  const auto qf = to_float(pb.q);
  const std::int64_t b = pb.batch, hq = pb.q_heads, d = pb.d;
  kvc::ops::decode_attention(kvc::Cpu{}, kvc::make_view(qf.data(), {b, hq, d}), host,
                             kvc::make_view(out.data(), {b, hq, d}));
  return out;
}

// ---- KIVI
// ----------------------------------------------------------------------------------------
// The GPU outputs of a problem whose every (sequence, KV head) the kernel must refuse loudly:
// every element NaN (the output is poisoned with zeros first, so the NaN is the kernel's).
void require_all_nan(const Problem& pb, const GpuRun& gpu_run) {
  // Zeros, not NaN, as the poison: a NaN that shows is the kernel's.
  const std::vector<kvc::bf16> result = run_gpu(pb, gpu_run, 0);
  int finite = 0;
  for (const auto x : result) finite += std::isnan(static_cast<float>(x)) ? 0 : 1;
  INFO(finite << " of " << result.size() << " outputs are not NaN");
  REQUIRE(finite == 0);
}

// out_of_range: the keys' groups span more than the tensor-core kernel's exact range (key scale
// >= 1024): every output must be NaN rather than a silently wrong value.
void check_kivi(const Problem& pb, const kvc::Kivi& kivi, bool out_of_range = false) {
  const int B = pb.batch, H = pb.kv_heads, d = pb.d, G = kivi.group;
  const int per_word = 32 / kivi.key_bits;
  std::vector<kvc::Kivi::HeadStore> stores;
  std::vector<HeadBounds> bounds;
  int max_qk = 0, max_qv = 0, max_rk = 0, max_rv = 0;
  for (const auto& in : pb.heads) {
    stores.push_back(fill_store(kivi, in, d));
    const auto& st = stores.back();
    bounds.push_back(dequantized(st, in.n, d));
    bounds.back().key_min_abs = max_abs(st.key_tensor().channel_blocks().minimums());
    bounds.back().value_min_abs = max_abs(st.value_tensor().token_rows().minimums());
    max_qk = std::max(max_qk, st.quantized_keys());
    max_qv = std::max(max_qv, st.quantized_values());
    max_rk = std::max(max_rk, st.residual_keys());
    max_rv = std::max(max_rv, st.residual_values());
  }
  Packed<std::uint32_t> kc, vc;
  Packed<kvc::f16> ks, km, kr, vs, vm, vr;
  kc.init(B, H, static_cast<std::int64_t>(max_qk) * d / per_word);
  ks.init(B, H, static_cast<std::int64_t>(max_qk / G) * d);
  km.init(B, H, ks.capacity);
  kr.init(B, H, static_cast<std::int64_t>(max_rk) * d);
  vc.init(B, H, static_cast<std::int64_t>(max_qv) * d / per_word);
  vs.init(B, H, static_cast<std::int64_t>(max_qv) * (d / G));
  vm.init(B, H, vs.capacity);
  vr.init(B, H, static_cast<std::int64_t>(max_rv) * d);
  std::vector<std::int32_t> lengths, qks, qvs;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const auto& st = stores[b * H + h];
      const auto& hb = bounds[b * H + h];
      const int n = pb.heads[b * H + h].n, qk = st.quantized_keys(), qv = st.quantized_values();
      lengths.push_back(n), qks.push_back(qk), qvs.push_back(qv);
      const auto& blocks = st.key_tensor().channel_blocks();
      std::copy(blocks.codes().begin(), blocks.codes().end(), kc.slot(b, h));
      for (std::size_t i = 0; i < blocks.scales().size(); ++i) {
        ks.slot(b, h)[i] = kvc::f16(blocks.scales()[i]);
        km.slot(b, h)[i] = kvc::f16(blocks.minimums()[i]);
      }
      const auto& rows = st.value_tensor().token_rows();
      std::copy(rows.codes().begin(), rows.codes().end(), vc.slot(b, h));
      for (std::size_t i = 0; i < rows.scales().size(); ++i) {
        vs.slot(b, h)[i] = kvc::f16(rows.scales()[i]);
        vm.slot(b, h)[i] = kvc::f16(rows.minimums()[i]);
      }
      copy_rows_f16(hb.keys, qk, n - qk, d, kr.slot(b, h));
      copy_rows_f16(hb.values, qv, n - qv, d, vr.slot(b, h));
    }
  kvc::ops::KiviCache<MemorySpace::Host> host;
  host.bits = kivi.key_bits;
  host.group = G;
  host.key_codes = kc.host(), host.key_scale = ks.host(), host.key_minimum = km.host();
  host.key_residual = kr.host();
  host.value_codes = vc.host(), host.value_scale = vs.host(), host.value_minimum = vm.host();
  host.value_residual = vr.host();
  host.lengths = kvc::make_view(static_cast<const std::int32_t*>(lengths.data()), {B, H});
  host.quantized_keys = kvc::make_view(static_cast<const std::int32_t*>(qks.data()), {B, H});
  host.quantized_values = kvc::make_view(static_cast<const std::int32_t*>(qvs.data()), {B, H});
  host.max_length = pb.max_length();
  const auto reference = cpu_reference(pb, host);

  Uploads up;
  kvc::ops::KiviCache<MemorySpace::Device> dev;
  dev.bits = kivi.key_bits;
  dev.group = G;
  dev.key_codes = up.part(kc), dev.key_scale = up.part(ks), dev.key_minimum = up.part(km);
  dev.key_residual = up.part(kr);
  dev.value_codes = up.part(vc), dev.value_scale = up.part(vs), dev.value_minimum = up.part(vm);
  dev.value_residual = up.part(vr);
  dev.lengths = up.counts(lengths, B, H);
  dev.quantized_keys = up.counts(qks, B, H);
  dev.quantized_values = up.counts(qvs, B, H);
  dev.max_length = pb.max_length();
  const auto run = [&](auto q, auto out, auto ws) {
    kvc::ops::decode_attention(kvc::Cuda{}, q, dev, out, ws);
  };
  if (out_of_range) {
    require_all_nan(pb, run);
    return;
  }
  compare(pb, bounds, reference, run, kivi.key_bits == 2 ? "kivi-2" : "kivi-4");
}

// ---- per-token INT8 / INT4
// -------------------------------------------------------------------------
void check_int(const Problem& pb, const kvc::IntPerToken& policy) {
  const int B = pb.batch, H = pb.kv_heads, d = pb.d;
  const int per_word = 32 / policy.bits, G = policy.group == 0 ? d : policy.group;
  const int pbytes = kvc::ops::param_bytes(policy.scales);
  std::vector<kvc::IntPerToken::HeadStore> stores;
  std::vector<HeadBounds> bounds;
  int max_m = 0, max_w = 0;
  for (const auto& in : pb.heads) {
    stores.push_back(fill_store(policy, in, d));
    const auto& st = stores.back();
    bounds.push_back(dequantized(st, in.n, d));
    bounds.back().key_min_abs = max_abs(st.quantized_keys().minimums());
    bounds.back().value_min_abs = max_abs(st.quantized_values().minimums());
    max_m = std::max(max_m, st.quantized());
    max_w = std::max(max_w, st.window());
  }
  Packed<std::uint32_t> kc, vc;
  Packed<unsigned char> ks, km, vs, vm;  // raw parameter bytes (f16 or f32)
  Packed<kvc::f16> kw, vw;
  kc.init(B, H, static_cast<std::int64_t>(max_m) * d / per_word);
  vc.init(B, H, kc.capacity);
  ks.init(B, H, static_cast<std::int64_t>(max_m) * (d / G) * pbytes);
  km.init(B, H, ks.capacity), vs.init(B, H, ks.capacity), vm.init(B, H, ks.capacity);
  kw.init(B, H, static_cast<std::int64_t>(max_w) * d);
  vw.init(B, H, kw.capacity);
  auto put_params = [&](std::span<const float> x, unsigned char* dst) {
    for (std::size_t i = 0; i < x.size(); ++i) {
      if (policy.scales == kvc::ops::ParamDType::f16) {
        const kvc::f16 h(x[i]);
        std::memcpy(dst + 2 * i, &h.bits, 2);
      } else {
        std::memcpy(dst + 4 * i, &x[i], 4);
      }
    }
  };
  std::vector<std::int32_t> lengths, quantized;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const auto& st = stores[b * H + h];
      const auto& hb = bounds[b * H + h];
      const int n = pb.heads[b * H + h].n, m = st.quantized();
      lengths.push_back(n), quantized.push_back(m);
      std::copy(st.quantized_keys().codes().begin(), st.quantized_keys().codes().end(),
                kc.slot(b, h));
      std::copy(st.quantized_values().codes().begin(), st.quantized_values().codes().end(),
                vc.slot(b, h));
      put_params(st.quantized_keys().scales(), ks.slot(b, h));
      put_params(st.quantized_values().scales(), vs.slot(b, h));
      put_params(st.quantized_keys().minimums(), km.slot(b, h));
      put_params(st.quantized_values().minimums(), vm.slot(b, h));
      copy_rows_f16(hb.keys, m, n - m, d, kw.slot(b, h));
      copy_rows_f16(hb.values, m, n - m, d, vw.slot(b, h));
    }
  auto raw = [&](const Packed<unsigned char>& p) -> kvc::ops::CachePart<const void> {
    return {p.data.data(), p.heads * p.capacity / pbytes, p.capacity / pbytes};
  };
  kvc::ops::IntCache<MemorySpace::Host> host;
  host.bits = policy.bits, host.group = policy.group, host.symmetric = policy.symmetric;
  host.params = policy.scales;
  host.key_codes = kc.host(), host.value_codes = vc.host();
  host.key_scale = raw(ks), host.value_scale = raw(vs);
  if (!policy.symmetric) host.key_minimum = raw(km), host.value_minimum = raw(vm);
  host.key_window = kw.host(), host.value_window = vw.host();
  host.lengths = kvc::make_view(static_cast<const std::int32_t*>(lengths.data()), {B, H});
  host.quantized = kvc::make_view(static_cast<const std::int32_t*>(quantized.data()), {B, H});
  host.max_length = pb.max_length();
  const auto reference = cpu_reference(pb, host);

  Uploads up;
  auto draw = [&](const Packed<unsigned char>& p) -> kvc::ops::CachePart<const void> {
    return {up.put(p.data), p.heads * p.capacity / pbytes, p.capacity / pbytes};
  };
  kvc::ops::IntCache<MemorySpace::Device> dev;
  dev.bits = policy.bits, dev.group = policy.group, dev.symmetric = policy.symmetric;
  dev.params = policy.scales;
  dev.key_codes = up.part(kc), dev.value_codes = up.part(vc);
  dev.key_scale = draw(ks), dev.value_scale = draw(vs);
  if (!policy.symmetric) dev.key_minimum = draw(km), dev.value_minimum = draw(vm);
  dev.key_window = up.part(kw), dev.value_window = up.part(vw);
  dev.lengths = up.counts(lengths, B, H);
  dev.quantized = up.counts(quantized, B, H);
  dev.max_length = pb.max_length();
  compare(
      pb, bounds, reference,
      [&](auto q, auto out, auto ws) { kvc::ops::decode_attention(kvc::Cuda{}, q, dev, out, ws); },
      policy.bits == 8 ? "int8" : "int4");
}

// ---- FP8
// -------------------------------------------------------------------------------------------
void check_fp8(const Problem& pb, const kvc::Fp8& policy) {
  const int B = pb.batch, H = pb.kv_heads, d = pb.d;
  std::vector<kvc::Fp8::HeadStore> stores;
  std::vector<HeadBounds> bounds;
  for (const auto& in : pb.heads) {
    stores.push_back(fill_store(policy, in, d));
    bounds.push_back(dequantized(stores.back(), in.n, d));
  }
  Packed<std::uint8_t> kc, vc;
  kc.init(B, H, static_cast<std::int64_t>(pb.max_length()) * d);
  vc.init(B, H, kc.capacity);
  std::vector<std::int32_t> lengths;
  std::vector<float> kscale, vscale;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const auto& st = stores[b * H + h];
      lengths.push_back(pb.heads[b * H + h].n);
      std::copy(st.key_codes().begin(), st.key_codes().end(), kc.slot(b, h));
      std::copy(st.value_codes().begin(), st.value_codes().end(), vc.slot(b, h));
      kscale.push_back(st.key_scale());
      vscale.push_back(st.value_scale());
    }
  kvc::ops::Fp8Cache<MemorySpace::Host> host;
  host.kind = policy.kind;
  host.key_codes = kc.host(), host.value_codes = vc.host();
  host.key_scale = kvc::make_view(static_cast<const float*>(kscale.data()), {B, H});
  host.value_scale = kvc::make_view(static_cast<const float*>(vscale.data()), {B, H});
  host.lengths = kvc::make_view(static_cast<const std::int32_t*>(lengths.data()), {B, H});
  host.max_length = pb.max_length();
  const auto reference = cpu_reference(pb, host);
  Uploads up;
  kvc::ops::Fp8Cache<MemorySpace::Device> dev;
  dev.kind = policy.kind;
  dev.key_codes = up.part(kc), dev.value_codes = up.part(vc);
  dev.key_scale = kvc::make_device_view(up.put(kscale), {B, H});
  dev.value_scale = kvc::make_device_view(up.put(vscale), {B, H});
  dev.lengths = up.counts(lengths, B, H);
  dev.max_length = pb.max_length();
  compare(
      pb, bounds, reference,
      [&](auto q, auto out, auto ws) { kvc::ops::decode_attention(kvc::Cuda{}, q, dev, out, ws); },
      policy.kind == kvc::ops::Fp8Kind::e4m3 ? "fp8-e4m3" : "fp8-e5m2");
}

// ---- inputs
// ---------------------------------------------------------------------------------------- Random
// problem: lengths[b * Hkv + h] tokens per head, the last `decode` of them appended one step at a
// time (fewer when the head is shorter).
Problem random_problem(int batch, int q_heads, int kv_heads, int d, const std::vector<int>& lengths,
                       int decode, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> gaussian(0.0f, 1.0f);
  Problem pb{batch, q_heads, kv_heads, d, {}, {}};
  pb.q.resize(static_cast<std::size_t>(batch) * q_heads * d);
  for (auto& x : pb.q) x = kvc::bf16(gaussian(rng));
  for (int i = 0; i < batch * kv_heads; ++i) {
    HeadInput in;
    in.n = lengths[i];
    in.prefill = std::max(0, in.n - decode);
    in.keys.resize(static_cast<std::size_t>(in.n) * d);
    in.values.resize(in.keys.size());
    // Keys with per-channel offsets (what makes KIVI quantize keys per channel), values plain.
    std::vector<float> offset(d);
    for (auto& o : offset) o = 2.0f * gaussian(rng);
    for (int t = 0; t < in.n; ++t)
      for (int c = 0; c < d; ++c) {
        in.keys[static_cast<std::size_t>(t) * d + c] = offset[c] + gaussian(rng);
        in.values[static_cast<std::size_t>(t) * d + c] = 2.0f * gaussian(rng);
      }
    pb.heads.push_back(std::move(in));
  }
  return pb;
}

// The bundled dump: sequence 0 attends over tokens [0, 512) with the query of token 511, sequence 1
// over [0, 300) with the query of token 299; the last `decode` tokens are appended step by step.
Problem dump_problem(int layer, int decode) {
  std::filesystem::path data = std::filesystem::path(KVC_TEST_DATA_DIR) / "seq0";
  if (!std::filesystem::exists(data)) data = "tests/data/seq0";
  REQUIRE(std::filesystem::exists(data));
  static const kvc::KvDump dump = kvc::load_dump(data);
  const auto q = dump.q(layer), k = dump.k(layer), v = dump.v(layer);
  const int d = dump.head_dim;
  Problem pb{2, dump.q_heads, dump.kv_heads, d, {}, {}};
  for (int n : {512, 300}) {
    for (int h = 0; h < dump.q_heads; ++h)
      for (int c = 0; c < d; ++c) pb.q.push_back(kvc::bf16(q(h, n - 1, c)));
  }
  for (int n : {512, 300})
    for (int h = 0; h < dump.kv_heads; ++h) {
      HeadInput in;
      in.n = n;
      in.prefill = std::max(1, n - decode);
      for (int t = 0; t < n; ++t)
        for (int c = 0; c < d; ++c) {
          in.keys.push_back(k(h, t, c));
          in.values.push_back(v(h, t, c));
        }
      pb.heads.push_back(std::move(in));
    }
  return pb;
}

}  // namespace

TEST_CASE("cuda quantized decode attention: KIVI on the bundled real dump", "[cuda][quantized]") {
  for (int bits : {2, 4})
    for (int layer : {0, 7}) {
      check_kivi(dump_problem(layer, 0), kvc::Kivi{.key_bits = bits, .value_bits = bits});
      // Decode-time flushes: 112 tokens appended one step at a time.
      check_kivi(dump_problem(layer, 112),
                 kvc::Kivi{.key_bits = bits, .value_bits = bits, .group = 32, .residual = 64});
    }
}

TEST_CASE("cuda quantized decode attention: KIVI on awkward shapes", "[cuda][quantized]") {
  for (int bits : {2, 4}) {
    const kvc::Kivi r64{.key_bits = bits, .value_bits = bits, .group = 32, .residual = 64};
    // Ragged per sequence and per head: one-token and residual-only caches, lengths not multiples
    // of the group or the tile, an empty head, decode flushes.
    check_kivi(random_problem(3, 8, 2, 128, {1, 63, 200, 1000, 0, 777}, 40, 11 + bits), r64);
    // Several splits, every GQA group size.
    check_kivi(random_problem(2, 32, 8, 128, std::vector<int>(16, 5003), 70, 21 + bits), r64);
    check_kivi(random_problem(2, 8, 8, 64, std::vector<int>(16, 2100), 5, 31 + bits),
               kvc::Kivi{.key_bits = bits, .value_bits = bits, .group = 64, .residual = 128});
    check_kivi(
        random_problem(1, 16, 8, 128, {9000, 1, 128, 129, 4095, 4096, 4097, 33}, 3, 41 + bits),
        kvc::Kivi{.key_bits = bits, .value_bits = bits, .group = 128, .residual = 128});
    check_kivi(random_problem(2, 16, 2, 64, {3000, 64, 65, 2999}, 10, 51 + bits), r64);
  }
}

TEST_CASE("cuda quantized decode attention: KIVI keys beyond the exact range give NaN",
          "[cuda][quantized]") {
  // Keys scaled up until their groups span thousands, so that key scales reach 1024 (2 bits, G 32:
  // range / 3 with a range of about 4 sigma x 1500; 4 bits, G 128: range / 15, about 5 sigma x
  // 4000) while every key stays inside f16; one such block makes its (sequence, KV head) NaN.
  for (int bits : {2, 4}) {
    Problem pb = random_problem(2, 8, 2, 128, {200, 300, 256, 130}, 0, 61 + bits);
    for (auto& head : pb.heads)
      for (auto& k : head.keys) k *= bits == 2 ? 1500.0f : 4000.0f;
    const int group = bits == 2 ? 32 : 128;
    const kvc::Kivi kivi{.key_bits = bits, .value_bits = bits, .group = group, .residual = group};
    // The premise, on the CPU store: every head holds a key scale >= 1024.
    for (const auto& in : pb.heads) {
      const auto store = fill_store(kivi, in, pb.d);
      const auto scales = store.key_tensor().channel_blocks().scales();
      REQUIRE(!scales.empty());
      REQUIRE(*std::max_element(scales.begin(), scales.end()) >= 1024.0f);
    }
    check_kivi(pb, kivi, /*out_of_range=*/true);
  }
}

TEST_CASE("cuda quantized decode attention: per-token INT8 / INT4", "[cuda][quantized]") {
  for (int bits : {8, 4}) {
    const kvc::IntPerToken sym{.bits = bits};
    const kvc::IntPerToken asym{.bits = bits,
                                .symmetric = false,
                                .group = 32,
                                .scales = kvc::ops::ParamDType::f32,
                                .residual = 16};
    for (int layer : {0, 7}) {
      check_int(dump_problem(layer, 0), sym);
      check_int(dump_problem(layer, 50), asym);
    }
    check_int(random_problem(3, 8, 2, 128, {1, 63, 200, 1000, 0, 777}, 40, 61 + bits), sym);
    check_int(random_problem(3, 8, 2, 128, {1, 63, 200, 1000, 0, 777}, 40, 71 + bits), asym);
    check_int(random_problem(2, 32, 8, 128, std::vector<int>(16, 5003), 7, 81 + bits),
              kvc::IntPerToken{.bits = bits, .symmetric = true, .group = 64});
    check_int(random_problem(2, 8, 8, 64, std::vector<int>(16, 2100), 5, 91 + bits),
              kvc::IntPerToken{.bits = bits, .symmetric = false, .residual = 3});
    check_int(random_problem(1, 16, 2, 64, {9000, 33}, 3, 101 + bits), sym);
  }
}

TEST_CASE("cuda quantized decode attention: FP8 E4M3 / E5M2", "[cuda][quantized]") {
  for (auto kind : {kvc::ops::Fp8Kind::e4m3, kvc::ops::Fp8Kind::e5m2}) {
    const kvc::Fp8 fp8{.kind = kind};
    for (int layer : {0, 7}) check_fp8(dump_problem(layer, 30), fp8);
    check_fp8(random_problem(3, 8, 2, 128, {1, 63, 200, 1000, 0, 777}, 40, 111), fp8);
    check_fp8(random_problem(2, 32, 8, 128, std::vector<int>(16, 5003), 7, 121), fp8);
    check_fp8(random_problem(2, 8, 8, 64, std::vector<int>(16, 2100), 5, 131), fp8);
    check_fp8(random_problem(1, 16, 2, 64, {9000, 33}, 3, 141), fp8);
  }
}

TEST_CASE("cuda quantized decode attention: INT / FP8 groups and GQA sizes with fallbacks",
          "[cuda][quantized]") {
  // INT8 with groups of 16 channels (a channel group per k-step on tensor cores), asymmetric f16
  // parameters and a window, Hq / Hkv = 2; several splits and ragged heads.
  check_int(random_problem(2, 4, 2, 128, {4500, 31, 97, 2048}, 9, 151),
            kvc::IntPerToken{.bits = 8, .symmetric = false, .group = 16, .residual = 5});
  check_int(random_problem(2, 4, 2, 64, {1500, 300, 33, 64}, 4, 152),
            kvc::IntPerToken{.bits = 8, .group = 16, .scales = kvc::ops::ParamDType::f32});
  // INT4 with groups of 16: the CUDA-core kernel (an INT4 ldmatrix row spans 32 channels).
  check_int(random_problem(2, 4, 2, 64, {1500, 300, 33, 64}, 4, 153),
            kvc::IntPerToken{.bits = 4, .symmetric = false, .group = 16});
  // INT4 asymmetric f32 in groups of 32 with Hq / Hkv = 8 and D 64; INT8 symmetric, Hq / Hkv 2.
  check_int(random_problem(1, 16, 2, 64, {3001, 129}, 6, 154),
            kvc::IntPerToken{.bits = 4,
                             .symmetric = false,
                             .group = 32,
                             .scales = kvc::ops::ParamDType::f32,
                             .residual = 7});
  check_int(random_problem(3, 4, 2, 128, {1, 0, 2049, 4097, 160, 161}, 30, 155),
            kvc::IntPerToken{.bits = 8});
  // FP8 with Hq / Hkv = 8 and 2, tile and split edges.
  for (auto kind : {kvc::ops::Fp8Kind::e4m3, kvc::ops::Fp8Kind::e5m2}) {
    check_fp8(random_problem(2, 16, 2, 128, {3001, 129, 128, 4097}, 20, 161),
              kvc::Fp8{.kind = kind});
    check_fp8(random_problem(2, 4, 2, 64, {31, 32, 33, 2500}, 5, 162), kvc::Fp8{.kind = kind});
  }
}

TEST_CASE("cuda quantized decode attention rejects bad arguments", "[cuda][quantized]") {
  rt::DeviceBuffer buffer(1 << 20);
  const auto* base = buffer.as<const kvc::bf16>();
  auto* out = buffer.as<kvc::bf16>();
  const auto counts = kvc::make_device_view(buffer.as<const std::int32_t>(), {1, 2});
  const auto workspace = kvc::make_device_view(buffer.as<float>(), {1024});
  kvc::ops::KiviCache<MemorySpace::Device> kivi;
  kivi.bits = 3;
  kivi.lengths = kivi.quantized_keys = kivi.quantized_values = counts;
  kivi.max_length = 8;
  REQUIRE_THROWS_WITH(
      kvc::ops::decode_attention(kvc::Cuda{}, kvc::make_device_view(base, {1, 8, 128}), kivi,
                                 kvc::make_device_view(out, {1, 8, 128}), workspace),
      Catch::Contains("bits = 3 is not supported; allowed: {2, 4}"));
  kvc::ops::IntCache<MemorySpace::Device> int4;
  int4.bits = 4;
  int4.group = 8;
  int4.lengths = int4.quantized = counts;
  REQUIRE_THROWS_WITH(
      kvc::ops::decode_attention(kvc::Cuda{}, kvc::make_device_view(base, {1, 8, 64}), int4,
                                 kvc::make_device_view(out, {1, 8, 64}), workspace),
      Catch::Contains("group = 8 must be 0 (head_dim) or a multiple of 16"));
  kvc::ops::Fp8Cache<MemorySpace::Device> fp8;
  fp8.lengths = counts;
  fp8.key_scale = fp8.value_scale = kvc::make_device_view(buffer.as<const float>(), {1, 2});
  fp8.key_codes = {buffer.as<const std::uint8_t>() + 1, 0, 0};
  fp8.value_codes = {buffer.as<const std::uint8_t>(), 0, 0};
  REQUIRE_THROWS_WITH(
      kvc::ops::decode_attention(kvc::Cuda{}, kvc::make_device_view(base, {1, 8, 64}), fp8,
                                 kvc::make_device_view(out, {1, 8, 64}), workspace),
      Catch::Contains("key_codes must start on a 16-byte boundary"));
  fp8.lengths = kvc::make_device_view(buffer.as<const std::int32_t>(), {1, 4});
  REQUIRE_THROWS_WITH(
      kvc::ops::decode_attention(kvc::Cuda{}, kvc::make_device_view(base, {1, 6, 64}), fp8,
                                 kvc::make_device_view(out, {1, 6, 64}), workspace),
      Catch::Contains("must be a multiple of Hkv = 4"));
}
