// Process-wide settings of the serving processes (the services, and the benchmarks and
// demo that stand in for them). Call once at the start of main, before any thread starts.
#pragma once

namespace moemesh {

inline constexpr int kMallocArenas = 2;

// What a process does: moves token data (router, expert service, the benchmarks and the
// demo), or only control messages (the placement controller).
enum class ProcessRole { kDataPlane, kControlPlane };

// - data plane only: glibc keeps freed memory mapped (mmap threshold at its maximum,
//   32 MB; trimming off), so that the next call's megabyte buffers reuse it instead of
//   being page-faulted in anew (docs/architecture.md, "Transfer tuning"). The controller
//   moves no such buffers and keeps glibc's defaults, which give freed memory back.
// - at most kMallocArenas malloc arenas (glibc's default: 8 per core), unless
//   MALLOC_ARENA_MAX or GLIBC_TUNABLES's glibc.malloc.arena_max says otherwise: memory
//   freed into the arenas of gRPC's many threads stayed there, and a service's RSS climbed
//   for 20 minutes of a soak before it levelled (docs/benchmarks.md, "Soak").
// - absl::Mutex without its deadlock detection, which Debian's abseil (built without
//   NDEBUG) leaves on: it costs every lock a graph update (~0.2 µs against ~0.02 µs), and
//   gRPC's own locks are absl::Mutex (ours are services/base/mutex.h). Tests keep it on.
void ConfigureForServing(ProcessRole role = ProcessRole::kDataPlane);

}  // namespace moemesh
