#include "services/mesh/placement.h"

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "services/base/status_macros.h"

namespace moemesh {

absl::StatusOr<PlacementPolicy> ParsePlacementPolicy(absl::string_view name) {
  if (name == "contiguous") return PlacementPolicy::kContiguous;
  if (name == "round-robin" || name == "round_robin") return PlacementPolicy::kRoundRobin;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown placement policy '", std::string(name), "' (contiguous, round-robin)"));
}

int32_t PlacementTable::EndpointIndex(const std::string& endpoint) {
  auto it = std::find(endpoints_.begin(), endpoints_.end(), endpoint);
  if (it != endpoints_.end()) return static_cast<int32_t>(it - endpoints_.begin());
  endpoints_.push_back(endpoint);
  return static_cast<int32_t>(endpoints_.size() - 1);
}

absl::StatusOr<PlacementTable> PlacementTable::Build(const MoeModelConfig& config,
                                                     PlacementPolicy policy,
                                                     std::vector<std::string> endpoints,
                                                     int replicas, uint64_t epoch) {
  const int64_t n = static_cast<int64_t>(endpoints.size());
  if (n == 0) return absl::InvalidArgumentError("placement needs at least one endpoint");
  if (std::set<std::string>(endpoints.begin(), endpoints.end()).size() != endpoints.size()) {
    return absl::InvalidArgumentError("placement endpoints must be distinct");
  }
  for (const auto& e : endpoints) {
    if (e.empty()) return absl::InvalidArgumentError("empty placement endpoint");
  }
  if (replicas < 1 || replicas > n) {
    return absl::InvalidArgumentError(
        absl::StrCat("replicas must be in [1, ", n, "] (the endpoint count), got ", replicas));
  }
  PlacementTable t;
  t.epoch_ = epoch;
  t.endpoints_ = std::move(endpoints);
  const int64_t E = config.num_experts;
  for (int64_t layer : config.MoeLayers()) {
    auto& experts = t.replicas_[layer];
    experts.resize(E);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t primary = policy == PlacementPolicy::kContiguous ? e * n / E : e % n;
      for (int r = 0; r < replicas; ++r)
        experts[e].push_back(static_cast<int32_t>((primary + r) % n));
    }
  }
  return t;
}

absl::StatusOr<PlacementTable> PlacementTable::FromJson(const nlohmann::json& json,
                                                        const MoeModelConfig& config) {
  if (!json.is_object()) return absl::InvalidArgumentError("placement: not a JSON object");
  PlacementTable t;
  auto epoch = json.find("epoch");
  if (epoch == json.end() || !epoch->is_number_integer() ||
      (!epoch->is_number_unsigned() && epoch->get<int64_t>() < 0)) {
    return absl::InvalidArgumentError("placement: missing non-negative integer 'epoch'");
  }
  t.epoch_ = epoch->get<uint64_t>();
  auto entries = json.find("entries");
  if (entries == json.end() || !entries->is_array()) {
    return absl::InvalidArgumentError("placement: missing 'entries' array");
  }
  for (const auto& entry : *entries) {
    if (!entry.is_object() || !entry.contains("layer") || !entry.contains("expert") ||
        !entry.contains("replicas") || !entry["layer"].is_number_integer() ||
        !entry["expert"].is_number_integer() || !entry["replicas"].is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "placement: entry ", entry.dump(), " needs integer layer, expert and a replicas list"));
    }
    const int64_t layer = entry["layer"].get<int64_t>();
    const int64_t expert = entry["expert"].get<int64_t>();
    RETURN_IF_ERROR(config.CheckMoeLayer(layer));
    if (expert < 0 || expert >= config.num_experts) {
      return absl::InvalidArgumentError(absl::StrCat("placement: expert ", expert, " of layer ",
                                                     layer, " out of range [0, ",
                                                     config.num_experts, ")"));
    }
    auto& experts = t.replicas_[layer];
    experts.resize(config.num_experts);
    auto& reps = experts[expert];
    for (const auto& r : entry["replicas"]) {
      if (!r.is_string() || r.get<std::string>().empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "placement: layer ", layer, " expert ", expert, ": replicas must be endpoint strings"));
      }
      const int32_t idx = t.EndpointIndex(r.get<std::string>());
      if (std::find(reps.begin(), reps.end(), idx) == reps.end()) reps.push_back(idx);
    }
  }
  RETURN_IF_ERROR(t.Validate(config));
  return t;
}

absl::StatusOr<PlacementTable> PlacementTable::FromProto(const v1::Placement& proto,
                                                         const MoeModelConfig& config) {
  nlohmann::json json = {{"epoch", proto.epoch()}, {"entries", nlohmann::json::array()}};
  for (const auto& e : proto.entries()) {
    json["entries"].push_back(
        {{"layer", e.layer()},
         {"expert", e.expert()},
         {"replicas", std::vector<std::string>(e.replicas().begin(), e.replicas().end())}});
  }
  return FromJson(json, config);
}

nlohmann::json PlacementTable::ToJson() const {
  nlohmann::json entries = nlohmann::json::array();
  for (const auto& [layer, experts] : replicas_) {
    for (size_t e = 0; e < experts.size(); ++e) {
      std::vector<std::string> reps;
      for (int32_t i : experts[e]) reps.push_back(endpoints_[i]);
      entries.push_back({{"layer", layer}, {"expert", e}, {"replicas", reps}});
    }
  }
  return {{"epoch", epoch_}, {"entries", entries}};
}

v1::Placement PlacementTable::ToProto() const {
  v1::Placement p;
  p.set_epoch(epoch_);
  for (const auto& [layer, experts] : replicas_) {
    for (size_t e = 0; e < experts.size(); ++e) {
      auto* entry = p.add_entries();
      entry->set_layer(layer);
      entry->set_expert(static_cast<int32_t>(e));
      for (int32_t i : experts[e]) entry->add_replicas(endpoints_[i]);
    }
  }
  return p;
}

const std::vector<int32_t>& PlacementTable::Replicas(int64_t layer, int32_t expert) const {
  static const std::vector<int32_t> kNone;
  auto it = replicas_.find(layer);
  if (it == replicas_.end() || expert < 0 || expert >= static_cast<int32_t>(it->second.size())) {
    return kNone;
  }
  return it->second[expert];
}

std::vector<std::pair<int64_t, int32_t>> PlacementTable::ExpertsOf(
    const std::string& endpoint) const {
  std::vector<std::pair<int64_t, int32_t>> out;
  auto it = std::find(endpoints_.begin(), endpoints_.end(), endpoint);
  if (it == endpoints_.end()) return out;
  const int32_t idx = static_cast<int32_t>(it - endpoints_.begin());
  for (const auto& [layer, experts] : replicas_) {
    for (size_t e = 0; e < experts.size(); ++e) {
      if (std::find(experts[e].begin(), experts[e].end(), idx) != experts[e].end()) {
        out.push_back({layer, static_cast<int32_t>(e)});
      }
    }
  }
  return out;
}

absl::Status PlacementTable::Validate(const MoeModelConfig& config) const {
  for (int64_t layer : config.MoeLayers()) {
    auto it = replicas_.find(layer);
    for (int64_t e = 0; e < config.num_experts; ++e) {
      if (it == replicas_.end() || it->second[e].empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("placement: layer ", layer, " expert ", e, " has no replica"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace moemesh
