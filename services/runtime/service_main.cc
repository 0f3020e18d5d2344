#include "services/runtime/service_main.h"

#include <string>

#include "services/runtime/flags.h"
#include "services/runtime/serving_settings.h"

namespace moemesh {

int RunServiceMain(const char* command, const char* usage, const std::vector<std::string>& args,
                   const std::function<absl::Status(const std::vector<std::string>&)>& run,
                   ProcessRole role) {
  if (HelpRequested(args)) {
    std::fputs(usage, stdout);
    std::fputs(kSecurityUsage, stdout);
    return 0;
  }
  ConfigureForServing(role);
  // Before any thread starts, so that every thread inherits the mask and the signal reaches
  // only WaitForStopSignal: no work happens inside a signal handler.
  BlockStopSignals();
  StopWithParent();
  const absl::Status s = run(args);
  if (!s.ok()) {
    std::fprintf(stderr, "moemesh %s: %s\n%s%s", command, std::string(s.ToString()).c_str(), usage,
                 kSecurityUsage);
    return 1;
  }
  return 0;
}

void AnnounceListening(const std::string& listen, int port) {
  const std::string host = listen.substr(0, listen.rfind(':'));
  std::printf("listening on %s:%d\n", host.c_str(), port);
  std::fflush(stdout);
}

}  // namespace moemesh
