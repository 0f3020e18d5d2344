// Allocator settings for the serving processes.
#pragma once

namespace moemesh {

// Keeps freed memory mapped so the next call's buffers reuse it: glibc serves blocks
// above 128 KB (gRPC's message slices, protobuf byte fields) with fresh mmaps and hands
// freed heap tops back to the kernel, so every call of megabytes page-faults all of
// its buffers in again. Page faults are slow everywhere and very slow in some VMs
// (5x lower gRPC throughput on the development machine). Sets glibc's mmap threshold to
// its maximum (32 MB) and turns trimming off. Call once at the start of main.
void ConfigureAllocatorForServing();

}  // namespace moemesh
