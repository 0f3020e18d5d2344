// A child process started from this binary or another one, with its stdout read for the
// "listening on HOST:PORT" line every MoE Mesh service prints when it is ready. The
// destructor stops it (SIGTERM, then SIGKILL after a grace period); a service also
// stops by itself when this process dies (it gets MOEMESH_PARENT_PID).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace moemesh {

class ChildProcess {
 public:
  // Starts `argv[0]` (a path) with `argv`; stderr is inherited.
  static absl::StatusOr<std::unique_ptr<ChildProcess>> Start(const std::vector<std::string>& argv);
  ~ChildProcess();

  // Reads stdout until "listening on HOST:PORT"; returns "HOST:PORT".
  absl::StatusOr<std::string> WaitListening(std::chrono::milliseconds timeout);
  // Reads stdout until a line starting with `prefix`; returns the rest of that line.
  absl::StatusOr<std::string> WaitForLine(const std::string& prefix,
                                          std::chrono::milliseconds timeout);
  pid_t pid() const { return pid_; }
  // Sends `sig`; with wait, reaps the child and returns its exit code (128+sig if killed).
  int Signal(int sig, bool wait);
  // Sends SIGSTOP and returns once every thread of the child has stopped (a running
  // thread stops only when it next enters the kernel); false if it did not within 5 s.
  bool Stop();
  bool running() const { return pid_ > 0; }

 private:
  ChildProcess() = default;
  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  std::string buffer_;
};

// This executable's path (for launching its own subcommands).
std::string SelfExecutable();

// Runs `command` with /bin/sh and waits for it: its exit code (-1 if it did not exit) and
// its stdout (add "2>&1" to the command for stderr too).
struct ShellResult {
  int exit_code = -1;
  std::string output;
};
ShellResult RunShell(const std::string& command);

}  // namespace moemesh
