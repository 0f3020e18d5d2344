// Issue 18 end to end: real `moemesh` processes serving TLS and mutual TLS with
// certificates openssl makes here, and the identities each call needs. Every refused
// caller gets its code (a failed handshake: UNAVAILABLE; no identity or a bad token:
// UNAUTHENTICATED; an identity not allowed: PERMISSION_DENIED) while authorised traffic,
// driven the whole time and checked bit for bit, never fails; certificates rotated on disk
// as Kubernetes rotates a mounted Secret are picked up with no failed request.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "controller.grpc.pb.h"
#include "expert_service.grpc.pb.h"
#include "router_control.grpc.pb.h"
#include "services/model/model_generator.h"
#include "services/rpc/grpc_server.h"
#include "services/rpc/security.h"
#include "tools/controlled_mesh.h"
#include "tools/http_client.h"
#include "tools/load_driver.h"
#include "tools/local_mesh.h"
#include "tools/process.h"
#include "tools/test_certs.h"

#ifndef MOEMESH_BINARY
#error "MOEMESH_BINARY must name the moemesh executable"
#endif

namespace moemesh {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

std::string TempPath(const std::string& name) {
  return (std::filesystem::path(::testing::TempDir()) /
          absl::StrCat("security_e2e_", ::getpid(), "_", name))
      .string();
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
}

// The certificates and tokens of one test.
struct Pki {
  std::string dir;
  TestCa ca, other;                    // the mesh's CA, and one nobody trusts
  TestCertificate mesh;                // every component: loopback names
  TestCertificate admin;               // an operator: DNS:admin.moemesh (allowed)
  TestCertificate intruder;            // the mesh's CA, DNS:intruder.moemesh (not allowed)
  TestCertificate expired;             // the mesh's CA, loopback names, valid in 2020 only
  TestCertificate stranger;            // the other CA, loopback names
  std::string admin_token, api_token;  // files
  std::string admin_value, api_value;  // their contents

  static Pki Make(const std::string& name) {
    Pki p;
    p.dir = TempPath(name);
    p.ca = TestCa::Create(p.dir, "mesh-ca").value();
    p.other = TestCa::Create(p.dir, "other-ca").value();
    p.mesh = p.ca.Issue("mesh", kLoopbackSans).value();
    p.admin = p.ca.Issue("admin", "DNS:admin.moemesh").value();
    p.intruder = p.ca.Issue("intruder", "DNS:intruder.moemesh").value();
    p.expired = p.ca.Issue("expired", kLoopbackSans, /*expired=*/true).value();
    p.stranger = p.other.Issue("stranger", kLoopbackSans).value();
    p.admin_token = p.dir + "/admin.token";
    p.api_token = p.dir + "/api.token";
    p.admin_value = "admin-" + std::to_string(std::random_device{}());
    p.api_value = "api-" + std::to_string(std::random_device{}());
    WriteFile(p.admin_token, p.admin_value + "\n");
    WriteFile(p.api_token, p.api_value + "\n");
    return p;
  }
  ~Pki() {
    std::error_code ec;
    if (!dir.empty()) std::filesystem::remove_all(dir, ec);
  }
};

// A client's credentials: the CA it trusts (none: plaintext), its certificate, a token.
std::shared_ptr<Security> Client(const std::string& ca, const TestCertificate* cert = nullptr,
                                 const std::string& token_file = "",
                                 const std::string& server_name = "") {
  SecurityOptions o;
  o.tls_ca = ca;
  if (cert != nullptr) {
    o.tls_cert = cert->cert;
    o.tls_key = cert->key;
  }
  o.client_token_file = token_file;
  o.tls_server_name = server_name;
  return Security::Create(o).value();
}

absl::StatusCode InferCode(const std::string& router, const std::shared_ptr<Security>& security,
                           const Tensor& x) {
  KServeClient client(router, 256 << 20, security);
  return client.Infer(x, 0, seconds(10)).status().code();
}

grpc::StatusCode GetPlacementCode(const std::string& router,
                                  const std::shared_ptr<Security>& security) {
  auto stub = v1::RouterControl::NewStub(security->Dial(router));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + seconds(10));
  v1::Placement out;
  return stub->GetPlacement(&ctx, v1::GetPlacementRequest(), &out).error_code();
}

grpc::StatusCode ExpertInfoCode(const std::string& expert,
                                const std::shared_ptr<Security>& security) {
  auto stub = v1::ExpertService::NewStub(security->Dial(expert));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + seconds(10));
  v1::InfoResponse out;
  return stub->Info(&ctx, v1::InfoRequest(), &out).error_code();
}

grpc::StatusCode UnloadCode(const std::string& expert, const std::shared_ptr<Security>& security) {
  auto stub = v1::ExpertService::NewStub(security->Dial(expert));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + seconds(10));
  v1::UnloadExpertsRequest req;  // nothing named: refused before it could unload anything
  v1::UnloadExpertsResponse out;
  return stub->UnloadExperts(&ctx, req, &out).error_code();
}

Tensor Tokens(const GeneratedModel& m, int64_t T) {
  Tensor x = Tensor::Empty(DType::kF32, {T, m.config.hidden_size});
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < x.numel(); ++i) x.mutable_data<float>()[i] = nd(rng);
  return x;
}

// A started service: its process and "HOST:PORT" (and metrics URL when asked for).
struct Service {
  std::unique_ptr<ChildProcess> process;
  std::string endpoint, metrics_url;
};

Service StartService(std::vector<std::string> args, bool metrics = false) {
  args.insert(args.begin(), MOEMESH_BINARY);
  Service s;
  s.process = ChildProcess::Start(args).value();
  if (metrics) s.metrics_url = s.process->WaitForLine("metrics on ", seconds(60)).value();
  s.endpoint = s.process->WaitListening(seconds(60)).value();
  return s;
}

absl::Status WaitReady(const std::string& router, const std::shared_ptr<Security>& security) {
  KServeClient client(router, 256 << 20, security);
  for (int i = 0; i < 600; ++i) {
    absl::StatusOr<bool> ready = client.ServerReady();
    if (ready.ok() && *ready) return absl::OkStatus();
    std::this_thread::sleep_for(milliseconds(100));
  }
  return absl::DeadlineExceededError("the router never became ready");
}

// The value of the sample `name{labels}` in the Prometheus text at `url`; -1 if absent.
double MetricValue(const std::string& url, const std::string& sample) {
  absl::StatusOr<HttpReply> reply = HttpGet(url);
  if (!reply.ok()) return -1;
  for (absl::string_view line : absl::StrSplit(reply->body, '\n')) {
    if (absl::StartsWith(line, sample + " ")) {
      return std::stod(std::string(line.substr(sample.size() + 1)));
    }
  }
  return -1;
}

std::unique_ptr<LoadDriver> StartLoad(const GeneratedModel& m, const std::string& router,
                                      const std::shared_ptr<Security>& security,
                                      const TokenSkew* skew) {
  LoadDriverOptions o;
  o.routers = {router};
  o.clients = 2;
  o.tokens = 8;
  o.timeout = seconds(20);
  o.security = security;
  return LoadDriver::Start(o, *m.ckpt, m.config, skew).value();
}

GeneratedModel Model(const std::string& name) {
  return GenerateAndOpen(TempPath(name), SmallModelOptions(ModelFamily::kMixtral)).value();
}

// Mutual TLS everywhere, the admin identity by certificate name or admin token, ModelInfer
// by API token or the admin identity.
TEST(SecurityE2eTest, MutualTlsRefusesEachBadCallerWithItsCodeWhileTrafficFlows) {
  const Pki pki = Pki::Make("mtls");
  const GeneratedModel m = Model("mtls_model");
  const std::vector<std::string> mtls = {"--tls-cert",         pki.mesh.cert,
                                         "--tls-key",          pki.mesh.key,
                                         "--tls-ca",           pki.ca.cert(),
                                         "--tls-client-ca",    pki.ca.cert(),
                                         "--admin-san",        "localhost,admin.moemesh",
                                         "--admin-token-file", pki.admin_token};
  std::vector<std::string> expert_args = {"expert", "--model", m.dir, "--listen", "127.0.0.1:0"};
  expert_args.insert(expert_args.end(), mtls.begin(), mtls.end());
  Service expert = StartService(expert_args);
  std::vector<std::string> router_args = {"router",           "--model",          m.dir,
                                          "--listen",         "127.0.0.1:0",      "--endpoints",
                                          expert.endpoint,    "--metrics-listen", "127.0.0.1:0",
                                          "--api-token-file", pki.api_token};
  router_args.insert(router_args.end(), mtls.begin(), mtls.end());
  Service router = StartService(router_args, /*metrics=*/true);
  const std::string& r = router.endpoint;

  const auto admin = Client(pki.ca.cert(), &pki.admin);
  ASSERT_TRUE(WaitReady(r, admin).ok());
  TokenSkew uniform = TokenSkew::Uniform(*m.ckpt, m.config).value();
  std::unique_ptr<LoadDriver> load = StartLoad(m, r, admin, &uniform);
  const Tensor x = Tokens(m, 4);

  // Refused in the handshake: UNAVAILABLE, before any call reaches the service.
  EXPECT_EQ(InferCode(r, Security::Insecure(), x), absl::StatusCode::kUnavailable)
      << "plaintext client against a TLS port";
  EXPECT_EQ(InferCode(r, Client(pki.other.cert(), &pki.admin), x), absl::StatusCode::kUnavailable)
      << "client that does not trust the server's CA";
  EXPECT_EQ(InferCode(r, Client(pki.ca.cert(), &pki.stranger), x), absl::StatusCode::kUnavailable)
      << "client certificate of another CA";
  EXPECT_EQ(InferCode(r, Client(pki.ca.cert(), &pki.expired), x), absl::StatusCode::kUnavailable)
      << "expired client certificate";
  EXPECT_EQ(InferCode(r, Client(pki.ca.cert()), x), absl::StatusCode::kUnavailable)
      << "no client certificate";
  EXPECT_EQ(InferCode(r, Client(pki.ca.cert(), &pki.admin, "", "elsewhere.example"), x),
            absl::StatusCode::kUnavailable)
      << "server certificate without the expected name";
  EXPECT_EQ(ExpertInfoCode(expert.endpoint, Security::Insecure()), grpc::StatusCode::UNAVAILABLE);

  // A certificate of the mesh's CA whose name is not allowed: PERMISSION_DENIED for every
  // call needing an identity, on the router and on the expert service; health stays open.
  const auto intruder = Client(pki.ca.cert(), &pki.intruder);
  EXPECT_EQ(InferCode(r, intruder, x), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(GetPlacementCode(r, intruder), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(ExpertInfoCode(expert.endpoint, intruder), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(UnloadCode(expert.endpoint, intruder), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(CheckHealth(intruder->Dial(r), seconds(10)).value_or(-1), 1);
  // Tokens: the API token opens ModelInfer only; a wrong one is UNAUTHENTICATED; the admin
  // token opens everything.
  const std::string wrong_token = pki.dir + "/wrong.token";
  WriteFile(wrong_token, "not-the-token");
  EXPECT_EQ(InferCode(r, Client(pki.ca.cert(), &pki.intruder, pki.api_token), x),
            absl::StatusCode::kOk);
  EXPECT_EQ(GetPlacementCode(r, Client(pki.ca.cert(), &pki.intruder, pki.api_token)),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(InferCode(r, Client(pki.ca.cert(), &pki.intruder, wrong_token), x),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(GetPlacementCode(r, Client(pki.ca.cert(), &pki.intruder, wrong_token)),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(GetPlacementCode(r, Client(pki.ca.cert(), &pki.intruder, pki.admin_token)),
            grpc::StatusCode::OK);
  EXPECT_EQ(UnloadCode(expert.endpoint, Client(pki.ca.cert(), &pki.intruder, pki.admin_token)),
            grpc::StatusCode::OK);
  // The allowed names: the operator's certificate, and the mesh's own (the router's calls).
  EXPECT_EQ(GetPlacementCode(r, admin), grpc::StatusCode::OK);
  EXPECT_EQ(InferCode(r, admin, x), absl::StatusCode::kOk);
  EXPECT_EQ(ExpertInfoCode(expert.endpoint, Client(pki.ca.cert(), &pki.mesh)),
            grpc::StatusCode::OK);

  std::this_thread::sleep_for(seconds(1));
  load->Stop();
  const LoadDriver::Totals totals = load->totals();
  EXPECT_GT(totals.requests, 10);
  EXPECT_EQ(totals.failed, 0) << totals.first_error;
  EXPECT_EQ(totals.mismatched, 0);
  // Counted on the router: 3 PERMISSION_DENIED (ModelInfer, GetPlacement, GetPlacement with
  // the API token) and 2 UNAUTHENTICATED (the wrong token); the handshakes never got a call.
  EXPECT_EQ(
      MetricValue(router.metrics_url, "moemesh_auth_refusals_total{code=\"permission_denied\"}"),
      3);
  EXPECT_EQ(
      MetricValue(router.metrics_url, "moemesh_auth_refusals_total{code=\"unauthenticated\"}"), 2);
}

// The kubelet's layout of a mounted Secret: files are links through "..data", a link to a
// timestamped folder, swapped atomically on rotation.
class MountedSecret {
 public:
  explicit MountedSecret(std::string dir) : dir_(std::move(dir)) {
    std::filesystem::create_directories(dir_);
  }
  void Write(const TestCertificate& cert) {
    const std::string version = absl::StrCat("..v", ++version_);
    std::filesystem::create_directories(dir_ + "/" + version);
    std::filesystem::copy_file(cert.cert, dir_ + "/" + version + "/tls.crt");
    std::filesystem::copy_file(cert.key, dir_ + "/" + version + "/tls.key");
    std::filesystem::create_symlink(version, dir_ + "/..data_tmp");
    std::filesystem::rename(dir_ + "/..data_tmp", dir_ + "/..data");  // atomic
    for (const char* f : {"tls.crt", "tls.key"}) {
      if (!std::filesystem::is_symlink(dir_ + "/" + f)) {
        std::filesystem::create_symlink(std::string("..data/") + f, dir_ + "/" + f);
      }
    }
  }
  std::string cert() const { return dir_ + "/tls.crt"; }
  std::string key() const { return dir_ + "/tls.key"; }

 private:
  std::string dir_;
  int version_ = 0;
};

// TLS on the servers (no client certificates) and bearer tokens: a missing token is
// UNAUTHENTICATED; the certificates are rotated under load and taken up by new
// connections with no failed request.
TEST(SecurityE2eTest, TokensAndCertificateRotationUnderLoad) {
  const Pki pki = Pki::Make("rotate");
  const GeneratedModel m = Model("rotate_model");
  TestCa next_ca = TestCa::Create(pki.dir, "next-ca").value();
  const TestCertificate next = next_ca.Issue("mesh-next", kLoopbackSans).value();
  // Clients trust both CAs (as during a CA rotation); a second client only the new one.
  const std::string bundle = pki.dir + "/bundle.pem";
  RunShell(absl::StrCat("cat '", pki.ca.cert(), "' '", next_ca.cert(), "' > '", bundle, "'"));
  MountedSecret expert_tls(pki.dir + "/expert-tls"), router_tls(pki.dir + "/router-tls");
  expert_tls.Write(pki.mesh);
  router_tls.Write(pki.mesh);

  Service expert = StartService({"expert", "--model", m.dir, "--listen", "127.0.0.1:0",
                                 "--tls-cert", expert_tls.cert(), "--tls-key", expert_tls.key(),
                                 "--tls-reload-s", "1", "--admin-token-file", pki.admin_token});
  Service router =
      StartService({"router", "--model", m.dir, "--listen", "127.0.0.1:0", "--endpoints",
                    expert.endpoint, "--tls-cert", router_tls.cert(), "--tls-key", router_tls.key(),
                    "--tls-reload-s", "1", "--tls-ca", bundle, "--admin-token-file",
                    pki.admin_token, "--api-token-file", pki.api_token});
  const std::string& r = router.endpoint;
  const auto api = Client(bundle, nullptr, pki.api_token);
  ASSERT_TRUE(WaitReady(r, api).ok());
  const Tensor x = Tokens(m, 4);

  EXPECT_EQ(InferCode(r, Security::Insecure(), x), absl::StatusCode::kUnavailable);
  EXPECT_EQ(InferCode(r, Client(bundle), x), absl::StatusCode::kUnauthenticated) << "no token";
  EXPECT_EQ(GetPlacementCode(r, Client(bundle)), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(ExpertInfoCode(expert.endpoint, Client(bundle)), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(GetPlacementCode(r, api), grpc::StatusCode::PERMISSION_DENIED) << "API token";
  EXPECT_EQ(GetPlacementCode(r, Client(bundle, nullptr, pki.admin_token)), grpc::StatusCode::OK);

  TokenSkew uniform = TokenSkew::Uniform(*m.ckpt, m.config).value();
  std::unique_ptr<LoadDriver> load = StartLoad(m, r, api, &uniform);
  const auto next_only = Client(next_ca.cert(), nullptr, pki.api_token);
  const auto next_admin = Client(next_ca.cert(), nullptr, pki.admin_token);
  EXPECT_EQ(InferCode(r, next_only, x), absl::StatusCode::kUnavailable) << "before rotation";
  std::this_thread::sleep_for(seconds(1));

  expert_tls.Write(next);
  router_tls.Write(next);
  // New handshakes present the new certificates within a few reload periods.
  bool router_rotated = false, expert_rotated = false;
  for (int i = 0; i < 100 && !(router_rotated && expert_rotated); ++i) {
    std::this_thread::sleep_for(milliseconds(100));
    router_rotated = router_rotated || InferCode(r, next_only, x) == absl::StatusCode::kOk;
    expert_rotated =
        expert_rotated || ExpertInfoCode(expert.endpoint, next_admin) == grpc::StatusCode::OK;
  }
  EXPECT_TRUE(router_rotated);
  EXPECT_TRUE(expert_rotated);
  // The router's calls to the expert service go on (its connection, and new ones).
  std::this_thread::sleep_for(seconds(1));
  load->Stop();
  const LoadDriver::Totals totals = load->totals();
  EXPECT_GT(totals.requests, 10);
  EXPECT_EQ(totals.failed, 0) << totals.first_error;
  EXPECT_EQ(totals.mismatched, 0);

  // Tokens rotate too: the file is re-read when it changes.
  WriteFile(pki.api_token, "api-rotated\n");
  const std::string old_token = pki.dir + "/old.token";
  WriteFile(old_token, pki.api_value);
  bool refused_old = false;
  for (int i = 0; i < 50 && !refused_old; ++i) {
    std::this_thread::sleep_for(milliseconds(100));
    refused_old =
        InferCode(r, Client(bundle, nullptr, old_token), x) == absl::StatusCode::kUnauthenticated;
  }
  EXPECT_TRUE(refused_old);
  EXPECT_EQ(InferCode(r, Client(bundle, nullptr, pki.api_token), x), absl::StatusCode::kOk);
}

// The controller with mutual TLS: services register and routers follow it with their
// certificates; the operator command works with the admin certificate and is refused with
// another name.
TEST(SecurityE2eTest, ControllerMeshWithMutualTls) {
  const Pki pki = Pki::Make("controller");
  const GeneratedModel m = Model("controller_model");
  const std::vector<std::string> mtls = {
      "--tls-cert",  pki.mesh.cert,     "--tls-key",   pki.mesh.key,  "--tls-ca",
      pki.ca.cert(), "--tls-client-ca", pki.ca.cert(), "--admin-san", "localhost,admin.moemesh"};
  ControlledMeshOptions o;
  o.moemesh_binary = MOEMESH_BINARY;
  o.model_dir = m.dir;
  o.num_expert_services = 2;
  o.controller_flags = o.expert_flags = o.router_flags = mtls;
  o.client_security = Client(pki.ca.cert(), &pki.admin);
  auto mesh = ControlledMesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::string& r = (*mesh)->router_endpoints()[0];
  EXPECT_EQ(InferCode(r, o.client_security, Tokens(m, 4)), absl::StatusCode::kOk);

  const std::string show =
      absl::StrCat(MOEMESH_BINARY, " placement show --controller ", (*mesh)->controller_endpoint(),
                   " --tls-ca ", pki.ca.cert(), " --timeout-s 10");
  const ShellResult ok = RunShell(
      absl::StrCat(show, " --tls-cert ", pki.admin.cert, " --tls-key ", pki.admin.key, " 2>&1"));
  EXPECT_EQ(ok.exit_code, 0) << ok.output;
  EXPECT_TRUE(absl::StrContains(ok.output, "placement (expert:replicas)")) << ok.output;
  const ShellResult denied = RunShell(absl::StrCat(show, " --tls-cert ", pki.intruder.cert,
                                                   " --tls-key ", pki.intruder.key, " 2>&1"));
  EXPECT_NE(denied.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(denied.output, "PERMISSION_DENIED")) << denied.output;
  // Registering needs the identity too.
  auto stub = v1::PlacementController::NewStub(
      Client(pki.ca.cert(), &pki.intruder)->Dial((*mesh)->controller_endpoint()));
  grpc::ClientContext ctx;
  v1::RegisterRequest reg;
  reg.set_endpoint("127.0.0.1:1");
  v1::RegisterResponse resp;
  EXPECT_EQ(stub->Register(&ctx, reg, &resp).error_code(), grpc::StatusCode::PERMISSION_DENIED);
}

}  // namespace
}  // namespace moemesh
