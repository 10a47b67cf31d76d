// The row helpers of paged_attention.cpp: what one cached row holds (float32, bfloat16, or int8
// values with their float32 scale), widening, dot products and softmax, portable or AVX-512.
#pragma once

#include "aten.h"

#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "int8_rows.h"

namespace {

template <typename T>
inline float row_scale(const T* row, int64_t dim) {
    if constexpr (std::is_same_v<T, int8_t>) {
        float scale;
        std::memcpy(&scale, row + dim, sizeof(scale));
        return scale;
    } else {
        return 1.f;
    }
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
    uint32_t bits = static_cast<uint32_t>(x.x) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
}

// Widen one row of head_dim values to float32.
inline void widen(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, sizeof(float) * n); }
inline void widen(const c10::BFloat16* src, float* dst, int64_t n) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    int64_t d = 0;
#if defined(__AVX512F__)
    for (; d + 16 <= n; d += 16) {
        __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + d));
        _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
#endif
    for (; d < n; ++d) dst[d] = to_float(src[d]);
}
inline void widen(const int8_t* src, float* dst, int64_t n) {  // an int8 row, times its scale
    const float scale = row_scale(src, n);
    int64_t d = 0;
#if defined(__AVX512F__)
    const __m512 sv = _mm512_set1_ps(scale);
    for (; d + 16 <= n; d += 16) {
        const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d))));
        _mm512_storeu_ps(dst + d, _mm512_mul_ps(x, sv));
    }
#endif
    for (; d < n; ++d) dst[d] = static_cast<float>(src[d]) * scale;
}

inline float dot(const float* a, const float* b, int64_t n) {
    int64_t d = 0;
    float total = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= n; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    total = _mm512_reduce_add_ps(acc);
#endif
    for (; d < n; ++d) total += a[d] * b[d];
    return total;
}

inline void axpy(float p, const float* x, float* y, int64_t n) {  // y += p * x
    int64_t d = 0;
#if defined(__AVX512F__)
    const __m512 pv = _mm512_set1_ps(p);
    for (; d + 16 <= n; d += 16) _mm512_storeu_ps(y + d, _mm512_fmadd_ps(pv, _mm512_loadu_ps(x + d), _mm512_loadu_ps(y + d)));
#endif
    for (; d < n; ++d) y[d] += p * x[d];
}

#if defined(__AVX512F__)
// exp for 16 lanes: 2^round(x log2 e) times a degree-6 polynomial on the remainder (|r| <= ln2/2,
// relative error ~2e-7), as libm would give within float32 rounding.
inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3f)), _mm512_set1_ps(-87.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

// In place: s[0:n] = softmax(s[0:n]), in float32.
inline void softmax(float* s, int64_t n) {
    float top = -INFINITY;
    for (int64_t t = 0; t < n; ++t) top = s[t] > top ? s[t] : top;
    float total = 0.f;
    int64_t t = 0;
#if defined(__AVX512F__)
    const __m512 topv = _mm512_set1_ps(top);
    __m512 sum = _mm512_setzero_ps();
    for (; t + 16 <= n; t += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), topv));
        _mm512_storeu_ps(s + t, e);
        sum = _mm512_add_ps(sum, e);
    }
    total = _mm512_reduce_add_ps(sum);
#endif
    for (; t < n; ++t) {
        s[t] = std::exp(s[t] - top);
        total += s[t];
    }
    const float inv = 1.f / total;
    for (t = 0; t < n; ++t) s[t] *= inv;
}

}  // namespace
