// What every service main (`moemesh expert`, `moemesh router`, ...) shares: the process
// set-up, the start-up error report, and serving until a stop signal, then draining.
//
//   int ExpertServiceMain(const std::vector<std::string>& args) {
//     return RunServiceMain("expert", kUsage, args, Run);
//   }
//   absl::Status Run(const std::vector<std::string>& args) { ...parse flags, Create the server...;
//                           ServeUntilStopSignal("expert service", listen, *server); }
#pragma once

#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "services/runtime/serving_settings.h"
#include "services/runtime/signals.h"

namespace moemesh {

// How long a stop signal leaves in-flight calls to finish by default.
inline constexpr std::chrono::seconds kDefaultDrainTime{10};

// Runs a service main: `usage` and the security flags' (kSecurityUsage) on stdout and 0
// when `args` ask for help (--help, -h); otherwise the serving settings
// (services/runtime/serving_settings.h), stop signals blocked in every thread before `run(args)`
// starts any, and a stop when the launcher that started the process dies (StopWithParent). Returns
// 0 when `run` returns OK; else prints "moemesh COMMAND: ERROR" and `usage` on stderr and
// returns 1. `role`: the serving settings' kind of process.
int RunServiceMain(const char* command, const char* usage, const std::vector<std::string>& args,
                   const std::function<absl::Status(const std::vector<std::string>&)>& run,
                   ProcessRole role = ProcessRole::kDataPlane);

// Prints "listening on HOST:PORT" on stdout (HOST from `listen`, PORT the bound `port`):
// the line launchers and tests wait for before they call.
void AnnounceListening(const std::string& listen, int port);

// Announces `server` (anything with port(), Shutdown(deadline) and Wait()), blocks until
// SIGTERM or SIGINT, runs `before_drain` (an expert service hands its experts to others
// first), then stops the server: health NOT_SERVING, no new calls, calls in flight given
// `drain` to finish.
template <typename Server>
void ServeUntilStopSignal(const char* name, const std::string& listen, Server& server,
                          const std::function<void()>& before_drain = nullptr,
                          std::chrono::seconds drain = kDefaultDrainTime) {
  AnnounceListening(listen, server.port());
  const int sig = WaitForStopSignal();
  std::fprintf(stderr, "%s: signal %d, draining\n", name, sig);
  if (before_drain) before_drain();
  server.Shutdown(std::chrono::system_clock::now() + drain);
  server.Wait();
}

}  // namespace moemesh
