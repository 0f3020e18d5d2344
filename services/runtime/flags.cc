#include "services/runtime/flags.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "services/base/status_macros.h"

namespace moemesh {

bool HelpRequested(const std::vector<std::string>& args) {
  for (const std::string& a : args) {
    if (a == "--help" || a == "-h") return true;
  }
  return false;
}

absl::StatusOr<CliArgs> CliArgs::Parse(const std::vector<std::string>& args,
                                       const std::set<std::string>& known,
                                       const std::set<std::string>& switches) {
  CliArgs out;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", a, "'"));
    }
    std::string name = a.substr(2), value;
    const size_t eq = name.find('=');
    const bool inline_value = eq != std::string::npos;
    if (inline_value) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (!known.count(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag --", name, "; known: --", absl::StrJoin(known, ", --")));
    }
    if (switches.count(name)) {
      value = inline_value ? value : "true";
    } else if (!inline_value) {
      if (i + 1 >= args.size()) {
        return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value"));
      }
      value = args[++i];
    }
    out.values_[name] = value;
  }
  return out;
}

absl::StatusOr<std::string> CliArgs::Required(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) return absl::InvalidArgumentError(absl::StrCat("missing --", name));
  return it->second;
}

std::string CliArgs::String(const std::string& name, const std::string& fallback) const {
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

absl::StatusOr<int64_t> CliArgs::Int(const std::string& name, int64_t fallback) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  int64_t v;
  if (!absl::SimpleAtoi(it->second, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " wants an integer, got '", it->second, "'"));
  }
  return v;
}

absl::StatusOr<double> CliArgs::Double(const std::string& name, double fallback) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  double v;
  if (!absl::SimpleAtod(it->second, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " wants a number, got '", it->second, "'"));
  }
  return v;
}

absl::StatusOr<std::chrono::milliseconds> CliArgs::Seconds(const std::string& name,
                                                           double fallback_s, double min_s,
                                                           double max_s) const {
  ASSIGN_OR_RETURN(const double s, Double(name, fallback_s));
  if (!(s >= min_s && s <= max_s)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be in [", min_s, ", ", max_s, "]"));
  }
  return std::chrono::milliseconds(static_cast<int64_t>(s * 1000));
}

absl::StatusOr<int> ParseMessageLimit(const CliArgs& args, int default_bytes) {
  ASSIGN_OR_RETURN(const int64_t mb, args.Int("max-message-mb", default_bytes >> 20));
  if (mb <= 0 || mb > 2047)
    return absl::InvalidArgumentError("--max-message-mb must be in [1, 2047]");
  return static_cast<int>(mb << 20);
}

absl::StatusOr<TransportFlags> ParseTransportFlags(const CliArgs& args,
                                                   std::chrono::microseconds default_spin) {
  TransportFlags flags;
  const std::string transport = args.String("transport", "grpc");
  if (transport != "grpc" && transport != "ucx") {
    return absl::InvalidArgumentError("--transport must be grpc or ucx");
  }
  flags.ucx = transport == "ucx";
  ASSIGN_OR_RETURN(const int64_t spin_us, args.Int("ucx-spin-us", default_spin.count()));
  if (spin_us < 0 || spin_us > 1000000) {
    return absl::InvalidArgumentError("--ucx-spin-us must be in [0, 1000000]");
  }
  flags.ucx_spin = std::chrono::microseconds(spin_us);
  return flags;
}

absl::StatusOr<std::vector<int>> ParseDeviceFlags(const CliArgs& args) {
  const std::string device = args.String("device", "cpu");
  if (device != "cpu" && device != "cuda")
    return absl::InvalidArgumentError("--device must be cpu or cuda");
  std::vector<int> gpus;
  for (absl::string_view s : absl::StrSplit(args.String("gpu", "0"), ',')) {
    int gpu;
    if (!absl::SimpleAtoi(s, &gpu) || gpu < 0 || gpu > 1023) {
      return absl::InvalidArgumentError(
          absl::StrCat("--gpu wants GPU numbers in [0, 1023], comma-separated; got '", s, "'"));
    }
    if (std::find(gpus.begin(), gpus.end(), gpu) != gpus.end()) {
      return absl::InvalidArgumentError(absl::StrCat("--gpu names GPU ", gpu, " twice"));
    }
    gpus.push_back(gpu);
  }
  if (device == "cpu") gpus.clear();
  return gpus;
}

}  // namespace moemesh

namespace moemesh {

const char kSecurityUsage[] =
    "  security (docs/security.md; plaintext and unchecked without these):\n"
    "  --tls-cert FILE --tls-key FILE: serve TLS with this certificate (also presented as the\n"
    "    client certificate when dialing other components)\n"
    "  --tls-ca FILE: dial other components over TLS, verifying them with this CA bundle\n"
    "  --tls-client-ca FILE: require client certificates verified with this CA (mutual TLS)\n"
    "  --tls-reload-s S: how often the files above are re-read when changed (default 10)\n"
    "  --tls-server-name NAME: the name expected in the certificates of the servers dialed\n"
    "  --admin-token-file FILE: the admin bearer token, required by control calls (with\n"
    "    --admin-san / client certificates as the alternative) and sent on calls made\n"
    "  --admin-san NAME[,NAME...]: client certificate names given the admin identity\n"
    "  --api-token-file FILE: the bearer token ModelInfer and ModelMetadata require\n";

const char kClientSecurityUsage[] =
    "  security (docs/security.md):\n"
    "  --tls-ca FILE: dial over TLS, verifying the server with this CA bundle\n"
    "  --tls-cert FILE --tls-key FILE: the client certificate (mutual TLS)\n"
    "  --tls-server-name NAME: the name expected in the server's certificate\n"
    "  --token-file FILE: the bearer token sent (the router's API or admin token)\n";

std::set<std::string> WithSecurityFlags(std::set<std::string> known, bool client) {
  for (const char* name : {"tls-cert", "tls-key", "tls-ca", "tls-server-name"}) known.insert(name);
  if (client) {
    known.insert("token-file");
  } else {
    for (const char* name :
         {"tls-client-ca", "tls-reload-s", "admin-token-file", "admin-san", "api-token-file"}) {
      known.insert(name);
    }
  }
  return known;
}

absl::StatusOr<std::shared_ptr<Security>> SecurityFromFlags(const CliArgs& args) {
  SecurityOptions o;
  o.tls_cert = args.String("tls-cert", "");
  o.tls_key = args.String("tls-key", "");
  o.tls_ca = args.String("tls-ca", "");
  o.tls_client_ca = args.String("tls-client-ca", "");
  o.tls_server_name = args.String("tls-server-name", "");
  ASSIGN_OR_RETURN(const int64_t reload_s, args.Int("tls-reload-s", 10));
  if (reload_s < 1 || reload_s > 86400) {
    return absl::InvalidArgumentError("--tls-reload-s must be in [1, 86400]");
  }
  o.tls_reload = std::chrono::seconds(reload_s);
  o.admin_token_file = args.String("admin-token-file", "");
  for (absl::string_view san :
       absl::StrSplit(args.String("admin-san", ""), ',', absl::SkipWhitespace())) {
    o.admin_sans.emplace_back(san);
  }
  o.api_token_file = args.String("api-token-file", "");
  o.client_token_file = args.String("token-file", "");
  return Security::Create(o);
}

}  // namespace moemesh
