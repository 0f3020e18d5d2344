// Routing parameters of every model family, for the CPU and GPU routing tests.
#pragma once

#include <string>
#include <vector>

#include "kernels/cpu/routing.h"

namespace moemesh {

inline RoutingParams MakeRouting(int E, int k, Scoring s, bool norm, float scale = 1.0f,
                                 int groups = 1, int topk_groups = 1,
                                 GroupScore gs = GroupScore::kMax, float eps = 0.0f) {
  RoutingParams p;
  p.num_experts = E;
  p.top_k = k;
  p.scoring = s;
  p.normalize = norm;
  p.scaling = scale;
  p.num_groups = groups;
  p.topk_groups = topk_groups;
  p.group_score = gs;
  p.normalize_eps = eps;
  return p;
}

struct RoutingCase {
  const char* name;
  RoutingParams params;
  bool bias;  // with a correction bias
};

inline std::vector<RoutingCase> FamilyRoutingCases() {
  return {
      {"mixtral", MakeRouting(8, 2, Scoring::kSoftmax, true), false},
      {"qwen2", MakeRouting(60, 4, Scoring::kSoftmax, false), false},
      {"qwen3", MakeRouting(128, 8, Scoring::kSoftmax, true), false},
      {"deepseek_v3",
       MakeRouting(256, 8, Scoring::kSigmoid, true, 2.5f, 8, 4, GroupScore::kTop2Sum, 1e-20f),
       true},
      {"deepseek_v2", MakeRouting(160, 6, Scoring::kSoftmax, false, 16.0f, 8, 3), false},
      {"gpt_oss", MakeRouting(32, 4, Scoring::kSoftmaxOverTopK, false), false},
      {"switch", MakeRouting(8, 1, Scoring::kSoftmax, false), false},
  };
}

}  // namespace moemesh
