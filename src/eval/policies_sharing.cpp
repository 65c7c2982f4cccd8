// Registry entries of the layer-sharing family: minicache, cla (kvc/policies/sharing/*.hpp).
#include <string>
#include <vector>

#include "registry_internal.hpp"

namespace kvc {
namespace {

// "0:0:2:2" -> {0, 0, 2, 2}: ':' separates the entries (',' separates a spec's parameters).
std::vector<int> parse_layer_map(const std::string& text) {
  std::vector<int> layers;
  std::size_t begin = 0;
  while (true) {
    const std::size_t end = text.find(':', begin);
    const std::string item = text.substr(begin, end == std::string::npos ? end : end - begin);
    KVC_CHECK(!item.empty() && item.size() <= 4 &&
                  item.find_first_not_of("0123456789") == std::string::npos,
              "cla: map = '", text, "': entry '", item,
              "' is not a layer index; write the source layer of every layer, e.g. 0:0:2:2");
    layers.push_back(std::stoi(item));
    if (end == std::string::npos) break;
    begin = end + 1;
  }
  return layers;
}

}  // namespace

std::vector<PolicyEntry> sharing_policies() {
  const MiniCache mini{};
  const Cla cla{};
  return {
      {{"minicache",
        PolicyKind::layer_sharing,
        "MiniCache: adjacent layer pairs from start share one SLERP direction per token, "
        "magnitudes per layer, most distant tokens kept unmerged; decode tokens stay unmerged",
        {{"t", default_text(mini.t), "SLERP weight of the upper layer (0 = lower's direction)"},
         {"start", std::to_string(mini.start), "first merged layer; -1 = L/2"},
         {"retain", "range",
          "range: keep d > d_max - gamma (d_max - d_min) | ratio: keep ceil(ratio T) largest d"},
         {"gamma", default_text(mini.gamma), "retention threshold of the range rule"},
         {"ratio", default_text(mini.ratio), "retained fraction of the ratio rule"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         MiniCache p;
         params.read_double("t", p.t);
         params.read_int("start", p.start);
         params.read_choice("retain", p.retain,
                            {{"range", RetentionRule::range}, {"ratio", RetentionRule::ratio}});
         params.read_double("gamma", p.gamma);
         params.read_double("ratio", p.ratio);
         p.validate();
         out.layer_sharing.policy = p;
       }},
      {{"cla",
        PolicyKind::layer_sharing,
        "CLA-style sharing (measured, untrained): layer l attends to layer s(l)'s K/V; only "
        "layers with s(l) = l store",
        {{"map", "none", "s(0):s(1):...: the layer each layer reads (<= itself); overrides share"},
         {"share", std::to_string(cla.share), "sharing factor: ceil(L / share) layers store"},
         {"pick", "similarity",
          "similarity: readers and sources by prompt-key cosine | groups: consecutive groups"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         Cla p;
         params.read_int("share", p.share);
         params.read_choice("pick", p.pick,
                            {{"similarity", ClaPick::similarity}, {"groups", ClaPick::groups}});
         if (const std::string* map = params.find("map"); map && *map != "none") {
           const Cla given = Cla::from_map(parse_layer_map(*map));
           p.map = given.map;
           p.map_size = given.map_size;
         }
         p.validate();
         out.layer_sharing.policy = p;
       }},
  };
}

}  // namespace kvc
