// Writes a random checkpoint in a family's Hugging Face layout (config.json +
// model.safetensors, or shards with an index). Nothing can be downloaded here, so the
// demo, tests and benchmarks run on these; the tensor names, shapes and config keys
// are the ones real checkpoints of the family use.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/dtype.h"
#include "services/model/checkpoint.h"
#include "services/model/model_config.h"

namespace moemesh {

struct GenModelOptions {
  ModelFamily family = ModelFamily::kMixtral;
  int64_t hidden = 256;
  int64_t intermediate = 512;  // per routed expert
  int64_t experts = 8;
  int64_t top_k = 2;
  int64_t layers = 2;
  // Shared expert intermediate size (Qwen2-MoE, DeepSeek); ignored by other families.
  int64_t shared_intermediate = 512;
  // DeepSeek group-limited routing; must divide experts.
  int64_t num_groups = 4;
  int64_t topk_groups = 2;
  // DeepSeek: the first layer is dense (first_k_dense_replace = 1) when layers > 1.
  DType dtype = DType::kBF16;
  int shards = 1;  // > 1 writes model-0000i-of-0000n.safetensors + index
  uint64_t seed = 0;

  absl::Status Validate() const;
};

absl::Status GenerateModel(const std::string& dir, const GenModelOptions& options);

// The small model the tests use, for any family: hidden 64, intermediate 48 (shared
// expert 48), 8 experts, top-2, 2 layers (DeepSeek's first one dense), DeepSeek groups
// 2 of which 1 is kept, BF16 weights.
GenModelOptions SmallModelOptions(ModelFamily family, uint64_t seed = 3);

// A generated checkpoint, opened.
struct GeneratedModel {
  std::string dir;
  std::unique_ptr<Checkpoint> ckpt;
  MoeModelConfig config;
};
// GenerateModel into `dir`, then opens it and parses its config.
absl::StatusOr<GeneratedModel> GenerateAndOpen(const std::string& dir,
                                               const GenModelOptions& options);

}  // namespace moemesh
