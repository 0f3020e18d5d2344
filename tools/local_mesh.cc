#include "tools/local_mesh.h"

#include <grpcpp/grpcpp.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/base/status_macros.h"
#include "services/model/checkpoint.h"
#include "services/rpc/grpc_server.h"
#include "services/rpc/wire.h"

namespace moemesh {

std::vector<std::string> LocalMesh::ExpertArgs(int i, const std::string& listen,
                                               const std::string& metrics_listen) const {
  std::vector<std::string> args = {options_.moemesh_binary,
                                   "expert",
                                   "--model",
                                   options_.model_dir,
                                   "--listen",
                                   listen,
                                   "--service-id",
                                   absl::StrCat("expert-", i),
                                   "--experts",
                                   specs_[i],
                                   "--threads",
                                   absl::StrCat(options_.expert_threads)};
  if (options_.metrics) {
    args.push_back("--metrics-listen");
    args.push_back(metrics_listen);
  }
  args.push_back("--transport");
  args.push_back(options_.transport);
  args.insert(args.end(), options_.expert_flags.begin(), options_.expert_flags.end());
  return args;
}

absl::Status LocalMesh::WaitStarted(const LocalMeshOptions& options, ChildProcess& p,
                                    std::string* endpoint, std::string* metrics_url) {
  const auto timeout = std::chrono::seconds(120);
  if (options.metrics) {
    ASSIGN_OR_RETURN(*metrics_url, p.WaitForLine("metrics on ", timeout));
  }
  ASSIGN_OR_RETURN(*endpoint, p.WaitListening(timeout));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<LocalMesh>> LocalMesh::Start(const LocalMeshOptions& options) {
  auto mesh = std::unique_ptr<LocalMesh>(new LocalMesh());
  mesh->options_ = options;
  ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open(options.model_dir));
  ASSIGN_OR_RETURN(MoeModelConfig config, ParseMoeModelConfig(ckpt->config()));
  std::vector<std::string> names;
  for (int i = 0; i < options.num_expert_services; ++i) names.push_back(absl::StrCat("svc", i));
  ASSIGN_OR_RETURN(PlacementTable draft,
                   PlacementTable::Build(config, options.policy, names, options.replicas));
  for (int i = 0; i < options.num_expert_services; ++i) {
    // "L:e,e,...;L:..." — exactly the experts the placement gives service i.
    std::map<int64_t, std::vector<int32_t>> by_layer;
    for (const auto& [layer, e] : draft.ExpertsOf(names[i])) by_layer[layer].push_back(e);
    std::vector<std::string> parts;
    for (const auto& [layer, experts] : by_layer) {
      parts.push_back(absl::StrCat(layer, ":", absl::StrJoin(experts, ",")));
    }
    mesh->specs_.push_back(parts.empty() ? "none" : absl::StrJoin(parts, ";"));
  }
  for (int i = 0; i < options.num_expert_services; ++i) {
    ASSIGN_OR_RETURN(auto p,
                     ChildProcess::Start(mesh->ExpertArgs(i, "127.0.0.1:0", "127.0.0.1:0")));
    mesh->experts_.push_back(std::move(p));
  }
  for (auto& p : mesh->experts_) {
    std::string endpoint, metrics_url;
    RETURN_IF_ERROR(WaitStarted(options, *p, &endpoint, &metrics_url));
    mesh->expert_endpoints_.push_back(endpoint);
    mesh->expert_metrics_urls_.push_back(metrics_url);
  }
  // The same table with the real endpoints.
  nlohmann::json json = draft.ToJson();
  for (auto& entry : json["entries"]) {
    for (auto& r : entry["replicas"]) {
      const int i = std::stoi(r.get<std::string>().substr(3));
      const std::string& ep = mesh->expert_endpoints_[i];
      r = absl::StrCat(options.endpoint_host, ep.substr(ep.rfind(':')));
    }
  }
  ASSIGN_OR_RETURN(mesh->placement_, PlacementTable::FromJson(json, config));
  const std::string work =
      options.work_dir.empty() ? std::filesystem::temp_directory_path().string() : options.work_dir;
  const std::string placement_file =
      (std::filesystem::path(work) / absl::StrCat("placement-", ::getpid(), "-",
                                                  reinterpret_cast<uintptr_t>(mesh.get()), ".json"))
          .string();
  mesh->placement_file_ = placement_file;
  {
    std::ofstream f(placement_file);
    f << json.dump(2);
  }
  std::vector<std::string> router_args = {options.moemesh_binary,
                                          "router",
                                          "--model",
                                          options.model_dir,
                                          "--placement-file",
                                          placement_file,
                                          "--listen",
                                          absl::StrCat("127.0.0.1:", options.router_port),
                                          "--wire",
                                          options.wire};
  if (options.metrics) {
    router_args.push_back("--metrics-listen");
    router_args.push_back("127.0.0.1:0");
  }
  router_args.push_back("--transport");
  router_args.push_back(options.transport);
  router_args.insert(router_args.end(), options.router_flags.begin(), options.router_flags.end());
  ASSIGN_OR_RETURN(mesh->router_, ChildProcess::Start(router_args));
  RETURN_IF_ERROR(
      WaitStarted(options, *mesh->router_, &mesh->router_endpoint_, &mesh->router_metrics_url_));
  return mesh;
}

std::string MetricsTarget(const std::string& url) {
  const size_t begin = url.find("://") == std::string::npos ? 0 : url.find("://") + 3;
  return url.substr(begin, url.find('/', begin) - begin);
}

LocalMesh::~LocalMesh() {
  router_.reset();
  experts_.clear();
  std::error_code ignored;
  if (!placement_file_.empty()) std::filesystem::remove(placement_file_, ignored);
}

absl::Status LocalMesh::RestartExpert(int i) {
  experts_[i].reset();
  // The same metrics port.
  const std::string metrics_listen = options_.metrics ? MetricsTarget(expert_metrics_urls_[i]) : "";
  ASSIGN_OR_RETURN(experts_[i],
                   ChildProcess::Start(ExpertArgs(i, expert_endpoints_[i], metrics_listen)));
  std::string endpoint, metrics_url;
  return WaitStarted(options_, *experts_[i], &endpoint, &metrics_url);
}

absl::Status LocalMesh::WaitReady(std::chrono::milliseconds timeout) {
  KServeClient client(router_endpoint_, 256 << 20, options_.client_security);
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    auto ready = client.ServerReady();
    if (ready.ok() && *ready) return absl::OkStatus();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return absl::DeadlineExceededError("the mesh did not become ready in time");
}

KServeClient::KServeClient(const std::string& endpoint, int max_message_bytes,
                           const std::shared_ptr<Security>& security) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  for (const auto& [name, value] : BulkTransferChannelArgs(max_message_bytes)) {
    args.SetInt(name, value);
  }
  auto channel = (security != nullptr ? security : Security::Insecure())->Dial(endpoint, args);
  stub_ = inference::GRPCInferenceService::NewStub(channel);
  control_ = v1::RouterControl::NewStub(channel);
}

absl::StatusOr<KServeClient::Result> KServeClient::Infer(const Tensor& hidden, int64_t layer,
                                                         std::chrono::milliseconds timeout,
                                                         bool want_topk) {
  inference::ModelInferRequest req;
  req.set_model_name("moe");
  auto* in = req.add_inputs();
  in->set_name("hidden_states");
  in->set_datatype(KServeDatatype(hidden.dtype()));
  for (int64_t d : hidden.shape()) in->add_shape(d);
  req.add_raw_input_contents(std::string(static_cast<const char*>(hidden.raw()), hidden.nbytes()));
  if (layer >= 0) {
    auto* l = req.add_inputs();
    l->set_name("layer");
    l->set_datatype("INT64");
    l->add_shape(1);
    req.add_raw_input_contents(std::string(reinterpret_cast<const char*>(&layer), sizeof layer));
  }
  req.add_outputs()->set_name("output");
  if (want_topk) {
    req.add_outputs()->set_name("topk_ids");
    req.add_outputs()->set_name("topk_weights");
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  inference::ModelInferResponse resp;
  RETURN_IF_ERROR(FromGrpcStatus(stub_->ModelInfer(&ctx, req, &resp)));
  if (resp.outputs_size() != resp.raw_output_contents_size()) {
    return absl::InternalError("response outputs and raw contents disagree");
  }
  Result r;
  auto owner = std::make_shared<inference::ModelInferResponse>(std::move(resp));
  for (int i = 0; i < owner->outputs_size(); ++i) {
    const auto& o = owner->outputs(i);
    ASSIGN_OR_RETURN(const DType dtype, DTypeFromKServe(o.datatype()));
    Tensor t = Tensor::View(dtype, std::vector<int64_t>(o.shape().begin(), o.shape().end()),
                            owner->raw_output_contents(i).data(), owner);
    if (t.nbytes() != owner->raw_output_contents(i).size()) {
      return absl::InternalError(absl::StrCat("output ", o.name(), " has the wrong byte count"));
    }
    if (o.name() == "output") r.output = t;
    if (o.name() == "topk_ids") r.topk_ids = t;
    if (o.name() == "topk_weights") r.topk_weights = t;
  }
  return r;
}

absl::StatusOr<bool> KServeClient::ServerReady() {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  inference::ServerReadyResponse resp;
  RETURN_IF_ERROR(FromGrpcStatus(stub_->ServerReady(&ctx, inference::ServerReadyRequest(), &resp)));
  return resp.ready();
}

absl::StatusOr<v1::ExpertLoad> KServeClient::ExpertLoad() {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::GetExpertLoadRequest req;
  req.set_layer(-1);
  v1::ExpertLoad resp;
  RETURN_IF_ERROR(FromGrpcStatus(control_->GetExpertLoad(&ctx, req, &resp)));
  return resp;
}

absl::StatusOr<v1::Placement> KServeClient::Placement() {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::Placement resp;
  RETURN_IF_ERROR(FromGrpcStatus(control_->GetPlacement(&ctx, v1::GetPlacementRequest(), &resp)));
  return resp;
}

}  // namespace moemesh
