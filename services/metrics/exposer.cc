#include "services/metrics/exposer.h"

#include <arpa/inet.h>
#include <civetweb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <future>
#include <mutex>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace moemesh::metrics {
namespace {

constexpr char kContentType[] = "text/plain; version=0.0.4; charset=utf-8";

// civetweb reports why mg_start failed only through the log callback, which runs on
// the thread calling mg_start: collect it there.
thread_local std::string start_errors;

int LogMessage(const struct mg_connection*, const char* message) {
  absl::StrAppend(&start_errors, start_errors.empty() ? "" : "; ", message);
  return 1;  // handled: civetweb prints nothing to stderr
}

// Every reply, written with mg_write alone: the handler runs on civetweb's threads, whose
// 100 KB stacks hold the static TLS of every library a service links (OpenBLAS alone
// ~60 KB), and civetweb's own senders put 8 KB buffers on them (mg_printf; and
// mg_send_http_error another): a 404 made with mg_send_http_error overflowed a router's
// stack. `body` goes out only for GET (not HEAD).
int Send(struct mg_connection* connection, int status, absl::string_view content_type,
         absl::string_view body, bool head, absl::string_view extra_headers = "") {
  const char* reason = status == 200   ? "OK"
                       : status == 404 ? "Not Found"
                       : status == 405 ? "Method Not Allowed"
                       : status == 503 ? "Service Unavailable"
                                       : "Error";
  const std::string headers =
      absl::StrCat("HTTP/1.1 ", status, " ", reason, "\r\nContent-Type: ", content_type,
                   "\r\nContent-Length: ", body.size(), "\r\nCache-Control: no-store\r\n",
                   extra_headers, "Connection: close\r\n\r\n");
  mg_write(connection, headers.data(), headers.size());
  if (!head) mg_write(connection, body.data(), body.size());
  return status;  // non-zero: handled here, civetweb serves no files
}

constexpr char kText[] = "text/plain; charset=utf-8";

}  // namespace

int MetricsExposer::HandleRequest(struct mg_connection* connection) {
  const mg_request_info* request = mg_get_request_info(connection);
  auto* self = static_cast<const MetricsExposer*>(request->user_data);
  const absl::string_view path = request->local_uri;
  const bool head = std::strcmp(request->request_method, "HEAD") == 0;
  if (path != "/metrics" && path != "/healthz" && path != "/readyz") {
    return Send(connection, 404, kText, "Not found: /metrics, /healthz and /readyz are served\n",
                head);
  }
  if (!head && std::strcmp(request->request_method, "GET") != 0) {
    return Send(connection, 405, kText, "Method not allowed: use GET\n", false,
                "Allow: GET, HEAD\r\n");
  }
  // The probes: liveness is answering at all; readiness asks the service.
  if (path == "/healthz") return Send(connection, 200, kText, "ok\n", head);
  if (path == "/readyz") {
    const bool ready = self->ready_ == nullptr || self->ready_();
    return Send(connection, ready ? 200 : 503, kText, ready ? "ready\n" : "not ready\n", head);
  }
  // Collected on a thread of its own: civetweb's threads have 100 KB stacks, and the
  // static TLS of the libraries a service links (OpenBLAS alone ~60 KB) lives at the top
  // of every thread's stack, leaving ~24 KB for the collectors (process metrics walk
  // /proc; a lazy symbol lookup saves the vector registers): linking the CUDA runtime
  // took 4 KB more and the scrape overflowed. A scrape a second can afford a thread.
  std::string body = std::async(std::launch::async, [self] {
                       std::string out;
                       for (const Registry* registry : self->registries_)
                         out += registry->Serialize();
                       return out;
                     }).get();
  return Send(connection, 200, kContentType, body, head);
}

absl::StatusOr<std::unique_ptr<MetricsExposer>> MetricsExposer::Create(
    const MetricsExposerOptions& options, std::vector<const Registry*> registries) {
  const size_t colon = options.listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(absl::string_view(options.listen).substr(colon + 1), &port) || port < 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics listen '", options.listen, "' is not HOST:PORT, port in [0, 65535]"));
  }
  if (options.num_threads < 1) {
    return absl::InvalidArgumentError("metrics num_threads must be positive");
  }
  if (registries.empty()) return absl::InvalidArgumentError("no registries to expose");
  for (const Registry* registry : registries) {
    if (registry == nullptr) return absl::InvalidArgumentError("a registry to expose is null");
  }

  static std::once_flag init;
  std::call_once(init, [] { mg_init_library(0); });

  // Not make_unique: the constructor is private.
  std::unique_ptr<MetricsExposer> exposer(new MetricsExposer(std::move(registries), options.ready));
  mg_callbacks callbacks{};
  callbacks.begin_request = &MetricsExposer::HandleRequest;
  callbacks.log_message = &LogMessage;
  const std::string threads = std::to_string(options.num_threads);
  const char* civetweb_options[] = {"listening_ports", options.listen.c_str(), "num_threads",
                                    threads.c_str(), nullptr};
  start_errors.clear();
  exposer->context_ = mg_start(&callbacks, exposer.get(), civetweb_options);
  if (exposer->context_ == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", options.listen, ": ",
                     start_errors.empty() ? "mg_start failed" : start_errors));
  }
  mg_server_port ports[1] = {};
  if (mg_get_server_ports(exposer->context_, 1, ports) < 1) {
    return absl::InternalError(
        absl::StrCat("metrics server on ", options.listen, " reports no listening port"));
  }
  exposer->port_ = ports[0].port;
  // An IPv4 listen address is woken on that address; any other (0.0.0.0, a name, IPv6)
  // on loopback, which a wildcard listener also accepts.
  const std::string host = options.listen.substr(0, colon);
  in_addr probe{};
  exposer->wake_host_ =
      host != "0.0.0.0" && ::inet_pton(AF_INET, host.c_str(), &probe) == 1 ? host : "127.0.0.1";
  return exposer;
}

absl::StatusOr<std::unique_ptr<MetricsExposer>> ServeMetrics(const std::string& listen,
                                                             const Registry& registry,
                                                             std::function<bool()> ready) {
  MetricsExposerOptions options;
  options.listen = listen;
  options.ready = std::move(ready);
  absl::StatusOr<std::unique_ptr<MetricsExposer>> exposer =
      MetricsExposer::Create(options, {&registry});
  if (!exposer.ok()) return exposer.status();
  std::printf("metrics on http://%s:%d/metrics\n", listen.substr(0, listen.rfind(':')).c_str(),
              (*exposer)->port());
  std::fflush(stdout);
  return exposer;
}

MetricsExposer::~MetricsExposer() {
  if (context_ == nullptr) return;
  // civetweb's accept loop notices the stop only when its poll returns, after up to 2 s
  // without connections; connecting to ourselves until mg_stop returns ends it at once.
  std::atomic<bool> stopped{false};
  std::thread waker([&] {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port_));
    if (::inet_pton(AF_INET, wake_host_.c_str(), &addr.sin_addr) != 1) return;
    while (!stopped.load()) {
      const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (fd < 0) return;
      ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
      ::close(fd);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  mg_stop(context_);
  stopped = true;
  waker.join();
}

}  // namespace moemesh::metrics
