// Graceful-stop plumbing shared by the service mains: SIGTERM and SIGINT are blocked in
// every thread (call BlockStopSignals before starting any), and the main thread waits
// for one with WaitForStopSignal, then drains — no work inside a signal handler. Threads
// started before main (OpenBLAS's) do not block them: a handler that only writes the
// signal's number to a pipe catches it there, instead of the default action killing the
// process.
#pragma once

namespace moemesh {

void BlockStopSignals();
// Returns the signal number received (SIGTERM or SIGINT).
int WaitForStopSignal();

// When the environment names a parent (kParentPidEnv, set by the launcher that started
// this service, tools/process.h), this process gets SIGTERM when that parent dies, so
// a killed launcher (demo, tests, benchmarks) leaves no orphaned services behind. Call
// after BlockStopSignals: the signal then drains the service like any other SIGTERM.
void StopWithParent();
inline constexpr char kParentPidEnv[] = "MOEMESH_PARENT_PID";

}  // namespace moemesh
