#include "services/metrics/metrics.h"

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>
#include <type_traits>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "services/base/mutex.h"

#ifndef MOEMESH_VERSION
#define MOEMESH_VERSION "0.1.0"
#endif

namespace moemesh::metrics {
namespace {

bool IsMetricNameChar(char c, bool first) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
         (!first && c >= '0' && c <= '9');
}

absl::Status ValidateMetricName(absl::string_view name) {
  bool ok = !name.empty();
  for (size_t i = 0; ok && i < name.size(); ++i) ok = IsMetricNameChar(name[i], i == 0);
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat("metric name '", name, "' is not [a-zA-Z_:][a-zA-Z0-9_:]*"));
  }
  return absl::OkStatus();
}

absl::Status ValidateLabelName(absl::string_view name, MetricType type) {
  bool ok = !name.empty();
  // ':' is allowed in metric names only (it is reserved for recording rules there).
  for (size_t i = 0; ok && i < name.size(); ++i) {
    ok = name[i] != ':' && IsMetricNameChar(name[i], i == 0);
  }
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat("label name '", name, "' is not [a-zA-Z_][a-zA-Z0-9_]*"));
  }
  if (absl::StartsWith(name, "__")) {
    return absl::InvalidArgumentError(
        absl::StrCat("label name '", name, "' starts with '__' (reserved for Prometheus)"));
  }
  if (type == MetricType::kHistogram && name == "le") {
    return absl::InvalidArgumentError("label name 'le' is reserved for histogram buckets");
  }
  return absl::OkStatus();
}

const char* TypeName(MetricType type) {
  switch (type) {
    case MetricType::kCounter:
      return "counter";
    case MetricType::kGauge:
      return "gauge";
    case MetricType::kHistogram:
      return "histogram";
  }
  return "untyped";
}

// HELP text escapes backslash and newline; label values also the double quote.
void AppendEscaped(absl::string_view text, bool quote, std::string* out) {
  for (char c : text) {
    if (c == '\\') {
      out->append("\\\\");
    } else if (c == '\n') {
      out->append("\\n");
    } else if (quote && c == '"') {
      out->append("\\\"");
    } else {
      out->push_back(c);
    }
  }
}

template <typename T>
constexpr MetricType TypeOf() {
  if constexpr (std::is_same_v<T, Counter>) return MetricType::kCounter;
  if constexpr (std::is_same_v<T, Gauge>) return MetricType::kGauge;
  return MetricType::kHistogram;
}

}  // namespace

std::string FormatValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  // Integers below 2^53 are exact in a double: print them as integers, so a count of a
  // million reads 1000000, not the shortest form 1e+06.
  if (value == std::trunc(value) && std::fabs(value) < 9007199254740992.0) {
    return std::to_string(static_cast<int64_t>(value));
  }
  char buffer[32];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  return std::string(buffer, result.ptr);
}

void Counter::Increment(double value) {
  if (!(value >= 0)) return;  // also rejects NaN
  value_.fetch_add(value, std::memory_order_relaxed);
}

void Counter::AppendSamples(const Labels& labels, std::vector<Sample>* out) const {
  out->push_back({"", labels, Value()});
}

void Gauge::AppendSamples(const Labels& labels, std::vector<Sample>* out) const {
  out->push_back({"", labels, Value()});
}

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)),
      buckets_(std::make_unique<std::atomic<uint64_t>[]>(bounds_.size() + 1)) {}

void Histogram::Observe(double value) {
  // NaN goes to +Inf: it is ≤ no bound, and dropping it would hide it from _count.
  const size_t bucket =
      std::isnan(value)
          ? bounds_.size()
          : static_cast<size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), value) -
                                bounds_.begin());
  buckets_[bucket].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
}

std::vector<uint64_t> Histogram::BucketCounts() const {
  std::vector<uint64_t> counts(bounds_.size() + 1);
  for (size_t i = 0; i < counts.size(); ++i) {
    counts[i] = buckets_[i].load(std::memory_order_relaxed);
  }
  return counts;
}

uint64_t Histogram::Count() const {
  uint64_t count = 0;
  for (uint64_t c : BucketCounts()) count += c;
  return count;
}

void Histogram::AppendSamples(const Labels& labels, std::vector<Sample>* out) const {
  const std::vector<uint64_t> counts = BucketCounts();
  uint64_t cumulative = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    cumulative += counts[i];
    Labels with_le = labels;
    with_le["le"] = i < bounds_.size() ? FormatValue(bounds_[i]) : "+Inf";
    out->push_back({"_bucket", std::move(with_le), static_cast<double>(cumulative)});
  }
  out->push_back({"_sum", labels, Sum()});
  out->push_back({"_count", labels, static_cast<double>(cumulative)});
}

template <typename T>
Family<T>::Family(std::string name, std::string help, std::vector<double> bounds)
    : FamilyBase(std::move(name), std::move(help), TypeOf<T>()), bounds_(std::move(bounds)) {}

template <typename T>
absl::StatusOr<T*> Family<T>::TryAdd(const Labels& labels) {
  for (const auto& [label, value] : labels) {
    if (absl::Status status = ValidateLabelName(label, type()); !status.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(name(), ": ", status.message()));
    }
  }
  MutexLock lock(&mu_);
  std::unique_ptr<T>& metric = metrics_[labels];
  if (metric == nullptr) {
    if constexpr (std::is_same_v<T, Histogram>) {
      metric = std::make_unique<T>(bounds_);
    } else {
      metric = std::make_unique<T>();
    }
  }
  return metric.get();
}

template <typename T>
T& Family<T>::Add(const Labels& labels) {
  absl::StatusOr<T*> metric = TryAdd(labels);
  if (!metric.ok()) {
    std::fprintf(stderr, "moemesh::metrics: %s\n", metric.status().ToString().c_str());
    std::abort();
  }
  return **metric;
}

template <typename T>
FamilySnapshot Family<T>::Collect() const {
  FamilySnapshot snapshot{name(), help(), type(), {}};
  MutexLock lock(&mu_);
  for (const auto& [labels, metric] : metrics_) metric->AppendSamples(labels, &snapshot.samples);
  return snapshot;
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

template <typename T>
absl::StatusOr<Family<T>*> Registry::AddFamily(absl::string_view name, absl::string_view help,
                                               std::vector<double> bounds) {
  if (absl::Status status = ValidateMetricName(name); !status.ok()) return status;
  if (TypeOf<T>() == MetricType::kCounter && !absl::EndsWith(name, "_total")) {
    return absl::InvalidArgumentError(
        absl::StrCat("counter name '", name, "' does not end in _total"));
  }
  for (size_t i = 0; i < bounds.size(); ++i) {
    if (!std::isfinite(bounds[i]) || (i > 0 && bounds[i] <= bounds[i - 1])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "histogram '", name, "': bucket bounds must be finite and strictly increasing (bound ", i,
          " is ", FormatValue(bounds[i]), ")"));
    }
  }
  MutexLock lock(&mu_);
  std::unique_ptr<FamilyBase>& family = families_[std::string(name)];
  if (family == nullptr) {
    family = std::make_unique<Family<T>>(std::string(name), std::string(help), std::move(bounds));
    return static_cast<Family<T>*>(family.get());
  }
  auto* existing = dynamic_cast<Family<T>*>(family.get());
  if (existing == nullptr || existing->help() != help || existing->bounds() != bounds) {
    return absl::AlreadyExistsError(absl::StrCat("metric '", name, "' is registered already as a ",
                                                 TypeName(family->type()),
                                                 " with other help or buckets"));
  }
  return existing;
}

void Registry::AddCollectCallback(std::function<void()> callback) {
  MutexLock lock(&mu_);
  callbacks_.push_back(std::move(callback));
}

std::vector<FamilySnapshot> Registry::Collect() const {
  std::vector<std::function<void()>> callbacks;
  {
    MutexLock lock(&mu_);
    callbacks = callbacks_;
  }
  // Outside the lock: a callback may itself add label sets or families.
  for (const auto& callback : callbacks) callback();
  std::vector<FamilySnapshot> snapshots;
  MutexLock lock(&mu_);
  snapshots.reserve(families_.size());
  for (const auto& [name, family] : families_) snapshots.push_back(family->Collect());
  return snapshots;
}

std::string Registry::Serialize() const { return SerializeText(Collect()); }

std::string SerializeText(const std::vector<FamilySnapshot>& families) {
  std::string out;
  for (const FamilySnapshot& family : families) {
    absl::StrAppend(&out, "# HELP ", family.name, " ");
    AppendEscaped(family.help, /*quote=*/false, &out);
    absl::StrAppend(&out, "\n# TYPE ", family.name, " ", TypeName(family.type), "\n");
    for (const Sample& sample : family.samples) {
      absl::StrAppend(&out, family.name, sample.suffix);
      if (!sample.labels.empty()) {
        out.push_back('{');
        const char* separator = "";
        for (const auto& [label, value] : sample.labels) {
          absl::StrAppend(&out, separator, label, "=\"");
          AppendEscaped(value, /*quote=*/true, &out);
          out.push_back('"');
          separator = ",";
        }
        out.push_back('}');
      }
      absl::StrAppend(&out, " ", FormatValue(sample.value), "\n");
    }
  }
  return out;
}

absl::StatusOr<Family<Counter>*> AddCounter(Registry& registry, absl::string_view name,
                                            absl::string_view help) {
  return registry.AddFamily<Counter>(name, help);
}

absl::StatusOr<Family<Gauge>*> AddGauge(Registry& registry, absl::string_view name,
                                        absl::string_view help) {
  return registry.AddFamily<Gauge>(name, help);
}

absl::StatusOr<Family<Histogram>*> AddHistogram(Registry& registry, absl::string_view name,
                                                absl::string_view help,
                                                std::vector<double> bounds) {
  return registry.AddFamily<Histogram>(name, help, std::move(bounds));
}

std::vector<double> LatencyBuckets() {
  return {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
          0.05,    0.1,    0.25,    0.5,    1,     2.5,    5,     10,   30};
}

StatusCodeCounters::StatusCodeCounters(Family<Counter>& family) {
  for (int code = 0; code <= static_cast<int>(absl::StatusCode::kUnauthenticated); ++code) {
    counters_.push_back(
        &family.Add({{"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(code))}}));
  }
}

void StatusCodeCounters::Increment(absl::StatusCode code) {
  const size_t i = static_cast<size_t>(code);
  if (i < counters_.size()) counters_[i]->Increment();
}

namespace {

class ComputedGaugeFamily final : public FamilyBase {
 public:
  ComputedGaugeFamily(std::string name, std::string help,
                      std::function<void(std::vector<Sample>*)> samples)
      : FamilyBase(std::move(name), std::move(help), MetricType::kGauge),
        samples_(std::move(samples)) {}
  FamilySnapshot Collect() const override {
    FamilySnapshot snapshot{name(), help(), type(), {}};
    samples_(&snapshot.samples);
    for (Sample& s : snapshot.samples) s.suffix.clear();
    std::sort(snapshot.samples.begin(), snapshot.samples.end(),
              [](const Sample& a, const Sample& b) { return a.labels < b.labels; });
    return snapshot;
  }

 private:
  const std::function<void(std::vector<Sample>*)> samples_;
};

}  // namespace

absl::Status AddComputedGauge(Registry& registry, absl::string_view name, absl::string_view help,
                              std::function<void(std::vector<Sample>*)> samples) {
  if (absl::Status status = ValidateMetricName(name); !status.ok()) return status;
  MutexLock lock(&registry.mu_);
  std::unique_ptr<FamilyBase>& family = registry.families_[std::string(name)];
  if (family != nullptr) {
    return absl::AlreadyExistsError(absl::StrCat("metric '", name, "' is registered already"));
  }
  family = std::make_unique<ComputedGaugeFamily>(std::string(name), std::string(help),
                                                 std::move(samples));
  return absl::OkStatus();
}

namespace {

// The fields of /proc/self/stat after the command name, which may hold spaces and ')':
// fields[0] is field 3 (state) of proc(5), so field N is fields[N - 3].
std::vector<std::string> ReadProcSelfStat() {
  std::ifstream file("/proc/self/stat");
  const std::string stat((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return {};
  std::istringstream rest(stat.substr(paren + 1));
  return {std::istream_iterator<std::string>(rest), std::istream_iterator<std::string>()};
}

double StatField(const std::vector<std::string>& fields, size_t n) {
  return n - 3 < fields.size() ? std::strtod(fields[n - 3].c_str(), nullptr) : 0;
}

double BootTimeSeconds() {
  std::ifstream file("/proc/stat");
  std::string key;
  double value = 0;
  while (file >> key) {
    if (key == "btime" && file >> value) return value;
    file.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
  }
  return 0;
}

}  // namespace

absl::Status AddProcessMetrics(Registry& registry) {
  auto cpu = AddCounter(registry, "process_cpu_seconds_total",
                        "Total user and system CPU time spent in seconds.");
  auto rss = AddGauge(registry, "process_resident_memory_bytes", "Resident memory size in bytes.");
  auto fds = AddGauge(registry, "process_open_fds", "Number of open file descriptors.");
  auto start = AddGauge(registry, "process_start_time_seconds",
                        "Start time of the process since unix epoch in seconds.");
  auto build = AddGauge(registry, "moemesh_build_info",
                        "MoE Mesh build; the value is always 1, the version is the label.");
  for (const absl::Status& status :
       {cpu.status(), rss.status(), fds.status(), start.status(), build.status()}) {
    if (!status.ok()) return status;
  }
  (*build)->Add({{"version", MOEMESH_VERSION}}).Set(1);

  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  (*start)->Add().Set(BootTimeSeconds() + StatField(ReadProcSelfStat(), 22) / ticks);

  Counter* cpu_seconds = &(*cpu)->Add();
  Gauge* rss_bytes = &(*rss)->Add();
  Gauge* open_fds = &(*fds)->Add();
  registry.AddCollectCallback([=] {
    // Counters only go up, so the CPU time is applied as an increment; the lock keeps
    // two concurrent scrapes from both adding the same delta.
    static Mutex mu;
    const std::vector<std::string> stat = ReadProcSelfStat();
    {
      MutexLock lock(&mu);
      const double seconds = (StatField(stat, 14) + StatField(stat, 15)) / ticks;
      cpu_seconds->Increment(seconds - cpu_seconds->Value());
    }
    rss_bytes->Set(StatField(stat, 24) * static_cast<double>(sysconf(_SC_PAGESIZE)));
    std::error_code error;
    double count = 0;
    for (std::filesystem::directory_iterator it("/proc/self/fd", error), end; !error && it != end;
         it.increment(error)) {
      ++count;
    }
    open_fds->Set(count - 1);  // less the descriptor the listing itself holds open
  });
  return absl::OkStatus();
}

}  // namespace moemesh::metrics
