#include "expert_service/expert_main.h"

#include <cstdio>
#include <memory>

#include "expert_service/expert_server.h"
#include "services/signals.h"
#include "services/status_macros.h"
#include "tools/cli_args.h"

namespace moemesh {
namespace {

constexpr char kUsage[] =
    "moemesh expert --model DIR [--listen HOST:PORT] [--service-id ID]\n"
    "  [--experts all|none|0-3,6|1:0-3;2:4,7] [--max-message-mb N] [--threads N]\n";

absl::Status Run(const std::vector<std::string>& argv) {
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(argv, {"model", "listen", "service-id", "experts",
                                                       "max-message-mb", "threads"}));
  ExpertServerOptions o;
  ASSIGN_OR_RETURN(o.model_dir, args.Required("model"));
  o.listen = args.String("listen", "127.0.0.1:0");
  o.service_id = args.String("service-id", "expert");
  o.experts = args.String("experts", "all");
  ASSIGN_OR_RETURN(int64_t mb, args.Int("max-message-mb", 256));
  if (mb <= 0 || mb > 2047) return absl::InvalidArgumentError("--max-message-mb must be in [1, 2047]");
  o.max_message_bytes = static_cast<int>(mb << 20);
  ASSIGN_OR_RETURN(int64_t threads, args.Int("threads", 0));
  if (threads < 0 || threads > 1024) return absl::InvalidArgumentError("--threads must be in [0, 1024]");
  BlockStopSignals();
  std::unique_ptr<ThreadPool> pool;
  if (threads > 0) {
    pool = std::make_unique<ThreadPool>(static_cast<int>(threads));
    o.pool = pool.get();
  }
  ASSIGN_OR_RETURN(auto server, ExpertServer::Create(o));
  const std::string host = o.listen.substr(0, o.listen.rfind(':'));
  std::fprintf(stderr, "expert service %s: %zu experts, %.1f MiB\n", o.service_id.c_str(),
               server->store().List().size(), server->store().weight_bytes() / 1048576.0);
  std::printf("listening on %s:%d\n", host.c_str(), server->port());
  std::fflush(stdout);
  WaitForStopSignal();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(10));
  server->Wait();
  return absl::OkStatus();
}

}  // namespace

int ExpertServiceMain(const std::vector<std::string>& args) {
  const absl::Status s = Run(args);
  if (!s.ok()) {
    std::fprintf(stderr, "moemesh expert: %s\n%s", std::string(s.ToString()).c_str(), kUsage);
    return 1;
  }
  return 0;
}

}  // namespace moemesh
