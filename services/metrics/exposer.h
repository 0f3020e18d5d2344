// MetricsExposer: serves GET /metrics in the Prometheus text format 0.0.4 from one or
// more Registries over HTTP (civetweb), for Prometheus to scrape. Every other path is
// 404, every other method 405. The server runs on its own threads; the destructor stops
// it and waits for requests in flight, so the registries must outlive the exposer.
#pragma once

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
  // Threads serving requests: scrapes are rare and cheap.
  int num_threads = 2;
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
  explicit MetricsExposer(std::vector<const Registry*> registries)
      : registries_(std::move(registries)) {}
  static int HandleRequest(mg_connection* connection);

  const std::vector<const Registry*> registries_;
  mg_context* context_ = nullptr;
  int port_ = 0;
  std::string wake_host_ = "127.0.0.1";  // where the destructor connects to stop at once
};

// A service's metrics endpoint: an exposer of `registry` on `listen`, announced on
// stdout as "metrics on http://HOST:PORT/metrics" (the line launchers wait for).
absl::StatusOr<std::unique_ptr<MetricsExposer>> ServeMetrics(const std::string& listen,
                                                             const Registry& registry);

}  // namespace moemesh::metrics
