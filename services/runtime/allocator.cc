#include "services/runtime/allocator.h"

#include <malloc.h>

namespace moemesh {

void ConfigureAllocatorForServing() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // glibc's largest accepted value on 64-bit
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
}

}  // namespace moemesh
