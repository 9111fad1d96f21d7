// Work items handed to the intra-op threads costliest first (shared by the attention and MoE kernels).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <vector>

namespace longmoe {

// Work items of one kernel call handed to the intra-op threads costliest first, each thread taking the next
// item from a shared counter. at::parallel_for's static split gives each thread one contiguous range of
// items, which is unbalanced when items differ in cost: causal query tiles (the last sees every key tile,
// the first one) and, above all, heads whose block masks keep different numbers of tiles (the layers of
// one XAttention call differ up to 6x in density, and a contiguous split puts whole layers on one thread).
// Every item writes only its own outputs, so the results do not depend on the schedule.
//
//   const WorkQueue work(costs);
//   at::parallel_for(0, work.threads(), 1, [&](int64_t, int64_t) {
//     /* per-thread scratch */
//     for (int64_t item; work.next(item);) { ... }
//   });
class WorkQueue {
 public:
  explicit WorkQueue(const std::vector<int64_t>& cost) : order_(cost.size()) {
    std::iota(order_.begin(), order_.end(), int64_t{0});
    std::stable_sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  }
  int64_t threads() const {
    return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(order_.size())));
  }
  bool next(int64_t& item) const {
    const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= static_cast<int64_t>(order_.size())) return false;
    item = order_[i];
    return true;
  }

 private:
  std::vector<int64_t> order_;
  mutable std::atomic<int64_t> next_{0};
};

}  // namespace longmoe
