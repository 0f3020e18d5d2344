// Transport security and authorisation for every gRPC port and every gRPC client of the
// mesh (docs/security.md).
//
// TLS: a server with a certificate and key serves TLS only; with a client CA it requires
// and verifies client certificates (mutual TLS). A client with a CA verifies the server's
// certificate and name; a component that has a certificate of its own presents it as its
// client certificate. Certificates, keys and CAs are re-read from their files when they
// change (Kubernetes rotates mounted Secrets in place): connections made before keep
// working, new handshakes use the new files.
//
// Authorisation: each method is open (health, liveness), needs the API identity
// (ModelInfer) or needs the admin identity (placement, expert load/unload, registration,
// operator calls, the data plane between components). An identity is a bearer token
// ("authorization: Bearer TOKEN", compared in constant time with the token files, which
// are re-read when they change) or a verified client certificate whose subject
// alternative names include one allowed (any certificate of the client CA when no list
// is given). Without any token, allow list or client CA the server checks nothing: the
// local demo's default.
//
// Thread-safe; one per process, shared by its servers and clients.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "services/base/mutex.h"

namespace moemesh {

namespace metrics {
class Registry;
template <typename T>
class Family;
class Counter;
}  // namespace metrics

struct SecurityOptions {
  // PEM files. tls_cert + tls_key: the server certificate (and the client certificate when
  // this component dials); tls_ca: the CA bundle servers are verified with; tls_client_ca:
  // the CA bundle client certificates are verified with (a server then requires one).
  std::string tls_cert;
  std::string tls_key;
  std::string tls_ca;
  std::string tls_client_ca;
  // How often the files above are checked for changes.
  std::chrono::seconds tls_reload{10};
  // A file holding the admin bearer token: servers accept it for every call; clients send
  // it on the calls they make to other components.
  std::string admin_token_file;
  // Subject alternative names (DNS, URI, IP) of client certificates given the admin
  // identity; empty: every certificate the client CA verifies.
  std::vector<std::string> admin_sans;
  // A file holding the token ModelInfer and ModelMetadata then require (the admin token
  // is accepted too); without it they are open.
  std::string api_token_file;
  // The token a client sends instead of the admin token (the KServe clients' API token).
  std::string client_token_file;
  // The name a client expects in the server's certificate instead of the host it dials
  // (e.g. a Service's DNS name when dialing a pod IP).
  std::string tls_server_name;

  bool tls_server() const { return !tls_cert.empty(); }
  bool tls_client() const { return !tls_ca.empty(); }
};

// What a method needs.
enum class Access {
  kOpen,   // health, liveness, readiness
  kApi,    // inference: the API token, or the admin identity
  kAdmin,  // placement, load/unload, registration, operator and data-plane calls
};

// A token file, re-read when its modification time or size changes (checked at most once
// a second). The token is the file's content without surrounding whitespace.
class TokenFile {
 public:
  // INVALID_ARGUMENT when the file cannot be read or holds no token.
  static absl::StatusOr<std::unique_ptr<TokenFile>> Open(const std::string& path);
  // The current token (the last one read when a changed file cannot be read).
  std::string Token() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  explicit TokenFile(std::string path) : path_(std::move(path)) {}
  absl::Status Reload() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string path_;
  Mutex mu_;
  std::string token_ ABSL_GUARDED_BY(mu_);
  int64_t mtime_ns_ ABSL_GUARDED_BY(mu_) = -1;
  int64_t size_ ABSL_GUARDED_BY(mu_) = -1;
  std::chrono::steady_clock::time_point checked_ ABSL_GUARDED_BY(mu_);
};

// a == b, in a time that depends only on b's length.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

class Security : public std::enable_shared_from_this<Security> {
 public:
  // Checks that every named file exists and holds what it should (a PEM certificate or
  // key; a token): INVALID_ARGUMENT naming the file and flag otherwise.
  static absl::StatusOr<std::shared_ptr<Security>> Create(const SecurityOptions& options);
  // Plaintext, no checks: tests and the local demo.
  static std::shared_ptr<Security> Insecure();

  const SecurityOptions& options() const { return options_; }
  // Whether any identity is required (a token, an allow list or a client CA).
  bool checks_identity() const;

  std::shared_ptr<grpc::ServerCredentials> ServerCredentials() const;
  std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials() const;
  // A channel to `target` with this component's credentials: TLS when a CA is given, and
  // the bearer token (client token, else admin token) added to every call made on it.
  std::shared_ptr<grpc::Channel> Dial(const std::string& target,
                                      grpc::ChannelArguments args = {}) const;

  // OK when the caller of `ctx` may make a call needing `access`; UNAUTHENTICATED when it
  // brings no identity or an invalid token, PERMISSION_DENIED when its identity is not
  // enough. Messages name what is missing, never a secret. Refusals are counted
  // (moemesh_auth_refusals_total{code}) once ExportMetrics was called.
  grpc::Status Authorize(const grpc::ServerContextBase& ctx, Access access) const;

  // Registers moemesh_auth_refusals_total in `registry` (which must outlive this).
  absl::Status ExportMetrics(metrics::Registry& registry);
  // Refusals so far (for tests and logs).
  int64_t refusals() const { return refusals_.load(); }

 private:
  Security() = default;
  grpc::Status Refuse(grpc::StatusCode code, const std::string& message) const;

  SecurityOptions options_;
  std::shared_ptr<grpc::experimental::CertificateProviderInterface> server_certs_;
  std::shared_ptr<grpc::experimental::CertificateProviderInterface> client_certs_;
  std::unique_ptr<TokenFile> admin_token_;
  std::unique_ptr<TokenFile> api_token_;
  std::unique_ptr<TokenFile> client_token_;
  std::atomic<metrics::Family<metrics::Counter>*> refusal_family_{nullptr};
  mutable std::atomic<int64_t> refusals_{0};
};

}  // namespace moemesh
