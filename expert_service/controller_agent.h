// ControllerAgent: how an expert service belongs to a placement controller (`moemesh expert
// --controller H:P`). It registers the service (its advertised address and the experts it
// holds), keeps the lease alive with heartbeats every third of it, registers again when the
// controller has forgotten it (a controller restart, an expired lease), and retries with
// backoff while the controller is away. The controller then loads and unloads experts
// through the service's own LoadExperts/UnloadExperts.
//
// Threads: one of its own; Leave from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "controller.grpc.pb.h"
#include "expert_service/expert_server.h"
#include "services/base/mutex.h"
#include "services/rpc/security.h"

namespace moemesh {

struct ControllerAgentOptions {
  // The controller, H:P.
  std::string controller;
  // The address routers and the controller reach this service at.
  std::string endpoint;
  std::string service_id;
  // The credentials it dials the controller with; null: plaintext.
  std::shared_ptr<Security> security;

  absl::Status Validate() const;
};

class ControllerAgent {
 public:
  // `server` is not owned and must outlive the agent. Returns at once; registration
  // happens on the agent's thread (the controller may start later).
  static absl::StatusOr<std::unique_ptr<ControllerAgent>> Start(ControllerAgentOptions options,
                                                                ExpertServer* server);
  // Stops heartbeating (the lease then expires unless Leave ran).
  ~ControllerAgent();
  ControllerAgent(const ControllerAgent&) = delete;
  ControllerAgent& operator=(const ControllerAgent&) = delete;

  // Asks the controller to move this service's experts elsewhere and returns once nothing
  // routes to it any more; the controller's error otherwise (no other service to take the
  // experts, the controller unreachable) or DEADLINE_EXCEEDED.
  absl::Status Leave(std::chrono::system_clock::time_point deadline);
  bool registered() const { return registered_.load(); }

 private:
  ControllerAgent(ControllerAgentOptions options, ExpertServer* server);
  void Loop();
  absl::Status Register();
  bool SleepFor(std::chrono::milliseconds d);

  ControllerAgentOptions options_;
  ExpertServer* const server_;
  std::unique_ptr<v1::PlacementController::Stub> stub_;
  std::atomic<bool> registered_{false};
  std::atomic<int64_t> lease_ms_{3000};
  Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace moemesh
