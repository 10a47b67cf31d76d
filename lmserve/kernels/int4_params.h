// The group scales and lows of a packed 4-bit weight are (K/32, N) float16: a 16-output block's
// values for group g + 1 sit n values after those for group g, a page or more apart in the wider
// projections, and the CPU's prefetchers do not follow strides across pages. Every int4 product
// reads them group by group, so each fetches them a few groups ahead (one-row steps on a
// Qwen2-0.5B-shaped model: 48 -> 56 tok/s, engine alone; bench/RESULTS.md).
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace int4_params {

constexpr int64_t kAhead = 4;  // groups; 2 and 8 measured no better

// Past the last group the addresses are only prefetched, never read: a prefetch does not fault.
inline void prefetch(const at::Half* ws, const at::Half* wl, int64_t g, int64_t n) {
    __builtin_prefetch(ws + (g + kAhead) * n, 0, 3);
    __builtin_prefetch(wl + (g + kAhead) * n, 0, 3);
}

}  // namespace int4_params
