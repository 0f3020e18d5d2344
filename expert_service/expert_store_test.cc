#include "expert_service/expert_store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "services/model/model_generator.h"

namespace moemesh {
namespace {

using ::testing::HasSubstr;

// A small checkpoint of `family` (2 layers; DeepSeek's layer 0 is dense), once per test.
std::string Generate(ModelFamily family) {
  const std::string dir = (std::filesystem::path(::testing::TempDir()) /
                           absl::StrCat("expert_store_test_", FamilyName(family)))
                              .string();
  EXPECT_TRUE(GenerateModel(dir, SmallModelOptions(family)).ok());
  return dir;
}

std::unique_ptr<ExpertStore> Open(ModelFamily family) {
  auto store = ExpertStore::Open(Generate(family));
  EXPECT_TRUE(store.ok()) << store.status();
  return std::move(store).value();
}

bool SameBytes(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

TEST(ExpertStoreTest, LoadGetListAndBytes) {
  const std::string dir = Generate(ModelFamily::kMixtral);
  auto store = ExpertStore::Open(dir).value();
  EXPECT_EQ(store->size(), 0);
  EXPECT_EQ(store->weight_bytes(), 0);
  ASSERT_TRUE(store->Load({{1, 5}, {0, 2}, {1, 5}}).ok());
  EXPECT_EQ(store->List(), (std::vector<ExpertKey>{{0, 2}, {1, 5}}));
  EXPECT_EQ(store->size(), 2);

  auto ckpt = Checkpoint::Open(dir).value();
  const ExpertWeights want = LoadExpert(*ckpt, store->config(), 1, 5).value();
  auto got = store->Get(1, 5);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(SameBytes((*got)->gate_up, want.gate_up));
  EXPECT_TRUE(SameBytes((*got)->down, want.down));
  EXPECT_EQ(store->weight_bytes(), 2 * want.bytes());
}

TEST(ExpertStoreTest, LoadIsIdempotent) {
  auto store = Open(ModelFamily::kMixtral);
  ASSERT_TRUE(store->Load({{0, 1}}).ok());
  const auto first = store->Get(0, 1).value();
  const int64_t bytes = store->weight_bytes();
  ASSERT_TRUE(store->Load({{0, 1}}).ok());
  EXPECT_EQ(store->Get(0, 1).value(), first);  // the held copy stays
  EXPECT_EQ(store->weight_bytes(), bytes);
  EXPECT_EQ(store->size(), 1);
}

TEST(ExpertStoreTest, BadPairsAreNamedAndLoadIsAllOrNothing) {
  auto store = Open(ModelFamily::kDeepseekV3);
  struct Case {
    ExpertKey key;
    const char* message;
  };
  for (const Case& c : {Case{{1, 8}, "layer 1 expert 8: expert out of range [0, 8)"},
                        Case{{1, -1}, "layer 1 expert -1: expert out of range"},
                        Case{{0, 0}, "layer 0 expert 0: layer 0 is a dense layer"},
                        Case{{7, 3}, "layer 7 expert 3: layer 7 does not exist"},
                        Case{{-1, 3}, "layer -1 expert 3"}}) {
    const absl::Status s = store->Load({{1, 3}, c.key});
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.message));
    EXPECT_EQ(store->size(), 0) << "a failed Load must load nothing";
    const absl::Status u = store->Unload({c.key});
    EXPECT_EQ(u.code(), absl::StatusCode::kInvalidArgument) << u;
    EXPECT_THAT(std::string(u.message()), HasSubstr(c.message));
  }
}

TEST(ExpertStoreTest, UnloadAndGetNotFound) {
  auto store = Open(ModelFamily::kGptOss);
  ASSERT_TRUE(store->Load({{0, 0}, {0, 1}, {1, 7}}).ok());
  const int64_t one = store->weight_bytes() / 3;
  ASSERT_TRUE(store->Unload({{0, 1}, {1, 2}}).ok());  // (1, 2) was never held
  EXPECT_EQ(store->List(), (std::vector<ExpertKey>{{0, 0}, {1, 7}}));
  EXPECT_EQ(store->weight_bytes(), 2 * one);
  ASSERT_TRUE(store->Unload({{0, 1}}).ok());  // idempotent
  EXPECT_EQ(store->size(), 2);

  const auto missing = store->Get(0, 1);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("layer 0 expert 1"));
  // Out of range reads as not held too: Get is the hot path and checks nothing else.
  EXPECT_EQ(store->Get(9, 99).status().code(), absl::StatusCode::kNotFound);
}

TEST(ExpertStoreTest, UnloadWhileInUseKeepsWeightsAlive) {
  auto store = Open(ModelFamily::kMixtral);
  ASSERT_TRUE(store->Load({{1, 4}}).ok());
  const std::shared_ptr<const ExpertWeights> held = store->Get(1, 4).value();
  const Tensor copy = held->down.ToF32().value();
  ASSERT_TRUE(store->Unload({{1, 4}}).ok());
  EXPECT_EQ(store->size(), 0);
  EXPECT_TRUE(SameBytes(held->down, copy));  // still readable after Unload
}

TEST(ExpertStoreTest, OpenNamesBadModel) {
  const auto s = ExpertStore::Open("/nonexistent/model");
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("/nonexistent/model"));
}

// Readers Get and use weights while a writer loads and unloads the same experts: every
// Get either fails NOT_FOUND or hands out complete weights that stay valid.
TEST(ExpertStoreTest, ConcurrentGetAndUnload) {
  auto store = Open(ModelFamily::kMixtral);
  ASSERT_TRUE(store->Load({{0, 0}, {0, 1}}).ok());
  const int64_t down_floats = store->Get(0, 0).value()->down.numel();
  std::atomic<bool> stop{false};
  std::atomic<int64_t> hits{0}, misses{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < 4; ++r) {
    readers.emplace_back([&, r] {
      while (!stop.load()) {
        auto w = store->Get(0, r % 2);
        if (!w.ok()) {
          EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound);
          ++misses;
          continue;
        }
        float sum = 0;  // touches every weight: ASan catches a freed buffer
        for (int64_t i = 0; i < down_floats; ++i) sum += (*w)->down.data<float>()[i];
        EXPECT_TRUE(std::isfinite(sum));
        ++hits;
      }
    });
  }
  // Let the readers get going first: on a loaded machine the writer could otherwise
  // finish before any reader ran, and the test would check nothing.
  while (hits.load() < 4) std::this_thread::yield();
  for (int i = 0; i < 50; ++i) {
    ASSERT_TRUE(store->Unload({{0, i % 2}}).ok());
    ASSERT_TRUE(store->Load({{0, i % 2}}).ok());
    ASSERT_TRUE(store->Load({{0, 0}, {0, 1}}).ok());
  }
  stop = true;
  for (auto& t : readers) t.join();
  EXPECT_GT(hits.load(), 0);
  EXPECT_EQ(store->size(), 2);
  EXPECT_EQ(store->weight_bytes(), 2 * store->Get(0, 0).value()->bytes());
}

}  // namespace
}  // namespace moemesh
