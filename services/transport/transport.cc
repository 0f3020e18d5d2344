#include "services/transport/transport.h"

#include "services/rpc/wire.h"
#include "services/transport/queued_exchange.h"

namespace moemesh {

absl::Status TakeResponse(std::unique_ptr<v1::ComputeResponse>& reply,
                          v1::ComputeResponse* response) {
  if (reply == nullptr) return absl::InternalError("an OK reply without a response");
  response->Swap(reply.get());
  return absl::OkStatus();
}

size_t OutgoingRequest::AddBatch(int32_t expert, DType dtype, const std::vector<int64_t>& shape) {
  v1::ExpertRows* batch = request_.add_batches();
  batch->set_expert(expert);
  v1::Tensor* rows = batch->mutable_rows();
  rows->set_dtype(ToProtoDType(dtype));
  int64_t numel = 1;
  for (int64_t d : shape) {
    rows->add_shape(d);
    numel *= d;
  }
  return static_cast<size_t>(numel) * DTypeSize(dtype);
}

char* OutgoingRequest::AddRows(int32_t expert, DType dtype, const std::vector<int64_t>& shape) {
  const size_t n = AddBatch(expert, dtype, shape);
  std::string* data =
      request_.mutable_batches(request_.batches_size() - 1)->mutable_rows()->mutable_data();
  data->resize(n);
  return data->data();
}

std::unique_ptr<v1::ComputeRequest> OutgoingRequest::TakeProto() {
  auto out = std::make_unique<v1::ComputeRequest>();
  out->Swap(&request_);
  return out;
}

bool ExpertTransport::Exchange::WaitUntil(Clock::time_point, const std::function<bool()>&) {
  Wait();
  return true;
}

std::unique_ptr<OutgoingRequest> ExpertTransport::Exchange::NewRequest(size_t, int) {
  return std::make_unique<OutgoingRequest>();
}

void ExpertTransport::Exchange::Send(const std::string& endpoint,
                                     std::unique_ptr<OutgoingRequest> request, Done done) {
  Start(endpoint, request->TakeProto(), std::move(done));
}

}  // namespace moemesh
