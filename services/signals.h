// Graceful-stop plumbing shared by the service mains: SIGTERM and SIGINT are blocked in
// every thread (call BlockStopSignals before starting any), and the main thread waits
// for one with WaitForStopSignal, then drains — no work inside a signal handler.
#pragma once

namespace moemesh {

void BlockStopSignals();
// Returns the signal number received (SIGTERM or SIGINT).
int WaitForStopSignal();

}  // namespace moemesh
