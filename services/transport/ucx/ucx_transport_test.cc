// UcxExpertTransport against UcxComputeServer in one process (two UCP workers talking
// over whatever UCX_TLS selects): replies, errors, deadlines, a dead peer.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "services/rpc/wire.h"
#include "services/transport/ucx/buffer_pool.h"
#include "services/transport/ucx/client.h"
#include "services/transport/ucx/compute_server.h"
#include "services/transport/ucx/protocol.h"
#include "services/transport/ucx/testing.h"
#include "services/transport/ucx/worker_thread.h"

namespace moemesh {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

// Info answers with the servers' worker addresses and a credential from each (as the
// expert service's Info does), by endpoint name; or, forging, with a credential of its own.
class FakeControl : public ExpertTransport {
 public:
  explicit FakeControl(bool forge = false) : forge_(forge) {}
  std::unique_ptr<Exchange> NewExchange(Clock::time_point) override { return nullptr; }
  absl::Status Info(const std::string& endpoint, const v1::InfoRequest& request, Clock::time_point,
                    v1::InfoResponse* r) override {
    std::lock_guard<std::mutex> lock(mu_);
    ++info_calls_[endpoint];
    auto it = addresses_.find(endpoint);
    if (it == addresses_.end()) return absl::UnavailableError("no such service");
    r->set_ucx_worker_address(it->second->worker_address());
    if (request.ucx_credential()) {
      std::string credential = it->second->IssueCredential();
      if (forge_) credential.back() ^= 1;  // the right id, a wrong secret
      r->set_ucx_credential(credential);
    }
    return absl::OkStatus();
  }
  void Set(const std::string& endpoint, UcxComputeServer* server) {
    std::lock_guard<std::mutex> lock(mu_);
    addresses_[endpoint] = server;
  }
  // The service is gone: Info is refused, as gRPC refuses a dead port.
  void Remove(const std::string& endpoint) {
    std::lock_guard<std::mutex> lock(mu_);
    addresses_.erase(endpoint);
  }
  int info_calls(const std::string& endpoint) {
    std::lock_guard<std::mutex> lock(mu_);
    return info_calls_[endpoint];
  }

 private:
  std::mutex mu_;
  const bool forge_;
  std::map<std::string, UcxComputeServer*> addresses_;
  std::map<std::string, int> info_calls_;
};

// Echoes each batch's expert and rows back, or fails with the layer as the code.
absl::Status Echo(const v1::ComputeRequest& req, const RowSegments& rows,
                  v1::ComputeResponse* resp) {
  if (req.layer() >= 100)
    return absl::Status(static_cast<absl::StatusCode>(req.layer() - 100), "asked to fail");
  return EchoRows(req, rows, resp);
}

v1::ComputeRequest Request(int64_t layer, size_t bytes) {
  v1::ComputeRequest r;
  r.set_layer(layer);
  auto* b = r.add_batches();
  b->set_expert(3);
  std::string data(bytes, '\0');
  for (size_t i = 0; i < bytes; ++i) data[i] = static_cast<char>(i * 131 + layer);
  b->mutable_rows()->set_data(data);
  return r;
}

struct Result {
  absl::Status status;
  v1::ComputeResponse response;
};

std::vector<Result> Call(ExpertTransport& t,
                         const std::vector<std::pair<std::string, v1::ComputeRequest>>& calls,
                         milliseconds timeout = milliseconds(10000)) {
  std::vector<Result> results(calls.size());
  auto exchange = t.NewExchange(ExpertTransport::Clock::now() + timeout);
  for (size_t i = 0; i < calls.size(); ++i) {
    exchange->Start(calls[i].first, std::make_unique<v1::ComputeRequest>(calls[i].second),
                    [&, i](const absl::Status& s, v1::ComputeResponse* r) {
                      results[i].status = s;
                      if (s.ok()) results[i].response = *r;
                    });
  }
  exchange->Wait();
  return results;
}

TEST(UcxTransportTest, SharedMemoryTuningOnlyWhereUcxTlsLeavesSharedMemoryIn) {
  EXPECT_TRUE(UcxTlsMayUseSharedMemory(nullptr));
  for (const char* tls :
       {"all", "posix,cma,self", "sm", "shm,tcp", "rc, mm", "sysv", "^tcp", "^rc,ud"}) {
    EXPECT_TRUE(UcxTlsMayUseSharedMemory(tls)) << tls;
  }
  for (const char* tls : {"tcp", "rc,tcp", "self,cma", "^sm", "^posix,sysv", "^all", ""}) {
    EXPECT_FALSE(UcxTlsMayUseSharedMemory(tls)) << tls;
  }
}

TEST(UcxTransportTest, RepliesEagerAndRendezvousAndErrors) {
  auto control = std::make_shared<FakeControl>();
  auto server = UcxComputeServer::Create(&Echo, 2, 64 << 20);
  ASSERT_TRUE(server.ok()) << server.status();
  control->Set("a", server->get());
  auto t = UcxExpertTransport::Create(control);
  ASSERT_TRUE(t.ok()) << t.status();
  for (size_t bytes : {size_t{0}, size_t{100}, size_t{64 << 10}, size_t{4 << 20}}) {
    SCOPED_TRACE(absl::StrCat(bytes, " bytes"));
    const v1::ComputeRequest req = Request(1, bytes);
    auto r = Call(**t, {{"a", req}, {"a", Request(2, bytes)}});
    ASSERT_TRUE(r[0].status.ok()) << r[0].status;
    ASSERT_TRUE(r[1].status.ok()) << r[1].status;
    ASSERT_EQ(r[0].response.outputs_size(), 1);
    EXPECT_EQ(r[0].response.outputs(0).rows().data(), req.batches(0).rows().data());
    EXPECT_EQ(r[1].response.outputs(0).rows().data(), Request(2, bytes).batches(0).rows().data());
  }
  auto failed = Call(**t, {{"a", Request(100 + 3, 10)}});  // INVALID_ARGUMENT from the service
  EXPECT_EQ(failed[0].status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(failed[0].status.message(), "asked to fail");
  auto unknown = Call(**t, {{"nowhere", Request(1, 10)}});
  EXPECT_EQ(unknown[0].status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ((*t)->in_flight(), 0);
}

// A client whose hello carries no valid credential is never answered: its hello is
// refused, its requests are dropped before any byte of them is copied or fetched (the
// compute function never sees them), while a client with a credential is served.
TEST(UcxTransportTest, PeerWithoutValidCredentialIsDroppedUnread) {
  std::atomic<int> computed{0};
  auto server = UcxComputeServer::Create(
      [&](const v1::ComputeRequest& req, const RowSegments& rows, v1::ComputeResponse* resp) {
        ++computed;
        return Echo(req, rows, resp);
      },
      2, 64 << 20);
  ASSERT_TRUE(server.ok()) << server.status();
  auto forged = std::make_shared<FakeControl>(/*forge=*/true);
  forged->Set("a", server->get());
  auto rogue = UcxExpertTransport::Create(forged).value();
  for (size_t bytes : {size_t{100}, size_t{4 << 20}}) {  // eager, rendezvous
    auto r = Call(*rogue, {{"a", Request(1, bytes)}}, milliseconds(300));
    EXPECT_EQ(r[0].status.code(), absl::StatusCode::kDeadlineExceeded) << r[0].status;
  }
  EXPECT_EQ(computed.load(), 0);
  EXPECT_GE((*server)->refused_hellos(), 1);
  EXPECT_EQ((*server)->refused_requests(), 2);
  EXPECT_EQ((*server)->clients(), 0);

  auto control = std::make_shared<FakeControl>();
  control->Set("a", server->get());
  auto t = UcxExpertTransport::Create(control).value();
  auto ok = Call(*t, {{"a", Request(1, 1000)}});
  EXPECT_TRUE(ok[0].status.ok()) << ok[0].status;
  EXPECT_EQ(computed.load(), 1);
  EXPECT_EQ((*server)->clients(), 1);
}

TEST(UcxTransportTest, HungServiceGivesDeadlineExceededAndLateRepliesAreDropped) {
  auto control = std::make_shared<FakeControl>();
  std::atomic<bool> hang{true};
  std::atomic<int> computed{0};
  auto server = UcxComputeServer::Create(
      [&](const v1::ComputeRequest& req, const RowSegments& rows, v1::ComputeResponse* resp) {
        while (hang) std::this_thread::sleep_for(milliseconds(5));
        ++computed;
        return Echo(req, rows, resp);
      },
      1, 64 << 20);
  ASSERT_TRUE(server.ok());
  control->Set("a", server->get());
  auto t = UcxExpertTransport::Create(control).value();
  const auto start = std::chrono::steady_clock::now();
  auto r = Call(*t, {{"a", Request(1, 1000)}}, milliseconds(300));
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(r[0].status.code(), absl::StatusCode::kDeadlineExceeded) << r[0].status;
  EXPECT_LT(took, milliseconds(1500));
  hang = false;  // the late reply arrives and must not be delivered anywhere
  auto next = Call(*t, {{"a", Request(5, 1000)}});
  ASSERT_TRUE(next[0].status.ok()) << next[0].status;
  EXPECT_EQ(next[0].response.outputs(0).rows().data(), Request(5, 1000).batches(0).rows().data());
  EXPECT_EQ(t->in_flight(), 0);
}

TEST(UcxTransportTest, DeadServiceIsUnavailableAndARestartedOneIsReconnected) {
  auto control = std::make_shared<FakeControl>();
  auto server = UcxComputeServer::Create(&Echo, 1, 64 << 20).value();
  control->Set("a", server.get());
  auto t = UcxExpertTransport::Create(control).value();
  ASSERT_TRUE(Call(*t, {{"a", Request(1, 10)}})[0].status.ok());
  server.reset();  // the service goes away, and its control plane with it
  control->Remove("a");
  // UNAVAILABLE well before the deadline: from UCX where the transport detects a dead
  // peer (tcp), from the control-plane probe where it cannot (shared memory).
  const auto start = std::chrono::steady_clock::now();
  auto r = Call(*t, {{"a", Request(1, 10)}}, milliseconds(5000));
  EXPECT_EQ(r[0].status.code(), absl::StatusCode::kUnavailable) << r[0].status;
  EXPECT_LT(std::chrono::steady_clock::now() - start, milliseconds(2500));
  // It comes back with a new worker address; the transport asks Info again.
  auto again = UcxComputeServer::Create(&Echo, 1, 64 << 20).value();
  control->Set("a", again.get());
  // The failed call dropped the old address: the next one fetches the new one and succeeds.
  const auto back = Call(*t, {{"a", Request(1, 10)}}, milliseconds(2000));
  EXPECT_TRUE(back[0].status.ok()) << back[0].status;
  EXPECT_GE(control->info_calls("a"), 2);
  EXPECT_EQ(t->in_flight(), 0);
  // The transport's prober asks `control` about `again`, made after it: it goes first.
  t.reset();
}

TEST(UcxTransportTest, RestartWhileACallWaitsIsUnavailableNotAHang) {
  // The old instance hangs with the call; a new one takes the endpoint (a restarted pod
  // behind the same name). The probe sees the new worker address and ends the call with
  // UNAVAILABLE: after 100 ms where UCX cannot see a dead peer (shared memory), after 1 s
  // where it can but the old peer is alive (TCP) - well before the 5 s deadline.
  auto control = std::make_shared<FakeControl>();
  std::atomic<bool> hang{true};
  auto old_server =
      UcxComputeServer::Create(
          [&](const v1::ComputeRequest& req, const RowSegments& rows, v1::ComputeResponse* resp) {
            while (hang) std::this_thread::sleep_for(milliseconds(5));
            return Echo(req, rows, resp);
          },
          1, 64 << 20)
          .value();
  control->Set("a", old_server.get());
  auto t = UcxExpertTransport::Create(control).value();
  auto fresh = UcxComputeServer::Create(&Echo, 1, 64 << 20).value();
  std::thread restart([&] {
    // Once the call is on its way to the old instance.
    while (old_server->in_flight() == 0) std::this_thread::sleep_for(milliseconds(1));
    control->Set("a", fresh.get());
  });
  const auto start = std::chrono::steady_clock::now();
  auto r = Call(*t, {{"a", Request(1, 10)}}, milliseconds(5000));
  const auto took = std::chrono::steady_clock::now() - start;
  restart.join();
  EXPECT_EQ(r[0].status.code(), absl::StatusCode::kUnavailable) << r[0].status;
  EXPECT_NE(r[0].status.message().find("restarted"), std::string::npos) << r[0].status;
  EXPECT_LT(took, milliseconds(2500));
  hang = false;
  // The next call reaches the new instance, whose address the transport fetched again.
  auto next = Call(*t, {{"a", Request(2, 10)}});
  EXPECT_TRUE(next[0].status.ok()) << next[0].status;
  // The transport's prober asks `control` about `fresh`, made after it: it goes first.
  t.reset();
}

TEST(UcxTransportTest, OversizedRequestIsRefusedAndTheServiceStaysUp) {
  auto control = std::make_shared<FakeControl>();
  auto server = UcxComputeServer::Create(&Echo, 1, 1 << 20).value();
  control->Set("a", server.get());
  auto t = UcxExpertTransport::Create(control).value();
  auto big = Call(*t, {{"a", Request(1, 2 << 20)}});
  EXPECT_EQ(big[0].status.code(), absl::StatusCode::kResourceExhausted) << big[0].status;
  EXPECT_NE(big[0].status.message().find("over the limit of 1048576"), std::string::npos)
      << big[0].status;
  auto small = Call(*t, {{"a", Request(1, 1000)}});
  ASSERT_TRUE(small[0].status.ok()) << small[0].status;
  EXPECT_EQ(server->in_flight(), 0);
}

TEST(UcxTransportTest, ConcurrentExchangesGetTheirOwnRepliesOnceAndBuffersAreReused) {
  auto control = std::make_shared<FakeControl>();
  auto a = UcxComputeServer::Create(&Echo, 2, 64 << 20).value();
  auto b = UcxComputeServer::Create(&Echo, 2, 64 << 20).value();
  control->Set("a", a.get());
  control->Set("b", b.get());
  auto t = UcxExpertTransport::Create(control).value();
  auto round = [&](int thread, int i) {
    // Sizes on both sides of the rendezvous threshold.
    const size_t bytes = (i % 3 == 0) ? (1 << 20) + thread : 1000 + 17 * thread;
    const v1::ComputeRequest ra = Request(thread * 10 + i % 10, bytes);
    const v1::ComputeRequest rb = Request(thread * 10 + i % 10 + 50, bytes + 1);
    auto r = Call(*t, {{"a", ra}, {"b", rb}});
    return r[0].status.ok() && r[1].status.ok() && r[0].response.outputs_size() == 1 &&
           r[1].response.outputs_size() == 1 &&
           r[0].response.outputs(0).rows().data() == ra.batches(0).rows().data() &&
           r[1].response.outputs(0).rows().data() == rb.batches(0).rows().data();
  };
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(round(0, i));  // warm: the pools fill
  const int64_t registered = t->buffers().registrations();
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int thread = 0; thread < 4; ++thread) {
    threads.emplace_back([&, thread] {
      for (int i = 0; i < 30; ++i) wrong += round(thread, i) ? 0 : 1;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(t->in_flight(), 0);
  // Registered once and reused: four threads need at most a few more buffers per size
  // class than one did, not one per call (120 calls of each size were made).
  EXPECT_LE(t->buffers().registrations() - registered, 16);
  EXPECT_GT(t->buffers().kept(), 0);
  EXPECT_EQ(a->dropped() + b->dropped(), 0);
}

// Requests built in place (Exchange::NewRequest, AddRows, Send), as the router builds
// them: several batches of different dtypes and shapes, an empty one, more rows than
// announced (the buffer grows), small and large (eager and rendezvous; over shared
// memory the large ones go as an iov), and a head too large for the room reserved for
// it (sent as a protobuf instead). Each must come back byte for byte.
TEST(UcxTransportTest, RequestsBuiltInPlaceArriveWhole) {
  auto control = std::make_shared<FakeControl>();
  auto server = UcxComputeServer::Create(&Echo, 2, 64 << 20).value();
  control->Set("a", server.get());
  auto t = UcxExpertTransport::Create(control).value();
  struct Batch {
    int32_t expert;
    DType dtype;
    std::vector<int64_t> shape;
  };
  const std::vector<std::pair<std::string, std::vector<Batch>>> cases = {
      {"one small", {{0, DType::kBF16, {3, 64}}}},
      {"several, one empty",
       {{1, DType::kF32, {5, 128}}, {4, DType::kBF16, {0, 128}}, {7, DType::kBF16, {9, 128}}}},
      {"large", {{2, DType::kBF16, {256, 4096}}, {5, DType::kF32, {17, 4096}}}},
      {"more than announced", {{1, DType::kF32, {64, 1024}}, {2, DType::kF32, {300, 1024}}}},
      {"a head beyond its room",
       {{3, DType::kBF16, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                           1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                           1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                           1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                           1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                           1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 8}}}},
  };
  for (const auto& [name, batches] : cases) {
    SCOPED_TRACE(name);
    auto exchange = t->NewExchange(ExpertTransport::Clock::now() + seconds(10));
    // Announced: the first batch's bytes only ("more than announced" then grows).
    const size_t announced =
        batches[0].shape[0] * batches[0].shape[1] * DTypeSize(batches[0].dtype);
    auto request = exchange->NewRequest(announced, static_cast<int>(batches.size()));
    request->request().set_layer(9);
    std::vector<std::string> sent;
    for (const Batch& b : batches) {
      int64_t numel = 1;
      for (int64_t d : b.shape) numel *= d;
      std::string bytes(static_cast<size_t>(numel) * DTypeSize(b.dtype), '\0');
      for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i * 7 + b.expert);
      char* out = request->AddRows(b.expert, b.dtype, b.shape);
      ASSERT_NE(out, nullptr);
      std::memcpy(out, bytes.data(), bytes.size());
      sent.push_back(std::move(bytes));
    }
    absl::Status status = absl::InternalError("no reply");
    v1::ComputeResponse response;
    exchange->Send("a", std::move(request), [&](const absl::Status& s, v1::ComputeResponse* r) {
      status = s;
      if (s.ok()) response = *r;
    });
    exchange->Wait();
    ASSERT_TRUE(status.ok()) << status;
    ASSERT_EQ(response.outputs_size(), static_cast<int>(batches.size()));
    for (size_t i = 0; i < batches.size(); ++i) {
      const v1::Tensor& rows = response.outputs(static_cast<int>(i)).rows();
      EXPECT_EQ(response.outputs(static_cast<int>(i)).expert(), batches[i].expert);
      EXPECT_EQ(rows.dtype(), ToProtoDType(batches[i].dtype));
      EXPECT_EQ(std::vector<int64_t>(rows.shape().begin(), rows.shape().end()), batches[i].shape);
      EXPECT_TRUE(rows.data() == sent[i]) << "batch " << i << " differs";
    }
  }
  EXPECT_EQ(t->in_flight(), 0);
  EXPECT_EQ(server->dropped(), 0);
}

// The pool keeps as many buffers of a size as were in use at once (here 40 of 1 MiB,
// more than the few it keeps by default), so the next such burst reuses them all.
TEST(UcxTransportTest, ThePoolKeepsWhatABurstNeeded) {
  auto t = UcxExpertTransport::Create(std::make_shared<FakeControl>()).value();
  UcxBufferPool& pool = t->buffers();
  const int64_t kept_before = pool.kept();
  std::set<char*> first;
  {
    std::vector<UcxBufferPtr> burst;
    for (int i = 0; i < 40; ++i) burst.push_back(pool.Take(1 << 20));
    for (const auto& b : burst) first.insert(b->data);
  }
  EXPECT_EQ(pool.kept(), kept_before + 40);
  std::vector<UcxBufferPtr> again;
  for (int i = 0; i < 40; ++i) {
    again.push_back(pool.Take(1 << 20));
    EXPECT_EQ(first.count(again.back()->data), 1u) << "buffer " << i << " is new";
  }
  EXPECT_EQ(pool.kept(), kept_before);
}

TEST(UcxTransportTest, SmallRequestsAreComputedOnTheWorkerThreadWhenTheComputeThreadsAreIdle) {
  auto control = std::make_shared<FakeControl>();
  std::mutex mu;
  std::set<std::thread::id> computed_on;
  auto server =
      UcxComputeServer::Create(
          [&](const v1::ComputeRequest& req, const RowSegments& rows, v1::ComputeResponse* resp) {
            std::lock_guard<std::mutex> lock(mu);
            computed_on.insert(std::this_thread::get_id());
            return Echo(req, rows, resp);
          },
          2, 64 << 20)
          .value();
  control->Set("a", server.get());
  auto t = UcxExpertTransport::Create(control).value();
  for (int i = 0; i < 20; ++i) {  // one at a time: the compute threads are idle each time
    const v1::ComputeRequest req = Request(i, 1000);
    auto r = Call(*t, {{"a", req}});
    ASSERT_TRUE(r[0].status.ok()) << r[0].status;
    EXPECT_EQ(r[0].response.outputs(0).rows().data(), req.batches(0).rows().data());
  }
  EXPECT_EQ(server->computed_inline(), 20);
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_EQ(computed_on.size(), 1u);  // the worker thread's
    computed_on.clear();
  }
  // Over kUcxInlineBytes: the compute threads'.
  const v1::ComputeRequest big = Request(7, kUcxInlineBytes + 1);
  auto r = Call(*t, {{"a", big}});
  ASSERT_TRUE(r[0].status.ok()) << r[0].status;
  EXPECT_EQ(r[0].response.outputs(0).rows().data(), big.batches(0).rows().data());
  EXPECT_EQ(server->computed_inline(), 20);
  EXPECT_EQ(server->in_flight(), 0);
}

TEST(UcxTransportTest, AWaitLongerThanTheSpinAndNoSpinAtAllBothGetTheirReplies) {
  for (auto spin : {std::chrono::microseconds(0), std::chrono::microseconds(200)}) {
    SCOPED_TRACE(absl::StrCat("spin ", spin.count(), " us"));
    auto control = std::make_shared<FakeControl>();
    auto server =
        UcxComputeServer::Create(
            [&](const v1::ComputeRequest& req, const RowSegments& rows, v1::ComputeResponse* resp) {
              // Longer than the spin: the waiting thread gives up and the worker thread
              // (asleep until then) must take the reply.
              if (req.layer() % 2 == 1) std::this_thread::sleep_for(milliseconds(20));
              return Echo(req, rows, resp);
            },
            1, 64 << 20, spin)
            .value();
    control->Set("a", server.get());
    auto t = UcxExpertTransport::Create(control, 64 << 20, spin).value();
    for (int i = 0; i < 6; ++i) {
      const v1::ComputeRequest req = Request(i, i % 3 == 0 ? (1 << 20) : 1000);
      const auto start = std::chrono::steady_clock::now();
      auto r = Call(*t, {{"a", req}});
      ASSERT_TRUE(r[0].status.ok()) << r[0].status;
      EXPECT_EQ(r[0].response.outputs(0).rows().data(), req.batches(0).rows().data());
      EXPECT_LT(std::chrono::steady_clock::now() - start, seconds(5));
    }
    EXPECT_EQ(server->computed_inline(), 4);  // the 1000-byte ones
    EXPECT_EQ(t->in_flight(), 0);
  }
}

TEST(UcxTransportTest, CallersPollOnlyWhileRepliesComeWithinTheSpin) {
  auto control = std::make_shared<FakeControl>();
  std::atomic<int> slow_ms{0};
  auto server =
      UcxComputeServer::Create(
          [&](const v1::ComputeRequest& req, const RowSegments& rows, v1::ComputeResponse* resp) {
            std::this_thread::sleep_for(milliseconds(slow_ms.load()));
            return Echo(req, rows, resp);
          },
          1, 64 << 20)
          .value();
  control->Set("a", server.get());
  auto t = UcxExpertTransport::Create(control, 64 << 20, std::chrono::microseconds(2000)).value();
  auto calls = [&](int n) {
    for (int i = 0; i < n; ++i) ASSERT_TRUE(Call(*t, {{"a", Request(i, 1000)}})[0].status.ok());
  };
  calls(5);  // fast: waits poll (those whose reply is not in already)
  EXPECT_GE(t->polls(), 1);
  slow_ms = 20;  // ten times the spin: the first two waits poll in vain, later ones sleep at once
  calls(2);
  const int64_t after_two_slow = t->polls();
  calls(4);
  EXPECT_EQ(t->polls(), after_two_slow);
  slow_ms = 0;  // fast again: calls that end within the spin bring polling back
  calls(20);
  EXPECT_GT(t->polls(), after_two_slow);
  // Large calls are not polled for: the worker thread drives their rendezvous.
  const int64_t before = t->polls();
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(Call(*t, {{"a", Request(i, 1 << 20)}})[0].status.ok());
  EXPECT_EQ(t->polls(), before);
  EXPECT_EQ(t->in_flight(), 0);
}

TEST(UcxTransportTest, HostileSegmentedRequestsAreRefusedWithWhatIsWrong) {
  // prefix {count, envelope}, count u64 lengths, envelope, segments.
  v1::ComputeRequest envelope;
  envelope.add_batches()->set_expert(1);
  const std::string env = envelope.SerializeAsString();
  auto make = [&](uint32_t count, uint32_t env_size, std::vector<uint64_t> lengths, size_t tail) {
    std::string m(8, '\0');
    std::memcpy(m.data(), &count, 4);
    std::memcpy(m.data() + 4, &env_size, 4);
    for (uint64_t n : lengths) m.append(reinterpret_cast<const char*>(&n), 8);
    m += env;
    m.resize((m.size() + 63) / 64 * 64, '\0');  // the head is padded to 64 bytes
    m.append(tail, 'x');
    return m;
  };
  auto parse = [](std::string bytes) {
    v1::ComputeRequest req;
    RowSegments rows;
    absl::Status s = ucx::ParseSegmented(bytes, &req, &rows);
    return std::make_pair(s, rows.size());
  };
  const uint32_t E = static_cast<uint32_t>(env.size());
  auto good = parse(make(1, E, {5}, 64));  // 5 bytes padded to 64
  ASSERT_TRUE(good.first.ok()) << good.first;
  EXPECT_EQ(good.second, 1u);
  for (auto [bytes, want] : std::vector<std::pair<std::string, std::string>>{
           {std::string(3, '\0'), "shorter than its prefix"},
           {make(1, E, {5}, 4), "segment 0 runs past the end"},
           {make(1, E, {5}, 128), "64 bytes after the last segment"},
           {make(2, E, {5, 0}, 64), "2 segments for 1 batches"},
           {make(1, E + 1000, {5}, 5), "prefix beyond the data"},
           {make(0xffffffff, E, {5}, 5), "prefix beyond the data"},
           {make(1, E, {~uint64_t{0}}, 5), "segment 0 runs past the end"}}) {
    auto got = parse(bytes);
    EXPECT_EQ(got.first.code(), absl::StatusCode::kInvalidArgument) << want;
    EXPECT_NE(got.first.message().find(want), std::string::npos)
        << got.first << " wanted: " << want;
  }
}

}  // namespace
}  // namespace moemesh
