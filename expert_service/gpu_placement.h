// How an expert service that owns several local GPUs (--device cuda --gpu 0,1,...) spreads
// each layer's held experts over them, and how it evens out their load at run time. Pure
// functions, no CUDA: GpuExperts (expert_service/gpu_experts_cuda.cc) applies what they decide,
// moving weights between the GPUs with NCCL.
//
// Memory comes first: a GPU never holds more of a layer's experts than an even spread
// gives it (ceil(E / G)), so a layout that fits stays fitting; load is evened out by
// swapping a hot expert with a cold one (or moving one, where the count allows).
#pragma once

#include <cstdint>
#include <vector>

namespace moemesh {

// A layer's held experts over `num_devices` GPUs. `current[i]`: the GPU that the layer's
// i-th held expert is on now, or -1 when it is new. Those already placed stay; new ones
// go, in order, to the GPU with the fewest of the layer's experts (the lowest index on a
// tie). Returns the GPU of each expert, in the order of `current`.
std::vector<int> AssignLocalExperts(const std::vector<int>& current, int num_devices);

// One change of a GPU for one expert (by index into the layer's experts).
struct LocalMove {
  int expert = 0;
  int from = 0, to = 0;
};

// Moves that lower the most loaded GPU's load, given each expert's recent `load` (rows)
// and GPU (`device`): while the most loaded GPU carries more than (1 + tolerance) × the
// mean, the best single move or swap between it and the least loaded GPU (the one that
// leaves the lower maximum of the two) is taken, as long as it lowers that maximum and no
// GPU goes over ceil(E / G) experts; at most `max_moves` experts change GPU (a swap is
// two; an expert may move more than once: apply the moves in order). Empty when the load
// is even enough or nothing helps.
std::vector<LocalMove> BalanceLocalExperts(const std::vector<int>& device,
                                           const std::vector<double>& load, int num_devices,
                                           double tolerance, int max_moves);

}  // namespace moemesh
