// Registry entries of the quantization policies that need calibration or shape-specific state:
// cq (Coupled Quantization), vidkv (VidKV), mikv (MiKV, composed with an eviction policy).
#include <string>

#include "kvc/eval/cq_codebook.hpp"
#include "registry_internal.hpp"

namespace kvc {

std::vector<PolicyEntry> calibrated_quant_policies() {
  const CoupledQuant cq{};
  const VidKv vid{};
  const Mikv mikv{};
  return {
      {{"cq",
        PolicyKind::quant,
        "Coupled Quantization: c coupled channels -> one b-bit k-means code (b/c bits/channel), "
        "f16 recent window; needs `kvc calibrate cq`",
        {{"codebook", "", "codebook .safetensors written by `kvc calibrate cq` (required)"},
         {"window", std::to_string(cq.window), "most recent tokens kept in f16"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         CoupledQuant p;
         std::string path;
         params.read_string("codebook", path);
         KVC_CHECK(!path.empty(),
                   "cq: no codebook given; Coupled Quantization needs calibration: run `kvc "
                   "calibrate cq --data DUMP --channels c --bits b --out codebook.safetensors` "
                   "(on a different sequence than the one evaluated) and pass "
                   "cq(codebook=codebook.safetensors)");
         KVC_CHECK(std::filesystem::exists(path), "cq: codebook file '", path,
                   "' does not exist; create it with `kvc calibrate cq --data DUMP --channels c "
                   "--bits b --out ",
                   path, "`");
         p.codebook = shared_cq_codebook(path);
         params.read_int("window", p.window);
         p.validate();
         out.quant.policy = p;
       }},
      {{"vidkv",
        PolicyKind::quant,
        "VidKV: keys 2-bit on high-range channels + DFT 1-bit on the rest, values 1.58-bit "
        "ternary per channel, whole-sequence re-quantization at each flush",
        {{"kbits", "1.5", "key bits in [1, 2]: kbits - 1 of the channels take 2 bits"},
         {"group", std::to_string(vid.group), "tokens per per-channel group (multiple of 32)"},
         {"residual", std::to_string(vid.residual), "f16 buffer length R that triggers a flush"},
         {"protect", "0",
          "tokens whose values take 2 bits: count (>= 1) or ratio (< 1), by value norm (a "
          "stand-in for the STP's embedding similarity)"},
         {"reference_compat", "false",
          "true: the released decode (ternary without scale, binary {0, scale})"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         VidKv p;
         params.read_double("kbits", p.key_bits);
         params.read_int("group", p.group);
         params.read_int("residual", p.residual);
         params.read_double("protect", p.protect);
         params.read_bool("reference_compat", p.reference_compat);
         p.validate();
         out.quant.policy = p;
       }},
      {{"mikv",
        PolicyKind::quant,
        "MiKV: the eviction policy's kept tokens at hi bits, the evicted ones demoted to lo bits "
        "(none dropped); combine as e.g. snapkv(...)+mikv(hi=8,lo=2)",
        {{"hi", std::to_string(mikv.hi_bits), "bits of kept tokens: 4, 8, or 16 (f16)"},
         {"lo", std::to_string(mikv.lo_bits), "bits of evicted tokens: 2, 4, 8 (< hi)"},
         {"group", std::to_string(mikv.group), "channels per (scale, minimum), per token"},
         {"balance", "true", "per-channel key outlier balancing s_c = sqrt(max |K_c|)"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         Mikv p;
         params.read_int("hi", p.hi_bits);
         params.read_int("lo", p.lo_bits);
         params.read_int("group", p.group);
         params.read_bool("balance", p.balance);
         p.validate();
         out.quant.policy = p;
       }},
  };
}

}  // namespace kvc
