// Certificates made with openssl at test time for the TLS tests (tests/security_e2e_test.cc,
// the mesh suite with mutual TLS): a CA, and leaf certificates it signs for servers and
// clients, valid now or already expired.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace moemesh {

struct TestCertificate {
  std::string cert;  // PEM file paths
  std::string key;
};

class TestCa {
 public:
  // A new CA (EC P-256) named `name`, its files in `dir` (created if missing).
  static absl::StatusOr<TestCa> Create(const std::string& dir, const std::string& name);

  const std::string& cert() const { return cert_; }

  // A leaf certificate for both server and client use, named `name`, with subject
  // alternative names `sans` (openssl syntax: "IP:127.0.0.1,DNS:localhost,URI:spiffe://x");
  // `expired`: valid only in 2020.
  absl::StatusOr<TestCertificate> Issue(const std::string& name, const std::string& sans,
                                        bool expired = false) const;

 private:
  std::string dir_, cert_, key_, config_;
};

// The SANs every mesh component's certificate carries in the tests: loopback by address
// and by name.
inline constexpr char kLoopbackSans[] = "IP:127.0.0.1,DNS:localhost";

}  // namespace moemesh
