// The placement controller end to end: real `moemesh controller`, `moemesh expert
// --controller` and `moemesh router --controller` processes on loopback, driven by several
// clients whose every answer is compared bit for bit with the in-process MoeLayer. Skewed
// load is rebalanced; services join, leave (SIGTERM), die (SIGKILL); the controller dies
// and comes back; a move that hangs is aborted; bad requests are refused. Not one request
// may fail.
#include <google/protobuf/util/message_differencer.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <random>
#include <thread>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "controller.grpc.pb.h"
#include "expert_service.grpc.pb.h"
#include "router_control.grpc.pb.h"
#include "services/model/model_generator.h"
#include "services/rpc/wire.h"
#include "tools/controlled_mesh.h"
#include "tools/http_client.h"
#include "tools/load_driver.h"
#include "tools/local_mesh.h"
#include "tools/process.h"

#ifndef MOEMESH_BINARY
#error "MOEMESH_BINARY must name the moemesh executable"
#endif

namespace moemesh {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

GeneratedModel Model() {
  const std::string dir =
      (std::filesystem::path(::testing::TempDir()) / "controller_e2e_mixtral").string();
  return GenerateAndOpen(dir, SmallModelOptions(ModelFamily::kMixtral)).value();
}

ControlledMeshOptions Options(const GeneratedModel& m, int services) {
  ControlledMeshOptions o;
  o.moemesh_binary = MOEMESH_BINARY;
  o.model_dir = m.dir;
  o.num_expert_services = services;
  o.num_routers = 2;
  o.metrics = true;
  o.load_window_s = 3;
  o.load_report_s = 0.3;
  return o;
}

double TokensComputed(const std::string& metrics_url) {
  const absl::StatusOr<double> t = ExpertTokensComputed(metrics_url);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.value_or(-1);
}

ServiceBalance MeasureBalance(const std::vector<std::string>& urls, milliseconds window) {
  const absl::StatusOr<ServiceBalance> b = MeasureServiceBalance(urls, window);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.value_or(ServiceBalance{});
}

std::vector<std::string> ExpertMetricsUrls(ControlledMesh& mesh) {
  std::vector<std::string> urls;
  for (int i = 0; i < static_cast<int>(mesh.expert_endpoints().size()); ++i) {
    urls.push_back(mesh.expert_metrics_url(i));
  }
  return urls;
}

const v1::ServiceState* ServiceOf(const v1::ControllerState& s, const std::string& endpoint) {
  for (const v1::ServiceState& m : s.services()) {
    if (m.endpoint() == endpoint) return &m;
  }
  return nullptr;
}

// `moemesh ARGS` as an operator runs it; its exit code and stdout + stderr.
std::pair<int, std::string> Moemesh(const std::string& args) {
  ShellResult r = RunShell(absl::StrCat(MOEMESH_BINARY, " ", args, " 2>&1"));
  return {r.exit_code, std::move(r.output)};
}

std::unique_ptr<LoadDriver> Drive(ControlledMesh& mesh, const GeneratedModel& m,
                                  const TokenSkew& skew) {
  LoadDriverOptions o;
  o.routers = mesh.router_endpoints();
  o.clients = 4;
  o.tokens = 16;
  auto d = LoadDriver::Start(o, *m.ckpt, m.config, &skew);
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? std::move(*d) : nullptr;
}

void ExpectNothingLost(LoadDriver& d) {
  d.Stop();
  const LoadDriver::Totals t = d.totals();
  EXPECT_GT(t.requests, 0);
  EXPECT_EQ(t.failed, 0) << t.first_error;
  EXPECT_EQ(t.mismatched, 0);
}

TEST(ControllerTest, SkewedLoadThroughTwoRoutersIsRebalanced) {
  const GeneratedModel m = Model();
  auto mesh = ControlledMesh::Start(Options(m, 3));
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  // Expert 3 of every layer takes 80% of the pushes: its holder carries most of the load.
  const TokenSkew hot = TokenSkew::Hot(*m.ckpt, m.config, {3}, 0.8).value();
  auto driver = Drive(**mesh, m, hot);
  ASSERT_NE(driver, nullptr);
  const std::vector<std::string> urls = ExpertMetricsUrls(**mesh);
  std::this_thread::sleep_for(seconds(4));  // the routers' 3 s load windows fill with skew
  const ServiceBalance before = MeasureBalance(urls, seconds(2));
  const absl::StatusOr<v1::RebalanceResponse> r = (*mesh)->Rebalance();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(r->added(), 0) << r->note();
  const ServiceBalance after = MeasureBalance(urls, seconds(3));
  ExpectNothingLost(*driver);
  EXPECT_LT(before.mean_over_max, 0.8);
  EXPECT_GT(after.mean_over_max, 0.8) << "tokens per service: " << after.tokens[0] << ", "
                                      << after.tokens[1] << ", " << after.tokens[2];
  // Both routers serve the new epoch.
  const v1::ControllerState s = (*mesh)->State().value();
  ASSERT_EQ(s.routers_size(), 2);
  for (const v1::RouterState& router : s.routers()) {
    EXPECT_EQ(router.acked_epoch(), s.placement().epoch()) << router.router_id();
    EXPECT_TRUE(router.connected());
  }
  EXPECT_EQ(s.aborted_moves(), 0);
}

TEST(ControllerTest, AServiceAddedUnderLoadTakesWork) {
  const GeneratedModel m = Model();
  auto mesh = ControlledMesh::Start(Options(m, 2));
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const TokenSkew uniform = TokenSkew::Uniform(*m.ckpt, m.config).value();
  auto driver = Drive(**mesh, m, uniform);
  ASSERT_NE(driver, nullptr);
  std::this_thread::sleep_for(seconds(2));
  const absl::StatusOr<int> added = (*mesh)->AddExpert();
  ASSERT_TRUE(added.ok()) << added.status();
  const std::string endpoint = (*mesh)->expert_endpoints()[*added];
  std::this_thread::sleep_for(seconds(1));  // it registered; the routers' windows are full
  ASSERT_TRUE((*mesh)->Rebalance().ok());
  const v1::ControllerState s = (*mesh)->State().value();
  const v1::ServiceState* fresh = ServiceOf(s, endpoint);
  ASSERT_NE(fresh, nullptr);
  EXPECT_GT(fresh->experts(), 0);
  // It holds what it was given and every router serves that: no longer "joining".
  EXPECT_EQ(fresh->state(), "ready");
  for (const v1::ServiceState& other : s.services()) EXPECT_EQ(other.state(), "ready");
  const double before = TokensComputed((*mesh)->expert_metrics_url(*added));
  std::this_thread::sleep_for(seconds(1));
  EXPECT_GT(TokensComputed((*mesh)->expert_metrics_url(*added)), before) << "it computes nothing";
  ExpectNothingLost(*driver);
}

TEST(ControllerTest, SigtermOfAServiceUnderLoadLosesNothing) {
  const GeneratedModel m = Model();
  auto mesh = ControlledMesh::Start(Options(m, 3));
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const TokenSkew uniform = TokenSkew::Uniform(*m.ckpt, m.config).value();
  auto driver = Drive(**mesh, m, uniform);
  ASSERT_NE(driver, nullptr);
  std::this_thread::sleep_for(seconds(1));
  const std::string leaving = (*mesh)->expert_endpoints()[1];
  ASSERT_GT(ServiceOf((*mesh)->State().value(), leaving)->experts(), 0);
  // Its experts move to the others first; then it drains and exits 0.
  EXPECT_EQ((*mesh)->expert_process(1).Signal(SIGTERM, /*wait=*/true), 0);
  const v1::ControllerState s = (*mesh)->State().value();
  EXPECT_EQ(ServiceOf(s, leaving)->experts(), 0);
  std::this_thread::sleep_for(seconds(1));
  ExpectNothingLost(*driver);
}

TEST(ControllerTest, KillMinus9WithTwoReplicasLosesNothing) {
  const GeneratedModel m = Model();
  ControlledMeshOptions o = Options(m, 3);
  o.min_replicas = 2;
  auto mesh = ControlledMesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const TokenSkew uniform = TokenSkew::Uniform(*m.ckpt, m.config).value();
  auto driver = Drive(**mesh, m, uniform);
  ASSERT_NE(driver, nullptr);
  std::this_thread::sleep_for(seconds(1));
  const std::string victim = (*mesh)->expert_endpoints()[0];
  (*mesh)->expert_process(0).Signal(SIGKILL, /*wait=*/true);
  // Its lease expires, its experts get a second replica elsewhere again.
  const absl::Status healed = (*mesh)->WaitForState(
      [&](const v1::ControllerState& s) {
        if (ServiceOf(s, victim) == nullptr || ServiceOf(s, victim)->state() != "gone")
          return false;
        for (const v1::PlacementEntry& e : s.placement().entries()) {
          int alive = 0;
          for (const std::string& r : e.replicas()) alive += r != victim;
          if (alive < 2 || e.replicas_size() != alive) return false;
        }
        return true;
      },
      seconds(30));
  EXPECT_TRUE(healed.ok()) << healed;
  std::this_thread::sleep_for(seconds(1));
  ExpectNothingLost(*driver);
}

// A service killed and restarted on the same endpoint before its lease ends comes back
// holding nothing, while the placement still names it: its experts count as missing
// replicas (not as held), so the controller loads them onto it again, and nothing is lost
// meanwhile (the routers retry NOT_FOUND on the other replica).
TEST(ControllerTest, AServiceRestartedEmptyOnItsEndpointIsRefilled) {
  const GeneratedModel m = Model();
  ControlledMeshOptions o = Options(m, 2);
  o.min_replicas = 2;
  o.lease_s = 30;  // back before anyone notices it was gone
  auto mesh = ControlledMesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const TokenSkew uniform = TokenSkew::Uniform(*m.ckpt, m.config).value();
  auto driver = Drive(**mesh, m, uniform);
  ASSERT_NE(driver, nullptr);
  std::this_thread::sleep_for(seconds(1));
  (*mesh)->expert_process(0).Signal(SIGKILL, /*wait=*/true);
  ASSERT_TRUE((*mesh)->RestartExpert(0).ok());
  auto stub = v1::ExpertService::NewStub(
      grpc::CreateChannel((*mesh)->expert_endpoints()[0], grpc::InsecureChannelCredentials()));
  int64_t held = 0;
  for (int i = 0; i < 150 && held < m.config.num_experts; ++i) {
    std::this_thread::sleep_for(milliseconds(100));
    grpc::ClientContext ctx;
    v1::InfoResponse info;
    if (stub->Info(&ctx, v1::InfoRequest(), &info).ok()) held = info.experts_size();
  }
  // min_replicas 2 on 2 services: it holds every expert of every MoE layer again.
  EXPECT_EQ(held, m.config.num_experts * static_cast<int64_t>(m.config.MoeLayers().size()));
  std::this_thread::sleep_for(seconds(1));
  ExpectNothingLost(*driver);
}

TEST(ControllerTest, ControllerKilledAndRestartedUnderLoad) {
  const GeneratedModel m = Model();
  auto mesh = ControlledMesh::Start(Options(m, 3));
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const TokenSkew uniform = TokenSkew::Uniform(*m.ckpt, m.config).value();
  const TokenSkew hot = TokenSkew::Hot(*m.ckpt, m.config, {5}, 0.8).value();
  auto driver = Drive(**mesh, m, uniform);
  ASSERT_NE(driver, nullptr);
  const uint64_t epoch = (*mesh)->State().value().placement().epoch();
  (*mesh)->controller_process().Signal(SIGKILL, /*wait=*/true);
  std::this_thread::sleep_for(seconds(1));  // the routers serve on without it
  ASSERT_TRUE((*mesh)->RestartController().ok());
  // It rebuilds from the services and routers: the routers' placement (not a fresh epoch
  // 1), every service and router back.
  const absl::Status back = (*mesh)->WaitForState(
      [&](const v1::ControllerState& s) {
        int ready = 0, connected = 0;
        for (const v1::ServiceState& m : s.services()) ready += m.state() == "ready";
        for (const v1::RouterState& r : s.routers()) connected += r.connected();
        return s.placement().epoch() >= epoch && ready == 3 && connected == 2;
      },
      seconds(30));
  ASSERT_TRUE(back.ok()) << back;
  // The next rebalance works, above the old epochs.
  driver->SetSkew(&hot);
  std::this_thread::sleep_for(seconds(4));
  const absl::StatusOr<v1::RebalanceResponse> r = (*mesh)->Rebalance();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(r->epoch(), epoch) << r->note();
  ExpectNothingLost(*driver);
}

TEST(ControllerTest, AHungLoadExpertsAbortsTheRoundCleanly) {
  const GeneratedModel m = Model();
  ControlledMeshOptions o = Options(m, 2);
  o.lease_s = 30;  // the stopped service stays registered
  o.controller_flags = {"--load-timeout-s", "1.5"};
  auto mesh = ControlledMesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const TokenSkew uniform = TokenSkew::Uniform(*m.ckpt, m.config).value();
  auto driver = Drive(**mesh, m, uniform);
  ASSERT_NE(driver, nullptr);
  const absl::StatusOr<int> added = (*mesh)->AddExpert();
  ASSERT_TRUE(added.ok()) << added.status();
  std::this_thread::sleep_for(seconds(2));  // registered, the load windows full
  const v1::ControllerState before = (*mesh)->State().value();
  ASSERT_TRUE((*mesh)->expert_process(*added).Stop());  // alive, accepts, never answers
  const absl::StatusOr<v1::RebalanceResponse> r = (*mesh)->Rebalance();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kAborted) << r.status();
  EXPECT_NE(r.status().message().find("LoadExperts"), std::string::npos) << r.status();
  const v1::ControllerState after = (*mesh)->State().value();
  EXPECT_EQ(after.placement().epoch(), before.placement().epoch());
  EXPECT_EQ(after.aborted_moves(), before.aborted_moves() + 1);
  EXPECT_EQ(after.moving(), "");
  (*mesh)->expert_process(*added).Signal(SIGCONT, false);
  std::this_thread::sleep_for(seconds(1));
  ExpectNothingLost(*driver);
}

// Outlier ejection seen by the controller: a service that hangs (SIGSTOP, its lease kept
// by a long --lease-s) is ejected by each router after a timeout; the routers report it,
// the controller shows it (ejected_by) and, once every router has ejected it for
// --ejected-failed-s, treats it as failed; the other replica serves meanwhile.
TEST(ControllerTest, AServiceEveryRouterEjectsIsTreatedAsFailed) {
  const GeneratedModel m = Model();
  ControlledMeshOptions o = Options(m, 2);
  o.min_replicas = 2;
  o.lease_s = 30;
  o.router_flags = {"--timeout-ms", "800", "--eject-after", "1", "--eject-base-ms", "30000"};
  o.controller_flags = {"--ejected-failed-s", "1"};
  auto mesh = ControlledMesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::string hung = (*mesh)->expert_endpoints()[1];
  ASSERT_TRUE((*mesh)->expert_process(1).Stop());
  const TokenSkew uniform = TokenSkew::Uniform(*m.ckpt, m.config).value();
  std::mt19937 rng(5);
  const int64_t layer = m.config.MoeLayers().front();
  for (const std::string& router : (*mesh)->router_endpoints()) {
    KServeClient client(router);
    int failed = 0;
    for (int i = 0; i < 4; ++i) {
      // At most the first call, which met the hung service, fails (DEADLINE_EXCEEDED).
      absl::StatusOr<KServeClient::Result> got =
          client.Infer(uniform.Tokens(layer, 16, rng), layer, seconds(5));
      if (!got.ok()) {
        EXPECT_EQ(got.status().code(), absl::StatusCode::kDeadlineExceeded) << got.status();
        ++failed;
      }
    }
    EXPECT_LE(failed, 1) << router;
  }
  auto service = [&](const v1::ControllerState& s) -> const v1::ServiceState* {
    for (const v1::ServiceState& st : s.services()) {
      if (st.endpoint() == hung) return &st;
    }
    return nullptr;
  };
  EXPECT_TRUE((*mesh)
                  ->WaitForState(
                      [&](const v1::ControllerState& s) {
                        const v1::ServiceState* st = service(s);
                        return st != nullptr && st->ejected_by() == 2;
                      },
                      seconds(10))
                  .ok());
  EXPECT_TRUE((*mesh)
                  ->WaitForState(
                      [&](const v1::ControllerState& s) {
                        const v1::ServiceState* st = service(s);
                        return st != nullptr && st->state() == "gone";
                      },
                      seconds(10))
                  .ok());
  (*mesh)->expert_process(1).Signal(SIGCONT, false);
}

// A router that was cut off while another controller published (a restart racing a
// partition) comes back serving a different table at an epoch this controller has used:
// the placement in force is published again at a newer epoch, so that no two tables ever
// share an epoch; the other router follows it too.
TEST(ControllerTest, ARouterServingAnotherTableAtAUsedEpochGetsANewerOne) {
  const GeneratedModel m = Model();
  ControlledMeshOptions o = Options(m, 2);
  o.num_routers = 1;
  auto mesh = ControlledMesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  auto before = (*mesh)->State();
  ASSERT_TRUE(before.ok()) << before.status();
  const v1::Placement current = before->placement();
  ASSERT_GT(current.epoch(), 0u);
  ASSERT_GT(current.entries_size(), 0);

  // The late router's table: the same epoch, expert 0's replica on the other service.
  v1::WatchPlacementRequest req;
  req.set_router_id("late-router");
  *req.mutable_serving() = current;
  v1::PlacementEntry* e = req.mutable_serving()->mutable_entries(0);
  const std::string other = e->replicas(0) == (*mesh)->expert_endpoints()[0]
                                ? (*mesh)->expert_endpoints()[1]
                                : (*mesh)->expert_endpoints()[0];
  e->clear_replicas();
  e->add_replicas(other);
  auto stub = v1::PlacementController::NewStub(
      grpc::CreateChannel((*mesh)->controller_endpoint(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + seconds(10));
  auto stream = stub->WatchPlacement(&ctx, req);
  v1::Placement got;
  ASSERT_TRUE(stream->Read(&got)) << "nothing published to a router serving another table";
  EXPECT_GT(got.epoch(), current.epoch());
  v1::Placement expected = current;
  expected.set_epoch(got.epoch());
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(got, expected))
      << "expected the placement in force again, got " << got.ShortDebugString();

  v1::AckPlacementRequest ack;
  ack.set_router_id("late-router");
  ack.set_epoch(got.epoch());
  v1::AckPlacementResponse ack_resp;
  grpc::ClientContext ack_ctx;
  ASSERT_TRUE(stub->AckPlacement(&ack_ctx, ack, &ack_resp).ok());
  // The real router serves the new epoch too.
  bool followed = false;
  for (int i = 0; i < 50 && !followed; ++i) {
    auto s = (*mesh)->State();
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(s->placement().epoch(), got.epoch());
    for (const v1::RouterState& r : s->routers()) {
      if (r.router_id() != "late-router" && r.acked_epoch() == got.epoch()) followed = true;
    }
    if (!followed) std::this_thread::sleep_for(milliseconds(100));
  }
  EXPECT_TRUE(followed) << "the real router did not acknowledge epoch " << got.epoch();
  ctx.TryCancel();
}

TEST(ControllerTest, BadRequestsAreRefusedWithAClearError) {
  const GeneratedModel m = Model();
  ControlledMeshOptions o = Options(m, 1);
  o.num_routers = 1;
  auto mesh = ControlledMesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  auto stub = v1::PlacementController::NewStub(
      grpc::CreateChannel((*mesh)->controller_endpoint(), grpc::InsecureChannelCredentials()));
  auto call = [&](auto method, const auto& req, auto* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + seconds(10));
    return (stub.get()->*method)(&ctx, req, resp);
  };
  {
    v1::HeartbeatRequest req;
    req.set_endpoint("nobody:1");
    v1::HeartbeatResponse resp;
    const grpc::Status s = call(&v1::PlacementController::Stub::Heartbeat, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_NE(s.error_message().find("nobody:1"), std::string::npos) << s.error_message();
  }
  {
    v1::DrainRequest req;
    req.set_endpoint("nobody:1");
    v1::DrainResponse resp;
    const grpc::Status s = call(&v1::PlacementController::Stub::Drain, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
  }
  {
    v1::RegisterRequest req;
    req.set_endpoint("127.0.0.1:1");
    v1::ExpertId* id = req.add_experts();
    id->set_layer(0);
    id->set_expert(99);
    v1::RegisterResponse resp;
    const grpc::Status s = call(&v1::PlacementController::Stub::Register, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("expert 99"), std::string::npos) << s.error_message();
  }
  const uint64_t epoch = (*mesh)->State().value().placement().epoch();
  {
    // An acknowledgement of an epoch never published (stale or forged).
    v1::AckPlacementRequest req;
    req.set_router_id("router-0");
    req.set_epoch(epoch + 7);
    v1::AckPlacementResponse resp;
    const grpc::Status s = call(&v1::PlacementController::Stub::AckPlacement, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_NE(s.error_message().find("never published"), std::string::npos) << s.error_message();
  }
  {
    // A malformed placement offered by a "router": refused, not adopted.
    v1::WatchPlacementRequest req;
    req.set_router_id("forger");
    req.mutable_serving()->set_epoch(epoch + 100);
    v1::PlacementEntry* e = req.mutable_serving()->add_entries();
    e->set_layer(9);
    e->set_expert(0);
    e->add_replicas("x:1");
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + seconds(10));
    auto reader = stub->WatchPlacement(&ctx, req);
    v1::Placement p;
    EXPECT_FALSE(reader->Read(&p));
    const grpc::Status s = reader->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  }
  {
    v1::LoadReport req;
    req.set_router_id("router-0");
    v1::LayerLoad* l = req.mutable_load()->add_layers();
    l->set_layer(0);
    l->add_window_rate(1.0);  // one rate for 8 experts
    v1::ReportLoadResponse resp;
    const grpc::Status s = call(&v1::PlacementController::Stub::ReportLoad, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  }
  EXPECT_EQ((*mesh)->State().value().placement().epoch(), epoch);
  // The router's own SetPlacement belongs to the controller now.
  auto control = v1::RouterControl::NewStub(
      grpc::CreateChannel((*mesh)->router_endpoints()[0], grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  v1::Placement p = (*mesh)->State().value().placement();
  p.set_epoch(epoch + 1);
  v1::SetPlacementResponse resp;
  const grpc::Status s = control->SetPlacement(&ctx, p, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("controller"), std::string::npos) << s.error_message();
}

TEST(ControllerTest, OperatorCommandsShowRebalanceAndDrainUnderLoad) {
  const GeneratedModel m = Model();
  auto mesh = ControlledMesh::Start(Options(m, 3));
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::string controller = (*mesh)->controller_endpoint();
  const TokenSkew uniform = TokenSkew::Uniform(*m.ckpt, m.config).value();
  auto driver = Drive(**mesh, m, uniform);
  ASSERT_NE(driver, nullptr);

  auto [code, out] = Moemesh(absl::StrCat("placement show --controller ", controller));
  ASSERT_EQ(code, 0) << out;
  const uint64_t epoch = (*mesh)->State().value().placement().epoch();
  EXPECT_TRUE(absl::StrContains(out, absl::StrCat("epoch ", epoch, ";"))) << out;
  for (const std::string& e : (*mesh)->expert_endpoints()) {
    EXPECT_TRUE(absl::StrContains(out, e)) << e << "\n" << out;
  }
  EXPECT_TRUE(absl::StrContains(out, "router-0")) << out;
  EXPECT_TRUE(absl::StrContains(out, "router-1")) << out;
  EXPECT_TRUE(absl::StrContains(out, "layer 0: 0:")) << out;

  std::tie(code, out) = Moemesh(absl::StrCat("placement rebalance --controller ", controller));
  ASSERT_EQ(code, 0) << out;
  EXPECT_TRUE(absl::StrContains(out, "replicas added")) << out;

  const std::string drained = (*mesh)->expert_endpoints()[0];
  std::tie(code, out) =
      Moemesh(absl::StrCat("placement drain ", drained, " --controller ", controller));
  ASSERT_EQ(code, 0) << out;
  EXPECT_TRUE(absl::StrContains(out, absl::StrCat(drained, " drained"))) << out;
  const v1::ControllerState s = (*mesh)->State().value();
  const v1::ServiceState* d = ServiceOf(s, drained);
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->state(), "draining");
  EXPECT_EQ(d->experts(), 0);
  for (const v1::PlacementEntry& e : s.placement().entries()) {
    EXPECT_GE(e.replicas_size(), 1);
    for (const std::string& r : e.replicas()) EXPECT_NE(r, drained);
  }
  // The drained service computes nothing more; the others serve every request.
  const double before = TokensComputed((*mesh)->expert_metrics_url(0));
  std::this_thread::sleep_for(seconds(1));
  EXPECT_EQ(TokensComputed((*mesh)->expert_metrics_url(0)), before);
  ExpectNothingLost(*driver);

  // Draining an unknown service is refused, naming it.
  std::tie(code, out) =
      Moemesh(absl::StrCat("placement drain 10.9.9.9:1 --controller ", controller));
  EXPECT_NE(code, 0);
  EXPECT_TRUE(absl::StrContains(out, "10.9.9.9:1")) << out;
}

}  // namespace
}  // namespace moemesh
