// NetNamespace: a network namespace joined to this one by a veth pair, for tests that put
// a service behind a real link and break that link (tests/network_faults_test.cc). Needs
// root and iproute2 (`ip`), iptables and tc.
//
// The namespace gets a private /30 in 10.128.0.0/9 (unique per namespace, checked against
// the routes already present): host_address() on this side, ns_address() inside, lo up in
// both. Run a process inside with Exec(argv) (`ip netns exec NAME argv...`, which execs:
// the process ChildProcess starts is the program itself, and its parent-death signal and
// MOEMESH_PARENT_PID still work).
//
// Faults, all on the link and all removed by Clear():
//   Blackhole(): every IPv4 packet in either direction on the link is dropped (iptables
//     DROP on the namespace's INPUT and OUTPUT for its veth): no reset, no ICMP; new
//     connections hang in SYN-SENT, established ones stop hearing anything.
//   Refuse(): the ports listening in the namespace are closed, as far as the other side
//     can tell: every new connection is refused and every segment to those ports answered
//     with a reset (iptables REJECT --reject-with tcp-reset), so connections made to them
//     reset on their next segment. Connections made from the namespace are left alone.
//   ResetAll(): every TCP segment reaching the namespace is answered with a reset, those
//     of connections the namespace made too (a firewall or NAT that lost its state): the
//     far end's socket is reset, the namespace's own one hears nothing until it next sends.
//   Throttle(rate, delay): both directions of the link limited to `rate` (tc tbf; with
//     netem where the kernel has it, also `delay` each way).
//
// Names carry this process's id; namespaces and veths left by a process that no longer
// runs (a crashed test) are removed by the next Create.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moemesh {

// OK when this process can create network namespaces (root, `ip netns` works); else
// FAILED_PRECONDITION saying why — the reason a test skips.
absl::Status RootAndNetnsAvailable();

class NetNamespace {
 public:
  static absl::StatusOr<std::unique_ptr<NetNamespace>> Create();
  // Deletes the namespace and the veth pair (processes still inside keep the namespace,
  // not the link).
  ~NetNamespace();
  NetNamespace(const NetNamespace&) = delete;
  NetNamespace& operator=(const NetNamespace&) = delete;

  const std::string& name() const { return name_; }
  const std::string& host_address() const { return host_address_; }
  const std::string& ns_address() const { return ns_address_; }
  const std::string& host_device() const { return host_device_; }
  const std::string& ns_device() const { return ns_device_; }

  // `argv` run inside the namespace: {ip, "netns", "exec", name(), argv...}.
  std::vector<std::string> Exec(const std::vector<std::string>& argv) const;
  // A shell command line run inside the namespace ("ip netns exec NAME " + command).
  std::string ShellIn(const std::string& command) const;

  absl::Status Blackhole();
  absl::Status Refuse();
  absl::Status ResetAll();
  // `rate_kbit` kilobits per second each way; `delay` only where netem exists
  // (netem_available()), tbf's queue otherwise adds what the rate makes it.
  absl::Status Throttle(int64_t rate_kbit, std::chrono::milliseconds delay);
  // Removes every fault: the namespace's iptables rules and both qdiscs.
  absl::Status Clear();
  // Whether Throttle used netem (its delay applied).
  bool netem_available() const { return netem_; }

 private:
  NetNamespace() = default;

  std::string name_, host_device_, ns_device_, host_address_, ns_address_;
  bool netem_ = false;
  bool created_ = false;
};

}  // namespace moemesh
