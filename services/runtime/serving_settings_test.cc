#include "services/runtime/serving_settings.h"

#include <gtest/gtest.h>
#include <malloc.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace moemesh {
namespace {

// The number of malloc arenas glibc has made ("<heap nr=" per arena in malloc_info).
int Arenas() {
  char* text = nullptr;
  size_t size = 0;
  FILE* out = open_memstream(&text, &size);
  malloc_info(0, out);
  std::fclose(out);
  const std::string xml(text, size);
  std::free(text);
  int n = 0;
  for (size_t at = xml.find("<heap nr="); at != std::string::npos;
       at = xml.find("<heap nr=", at + 1)) {
    ++n;
  }
  return n;
}

TEST(ServingSettingsTest, ThreadsShareAtMostTheCappedArenas) {
  ASSERT_EQ(std::getenv("MALLOC_ARENA_MAX"), nullptr) << "the test needs glibc's default";
  ConfigureForServing();
  // 16 threads allocating at once: with glibc's default (8 per core) each contended
  // allocation could make a new arena.
  std::vector<std::thread> threads;
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([] {
      std::vector<void*> blocks;
      for (int i = 0; i < 20000; ++i) blocks.push_back(std::malloc(64 + i % 512));
      for (void* b : blocks) std::free(b);
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_LE(Arenas(), kMallocArenas);
}

}  // namespace
}  // namespace moemesh
