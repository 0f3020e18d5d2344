#include "tools/load_driver.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "services/base/status_macros.h"
#include "services/model/moe_weights.h"
#include "tools/http_client.h"
#include "tools/local_mesh.h"

namespace moemesh {

absl::StatusOr<TokenSkew> TokenSkew::Make(const Checkpoint& ckpt, const MoeModelConfig& config) {
  TokenSkew s;
  s.hidden_ = config.hidden_size;
  for (int64_t layer : config.MoeLayers()) {
    ASSIGN_OR_RETURN(const GateWeights gate, LoadGate(ckpt, config, layer));
    auto& dirs = s.directions_[layer];
    for (int64_t e = 0; e < config.num_experts; ++e) {
      const float* w = gate.weight.data<float>() + e * s.hidden_;
      double norm = 0;
      for (int64_t h = 0; h < s.hidden_; ++h) norm += double(w[h]) * w[h];
      const float inv = norm > 0 ? static_cast<float>(1.0 / std::sqrt(norm)) : 0.0f;
      std::vector<float> d(s.hidden_);
      for (int64_t h = 0; h < s.hidden_; ++h) d[h] = w[h] * inv;
      dirs.push_back(std::move(d));
    }
    s.weights_[layer] = {};
  }
  return s;
}

absl::StatusOr<TokenSkew> TokenSkew::Uniform(const Checkpoint& ckpt, const MoeModelConfig& config) {
  return Make(ckpt, config);
}

absl::StatusOr<TokenSkew> TokenSkew::Zipf(const Checkpoint& ckpt, const MoeModelConfig& config,
                                          double zipf_s, uint64_t seed) {
  ASSIGN_OR_RETURN(TokenSkew s, Make(ckpt, config));
  std::mt19937_64 rng(seed);
  for (auto& [layer, w] : s.weights_) {
    std::vector<int> order(config.num_experts);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    w.assign(config.num_experts, 0.0);
    double sum = 0;
    for (int r = 0; r < config.num_experts; ++r) sum += w[order[r]] = 1.0 / std::pow(r + 1, zipf_s);
    for (double& v : w) v /= sum;
  }
  return s;
}

absl::StatusOr<TokenSkew> TokenSkew::Hot(const Checkpoint& ckpt, const MoeModelConfig& config,
                                         const std::vector<int32_t>& hot, double hot_share) {
  std::map<int64_t, std::vector<int32_t>> per_layer;
  for (int64_t layer : config.MoeLayers()) per_layer[layer] = hot;
  return HotPerLayer(ckpt, config, per_layer, hot_share);
}

absl::StatusOr<TokenSkew> TokenSkew::HotPerLayer(const Checkpoint& ckpt,
                                                 const MoeModelConfig& config,
                                                 const std::map<int64_t, std::vector<int32_t>>& hot,
                                                 double hot_share) {
  if (!(hot_share >= 0 && hot_share <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("hot share must be in [0, 1], got ", hot_share));
  }
  ASSIGN_OR_RETURN(TokenSkew s, Make(ckpt, config));
  for (auto& [layer, w] : s.weights_) {
    auto h = hot.find(layer);
    if (h == hot.end() || h->second.empty()) continue;
    for (int32_t e : h->second) {
      if (e < 0 || e >= config.num_experts) {
        return absl::InvalidArgumentError(absl::StrCat("hot expert ", e, " of layer ", layer,
                                                       " is not in [0, ", config.num_experts, ")"));
      }
    }
    const int64_t cold = config.num_experts - static_cast<int64_t>(h->second.size());
    w.assign(config.num_experts, cold > 0 ? (1 - hot_share) / cold : 0.0);
    for (int32_t e : h->second) w[e] = hot_share / static_cast<double>(h->second.size());
  }
  return s;
}

Tensor TokenSkew::Tokens(int64_t layer, int64_t T, std::mt19937& rng) const {
  Tensor x = Tensor::Empty(DType::kF32, {T, hidden_});
  std::normal_distribution<float> nd;
  float* d = x.mutable_data<float>();
  for (int64_t i = 0; i < T * hidden_; ++i) d[i] = nd(rng);
  const std::vector<double>& w = weights_.at(layer);
  if (w.empty()) return x;
  std::discrete_distribution<int> pick(w.begin(), w.end());
  const auto& dirs = directions_.at(layer);
  for (int64_t t = 0; t < T; ++t) {
    const std::vector<float>& dir = dirs[pick(rng)];
    for (int64_t h = 0; h < hidden_; ++h) d[t * hidden_ + h] += 6.0f * dir[h];
  }
  return x;
}

absl::StatusOr<std::unique_ptr<LoadDriver>> LoadDriver::Start(LoadDriverOptions options,
                                                              const Checkpoint& ckpt,
                                                              const MoeModelConfig& config,
                                                              const TokenSkew* skew) {
  if (options.routers.empty()) return absl::InvalidArgumentError("no router to drive");
  if (options.clients < 1) return absl::InvalidArgumentError("need at least one client");
  if (!(options.rate >= 0 && std::isfinite(options.rate))) {
    return absl::InvalidArgumentError(absl::StrCat("rate must be >= 0, got ", options.rate));
  }
  auto d = std::unique_ptr<LoadDriver>(new LoadDriver());
  d->options_ = std::move(options);
  d->config_ = config;
  d->layers_ = config.MoeLayers();
  for (int64_t layer : d->layers_) {
    MoeLayerOptions lo;
    lo.wire_dtype = d->options_.wire;
    ASSIGN_OR_RETURN(d->reference_[layer], MoeLayer::Create(ckpt, config, layer, lo));
  }
  d->skew_ = skew;
  d->start_ = std::chrono::steady_clock::now();
  for (int i = 0; i < d->options_.clients; ++i) {
    d->threads_.emplace_back([raw = d.get(), i] { raw->Client(i); });
  }
  return d;
}

LoadDriver::~LoadDriver() { Stop(); }

void LoadDriver::Stop() {
  stop_ = true;
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
}

double LoadDriver::elapsed_s() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void LoadDriver::Client(int index) {
  std::mt19937 rng(1000 + index);
  std::vector<std::unique_ptr<KServeClient>> clients;
  for (const std::string& r : options_.routers)
    clients.push_back(std::make_unique<KServeClient>(r, 256 << 20, options_.security));
  const bool paced = options_.rate > 0;
  for (int64_t n = index; !stop_; n += paced ? options_.clients : 1) {
    const int64_t layer = layers_[n % layers_.size()];
    const Tensor x = skew_.load()->Tokens(layer, options_.tokens, rng);
    KServeClient& client = *clients[n % clients.size()];
    auto due = std::chrono::steady_clock::now();
    if (paced) {
      // Request n of the schedule (over all clients) is due at n / rate.
      due = start_ + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                         std::chrono::duration<double>(static_cast<double>(n) / options_.rate));
      // Sleeps in short steps so that Stop is not held up by a slow schedule.
      for (auto now = std::chrono::steady_clock::now(); now < due && !stop_;
           now = std::chrono::steady_clock::now()) {
        std::this_thread::sleep_until(std::min(due, now + std::chrono::milliseconds(50)));
      }
      if (stop_) break;
    }
    const auto sent = std::chrono::steady_clock::now();
    absl::StatusOr<KServeClient::Result> got = client.Infer(x, layer, options_.timeout, false);
    const auto done = std::chrono::steady_clock::now();
    bool ok = got.ok();
    bool mismatch = false;
    if (ok) {
      const absl::StatusOr<MoeLayerOutput> want = reference_.at(layer)->Forward(x);
      mismatch = !want.ok() || got->output.nbytes() != want->output.nbytes() ||
                 std::memcmp(got->output.raw(), want->output.raw(), want->output.nbytes()) != 0;
    }
    MutexLock lock(&mu_);
    ++totals_.requests;
    if (!ok) {
      ++totals_.failed;
      if (totals_.first_error.empty()) totals_.first_error = got.status().ToString();
    }
    if (mismatch) ++totals_.mismatched;
    samples_.push_back(
        {std::chrono::duration<double>(done - start_).count(),
         std::chrono::duration<double, std::milli>(done - (paced ? due : sent)).count(),
         ok && !mismatch, std::chrono::duration<double, std::milli>(done - sent).count()});
  }
}

LoadDriver::Totals LoadDriver::totals() const {
  MutexLock lock(&mu_);
  return totals_;
}

std::vector<LoadDriver::Sample> LoadDriver::samples() const {
  MutexLock lock(&mu_);
  return samples_;
}

std::vector<LoadDriver::Sample> LoadDriver::samples_from(size_t first) const {
  MutexLock lock(&mu_);
  if (first >= samples_.size()) return {};
  return std::vector<Sample>(samples_.begin() + static_cast<std::ptrdiff_t>(first), samples_.end());
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(std::ceil(p * v.size())) - (p > 0));
  return v[i];
}

absl::StatusOr<double> ExpertTokensComputed(const std::string& metrics_url) {
  ASSIGN_OR_RETURN(const HttpReply r, HttpGet(metrics_url));
  if (r.status != 200) {
    return absl::UnavailableError(absl::StrCat(metrics_url, ": HTTP ", r.status));
  }
  double sum = 0;
  for (absl::string_view line : absl::StrSplit(r.body, '\n')) {
    if (!absl::StartsWith(line, "moemesh_expert_tokens_total{")) continue;
    double v = 0;
    if (!absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &v)) {
      return absl::DataLossError(absl::StrCat(metrics_url, ": unreadable sample: ", line));
    }
    sum += v;
  }
  return sum;
}

absl::StatusOr<ServiceBalance> MeasureServiceBalance(const std::vector<std::string>& metrics_urls,
                                                     std::chrono::milliseconds window) {
  std::vector<double> before;
  for (const std::string& u : metrics_urls) {
    ASSIGN_OR_RETURN(const double t, ExpertTokensComputed(u));
    before.push_back(t);
  }
  std::this_thread::sleep_for(window);
  ServiceBalance b;
  double max = 0, sum = 0;
  for (size_t i = 0; i < metrics_urls.size(); ++i) {
    ASSIGN_OR_RETURN(const double t, ExpertTokensComputed(metrics_urls[i]));
    b.tokens.push_back(t - before[i]);
    max = std::max(max, b.tokens.back());
    sum += b.tokens.back();
  }
  b.mean_over_max = max > 0 ? sum / static_cast<double>(metrics_urls.size()) / max : 0;
  return b;
}

}  // namespace moemesh
