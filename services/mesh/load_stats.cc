#include "services/mesh/load_stats.h"

#include <algorithm>
#include <numeric>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "services/base/mutex.h"

namespace moemesh {

ExpertLoadWindow::ExpertLoadWindow(int num_experts, std::chrono::milliseconds window, int slices,
                                   Clock::time_point start)
    : num_experts_(num_experts),
      window_(window),
      slice_(std::max<Clock::duration>(window / std::max(slices, 1), Clock::duration(1))),
      start_(start),
      slices_(static_cast<size_t>(std::max(slices, 1))) {
  for (Slice& s : slices_) {
    s.counts.assign(num_experts, 0);
    s.prob_sums.assign(num_experts, 0.0);
  }
}

int64_t ExpertLoadWindow::SliceId(Clock::time_point now) const {
  return now <= start_ ? 0 : (now - start_) / slice_;
}

void ExpertLoadWindow::Add(int64_t tokens, const int64_t* counts, const double* prob_sums,
                           Clock::time_point now) {
  const int64_t id = SliceId(now);
  MutexLock lock(&mu_);
  Slice& s = slices_[id % static_cast<int64_t>(slices_.size())];
  if (s.id != id) {
    s.id = id;
    s.tokens = s.prob_tokens = 0;
    std::fill(s.counts.begin(), s.counts.end(), 0);
    std::fill(s.prob_sums.begin(), s.prob_sums.end(), 0.0);
  }
  s.tokens += tokens;
  for (int e = 0; e < num_experts_; ++e) s.counts[e] += counts[e];
  if (prob_sums != nullptr) {
    s.prob_tokens += tokens;
    for (int e = 0; e < num_experts_; ++e) s.prob_sums[e] += prob_sums[e];
  }
}

ExpertLoadWindow::Stats ExpertLoadWindow::Snapshot(Clock::time_point now) const {
  const int64_t id = SliceId(now);
  int64_t n = 0;  // slices in the ring
  Stats st;
  st.counts.assign(num_experts_, 0);
  std::vector<double> prob_sums(num_experts_, 0.0);
  int64_t prob_tokens = 0;
  {
    MutexLock lock(&mu_);
    n = static_cast<int64_t>(slices_.size());
    for (const Slice& s : slices_) {
      if (s.id < 0 || s.id > id || s.id <= id - n) continue;  // unused or out of the window
      st.tokens += s.tokens;
      prob_tokens += s.prob_tokens;
      for (int e = 0; e < num_experts_; ++e) {
        st.counts[e] += s.counts[e];
        prob_sums[e] += s.prob_sums[e];
      }
    }
  }
  // The window is the current slice so far plus the n - 1 before it, bounded by the
  // time since start.
  const auto covered = std::min<Clock::duration>((n - 1) * slice_ + (now - start_ - id * slice_),
                                                 std::max(now - start_, Clock::duration(0)));
  st.seconds = std::chrono::duration<double>(covered).count();
  st.rate.assign(num_experts_, 0.0);
  if (st.seconds > 0) {
    for (int e = 0; e < num_experts_; ++e) st.rate[e] = st.counts[e] / st.seconds;
  }
  const int64_t total = std::accumulate(st.counts.begin(), st.counts.end(), int64_t{0});
  if (total > 0 && num_experts_ > 0) {
    const double mean = static_cast<double>(total) / num_experts_;
    st.imbalance = *std::max_element(st.counts.begin(), st.counts.end()) / mean;
  }
  if (prob_tokens > 0) {
    st.mean_probability.resize(num_experts_);
    for (int e = 0; e < num_experts_; ++e) st.mean_probability[e] = prob_sums[e] / prob_tokens;
    if (total > 0) {
      double dot = 0;
      for (int e = 0; e < num_experts_; ++e) {
        dot += static_cast<double>(st.counts[e]) / total * st.mean_probability[e];
      }
      st.balance_statistic = num_experts_ * dot;
    }
  }
  return st;
}

absl::StatusOr<ExpertSeriesSelection> ExpertSeriesSelection::Parse(absl::string_view spec,
                                                                   const MoeModelConfig& config,
                                                                   int64_t max_series) {
  ExpertSeriesSelection s;
  const std::vector<int64_t> moe = config.MoeLayers();
  spec = absl::StripAsciiWhitespace(spec);
  if (spec == "auto") {
    if (2 * static_cast<int64_t>(moe.size()) * config.num_experts <= max_series) {
      s.layers_ = moe;
    } else {
      s.summed_ = true;
    }
    return s;
  }
  if (spec == "all") {
    s.layers_ = moe;
    return s;
  }
  if (spec == "sum") {
    s.summed_ = true;
    return s;
  }
  std::set<int64_t> layers;
  for (absl::string_view word : absl::StrSplit(spec, ',')) {
    int64_t layer = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(word), &layer)) {
      return absl::InvalidArgumentError(absl::StrCat("--expert-metrics: '", std::string(word),
                                                     "' is not auto, all, sum or a layer index"));
    }
    if (absl::Status st = config.CheckMoeLayer(layer); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--expert-metrics: ", st.message()));
    }
    layers.insert(layer);
  }
  s.layers_.assign(layers.begin(), layers.end());
  return s;
}

std::optional<std::string> ExpertSeriesSelection::LayerLabel(int64_t layer) const {
  if (summed_) return std::string("all");
  if (std::binary_search(layers_.begin(), layers_.end(), layer)) return absl::StrCat(layer);
  return std::nullopt;
}

}  // namespace moemesh
