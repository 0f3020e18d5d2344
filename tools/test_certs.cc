#include "tools/test_certs.h"

#include <fstream>

#include "absl/strings/str_cat.h"
#include "tools/process.h"

namespace moemesh {
namespace {

absl::Status Run(const std::string& command) {
  const ShellResult r = RunShell(absl::StrCat(command, " 2>&1"));
  if (r.exit_code != 0) {
    return absl::InternalError(absl::StrCat("`", command, "` failed: ", r.output));
  }
  return absl::OkStatus();
}

absl::Status Write(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TestCa> TestCa::Create(const std::string& dir, const std::string& name) {
  TestCa ca;
  ca.dir_ = absl::StrCat(dir, "/", name);
  ca.cert_ = ca.dir_ + "/ca.pem";
  ca.key_ = ca.dir_ + "/ca.key";
  ca.config_ = ca.dir_ + "/ca.cnf";
  if (absl::Status s = Run(absl::StrCat("mkdir -p '", ca.dir_, "' && touch '", ca.dir_,
                                        "/index.txt' && echo 01 > '", ca.dir_, "/serial'"));
      !s.ok()) {
    return s;
  }
  // `openssl ca` (not `x509 -req`): it takes explicit start and end dates, for the expired
  // certificate.
  if (absl::Status s = Write(
          ca.config_, absl::StrCat("[ca]\ndefault_ca = c\n[c]\ndatabase = ", ca.dir_,
                                   "/index.txt\nnew_certs_dir = ", ca.dir_, "\nserial = ", ca.dir_,
                                   "/serial\ndefault_md = sha256\n"
                                   "policy = p\nunique_subject = no\n"
                                   "[p]\ncommonName = supplied\n"));
      !s.ok()) {
    return s;
  }
  if (absl::Status s = Run(absl::StrCat(
          "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout '",
          ca.key_, "' -out '", ca.cert_, "' -days 30 -subj '/CN=", name, "'"));
      !s.ok()) {
    return s;
  }
  return ca;
}

absl::StatusOr<TestCertificate> TestCa::Issue(const std::string& name, const std::string& sans,
                                              bool expired) const {
  TestCertificate out{absl::StrCat(dir_, "/", name, ".pem"), absl::StrCat(dir_, "/", name, ".key")};
  const std::string csr = absl::StrCat(dir_, "/", name, ".csr");
  const std::string ext = absl::StrCat(dir_, "/", name, ".ext");
  if (absl::Status s = Write(ext, absl::StrCat("[x]\nsubjectAltName = ", sans,
                                               "\nbasicConstraints = CA:FALSE\n"
                                               "keyUsage = digitalSignature\n"
                                               "extendedKeyUsage = serverAuth,clientAuth\n"));
      !s.ok()) {
    return s;
  }
  if (absl::Status s = Run(absl::StrCat(
          "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout '", out.key,
          "' -out '", csr, "' -subj '/CN=", name, "'"));
      !s.ok()) {
    return s;
  }
  const std::string validity = expired ? "-startdate 20200101000000Z -enddate 20200201000000Z"
                                       : "-startdate 20250101000000Z -enddate 20350101000000Z";
  if (absl::Status s = Run(absl::StrCat(
          "openssl ca -batch -notext -config '", config_, "' -cert '", cert_, "' -keyfile '", key_,
          "' -in '", csr, "' -out '", out.cert, "' -extfile '", ext, "' -extensions x ", validity));
      !s.ok()) {
    return s;
  }
  return out;
}

}  // namespace moemesh
