// transport_bench: the data plane alone, gRPC against UCX, in one run. A child process
// serves ExpertService.Compute over both (gRPC and UcxComputeServer, answering from the
// same echo function; its Info carries the UCX worker address, as an expert service's
// does); this process calls it through GrpcExpertTransport and UcxExpertTransport, the
// router's own code, calls alternating between the two so both see the same noise.
//
//   transport_bench [--tokens 1,16,256,2048] [--hidden 4096] [--repeats N] [--window 8]
//                   [--only grpc|ucx] [--ucx-spin-us US] [--phases rtt,bw]
//
// Per T (a request of T rows of H bf16 values: T*H*2 bytes to one destination):
//   rtt       an echo call (the reply is as large as the request), back to back, in
//             alternating blocks of 25 calls per transport: p50/p99 for each, and the
//             p50 ratio gRPC/UCX;
//   bandwidth `window` calls in flight carrying T rows each way... one way: the service
//             answers these with an empty reply, so the figure is the request payload
//             per second, what ucx_perftest's ucp_am_bw measures.
// One JSON line per (T), read by bench/run_transport_bench.sh. UCX_TLS etc. apply to
// both processes; --ucx-spin-us (default the services' own) to both UCX sides.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "services/base/status_macros.h"
#include "services/rpc/grpc_server.h"
#include "services/rpc/wire.h"
#include "services/runtime/flags.h"
#include "services/runtime/serving_settings.h"
#include "services/runtime/signals.h"
#include "services/transport/grpc_transport.h"
#include "services/transport/transport.h"
#include "services/transport/ucx/client.h"
#include "services/transport/ucx/compute_server.h"
#include "services/transport/ucx/protocol.h"
#include "services/transport/ucx/testing.h"
#include "tools/process.h"

namespace moemesh {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kSinkLayer = 1;  // answered with an empty reply

absl::Status Echo(const v1::ComputeRequest& req, const RowSegments& rows,
                  v1::ComputeResponse* resp) {
  if (req.layer() == kSinkLayer) return absl::OkStatus();
  return EchoRows(req, rows, resp);
}

class EchoService final : public v1::ExpertService::Service {
 public:
  explicit EchoService(std::string ucx_address) : ucx_address_(std::move(ucx_address)) {}
  grpc::Status Compute(grpc::ServerContext*, const v1::ComputeRequest* req,
                       v1::ComputeResponse* resp) override {
    return ToGrpcStatus(Echo(*req, {}, resp));
  }
  grpc::Status Info(grpc::ServerContext*, const v1::InfoRequest*, v1::InfoResponse* resp) override {
    resp->set_ucx_worker_address(ucx_address_);
    return grpc::Status::OK;
  }

 private:
  const std::string ucx_address_;
};

absl::Status Serve(std::chrono::microseconds spin) {
  BlockStopSignals();
  StopWithParent();
  constexpr int kMaxBytes = 512 << 20;
  ASSIGN_OR_RETURN(auto ucx, UcxComputeServer::Create(&Echo, 1, kMaxBytes, spin));
  EchoService service(ucx->worker_address());
  ASSIGN_OR_RETURN(StartedServer started, StartGrpcServer({"127.0.0.1:0", kMaxBytes}, {&service}));
  std::printf("listening on 127.0.0.1:%d\n", started.port);
  std::fflush(stdout);
  WaitForStopSignal();
  started.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  return absl::OkStatus();
}

v1::ComputeRequest Request(int64_t layer, int64_t T, int64_t H) {
  v1::ComputeRequest r;
  r.set_layer(layer);
  auto* b = r.add_batches();
  b->set_expert(0);
  std::string data(static_cast<size_t>(T * H * 2), '\0');
  std::mt19937 rng(static_cast<uint32_t>(T));
  for (size_t i = 0; i < data.size(); i += 4) data[i] = static_cast<char>(rng());
  b->mutable_rows()->set_data(std::move(data));
  b->mutable_rows()->add_shape(T);
  b->mutable_rows()->add_shape(H);
  b->mutable_rows()->set_dtype(v1::DATA_TYPE_BF16);
  return r;
}

// One exchange of `n` copies of `request` to `endpoint`; the seconds it took. The copies
// are built before the clock starts, as the router builds them (rows written into the
// memory the transport sends from): building requests is the router's work, the same
// for both transports.
bool in_place = true;  // --in-place 0: requests as protobufs (ExpertTransport::Exchange::Start)

absl::StatusOr<double> Exchange(ExpertTransport& t, const std::string& endpoint,
                                const v1::ComputeRequest& request, int n, size_t want_reply_bytes) {
  absl::Status status;
  if (!in_place) {
    std::vector<std::unique_ptr<v1::ComputeRequest>> requests;
    for (int i = 0; i < n; ++i) requests.push_back(std::make_unique<v1::ComputeRequest>(request));
    const auto t0 = Clock::now();
    auto exchange = t.NewExchange(std::chrono::system_clock::now() + std::chrono::seconds(60));
    for (int i = 0; i < n; ++i) {
      exchange->Start(endpoint, std::move(requests[i]),
                      [&](const absl::Status& s, v1::ComputeResponse*) {
                        if (!s.ok()) status = s;
                      });
    }
    exchange->Wait();
    if (!status.ok()) return status;
    return std::chrono::duration<double>(Clock::now() - t0).count();
  }
  auto exchange = t.NewExchange(std::chrono::system_clock::now() + std::chrono::seconds(60));
  std::vector<std::unique_ptr<OutgoingRequest>> requests;
  for (int i = 0; i < n; ++i) {
    size_t bytes = 0;
    for (const auto& b : request.batches()) bytes += b.rows().data().size();
    auto r = exchange->NewRequest(bytes, request.batches_size());
    r->request().set_layer(request.layer());
    for (const auto& b : request.batches()) {
      char* out =
          r->AddRows(b.expert(), DType::kBF16, {b.rows().shape().begin(), b.rows().shape().end()});
      if (out == nullptr) return absl::ResourceExhaustedError("no memory for a request");
      std::memcpy(out, b.rows().data().data(), b.rows().data().size());
    }
    requests.push_back(std::move(r));
  }
  const auto t0 = Clock::now();
  for (int i = 0; i < n; ++i) {
    exchange->Send(endpoint, std::move(requests[i]),
                   [&](const absl::Status& s, v1::ComputeResponse* r) {
                     if (!s.ok()) {
                       status = s;
                     } else if (want_reply_bytes > 0 &&
                                (r->outputs_size() != 1 ||
                                 r->outputs(0).rows().data().size() != want_reply_bytes)) {
                       status = absl::InternalError("the echo came back wrong");
                     }
                   });
  }
  exchange->Wait();
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!status.ok()) return status;
  return s;
}

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))];
}

absl::Status Run(int argc, char** argv) {
  ASSIGN_OR_RETURN(CliArgs args, CliArgs::Parse(std::vector<std::string>(argv + 1, argv + argc),
                                                {"tokens", "hidden", "repeats", "window", "serve",
                                                 "only", "ucx-spin-us", "phases", "in-place"},
                                                {"serve"}));
  ASSIGN_OR_RETURN(int64_t spin_us, args.Int("ucx-spin-us", kUcxDefaultSpin.count()));
  const auto spin = std::chrono::microseconds(std::clamp<int64_t>(spin_us, 0, 1000000));
  if (args.Has("serve")) return Serve(spin);
  std::vector<int64_t> tokens;
  for (absl::string_view s : absl::StrSplit(args.String("tokens", "1,16,256,2048"), ',')) {
    int64_t t;
    if (!absl::SimpleAtoi(s, &t) || t <= 0) return absl::InvalidArgumentError("bad --tokens");
    tokens.push_back(t);
  }
  ASSIGN_OR_RETURN(int64_t H, args.Int("hidden", 4096));
  ASSIGN_OR_RETURN(int64_t repeats, args.Int("repeats", 400));
  ASSIGN_OR_RETURN(int64_t window, args.Int("window", 8));
  // --only grpc|ucx: one transport (for profiling); the other's figures read 0.
  const std::string only_name = args.String("only", "");
  const int only = only_name == "grpc" ? 0 : only_name == "ucx" ? 1 : -1;
  if (!only_name.empty() && only < 0)
    return absl::InvalidArgumentError("--only must be grpc or ucx");
  ASSIGN_OR_RETURN(int64_t in_place_flag, args.Int("in-place", 1));
  in_place = in_place_flag != 0;
  // --phases rtt,bw (default both): one of them alone, for profiling.
  const std::string phases = args.String("phases", "rtt,bw");
  const bool run_rtt = absl::StrContains(phases, "rtt"), run_bw = absl::StrContains(phases, "bw");

  ASSIGN_OR_RETURN(auto child, ChildProcess::Start({SelfExecutable(), "--serve", "--ucx-spin-us",
                                                    std::to_string(spin.count())}));
  ASSIGN_OR_RETURN(std::string endpoint, child->WaitListening(std::chrono::seconds(30)));
  GrpcTransportOptions go;
  go.max_message_bytes = 512 << 20;
  auto grpc = std::make_shared<GrpcExpertTransport>(go);
  ASSIGN_OR_RETURN(std::shared_ptr<UcxExpertTransport> ucx,
                   UcxExpertTransport::Create(grpc, 512 << 20, spin));
  ExpertTransport* transports[2] = {grpc.get(), ucx.get()};

  for (int64_t T : tokens) {
    const size_t bytes = static_cast<size_t>(T * H * 2);
    const v1::ComputeRequest echo = Request(0, T, H), sink = Request(kSinkLayer, T, H);
    // Round trips: fewer repeats for the big ones (16 MiB each way at T=2048, H=4096).
    const int64_t reps =
        std::max<int64_t>(20, repeats * 8192 / std::max<int64_t>(8192, T * H * 2 / 64));
    // In blocks of kBlock calls, alternating: both transports see the same noise, and
    // UCX's polling (a thread spinning for --ucx-spin-us after its last message) does not
    // run into the gRPC calls beyond a block's first few, which would slow them on a
    // machine with few cores.
    constexpr int64_t kBlock = 25;
    std::vector<double> rtt_us[2];
    for (int64_t r = -kBlock; run_rtt && r < reps; r += kBlock) {  // r < 0: warm-up
      for (int which = 0; which < 2; ++which) {
        if (only >= 0 && which != only) {
          if (r >= 0) rtt_us[which].push_back(0);
          continue;
        }
        for (int64_t i = 0; i < kBlock; ++i) {
          ASSIGN_OR_RETURN(double s, Exchange(*transports[which], endpoint, echo, 1, bytes));
          if (r >= 0) rtt_us[which].push_back(s * 1e6);
        }
      }
    }
    // One-way bandwidth: `window` requests in flight, empty replies. Each round is an
    // exchange of `window` calls; the figure is the median over rounds.
    const int64_t rounds =
        window > 0 && run_bw ? std::max<int64_t>(10, reps / 4) : 0;  // --window 0: none
    std::vector<double> gbps[2];
    for (int64_t r = -2; r < rounds; ++r) {
      for (int k = 0; k < 2; ++k) {
        const int which = (r + k) % 2 == 0 ? 0 : 1;
        if (only >= 0 && which != only) {
          gbps[which].push_back(0);
          continue;
        }
        ASSIGN_OR_RETURN(double s,
                         Exchange(*transports[which], endpoint, sink, static_cast<int>(window), 0));
        if (r >= 0)
          gbps[which].push_back(static_cast<double>(bytes) * static_cast<double>(window) / s / 1e9);
      }
    }
    for (auto* v : {&gbps[0], &gbps[1], &rtt_us[0], &rtt_us[1]}) {
      if (v->empty()) v->push_back(0);
    }
    const double g50 = Percentile(rtt_us[0], 0.5), u50 = Percentile(rtt_us[1], 0.5);
    std::printf(
        "{\"T\":%lld,\"bytes\":%zu,\"grpc_rtt_p50_us\":%.1f,\"grpc_rtt_p99_us\":%.1f,"
        "\"ucx_rtt_p50_us\":%.1f,\"ucx_rtt_p99_us\":%.1f,\"rtt_ratio_grpc_ucx\":%.2f,"
        "\"grpc_bw_gbs\":%.3f,\"ucx_bw_gbs\":%.3f,\"window\":%lld,\"repeats\":%lld}\n",
        (long long)T, bytes, g50, Percentile(rtt_us[0], 0.99), u50, Percentile(rtt_us[1], 0.99),
        u50 > 0 ? g50 / u50 : 0.0, Percentile(gbps[0], 0.5), Percentile(gbps[1], 0.5),
        (long long)window, (long long)reps);
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  moemesh::ConfigureForServing();  // as the services do: both sides alike
  const absl::Status s = moemesh::Run(argc, argv);
  if (!s.ok()) {
    std::fprintf(stderr, "transport_bench: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
