// libFuzzer target for the router's KServe v2 ModelInfer decoding (kserve_request.h). The
// input is a serialized inference.ModelInferRequest; when it parses, CheckModel and
// ParseInfer run against a small fixed model (DeepSeek-V3-like: hidden 16, 3 layers, the
// first one dense). Whatever ParseInfer accepts must be what the router can compute on
// without looking again: `hidden_states` a float tensor of exactly numel × dtype-size bytes
// lying inside the request (the bytes are all read), its shape the request's, `layer` a MoE
// layer of the model, and the wanted outputs exactly the ones named (`output` when none
// is). WriteInfer then answers with the outputs asked for, each with its bytes.
//
//   ninja -C build-fuzz kserve_infer_fuzzer
//   build-fuzz/router_service/kserve_infer_fuzzer tests/fuzz_corpus/kserve_infer
// The committed seeds come from the target itself:
//   build-fuzz/router_service/kserve_infer_fuzzer --write_seeds=tests/fuzz_corpus/kserve_infer
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "google/protobuf/stubs/logging.h"
#include "grpc_predict_v2.pb.h"
#include "router_service/kserve_request.h"
#include "services/model/model_config.h"

namespace moemesh {
namespace {

using inference::ModelInferRequest;
using inference::ModelInferResponse;

constexpr int64_t kHidden = 16;
constexpr char kModelName[] = "moe";

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s\n", what);
    std::abort();
  }
}

const MoeModelConfig& Config() {
  static const MoeModelConfig* const config = [] {
    const nlohmann::json json = {{"model_type", "deepseek_v3"},
                                 {"hidden_size", kHidden},
                                 {"num_hidden_layers", 3},
                                 {"n_routed_experts", 8},
                                 {"num_experts_per_tok", 2},
                                 {"moe_intermediate_size", 8},
                                 {"n_shared_experts", 1},
                                 {"n_group", 2},
                                 {"topk_group", 1},
                                 {"first_k_dense_replace", 1},
                                 {"routed_scaling_factor", 2.5},
                                 {"norm_topk_prob", true}};
    absl::StatusOr<MoeModelConfig> c = ParseMoeModelConfig(json);
    Check(c.ok(), "the fixed model config parses");
    return new MoeModelConfig(*std::move(c));
  }();
  return *config;
}

// True when [p, p + n) lies inside [begin, begin + size).
bool Inside(const void* p, size_t n, const void* begin, size_t size) {
  const auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(begin);
  return n == 0 || (a >= b && a - b <= size && n <= size - (a - b));
}

void CheckAccepted(const ModelInferRequest& req, const InferCall& call) {
  const MoeModelConfig& c = Config();
  int hidden_index = -1;
  for (int i = 0; i < req.inputs_size(); ++i) {
    if (req.inputs(i).name() == "hidden_states") hidden_index = i;
  }
  Check(hidden_index >= 0, "an accepted request has hidden_states");
  const auto& in = req.inputs(hidden_index);
  const Tensor& h = call.hidden;
  Check(h.dtype() == DType::kF32 || h.dtype() == DType::kBF16 || h.dtype() == DType::kF16,
        "hidden_states is FP32, BF16 or FP16");
  Check(std::vector<int64_t>(in.shape().begin(), in.shape().end()) == h.shape(),
        "hidden_states has the request's shape");
  uint64_t numel = 1;
  for (int64_t d : h.shape()) {
    Check(d >= 0, "non-negative dimension");
    Check(!__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel), "numel overflow");
  }
  Check(numel == static_cast<uint64_t>(h.numel()), "numel");
  Check(h.nbytes() == numel * DTypeSize(h.dtype()), "nbytes == numel * dtype size");
  if (req.raw_input_contents_size() > 0) {
    Check(req.raw_input_contents_size() == req.inputs_size(), "one raw_input_contents per input");
    const std::string& raw = req.raw_input_contents(hidden_index);
    Check(h.nbytes() == raw.size(), "hidden_states is all of its raw_input_contents");
    Check(Inside(h.raw(), h.nbytes(), raw.data(), raw.size()),
          "hidden_states lies inside its raw_input_contents");
  } else {
    const auto& fp32 = in.contents().fp32_contents();
    Check(h.dtype() == DType::kF32, "typed hidden_states are FP32");
    Check(Inside(h.raw(), h.nbytes(), fp32.data(), sizeof(float) * fp32.size()),
          "hidden_states lies inside its fp32_contents");
  }
  // Read every byte, as the conversion to float32 will: ASan catches a view that runs off.
  unsigned sum = 0;
  const auto* bytes = static_cast<const unsigned char*>(h.raw());
  for (size_t i = 0; i < h.nbytes(); ++i) sum += bytes[i];
  static volatile unsigned sink;
  sink = sum;

  Check(call.layer >= 0 && call.layer < c.num_layers, "layer in range");
  Check(c.IsMoeLayer(call.layer), "layer is a MoE layer");
  Check(c.CheckMoeLayer(call.layer).ok(), "CheckMoeLayer agrees");
  bool named_output = false, named_ids = false, named_weights = false;
  for (const auto& o : req.outputs()) {
    named_output |= o.name() == "output";
    named_ids |= o.name() == "topk_ids";
    named_weights |= o.name() == "topk_weights";
  }
  Check(call.want_output == (named_output || req.outputs_size() == 0), "want_output");
  Check(call.want_ids == named_ids && call.want_weights == named_weights, "want ids, weights");

  // The answer, when the router would compute one ([T, H]; it refuses other shapes).
  if (h.rank() != 2 || h.dim(1) != kHidden) return;
  const int64_t tokens = h.dim(0);
  MoeLayerOutput out;
  out.output = h;
  out.topk_ids = Tensor::Zeros(DType::kI32, {tokens, c.top_k});
  out.topk_weights = Tensor::Zeros(DType::kF32, {tokens, c.top_k});
  ModelInferResponse resp;
  WriteInfer(req, call, out, kModelName, &resp);
  Check(resp.model_name() == kModelName && resp.model_version() == kModelVersion &&
            resp.id() == req.id(),
        "the answer names the model, version and request");
  const int wanted = call.want_output + call.want_ids + call.want_weights;
  Check(resp.outputs_size() == wanted && resp.raw_output_contents_size() == wanted,
        "one output per wanted output");
  for (int i = 0; i < wanted; ++i) {
    const auto& o = resp.outputs(i);
    const Tensor& t = o.name() == "output"     ? out.output
                      : o.name() == "topk_ids" ? out.topk_ids
                                               : out.topk_weights;
    Check(resp.raw_output_contents(i).size() == t.nbytes(), "output bytes");
    Check(std::vector<int64_t>(o.shape().begin(), o.shape().end()) == t.shape(), "output shape");
  }
}

// --- Seeds (--write_seeds=DIR) ---

std::string Floats(int64_t n, DType dtype) {
  std::string s(n * DTypeSize(dtype), '\0');
  for (int64_t i = 0; i < n; ++i) {
    if (dtype == DType::kF32) {
      const float v = 0.25f * static_cast<float>(i % 7) - 0.5f;
      std::memcpy(&s[i * 4], &v, 4);
    } else {
      const uint16_t v = 0x3c00 + (i % 5);
      std::memcpy(&s[i * 2], &v, 2);
    }
  }
  return s;
}

ModelInferRequest::InferInputTensor* AddInput(ModelInferRequest& req, const std::string& name,
                                              const std::string& datatype,
                                              std::vector<int64_t> shape) {
  auto* in = req.add_inputs();
  in->set_name(name);
  in->set_datatype(datatype);
  for (int64_t d : shape) in->add_shape(d);
  return in;
}

ModelInferRequest Hidden(const std::string& datatype, DType dtype, int64_t tokens) {
  ModelInferRequest req;
  req.set_model_name(kModelName);
  AddInput(req, "hidden_states", datatype, {tokens, kHidden});
  req.add_raw_input_contents(Floats(tokens * kHidden, dtype));
  return req;
}

void AddRawLayer(ModelInferRequest& req, int64_t layer, bool int64) {
  AddInput(req, "layer", int64 ? "INT64" : "INT32", {1});
  std::string raw(int64 ? 8 : 4, '\0');
  if (int64) {
    std::memcpy(raw.data(), &layer, 8);
  } else {
    const int32_t l32 = static_cast<int32_t>(layer);
    std::memcpy(raw.data(), &l32, 4);
  }
  req.add_raw_input_contents(raw);
}

void WriteSeeds(const std::string& dir) {
  std::vector<std::pair<std::string, ModelInferRequest>> seeds;
  // Accepted.
  seeds.push_back({"fp32_raw", Hidden("FP32", DType::kF32, 2)});
  {
    ModelInferRequest r = Hidden("BF16", DType::kBF16, 3);
    r.set_model_version("1");
    r.set_id("req-7");
    AddRawLayer(r, 2, /*int64=*/true);
    r.add_outputs()->set_name("topk_ids");
    r.add_outputs()->set_name("topk_weights");
    r.add_outputs()->set_name("output");
    seeds.push_back({"bf16_raw_layer_int64_all_outputs", r});
  }
  {
    ModelInferRequest r = Hidden("FP16", DType::kF16, 1);
    AddRawLayer(r, 1, /*int64=*/false);
    r.add_outputs()->set_name("topk_ids");
    seeds.push_back({"fp16_raw_layer_int32_ids", r});
  }
  {
    ModelInferRequest r;
    r.set_model_name(kModelName);
    auto* h = AddInput(r, "hidden_states", "FP32", {2, kHidden});
    for (int i = 0; i < 2 * kHidden; ++i) h->mutable_contents()->add_fp32_contents(0.5f * i);
    AddInput(r, "layer", "INT32", {1})->mutable_contents()->add_int_contents(1);
    seeds.push_back({"fp32_typed_contents", r});
  }
  {
    ModelInferRequest r;
    AddInput(r, "hidden_states", "FP32", {0, kHidden});
    r.add_raw_input_contents("");
    seeds.push_back({"zero_tokens", r});
  }
  // Refused.
  {
    ModelInferRequest r = Hidden("FP32", DType::kF32, 1);
    AddRawLayer(r, 0, false);
    seeds.push_back({"refused_dense_layer", r});
  }
  {
    ModelInferRequest r = Hidden("FP32", DType::kF32, 1);
    AddRawLayer(r, 3, true);
    seeds.push_back({"refused_layer_out_of_range", r});
  }
  {
    ModelInferRequest r = Hidden("FP32", DType::kF32, 2);
    r.mutable_raw_input_contents(0)->pop_back();
    seeds.push_back({"refused_short_bytes", r});
  }
  {
    ModelInferRequest r = Hidden("FP32", DType::kF32, 1);
    r.mutable_inputs(0)->mutable_contents()->add_fp32_contents(1.0f);
    seeds.push_back({"refused_raw_and_typed", r});
  }
  {
    ModelInferRequest r = Hidden("FP32", DType::kF32, 1);
    AddInput(r, "layer", "INT32", {1});
    seeds.push_back({"refused_raw_count", r});
  }
  {
    ModelInferRequest r = Hidden("FP32", DType::kF32, 1);
    r.mutable_inputs(0)->set_shape(0, -1);
    seeds.push_back({"refused_negative_shape", r});
  }
  {
    ModelInferRequest r = Hidden("INT32", DType::kF32, 1);
    seeds.push_back({"refused_int_hidden", r});
  }
  {
    ModelInferRequest r = Hidden("FP32", DType::kF32, 1);
    r.add_outputs()->set_name("output");
    r.add_outputs()->set_name("output");
    seeds.push_back({"refused_output_twice", r});
  }
  {
    ModelInferRequest r = Hidden("FP32", DType::kF32, 1);
    AddInput(r, "mask", "FP32", {1});
    r.add_raw_input_contents(std::string(4, '\0'));
    seeds.push_back({"refused_unknown_input", r});
  }
  for (const auto& [name, req] : seeds) {
    std::ofstream(dir + "/" + name, std::ios::binary) << req.SerializeAsString();
  }
  std::printf("wrote %zu seeds to %s\n", seeds.size(), dir.c_str());
}

}  // namespace
}  // namespace moemesh

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  // Invalid UTF-8 in a string field fails the parse, and protobuf logs each one.
  google::protobuf::SetLogHandler(nullptr);
  moemesh::Config();
  for (int i = 1; i < *argc; ++i) {
    const std::string arg = (*argv)[i];
    if (arg.rfind("--write_seeds=", 0) == 0) {
      moemesh::WriteSeeds(arg.substr(std::strlen("--write_seeds=")));
      std::exit(0);
    }
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moemesh;
  ModelInferRequest req;
  if (!req.ParseFromArray(data, static_cast<int>(size))) return 0;
  const absl::Status model = CheckModel(req.model_name(), req.model_version(), kModelName);
  Check(model.ok() == (req.model_name() == kModelName &&
                       (req.model_version().empty() || req.model_version() == kModelVersion)),
        "CheckModel accepts the served model and version only");
  absl::StatusOr<InferCall> call = ParseInfer(req, Config());
  if (!call.ok()) {
    Check(call.status().code() == absl::StatusCode::kInvalidArgument,
          "ParseInfer refuses with INVALID_ARGUMENT");
    Check(!call.status().message().empty(), "error without a message");
    return 0;
  }
  CheckAccepted(req, *call);
  return 0;
}
