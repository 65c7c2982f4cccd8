// Registry entries of the quantization formats: kivi, int8, int4, fp8 (layouts: docs/formats.md).
#include <string>

#include "registry_internal.hpp"

namespace kvc {
namespace {

const char* axis_name(QuantAxis a) { return a == QuantAxis::channel ? "channel" : "token"; }
const char* dtype_name(ops::ParamDType t) { return t == ops::ParamDType::f16 ? "f16" : "f32"; }

void read_axis(const ParamReader& params, const char* key, QuantAxis& axis) {
  params.read_choice(key, axis, {{"channel", QuantAxis::channel}, {"token", QuantAxis::token}});
}
void read_scales(const ParamReader& params, ops::ParamDType& dtype) {
  params.read_choice("scales", dtype,
                     {{"f16", ops::ParamDType::f16}, {"f32", ops::ParamDType::f32}});
}

template <int Bits>
void build_int(const ParamReader& params, RuntimePolicies& out) {
  IntPerToken p;
  p.bits = Bits;
  params.read_bool("sym", p.symmetric);
  params.read_int("group", p.group);
  read_scales(params, p.scales);
  params.read_int("residual", p.residual);
  p.validate();
  out.quant.policy = p;
}

// int8 and int4 share everything but the width.
template <int Bits>
PolicyEntry int_entry() {
  const IntPerToken d{};
  const std::string bits = std::to_string(Bits);
  return {{"int" + bits,
           PolicyKind::quant,
           "per-token INT" + bits + " per head (" +
               (Bits == 8 ? "vLLM int8, QServe KV8" : "QServe KV4") + "): groups along channels, " +
               std::to_string(32 / Bits) + " codes per 32-bit word",
           {{"sym", d.symmetric ? "true" : "false",
             "true: absmax, codes in [-qmax, qmax]; false: min-max with a minimum"},
            {"group", std::to_string(d.group), "channels per scale; 0 = the whole head_dim"},
            {"scales", dtype_name(d.scales), "f16 | f32 (scales and minimums)"},
            {"residual", std::to_string(d.residual), "newest tokens kept in f16"}}},
          &build_int<Bits>};
}

}  // namespace

std::vector<PolicyEntry> quant_policies() {
  const Kivi kivi{};
  return {
      {{"kivi",
        PolicyKind::quant,
        "KIVI: keys per channel, values per token, asymmetric min-max, f16 residual",
        {{"bits", std::to_string(kivi.key_bits), "key and value bits (2, 4, 8)"},
         {"kbits", std::to_string(kivi.key_bits), "key bits, overrides bits"},
         {"vbits", std::to_string(kivi.value_bits), "value bits, overrides bits"},
         {"group", std::to_string(kivi.group), "group size G"},
         {"residual", std::to_string(kivi.residual), "full-precision residual R (multiple of G)"},
         {"kaxis", axis_name(kivi.key_axis),
          "channel (groups of G tokens, flushed R at a time) | token (groups of G channels, "
          "sliding window of R)"},
         {"vaxis", axis_name(kivi.value_axis), "token | channel, as kaxis"},
         {"scales", dtype_name(kivi.scales), "f16 | f32 (scales and minimums)"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         Kivi p;
         int bits = p.key_bits;
         params.read_int("bits", bits);
         p.key_bits = p.value_bits = bits;
         params.read_int("kbits", p.key_bits);
         params.read_int("vbits", p.value_bits);
         params.read_int("group", p.group);
         params.read_int("residual", p.residual);
         read_axis(params, "kaxis", p.key_axis);
         read_axis(params, "vaxis", p.value_axis);
         read_scales(params, p.scales);
         p.validate();
         out.quant.policy = p;
       }},
      int_entry<8>(),
      int_entry<4>(),
      {{"fp8",
        PolicyKind::quant,
        "FP8 K/V (OCP E4M3 or E5M2), saturating, fp32 scales: static, or amax / fp8_max over "
        "the prefill per head or per tensor",
        {{"kind", "e4m3", "e4m3 | e5m2"},
         {"scale", "0", "static scale for K and V (> 0); 0 = computed per head"},
         {"kscale", "0", "static key scale, overrides scale"},
         {"vscale", "0", "static value scale, overrides scale"},
         {"scope", "head",
          "what a computed scale covers: head (the storage head's prefill) | tensor (the layer's "
          "whole prompt, all KV heads)"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         Fp8 p;
         params.read_choice("kind", p.kind,
                            {{"e4m3", ops::Fp8Kind::e4m3}, {"e5m2", ops::Fp8Kind::e5m2}});
         double scale = 0;
         params.read_double("scale", scale);
         p.key_scale = p.value_scale = scale;
         params.read_double("kscale", p.key_scale);
         params.read_double("vscale", p.value_scale);
         params.read_choice("scope", p.scope,
                            {{"head", Fp8Scope::head}, {"tensor", Fp8Scope::tensor}});
         p.validate();
         out.quant.policy = p;
       }},
  };
}

}  // namespace kvc
