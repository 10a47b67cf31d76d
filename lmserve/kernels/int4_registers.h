// The W4A8 product of int4_linear.cpp on registers, over either of the weight's two layouts, with
// AVX512-VNNI where the CPU has it and AVX2 elsewhere (int4_avx2.h):
// - blocks: (N/16, K/8, 16, 4) uint8 with (K/32, N) float16 scales and lows beside it, the layout the
//   AMX tiles unpack (int4_tiles.h, int4_bf16_tiles.h). A tile reads its two blocks' bytes and their
//   group scales and lows from four places, the scales of successive groups a page or more apart;
// - pairs: (N/32, K/32, 640) uint8, for CPUs without those tiles. Each pair of 16-output blocks holds,
//   group after group, block 0's 256 bytes of the group, block 1's, then the group's 32 scales and 32
//   lows as float16: one stream, read front to back. Steps of 1-4 rows over SmolLM2's 120
//   projections, out of cache, run 1.2-1.5x faster on pairs, 16 rows 1.1x, 64 and more alike
//   (`python -m bench.int4_layouts`; bench/RESULTS.md, thirtieth sitting).
// Both give the same results bit for bit: the same loads, products and float32 arithmetic, in the
// same order, from other addresses. So do the two instruction sets: each group's integer sums are
// exact on both, and the float32 arithmetic on them is the same.
#pragma once

#include <cstdint>

namespace int4_registers {

// The layouts' sizes, which pack_int4_pairs writes by (built for any CPU).
constexpr int64_t kGroupBytes = 256;  // a block's bytes for one group of 32 columns: 4 steps of 64
constexpr int64_t kPairGroupBytes = 2 * kGroupBytes + 2 * 32 * 2;  // two blocks, 32 scales and 32 lows

}  // namespace int4_registers

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LMSERVE_W4A8_VNNI 1
#endif
#if defined(LMSERVE_W4A8_VNNI) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define LMSERVE_W4A8_GEMM 1  // int4_linear runs here
#endif

#if defined(LMSERVE_W4A8_GEMM)

#include "aten.h"
#include <immintrin.h>

#include "int4_params.h"

namespace int4_registers {

// A block's packed bytes: byte [s, l, b] of block j holds q[16 j + l, 8 s + b] in its low nibble and
// q[16 j + l, 8 s + 4 + b] in its high one, so that one 64-byte load, masked or shifted, gives
// vpdpbusd (unsigned bytes times signed bytes, four products summed into each int32 lane) four
// columns of K for 16 outputs, twice. Weights are 0..15: no offset to undo.
constexpr int64_t kWeightAhead = 1024;  // blocks: bytes ahead in each block; 512 and 2,048 measured no better
constexpr int64_t kPairAhead = 2 * kPairGroupBytes;  // pairs: 1 and 4 groups ahead measured no better

// Blocks j and j + 1 (B = 2) of the blocks layout from w, each k * 8 bytes; the scales and lows of
// block j's outputs at ws / wl, a row of n values a group.
struct Blocks {
    const uint8_t* w;
    int64_t block_bytes;
    const at::Half* ws;
    const at::Half* wl;
    int64_t n;

    const uint8_t* bytes(int j, int64_t g, int s) const { return w + j * block_bytes + (g * 4 + s) * 64; }
    const at::Half* scales(int j, int64_t g) const { return ws + g * n + j * 16; }
    const at::Half* lows(int j, int64_t g) const { return wl + g * n + j * 16; }
    void prefetch_group(int64_t g) const { int4_params::prefetch(ws, wl, g, n); }
    // 16 lines ahead in each block (past a block's end: the block after it, which the next tile
    // reads). A block of a 896-column weight is 7 KB, too short for the prefetchers.
    void prefetch_step(int64_t g, int s, int blocks) const {
        for (int j = 0; j < blocks; ++j)
            int4_params::prefetch_bytes(w, j * block_bytes + (g * 4 + s) * 64 + kWeightAhead);
    }
};

// One pair of the pairs layout from w (its first group).
struct Pair {
    const uint8_t* w;

    const uint8_t* bytes(int j, int64_t g, int s) const { return w + g * kPairGroupBytes + j * kGroupBytes + s * 64; }
    const at::Half* scales(int j, int64_t g) const {
        return reinterpret_cast<const at::Half*>(w + g * kPairGroupBytes + 2 * kGroupBytes) + j * 16;
    }
    const at::Half* lows(int j, int64_t g) const { return scales(j, g) + 32; }
    void prefetch_group(int64_t g) const {
        for (int64_t line = 0; line < kPairGroupBytes; line += 64)
            int4_params::prefetch_bytes(w, g * kPairGroupBytes + kPairAhead + line);
    }
    void prefetch_step(int64_t, int, int) const {}
};

}  // namespace int4_registers

#if defined(LMSERVE_W4A8_VNNI)

namespace int4_registers {

constexpr int kRows = 4;    // activation rows a register tile covers
constexpr int kBlocks = 2;  // 16-output blocks a register tile covers: 8 int32 and 8 float accumulators

#define LM4_TILE(X) X(0, 0) X(0, 1) X(1, 0) X(1, 1) X(2, 0) X(2, 1) X(3, 0) X(3, 1)

// out[i, 16 j + l] for i < R, j < B, from rows a (stride k) with their group scales and sums (stride
// groups) and B blocks of the weight as `layout` finds them; with `add`, added to what out holds
// (out + (product + bias), as ATen's add_ of the product would give it). Named accumulators and an
// inline-asm vpdpbusd, as in int8_linear.cpp (an array of vectors gets spilled by GCC 12).
template <int R, int B, typename Layout>
inline void tile(const int8_t* a, int64_t k, const float* x_scales, const float* x_sums, int64_t groups,
                 const Layout& layout, const float* bias, float* out, int64_t ldo, bool add) {
    static_assert(R >= 1 && R <= kRows && B >= 1 && B <= kBlocks, "tile size");
#define LM4_ZERO(i, j) __m512 f##i##j = _mm512_setzero_ps();
    LM4_TILE(LM4_ZERO)
#undef LM4_ZERO
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int64_t g = 0; g < groups; ++g) {
        layout.prefetch_group(g);
#define LM4_CLEAR(i, j) __m512i c##i##j = _mm512_setzero_si512();
        LM4_TILE(LM4_CLEAR)
#undef LM4_CLEAR
        for (int s = 0; s < 4; ++s) {  // four steps of 8 columns: 32, one group
            const int64_t step = g * 4 + s;
            __m512i lo0, hi0, lo1, hi1;
            layout.prefetch_step(g, s, B);
            {
                const __m512i v = _mm512_loadu_si512(layout.bytes(0, g, s));
                lo0 = _mm512_and_si512(v, nibble);
                hi0 = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            }
            if constexpr (B > 1) {
                const __m512i v = _mm512_loadu_si512(layout.bytes(1, g, s));
                lo1 = _mm512_and_si512(v, nibble);
                hi1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            }
#define LM4_DOT(i, j) if constexpr (R > i && B > j) { \
                const int8_t* ai = a + i * k + step * 8; \
                const __m512i al = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(ai)); \
                const __m512i ah = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(ai + 4)); \
                asm("vpdpbusd %2, %1, %0" : "+v"(c##i##j) : "v"(lo##j), "v"(al)); \
                asm("vpdpbusd %2, %1, %0" : "+v"(c##i##j) : "v"(hi##j), "v"(ah)); }
            LM4_TILE(LM4_DOT)
#undef LM4_DOT
        }
        // f += (float) sum * (w_scale * x_scale) + w_low * x_sum
        const auto half16 = [](const at::Half* p) {
            return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        };
        const __m512 s0 = half16(layout.scales(0, g)), l0 = half16(layout.lows(0, g));
        __m512 s1 = s0, l1 = l0;
        if constexpr (B > 1) {
            s1 = half16(layout.scales(1, g));
            l1 = half16(layout.lows(1, g));
        }
#define LM4_SCALE(i, j) if constexpr (R > i && B > j) { \
            const __m512 scale##i##j = _mm512_mul_ps(s##j, _mm512_set1_ps(x_scales[i * groups + g])); \
            f##i##j = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c##i##j), scale##i##j, f##i##j); \
            f##i##j = _mm512_fmadd_ps(l##j, _mm512_set1_ps(x_sums[i * groups + g]), f##i##j); }
        LM4_TILE(LM4_SCALE)
#undef LM4_SCALE
    }
#define LM4_STORE(i, j) if constexpr (R > i && B > j) { \
        __m512 v = f##i##j; \
        if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j * 16)); \
        if (add) v = _mm512_add_ps(_mm512_loadu_ps(out + i * ldo + j * 16), v); \
        _mm512_storeu_ps(out + i * ldo + j * 16, v); }
    LM4_TILE(LM4_STORE)
#undef LM4_STORE
}
#undef LM4_TILE

}  // namespace int4_registers
#else
#include "int4_avx2.h"
#endif

namespace int4_registers {

// The last m < kRows rows (R or fewer) against B blocks, in one tile of their number.
template <int R, int B, typename Layout>
void tail(int64_t m, const int8_t* a, int64_t k, const float* x_scales, const float* x_sums, int64_t groups,
          const Layout& layout, const float* bias, float* out, int64_t ldo, bool add) {
    if constexpr (R >= 1) {
        if (m == R)
            tile<R, B>(a, k, x_scales, x_sums, groups, layout, bias, out, ldo, add);
        else
            tail<R - 1, B>(m, a, k, x_scales, x_sums, groups, layout, bias, out, ldo, add);
    }
}

// All m rows against B blocks, a register tile of rows at a time.
template <int B, typename Layout>
void rows(int64_t m, const int8_t* a, int64_t k, const float* x_scales, const float* x_sums, int64_t groups,
          const Layout& layout, const float* bias, float* out, int64_t ldo, bool add = false) {
    int64_t i = 0;
    for (; i + kRows <= m; i += kRows)
        tile<kRows, B>(a + i * k, k, x_scales + i * groups, x_sums + i * groups, groups, layout, bias, out + i * ldo,
                       ldo, add);
    if (i < m) tail<kRows - 1, B>(m - i, a + i * k, k, x_scales + i * groups, x_sums + i * groups, groups, layout, bias,
                                  out + i * ldo, ldo, add);
}

}  // namespace int4_registers

#endif
