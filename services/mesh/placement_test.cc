#include "services/mesh/placement.h"

#include <gtest/gtest.h>

namespace moemesh {
namespace {

MoeModelConfig Config() {
  nlohmann::json j = {{"model_type", "deepseek_v3"},
                      {"hidden_size", 16},
                      {"num_hidden_layers", 3},
                      {"n_routed_experts", 8},
                      {"num_experts_per_tok", 2},
                      {"moe_intermediate_size", 8},
                      {"n_shared_experts", 1},
                      {"first_k_dense_replace", 1},
                      {"n_group", 1},
                      {"topk_group", 1}};
  return ParseMoeModelConfig(j).value();
}

TEST(PlacementTest, ContiguousAndRoundRobin) {
  const MoeModelConfig c = Config();
  auto t = PlacementTable::Build(c, PlacementPolicy::kContiguous, {"a:1", "b:2", "c:3"}).value();
  EXPECT_EQ(t.epoch(), 1u);
  EXPECT_EQ(t.Replicas(1, 0), (std::vector<int32_t>{0}));
  EXPECT_EQ(t.Replicas(1, 2), (std::vector<int32_t>{0}));
  EXPECT_EQ(t.Replicas(1, 3), (std::vector<int32_t>{1}));
  EXPECT_EQ(t.Replicas(2, 7), (std::vector<int32_t>{2}));
  EXPECT_TRUE(t.Replicas(0, 0).empty()) << "layer 0 is dense";
  EXPECT_EQ(t.ExpertsOf("b:2").size(), 2u * 3u);  // experts 3..5 of layers 1 and 2
  auto rr = PlacementTable::Build(c, PlacementPolicy::kRoundRobin, {"a:1", "b:2"}, 2).value();
  EXPECT_EQ(rr.Replicas(1, 3), (std::vector<int32_t>{1, 0}));
  EXPECT_EQ(rr.ExpertsOf("a:1").size(), 16u);
}

TEST(PlacementTest, JsonAndProtoRoundTrip) {
  const MoeModelConfig c = Config();
  auto t =
      PlacementTable::Build(c, PlacementPolicy::kRoundRobin, {"x:1", "y:2", "z:3"}, 2, 7).value();
  auto from_json = PlacementTable::FromJson(t.ToJson(), c);
  ASSERT_TRUE(from_json.ok()) << from_json.status();
  EXPECT_EQ(from_json->ToJson(), t.ToJson());
  auto from_proto = PlacementTable::FromProto(t.ToProto(), c);
  ASSERT_TRUE(from_proto.ok()) << from_proto.status();
  EXPECT_EQ(from_proto->epoch(), 7u);
  EXPECT_EQ(from_proto->ToJson(), t.ToJson());
}

TEST(PlacementTest, RejectsBadTables) {
  const MoeModelConfig c = Config();
  EXPECT_FALSE(PlacementTable::Build(c, PlacementPolicy::kContiguous, {}).ok());
  EXPECT_FALSE(PlacementTable::Build(c, PlacementPolicy::kContiguous, {"a", "a"}).ok());
  EXPECT_FALSE(PlacementTable::Build(c, PlacementPolicy::kContiguous, {"a"}, 2).ok());
  nlohmann::json j =
      PlacementTable::Build(c, PlacementPolicy::kContiguous, {"a:1"}).value().ToJson();
  j["entries"].erase(j["entries"].begin() + 3);  // layer 1, expert 3 loses its only replica
  auto missing = PlacementTable::FromJson(j, c);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("layer 1 expert 3 has no replica"), std::string::npos)
      << missing.status();
  using Json = nlohmann::json;
  Json dense = {
      {"epoch", 1},
      {"entries", Json::array({Json{{"layer", 0}, {"expert", 0}, {"replicas", {"a:1"}}}})}};
  EXPECT_NE(PlacementTable::FromJson(dense, c).status().message().find("dense"), std::string::npos);
  Json range = {
      {"epoch", 1},
      {"entries", Json::array({Json{{"layer", 1}, {"expert", 8}, {"replicas", {"a:1"}}}})}};
  EXPECT_NE(PlacementTable::FromJson(range, c).status().message().find("out of range"),
            std::string::npos);
  EXPECT_FALSE(PlacementTable::FromJson(nlohmann::json::array(), c).ok());
  EXPECT_FALSE(ParsePlacementPolicy("random").ok());
}

}  // namespace
}  // namespace moemesh
