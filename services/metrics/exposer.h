// MetricsExposer: serves GET /metrics in the Prometheus text format 0.0.4 from one or
// more Registries over HTTP (civetweb), for Prometheus to scrape, and the probes of
// Kubernetes (which cannot speak TLS to the gRPC ports): GET /healthz, 200 "ok" while the
// process serves HTTP at all (liveness), and GET /readyz, 200 "ready" or 503 "not ready"
// from the options' `ready` function (readiness). None of them asks for credentials.
// Every other path is 404, every other method than GET and HEAD 405. The server runs on
// its own threads; the destructor stops it and waits for requests in flight, so the
// registries (and what `ready` reads) must outlive the exposer.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "services/metrics/metrics.h"

struct mg_context;
struct mg_connection;

namespace moemesh::metrics {

struct MetricsExposerOptions {
  // HOST:PORT; port 0 picks a free port (see MetricsExposer::port()).
  std::string listen = "0.0.0.0:9464";
  // Threads serving requests: scrapes and probes are rare and cheap.
  int num_threads = 2;
  // Whether the service takes calls, for GET /readyz; called on the server's threads, so
  // thread-safe and quick (an atomic, a flag under a mutex). Null: always ready.
  std::function<bool()> ready = nullptr;
};

class MetricsExposer {
 public:
  // INVALID_ARGUMENT for a malformed `listen` or no registries; UNAVAILABLE naming the
  // address when it cannot be bound (port busy). The registries (not owned, not null)
  // are serialized one after another; their metric names must not overlap.
  static absl::StatusOr<std::unique_ptr<MetricsExposer>> Create(
      const MetricsExposerOptions& options, std::vector<const Registry*> registries);
  ~MetricsExposer();
  MetricsExposer(const MetricsExposer&) = delete;
  MetricsExposer& operator=(const MetricsExposer&) = delete;

  // The bound port.
  int port() const { return port_; }

 private:
  MetricsExposer(std::vector<const Registry*> registries, std::function<bool()> ready)
      : registries_(std::move(registries)), ready_(std::move(ready)) {}
  static int HandleRequest(mg_connection* connection);

  const std::vector<const Registry*> registries_;
  const std::function<bool()> ready_;
  mg_context* context_ = nullptr;
  int port_ = 0;
  std::string wake_host_ = "127.0.0.1";  // where the destructor connects to stop at once
};

// A service's metrics and probe endpoint: an exposer of `registry` on `listen` whose
// /readyz follows `ready` (null: always ready), announced on stdout as
// "metrics on http://HOST:PORT/metrics" (the line launchers wait for).
absl::StatusOr<std::unique_ptr<MetricsExposer>> ServeMetrics(const std::string& listen,
                                                             const Registry& registry,
                                                             std::function<bool()> ready = nullptr);

}  // namespace moemesh::metrics
