// Load for a running mesh: token batches whose routing follows a chosen skew, and a driver
// that sends them from several client threads to the routers, checks every answer against
// the in-process MoeLayer bit for bit, and records latencies and failures. The demo's
// --skew run, the controller end-to-end tests and the rebalancing benchmark use it.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "services/base/mutex.h"
#include "services/model/checkpoint.h"
#include "services/model/model_config.h"
#include "services/moe/moe_layer.h"
#include "services/rpc/security.h"

namespace moemesh {

// Which expert each token is pushed towards: a distribution over the experts of each MoE
// layer. A token x = noise + 6·w_e/|w_e| (w_e: expert e's gate row) scores e ~6 standard
// deviations above the rest, so e is among its top-k and the other choices still vary.
class TokenSkew {
 public:
  // Uniform: no push at all (random tokens).
  static absl::StatusOr<TokenSkew> Uniform(const Checkpoint& ckpt, const MoeModelConfig& config);
  // Zipf(s) over the experts, in a random order per layer (seeded): expert rank r gets
  // weight 1/r^s.
  static absl::StatusOr<TokenSkew> Zipf(const Checkpoint& ckpt, const MoeModelConfig& config,
                                        double s, uint64_t seed);
  // `hot` experts of every layer take `hot_share` of the pushes, the rest spread evenly.
  static absl::StatusOr<TokenSkew> Hot(const Checkpoint& ckpt, const MoeModelConfig& config,
                                       const std::vector<int32_t>& hot, double hot_share);
  // The same with each MoE layer's own hot experts (a layer missing from `hot` is uniform).
  static absl::StatusOr<TokenSkew> HotPerLayer(const Checkpoint& ckpt, const MoeModelConfig& config,
                                               const std::map<int64_t, std::vector<int32_t>>& hot,
                                               double hot_share);

  // T tokens [T, H] float32 for `layer`.
  Tensor Tokens(int64_t layer, int64_t T, std::mt19937& rng) const;
  // The push weight of each expert of `layer` (sums to 1; empty when uniform).
  const std::vector<double>& weights(int64_t layer) const { return weights_.at(layer); }

 private:
  static absl::StatusOr<TokenSkew> Make(const Checkpoint& ckpt, const MoeModelConfig& config);
  int64_t hidden_ = 0;
  std::map<int64_t, std::vector<std::vector<float>>> directions_;  // unit gate rows
  std::map<int64_t, std::vector<double>> weights_;
};

struct LoadDriverOptions {
  std::vector<std::string> routers;  // KServe endpoints, used in turn
  int clients = 4;                   // threads
  int64_t tokens = 16;               // per request
  std::chrono::milliseconds timeout{30000};
  DType wire = DType::kF32;            // the routers' --wire: the references round the same way
  std::shared_ptr<Security> security;  // TLS and token of the clients; null: plaintext
  // Requests per second over all clients; 0: every client sends back to back. With a rate
  // the requests follow an absolute schedule: request k (counted over all clients) is due
  // at start + k/rate and client c sends those with k % clients == c. A client behind its
  // schedule (its previous answer came late) sends at once, and the latency is measured
  // from the due time, not from the late send: a stall shows in every request it delayed
  // (no coordinated omission). Enough clients must be in flight to carry the rate.
  double rate = 0;
};

// Drives the mesh until Stop. Every request's answer is compared with MoeLayer's.
class LoadDriver {
 public:
  struct Sample {
    double at_s;        // the answer, since Start
    double latency_ms;  // ModelInfer: send to answer; with a rate, due time to answer
    bool ok;
    double service_ms;  // ModelInfer, send to answer (with a rate too)
  };
  struct Totals {
    int64_t requests = 0, failed = 0, mismatched = 0;
    std::string first_error;
  };

  // `skew` and the references' checkpoint must outlive the driver.
  static absl::StatusOr<std::unique_ptr<LoadDriver>> Start(LoadDriverOptions options,
                                                           const Checkpoint& ckpt,
                                                           const MoeModelConfig& config,
                                                           const TokenSkew* skew);
  ~LoadDriver();  // stops
  void Stop();
  // Swaps the skew from the next request on (not owned).
  void SetSkew(const TokenSkew* skew) { skew_.store(skew); }
  Totals totals() const;
  // The samples so far, in completion order.
  std::vector<Sample> samples() const;
  // The samples from index `first` on (those samples() would return past its first `first`).
  std::vector<Sample> samples_from(size_t first) const;
  double elapsed_s() const;

 private:
  LoadDriver() = default;
  void Client(int index);

  LoadDriverOptions options_;
  MoeModelConfig config_;
  std::vector<int64_t> layers_;
  std::map<int64_t, std::unique_ptr<MoeLayer>> reference_;  // per layer; Forward is thread-safe
  std::atomic<const TokenSkew*> skew_{nullptr};
  std::chrono::steady_clock::time_point start_;
  std::atomic<bool> stop_{false};
  mutable Mutex mu_;
  Totals totals_ ABSL_GUARDED_BY(mu_);
  std::vector<Sample> samples_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_;
};

// Percentile p in [0, 1] of `v` (nearest rank); 0 for an empty one.
double Percentile(std::vector<double> v, double p);

// Token rows an expert service has computed so far: its moemesh_expert_tokens_total, every
// layer and expert summed, read from its metrics URL.
absl::StatusOr<double> ExpertTokensComputed(const std::string& metrics_url);

// Each expert service's token rows over `window` (load running meanwhile) and the
// service-level balance: their mean over their max (1 = even; 0 when nothing ran).
struct ServiceBalance {
  std::vector<double> tokens;
  double mean_over_max = 0;
};
absl::StatusOr<ServiceBalance> MeasureServiceBalance(const std::vector<std::string>& metrics_urls,
                                                     std::chrono::milliseconds window);

}  // namespace moemesh
