// The Kubernetes manifests, run: deploy/k8s is rendered with `kubectl kustomize`, and each
// workload's container spec (command, env, ports, probes, securityContext, volumes,
// terminationGracePeriodSeconds) is run with podman from the image tools/build_image.sh
// builds (moemesh:VERSION): the controller, 3 expert pods (the StatefulSet's replicas) and
// 2 routers (the Deployment's replicas), with mutual TLS and the admin identity required
// as the manifests set them. The test checks that the probes the manifests name (HTTP on
// the metrics port) pass, that the routers' gRPC port refuses plaintext clients and TLS
// clients without a certificate of the mesh's CA, that control calls need the admin
// identity, that ModelInfer through each router (TLS, a client certificate) matches
// MoeLayer bit for bit, that every metrics port the manifests name serves metrics, then
// scales the experts up (the StatefulSet's next ordinal starts and takes work) and down
// (the highest ordinal is stopped with the manifest's grace period and exits 0) under load
// with 0 failed requests.
//
// What stands in for a cluster (nothing else is changed):
//   - Networking: every container runs with --network host, so each pod's container ports
//     are mapped to free host ports: `0.0.0.0:PORT` in the command becomes
//     `0.0.0.0:HOSTPORT`, and the probes and metrics are checked on HOSTPORT.
//   - Service DNS: `moemesh-controller:7000` (the controller Service) becomes
//     127.0.0.1:HOSTPORT of the controller pod; the test talks to the routers directly.
//   - Downward API: metadata.name is the pod name the StatefulSet/Deployment would give
//     (moemesh-expert-N, moemesh-router-N), status.podIP is 127.0.0.1; $(VAR) references in
//     the command are expanded from the container's env as the kubelet does.
//   - OpenBLAS: the test's OPENBLAS_* environment (e.g. OPENBLAS_CORETYPE) is passed to the
//     containers, so that they and the reference MoeLayer in this process use the same
//     BLAS kernels (answers are bit-identical for one kernel choice; pods of a real mesh
//     share theirs when they run the same image on the same CPU type).
//   - Volumes: the moemesh-model claim is a read-only bind mount of a generated Mixtral-
//     layout model; emptyDir volumes are tmpfs mounts; a Secret volume is a read-only bind
//     mount of a folder holding one file per key, with the volume's defaultMode and the
//     pod's fsGroup as their group, as the kubelet makes it.
//   - Secrets: moemesh-tls and moemesh-admin-token are made at test time with openssl
//     (tools/test_certs.h) as deploy/k8s/make-dev-secrets.sh makes them: a CA (ca.crt), a
//     certificate for the components (tls.crt, tls.key) naming what the manifests' flags
//     expect (--tls-server-name, --admin-san), a random token; and a client certificate of
//     the same CA without the admin name for the test's KServe clients.
//   - securityContext: runAsUser/runAsGroup → --user, readOnlyRootFilesystem → --read-only,
//     capabilities.drop ALL → --cap-drop ALL, allowPrivilegeEscalation false →
//     --security-opt no-new-privileges.
//   - Scaling: `kubectl scale statefulset moemesh-expert --replicas 4` starts ordinal 3;
//     back to 3 stops ordinal 3 with `podman stop -t terminationGracePeriodSeconds`.
//   - `kubectl exec deploy/moemesh-controller -- moemesh placement show|rebalance` (with
//     the controller's own certificate and token, as deploy/README.md shows) is
//     `podman exec` in the controller's container.
//
// Needs podman, kubectl, node with deploy/validate/node_modules, and the image: tools/test.sh
// builds it first (tools/build_image.sh). MOEMESH_IMAGE overrides the image name.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "controller.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "services/model/model_generator.h"
#include "services/rpc/grpc_server.h"
#include "services/rpc/security.h"
#include "tools/http_client.h"
#include "tools/load_driver.h"
#include "tools/process.h"
#include "tools/test_certs.h"

#ifndef MOEMESH_VERSION
#error "MOEMESH_VERSION must name the project version (the image tag)"
#endif

namespace moemesh {
namespace {

using json = nlohmann::json;
using std::chrono::milliseconds;
using std::chrono::seconds;

// Relative to the repository root, where ctest runs the test.
const char* kConf = "deploy/podman/containers.conf";

std::string Image() {
  const char* env = std::getenv("MOEMESH_IMAGE");
  return env != nullptr ? env : absl::StrCat("localhost/moemesh:", MOEMESH_VERSION);
}

// Runs a shell command with the project's podman settings; its exit code and stdout.
std::pair<int, std::string> Shell(const std::string& cmd) {
  ShellResult r = RunShell(absl::StrCat("CONTAINERS_CONF=", kConf, " ", cmd));
  return {r.exit_code, std::move(r.output)};
}

int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

// The value after `flag` in the first container's command ("" without it).
std::string FlagValue(const json& workload, const std::string& flag) {
  const json& command = workload["spec"]["template"]["spec"]["containers"][0]["command"];
  for (size_t i = 0; i + 1 < command.size(); ++i) {
    if (command[i] == flag) return command[i + 1];
  }
  return "";
}

// Secret name → key → the file holding its value.
using Secrets = std::map<std::string, std::map<std::string, std::string>>;

const json& Workload(const json& objects, const std::string& kind, const std::string& name) {
  for (const json& o : objects) {
    if (o["kind"] == kind && o["metadata"]["name"] == name) return o;
  }
  static const json kNone;
  ADD_FAILURE() << "the rendered manifests have no " << kind << " " << name;
  return kNone;
}

// One pod of a workload, run as a podman container in the foreground (its stdout read for
// "listening on").
struct Pod {
  struct Probe {
    std::string kind;  // startupProbe, ...
    std::string path;  // of its HTTP GET
    int port = 0;      // on the host
  };
  std::string name;
  std::map<int, int> ports;                // container port → host port
  std::map<std::string, int> named_ports;  // port name → host port
  std::vector<Probe> probes;               // the probes the spec names
  int grace_s = 30;
  std::unique_ptr<ChildProcess> process;

  std::string endpoint(const std::string& port_name) const {
    return absl::StrCat("127.0.0.1:", named_ports.at(port_name));
  }
};

// Builds the podman command for pod `name` of `workload` (see the header for what is
// substituted) and starts it. Its Secret volumes are made under `volumes_dir`.
std::unique_ptr<Pod> RunPod(const json& workload, const std::string& name,
                            const std::string& model_dir, const Secrets& secrets,
                            const std::string& volumes_dir,
                            const std::map<std::string, std::string>& services) {
  auto pod = std::make_unique<Pod>();
  pod->name = name;
  const json& spec = workload["spec"]["template"]["spec"];
  pod->grace_s = spec.value("terminationGracePeriodSeconds", 30);
  const json& c = spec["containers"][0];
  for (const json& p : c["ports"]) {
    const int host = FreePort();
    pod->ports[p["containerPort"].get<int>()] = host;
    if (p.contains("name")) pod->named_ports[p["name"].get<std::string>()] = host;
  }
  for (const char* probe : {"startupProbe", "readinessProbe", "livenessProbe"}) {
    if (!c.contains(probe)) continue;
    if (!c[probe].contains("httpGet")) {
      ADD_FAILURE() << name << ": " << probe << " is not an HTTP GET (the gRPC port speaks only "
                    << "TLS, which the kubelet's gRPC probes cannot)";
      continue;
    }
    const json& get = c[probe]["httpGet"];
    const json& port = get["port"];
    pod->probes.push_back({probe, get.value("path", "/"),
                           port.is_string() ? pod->named_ports.at(port.get<std::string>())
                                            : pod->ports.at(port.get<int>())});
  }
  // env, with the downward API's values.
  std::map<std::string, std::string> env;
  std::vector<std::string> argv = {"/usr/bin/podman", "run",  "--rm",           "--name", name,
                                   "--network",       "host", "--image-volume", "ignore"};
  for (const json& e : c.value("env", json::array())) {
    std::string value;
    if (e.contains("value")) {
      value = e["value"];
    } else {
      const std::string field = e["valueFrom"]["fieldRef"]["fieldPath"];
      value = field == "metadata.name" ? name : field == "status.podIP" ? "127.0.0.1" : "";
      EXPECT_FALSE(value.empty()) << "no stand-in for downward API field " << field;
    }
    env[e["name"]] = value;
    argv.insert(argv.end(), {"--env", absl::StrCat(e["name"].get<std::string>(), "=", value)});
  }
  // OpenBLAS picks its kernels by CPU, or by OPENBLAS_CORETYPE where set (this machine sets
  // it): the reference MoeLayer here and the containers must use the same kernels for their
  // answers to be bit-identical, so the test's OPENBLAS_* settings go into the containers.
  for (char** e = environ; *e != nullptr; ++e) {
    if (absl::StartsWith(*e, "OPENBLAS_")) argv.insert(argv.end(), {"--env", *e});
  }
  // securityContext.
  const json& psc = spec.value("securityContext", json::object());
  const json& sc = c.value("securityContext", json::object());
  if (psc.contains("runAsUser")) {
    argv.insert(argv.end(), {"--user", absl::StrCat(psc["runAsUser"].get<int>(), ":",
                                                    psc.value("runAsGroup", 0))});
  }
  if (sc.value("readOnlyRootFilesystem", false)) argv.push_back("--read-only");
  for (const json& cap : sc.value("capabilities", json::object()).value("drop", json::array())) {
    argv.insert(argv.end(), {"--cap-drop", cap.get<std::string>()});
  }
  if (sc.contains("allowPrivilegeEscalation") && !sc["allowPrivilegeEscalation"].get<bool>()) {
    argv.insert(argv.end(), {"--security-opt", "no-new-privileges"});
  }
  // Volumes: the model claim, emptyDirs, Secrets.
  std::map<std::string, json> volumes;
  for (const json& v : spec.value("volumes", json::array())) volumes[v["name"]] = v;
  for (const json& m : c.value("volumeMounts", json::array())) {
    const json& v = volumes.at(m["name"].get<std::string>());
    const std::string path = m["mountPath"];
    if (v.contains("persistentVolumeClaim")) {
      EXPECT_EQ(v["persistentVolumeClaim"]["claimName"], "moemesh-model");
      argv.insert(argv.end(), {"--volume", absl::StrCat(model_dir, ":", path, ":ro")});
    } else if (v.contains("emptyDir")) {
      argv.insert(argv.end(), {"--tmpfs", path});
    } else if (v.contains("secret")) {
      // What the kubelet makes of it: a file per key, mode defaultMode (0644 when unset),
      // group fsGroup.
      const std::string secret = v["secret"]["secretName"];
      const auto keys = secrets.find(secret);
      if (keys == secrets.end()) {
        ADD_FAILURE() << name << ": no Secret " << secret << " made for the test";
        continue;
      }
      const std::filesystem::path dir =
          std::filesystem::path(volumes_dir) / name / m["name"].get<std::string>();
      std::filesystem::create_directories(dir);
      for (const auto& [key, source] : keys->second) {
        const std::filesystem::path file = dir / key;
        std::filesystem::copy_file(source, file, std::filesystem::copy_options::overwrite_existing);
        EXPECT_EQ(::chmod(file.c_str(), v["secret"].value("defaultMode", 0644)), 0) << file;
        if (psc.contains("fsGroup")) {
          EXPECT_EQ(::chown(file.c_str(), static_cast<uid_t>(-1), psc["fsGroup"].get<gid_t>()), 0)
              << file;
        }
      }
      argv.insert(argv.end(), {"--volume", absl::StrCat(dir.string(), ":", path, ":ro")});
    } else {
      ADD_FAILURE() << "no stand-in for volume " << v.dump();
    }
  }
  // The command: $(VAR) from env, container ports to host ports, Service names.
  std::vector<std::string> command = c["command"].get<std::vector<std::string>>();
  for (std::string& arg : command) {
    for (const auto& [k, v] : env) absl::StrReplaceAll({{absl::StrCat("$(", k, ")"), v}}, &arg);
    for (const auto& [from, to] : services) {
      if (arg == from) arg = to;
    }
    for (const auto& [cport, hport] : pod->ports) {
      for (const std::string host : {"0.0.0.0:", "127.0.0.1:"}) {
        if (arg == absl::StrCat(host, cport)) arg = absl::StrCat(host, hport);
      }
    }
  }
  argv.insert(argv.end(), {"--entrypoint", command[0], Image()});
  argv.insert(argv.end(), command.begin() + 1, command.end());
  setenv("CONTAINERS_CONF", std::filesystem::absolute(kConf).c_str(), 1);
  auto p = ChildProcess::Start(argv);
  EXPECT_TRUE(p.ok()) << p.status();
  if (!p.ok()) return nullptr;
  pod->process = std::move(*p);
  const absl::StatusOr<std::string> listening = pod->process->WaitListening(seconds(60));
  EXPECT_TRUE(listening.ok()) << name << ": " << listening.status();
  if (!listening.ok()) return nullptr;
  return pod;
}

// Every probe the manifests name passes (HTTP 200, within `timeout`), as the kubelet asks.
void ExpectProbesPass(const Pod& pod, seconds timeout = seconds(30)) {
  for (const Pod::Probe& probe : pod.probes) {
    const std::string url = absl::StrCat("http://127.0.0.1:", probe.port, probe.path);
    int status = 0;
    for (auto end = std::chrono::steady_clock::now() + timeout;
         status != 200 && std::chrono::steady_clock::now() < end;) {
      status = HttpGet(url, seconds(2)).value_or(HttpReply{}).status;
      if (status != 200) std::this_thread::sleep_for(milliseconds(200));
    }
    EXPECT_EQ(status, 200) << pod.name << ": " << probe.kind << " " << url << " fails";
  }
}

// The metrics port: metrics, the probes' endpoints, 404 for other paths (a 404 once
// overflowed the HTTP thread's stack in a service: the process must still answer after).
void ExpectMetrics(const Pod& pod) {
  const std::string base = absl::StrCat("http://", pod.endpoint("metrics"));
  const absl::StatusOr<HttpReply> r = HttpGet(base + "/metrics");
  ASSERT_TRUE(r.ok()) << pod.name << ": " << r.status();
  EXPECT_EQ(r->status, 200) << pod.name;
  EXPECT_TRUE(absl::StrContains(r->body, "moemesh_")) << pod.name << ": " << r->body.substr(0, 200);
  const absl::StatusOr<HttpReply> ready = HttpGet(base + "/readyz");
  ASSERT_TRUE(ready.ok()) << pod.name << ": " << ready.status();
  EXPECT_EQ(ready->status, 200) << pod.name;
  EXPECT_EQ(ready->body, "ready\n") << pod.name;
  EXPECT_EQ(HttpGet(base + "/nothing-here").value_or(HttpReply{}).status, 404) << pod.name;
  EXPECT_EQ(HttpGet(base + "/healthz").value_or(HttpReply{}).status, 200) << pod.name;
}

double TokensComputed(const Pod& pod) {
  return ExpertTokensComputed(absl::StrCat("http://", pod.endpoint("metrics"), "/metrics"))
      .value_or(-1);
}

// Stops the container as the kubelet does (SIGTERM, SIGKILL after the grace period) and
// returns its exit code.
int StopPod(Pod& pod) {
  Shell(absl::StrCat("podman stop -t ", pod.grace_s, " ", pod.name, " >/dev/null 2>&1"));
  return pod.process->Signal(0, /*wait=*/true);
}

class K8sPodmanTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(Shell(absl::StrCat("podman image exists ", Image())).first, 0)
        << "image " << Image() << " not found: build it with tools/build_image.sh";
    auto [rc, out] = Shell("kubectl kustomize deploy/k8s | node deploy/validate/to_json.mjs");
    ASSERT_EQ(rc, 0) << "rendering deploy/k8s failed";
    objects_ = json::parse(out);
    Shell(
        "podman rm -f -i moemesh-controller-0 moemesh-router-0 moemesh-router-1 "
        "moemesh-expert-0 moemesh-expert-1 moemesh-expert-2 moemesh-expert-3 >/dev/null 2>&1");
    // World-readable for user 10001 in the containers.
    model_dir_ =
        (std::filesystem::path(::testing::TempDir()) / absl::StrCat("k8s_podman_", ::getpid()))
            .string();
    auto m = GenerateAndOpen(model_dir_, SmallModelOptions(ModelFamily::kMixtral));
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::make_unique<GeneratedModel>(std::move(*m));
    std::filesystem::permissions(
        model_dir_, std::filesystem::perms::others_read | std::filesystem::perms::others_exec,
        std::filesystem::perm_options::add);
    secrets_dir_ = model_dir_ + "_secrets";
  }
  // The Secrets the manifests mount (see the header) and the test's own clients' settings:
  // TLS with the mesh's CA, expecting the name the components expect of each other.
  void MakeSecrets(const json& router) {
    server_name_ = FlagValue(router, "--tls-server-name");
    const std::string admin_san = FlagValue(router, "--admin-san");
    ASSERT_FALSE(server_name_.empty()) << "the router's manifest sets no --tls-server-name";
    ASSERT_FALSE(admin_san.empty()) << "the router's manifest sets no --admin-san";
    ASSERT_FALSE(FlagValue(router, "--tls-client-ca").empty()) << "no mutual TLS";
    absl::StatusOr<TestCa> ca = TestCa::Create(secrets_dir_, "ca");
    ASSERT_TRUE(ca.ok()) << ca.status();
    const std::string sans = server_name_ == admin_san
                                 ? absl::StrCat("DNS:", server_name_)
                                 : absl::StrCat("DNS:", server_name_, ",DNS:", admin_san);
    absl::StatusOr<TestCertificate> mesh = ca->Issue("mesh", sans);
    ASSERT_TRUE(mesh.ok()) << mesh.status();
    absl::StatusOr<TestCertificate> client = ca->Issue("client", "DNS:client.moemesh.internal");
    ASSERT_TRUE(client.ok()) << client.status();
    const std::string token = secrets_dir_ + "/token";
    {
      std::random_device random;
      std::ofstream out(token);
      for (int i = 0; i < 8; ++i) out << absl::StrCat(absl::Hex(random(), absl::kZeroPad8));
      out << "\n";
    }
    secrets_["moemesh-tls"] = {
        {"tls.crt", mesh->cert}, {"tls.key", mesh->key}, {"ca.crt", ca->cert()}};
    secrets_["moemesh-admin-token"] = {{"token", token}};

    SecurityOptions o;
    o.tls_ca = ca->cert();
    o.tls_server_name = server_name_;
    absl::StatusOr<std::shared_ptr<Security>> s = Security::Create(o);
    ASSERT_TRUE(s.ok()) << s.status();
    no_cert_ = *s;  // TLS, no client certificate
    o.tls_cert = client->cert;
    o.tls_key = client->key;
    s = Security::Create(o);
    ASSERT_TRUE(s.ok()) << s.status();
    client_ = *s;  // a KServe client's certificate: ModelInfer, no control calls
    o.admin_token_file = token;
    s = Security::Create(o);
    ASSERT_TRUE(s.ok()) << s.status();
    admin_ = *s;  // and the admin token
  }

  void TearDown() override {
    std::error_code ec;
    if (!model_dir_.empty()) std::filesystem::remove_all(model_dir_, ec);
    if (!model_dir_.empty()) std::filesystem::remove_all(secrets_dir_, ec);
  }

  std::unique_ptr<Pod> Run(const json& workload, const std::string& name,
                           const std::map<std::string, std::string>& services = {}) {
    return RunPod(workload, name, model_dir_, secrets_, secrets_dir_ + "/volumes", services);
  }

  json objects_;
  std::string model_dir_;
  std::unique_ptr<GeneratedModel> model_;
  std::string secrets_dir_;
  Secrets secrets_;
  std::string server_name_;
  std::shared_ptr<Security> no_cert_, client_, admin_;
};

TEST_F(K8sPodmanTest, TheManifestsRunAndScaleUnderLoad) {
  const json& controller = Workload(objects_, "Deployment", "moemesh-controller");
  const json& router = Workload(objects_, "Deployment", "moemesh-router");
  const json& expert = Workload(objects_, "StatefulSet", "moemesh-expert");
  ASSERT_FALSE(HasFailure());
  MakeSecrets(router);
  ASSERT_FALSE(HasFailure());
  const int routers = router["spec"]["replicas"];
  const int experts = expert["spec"]["replicas"];
  EXPECT_GE(routers, 2);
  EXPECT_EQ(experts, 3);

  std::vector<std::unique_ptr<Pod>> pods;
  auto ctrl = Run(controller, "moemesh-controller-0");
  ASSERT_NE(ctrl, nullptr);
  const std::map<std::string, std::string> services = {
      {"moemesh-controller:7000", ctrl->endpoint("grpc")}};
  std::vector<std::unique_ptr<Pod>> expert_pods;
  for (int i = 0; i < experts; ++i) {
    expert_pods.push_back(Run(expert, absl::StrCat("moemesh-expert-", i), services));
    ASSERT_NE(expert_pods.back(), nullptr);
  }
  std::vector<std::unique_ptr<Pod>> router_pods;
  for (int i = 0; i < routers; ++i) {
    router_pods.push_back(Run(router, absl::StrCat("moemesh-router-", i), services));
    ASSERT_NE(router_pods.back(), nullptr);
  }
  ExpectProbesPass(*ctrl);
  for (const auto& p : expert_pods) ExpectProbesPass(*p);
  for (const auto& p : router_pods) ExpectProbesPass(*p);

  // Mutual TLS on the gRPC ports: a plaintext client, and a TLS client without a
  // certificate, get no answer; one with a certificate of the mesh's CA does.
  for (const Pod* p : {ctrl.get(), router_pods[0].get(), expert_pods[0].get()}) {
    const std::string at = p->endpoint("grpc");
    EXPECT_FALSE(
        CheckHealth(grpc::CreateChannel(at, grpc::InsecureChannelCredentials()), seconds(3)).ok())
        << p->name << ": a plaintext client got an answer";
    EXPECT_FALSE(CheckHealth(no_cert_->Dial(at), seconds(3)).ok())
        << p->name << ": a client without a certificate got an answer";
    EXPECT_EQ(CheckHealth(client_->Dial(at), seconds(10)).value_or(0), 1) << p->name;
  }
  // Control calls need the admin identity: the KServe client's certificate is not enough.
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + seconds(10));
    v1::ControllerState s;
    const grpc::Status refused =
        v1::PlacementController::NewStub(client_->Dial(ctrl->endpoint("grpc")))
            ->GetState(&ctx, v1::GetStateRequest(), &s);
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::PERMISSION_DENIED) << refused.error_message();
  }

  auto stub = v1::PlacementController::NewStub(admin_->Dial(ctrl->endpoint("grpc")));
  auto state = [&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + seconds(10));
    v1::ControllerState s;
    EXPECT_TRUE(stub->GetState(&ctx, v1::GetStateRequest(), &s).ok());
    return s;
  };
  // The experts registered with their advertised (pod) addresses; both routers follow.
  for (int i = 0; i < 100; ++i) {
    const v1::ControllerState s = state();
    int acked = 0;
    for (const auto& r : s.routers()) acked += r.acked_epoch() == s.placement().epoch();
    if (s.services_size() == experts && acked == routers && s.placement().epoch() > 0) break;
    std::this_thread::sleep_for(milliseconds(200));
  }
  {
    const v1::ControllerState s = state();
    std::set<std::string> registered;
    for (const auto& m : s.services()) registered.insert(m.endpoint());
    for (const auto& p : expert_pods) EXPECT_TRUE(registered.count(p->endpoint("grpc"))) << p->name;
  }

  // ModelInfer through each router, every answer checked against MoeLayer.
  LoadDriverOptions lo;
  for (const auto& r : router_pods) lo.routers.push_back(r->endpoint("grpc"));
  lo.clients = 2;
  lo.tokens = 8;
  lo.security = client_;  // TLS with a client certificate: ModelInfer needs no admin
  const TokenSkew uniform = TokenSkew::Uniform(*model_->ckpt, model_->config).value();
  auto driver = LoadDriver::Start(lo, *model_->ckpt, model_->config, &uniform);
  ASSERT_TRUE(driver.ok()) << driver.status();
  std::this_thread::sleep_for(seconds(2));
  ExpectMetrics(*ctrl);
  for (const auto& p : expert_pods) ExpectMetrics(*p);
  for (const auto& p : router_pods) ExpectMetrics(*p);
  EXPECT_GT((*driver)->totals().requests, 0);

  // kubectl scale statefulset moemesh-expert --replicas 4: ordinal 3 starts, registers and
  // takes work in a round (the manifest's --rebalance-interval-s).
  expert_pods.push_back(Run(expert, absl::StrCat("moemesh-expert-", experts), services));
  ASSERT_NE(expert_pods.back(), nullptr);
  Pod& fresh = *expert_pods.back();
  ExpectProbesPass(fresh);
  // The operator's commands, inside the controller's container with its certificate and
  // token as deploy/README.md shows (kubectl exec deploy/moemesh-controller -- moemesh
  // placement ...).
  {
    const std::string cli = absl::StrCat(
        "podman exec ", ctrl->name, " moemesh placement %s --controller ", ctrl->endpoint("grpc"),
        " --tls-ca ", FlagValue(controller, "--tls-ca"), " --tls-cert ",
        FlagValue(controller, "--tls-cert"), " --tls-key ", FlagValue(controller, "--tls-key"),
        " --tls-server-name ", FlagValue(controller, "--tls-server-name"), " --token-file ",
        FlagValue(controller, "--admin-token-file"), " 2>&1");
    auto [show_rc, show] = Shell(absl::StrReplaceAll(cli, {{"%s", "show"}}));
    EXPECT_EQ(show_rc, 0) << show;
    EXPECT_TRUE(absl::StrContains(show, fresh.endpoint("grpc"))) << show;
    auto [reb_rc, reb] = Shell(absl::StrReplaceAll(cli, {{"%s", "rebalance"}}));
    EXPECT_EQ(reb_rc, 0) << reb;
    EXPECT_TRUE(absl::StrContains(reb, "epoch")) << reb;
  }
  bool working = false;
  const double start_tokens = TokensComputed(fresh);
  for (int i = 0; i < 60 && !working; ++i) {
    std::this_thread::sleep_for(milliseconds(500));
    working = TokensComputed(fresh) > std::max(0.0, start_tokens);
  }
  EXPECT_TRUE(working) << fresh.name << " took no work within 30 s";

  // Back to 3: the highest ordinal stops with the manifest's grace period, hands its
  // experts over and exits 0; no request fails.
  EXPECT_EQ(StopPod(fresh), 0) << fresh.name;
  std::this_thread::sleep_for(seconds(1));
  (*driver)->Stop();
  const LoadDriver::Totals t = (*driver)->totals();
  EXPECT_GT(t.requests, 0);
  EXPECT_EQ(t.failed, 0) << t.first_error;
  EXPECT_EQ(t.mismatched, 0);
  std::printf("%lld requests through %d routers, %lld failed, %lld differing from MoeLayer\n",
              static_cast<long long>(t.requests), routers, static_cast<long long>(t.failed),
              static_cast<long long>(t.mismatched));

  for (auto& p : router_pods) EXPECT_EQ(StopPod(*p), 0) << p->name;
  expert_pods.pop_back();
  for (auto& p : expert_pods) EXPECT_EQ(StopPod(*p), 0) << p->name;
  EXPECT_EQ(StopPod(*ctrl), 0) << ctrl->name;
}

}  // namespace
}  // namespace moemesh
