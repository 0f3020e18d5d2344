// DrainGate: the calls a server has admitted, and its drain. Once Drain starts, new calls
// are turned away with UNAVAILABLE (a client retries those elsewhere: another replica,
// another router pod) while the ones admitted before run to their end; the server stops
// accepting connections only then. Without it, calls that reach a gRPC server after its
// Shutdown began end CANCELLED, which no client retries.
//
// A call leaves the gate when its handler returns, before gRPC has sent the reply; and a
// gRPC server closes a connection as soon as its last stream ends on its side, when the
// reply's last bytes are still in the socket buffers. A caller whose flow-control
// updates then reach the closed socket gets a reset, and loses the reply it was reading
// ("recvmsg: Connection reset by peer" on a 16 MB Compute reply). So Drain also waits,
// after the last call left, `linger` for the replies to reach their callers. Thread-safe.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
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

  static constexpr std::chrono::milliseconds kDefaultLinger{250};
  // What a server's calls that the gate does not hold get once the drain is over: health
  // Watch streams, which never end by themselves, and control calls. Then they are
  // cancelled: a client watching the health would otherwise hold the server up for the
  // whole drain deadline.
  static constexpr std::chrono::seconds kGraceAfterDrain{1};

  // The deadline a server's own Shutdown gets once Drain has returned.
  static std::chrono::system_clock::time_point ShutdownDeadline(
      std::chrono::system_clock::time_point drain_deadline) {
    return std::min(drain_deadline, std::chrono::system_clock::now() + kGraceAfterDrain);
  }

  // `what` names the server in the refusal ("router", "expert service expert-0").
  explicit DrainGate(std::string what, std::chrono::milliseconds linger = kDefaultLinger)
      : what_(std::move(what)), linger_(linger) {}

  // An admission, or UNAVAILABLE once draining.
  absl::StatusOr<Admission> Admit() {
    MutexLock lock(&mu_);
    if (draining_) return absl::UnavailableError(what_ + " is draining: try another replica");
    ++in_flight_;
    return Admission(this);
  }

  // Refuses new calls from now on and waits until the admitted ones have finished and
  // the last one left `linger` ago, or until `deadline`; whether they all finished.
  bool Drain(std::chrono::system_clock::time_point deadline) {
    std::chrono::system_clock::time_point until;
    {
      MutexLock lock(&mu_);
      draining_ = true;
      if (!mu_.AwaitWithDeadline(this, &DrainGate::Idle, deadline)) return false;
      until = std::min(deadline, last_left_ + linger_);
    }
    // Not under the lock: calls arriving meanwhile are refused at once.
    std::this_thread::sleep_until(until);
    return true;
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
    last_left_ = std::chrono::system_clock::now();
  }
  bool Idle() const ABSL_SHARED_LOCKS_REQUIRED(mu_) { return in_flight_ == 0; }

  const std::string what_;
  const std::chrono::milliseconds linger_;
  mutable Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  std::chrono::system_clock::time_point last_left_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moemesh
