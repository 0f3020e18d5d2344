// DrainGate: the calls a server has admitted, and its drain. Once Drain starts, new calls
// are turned away with UNAVAILABLE (a client retries those elsewhere: another replica,
// another router pod) while the ones admitted before run to their end; the server stops
// accepting connections only then. Without it, calls that reach a gRPC server after its
// Shutdown began end CANCELLED, which no client retries. Thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "services/base/mutex.h"

namespace moemesh {

class DrainGate {
 public:
  // Holds one admitted call until it goes.
  class Admission {
   public:
    explicit Admission(DrainGate* gate) : gate_(gate) {}
    Admission(Admission&& other) noexcept : gate_(std::exchange(other.gate_, nullptr)) {}
    Admission& operator=(Admission&&) = delete;
    ~Admission() {
      if (gate_ != nullptr) gate_->Leave();
    }

   private:
    DrainGate* gate_;
  };

  // `what` names the server in the refusal ("router", "expert service expert-0").
  explicit DrainGate(std::string what) : what_(std::move(what)) {}

  // An admission, or UNAVAILABLE once draining.
  absl::StatusOr<Admission> Admit() {
    MutexLock lock(&mu_);
    if (draining_) return absl::UnavailableError(what_ + " is draining: try another replica");
    ++in_flight_;
    return Admission(this);
  }

  // Refuses new calls from now on and waits until the admitted ones have finished, or
  // until `deadline`; whether they all finished.
  bool Drain(std::chrono::system_clock::time_point deadline) {
    MutexLock lock(&mu_);
    draining_ = true;
    return mu_.AwaitWithDeadline(this, &DrainGate::Idle, deadline);
  }

  bool draining() const {
    MutexLock lock(&mu_);
    return draining_;
  }
  int64_t in_flight() const {
    MutexLock lock(&mu_);
    return in_flight_;
  }

 private:
  void Leave() {
    MutexLock lock(&mu_);
    --in_flight_;
  }
  bool Idle() const ABSL_SHARED_LOCKS_REQUIRED(mu_) { return in_flight_ == 0; }

  const std::string what_;
  mutable Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace moemesh
