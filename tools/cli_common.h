// What the moemesh subcommands share: models opened or generated from flags, dtype and
// MoeLayer options parsed from flags.
#pragma once

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "services/model/checkpoint.h"
#include "services/model/model_config.h"
#include "services/model/model_generator.h"
#include "services/moe/moe_layer.h"
#include "services/runtime/flags.h"

namespace moemesh {

// Removes `dir` (when set) on destruction.
struct RemovedAtExit {
  std::string dir;
  ~RemovedAtExit();
};

absl::StatusOr<DType> ParseDType(const std::string& s);

struct LoadedModel {
  std::unique_ptr<Checkpoint> ckpt;
  MoeModelConfig config;
};
absl::StatusOr<LoadedModel> LoadModel(const std::string& dir);

// --capacity-factor F, --expert-choice.
absl::StatusOr<MoeLayerOptions> LayerOptions(const CliArgs& args);

// The gen-model flags (--family, --out, sizes, --dtype, --shards, --seed) and their parse.
const std::set<std::string>& GenFlags();
absl::StatusOr<GenModelOptions> GenOptions(const CliArgs& args);

// The model a demo runs: --model DIR, else one generated from the gen-model flags in
// `argv` (--family defaults to mixtral) into a temporary directory that `generated`
// removes. `flags` and `bool_flags` are the demo's own, for parsing `argv` again.
absl::StatusOr<std::string> DemoModelDir(const std::vector<std::string>& argv,
                                         const std::set<std::string>& flags,
                                         const std::set<std::string>& bool_flags,
                                         RemovedAtExit* generated);

}  // namespace moemesh
