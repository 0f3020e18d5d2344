// PlacementTable: which expert services hold each (MoE layer, expert), versioned by epoch.
//
// A table is immutable once built. The router holds the current one through a
// shared_ptr it swaps whole when the placement changes, so requests already planned on
// an epoch finish on it and the hot path never takes a lock on the table.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "router_control.pb.h"
#include "services/model/model_config.h"

namespace moemesh {

enum class PlacementPolicy : uint8_t {
  kContiguous,  // expert e of every layer on endpoint floor(e·N/E): ranges per service
  kRoundRobin,  // expert e on endpoint e mod N
};

absl::StatusOr<PlacementPolicy> ParsePlacementPolicy(absl::string_view name);

class PlacementTable {
 public:
  // Every expert of every MoE layer of `config` over `endpoints` ("host:port" or a DNS
  // name such as a Kubernetes headless-service pod name). `replicas` copies of each
  // expert go on consecutive endpoints (replicas ≤ endpoints).
  static absl::StatusOr<PlacementTable> Build(const MoeModelConfig& config, PlacementPolicy policy,
                                              std::vector<std::string> endpoints, int replicas = 1,
                                              uint64_t epoch = 1);
  // {"epoch": N, "entries": [{"layer": L, "expert": e, "replicas": ["host:port", ...]}, ...]}
  static absl::StatusOr<PlacementTable> FromJson(const nlohmann::json& json,
                                                 const MoeModelConfig& config);
  static absl::StatusOr<PlacementTable> FromProto(const v1::Placement& proto,
                                                  const MoeModelConfig& config);
  nlohmann::json ToJson() const;
  v1::Placement ToProto() const;

  uint64_t epoch() const { return epoch_; }
  const std::vector<std::string>& endpoints() const { return endpoints_; }
  // Endpoint indices holding (layer, expert); empty if the layer is not MoE.
  const std::vector<int32_t>& Replicas(int64_t layer, int32_t expert) const;
  // Every (layer, expert) an endpoint holds.
  std::vector<std::pair<int64_t, int32_t>> ExpertsOf(const std::string& endpoint) const;

 private:
  // Checks that every (MoE layer, expert) of config has at least one replica.
  absl::Status Validate(const MoeModelConfig& config) const;
  int32_t EndpointIndex(const std::string& endpoint);

  uint64_t epoch_ = 0;
  std::vector<std::string> endpoints_;
  std::map<int64_t, std::vector<std::vector<int32_t>>> replicas_;  // layer -> expert -> endpoints
};

}  // namespace moemesh
