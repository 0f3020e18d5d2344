// Minimal `--name value` / `--flag` parsing for the moemesh command line. Flags are
// parsed only in main programs; libraries take option structs.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "services/rpc/security.h"

namespace moemesh {

// True when `args` ask for help (--help or -h): every command then prints its usage on
// stdout and exits 0.
bool HelpRequested(const std::vector<std::string>& args);

class CliArgs {
 public:
  // args: everything after the subcommand. `known` lists accepted flag names (no
  // leading dashes); `switches` those among them that take no value.
  static absl::StatusOr<CliArgs> Parse(const std::vector<std::string>& args,
                                       const std::set<std::string>& known,
                                       const std::set<std::string>& switches = {});

  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  absl::StatusOr<std::string> Required(const std::string& name) const;
  std::string String(const std::string& name, const std::string& fallback) const;
  absl::StatusOr<int64_t> Int(const std::string& name, int64_t fallback) const;
  absl::StatusOr<double> Double(const std::string& name, double fallback) const;
  // --NAME S, a time in seconds (`fallback_s` when absent) within [min_s, max_s], as
  // milliseconds.
  absl::StatusOr<std::chrono::milliseconds> Seconds(const std::string& name, double fallback_s,
                                                    double min_s, double max_s) const;

 private:
  std::map<std::string, std::string> values_;
};

// --max-message-mb N (both services): the limit in bytes, N in [1, 2047].
absl::StatusOr<int> ParseMessageLimit(const CliArgs& args, int default_bytes);

// --transport grpc|ucx and --ucx-spin-us US (both services), US in [0, 1e6].
struct TransportFlags {
  bool ucx = false;
  std::chrono::microseconds ucx_spin{0};
};
absl::StatusOr<TransportFlags> ParseTransportFlags(const CliArgs& args,
                                                   std::chrono::microseconds default_spin);

// The services' --device cpu|cuda and --gpu N[,N...] (default 0): the GPUs' numbers, none
// for the CPU. INVALID_ARGUMENT naming the bad flag (a number out of range or twice).
absl::StatusOr<std::vector<int>> ParseDeviceFlags(const CliArgs& args);

// The security flags of every command that serves or dials gRPC (services/rpc/security.h,
// docs/security.md): --tls-cert --tls-key --tls-ca --tls-client-ca --tls-reload-s
// --tls-server-name --admin-token-file --admin-san --api-token-file. Commands that are
// only KServe clients take --token-file (the token they send) instead of the server-side
// --admin-san and --api-token-file.
extern const char kSecurityUsage[];
extern const char kClientSecurityUsage[];
// `known` with the security flags added (`client`: the client-only set).
std::set<std::string> WithSecurityFlags(std::set<std::string> known, bool client = false);
// The Security those flags describe (plaintext and unchecked without any).
absl::StatusOr<std::shared_ptr<Security>> SecurityFromFlags(const CliArgs& args);

}  // namespace moemesh
