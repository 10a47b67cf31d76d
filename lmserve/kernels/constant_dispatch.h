// A run-time count as a compile-time one: the kernels' loops over a few rows or heads are templates
// on that count, so that their accumulators stay in registers.
#pragma once

#include <cstdint>
#include <type_traits>

namespace {

// f(std::integral_constant<int, n>{}) for n in 1..Max; Max for any n past it (and below 1).
template <int Max, int I = 1, typename F>
inline void with_constant(int64_t n, const F& f) {
    if constexpr (I == Max) {
        f(std::integral_constant<int, I>{});
    } else if (n == I) {
        f(std::integral_constant<int, I>{});
    } else {
        with_constant<Max, I + 1>(n, f);
    }
}

}  // namespace
