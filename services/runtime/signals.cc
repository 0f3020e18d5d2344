#include "services/runtime/signals.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

namespace moemesh {
namespace {

sigset_t StopSet() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  return set;
}

// Threads that libraries started before main (OpenBLAS's pool) do not block the stop
// signals, and the kernel hands a process-directed signal to any thread that does not
// block it: there the default action would kill the process. So a handler catches it
// and only writes its number to a pipe, which WaitForStopSignal reads.
int stop_pipe[2] = {-1, -1};

void OnStopSignal(int sig) {
  const int saved = errno;
  const unsigned char b = static_cast<unsigned char>(sig);
  [[maybe_unused]] const ssize_t n = ::write(stop_pipe[1], &b, 1);
  errno = saved;
}

}  // namespace

void BlockStopSignals() {
  if (stop_pipe[0] < 0 && ::pipe2(stop_pipe, O_CLOEXEC | O_NONBLOCK) == 0) {
    struct sigaction sa {};
    sa.sa_handler = &OnStopSignal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    ::sigaction(SIGTERM, &sa, nullptr);
    ::sigaction(SIGINT, &sa, nullptr);
  }
  const sigset_t set = StopSet();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int WaitForStopSignal() {
  // Either the signal is pending for the process (every thread blocks it: read it from
  // a signalfd) or another thread's handler took it (read it from the pipe).
  const sigset_t set = StopSet();
  const int sfd = ::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  while (true) {
    pollfd fds[2] = {{sfd, POLLIN, 0}, {stop_pipe[0], POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) continue;  // EINTR
    if (fds[0].revents & POLLIN) {
      signalfd_siginfo info{};
      if (::read(sfd, &info, sizeof info) == sizeof info) {
        ::close(sfd);
        return static_cast<int>(info.ssi_signo);
      }
    }
    if (fds[1].revents & POLLIN) {
      unsigned char b = 0;
      if (::read(stop_pipe[0], &b, 1) == 1) {
        ::close(sfd);
        return b;
      }
    }
  }
}

void StopWithParent() {
  const char* env = std::getenv(kParentPidEnv);
  if (env == nullptr) return;
  const pid_t parent = static_cast<pid_t>(std::atol(env));
  ::prctl(PR_SET_PDEATHSIG, SIGTERM);
  // The parent may have died before prctl: then nobody will send the signal.
  if (::getppid() != parent) ::kill(::getpid(), SIGTERM);
}

}  // namespace moemesh
