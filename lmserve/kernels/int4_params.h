// The group scales and lows of a packed 4-bit weight are (K/32, N) float16: a 16-output block's
// values for group g + 1 sit n values after those for group g, a page or more apart in the wider
// projections, and the CPU's prefetchers do not follow strides across pages. Every int4 product
// reads them group by group, so each fetches them a few groups ahead (one-row steps on a
// Qwen2-0.5B-shaped model: 44 -> 50 tok/s, engine alone; bench/RESULTS.md).
#pragma once

#include "aten.h"

#include <cstdint>

namespace int4_params {

constexpr int64_t kAhead = 4;  // groups; 2 and 8 measured no better

// The line `bytes` past p, fetched into the L1 cache. Past the end of an array the address is only
// fetched, never read (a prefetch does not fault), and it is computed as an integer: no pointer
// goes past the array.
inline void prefetch_bytes(const void* p, int64_t bytes) {
    __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + bytes), 0, 3);
}

inline void prefetch(const at::Half* ws, const at::Half* wl, int64_t g, int64_t n) {
    const int64_t bytes = (g + kAhead) * n * static_cast<int64_t>(sizeof(at::Half));
    prefetch_bytes(ws, bytes);
    prefetch_bytes(wl, bytes);
}

}  // namespace int4_params
