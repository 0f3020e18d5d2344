// NCCL inside the node (services/cuda/nccl_node.h): the library loads and has every call we
// use; bad GPU lists are refused; on a machine with GPUs, copies within a GPU and between
// every pair of GPUs (one group) arrive byte for byte. The device cases skip without a GPU
// (and the pairs without two).
#include "services/cuda/nccl_node.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <numeric>
#include <vector>

#include "kernels/cuda/testing.h"

namespace moemesh::nccl {
namespace {

using cuda_testing::GpuCount;

TEST(NcclNodeTest, TheLibraryLoadsWithEveryCall) {
  const Nccl* api = LoadNccl();
  ASSERT_NE(api, nullptr) << "libnccl.so.2 is installed with CUDA here";
  EXPECT_NE(api->error_string(ncclInvalidArgument), nullptr);
}

TEST(NcclNodeTest, BadGpuListsAreRefused) {
  EXPECT_EQ(NodeComm::Create({}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(NodeComm::Create({0, 0}).status().code(), absl::StatusCode::kInvalidArgument);
  if (GpuCount() > 0) GTEST_SKIP() << "the no-GPU case needs a machine without one";
  const absl::StatusOr<std::unique_ptr<NodeComm>> c = NodeComm::Create({0});
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("ncclCommInitAll"), std::string::npos) << c.status();
}

// `bytes` of a pattern that differs per (device, index) on device `d`.
void* Filled(int d, size_t bytes, uint8_t seed) {
  cudaSetDevice(d);
  std::vector<uint8_t> host(bytes);
  for (size_t i = 0; i < bytes; ++i) host[i] = static_cast<uint8_t>(seed + i * 7);
  void* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, bytes), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, host.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
  // A pageable upload may still be in flight when cudaMemcpy returns, and NCCL reads on
  // streams that do not wait for the legacy one.
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return p;
}

std::vector<uint8_t> Read(int d, const void* p, size_t bytes) {
  cudaSetDevice(d);
  std::vector<uint8_t> host(bytes);
  EXPECT_EQ(cudaMemcpy(host.data(), p, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  return host;
}

TEST(NcclNodeTest, CopiesArriveWholeWithinAndBetweenGpus) {
  const int n = std::min(GpuCount(), 8);
  if (n == 0) GTEST_SKIP() << "no CUDA device";
  std::vector<int> devices(n);
  std::iota(devices.begin(), devices.end(), 0);
  absl::StatusOr<std::unique_ptr<NodeComm>> comm = NodeComm::Create(devices);
  ASSERT_TRUE(comm.ok()) << comm.status();
  // Every ordered pair (a GPU with itself included), sizes not a multiple of anything.
  const size_t bytes = (3 << 20) + 13;
  std::vector<NodeComm::Transfer> transfers;
  std::vector<void*> sources, targets;
  for (int from = 0; from < n; ++from) {
    for (int to = 0; to < n; ++to) {
      void* src = Filled(from, bytes, static_cast<uint8_t>(from * 16 + to));
      void* dst = Filled(to, bytes, 0xEE);
      sources.push_back(src);
      targets.push_back(dst);
      transfers.push_back({from, to, src, dst, bytes});
    }
  }
  const absl::Status copied = (*comm)->Copy(transfers);
  ASSERT_TRUE(copied.ok()) << copied;
  for (size_t i = 0; i < transfers.size(); ++i) {
    const auto& t = transfers[i];
    EXPECT_EQ(Read(devices[t.to], t.dst, bytes), Read(devices[t.from], t.src, bytes))
        << "GPU " << t.from << " to GPU " << t.to;
  }
  EXPECT_EQ((*comm)->Copy({{0, n, sources[0], targets[0], 1}}).code(),
            absl::StatusCode::kInvalidArgument);
  for (size_t i = 0; i < transfers.size(); ++i) {
    cudaSetDevice(devices[transfers[i].from]);
    cudaFree(sources[i]);
    cudaSetDevice(devices[transfers[i].to]);
    cudaFree(targets[i]);
  }
}

}  // namespace
}  // namespace moemesh::nccl
