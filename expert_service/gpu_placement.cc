#include "expert_service/gpu_placement.h"

#include <algorithm>
#include <numeric>

namespace moemesh {

std::vector<int> AssignLocalExperts(const std::vector<int>& current, int num_devices) {
  std::vector<int> device(current.size(), 0);
  if (num_devices <= 1) return device;
  std::vector<int> count(num_devices, 0);
  for (int d : current) {
    if (d >= 0 && d < num_devices) ++count[d];
  }
  for (size_t i = 0; i < current.size(); ++i) {
    if (current[i] >= 0 && current[i] < num_devices) {
      device[i] = current[i];
      continue;
    }
    const int d = static_cast<int>(std::min_element(count.begin(), count.end()) - count.begin());
    device[i] = d;
    ++count[d];
  }
  return device;
}

std::vector<LocalMove> BalanceLocalExperts(const std::vector<int>& device_in,
                                           const std::vector<double>& load, int num_devices,
                                           double tolerance, int max_moves) {
  std::vector<LocalMove> moves;
  const int n = static_cast<int>(device_in.size());
  if (num_devices <= 1 || n == 0 || load.size() != device_in.size()) return moves;
  std::vector<int> device = device_in;
  const int cap = (n + num_devices - 1) / num_devices;
  const double total = std::accumulate(load.begin(), load.end(), 0.0);
  if (total <= 0) return moves;
  const double mean = total / num_devices;
  int changed = 0;
  while (changed < max_moves) {
    std::vector<double> per(num_devices, 0);
    std::vector<int> count(num_devices, 0);
    for (int i = 0; i < n; ++i) {
      per[device[i]] += load[i];
      ++count[device[i]];
    }
    const int hi = static_cast<int>(std::max_element(per.begin(), per.end()) - per.begin());
    const int lo = static_cast<int>(std::min_element(per.begin(), per.end()) - per.begin());
    if (per[hi] <= (1 + tolerance) * mean || hi == lo) break;
    // The best move (hot to lo) or swap (hot to lo, cold to hi): the lowest new maximum
    // of the two GPUs.
    double best = per[hi];
    int best_hot = -1, best_cold = -1;
    for (int h = 0; h < n; ++h) {
      if (device[h] != hi) continue;
      if (count[lo] < cap && changed + 1 <= max_moves) {
        const double m = std::max(per[hi] - load[h], per[lo] + load[h]);
        if (m < best) {
          best = m;
          best_hot = h;
          best_cold = -1;
        }
      }
      if (changed + 2 > max_moves) continue;
      for (int c = 0; c < n; ++c) {
        if (device[c] != lo || load[c] >= load[h]) continue;
        const double d = load[h] - load[c];
        const double m = std::max(per[hi] - d, per[lo] + d);
        if (m < best) {
          best = m;
          best_hot = h;
          best_cold = c;
        }
      }
    }
    // Only a real gain: a tiny one is not worth copying an expert's weights for.
    if (best_hot < 0 || best > per[hi] - 1e-3 * mean) break;
    moves.push_back({best_hot, hi, lo});
    device[best_hot] = lo;
    ++changed;
    if (best_cold >= 0) {
      moves.push_back({best_cold, lo, hi});
      device[best_cold] = hi;
      ++changed;
    }
  }
  return moves;
}

}  // namespace moemesh
