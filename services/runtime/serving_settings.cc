#include "services/runtime/serving_settings.h"

#include <malloc.h>

#include "absl/synchronization/mutex.h"

namespace moemesh {

void ConfigureForServing() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // glibc's largest accepted value on 64-bit
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

}  // namespace moemesh
