// KServe v2 ModelInfer requests decoded and checked, and the answer written; see
// kserve_request.h.
#include "router_service/kserve_request.h"

#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/dtype.h"
#include "services/base/status_macros.h"
#include "services/rpc/wire.h"

namespace moemesh {

using inference::ModelInferRequest;
using inference::ModelInferResponse;

// Reads input i as a tensor view into the request (kept alive by the caller).
absl::StatusOr<Tensor> InputTensor(const ModelInferRequest& req, int i) {
  const auto& in = req.inputs(i);
  ASSIGN_OR_RETURN(DType dtype, DTypeFromKServe(in.datatype()));
  std::vector<int64_t> shape(in.shape().begin(), in.shape().end());
  uint64_t numel = 1;
  for (int64_t d : shape) {
    if (d < 0 || (d > 0 && numel > (uint64_t{1} << 40) / static_cast<uint64_t>(d))) {
      return absl::InvalidArgumentError(
          absl::StrCat("input '", in.name(), "' has invalid shape ", ShapeString(shape)));
    }
    numel *= static_cast<uint64_t>(d);
  }
  const uint64_t bytes = numel * DTypeSize(dtype);
  if (req.raw_input_contents_size() > 0 && in.has_contents() && in.contents().ByteSizeLong() > 0) {
    // KServe v2: with raw_input_contents, no input may also carry typed contents.
    return absl::InvalidArgumentError(
        absl::StrCat("input '", in.name(),
                     "' has typed contents while the request uses raw_input_contents "
                     "(KServe v2 allows one or the other)"));
  }
  if (req.raw_input_contents_size() > 0) {
    if (req.raw_input_contents_size() != req.inputs_size()) {
      return absl::InvalidArgumentError(absl::StrCat("raw_input_contents has ",
                                                     req.raw_input_contents_size(), " entries for ",
                                                     req.inputs_size(), " inputs"));
    }
    const std::string& raw = req.raw_input_contents(i);
    if (raw.size() != bytes) {
      return absl::InvalidArgumentError(absl::StrCat("input '", in.name(), "': ", in.datatype(),
                                                     ShapeString(shape), " needs ", bytes,
                                                     " bytes, got ", raw.size()));
    }
    return Tensor::View(dtype, shape, raw.data(), nullptr);
  }
  const auto& c = in.contents();
  if (dtype == DType::kF32 && static_cast<uint64_t>(c.fp32_contents_size()) == numel) {
    return Tensor::View(dtype, shape, c.fp32_contents().data(), nullptr);
  }
  if (dtype == DType::kI32 && static_cast<uint64_t>(c.int_contents_size()) == numel) {
    return Tensor::View(dtype, shape, c.int_contents().data(), nullptr);
  }
  if (dtype == DType::kI64 && static_cast<uint64_t>(c.int64_contents_size()) == numel) {
    return Tensor::View(dtype, shape, c.int64_contents().data(), nullptr);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("input '", in.name(), "': ", in.datatype(), ShapeString(shape), " needs ", numel,
                   " elements in raw_input_contents or typed contents"));
}

absl::Status UnknownModel(const std::string& name) {
  return absl::NotFoundError(absl::StrCat("unknown model '", name, "'"));
}

absl::Status CheckModel(const std::string& name, const std::string& version,
                        const std::string& served) {
  if (name != served) return UnknownModel(name);
  if (!version.empty() && version != kModelVersion) {
    return absl::NotFoundError(absl::StrCat("model '", name, "' has no version '", version,
                                            "' (it serves version ", kModelVersion, ")"));
  }
  return absl::OkStatus();
}

void AddOutput(const std::string& name, const Tensor& t, ModelInferResponse* resp) {
  auto* out = resp->add_outputs();
  out->set_name(name);
  out->set_datatype(KServeDatatype(t.dtype()));
  for (int64_t d : t.shape()) out->add_shape(d);
  resp->add_raw_output_contents(std::string(static_cast<const char*>(t.raw()), t.nbytes()));
}

// The `layer` input: INT32 or INT64 of shape [1].
absl::StatusOr<int64_t> LayerInput(const ModelInferRequest& req, int i) {
  ASSIGN_OR_RETURN(Tensor t, InputTensor(req, i));
  if (t.numel() != 1 || (t.dtype() != DType::kI32 && t.dtype() != DType::kI64)) {
    return absl::InvalidArgumentError("input 'layer' must be INT32 or INT64 of shape [1]");
  }
  if (t.dtype() == DType::kI32) {
    int32_t v32;
    std::memcpy(&v32, t.raw(), 4);
    return v32;
  }
  int64_t v;
  std::memcpy(&v, t.raw(), 8);
  return v;
}

absl::StatusOr<InferCall> ParseInfer(const ModelInferRequest& req, const MoeModelConfig& c) {
  InferCall call;
  int hidden_index = -1;
  call.layer = c.MoeLayers().front();
  bool has_layer = false;
  // The only names accepted are known, so a repeat is one already seen (no set per call).
  auto twice = [](const std::string& kind, const std::string& name) {
    return absl::InvalidArgumentError(absl::StrCat(kind, " '", name, "' appears twice"));
  };
  for (int i = 0; i < req.inputs_size(); ++i) {
    const auto& in = req.inputs(i);
    if (in.name() == "hidden_states") {
      if (hidden_index >= 0) return twice("input", in.name());
      hidden_index = i;
    } else if (in.name() == "layer") {
      if (has_layer) return twice("input", in.name());
      has_layer = true;
      ASSIGN_OR_RETURN(call.layer, LayerInput(req, i));
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown input '", in.name(), "' (expected hidden_states, layer)"));
    }
  }
  if (hidden_index < 0) return absl::InvalidArgumentError("missing input 'hidden_states'");
  ASSIGN_OR_RETURN(call.hidden, InputTensor(req, hidden_index));
  if (!IsFloatingActivation(call.hidden.dtype())) {
    return absl::InvalidArgumentError(absl::StrCat("input 'hidden_states' has datatype ",
                                                   req.inputs(hidden_index).datatype(),
                                                   ", expected FP32, FP16 or BF16"));
  }
  RETURN_IF_ERROR(c.CheckMoeLayer(call.layer));
  call.want_output = req.outputs_size() == 0;
  for (const auto& o : req.outputs()) {
    bool* want = o.name() == "output"         ? &call.want_output
                 : o.name() == "topk_ids"     ? &call.want_ids
                 : o.name() == "topk_weights" ? &call.want_weights
                                              : nullptr;
    if (want != nullptr) {
      if (*want) return twice("requested output", o.name());
      *want = true;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown output '", o.name(), "'"));
    }
  }
  return call;
}

void WriteInfer(const ModelInferRequest& req, const InferCall& call, const MoeLayerOutput& out,
                const std::string& model_name, ModelInferResponse* resp) {
  resp->set_model_name(model_name);
  resp->set_model_version(kModelVersion);
  resp->set_id(req.id());
  if (call.want_output) AddOutput("output", out.output, resp);
  if (call.want_ids) AddOutput("topk_ids", out.topk_ids, resp);
  if (call.want_weights) AddOutput("topk_weights", out.topk_weights, resp);
}

}  // namespace moemesh
