// The expert FFN schedule that MoeLayer and every expert service run: each batch's rows
// through its expert with the kernels' canonical task split (kernels/cpu/expert_ffn.h),
// all gate/up tasks of all batches in one ParallelFor, then all down tasks. The split is
// fixed by the shapes, so whatever runs where, in whatever order, the bits are the same:
// this is what makes the mesh's answers equal MoeLayer's.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/expert_ffn.h"
#include "services/base/thread_pool.h"

namespace moemesh {

// One expert's rows of a layer call, and where its results and scratch go.
struct ExpertBatch {
  ExpertFfnWeights weights;
  const float* x = nullptr;  // [rows, H] float32
  int64_t rows = 0;
  float* y = nullptr;        // [rows, H] float32 out
  float* gate_up = nullptr;  // GateUpScratch(weights, rows) floats (AssignScratch)
  float* hidden = nullptr;   // HiddenScratch(weights, rows) floats (AssignScratch)
};

// Floats of gate/up and of hidden scratch that `batches` need together.
struct ExpertScratchSize {
  int64_t gate_up = 0;
  int64_t hidden = 0;
};
ExpertScratchSize ScratchFor(const std::vector<ExpertBatch>& batches);
// Points each batch's gate_up and hidden into the two buffers (ScratchFor's sizes), one
// batch after another.
void AssignScratch(std::vector<ExpertBatch>& batches, float* gate_up, float* hidden);

// One unit of the schedule: a batch and the index of one of its canonical tasks.
struct ExpertTask {
  int64_t batch;
  int64_t index;
};

// Runs every batch (rows = 0 skipped) on `pool`. `tasks` is scratch kept by the caller
// across calls. Batches must not overlap in y, gate_up or hidden.
void RunExpertBatches(ThreadPool& pool, const std::vector<ExpertBatch>& batches,
                      std::vector<ExpertTask>& tasks);

}  // namespace moemesh
