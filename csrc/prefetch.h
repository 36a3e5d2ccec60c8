// Software prefetch of rows, shared by the op kernels: for rows reached through an index (routed
// windows, expert groups), which the hardware prefetchers cannot predict.
#pragma once

#include <cstdint>

namespace ovseg_fast {

// Asks for the cache lines of n values at row ahead of time, for writing (Write) or reading.
template <bool Write, typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b, Write ? 1 : 0);
}

}  // namespace ovseg_fast
