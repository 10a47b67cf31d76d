// One reduction over the 8 float lanes of an AVX2 register, in one order for every kernel that
// reduces that way (f32_linear.cpp's sums, int4_linear.cpp's quantizers' minimum and maximum).
#pragma once

#include <immintrin.h>

#if defined(__AVX2__)
namespace avx2_fold {

// `op` (two __m128 -> __m128, as _mm_add_ps) over the 8 lanes of `v`: the halves, then pairs, then the last two.
template <typename Op>
inline float fold(__m256 v, Op op) {
    __m128 s = op(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = op(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(op(s, _mm_movehdup_ps(s)));
}
// The operations, as objects: each fold inlines its own, as a lambda would.
inline constexpr struct { __m128 operator()(__m128 a, __m128 b) const { return _mm_add_ps(a, b); } } add;
inline constexpr struct { __m128 operator()(__m128 a, __m128 b) const { return _mm_max_ps(a, b); } } max;
inline constexpr struct { __m128 operator()(__m128 a, __m128 b) const { return _mm_min_ps(a, b); } } min;

}  // namespace avx2_fold
#endif
