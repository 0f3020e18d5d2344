// Prometheus metrics: counters, gauges and histograms in a Registry that serializes to
// the text exposition format 0.0.4. The design follows prometheus-cpp (Registry →
// Family<T> → T per label set), trimmed to what the services need.
//
// Thread safety: everything here may be called from any thread. The hot path
// (Counter::Increment, Gauge::Set/Increment, Histogram::Observe) is lock-free: atomic
// doubles updated by compare-exchange (std::atomic<double>::fetch_add) and atomic bucket
// counts. Creating families and label sets takes a mutex; do it once at startup and keep
// the returned reference.
//
// Errors: a bad metric name, help or bucket list is an INVALID_ARGUMENT from the Add*
// helpers; a name already registered with another type, help or buckets is
// ALREADY_EXISTS (the same registration twice returns the existing family). Label names
// are checked by Family::TryAdd; Family::Add treats an invalid one as a programming
// error (label names are literals in code) and aborts naming it.
//
// Naming: the caller gives the full exposed name. Counter names must end in `_total`
// (enforced: Prometheus and OpenMetrics tooling expect it).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "services/base/mutex.h"

namespace moemesh::metrics {

// Label name → value. Sorted, so samples come out in a deterministic order.
using Labels = std::map<std::string, std::string>;

enum class MetricType { kCounter, kGauge, kHistogram };

// One line of the exposition: `<family name><suffix>{labels} value`.
struct Sample {
  std::string suffix;  // "", or "_bucket" / "_sum" / "_count" for histograms
  Labels labels;
  double value = 0;
};

struct FamilySnapshot {
  std::string name;
  std::string help;
  MetricType type = MetricType::kGauge;
  std::vector<Sample> samples;
};

// Monotonic. Negative and NaN increments are ignored (a counter that goes down reads as
// a process restart to Prometheus' rate()).
class Counter {
 public:
  void Increment(double value = 1);
  double Value() const { return value_.load(std::memory_order_relaxed); }
  void AppendSamples(const Labels& labels, std::vector<Sample>* out) const;

 private:
  std::atomic<double> value_{0};
};

class Gauge {
 public:
  void Set(double value) { value_.store(value, std::memory_order_relaxed); }
  void Increment(double value = 1) { value_.fetch_add(value, std::memory_order_relaxed); }
  void Decrement(double value = 1) { value_.fetch_sub(value, std::memory_order_relaxed); }
  double Value() const { return value_.load(std::memory_order_relaxed); }
  void AppendSamples(const Labels& labels, std::vector<Sample>* out) const;

 private:
  std::atomic<double> value_{0};
};

// Fixed upper bounds given at creation (strictly increasing, finite; +Inf is implicit).
// An observation lands in the first bucket whose bound is ≥ it, as Prometheus' `le`.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void Observe(double value);
  // Per-bucket (not cumulative) counts, the last one for +Inf.
  std::vector<uint64_t> BucketCounts() const;
  uint64_t Count() const;
  double Sum() const { return sum_.load(std::memory_order_relaxed); }
  const std::vector<double>& bounds() const { return bounds_; }
  void AppendSamples(const Labels& labels, std::vector<Sample>* out) const;

 private:
  const std::vector<double> bounds_;
  // No separate count: _count is the sum of the buckets, so a scrape racing with
  // Observe still shows _count equal to the +Inf bucket, as Prometheus requires.
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // bounds_.size() + 1
  std::atomic<double> sum_{0};
};

// A metric name with its help, type and one T per label set.
class FamilyBase {
 public:
  FamilyBase(std::string name, std::string help, MetricType type)
      : name_(std::move(name)), help_(std::move(help)), type_(type) {}
  virtual ~FamilyBase() = default;
  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  MetricType type() const { return type_; }
  virtual FamilySnapshot Collect() const = 0;

 private:
  const std::string name_;
  const std::string help_;
  const MetricType type_;
};

template <typename T>
class Family final : public FamilyBase {
 public:
  // `bounds` is used by Family<Histogram> only.
  Family(std::string name, std::string help, std::vector<double> bounds = {});

  // The metric for `labels`, created on first use. The same labels give the same object;
  // the reference stays valid as long as the registry (metrics are never removed, so a
  // cached reference cannot dangle). Aborts on an invalid label name (see TryAdd).
  T& Add(const Labels& labels = {});
  // As Add, but INVALID_ARGUMENT naming the label when a name is not
  // [a-zA-Z_][a-zA-Z0-9_]*, starts with "__" (reserved), or is "le" on a histogram.
  absl::StatusOr<T*> TryAdd(const Labels& labels = {});

  FamilySnapshot Collect() const override;
  const std::vector<double>& bounds() const { return bounds_; }

 private:
  const std::vector<double> bounds_;
  mutable Mutex mu_;
  std::map<Labels, std::unique_ptr<T>> metrics_ ABSL_GUARDED_BY(mu_);
};

class Registry {
 public:
  Registry() = default;
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // Runs `callback` at the start of every Collect(), to set values that are computed at
  // scrape time (process metrics). It may run on several scraping threads at once.
  void AddCollectCallback(std::function<void()> callback);

  // Runs the collect callbacks, then snapshots every family, sorted by name.
  std::vector<FamilySnapshot> Collect() const;
  // Collect() in the text exposition format 0.0.4.
  std::string Serialize() const;

 private:
  friend absl::StatusOr<Family<Counter>*> AddCounter(Registry&, absl::string_view,
                                                     absl::string_view);
  friend absl::StatusOr<Family<Gauge>*> AddGauge(Registry&, absl::string_view, absl::string_view);
  friend absl::Status AddComputedGauge(Registry&, absl::string_view, absl::string_view,
                                       std::function<void(std::vector<Sample>*)>);
  friend absl::StatusOr<Family<Histogram>*> AddHistogram(Registry&, absl::string_view,
                                                         absl::string_view, std::vector<double>);
  template <typename T>
  absl::StatusOr<Family<T>*> AddFamily(absl::string_view name, absl::string_view help,
                                       std::vector<double> bounds = {});

  mutable Mutex mu_;
  std::map<std::string, std::unique_ptr<FamilyBase>> families_ ABSL_GUARDED_BY(mu_);
  std::vector<std::function<void()>> callbacks_ ABSL_GUARDED_BY(mu_);
};

absl::StatusOr<Family<Counter>*> AddCounter(Registry& registry, absl::string_view name,
                                            absl::string_view help);
absl::StatusOr<Family<Gauge>*> AddGauge(Registry& registry, absl::string_view name,
                                        absl::string_view help);
absl::StatusOr<Family<Histogram>*> AddHistogram(Registry& registry, absl::string_view name,
                                                absl::string_view help, std::vector<double> bounds);

// A gauge family whose samples are computed at every collection by `samples` (label sets
// come and go with it: placement info, windowed statistics). The callback must fill
// only labels and value, and may run on several scraping threads at once.
absl::Status AddComputedGauge(Registry& registry, absl::string_view name, absl::string_view help,
                              std::function<void(std::vector<Sample>*)> samples);

// Latency buckets in seconds for the services' histograms: 50 µs to 30 s.
std::vector<double> LatencyBuckets();

// One counter of `family` per status code (label `code`: "OK", "INVALID_ARGUMENT", ...),
// all created up front so that rate() sees the first call of each code.
class StatusCodeCounters {
 public:
  explicit StatusCodeCounters(Family<Counter>& family);
  void Increment(absl::StatusCode code);

 private:
  std::vector<Counter*> counters_;  // by absl::StatusCode value
};

// Serializes snapshots in the text exposition format 0.0.4.
std::string SerializeText(const std::vector<FamilySnapshot>& families);
// A sample value as Prometheus writes it: integers without exponent or fraction,
// "+Inf", "-Inf", "NaN", other values in the shortest form that reads back exactly.
std::string FormatValue(double value);

// process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
// process_start_time_seconds (from /proc, updated at each collection) and
// moemesh_build_info{version="..."} 1. Errors only when a name is taken already.
absl::Status AddProcessMetrics(Registry& registry);

}  // namespace moemesh::metrics
