#include "services/rpc/security.h"

#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpcpp/support/client_interceptor.h>
#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/metrics/metrics.h"

namespace moemesh {
namespace {

using grpc::experimental::FileWatcherCertificateProvider;

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(flag, ": cannot read '", path, "'"));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// The file holds at least one PEM block of `kind` ("CERTIFICATE", "PRIVATE KEY": any
// "BEGIN ... PRIVATE KEY" form).
absl::Status CheckPem(const std::string& path, const char* flag, absl::string_view kind) {
  if (path.empty()) return absl::OkStatus();
  absl::StatusOr<std::string> text = ReadFile(path, flag);
  if (!text.ok()) return text.status();
  const bool key = kind == "PRIVATE KEY";
  const size_t begin = text->find("-----BEGIN ");
  const size_t end = begin == std::string::npos ? begin : text->find("-----", begin + 11);
  const std::string label =
      end == std::string::npos ? "" : text->substr(begin + 11, end - begin - 11);
  if (key ? !absl::EndsWith(label, "PRIVATE KEY") : label != kind) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": '", path, "' holds no PEM ", key ? "private key" : "certificate"));
  }
  return absl::OkStatus();
}

const char* CodeName(grpc::StatusCode code) {
  return code == grpc::StatusCode::UNAUTHENTICATED ? "unauthenticated" : "permission_denied";
}

// Adds "authorization: Bearer TOKEN" to every call of a channel.
class BearerInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit BearerInterceptor(TokenFile* token) : token_(token) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->emplace("authorization",
                                                 absl::StrCat("Bearer ", token_->Token()));
    }
    methods->Proceed();
  }

 private:
  TokenFile* token_;
};

class BearerInterceptorFactory final
    : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  // `owner` keeps the token alive as long as the channel.
  BearerInterceptorFactory(std::shared_ptr<const void> owner, TokenFile* token)
      : owner_(std::move(owner)), token_(token) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo*) override {
    return new BearerInterceptor(token_);
  }

 private:
  std::shared_ptr<const void> owner_;
  TokenFile* token_;
};

}  // namespace

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  // Every byte of b is compared (with a's, or with 0 past a's end), whatever differs first.
  unsigned diff = a.size() != b.size() ? 1 : 0;
  for (size_t i = 0; i < b.size(); ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    diff |= x ^ static_cast<unsigned char>(b[i]);
  }
  return diff == 0;
}

absl::StatusOr<std::unique_ptr<TokenFile>> TokenFile::Open(const std::string& path) {
  std::unique_ptr<TokenFile> file(new TokenFile(path));
  MutexLock lock(&file->mu_);
  if (absl::Status s = file->Reload(); !s.ok()) return s;
  if (file->token_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("token file '", path, "' is empty"));
  }
  return file;
}

absl::Status TokenFile::Reload() {
  checked_ = std::chrono::steady_clock::now();
  struct stat st;
  if (stat(path_.c_str(), &st) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read token file '", path_, "'"));
  }
  const int64_t mtime_ns = int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec;
  if (mtime_ns == mtime_ns_ && st.st_size == size_) return absl::OkStatus();
  absl::StatusOr<std::string> text = ReadFile(path_, "token file");
  if (!text.ok()) return text.status();
  const std::string token(absl::StripAsciiWhitespace(*text));
  if (token.empty() && !token_.empty()) return absl::OkStatus();  // mid-rewrite: keep the last
  token_ = token;
  mtime_ns_ = mtime_ns;
  size_ = st.st_size;
  return absl::OkStatus();
}

std::string TokenFile::Token() {
  MutexLock lock(&mu_);
  if (std::chrono::steady_clock::now() - checked_ >= std::chrono::seconds(1)) {
    Reload().IgnoreError();  // an unreadable file keeps the last token
  }
  return token_;
}

absl::StatusOr<std::shared_ptr<Security>> Security::Create(const SecurityOptions& options) {
  if (options.tls_cert.empty() != options.tls_key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (!options.tls_client_ca.empty() && options.tls_cert.empty()) {
    return absl::InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key");
  }
  if (!options.admin_sans.empty() && options.tls_client_ca.empty()) {
    return absl::InvalidArgumentError(
        "--admin-san needs --tls-client-ca (client certificates are not verified without it)");
  }
  if (options.tls_reload.count() < 1) {
    return absl::InvalidArgumentError("--tls-reload-s must be at least 1");
  }
  if (absl::Status s = CheckPem(options.tls_cert, "--tls-cert", "CERTIFICATE"); !s.ok()) return s;
  if (absl::Status s = CheckPem(options.tls_key, "--tls-key", "PRIVATE KEY"); !s.ok()) return s;
  if (absl::Status s = CheckPem(options.tls_ca, "--tls-ca", "CERTIFICATE"); !s.ok()) return s;
  if (absl::Status s = CheckPem(options.tls_client_ca, "--tls-client-ca", "CERTIFICATE"); !s.ok()) {
    return s;
  }
  std::shared_ptr<Security> security(new Security());
  security->options_ = options;
  const unsigned reload = static_cast<unsigned>(options.tls_reload.count());
  if (options.tls_server()) {
    security->server_certs_ = std::make_shared<FileWatcherCertificateProvider>(
        options.tls_key, options.tls_cert, options.tls_client_ca, reload);
  }
  if (options.tls_client()) {
    security->client_certs_ = std::make_shared<FileWatcherCertificateProvider>(
        options.tls_key, options.tls_cert, options.tls_ca, reload);
  }
  const auto open = [](const std::string& path, const char* flag,
                       std::unique_ptr<TokenFile>* out) -> absl::Status {
    if (path.empty()) return absl::OkStatus();
    absl::StatusOr<std::unique_ptr<TokenFile>> file = TokenFile::Open(path);
    if (!file.ok())
      return absl::InvalidArgumentError(absl::StrCat(flag, ": ", file.status().message()));
    *out = *std::move(file);
    return absl::OkStatus();
  };
  if (absl::Status s =
          open(options.admin_token_file, "--admin-token-file", &security->admin_token_);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = open(options.api_token_file, "--api-token-file", &security->api_token_);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = open(options.client_token_file, "--token-file", &security->client_token_);
      !s.ok()) {
    return s;
  }
  return security;
}

std::shared_ptr<Security> Security::Insecure() { return std::shared_ptr<Security>(new Security()); }

bool Security::checks_identity() const {
  return admin_token_ != nullptr || api_token_ != nullptr || !options_.tls_client_ca.empty();
}

std::shared_ptr<grpc::ServerCredentials> Security::ServerCredentials() const {
  if (server_certs_ == nullptr) return grpc::InsecureServerCredentials();
  grpc::experimental::TlsServerCredentialsOptions tls(server_certs_);
  tls.watch_identity_key_cert_pairs();
  if (!options_.tls_client_ca.empty()) {
    tls.watch_root_certs();
    tls.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    tls.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  return grpc::experimental::TlsServerCredentials(tls);
}

std::shared_ptr<grpc::ChannelCredentials> Security::ChannelCredentials() const {
  if (client_certs_ == nullptr) return grpc::InsecureChannelCredentials();
  grpc::experimental::TlsChannelCredentialsOptions tls;
  tls.set_certificate_provider(client_certs_);
  tls.watch_root_certs();
  if (!options_.tls_cert.empty()) tls.watch_identity_key_cert_pairs();
  tls.set_verify_server_certs(true);
  return grpc::experimental::TlsCredentials(tls);
}

std::shared_ptr<grpc::Channel> Security::Dial(const std::string& target,
                                              grpc::ChannelArguments args) const {
  if (!options_.tls_server_name.empty()) {
    args.SetSslTargetNameOverride(options_.tls_server_name);
  }
  TokenFile* token = client_token_ != nullptr ? client_token_.get() : admin_token_.get();
  if (token == nullptr) return grpc::CreateCustomChannel(target, ChannelCredentials(), args);
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> bearer;
  bearer.push_back(std::make_unique<BearerInterceptorFactory>(shared_from_this(), token));
  return grpc::experimental::CreateCustomChannelWithInterceptors(target, ChannelCredentials(), args,
                                                                 std::move(bearer));
}

grpc::Status Security::Refuse(grpc::StatusCode code, const std::string& message) const {
  refusals_.fetch_add(1);
  if (metrics::Family<metrics::Counter>* family = refusal_family_.load()) {
    family->Add({{"code", CodeName(code)}}).Increment();
  }
  return grpc::Status(code, message);
}

grpc::Status Security::Authorize(const grpc::ServerContextBase& ctx, Access access) const {
  if (access == Access::kOpen || !checks_identity()) return grpc::Status::OK;
  if (access == Access::kApi && api_token_ == nullptr) return grpc::Status::OK;
  // A bearer token, when one is sent, decides.
  const auto& md = ctx.client_metadata();
  const auto auth = md.find("authorization");
  if (auth != md.end()) {
    const absl::string_view value(auth->second.data(), auth->second.size());
    if (!absl::StartsWithIgnoreCase(value, "Bearer ")) {
      return Refuse(grpc::StatusCode::UNAUTHENTICATED,
                    "the authorization metadata is not 'Bearer TOKEN'");
    }
    const absl::string_view presented = absl::StripAsciiWhitespace(value.substr(7));
    if (admin_token_ != nullptr && ConstantTimeEquals(admin_token_->Token(), presented)) {
      return grpc::Status::OK;
    }
    if (api_token_ != nullptr && ConstantTimeEquals(api_token_->Token(), presented)) {
      if (access == Access::kApi) return grpc::Status::OK;
      return Refuse(grpc::StatusCode::PERMISSION_DENIED,
                    "the API token does not allow this call: it needs the admin identity");
    }
    return Refuse(grpc::StatusCode::UNAUTHENTICATED, "the bearer token is not valid");
  }
  // Else a client certificate the TLS handshake verified (only with --tls-client-ca).
  std::shared_ptr<const grpc::AuthContext> auth_ctx = ctx.auth_context();
  if (!options_.tls_client_ca.empty() && auth_ctx != nullptr && auth_ctx->IsPeerAuthenticated()) {
    if (options_.admin_sans.empty()) return grpc::Status::OK;
    std::vector<std::string> sans;
    for (const grpc::string_ref& san : auth_ctx->FindPropertyValues(GRPC_X509_SAN_PROPERTY_NAME)) {
      const std::string name(san.data(), san.size());
      for (const std::string& allowed : options_.admin_sans) {
        if (name == allowed) return grpc::Status::OK;
      }
      sans.push_back(name);
    }
    return Refuse(grpc::StatusCode::PERMISSION_DENIED,
                  absl::StrCat("the client certificate's names (",
                               sans.empty() ? "none" : absl::StrJoin(sans, ", "),
                               ") are not allowed this call (--admin-san)"));
  }
  return Refuse(grpc::StatusCode::UNAUTHENTICATED,
                access == Access::kApi
                    ? "this call needs a bearer token (authorization: Bearer TOKEN)"
                    : "this call needs an identity: a client certificate or an admin bearer "
                      "token (authorization: Bearer TOKEN)");
}

absl::Status Security::ExportMetrics(metrics::Registry& registry) {
  absl::StatusOr<metrics::Family<metrics::Counter>*> family = metrics::AddCounter(
      registry, "moemesh_auth_refusals_total",
      "Calls refused for want of an identity (code=unauthenticated) or of the right one "
      "(code=permission_denied).");
  if (!family.ok()) return family.status();
  for (const char* code : {"unauthenticated", "permission_denied"}) {
    (*family)->Add({{"code", code}});
  }
  refusal_family_.store(*family);
  return absl::OkStatus();
}

}  // namespace moemesh
