#include "services/moe/expert_tasks.h"

namespace moemesh {

ExpertScratchSize ScratchFor(const std::vector<ExpertBatch>& batches) {
  ExpertScratchSize size;
  for (const ExpertBatch& b : batches) {
    size.gate_up += GateUpScratch(b.weights, b.rows);
    size.hidden += HiddenScratch(b.weights, b.rows);
  }
  return size;
}

void AssignScratch(std::vector<ExpertBatch>& batches, float* gate_up, float* hidden) {
  for (ExpertBatch& b : batches) {
    b.gate_up = gate_up;
    b.hidden = hidden;
    gate_up += GateUpScratch(b.weights, b.rows);
    hidden += HiddenScratch(b.weights, b.rows);
  }
}

void RunExpertBatches(ThreadPool& pool, const std::vector<ExpertBatch>& batches,
                      std::vector<ExpertTask>& tasks) {
  const int64_t n = static_cast<int64_t>(batches.size());
  tasks.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (batches[i].rows == 0) continue;
    for (int64_t t = 0; t < NumGateUpTasks(batches[i].weights); ++t) tasks.push_back({i, t});
  }
  pool.ParallelFor(static_cast<int64_t>(tasks.size()), [&](int64_t k) {
    const ExpertBatch& b = batches[tasks[k].batch];
    ExpertGateUpTask(b.weights, b.x, b.rows, tasks[k].index, b.gate_up, b.hidden);
  });
  tasks.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (batches[i].rows == 0) continue;
    for (int64_t t = 0; t < NumDownTasks(batches[i].weights); ++t) tasks.push_back({i, t});
  }
  pool.ParallelFor(static_cast<int64_t>(tasks.size()), [&](int64_t k) {
    const ExpertBatch& b = batches[tasks[k].batch];
    ExpertDownTask(b.weights, b.hidden, b.rows, tasks[k].index, b.y);
  });
}

}  // namespace moemesh
