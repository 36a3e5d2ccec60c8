// Dynamic hand-out of tasks to ATen's intra-op threads, shared by the op kernels.
//
// at::parallel_for gives every thread a static share, so a region waits for its slowest thread; on a
// machine shared with other jobs (a VM, a CI runner) a thread that loses its core for a scheduler slice
// then holds up the whole join. Handing the tasks out one at a time instead lets the other threads
// take that thread's share.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

#include "cpu_dispatch.h"

namespace ovseg_fast {
namespace CPU_CAPABILITY {
namespace {

// Threads of a parallel_tasks region over n tasks, at most max_slots (1: run inline).
inline int64_t task_slots(int64_t n, int64_t max_slots = std::numeric_limits<int64_t>::max()) {
  return std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), n, max_slots}));
}

// Runs fn(slot, claim) once per thread of task_slots(n, max_slots): claim() hands out the tasks
// [0, n) one at a time (-1 when none is left) and slot names the thread, for its scratch and partial
// sums.
template <typename F>
void parallel_tasks(int64_t n, const F& fn, int64_t max_slots = std::numeric_limits<int64_t>::max()) {
  std::atomic<int64_t> next{0};
  auto claim = [&]() -> int64_t {
    const int64_t t = next++;
    return t < n ? t : -1;
  };
  at::parallel_for(0, task_slots(n, max_slots), 1, [&](int64_t slot, int64_t) {
    // ATen ops on worker threads: the caller's below-autograd dispatch state is thread-local.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    fn(slot, claim);
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace ovseg_fast
