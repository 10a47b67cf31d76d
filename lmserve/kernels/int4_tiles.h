// The W4A8 product of int4_linear.cpp on AMX tiles (Intel Sapphire Rapids and later), for steps of 16
// rows and more: prefill chunks and busy decode steps. One tile instruction multiplies 16 rows by one
// group of 32 columns for 16 outputs (8,192 products) where AVX512-VNNI takes 128; the group's int32
// sums then go through the same float32 arithmetic, in the same order, as int4_linear.cpp's register
// tiles, so both give the same results bit for bit.
//
// The tile operands: A, 16 rows of the int8 activations, one group (32 bytes) each; B, one group of
// a 16-output block of the weight in the tiles' layout, 8 rows of 16 outputs x 4 columns of K, which
// is the packed weight's step of 8 columns split into its low nibbles (4 columns) and its high ones
// (the next 4): the block is unpacked once and serves every 16 rows of the step.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__)
#define LMSERVE_W4A8_TILES 1

#include "aten.h"
#include <immintrin.h>

#include <cstdint>

#include "amx_state.h"
#include "int4_params.h"

namespace int4_tiles {

constexpr int64_t kRows = 16;  // rows of a tile: steps of fewer rows stay on the register tiles

// Whether this process may use the tiles (amx_state.h).
inline bool usable() { return amx_tile_state_granted(); }

// The compiler does not know that the tile loads read memory and the tile stores write it.
inline void memory_barrier() { asm volatile("" ::: "memory"); }

// Tiles 0 and 1: sums (16 rows of 16 int32); 2 and 3: activations (16 rows of 32 int8); 4 and 5:
// weights (8 rows of 64 bytes). Each pair alternates between even and odd groups.
struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t bytes_per_row[16] = {64, 64, 32, 32, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 8, 8};
};

// The thread's tiles for the product; release() after.
inline void configure() {
    static const TileConfig config;
    asm volatile("" : : "r"(&config) : "memory");  // ldtilecfg reads all 64 bytes; GCC 12's intrinsic says 8
    _tile_loadconfig(&config);
}

inline void release() { _tile_release(); }

// A 16-output block of the packed weight (k * 8 bytes) as B operands, group after group (512 bytes each).
inline void unpack_block(const uint8_t* w, int64_t groups, uint8_t* out) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int64_t step = 0; step < groups * 4; ++step) {
        const __m512i v = _mm512_loadu_si512(w + step * 64);
        _mm512_storeu_si512(out + step * 128, _mm512_and_si512(v, nibble));
        _mm512_storeu_si512(out + step * 128 + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
    }
    memory_barrier();
}

// Tile c = sum over the group's 32 columns of a's 16 rows times the block's 16 outputs, on the even
// tiles (0, 2, 4) or the odd ones (1, 3, 5): the tile numbers are part of the instruction. The sums
// are stored apart from the product so that a group's product runs while the group before is scaled.
#define LMT_GROUP_SUMS(name, c, at, bt) \
    inline void name##_product(const int8_t* a, int64_t k, const uint8_t* b) { \
        _tile_zero(c); \
        _tile_loadd(at, a, k); \
        _tile_loadd(bt, b, 64); \
        _tile_dpbsud(c, at, bt); \
    } \
    inline void name##_store(int32_t* sums) { \
        _tile_stored(c, sums, 64); \
        memory_barrier(); \
    }
LMT_GROUP_SUMS(even, 0, 2, 4)
LMT_GROUP_SUMS(odd, 1, 3, 5)
#undef LMT_GROUP_SUMS

// Eight tiles of 16 rows x 64 bytes, for int4_bf16_tiles.h and int8_tiles.h: sums for 2 x 2 tiles
// of 16 rows x 16 outputs (0-3: rows 0-15 and 16-31 of block j in 0 and 2, of block j + 1 in 1 and
// 3), two tiles of activation rows (4, 5) and two of weights (6, 7).
struct alignas(64) SquareConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

inline void configure_square() {
    static const SquareConfig config;
    asm volatile("" : : "r"(&config) : "memory");  // ldtilecfg reads all 64 bytes; GCC 12's intrinsic says 8
    _tile_loadconfig(&config);
}

// The square's sums set to zero: blocks j and j + 1 (kTwo) or j alone.
template <bool kTwo>
inline void zero_square_sums() {
    _tile_zero(0);
    _tile_zero(2);
    if constexpr (kTwo) {
        _tile_zero(1);
        _tile_zero(3);
    }
}

// The square's sums stored to sums[t] (256 values of 4 bytes each) for tile t.
template <bool kTwo, typename T>
inline void store_square_sums(T (&sums)[4][256]) {
    _tile_stored(0, sums[0], 64);
    _tile_stored(2, sums[2], 64);
    if constexpr (kTwo) {
        _tile_stored(1, sums[1], 64);
        _tile_stored(3, sums[3], 64);
    }
    memory_barrier();
}

#define LMT_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)

// out[r, l] for r < rows (at most 16; a has 16 readable rows) and one 16-output block: as
// int4_linear.cpp's w4a8_tile, f += (float) sum * (w_scale * x_scale) + w_low * x_sum, group by group.
inline void block_rows(const int8_t* a, int64_t k, const float* x_scales, const float* x_sums, int64_t groups,
                       const uint8_t* b, const at::Half* ws, const at::Half* wl, int64_t n, const float* bias,
                       float* out, int64_t ldo, int64_t rows) {
    alignas(64) int32_t sums[2][256];
#define LMT_ZERO(r) __m512 f##r = _mm512_setzero_ps();
    LMT_ROWS(LMT_ZERO)
#undef LMT_ZERO
#define LMT_SCALE(r) \
    f##r = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(s + r * 16)), \
                           _mm512_mul_ps(sw, _mm512_set1_ps(x_scales[r * groups + g])), f##r); \
    f##r = _mm512_fmadd_ps(lw, _mm512_set1_ps(x_sums[r * groups + g]), f##r);
#define LMT_GROUP(group, buffer) { \
        const int64_t g = (group); \
        const int32_t* s = (buffer); \
        int4_params::prefetch(ws, wl, g, n); \
        const __m512 sw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + g * n))); \
        const __m512 lw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wl + g * n))); \
        LMT_ROWS(LMT_SCALE) }
    // Each group's product is under way while the group before it is scaled: even groups on the even
    // tiles and buffer, odd ones on the odd.
    even_product(a, k, b);
    for (int64_t g0 = 0; g0 < groups; g0 += 2) {
        const bool odd = g0 + 1 < groups;
        even_store(sums[0]);
        if (odd) odd_product(a + (g0 + 1) * 32, k, b + (g0 + 1) * 512);
        LMT_GROUP(g0, sums[0])
        if (!odd) break;
        odd_store(sums[1]);
        if (g0 + 2 < groups) even_product(a + (g0 + 2) * 32, k, b + (g0 + 2) * 512);
        LMT_GROUP(g0 + 1, sums[1])
    }
#undef LMT_GROUP
#undef LMT_SCALE
    const __m512 bv = bias != nullptr ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
#define LMT_STORE(r) \
    if (r < rows) _mm512_storeu_ps(out + r * ldo, bias != nullptr ? _mm512_add_ps(f##r, bv) : f##r);
    LMT_ROWS(LMT_STORE)
#undef LMT_STORE
}
#undef LMT_ROWS

}  // namespace int4_tiles

#endif
