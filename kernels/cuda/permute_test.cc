// The GPU permutation, gather and combine against kernels/cpu/dispatch (token choice,
// dropless), on fresh random routings, F32 and BF16 rows. Skips without a CUDA device.
#include "kernels/cuda/permute.cuh"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "kernels/cpu/dispatch.h"
#include "kernels/cuda/testing.h"
#include "kernels/dtype.h"

namespace moemesh {
namespace {

using cuda_testing::Download;
using cuda_testing::Poisoned;
using cuda_testing::Upload;

struct Shape {
  int64_t T;
  int E, k;
  int64_t H;
  bool bf16;
};

class CudaPermuteTest : public ::testing::TestWithParam<Shape> {};

TEST_P(CudaPermuteTest, MatchesTheCpuPlanGatherAndCombine) {
  SKIP_WITHOUT_GPU();
  const Shape s = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(s.T * 7 + s.E * 3 + s.k));
  // Distinct experts per token, skewed towards low ids (some experts get none).
  std::vector<int32_t> ids(s.T * s.k);
  std::vector<float> w(s.T * s.k);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (int64_t t = 0; t < s.T; ++t) {
    std::vector<int32_t> pick;
    while (static_cast<int>(pick.size()) < s.k) {
      const int e = static_cast<int>(std::pow(u(rng), 2.0f) * s.E) % s.E;
      if (std::find(pick.begin(), pick.end(), e) == pick.end()) pick.push_back(e);
    }
    for (int j = 0; j < s.k; ++j) {
      ids[t * s.k + j] = pick[j];
      w[t * s.k + j] = u(rng);
    }
  }
  DispatchPlan plan;
  BuildTokenChoicePlan(ids.data(), w.data(), s.T, s.k, s.E, -1, &plan);
  const int64_t rows = plan.num_rows();
  ASSERT_EQ(rows, s.T * s.k);

  int32_t* d_ids = Upload(ids);
  float* d_w = Upload(w);
  cuda::DevicePermutation perm;
  perm.expert_offsets = Poisoned<int64_t>(s.E + 1);
  perm.row_token = Poisoned<int32_t>(rows);
  perm.slot_row = Poisoned<int32_t>(rows);
  const size_t ws_bytes = cuda::PermutationWorkspaceBytes(rows, s.E);
  void* ws = nullptr;
  ASSERT_EQ(cudaMalloc(&ws, ws_bytes), cudaSuccess);
  EXPECT_EQ(cuda::BuildPermutation(d_ids, s.T, s.k, s.E, ws, ws_bytes - 1, perm, nullptr),
            cudaErrorInvalidValue);  // too small a workspace
  ASSERT_EQ(cuda::BuildPermutation(d_ids, s.T, s.k, s.E, ws, ws_bytes, perm, nullptr), cudaSuccess);
  EXPECT_EQ(Download(perm.expert_offsets, s.E + 1), plan.expert_offsets);
  EXPECT_EQ(Download(perm.row_token, rows), plan.row_token);

  // Rows: x [T, H] gathered, then "expert outputs" y = the grouped rows scaled by their row
  // number, combined back; against the CPU's gather and combine on the same values.
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(s.T * s.H);
  for (float& v : x) v = nd(rng);
  if (s.bf16) {
    for (float& v : x) v = Bf16ToF32(F32ToBf16(v));
  }
  std::vector<float> grouped(rows * s.H), y(rows * s.H), out(s.T * s.H);
  GatherRows(x.data(), s.H, plan, 0, rows, grouped.data());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < s.H; ++c)
      y[r * s.H + c] = grouped[r * s.H + c] * (1.0f + 0.25f * (r % 5));
  }
  if (s.bf16) {
    for (float& v : y) v = Bf16ToF32(F32ToBf16(v));
  }
  CombineRows(y.data(), s.H, plan, 0, s.T, out.data());

  const cuda::RowDType dt = s.bf16 ? cuda::RowDType::kBF16 : cuda::RowDType::kF32;
  auto to_device_rows = [&](const std::vector<float>& v) -> void* {
    if (!s.bf16) return Upload(v);
    std::vector<uint16_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) b[i] = F32ToBf16(v[i]);
    return Upload(b);
  };
  void* d_x = to_device_rows(x);
  void* d_grouped = s.bf16 ? static_cast<void*>(Poisoned<uint16_t>(rows * s.H))
                           : static_cast<void*>(Poisoned<float>(rows * s.H));
  ASSERT_EQ(cuda::GatherRows(dt, d_x, s.H, perm.row_token, rows, d_grouped, nullptr), cudaSuccess);
  if (s.bf16) {
    const auto got = Download(static_cast<uint16_t*>(d_grouped), rows * s.H);
    for (int64_t i = 0; i < rows * s.H; ++i) ASSERT_EQ(Bf16ToF32(got[i]), grouped[i]) << i;
  } else {
    EXPECT_EQ(Download(static_cast<float*>(d_grouped), rows * s.H), grouped);
  }
  void* d_y = to_device_rows(y);
  float* d_out = Poisoned<float>(s.T * s.H);
  ASSERT_EQ(cuda::CombineRows(dt, d_y, s.H, perm.slot_row, d_w, s.T, s.k, d_out, nullptr),
            cudaSuccess);
  const auto got = Download(d_out, s.T * s.H);
  for (int64_t i = 0; i < s.T * s.H; ++i) {
    ASSERT_NEAR(got[i], out[i], 1e-5f * std::max(1.0f, std::abs(out[i]))) << i;
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  for (void* p : {static_cast<void*>(d_ids), static_cast<void*>(d_w), ws, d_x, d_grouped, d_y,
                  static_cast<void*>(d_out), static_cast<void*>(perm.expert_offsets),
                  static_cast<void*>(perm.row_token), static_cast<void*>(perm.slot_row)}) {
    cudaFree(p);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaPermuteTest,
                         ::testing::Values(Shape{1, 8, 2, 64, false}, Shape{7, 8, 2, 4096, true},
                                           Shape{300, 128, 8, 256, true},
                                           Shape{300, 256, 8, 100, false},
                                           Shape{1000, 60, 4, 64, true},
                                           Shape{5, 32, 1, 2880, false}));

}  // namespace
}  // namespace moemesh
