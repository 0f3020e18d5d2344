#include "services/metrics/metrics.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <limits>
#include <thread>

#include "services/metrics/exposer.h"

namespace moemesh::metrics {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

template <typename T>
T* Ok(absl::StatusOr<T*> result) {
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? *result : nullptr;
}

const FamilySnapshot* Find(const std::vector<FamilySnapshot>& families, absl::string_view name) {
  for (const FamilySnapshot& family : families) {
    if (family.name == name) return &family;
  }
  return nullptr;
}

TEST(MetricsTest, CounterGaugeHistogramValues) {
  Registry registry;
  Counter& counter = Ok(AddCounter(registry, "events_total", "Events."))->Add();
  counter.Increment();
  counter.Increment(2.5);
  counter.Increment(-1);            // ignored
  counter.Increment(std::nan(""));  // ignored
  EXPECT_EQ(counter.Value(), 3.5);

  Gauge& gauge = Ok(AddGauge(registry, "depth", "Depth."))->Add();
  gauge.Set(10);
  gauge.Increment();
  gauge.Decrement(4);
  EXPECT_EQ(gauge.Value(), 7);

  Histogram& histogram = Ok(AddHistogram(registry, "size_bytes", "Sizes.", {1, 10}))->Add();
  for (double v : {0.5, 1.0, 5.0, 10.0, 11.0}) histogram.Observe(v);
  EXPECT_EQ(histogram.BucketCounts(), (std::vector<uint64_t>{2, 2, 1}));  // le is inclusive
  EXPECT_EQ(histogram.Count(), 5u);
  EXPECT_EQ(histogram.Sum(), 27.5);
}

TEST(MetricsTest, SameLabelsSameObject) {
  Registry registry;
  Family<Counter>* family = Ok(AddCounter(registry, "calls_total", "Calls."));
  Counter& a = family->Add({{"expert", "1"}, {"layer", "2"}});
  Counter& b = family->Add({{"layer", "2"}, {"expert", "1"}});
  Counter& c = family->Add({{"expert", "2"}, {"layer", "2"}});
  EXPECT_EQ(&a, &b);
  EXPECT_NE(&a, &c);
  // Registering the same family again returns it; another type or help is an error.
  EXPECT_EQ(Ok(AddCounter(registry, "calls_total", "Calls.")), family);
  EXPECT_EQ(AddGauge(registry, "calls_total", "Calls.").status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(AddCounter(registry, "calls_total", "Other.").status().code(),
            absl::StatusCode::kAlreadyExists);
}

TEST(MetricsTest, ConcurrentUpdatesAreExact) {
  Registry registry;
  Counter& counter = Ok(AddCounter(registry, "hits_total", "Hits."))->Add();
  Gauge& gauge = Ok(AddGauge(registry, "level", "Level."))->Add();
  Histogram& histogram = Ok(AddHistogram(registry, "value", "Values.", {0.5, 1.5}))->Add();
  constexpr int kThreads = 4;
  constexpr int kPerThread = 100000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kPerThread; ++i) {
        counter.Increment();
        gauge.Increment(2);
        gauge.Decrement();
        histogram.Observe(i % 3);  // 0, 1, 2: one per bucket
      }
    });
  }
  // Scrapes racing with the updates must not break anything.
  for (int i = 0; i < 20; ++i) registry.Serialize();
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(counter.Value(), kThreads * kPerThread);
  EXPECT_EQ(gauge.Value(), kThreads * kPerThread);
  const uint64_t third = kThreads * ((kPerThread + 2) / 3);
  EXPECT_EQ(histogram.BucketCounts()[0], third);
  EXPECT_EQ(histogram.Count(), uint64_t{kThreads} * kPerThread);
  double sum = 0;
  for (int i = 0; i < kPerThread; ++i) sum += i % 3;
  EXPECT_EQ(histogram.Sum(), kThreads * sum);  // integers: exact in any order
}

// A small registry whose exposition is known exactly.
void FillSmallRegistry(Registry& registry) {
  Family<Counter>* requests = Ok(AddCounter(registry, "requests_total", "Requests served."));
  requests->Add({{"method", "post"}}).Increment(1.5);
  requests->Add({{"method", "get"}}).Increment(3);
  Ok(AddGauge(registry, "queue_depth", "Line one\nback\\slash \"quoted\""))->Add().Set(-2);
  Histogram& latency =
      Ok(AddHistogram(registry, "latency_seconds", "Latency.", {0.1, 1}))->Add({{"op", "x"}});
  for (double v : {0.0625, 0.5, 2.0}) latency.Observe(v);
}

TEST(MetricsTest, ExpositionGolden) {
  Registry registry;
  FillSmallRegistry(registry);
  EXPECT_EQ(registry.Serialize(),
            "# HELP latency_seconds Latency.\n"
            "# TYPE latency_seconds histogram\n"
            "latency_seconds_bucket{le=\"0.1\",op=\"x\"} 1\n"
            "latency_seconds_bucket{le=\"1\",op=\"x\"} 2\n"
            "latency_seconds_bucket{le=\"+Inf\",op=\"x\"} 3\n"
            "latency_seconds_sum{op=\"x\"} 2.5625\n"
            "latency_seconds_count{op=\"x\"} 3\n"
            "# HELP queue_depth Line one\\nback\\\\slash \"quoted\"\n"
            "# TYPE queue_depth gauge\n"
            "queue_depth -2\n"
            "# HELP requests_total Requests served.\n"
            "# TYPE requests_total counter\n"
            "requests_total{method=\"get\"} 3\n"
            "requests_total{method=\"post\"} 1.5\n");
}

TEST(MetricsTest, ComputedGaugeFollowsItsSource) {
  Registry registry;
  std::vector<std::pair<std::string, double>> source = {{"b", 2}, {"a", 1}};
  ASSERT_TRUE(AddComputedGauge(registry, "epoch_info", "Computed.", [&](std::vector<Sample>* out) {
                for (const auto& [name, value] : source) out->push_back({"", {{"k", name}}, value});
              }).ok());
  // Sorted by labels, whatever order the callback gives.
  EXPECT_THAT(registry.Serialize(), HasSubstr("epoch_info{k=\"a\"} 1\nepoch_info{k=\"b\"} 2\n"));
  source = {{"c", 3}};  // series that disappear from the source disappear from the output
  const std::string text = registry.Serialize();
  EXPECT_THAT(text, HasSubstr("epoch_info{k=\"c\"} 3\n"));
  EXPECT_THAT(text, Not(HasSubstr("k=\"a\"")));
  EXPECT_EQ(AddComputedGauge(registry, "epoch_info", "Again.", [](std::vector<Sample>*) {}).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(AddComputedGauge(registry, "bad name", "X.", [](std::vector<Sample>*) {}).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(MetricsTest, LabelValueEscaping) {
  Registry registry;
  Ok(AddGauge(registry, "g", "G."))->Add({{"path", "a\"b\\c\nd"}}).Set(1);
  EXPECT_THAT(registry.Serialize(), HasSubstr("g{path=\"a\\\"b\\\\c\\nd\"} 1\n"));
}

TEST(MetricsTest, FormatValue) {
  EXPECT_EQ(FormatValue(0), "0");
  EXPECT_EQ(FormatValue(1000000), "1000000");
  EXPECT_EQ(FormatValue(-3), "-3");
  EXPECT_EQ(FormatValue(0.1), "0.1");
  EXPECT_EQ(FormatValue(1e300), "1e+300");
  EXPECT_EQ(FormatValue(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(FormatValue(-std::numeric_limits<double>::infinity()), "-Inf");
  EXPECT_EQ(FormatValue(std::nan("")), "NaN");
}

TEST(MetricsTest, InvalidNamesRejected) {
  Registry registry;
  for (const char* name : {"", "1abc", "a-b", "a b", "é"}) {
    EXPECT_EQ(AddGauge(registry, name, "h").status().code(), absl::StatusCode::kInvalidArgument)
        << name;
  }
  EXPECT_TRUE(AddGauge(registry, "ns:sub_name", "h").ok());
  EXPECT_EQ(AddCounter(registry, "requests", "no _total").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AddHistogram(registry, "h1", "h", {1, 1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AddHistogram(registry, "h2", "h", {std::nan("")}).status().code(),
            absl::StatusCode::kInvalidArgument);

  Family<Gauge>* gauges = Ok(AddGauge(registry, "ok", "h"));
  for (const char* label : {"", "__reserved", "a:b", "1x", "a-b"}) {
    absl::StatusOr<Gauge*> gauge = gauges->TryAdd({{label, "v"}});
    EXPECT_EQ(gauge.status().code(), absl::StatusCode::kInvalidArgument) << label;
  }
  EXPECT_TRUE(gauges->TryAdd({{"_x", "v"}, {"le", "v"}}).ok());
  Family<Histogram>* histograms = Ok(AddHistogram(registry, "hist", "h", {1}));
  EXPECT_THAT(std::string(histograms->TryAdd({{"le", "1"}}).status().message()),
              HasSubstr("'le' is reserved"));
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(gauges->Add({{"__name__", "x"}}), "starts with '__'");
}

TEST(MetricsTest, ProcessMetrics) {
  Registry registry;
  ASSERT_TRUE(AddProcessMetrics(registry).ok());
  const std::vector<FamilySnapshot> families = registry.Collect();
  for (const char* name : {"process_cpu_seconds_total", "process_resident_memory_bytes",
                           "process_open_fds", "process_start_time_seconds"}) {
    const FamilySnapshot* family = Find(families, name);
    ASSERT_NE(family, nullptr) << name;
    ASSERT_EQ(family->samples.size(), 1u) << name;
    EXPECT_GE(family->samples[0].value, 0) << name;
  }
  EXPECT_GT(Find(families, "process_resident_memory_bytes")->samples[0].value, 1 << 20);
  EXPECT_GE(Find(families, "process_open_fds")->samples[0].value, 3);  // stdin, out, err
  const double start = Find(families, "process_start_time_seconds")->samples[0].value;
  EXPECT_LE(start, static_cast<double>(std::time(nullptr)) + 1);
  EXPECT_GT(start, static_cast<double>(std::time(nullptr)) - 24 * 3600);
  EXPECT_THAT(registry.Serialize(), HasSubstr("moemesh_build_info{version=\"0.1.0\"} 1\n"));
  // A second call finds the same families.
  EXPECT_TRUE(AddProcessMetrics(registry).ok());
}

// Status code, headers and body of a plain HTTP/1.0 request (the server closes when done).
struct HttpReply {
  int status = 0;
  std::string headers;
  std::string body;
};

HttpReply HttpGet(int port, const std::string& path, const std::string& method = "GET") {
  HttpReply reply;
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return reply;
  }
  const std::string request = method + " " + path + " HTTP/1.0\r\nHost: localhost\r\n\r\n";
  EXPECT_EQ(write(fd, request.data(), request.size()), static_cast<ssize_t>(request.size()));
  std::string response;
  char buffer[4096];
  for (ssize_t n; (n = read(fd, buffer, sizeof(buffer))) > 0;) response.append(buffer, n);
  close(fd);
  const size_t end = response.find("\r\n\r\n");
  if (response.rfind("HTTP/1.", 0) != 0 || end == std::string::npos) return reply;
  reply.status = std::atoi(response.c_str() + response.find(' ') + 1);
  reply.headers = response.substr(0, end);
  reply.body = response.substr(end + 4);
  return reply;
}

TEST(MetricsExposerTest, ServesMetrics) {
  Registry registry;
  FillSmallRegistry(registry);
  absl::StatusOr<std::unique_ptr<MetricsExposer>> exposer =
      MetricsExposer::Create({.listen = "127.0.0.1:0"}, {&registry});
  ASSERT_TRUE(exposer.ok()) << exposer.status();
  const int port = (*exposer)->port();
  ASSERT_GT(port, 0);

  const HttpReply reply = HttpGet(port, "/metrics");
  EXPECT_EQ(reply.status, 200);
  EXPECT_THAT(reply.headers,
              HasSubstr("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
  EXPECT_EQ(reply.body, registry.Serialize());
  EXPECT_EQ(HttpGet(port, "/other").status, 404);
  EXPECT_EQ(HttpGet(port, "/metrics/x").status, 404);

  // The port is taken now: a second exposer on it fails and says where.
  absl::StatusOr<std::unique_ptr<MetricsExposer>> second =
      MetricsExposer::Create({.listen = "127.0.0.1:" + std::to_string(port)}, {&registry});
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(second.status().message()), HasSubstr(std::to_string(port)));

  exposer->reset();  // stops the server
  EXPECT_EQ(HttpGet(port, "/metrics").status, 0);
}

// Static TLS lives at the top of every thread's stack, civetweb's 100 KB ones too: a
// service links OpenBLAS (60 KB of it), which leaves its HTTP threads ~30 KB. This test
// binary takes as much, so that every reply below is made on a stack as small as a
// service's (a 404 made with civetweb's mg_send_http_error overflowed it).
thread_local char stack_ballast[60 << 10];

// The probes' endpoints: /healthz always, /readyz following `ready`; open, plain text;
// HEAD answers without a body; /metrics unchanged; other paths still 404, other methods 405.
TEST(MetricsExposerTest, ServesProbes) {
  static_cast<volatile char*>(stack_ballast)[0] = 1;  // kept by compiler and linker
  Registry registry;
  FillSmallRegistry(registry);
  std::atomic<bool> ready{false};
  absl::StatusOr<std::unique_ptr<MetricsExposer>> exposer = MetricsExposer::Create(
      {.listen = "127.0.0.1:0", .ready = [&ready] { return ready.load(); }}, {&registry});
  ASSERT_TRUE(exposer.ok()) << exposer.status();
  const int port = (*exposer)->port();

  HttpReply reply = HttpGet(port, "/healthz");
  EXPECT_EQ(reply.status, 200);
  EXPECT_EQ(reply.body, "ok\n");
  EXPECT_THAT(reply.headers, HasSubstr("Content-Type: text/plain; charset=utf-8\r\n"));
  reply = HttpGet(port, "/readyz");
  EXPECT_EQ(reply.status, 503);
  EXPECT_EQ(reply.body, "not ready\n");
  ready = true;
  reply = HttpGet(port, "/readyz");
  EXPECT_EQ(reply.status, 200);
  EXPECT_EQ(reply.body, "ready\n");
  ready = false;  // and back: asked on every request
  EXPECT_EQ(HttpGet(port, "/readyz").status, 503);
  EXPECT_EQ(HttpGet(port, "/healthz").status, 200);  // live while not ready

  reply = HttpGet(port, "/readyz", "HEAD");
  EXPECT_EQ(reply.status, 503);
  EXPECT_EQ(reply.body, "");
  EXPECT_EQ(HttpGet(port, "/readyz", "POST").status, 405);
  EXPECT_EQ(HttpGet(port, "/metrics").body, registry.Serialize());
  for (const char* path : {"/", "/health", "/healthz/x", "/readyz/", "/ready", "/livez"}) {
    EXPECT_EQ(HttpGet(port, path).status, 404) << path;
  }
}

// Without a ready function /readyz is always 200.
TEST(MetricsExposerTest, ReadyByDefault) {
  Registry registry;
  absl::StatusOr<std::unique_ptr<MetricsExposer>> exposer = ServeMetrics("127.0.0.1:0", registry);
  ASSERT_TRUE(exposer.ok()) << exposer.status();
  const HttpReply reply = HttpGet((*exposer)->port(), "/readyz");
  EXPECT_EQ(reply.status, 200);
  EXPECT_EQ(reply.body, "ready\n");
  EXPECT_EQ(HttpGet((*exposer)->port(), "/healthz").status, 200);
}

TEST(MetricsExposerTest, RejectsBadOptions) {
  Registry registry;
  for (const char* listen : {"", "9464", "host:", "host:70000", "host:-1"}) {
    EXPECT_EQ(MetricsExposer::Create({.listen = listen}, {&registry}).status().code(),
              absl::StatusCode::kInvalidArgument)
        << listen;
  }
  EXPECT_EQ(MetricsExposer::Create({.listen = "127.0.0.1:0"}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Prometheus' own parser and linter accept every metric type we write.
TEST(MetricsTest, PromtoolAcceptsExposition) {
  if (std::system("command -v promtool >/dev/null 2>&1") != 0) {
    FAIL() << "promtool not installed (Debian package prometheus; tools/install_deps.sh installs "
              "it): the exposition must not go unchecked";
  }
  Registry registry;
  FillSmallRegistry(registry);
  ASSERT_TRUE(AddProcessMetrics(registry).ok());
  Ok(AddGauge(registry, "special_values", "Infinities and NaN."))
      ->Add({{"kind", "inf"}})
      .Set(std::numeric_limits<double>::infinity());
  Ok(AddGauge(registry, "special_values", "Infinities and NaN."))
      ->Add({{"kind", "nan"}})
      .Set(std::nan(""));
  const std::filesystem::path dir = std::filesystem::temp_directory_path();
  const std::string input = (dir / ("metrics_test_" + std::to_string(getpid()) + ".prom"));
  const std::string output = input + ".out";
  std::ofstream(input) << registry.Serialize();
  const int rc =
      std::system(("promtool check metrics < " + input + " > " + output + " 2>&1").c_str());
  std::ifstream out_file(output);
  const std::string promtool_output((std::istreambuf_iterator<char>(out_file)),
                                    std::istreambuf_iterator<char>());
  EXPECT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0)
      << "promtool: " << promtool_output << "\ninput:\n"
      << registry.Serialize();
  std::filesystem::remove(input);
  std::filesystem::remove(output);
}

}  // namespace
}  // namespace moemesh::metrics
