// Device payloads over UCX (services/transport/ucx/device.h): a request serialized into GPU memory
// reaches the service and comes back intact, staged through pinned host memory (the
// path Debian's UCX takes) and, where UCX reads CUDA memory, directly. Needs a GPU.
#include "services/transport/ucx/device.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <condition_variable>

#include "kernels/cuda/testing.h"
#include "services/transport/ucx/buffer_pool.h"
#include "services/transport/ucx/client.h"
#include "services/transport/ucx/compute_server.h"
#include "services/transport/ucx/testing.h"

namespace moemesh {
namespace {

// Info as the expert service answers it: the worker address and a credential.
class Control : public ExpertTransport {
 public:
  explicit Control(UcxComputeServer* server) : server_(server) {}
  std::unique_ptr<Exchange> NewExchange(Clock::time_point) override { return nullptr; }
  absl::Status Info(const std::string&, const v1::InfoRequest& request, Clock::time_point,
                    v1::InfoResponse* r) override {
    r->set_ucx_worker_address(server_->worker_address());
    if (request.ucx_credential()) r->set_ucx_credential(server_->IssueCredential());
    return absl::OkStatus();
  }

 private:
  UcxComputeServer* server_;
};

TEST(UcxDeviceTest, DevicePayloadArrivesIntactStagedAndDirect) {
  SKIP_WITHOUT_GPU();
  auto server = UcxComputeServer::Create(&EchoRows, 1, 64 << 20).value();
  auto t = UcxExpertTransport::Create(std::make_shared<Control>(server.get())).value();
  for (size_t bytes : {size_t{100}, size_t{3} << 20}) {
    v1::ComputeRequest req;
    auto* b = req.add_batches();
    b->set_expert(5);
    std::string rows(bytes, '\0');
    for (size_t i = 0; i < bytes; ++i) rows[i] = static_cast<char>(i * 7 + 1);
    b->mutable_rows()->set_data(rows);
    const std::string wire = req.SerializeAsString();
    void* dev = nullptr;
    ASSERT_EQ(cudaMalloc(&dev, wire.size()), cudaSuccess);
    std::shared_ptr<const void> keep(dev, [](const void* p) { cudaFree(const_cast<void*>(p)); });
    ASSERT_EQ(cudaMemcpy(dev, wire.data(), wire.size(), cudaMemcpyHostToDevice), cudaSuccess);
    for (bool staged : {true, false}) {
      std::mutex mu;
      std::condition_variable cv;
      bool done = false;
      absl::Status status;
      UcxBufferPtr reply;
      UcxDevice::Send(
          *t, "svc", keep, dev, wire.size(),
          ExpertTransport::Clock::now() + std::chrono::seconds(10),
          [&](absl::Status s, UcxBufferPtr r) {
            std::lock_guard<std::mutex> lock(mu);
            status = s;
            reply = std::move(r);
            done = true;
            cv.notify_all();
          },
          staged);
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return done; });
      ASSERT_TRUE(status.ok()) << status << (staged ? " (staged)" : " (direct or staged)");
      // Back to the device and out again: the round trip keeps every byte.
      void* back = nullptr;
      ASSERT_EQ(cudaMalloc(&back, reply->size), cudaSuccess);
      ASSERT_TRUE(UcxDevice::CopyToDevice(*reply, back).ok());
      std::string host(reply->size, '\0');
      ASSERT_EQ(cudaMemcpy(host.data(), back, host.size(), cudaMemcpyDeviceToHost), cudaSuccess);
      cudaFree(back);
      v1::ComputeResponse resp;
      ASSERT_TRUE(resp.ParseFromString(host));
      ASSERT_EQ(resp.outputs_size(), 1);
      EXPECT_EQ(resp.outputs(0).expert(), 5);
      EXPECT_EQ(resp.outputs(0).rows().data(), rows);
    }
  }
  EXPECT_EQ(t->in_flight(), 0);
}

}  // namespace
}  // namespace moemesh
