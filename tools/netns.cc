#include "tools/netns.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "services/base/status_macros.h"
#include "tools/process.h"

namespace moemesh {
namespace {

// Every name this file makes starts with one of these, then the creating process's id.
constexpr char kNsPrefix[] = "mmnf-";     // namespace: mmnf-PID-N
constexpr char kHostDevPrefix[] = "mmh";  // host end of the veth: mmhPIDxN (<= 15 chars)
constexpr char kNsDevPrefix[] = "mmn";    // namespace end: mmnPIDxN

// The path of an iproute2 or iptables tool (ChildProcess needs a path for `ip`, and a
// test's PATH may lack the sbin directories), or `name` itself to leave it to PATH.
std::string Tool(const std::string& name) {
  for (const char* dir : {"/usr/sbin/", "/sbin/", "/usr/bin/", "/bin/"}) {
    const std::string path = dir + name;
    if (::access(path.c_str(), X_OK) == 0) return path;
  }
  return name;
}

// The `ip` binary, or empty.
const std::string& IpBinary() {
  static const std::string path = [] {
    const std::string ip = Tool("ip");
    return ip == "ip" ? std::string() : ip;
  }();
  return path;
}
const std::string& Tc() {
  static const std::string path = Tool("tc");
  return path;
}
const std::string& Iptables() {
  static const std::string path = Tool("iptables");
  return path;
}

// Runs `command` (stderr too); its failure names the command and what it printed.
absl::Status Run(const std::string& command) {
  const ShellResult r = RunShell(command + " 2>&1");
  if (r.exit_code != 0) {
    return absl::InternalError(absl::StrCat("`", command, "` exited ", r.exit_code, ": ",
                                            absl::StripTrailingAsciiWhitespace(r.output)));
  }
  return absl::OkStatus();
}

bool Alive(pid_t pid) { return ::kill(pid, 0) == 0 || errno != ESRCH; }

// The creator's pid in one of our names ("mmnf-123-4", "mmh123x4"), or -1.
pid_t CreatorOf(absl::string_view name, absl::string_view prefix, char separator) {
  if (!absl::ConsumePrefix(&name, prefix)) return -1;
  const size_t end = name.find(separator);
  int pid = -1;
  if (end == absl::string_view::npos || !absl::SimpleAtoi(name.substr(0, end), &pid)) return -1;
  return pid;
}

// Namespaces and veths whose creator no longer runs (a crashed or killed test).
void RemoveStale() {
  const std::string ip = IpBinary();
  for (absl::string_view line : absl::StrSplit(RunShell(ip + " netns list 2>/dev/null").output,
                                               '\n', absl::SkipWhitespace())) {
    const std::string name(line.substr(0, line.find(' ')));
    const pid_t pid = CreatorOf(name, kNsPrefix, '-');
    if (pid > 0 && !Alive(pid)) RunShell(absl::StrCat(ip, " netns del ", name, " 2>&1"));
  }
  // "12: mmh123x4@if11: <...": a host end whose namespace went without it.
  for (absl::string_view line : absl::StrSplit(RunShell(ip + " -o link show 2>/dev/null").output,
                                               '\n', absl::SkipWhitespace())) {
    std::vector<absl::string_view> parts = absl::StrSplit(line, absl::MaxSplits(": ", 2));
    if (parts.size() < 2) continue;
    const std::string dev(parts[1].substr(0, parts[1].find('@')));
    const pid_t pid = CreatorOf(dev, kHostDevPrefix, 'x');
    if (pid > 0 && !Alive(pid)) RunShell(absl::StrCat(ip, " link del ", dev, " 2>&1"));
  }
}

bool ParseIpv4(absl::string_view text, uint32_t* address, int* prefix) {
  *prefix = 32;
  if (const size_t slash = text.find('/'); slash != absl::string_view::npos) {
    if (!absl::SimpleAtoi(text.substr(slash + 1), prefix) || *prefix < 0 || *prefix > 32) {
      return false;
    }
    text = text.substr(0, slash);
  }
  std::vector<absl::string_view> octets = absl::StrSplit(text, '.');
  if (octets.size() != 4) return false;
  *address = 0;
  for (absl::string_view o : octets) {
    uint32_t v;
    if (!absl::SimpleAtoi(o, &v) || v > 255) return false;
    *address = *address << 8 | v;
  }
  return true;
}

std::string Ipv4(uint32_t a) {
  return absl::StrCat(a >> 24, ".", (a >> 16) & 255, ".", (a >> 8) & 255, ".", a & 255);
}

// Whether a route of this host's (any table) at least as specific as a /24 overlaps
// the /30 at `net`: someone's subnet already there.
bool SubnetTaken(uint32_t net, const std::string& routes) {
  for (absl::string_view line : absl::StrSplit(routes, '\n', absl::SkipWhitespace())) {
    std::vector<absl::string_view> words = absl::StrSplit(line, ' ', absl::SkipWhitespace());
    for (absl::string_view w : words) {
      uint32_t a;
      int prefix;
      if (!ParseIpv4(w, &a, &prefix)) continue;  // "local", "broadcast", ...
      if (prefix >= 24) {
        const int common = std::min(prefix, 30);
        const uint32_t mask = ~uint32_t{0} << (32 - common);
        if ((a & mask) == (net & mask)) return true;
      }
      break;  // only the destination, the first address of the line
    }
  }
  return false;
}

}  // namespace

absl::Status RootAndNetnsAvailable() {
  if (::geteuid() != 0) {
    return absl::FailedPreconditionError("not root: network namespaces need root");
  }
  if (IpBinary().empty()) {
    return absl::FailedPreconditionError("no `ip` (iproute2) in /usr/sbin, /sbin or /usr/bin");
  }
  // A namespace of our own, made and removed: containers without CAP_SYS_ADMIN fail here.
  const std::string probe = absl::StrCat(kNsPrefix, ::getpid(), "-probe");
  const ShellResult add = RunShell(absl::StrCat(IpBinary(), " netns add ", probe, " 2>&1"));
  RunShell(absl::StrCat(IpBinary(), " netns del ", probe, " 2>&1"));
  if (add.exit_code != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "`ip netns add` fails here: ", absl::StripTrailingAsciiWhitespace(add.output)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<NetNamespace>> NetNamespace::Create() {
  static std::atomic<int> counter{0};
  if (IpBinary().empty()) return absl::FailedPreconditionError("no `ip` (iproute2)");
  RemoveStale();
  const std::string ip = IpBinary();
  const int n = counter.fetch_add(1);
  const pid_t pid = ::getpid();
  auto ns = std::unique_ptr<NetNamespace>(new NetNamespace());
  ns->name_ = absl::StrCat(kNsPrefix, pid, "-", n);
  ns->host_device_ = absl::StrCat(kHostDevPrefix, pid, "x", n);
  ns->ns_device_ = absl::StrCat(kNsDevPrefix, pid, "x", n);
  // A leftover of ours with the same names (pid reused after a crash): gone first.
  RunShell(absl::StrCat(ip, " netns del ", ns->name_, " 2>&1"));
  RunShell(absl::StrCat(ip, " link del ", ns->host_device_, " 2>&1"));

  // A /30 in 10.128.0.0/9 (2^21 of them) picked from the pid and counter, skipping any
  // that a route of this host already covers.
  const std::string routes = RunShell(ip + " -4 route show table all 2>/dev/null").output;
  uint32_t net = 0;
  bool found = false;
  for (uint32_t attempt = 0; attempt < 256 && !found; ++attempt) {
    const uint32_t index = (static_cast<uint32_t>(pid) * 64 + n * 7 + attempt * 4099) % (1u << 21);
    net = (10u << 24) | (1u << 23) | (index << 2);
    found = !SubnetTaken(net, routes);
  }
  if (!found) return absl::ResourceExhaustedError("no free /30 in 10.128.0.0/9");
  ns->host_address_ = Ipv4(net + 1);
  ns->ns_address_ = Ipv4(net + 2);

  const std::string in = ns->ShellIn("");
  for (const std::string& command : {
           absl::StrCat(ip, " netns add ", ns->name_),
           absl::StrCat(ip, " link add ", ns->host_device_, " type veth peer name ",
                        ns->ns_device_),
           absl::StrCat(ip, " link set ", ns->ns_device_, " netns ", ns->name_),
           absl::StrCat(ip, " addr add ", ns->host_address_, "/30 dev ", ns->host_device_),
           absl::StrCat(ip, " link set ", ns->host_device_, " up"),
           absl::StrCat(in, ip, " addr add ", ns->ns_address_, "/30 dev ", ns->ns_device_),
           absl::StrCat(in, ip, " link set ", ns->ns_device_, " up"),
           absl::StrCat(in, ip, " link set lo up"),
       }) {
    if (absl::Status s = Run(command); !s.ok()) return s;  // the destructor cleans up
    ns->created_ = true;
  }
  // Whether netem is here (Debian's cloud kernels leave it out): tried once on the link.
  ns->netem_ =
      Run(absl::StrCat(in, Tc(), " qdisc add dev ", ns->ns_device_, " root netem delay 1ms")).ok();
  if (ns->netem_)
    RETURN_IF_ERROR(Run(absl::StrCat(in, Tc(), " qdisc del dev ", ns->ns_device_, " root")));
  return ns;
}

NetNamespace::~NetNamespace() {
  if (!created_) return;
  RunShell(absl::StrCat(IpBinary(), " netns del ", name_, " 2>&1"));
  RunShell(absl::StrCat(IpBinary(), " link del ", host_device_, " 2>&1"));
}

std::vector<std::string> NetNamespace::Exec(const std::vector<std::string>& argv) const {
  std::vector<std::string> out = {IpBinary(), "netns", "exec", name_};
  out.insert(out.end(), argv.begin(), argv.end());
  return out;
}

std::string NetNamespace::ShellIn(const std::string& command) const {
  return absl::StrCat(IpBinary(), " netns exec ", name_, " ", command);
}

absl::Status NetNamespace::Blackhole() {
  // Both directions: dropping only what comes in would still let the namespace's own
  // segments (replies, window updates, keepalives) out, which is no blackhole.
  RETURN_IF_ERROR(
      Run(ShellIn(absl::StrCat(Iptables(), " -w 10 -I INPUT -i ", ns_device_, " -j DROP"))));
  return Run(ShellIn(absl::StrCat(Iptables(), " -w 10 -I OUTPUT -o ", ns_device_, " -j DROP")));
}

absl::Status NetNamespace::Refuse() {
  // Every port listening in the namespace now ("st" 0A in /proc/net/tcp{,6}, read inside):
  // its segments are answered with a reset, as a closed port's are, so connections made to
  // it are reset too. Connections the namespace made itself are left alone.
  const ShellResult tcp = RunShell(ShellIn("cat /proc/net/tcp /proc/net/tcp6 2>/dev/null"));
  std::set<int> ports;
  for (absl::string_view line : absl::StrSplit(tcp.output, '\n', absl::SkipWhitespace())) {
    std::vector<absl::string_view> f = absl::StrSplit(line, ' ', absl::SkipWhitespace());
    if (f.size() < 4 || f[3] != "0A") continue;
    const size_t colon = f[1].rfind(':');
    int port;
    if (colon != absl::string_view::npos && absl::SimpleHexAtoi(f[1].substr(colon + 1), &port)) {
      ports.insert(port);
    }
  }
  for (int port : ports) {
    RETURN_IF_ERROR(
        Run(ShellIn(absl::StrCat(Iptables(), " -w 10 -I INPUT -i ", ns_device_, " -p tcp --dport ",
                                 port, " -j REJECT --reject-with tcp-reset"))));
  }
  // And every new connection, to any port.
  return Run(ShellIn(absl::StrCat(Iptables(), " -w 10 -I INPUT -i ", ns_device_,
                                  " -p tcp --syn -j REJECT --reject-with tcp-reset")));
}

absl::Status NetNamespace::ResetAll() {
  // Every segment: the connections the namespace made are reset too (at the far end only:
  // the namespace's own socket hears nothing until it next sends). The resets REJECT sends
  // go out through OUTPUT, so nothing may be dropped there.
  return Run(ShellIn(absl::StrCat(Iptables(), " -w 10 -I INPUT -i ", ns_device_,
                                  " -p tcp -j REJECT --reject-with tcp-reset")));
}

absl::Status NetNamespace::Throttle(int64_t rate_kbit, std::chrono::milliseconds delay) {
  // Bursts of two full frames (or 20 ms at the rate), and a queue holding seconds at the
  // rate so that it delays rather than drops.
  const int64_t burst_bytes = std::max<int64_t>(2 * 1514, rate_kbit * 1000 / 8 / 50);
  const std::string qdisc =
      netem_
          ? absl::StrCat("netem delay ", delay.count(), "ms rate ", rate_kbit, "kbit limit 100000")
          : absl::StrCat("tbf rate ", rate_kbit, "kbit burst ", burst_bytes, " latency 10s");
  // Requests (this side's egress) and replies (the namespace's).
  RETURN_IF_ERROR(Run(absl::StrCat(Tc(), " qdisc replace dev ", host_device_, " root ", qdisc)));
  return Run(ShellIn(absl::StrCat(Tc(), " qdisc replace dev ", ns_device_, " root ", qdisc)));
}

absl::Status NetNamespace::Clear() {
  RETURN_IF_ERROR(Run(ShellIn(Iptables() + " -w 10 -F INPUT")));
  RETURN_IF_ERROR(Run(ShellIn(Iptables() + " -w 10 -F OUTPUT")));
  // No qdisc of ours is no error ("Cannot delete qdisc with handle of zero").
  RunShell(absl::StrCat(Tc(), " qdisc del dev ", host_device_, " root 2>&1"));
  RunShell(ShellIn(absl::StrCat(Tc(), " qdisc del dev ", ns_device_, " root 2>&1")));
  // And that it is gone.
  for (const std::string& show : {absl::StrCat(Tc(), " qdisc show dev ", host_device_),
                                  ShellIn(absl::StrCat(Tc(), " qdisc show dev ", ns_device_))}) {
    const ShellResult r = RunShell(show + " 2>&1");
    if (r.output.find("tbf") != std::string::npos || r.output.find("netem") != std::string::npos) {
      return absl::InternalError(absl::StrCat("`", show, "` still shows: ", r.output));
    }
  }
  return absl::OkStatus();
}

}  // namespace moemesh
