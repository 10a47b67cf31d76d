// Symmetric per-row int8 quantization, shared by the int8 activations (int8_linear.cpp) and the
// int8 KV cache rows (decoder.cpp stores them, paged_attention.cpp reads them): values over
// max|x| / 127 (the max at least kMinAbsMax, MIN_ABS_MAX in model/weight_formats/int8.py), rounded
// half to even as torch.round; a cached row is head_dim such values followed by its float32 scale.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr float kMinAbsMax = 1e-12f;  // an all-zero row gets a finite scale
constexpr int64_t kScaleBytes = 4;    // the float32 scale at the end of an int8 cache row

// Elements per cached row: head_dim, plus the 4 bytes of an int8 row's scale.
template <typename T>
constexpr int64_t row_stride(int64_t dim) { return std::is_same_v<T, int8_t> ? dim + kScaleBytes : dim; }

// out[0:n] = row[0:n] / scale rounded half to even and clamped to +-127; returns the scale.
inline float quantize_row(const float* row, int8_t* out, int64_t n) {
    float top = 0.f;
    int64_t c = 0;
#if defined(__AVX512F__)
    __m512 topv = _mm512_setzero_ps();
    for (; c + 16 <= n; c += 16) topv = _mm512_max_ps(topv, _mm512_abs_ps(_mm512_loadu_ps(row + c)));
    top = _mm512_reduce_max_ps(topv);
#endif
    for (; c < n; ++c) top = std::max(top, std::fabs(row[c]));
    const float scale = std::max(top, kMinAbsMax) / 127.f;
    c = 0;
#if defined(__AVX512F__)
    const __m512 sv = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    for (; c + 16 <= n; c += 16) {
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(row + c), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
    }
#endif
    for (; c < n; ++c)  // nearbyint: round half to even, as torch.round
        out[c] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(row[c] / scale))));
    return scale;
}

}  // namespace
