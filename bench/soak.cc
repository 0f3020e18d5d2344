// soak: the mesh driven at a fixed rate for a chosen time while expert services are killed
// and restarted and the placement changes; failed requests, latency over time, and the RSS
// and open descriptors of every process (issue 19, item 5).
//
//   soak [--moemesh PATH] [--duration-s 60] [--rate 40] [--clients 8] [--tokens 16]
//        [--expert-services 4] [--never-killed 1] [--routers 2] [--min-replicas 2]
//        [--lease-s 2] [--kill-every-s 15] [--restart-after-s 4] [--rebalance-every-s 10]
//        [--interval-s 10] [--sample-s 1] [--warmup-s W] [--max-rss-growth 0.05]
//        [--fd-slack 2] [--zipf 1.2] [--hidden 64] [--intermediate 128] [--experts 8]
//        [--layers 2] [--json FILE]
//
// A generated Mixtral-layout model, a placement controller, `expert-services` expert
// services and `routers` routers (separate `moemesh` processes, tools/controlled_mesh.h),
// and a load driver (tools/load_driver.h) sending `rate` requests per second over both
// routers on an absolute schedule (latency from each request's due time, so a stall is not
// hidden: no coordinated omission), every answer checked bit for bit against the
// in-process MoeLayer.
//
// Meanwhile, every `kill-every-s` seconds one expert service (in turn, all but the last
// `never-killed`, which live through the whole run) gets SIGKILL and, `restart-after-s`
// later (once the controller has marked it gone), is started again on the same port with
// the same service id; only one is down at a time, so with --min-replicas 2 every expert
// keeps a live replica. Every `rebalance-every-s` seconds the controller is asked for a
// rebalance round and the load switches to another skew (Zipf permutations and uniform, in
// turn), so that the next round moves experts.
//
// Every `sample-s` seconds the RSS (VmRSS of /proc/PID/status; RssAnon, its heap and other
// private part, alongside) and the open descriptors (entries of /proc/PID/fd) of every
// process are read: the controller, each router, each expert service (each of its lives: a
// restarted service is a new process), and this driver (reported, not judged: it keeps
// every sample). Every `interval-s` seconds a line: requests and failures in the interval,
// p50/p99 latency, and each process's RSS and descriptors.
//
// The summary judges each process life on its samples after a warm-up (`warmup-s`,
// default a fifth of the run within [10, 300] s; a restarted life's warm-up is at most
// half of that life): the RSS growth is the median of the last third of those samples over
// the median of the first third, minus one, and must be <= `max-rss-growth`; the
// descriptors are flat when the median of the last third exceeds the median of the first
// third by at most `fd-slack`. A life with fewer than 6 samples after its warm-up is
// reported, not judged. Failed requests: each is looked up in the controller's placement
// polled every half second, to tell whether every expert had a replica on a service that
// was up when it failed (up, not necessarily holding it: see below); the verdict wants no
// failed and no mismatched request at all. Exit status 0 when the verdict passes, 1
// otherwise (the soak_test ctest runs a 60 s soak).
//
// Two diagnostics, not judged: restarts while the placement in force still named the
// killed service (no round re-homed its experts, each had live replicas enough without
// it: the controller then takes the empty new process for their holder and routers refuse
// the next placements, see docs/benchmarks.md), and the longest time the routers served an
// older epoch than the controller's.
#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "services/base/status_macros.h"
#include "services/model/model_generator.h"
#include "services/runtime/flags.h"
#include "tools/controlled_mesh.h"
#include "tools/load_driver.h"

#ifndef MOEMESH_BINARY
#define MOEMESH_BINARY "moemesh"
#endif

namespace moemesh {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
constexpr double kNever = std::numeric_limits<double>::infinity();

struct ProcSample {
  double t_s = 0;
  int64_t rss_kb = 0;   // VmRSS
  int64_t anon_kb = 0;  // RssAnon: the heap and other private memory (VmRSS less the file
                        // pages, i.e. the code and libraries as far as they were touched)
  int fds = 0;
  int threads = 0;
};

// VmRSS and Threads of /proc/PID/status and the count of /proc/PID/fd; nullopt when the
// process is gone.
std::optional<ProcSample> ReadProc(pid_t pid, double t_s) {
  ProcSample s;
  s.t_s = t_s;
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  if (!status) return std::nullopt;
  std::string line;
  bool rss = false;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      s.rss_kb = std::strtoll(line.c_str() + 6, nullptr, 10);
      rss = true;
    } else if (line.rfind("RssAnon:", 0) == 0) {
      s.anon_kb = std::strtoll(line.c_str() + 8, nullptr, 10);
    } else if (line.rfind("Threads:", 0) == 0) {
      s.threads = static_cast<int>(std::strtol(line.c_str() + 8, nullptr, 10));
    }
  }
  if (!rss) return std::nullopt;  // a zombie has no VmRSS
  DIR* d = ::opendir(absl::StrCat("/proc/", pid, "/fd").c_str());
  if (d == nullptr) return std::nullopt;
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') ++s.fds;
  }
  ::closedir(d);
  if (pid == ::getpid()) --s.fds;  // the directory stream just counted
  return s;
}

double Median(std::vector<double> v) { return Percentile(std::move(v), 0.5); }

// One process from its start to its end (a restarted expert service is a new life).
struct Life {
  std::string name;  // "controller", "router-0", "expert-2", "expert-2#2" (its second life)
  std::string slot;  // "expert-2" for all of them
  bool judged = true;
  pid_t pid = -1;
  double start_s = 0, end_s = -1;
  std::vector<ProcSample> samples;
};

struct LifeReport {
  bool judged = false;  // enough samples after the warm-up, and a judged process
  double warmup_s = 0;
  int samples_after_warmup = 0;
  double rss_first_mb = 0, rss_last_mb = 0, rss_growth = 0;  // medians of the thirds
  double anon_first_mb = 0, anon_last_mb = 0;                // the same for RssAnon
  double fds_first = 0, fds_last = 0;                        // medians of the thirds
  int fds_at_start = 0, fds_at_end = 0, fds_max = 0;         // raw samples of the life
  int threads_first = 0, threads_last = 0;
  bool rss_ok = true, fds_ok = true;
};

LifeReport Analyse(const Life& life, double run_end_s, double warmup_s, double max_rss_growth,
                   double fd_slack) {
  LifeReport r;
  if (life.samples.empty()) return r;
  const double end = life.end_s >= 0 ? life.end_s : run_end_s;
  // A long-lived process (started with the mesh) gets the full warm-up; a restarted one at
  // most half of its life.
  r.warmup_s = life.start_s < 1 ? warmup_s : std::min(warmup_s, (end - life.start_s) / 2);
  std::vector<ProcSample> after;
  for (const ProcSample& s : life.samples) {
    if (s.t_s >= life.start_s + r.warmup_s) after.push_back(s);
    r.fds_max = std::max(r.fds_max, s.fds);
  }
  r.fds_at_start = life.samples.front().fds;
  r.fds_at_end = life.samples.back().fds;
  r.samples_after_warmup = static_cast<int>(after.size());
  if (after.size() < 6) return r;
  const size_t third = after.size() / 3;
  std::vector<double> rss_a, rss_b, anon_a, anon_b, fd_a, fd_b;
  for (size_t i = 0; i < third; ++i) {
    rss_a.push_back(static_cast<double>(after[i].rss_kb));
    anon_a.push_back(static_cast<double>(after[i].anon_kb));
    fd_a.push_back(after[i].fds);
    const ProcSample& b = after[after.size() - third + i];
    rss_b.push_back(static_cast<double>(b.rss_kb));
    anon_b.push_back(static_cast<double>(b.anon_kb));
    fd_b.push_back(b.fds);
  }
  r.rss_first_mb = Median(rss_a) / 1024;
  r.rss_last_mb = Median(rss_b) / 1024;
  r.rss_growth = r.rss_first_mb > 0 ? r.rss_last_mb / r.rss_first_mb - 1 : 0;
  r.anon_first_mb = Median(anon_a) / 1024;
  r.anon_last_mb = Median(anon_b) / 1024;
  r.fds_first = Median(fd_a);
  r.fds_last = Median(fd_b);
  r.threads_first = after.front().threads;
  r.threads_last = after.back().threads;
  r.judged = life.judged;
  if (r.judged) {
    r.rss_ok = r.rss_growth <= max_rss_growth;
    r.fds_ok = r.fds_last - r.fds_first <= fd_slack;
  }
  return r;
}

struct Options {
  double duration_s = 60, rate = 40, kill_every_s = 15, restart_after_s = 4, rebalance_every_s = 10,
         interval_s = 10, sample_s = 1, warmup_s = 0, max_rss_growth = 0.05, fd_slack = 2,
         zipf = 1.2, lease_s = 2;
  int64_t clients = 8, tokens = 16, services = 4, routers = 2, min_replicas = 2, never_killed = 1;
  std::string json;
};

class Soak {
 public:
  Soak(const Options& o, ControlledMesh* mesh, LoadDriver* driver,
       const std::vector<TokenSkew>* skews)
      : o_(o), mesh_(mesh), driver_(driver), skews_(skews) {}

  absl::Status Run();

 private:
  double Now() const { return driver_->elapsed_s(); }
  // Sleeps until `t_s` (since the driver's start) or Stop; false when stopped.
  bool SleepUntil(double t_s);
  void AddLife(const std::string& slot, const std::string& name, pid_t pid, bool judged);
  void EndLife(const std::string& slot);
  void Event(const std::string& what);
  void SampleProcesses();
  void Chaos();
  void Watch();
  // Whether every expert had a replica on a live service throughout [from, to].
  bool Covered(double from, double to) const;
  void PrintInterval(double from, double to, const std::vector<LoadDriver::Sample>& s);

  const Options o_;
  ControlledMesh* mesh_;
  LoadDriver* driver_;
  const std::vector<TokenSkew>* skews_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::vector<Life> lives_;
  std::vector<std::string> slots_;              // in the order they were added
  std::map<std::string, size_t> current_;       // slot → its life now (absent: down)
  std::set<std::string> down_;                  // endpoints of the services killed, not back
  std::vector<std::pair<double, bool>> cover_;  // (time, every expert had a live replica)
  std::vector<std::pair<double, std::string>> events_;
  absl::Status chaos_status_;
  int kills_ = 0, restarts_ = 0, rebalances_ = 0, skipped_kills_ = 0, stale_restarts_ = 0;
  double behind_since_ = -1, longest_behind_s_ = 0;
  int64_t replicas_added_ = 0, replicas_removed_ = 0;
  uint64_t first_epoch_ = 0, last_epoch_ = 0;
  int min_live_replicas_ = std::numeric_limits<int>::max();
  std::vector<nlohmann::json> intervals_;
};

bool Soak::SleepUntil(double t_s) {
  std::unique_lock<std::mutex> lock(mu_);
  if (std::isinf(t_s)) {
    cv_.wait(lock, [&] { return stop_; });
    return false;
  }
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(std::max(0.0, t_s - Now())));
  return !cv_.wait_until(lock, until, [&] { return stop_; });
}

void Soak::AddLife(const std::string& slot, const std::string& name, pid_t pid, bool judged) {
  std::lock_guard<std::mutex> lock(mu_);
  Life l;
  l.name = name;
  l.slot = slot;
  l.pid = pid;
  l.judged = judged;
  l.start_s = Now();
  if (std::find(slots_.begin(), slots_.end(), slot) == slots_.end()) slots_.push_back(slot);
  current_[slot] = lives_.size();
  lives_.push_back(std::move(l));
}

void Soak::EndLife(const std::string& slot) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = current_.find(slot);
  if (it == current_.end()) return;
  lives_[it->second].end_s = Now();
  current_.erase(it);
}

void Soak::Event(const std::string& what) {
  const double t = Now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.emplace_back(t, what);
  }
  std::fprintf(stderr, "soak [%7.1fs] %s\n", t, what.c_str());
}

void Soak::SampleProcesses() {
  std::lock_guard<std::mutex> lock(mu_);
  const double t = Now();
  for (const auto& [slot, i] : current_) {
    std::optional<ProcSample> s = ReadProc(lives_[i].pid, t);
    if (s.has_value()) lives_[i].samples.push_back(*s);
  }
}

void Soak::Chaos() {
  const int services = static_cast<int>(o_.services);
  double next_kill = o_.kill_every_s > 0 ? o_.kill_every_s : kNever;
  double next_rebalance = o_.rebalance_every_s > 0 ? o_.rebalance_every_s : kNever;
  double restart_at = kNever;
  int down = -1;
  size_t skew = 0;
  while (true) {
    const double next = std::min({next_kill, next_rebalance, restart_at});
    if (next >= o_.duration_s && down < 0) {
      SleepUntil(kNever);
      return;
    }
    if (!SleepUntil(next)) return;
    const double now = Now();
    if (down >= 0 && now >= restart_at) {
      const std::string endpoint = mesh_->expert_endpoints()[down];
      // Restarted before its lease ran out, it would register as the same live member
      // while holding nothing: wait until the controller has let it go.
      const absl::Status gone = mesh_->WaitForState(
          [&](const v1::ControllerState& s) {
            for (const v1::ServiceState& m : s.services()) {
              if (m.endpoint() == endpoint) return m.state() == "gone";
            }
            return true;
          },
          std::chrono::seconds(30));
      if (!gone.ok()) Event(absl::StrCat("expert-", down, " still not gone: ", gone.ToString()));
      // A placement that still names it (no round has re-homed its experts: each kept enough
      // live replicas without it) then names the restarted, empty process as their holder.
      if (absl::StatusOr<v1::ControllerState> st = mesh_->State(); st.ok()) {
        int named = 0;
        for (const v1::PlacementEntry& e : st->placement().entries()) {
          for (const std::string& r : e.replicas()) named += r == endpoint;
        }
        if (named > 0) {
          {
            std::lock_guard<std::mutex> lock(mu_);
            ++stale_restarts_;
          }
          Event(absl::StrCat("expert-", down, " restarts while the placement in force (epoch ",
                             st->placement().epoch(), ") still names it for ", named, " experts"));
        }
      }
      const absl::Status restarted = mesh_->RestartExpert(down);
      if (!restarted.ok()) {
        std::lock_guard<std::mutex> lock(mu_);
        chaos_status_ = absl::InternalError(
            absl::StrCat("restarting expert-", down, ": ", restarted.ToString()));
        return;
      }
      int lives = 1;
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (const Life& l : lives_) lives += l.slot == absl::StrCat("expert-", down);
        down_.erase(endpoint);
        ++restarts_;
      }
      AddLife(absl::StrCat("expert-", down), absl::StrCat("expert-", down, "#", lives),
              mesh_->expert_process(down).pid(), true);
      Event(absl::StrCat("restarted expert-", down, " on ", endpoint, " (pid ",
                         mesh_->expert_process(down).pid(), ")"));
      down = -1;
      restart_at = kNever;
      continue;
    }
    if (now >= next_kill) {
      next_kill += o_.kill_every_s;
      // One service down at a time, and back before the end.
      if (down >= 0 || now + o_.restart_after_s + 2 * o_.lease_s + 5 > o_.duration_s) {
        if (down >= 0) {
          std::lock_guard<std::mutex> lock(mu_);
          ++skipped_kills_;
        }
        continue;
      }
      int victim;
      {
        std::lock_guard<std::mutex> lock(mu_);
        victim = kills_ % (services - static_cast<int>(o_.never_killed));
        ++kills_;
        down_.insert(mesh_->expert_endpoints()[victim]);
      }
      const pid_t pid = mesh_->expert_process(victim).pid();
      EndLife(absl::StrCat("expert-", victim));
      mesh_->expert_process(victim).Signal(SIGKILL, /*wait=*/true);
      Event(absl::StrCat("SIGKILL expert-", victim, " (pid ", pid, ")"));
      down = victim;
      restart_at = Now() + o_.restart_after_s;
      continue;
    }
    if (now >= next_rebalance) {
      next_rebalance += o_.rebalance_every_s;
      const absl::StatusOr<v1::RebalanceResponse> r = mesh_->Rebalance();
      skew = (skew + 1) % skews_->size();
      driver_->SetSkew(&(*skews_)[skew]);
      if (!r.ok()) {
        Event(absl::StrCat("rebalance failed: ", r.status().ToString()));
        continue;
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++rebalances_;
        replicas_added_ += r->added();
        replicas_removed_ += r->removed();
      }
      Event(absl::StrCat("rebalance: epoch ", r->epoch(), ", +", r->added(), " -", r->removed(),
                         " replicas", r->note().empty() ? "" : absl::StrCat(" (", r->note(), ")"),
                         "; load now skew ", skew));
    }
  }
}

void Soak::Watch() {
  const double period = 0.5;
  for (double t = Now(); SleepUntil(t + period); t = Now()) {
    absl::StatusOr<v1::ControllerState> s = mesh_->State();
    if (!s.ok()) continue;
    std::lock_guard<std::mutex> lock(mu_);
    bool covered = true;
    for (const v1::PlacementEntry& e : s->placement().entries()) {
      int live = 0;
      for (const std::string& r : e.replicas()) live += down_.count(r) == 0;
      covered = covered && live > 0;
      min_live_replicas_ = std::min(min_live_replicas_, live);
    }
    cover_.emplace_back(Now(), covered);
    // Routers serving an older epoch than the controller's (a refused placement).
    bool behind = false;
    for (const v1::RouterState& r : s->routers()) {
      behind = behind || (r.connected() && r.acked_epoch() < s->placement().epoch());
    }
    if (!behind) {
      behind_since_ = -1;
    } else {
      if (behind_since_ < 0) behind_since_ = Now();
      longest_behind_s_ = std::max(longest_behind_s_, Now() - behind_since_);
    }
    if (first_epoch_ == 0) first_epoch_ = s->placement().epoch();
    last_epoch_ = s->placement().epoch();
  }
}

bool Soak::Covered(double from, double to) const {
  // The last poll before `from` and every poll up to `to`.
  bool covered = true;
  for (size_t i = 0; i < cover_.size(); ++i) {
    const bool last_before =
        cover_[i].first < from && (i + 1 == cover_.size() || cover_[i + 1].first >= from);
    if (last_before || (cover_[i].first >= from && cover_[i].first <= to)) {
      covered = covered && cover_[i].second;
    }
  }
  return covered;
}

void Soak::PrintInterval(double from, double to, const std::vector<LoadDriver::Sample>& s) {
  std::vector<double> lat;
  int64_t failed = 0;
  for (const LoadDriver::Sample& x : s) {
    lat.push_back(x.latency_ms);
    failed += !x.ok;
  }
  const double p50 = Percentile(lat, 0.5), p99 = Percentile(lat, 0.99);
  std::string line = absl::StrFormat("[%6.0fs] requests %5d failed %d p50 %7.2f ms p99 %7.2f ms |",
                                     to, s.size(), failed, p50, p99);
  nlohmann::json j;
  j["from_s"] = from;
  j["to_s"] = to;
  j["requests"] = s.size();
  j["failed"] = failed;
  j["p50_ms"] = p50;
  j["p99_ms"] = p99;
  std::lock_guard<std::mutex> lock(mu_);
  for (const std::string& slot : slots_) {
    auto it = current_.find(slot);
    if (it == current_.end()) {
      absl::StrAppend(&line, " ", slot, " down |");
      j["processes"][slot] = nullptr;
      continue;
    }
    const Life& l = lives_[it->second];
    if (l.samples.empty()) continue;
    const ProcSample& p = l.samples.back();
    absl::StrAppend(&line,
                    absl::StrFormat(" %s %.1f MB %d fd |", l.name, p.rss_kb / 1024.0, p.fds));
    j["processes"][l.name] = {
        {"rss_kb", p.rss_kb}, {"anon_kb", p.anon_kb}, {"fds", p.fds}, {"threads", p.threads}};
  }
  intervals_.push_back(std::move(j));
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

absl::Status Soak::Run() {
  AddLife("controller", "controller", mesh_->controller_process().pid(), true);
  for (int i = 0; i < static_cast<int>(o_.routers); ++i) {
    AddLife(absl::StrCat("router-", i), absl::StrCat("router-", i), mesh_->router_process(i).pid(),
            true);
  }
  for (int i = 0; i < static_cast<int>(o_.services); ++i) {
    AddLife(absl::StrCat("expert-", i), absl::StrCat("expert-", i), mesh_->expert_process(i).pid(),
            true);
  }
  // This process keeps every sample: reported, not judged.
  AddLife("driver", "driver", ::getpid(), false);
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (Life& l : lives_) l.start_s = 0;
  }
  SampleProcesses();
  std::thread chaos([this] { Chaos(); });
  std::thread watch([this] { Watch(); });

  size_t seen = 0;
  double interval_from = Now();
  double next_sample = Now() + o_.sample_s, next_line = Now() + o_.interval_s;
  while (true) {
    const double next = std::min({next_sample, next_line, o_.duration_s});
    std::this_thread::sleep_for(std::chrono::duration<double>(std::max(0.0, next - Now())));
    if (Now() >= next_sample) {
      SampleProcesses();
      next_sample += o_.sample_s;
    }
    const bool end = Now() >= o_.duration_s;
    if (Now() >= next_line || end) {
      const std::vector<LoadDriver::Sample> s = driver_->samples_from(seen);
      seen += s.size();
      PrintInterval(interval_from, Now(), s);
      interval_from = Now();
      next_line += o_.interval_s;
    }
    if (end) break;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!chaos_status_.ok()) break;
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  chaos.join();
  watch.join();
  driver_->Stop();
  const double run_end = Now();

  // The summary.
  const std::vector<LoadDriver::Sample> all = driver_->samples();
  const LoadDriver::Totals totals = driver_->totals();
  const double warmup_s =
      o_.warmup_s > 0 ? o_.warmup_s : std::clamp(o_.duration_s / 5, 10.0, 300.0);
  std::lock_guard<std::mutex> lock(mu_);
  int64_t failed_covered = 0;
  std::vector<double> failed_at;
  for (const LoadDriver::Sample& s : all) {
    if (s.ok) continue;
    failed_at.push_back(s.at_s);
    failed_covered += Covered(s.at_s - s.service_ms / 1000, s.at_s);
  }
  std::vector<double> lat;
  for (const LoadDriver::Sample& s : all) lat.push_back(s.latency_ms);
  nlohmann::json summary;
  summary["duration_s"] = o_.duration_s;
  summary["rate"] = o_.rate;
  summary["achieved_rate"] = run_end > 0 ? static_cast<double>(totals.requests) / run_end : 0;
  summary["requests"] = totals.requests;
  summary["failed"] = totals.failed;
  summary["failed_with_live_replica"] = failed_covered;
  summary["failed_at_s"] = failed_at;
  summary["mismatched"] = totals.mismatched;
  summary["first_error"] = totals.first_error;
  summary["p50_ms"] = Percentile(lat, 0.5);
  summary["p99_ms"] = Percentile(lat, 0.99);
  summary["p999_ms"] = Percentile(lat, 0.999);
  summary["max_ms"] = Percentile(lat, 1);
  summary["kills"] = kills_;
  summary["restarts"] = restarts_;
  summary["skipped_kills"] = skipped_kills_;
  summary["restarts_while_named"] = stale_restarts_;
  summary["longest_routers_behind_s"] = longest_behind_s_;
  summary["rebalances"] = rebalances_;
  summary["replicas_added"] = replicas_added_;
  summary["replicas_removed"] = replicas_removed_;
  summary["epochs"] = {first_epoch_, last_epoch_};
  summary["min_live_replicas"] =
      min_live_replicas_ == std::numeric_limits<int>::max() ? -1 : min_live_replicas_;
  summary["warmup_s"] = warmup_s;
  summary["max_rss_growth"] = o_.max_rss_growth;
  summary["fd_slack"] = o_.fd_slack;
  summary["intervals"] = intervals_;
  for (const auto& [t, what] : events_) summary["events"].push_back({{"t_s", t}, {"what", what}});

  std::vector<std::string> problems;
  if (!chaos_status_.ok()) problems.push_back(std::string(chaos_status_.message()));
  if (totals.failed > 0) {
    problems.push_back(
        absl::StrCat(totals.failed, " failed requests (", failed_covered,
                     " with a live replica for every expert): ", totals.first_error));
  }
  if (totals.mismatched > 0) {
    problems.push_back(absl::StrCat(totals.mismatched, " answers differed from MoeLayer's"));
  }
  std::printf(
      "summary: %lld requests in %.0f s (%.1f/s), %lld failed (%lld with a live replica), "
      "%lld mismatched; latency p50 %.2f ms p99 %.2f ms p99.9 %.2f ms max %.2f ms; "
      "%d kills, %d restarts, %d rebalances (+%lld -%lld replicas, epochs %llu..%llu); "
      "%d restarts while the placement still named the service, routers behind the "
      "controller's epoch for at most %.1f s; warm-up %.0f s\n",
      static_cast<long long>(totals.requests), run_end, summary["achieved_rate"].get<double>(),
      static_cast<long long>(totals.failed), static_cast<long long>(failed_covered),
      static_cast<long long>(totals.mismatched), summary["p50_ms"].get<double>(),
      summary["p99_ms"].get<double>(), summary["p999_ms"].get<double>(),
      summary["max_ms"].get<double>(), kills_, restarts_, rebalances_,
      static_cast<long long>(replicas_added_), static_cast<long long>(replicas_removed_),
      static_cast<unsigned long long>(first_epoch_), static_cast<unsigned long long>(last_epoch_),
      stale_restarts_, longest_behind_s_, warmup_s);
  std::printf("%-14s %6s %6s %7s %8s %8s %7s %8s %8s %5s %5s %6s %6s %8s  %s\n", "process",
              "from_s", "to_s", "samples", "rss0_MB", "rss1_MB", "growth", "anon0_MB", "anon1_MB",
              "fd0", "fd1", "fd_end", "fd_max", "threads", "verdict");
  for (const Life& l : lives_) {
    const LifeReport r = Analyse(l, run_end, warmup_s, o_.max_rss_growth, o_.fd_slack);
    std::string verdict =
        !l.judged   ? "not judged"
        : !r.judged ? absl::StrCat("too short (", r.samples_after_warmup, " samples after warm-up)")
                    : (r.rss_ok && r.fds_ok ? "ok" : "");
    if (r.judged && !r.rss_ok) {
      absl::StrAppend(&verdict, "RSS grew ");
      problems.push_back(absl::StrFormat("%s: RSS grew %.1f%% after warm-up (%.1f -> %.1f MB)",
                                         l.name, 100 * r.rss_growth, r.rss_first_mb,
                                         r.rss_last_mb));
    }
    if (r.judged && !r.fds_ok) {
      absl::StrAppend(&verdict, "descriptors grew");
      problems.push_back(absl::StrFormat("%s: open descriptors grew from %.0f to %.0f", l.name,
                                         r.fds_first, r.fds_last));
    }
    const double to = l.end_s >= 0 ? l.end_s : run_end;
    std::printf(
        "%-14s %6.0f %6.0f %7d %8.1f %8.1f %6.1f%% %8.1f %8.1f %5.0f %5.0f %6d %6d %3d->%-4d  %s\n",
        l.name.c_str(), l.start_s, to, static_cast<int>(l.samples.size()), r.rss_first_mb,
        r.rss_last_mb, 100 * r.rss_growth, r.anon_first_mb, r.anon_last_mb, r.fds_first, r.fds_last,
        r.fds_at_end, r.fds_max, r.threads_first, r.threads_last, verdict.c_str());
    nlohmann::json j;
    j["name"] = l.name;
    j["pid"] = l.pid;
    j["from_s"] = l.start_s;
    j["to_s"] = to;
    j["samples"] = l.samples.size();
    j["warmup_s"] = r.warmup_s;
    j["samples_after_warmup"] = r.samples_after_warmup;
    j["judged"] = r.judged;
    j["rss_first_third_mb"] = r.rss_first_mb;
    j["anon_first_third_mb"] = r.anon_first_mb;
    j["anon_last_third_mb"] = r.anon_last_mb;
    j["rss_last_third_mb"] = r.rss_last_mb;
    j["rss_growth"] = r.rss_growth;
    j["rss_start_mb"] = l.samples.empty() ? 0.0 : l.samples.front().rss_kb / 1024.0;
    j["rss_end_mb"] = l.samples.empty() ? 0.0 : l.samples.back().rss_kb / 1024.0;
    j["fds_first_third"] = r.fds_first;
    j["fds_last_third"] = r.fds_last;
    j["fds_start"] = r.fds_at_start;
    j["fds_end"] = r.fds_at_end;
    j["fds_max"] = r.fds_max;
    j["threads_first"] = r.threads_first;
    j["threads_last"] = r.threads_last;
    j["rss_ok"] = r.rss_ok;
    j["fds_ok"] = r.fds_ok;
    for (const ProcSample& p : l.samples) {
      j["samples_t_rss_anon_fds_threads"].push_back({p.t_s, p.rss_kb, p.anon_kb, p.fds, p.threads});
    }
    summary["processes"].push_back(std::move(j));
  }
  summary["pass"] = problems.empty();
  summary["problems"] = problems;
  std::printf(
      "verdict: %s (targets: 0 failed, RSS growth <= %.0f%% after warm-up, descriptors "
      "flat within %.0f)\n",
      problems.empty() ? "PASS" : "FAIL", 100 * o_.max_rss_growth, o_.fd_slack);
  for (const std::string& p : problems) std::printf("  %s\n", p.c_str());
  std::fflush(stdout);
  if (!o_.json.empty()) {
    std::ofstream out(o_.json);
    out << summary.dump(1) << "\n";
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", o_.json));
  }
  if (!problems.empty()) return absl::InternalError("the soak failed its targets");
  return absl::OkStatus();
}

absl::Status Run(const CliArgs& args) {
  Options o;
  ASSIGN_OR_RETURN(o.duration_s, args.Double("duration-s", 60));
  ASSIGN_OR_RETURN(o.rate, args.Double("rate", 40));
  ASSIGN_OR_RETURN(o.clients, args.Int("clients", 8));
  ASSIGN_OR_RETURN(o.tokens, args.Int("tokens", 16));
  ASSIGN_OR_RETURN(o.services, args.Int("expert-services", 4));
  ASSIGN_OR_RETURN(o.routers, args.Int("routers", 2));
  ASSIGN_OR_RETURN(o.min_replicas, args.Int("min-replicas", 2));
  ASSIGN_OR_RETURN(o.never_killed, args.Int("never-killed", 1));
  ASSIGN_OR_RETURN(o.lease_s, args.Double("lease-s", 2));
  ASSIGN_OR_RETURN(o.kill_every_s, args.Double("kill-every-s", 15));
  ASSIGN_OR_RETURN(o.restart_after_s, args.Double("restart-after-s", 4));
  ASSIGN_OR_RETURN(o.rebalance_every_s, args.Double("rebalance-every-s", 10));
  ASSIGN_OR_RETURN(o.interval_s, args.Double("interval-s", 10));
  ASSIGN_OR_RETURN(o.sample_s, args.Double("sample-s", 1));
  ASSIGN_OR_RETURN(o.warmup_s, args.Double("warmup-s", 0));
  ASSIGN_OR_RETURN(o.max_rss_growth, args.Double("max-rss-growth", 0.05));
  ASSIGN_OR_RETURN(o.fd_slack, args.Double("fd-slack", 2));
  ASSIGN_OR_RETURN(o.zipf, args.Double("zipf", 1.2));
  o.json = args.String("json", "");
  GenModelOptions g = SmallModelOptions(ModelFamily::kMixtral);
  ASSIGN_OR_RETURN(g.hidden, args.Int("hidden", 64));
  ASSIGN_OR_RETURN(g.intermediate, args.Int("intermediate", 128));
  ASSIGN_OR_RETURN(g.experts, args.Int("experts", 8));
  ASSIGN_OR_RETURN(g.layers, args.Int("layers", 2));
  g.dtype = DType::kBF16;
  if (!(o.duration_s > 0) || !(o.rate > 0) || o.clients < 1 || o.tokens < 1 || o.services < 2 ||
      o.never_killed < 0 || o.never_killed >= o.services || o.routers < 1 || o.min_replicas < 1 ||
      !(o.lease_s > 0) || o.kill_every_s < 0 || o.restart_after_s < 0 || o.rebalance_every_s < 0 ||
      !(o.interval_s > 0) || !(o.sample_s > 0) || o.warmup_s < 0 || o.max_rss_growth < 0 ||
      o.fd_slack < 0 || !(o.zipf > 0)) {
    return absl::InvalidArgumentError(
        "need --duration-s, --rate, --lease-s, --interval-s, --sample-s, --zipf > 0, "
        "--clients, --tokens, --routers, --min-replicas >= 1, --expert-services >= 2, "
        "--never-killed < --expert-services, and the rest >= 0");
  }
  if (o.kill_every_s > 0 && o.min_replicas < 2) {
    std::fprintf(stderr,
                 "soak: note: with --min-replicas 1 a killed service's experts have no replica "
                 "until they are re-homed: requests may fail\n");
  }

  const std::string dir = (fs::temp_directory_path() / absl::StrCat("soak_", ::getpid())).string();
  struct Cleanup {
    std::string dir;
    ~Cleanup() {
      std::error_code ignored;
      fs::remove_all(dir, ignored);
    }
  } cleanup{dir};
  ASSIGN_OR_RETURN(GeneratedModel m, GenerateAndOpen(dir, g));

  ControlledMeshOptions mo;
  mo.moemesh_binary = args.String("moemesh", MOEMESH_BINARY);
  mo.model_dir = m.dir;
  mo.num_expert_services = static_cast<int>(o.services);
  mo.num_routers = static_cast<int>(o.routers);
  mo.min_replicas = static_cast<int>(o.min_replicas);
  mo.lease_s = o.lease_s;
  mo.rebalance_interval_s = 0;  // rounds when the soak asks (and repairs)
  mo.load_window_s = std::max(1.0, std::min(5.0, o.rebalance_every_s / 2));
  mo.load_report_s = 0.3;
  ASSIGN_OR_RETURN(std::unique_ptr<ControlledMesh> mesh, ControlledMesh::Start(mo));
  // Wait for the first placement to give every expert its replicas.
  RETURN_IF_ERROR(mesh->WaitForState(
      [&](const v1::ControllerState& s) {
        if (s.placement().entries_size() == 0) return false;
        for (const v1::PlacementEntry& e : s.placement().entries()) {
          if (e.replicas_size() < std::min<int64_t>(o.min_replicas, o.services)) return false;
        }
        return true;
      },
      std::chrono::seconds(60)));

  // Skews the load cycles through at each rebalance: Zipf permutations, then uniform.
  std::vector<TokenSkew> skews;
  for (uint64_t seed = 100; seed < 104; ++seed) {
    ASSIGN_OR_RETURN(TokenSkew s, TokenSkew::Zipf(*m.ckpt, m.config, o.zipf, seed));
    skews.push_back(std::move(s));
  }
  ASSIGN_OR_RETURN(TokenSkew uniform, TokenSkew::Uniform(*m.ckpt, m.config));
  skews.push_back(std::move(uniform));

  LoadDriverOptions lo;
  lo.routers = mesh->router_endpoints();
  lo.clients = static_cast<int>(o.clients);
  lo.tokens = o.tokens;
  lo.rate = o.rate;
  ASSIGN_OR_RETURN(std::unique_ptr<LoadDriver> driver,
                   LoadDriver::Start(lo, *m.ckpt, m.config, &skews[0]));
  std::printf(
      "soak: %lld expert services, %lld routers, min replicas %lld, %.0f requests/s from %lld "
      "clients for %.0f s; SIGKILL every %.0f s (back after %.0f s), rebalance every %.0f s\n",
      static_cast<long long>(o.services), static_cast<long long>(o.routers),
      static_cast<long long>(o.min_replicas), o.rate, static_cast<long long>(o.clients),
      o.duration_s, o.kill_every_s, o.restart_after_s, o.rebalance_every_s);
  std::fflush(stdout);
  Soak soak(o, mesh.get(), driver.get(), &skews);
  return soak.Run();
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  const std::set<std::string> flags = {"moemesh",
                                       "duration-s",
                                       "rate",
                                       "clients",
                                       "tokens",
                                       "expert-services",
                                       "never-killed",
                                       "routers",
                                       "min-replicas",
                                       "lease-s",
                                       "kill-every-s",
                                       "restart-after-s",
                                       "rebalance-every-s",
                                       "interval-s",
                                       "sample-s",
                                       "warmup-s",
                                       "max-rss-growth",
                                       "fd-slack",
                                       "zipf",
                                       "hidden",
                                       "intermediate",
                                       "experts",
                                       "layers",
                                       "json"};
  absl::StatusOr<moemesh::CliArgs> args =
      moemesh::CliArgs::Parse(std::vector<std::string>(argv + 1, argv + argc), flags);
  absl::Status s = args.ok() ? moemesh::Run(*args) : args.status();
  if (!s.ok()) {
    std::fprintf(stderr, "soak: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
