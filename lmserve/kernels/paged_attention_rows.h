// The row helpers of paged_attention.cpp: what one cached row holds (float32, bfloat16, or int8
// values with their float32 scale), widening, dot products and softmax: AVX-512, AVX2 with FMA, or
// portable. The portable loops' float32 sums are not vectorized by the compiler (the build does not
// reorder float arithmetic): on an AVX2 host a one-row step took 1.2 ms more per 100 positions on
// them, 0.5 ms on these (bench/RESULTS.md, forty-first sitting).
#pragma once

#include "aten.h"

#include <cmath>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define LMSERVE_AVX2_FMA 1  // exp8 and sum8 (the prompt kernel's float32 path takes them beside AVX-512F too)
#if !defined(__AVX512F__)
#define LMSERVE_ROWS_AVX2 1
#endif
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
#elif defined(LMSERVE_ROWS_AVX2)
    for (; d + 8 <= n; d += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + d));
        _mm256_storeu_ps(dst + d, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
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
#elif defined(LMSERVE_ROWS_AVX2)
    const __m256 sv = _mm256_set1_ps(scale);
    for (; d + 8 <= n; d += 8) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + d));
        _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), sv));
    }
#endif
    for (; d < n; ++d) dst[d] = static_cast<float>(src[d]) * scale;
}

#if defined(LMSERVE_AVX2_FMA)
inline float sum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
    int64_t d = 0;
    float total = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= n; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    total = _mm512_reduce_add_ps(acc);
#elif defined(LMSERVE_ROWS_AVX2)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  // two chains of FMA latency, not one
    for (; d + 16 <= n; d += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
    }
    for (; d + 8 <= n; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    total = sum8(_mm256_add_ps(acc0, acc1));
#endif
    for (; d < n; ++d) total += a[d] * b[d];
    return total;
}

inline void axpy(float p, const float* x, float* y, int64_t n) {  // y += p * x
    int64_t d = 0;
#if defined(__AVX512F__)
    const __m512 pv = _mm512_set1_ps(p);
    for (; d + 16 <= n; d += 16) _mm512_storeu_ps(y + d, _mm512_fmadd_ps(pv, _mm512_loadu_ps(x + d), _mm512_loadu_ps(y + d)));
#elif defined(LMSERVE_ROWS_AVX2)
    const __m256 pv = _mm256_set1_ps(p);
    for (; d + 8 <= n; d += 8) _mm256_storeu_ps(y + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
#endif
    for (; d < n; ++d) y[d] += p * x[d];
}

#if defined(__AVX512F__) || defined(LMSERVE_AVX2_FMA)
// exp's arithmetic, in 16 lanes (exp16) or 8 (exp8): x clamped to [kExpLow, kExpHigh], n = round(x
// log2 e), r = x - n ln2 (ln2 in two parts, |r| <= ln2/2), a degree-6 polynomial on r (Horner's
// rule on kExpTerms, 1/6! first) times 2^n; relative error ~2e-7, as libm would give within float32
// rounding.
constexpr float kExpHigh = 88.3f, kExpLow = -87.3f, kLog2e = 1.44269504f;
constexpr float kLn2High = 0.693145752f, kLn2Low = 1.42860677e-6f;
constexpr float kExpTerms[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
#endif

#if defined(__AVX512F__)
inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(kExpHigh)), _mm512_set1_ps(kExpLow));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
    __m512 p = _mm512_set1_ps(kExpTerms[0]);
    for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpTerms[i]));
    return _mm512_scalef_ps(p, n);
}
#endif
#if defined(LMSERVE_AVX2_FMA)
// 2^n (n in -126..127 after the clamp) is built in the exponent field: AVX2 has no scalef.
inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(kExpHigh)), _mm256_set1_ps(kExpLow));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), r);
    __m256 p = _mm256_set1_ps(kExpTerms[0]);
    for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTerms[i]));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}
#endif

// In place: s[0:n] = softmax(s[0:n]), in float32.
inline void softmax(float* s, int64_t n) {
    float top = -INFINITY;
    int64_t t = 0;
#if defined(LMSERVE_ROWS_AVX2)
    if (n >= 8) {
        __m256 most = _mm256_loadu_ps(s);
        for (t = 8; t + 8 <= n; t += 8) most = _mm256_max_ps(most, _mm256_loadu_ps(s + t));
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, most);
        for (float lane : lanes) top = lane > top ? lane : top;
    }
#endif
    for (; t < n; ++t) top = s[t] > top ? s[t] : top;
    float total = 0.f;
    t = 0;
#if defined(__AVX512F__)
    const __m512 topv = _mm512_set1_ps(top);
    __m512 sum = _mm512_setzero_ps();
    for (; t + 16 <= n; t += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), topv));
        _mm512_storeu_ps(s + t, e);
        sum = _mm512_add_ps(sum, e);
    }
    total = _mm512_reduce_add_ps(sum);
#elif defined(LMSERVE_ROWS_AVX2)
    const __m256 topv = _mm256_set1_ps(top);
    __m256 sum = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), topv));
        _mm256_storeu_ps(s + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    total = sum8(sum);
#endif
    for (; t < n; ++t) {
        s[t] = std::exp(s[t] - top);
        total += s[t];
    }
    const float inv = 1.f / total;
    for (t = 0; t < n; ++t) s[t] *= inv;
}

}  // namespace
