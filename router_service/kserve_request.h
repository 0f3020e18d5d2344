// KServe v2 ModelInfer at the router's edge: a request decoded and checked against the
// served model (ParseInfer), and the answer written (WriteInfer). No gRPC server here,
// so the decoding can be tested and fuzzed alone (kserve_infer_fuzzer.cc).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpc_predict_v2.pb.h"
#include "services/base/tensor.h"
#include "services/model/model_config.h"
#include "services/moe/layer_io.h"

namespace moemesh {

// The one version the router serves; "" asks for the latest (the same).
inline constexpr char kModelVersion[] = "1";

// Input i as a tensor view into `req` (which must outlive it): from raw_input_contents
// (byte count = elements × dtype size) or from typed contents (fp32, int, int64 with the
// element count). INVALID_ARGUMENT for an unknown datatype, a negative or oversized
// shape (over 2^40 elements), a byte or element count that does not match, typed
// contents next to raw_input_contents, or a raw_input_contents count other than the
// inputs'.
absl::StatusOr<Tensor> InputTensor(const inference::ModelInferRequest& req, int i);

// NOT_FOUND naming the model.
absl::Status UnknownModel(const std::string& name);

// OK when `name` is the served model and `version` is "" or kModelVersion; NOT_FOUND
// otherwise.
absl::Status CheckModel(const std::string& name, const std::string& version,
                        const std::string& served);

// Appends output `name` (t's datatype, shape and bytes as raw_output_contents) to `resp`.
void AddOutput(const std::string& name, const Tensor& t, inference::ModelInferResponse* resp);

// A ModelInfer request, parsed and checked: what to compute and what to answer.
struct InferCall {
  Tensor hidden;  // a view into the request
  int64_t layer = 0;
  bool want_output = false, want_ids = false, want_weights = false;
};

// The `layer` input (input i): its value; INVALID_ARGUMENT unless INT32 or INT64 of
// shape [1].
absl::StatusOr<int64_t> LayerInput(const inference::ModelInferRequest& req, int i);

// Decodes `req` for model `c`: `hidden_states` (FP32, FP16 or BF16, any shape: its width
// is checked where it is computed) as a view into `req`, `layer` (default: the first MoE
// layer), and which outputs to answer (`output` when none is named). INVALID_ARGUMENT for
// an unknown or repeated input or output, a missing hidden_states, a bad tensor (see
// InputTensor), a non-float hidden_states, or a layer out of range or dense.
absl::StatusOr<InferCall> ParseInfer(const inference::ModelInferRequest& req,
                                     const MoeModelConfig& c);

// Writes the answer to `req` into `resp`: model name and version, the request's id, and
// the outputs `call` asked for, from `out`.
void WriteInfer(const inference::ModelInferRequest& req, const InferCall& call,
                const MoeLayerOutput& out, const std::string& model_name,
                inference::ModelInferResponse* resp);

}  // namespace moemesh
