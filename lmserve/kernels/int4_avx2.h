// The W4A8 register tile of int4_registers.h for CPUs with AVX2 but not AVX512-VNNI (included from
// there, after its layouts). vpmaddubsw multiplies the weight's unsigned 4-bit values by the
// activations' signed bytes and adds each pair of products into an int16 lane, as vpdpbusd adds
// each four into an int32 one. A group's 32 columns put 16 products into each int16 lane, each at
// most 15 * 127 in magnitude (the activations are int8 in -127..127): 30,480 < 32,767, so a group
// sums in int16 without saturating, and one vpmaddwd by ones then gives its int32 sums, exact as
// VNNI's. The float32 arithmetic after it is VNNI's, operation for operation, so both give the
// same results bit for bit (one machine builds one of them; tests/unit/test_int4_linear.py holds
// each to one float32 spelling of that arithmetic bit for bit, and to the exact sums at the int16
// bound).
#pragma once

namespace int4_registers {

constexpr int kRows = 2;    // activation rows a register tile covers
constexpr int kBlocks = 2;  // 16-output blocks a register tile covers: 8 int16 sums in registers

// Row i, half h of the tile (8 outputs; half h of the tile is half h % 2 of block h / 2).
#define LM4_TILE(X) X(0, 0) X(0, 1) X(0, 2) X(0, 3) X(1, 0) X(1, 1) X(1, 2) X(1, 3)

// out[i, 16 j + l] for i < R, j < B, as int4_registers.h's VNNI tile gives it. The float32
// accumulators live in `sums`, touched once a group; the int16 sums of a group in registers.
template <int R, int B, typename Layout>
inline void tile(const int8_t* a, int64_t k, const float* x_scales, const float* x_sums, int64_t groups,
                 const Layout& layout, const float* bias, float* out, int64_t ldo, bool add) {
    static_assert(R >= 1 && R <= kRows && B >= 1 && B <= kBlocks, "tile size");
    alignas(32) float sums[R][2 * B][8] = {};
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int64_t g = 0; g < groups; ++g) {
        layout.prefetch_group(g);
#define LM4_CLEAR(i, h) __m256i c##i##h = _mm256_setzero_si256();
        LM4_TILE(LM4_CLEAR)
#undef LM4_CLEAR
        for (int s = 0; s < 4; ++s) {  // four steps of 8 columns: 32, one group
            const int64_t step = g * 4 + s;
            layout.prefetch_step(g, s, B);
            __m256i al0, ah0, al1, ah1;
            al0 = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(a + step * 8));
            ah0 = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(a + step * 8 + 4));
            if constexpr (R > 1) {
                al1 = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(a + k + step * 8));
                ah1 = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(a + k + step * 8 + 4));
            }
#define LM4_HALF(h) if constexpr (h / 2 < B) { \
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(layout.bytes(h / 2, g, s) + h % 2 * 32)); \
                const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble); \
                c0##h = _mm256_add_epi16(c0##h, _mm256_add_epi16(_mm256_maddubs_epi16(lo, al0), _mm256_maddubs_epi16(hi, ah0))); \
                if constexpr (R > 1) \
                    c1##h = _mm256_add_epi16(c1##h, _mm256_add_epi16(_mm256_maddubs_epi16(lo, al1), _mm256_maddubs_epi16(hi, ah1))); }
            LM4_HALF(0) LM4_HALF(1) LM4_HALF(2) LM4_HALF(3)
#undef LM4_HALF
        }
        // f += (float) sum * (w_scale * x_scale) + w_low * x_sum
        const auto half8 = [](const at::Half* p) {
            return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        };
#define LM4_SCALE(i, h) if constexpr (R > i && h / 2 < B) { \
            const __m256 scale = _mm256_mul_ps(half8(layout.scales(h / 2, g) + h % 2 * 8), _mm256_set1_ps(x_scales[i * groups + g])); \
            const __m256 total = _mm256_cvtepi32_ps(_mm256_madd_epi16(c##i##h, ones)); \
            __m256 f = _mm256_fmadd_ps(total, scale, _mm256_load_ps(sums[i][h])); \
            f = _mm256_fmadd_ps(half8(layout.lows(h / 2, g) + h % 2 * 8), _mm256_set1_ps(x_sums[i * groups + g]), f); \
            _mm256_store_ps(sums[i][h], f); }
        LM4_TILE(LM4_SCALE)
#undef LM4_SCALE
    }
#define LM4_STORE(i, h) if constexpr (R > i && h / 2 < B) { \
        __m256 v = _mm256_load_ps(sums[i][h]); \
        if (bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + h * 8)); \
        if (add) v = _mm256_add_ps(_mm256_loadu_ps(out + i * ldo + h * 8), v); \
        _mm256_storeu_ps(out + i * ldo + h * 8, v); }
    LM4_TILE(LM4_STORE)
#undef LM4_STORE
}
#undef LM4_TILE

}  // namespace int4_registers
