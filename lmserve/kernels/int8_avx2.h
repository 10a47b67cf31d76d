// The packed W8A8 product's register tile (int8_linear.cpp's vnni_tile) for CPUs with AVX2 but not
// AVX512-VNNI, over the same packed weight: (N/16, K/4, 16, 4) uint8 holding w + 128. vpmaddubsw
// multiplies unsigned bytes by signed ones and adds each pair of products into an int16 lane, where
// w + 128 (up to 255) times an activation (up to 127 in magnitude) would saturate a pair; so the tile
// takes w back (the byte xor 128), multiplies |w| by the activation with w's sign (vpsignb, as
// llama.cpp's AVX2 dot products do): a pair is then at most 2 * 127 * 127 = 32,258, and vpmaddwd by
// ones widens each pair to int32 before they are added. The int32 sums are sum_k w a exactly, so
// the row offsets VNNI's tile subtracts are zero here, and the float32 arithmetic after them is
// VNNI's: both give the same results bit for bit by construction (tests/unit/test_int8_linear.py
// holds this tile to at::_int_mm's sums bit for bit). Included from int8_linear.cpp, inside no namespace.
#pragma once

namespace {

constexpr int kRows = 4;    // activation rows a register tile covers
constexpr int kBlocks = 4;  // 16-output blocks a tile covers, one after another (8 int32 sums each)

// out[i, 16 j + l] for i < R, j < B as vnni_tile gives it (row_offsets: zeros, see above). Each block
// is its own pass over K with R rows' 8-output halves in 2 R accumulators; one cache line of the
// weights that follow is fetched every `prefetch_every` steps of the first pass.
template <int R, int B>
inline void vnni_tile(const int8_t* a, int64_t k, const uint8_t* w, const int32_t* row_offsets,
                      const float* x_scales, const float* w_scales, const float* bias, float* out, int64_t ldo,
                      const uint8_t* prefetch, int64_t prefetch_every) {
    static_assert(R >= 1 && R <= kRows && B >= 1 && B <= kBlocks, "tile size");
    const int64_t block_bytes = k * 16;
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
    for (int j = 0; j < B; ++j) {
        __m256i c[R][2];
        for (int i = 0; i < R; ++i) c[i][0] = c[i][1] = _mm256_setzero_si256();
        const uint8_t* wj = w + j * block_bytes;
        for (int64_t g = 0; g < k / 4; ++g) {
            if (j == 0 && prefetch != nullptr && g % prefetch_every == 0)
                _mm_prefetch(reinterpret_cast<const char*>(prefetch + (g / prefetch_every) * 64), _MM_HINT_T0);
            __m256i av[R];
            for (int i = 0; i < R; ++i) av[i] = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(a + i * k + g * 4));
            for (int h = 0; h < 2; ++h) {
                const __m256i wv = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj + g * 64 + h * 32)), flip);
                const __m256i magnitude = _mm256_abs_epi8(wv);
                for (int i = 0; i < R; ++i)
                    c[i][h] = _mm256_add_epi32(c[i][h], _mm256_madd_epi16(
                        _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(av[i], wv)), ones));
            }
        }
        // ((float) sum * x_scale) * w_scale (+ bias): vnni_tile's order of operations
        for (int i = 0; i < R; ++i)
            for (int h = 0; h < 2; ++h) {
                __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(c[i][h], _mm256_set1_epi32(row_offsets[i])));
                v = _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(x_scales[i])), _mm256_loadu_ps(w_scales + j * 16 + h * 8));
                if (bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j * 16 + h * 8));
                _mm256_storeu_ps(out + i * ldo + j * 16 + h * 8, v);
            }
    }
}

}  // namespace
