// Registry entries of the key-projection policies: shadowkv (ShadowKV), think (ThinK),
// loki (Loki, needs `kvc calibrate loki`), palu (Palu-style latent keys, needs `kvc calibrate
// palu`).
#include <filesystem>
#include <string>

#include "kvc/eval/key_basis.hpp"
#include "registry_internal.hpp"

namespace kvc {
namespace {

const KeyBasis* basis_of(const ParamReader& params, const std::string& method) {
  std::string path;
  params.read_string("basis", path);
  KVC_CHECK(!path.empty(), method, ": no basis given; it needs calibration: run `kvc calibrate ",
            method, " --data DUMP --out ", method,
            ".safetensors` (on a different sequence than "
            "the one evaluated) and pass ",
            method, "(basis=", method, ".safetensors)");
  KVC_CHECK(std::filesystem::exists(path), method, ": basis file '", path,
            "' does not exist; create it with `kvc calibrate ", method, " --data DUMP --out ", path,
            "`");
  return shared_key_basis(path, method);
}

}  // namespace

std::vector<PolicyEntry> keyproj_policies() {
  const ShadowKv shadow{};
  const Think think{};
  const Loki loki{};
  const Palu palu{};
  return {
      {{"shadowkv",
        PolicyKind::key_projection,
        "ShadowKV: rank-r SVD of pre-RoPE prompt keys, chunk landmarks, exact outlier chunks and "
        "local window, values in a host tier; per step attends to the budget best chunks; needs "
        "k_prerope",
        {{"budget", std::to_string(shadow.budget),
          "tokens selected per KV head and step (multiple of chunk)"},
         {"rank", std::to_string(shadow.rank), "SVD rank r of the [T, Hkv*D] pre-RoPE keys"},
         {"chunk", std::to_string(shadow.chunk), "tokens per chunk (one landmark each)"},
         {"local_chunks", std::to_string(shadow.local_chunks),
          "chunks of the prompt's end kept exact (the local window)"},
         {"outliers", std::to_string(shadow.outliers),
          "chunks kept exact: lowest min cosine to their landmark"},
         {"threshold", std::to_string(shadow.threshold),
          "acts only on prompts longer than this (shorter ones stay exact, as released)"},
         {"layout", "accuracy", "accuracy | efficient (chunk count rounded down to 8s)"},
         {"reference_compat", "false", "true: landmark logits scaled by 1/sqrt(128) as released"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         ShadowKv p;
         params.read_int("budget", p.budget);
         params.read_int("rank", p.rank);
         params.read_int("chunk", p.chunk);
         params.read_int("local_chunks", p.local_chunks);
         params.read_int("outliers", p.outliers);
         params.read_int("threshold", p.threshold);
         params.read_choice(
             "layout", p.layout,
             {{"accuracy", ShadowKvLayout::accuracy}, {"efficient", ShadowKvLayout::efficient}});
         params.read_bool("reference_compat", p.reference_compat);
         p.validate();
         out.key_projection.policy = p;
       }},
      {{"think",
        PolicyKind::key_projection,
        "ThinK: prune the int(D*ratio) key channels with the smallest q^2*k^2 score of each head "
        "(after the eviction stage); the recent tokens keep all channels",
        {{"ratio", default_text(think.ratio), "share of key channels pruned, in [0, 1)"},
         {"recent", std::to_string(think.recent), "most recent cached tokens kept at full width"},
         {"window", std::to_string(think.window), "last prompt queries that score the channels"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         Think p;
         params.read_double("ratio", p.ratio);
         params.read_int("recent", p.recent);
         params.read_int("window", p.window);
         p.validate();
         out.key_projection.policy = p;
       }},
      {{"loki",
        PolicyKind::key_projection,
        "Loki: each decode step, per query head, exact attention on the top-k keys by scores in "
        "the first r PCA directions (retrieval: nothing is dropped); needs `kvc calibrate loki`",
        {{"basis", "", "basis .safetensors written by `kvc calibrate loki` (required)"},
         {"dims", default_text(loki.dims), "PCA directions r: share d_f of D (< 1) or a count"},
         {"variance", default_text(loki.variance),
          "when in (0, 1): r from the cumulative explained variance instead (released rule)"},
         {"topk", default_text(loki.topk), "keys attended k: share k_f of n (< 1) or a count"},
         {"recent", default_text(loki.recent), "share of the most recent keys always attended"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         Loki p;
         p.basis = basis_of(params, "loki");
         params.read_double("dims", p.dims);
         params.read_double("variance", p.variance);
         params.read_double("topk", p.topk);
         params.read_double("recent", p.recent);
         p.validate();
         out.key_projection.policy = p;
       }},
      {{"palu",
        PolicyKind::key_projection,
        "Palu-style latent keys: pre-RoPE keys of a head group projected on a calibrated rank-r "
        "SVD basis, latents cached (optionally quantized), reconstruct then RoPE; needs `kvc "
        "calibrate palu`",
        {{"basis", "", "basis .safetensors written by `kvc calibrate palu` (required)"},
         {"bits", std::to_string(palu.bits), "latent bits: 0 (f16), 2, 3, 4, 8"},
         {"qgroup", std::to_string(palu.qgroup), "latent values per scale and zero (divides r)"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         Palu p;
         p.basis = basis_of(params, "palu");
         params.read_int("bits", p.bits);
         params.read_int("qgroup", p.qgroup);
         p.validate();
         out.key_projection.policy = p;
       }},
  };
}

}  // namespace kvc
