// int4_linear.cpp's product for steps of many rows (prefill chunks, busy decode steps) on AMX-BF16
// tiles: each 16-output block of the 4-bit weight is widened once per step to bfloat16 (w = q * scale
// + low, rounded to nearest even), the activations are rounded to bfloat16, and the tiles multiply and
// accumulate in float32 over the whole of K. With no group's int32 sums to scale back, a tile
// instruction is all a group costs; the int8 tiles (int4_tiles.h) spend most of their time scaling.
// The activations keep bfloat16's 8 bits of mantissa where int8 groups keep 7 bits of the group's
// largest value; model/weight_formats/int4.py's int4_linear_bf16_reference spells the arithmetic out.
//
// B operands: a group of 32 columns of one block is 16 rows of 64 bytes, row p holding for each of the
// 16 outputs the weights of columns 2p and 2p + 1. A operands: 16 rows of 32 bfloat16 activations.
#pragma once

#include "int4_params.h"
#include "int4_tiles.h"

#include <algorithm>
#include <memory>

#if defined(LMSERVE_W4A8_TILES) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define LMSERVE_W4_BF16_TILES 1

namespace int4_bf16_tiles {

constexpr int64_t kMinRows = 64;  // fewer rows: widening the weight costs more than the tiles gain

// A 16-output block of the packed weight (k * 8 bytes, layout in int4_linear.cpp) widened to B operands,
// group after group (1,024 bytes each); ws and wl: the block's scales and lows (stride n).
inline void widen_block(const uint8_t* w, int64_t groups, const at::Half* ws, const at::Half* wl, int64_t n,
                        uint16_t* out) {
    // Byte l * 4 + b of a packed step holds output l's columns b (low nibble) and 4 + b (high). A row
    // of B holds a pair of columns for each output: pair c of the low nibbles (c = 0, 1) takes bytes
    // l * 4 + 2c and l * 4 + 2c + 1, and so does pair c of the high ones. Each int32 lane of
    // picks[c][half] receives one such byte, for outputs 0-7 (half 0) or 8-15 (half 1).
    struct Picks {
        alignas(64) uint8_t index[2][2][64] = {};
        Picks() {
            for (int c = 0; c < 2; ++c)
                for (int half = 0; half < 2; ++half)
                    for (int e = 0; e < 16; ++e)
                        index[c][half][4 * e] = static_cast<uint8_t>((half * 8 + e / 2) * 4 + 2 * c + e % 2);
        }
    };
    static const Picks table;  // built once
    const __m512i picks[2][2] = {{_mm512_load_si512(table.index[0][0]), _mm512_load_si512(table.index[0][1])},
                                 {_mm512_load_si512(table.index[1][0]), _mm512_load_si512(table.index[1][1])}};
    const __m512i nibble = _mm512_set1_epi32(0x0F);
    const __m512i first8 = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i last8 = _mm512_add_epi32(first8, _mm512_set1_epi32(8));
    for (int64_t g = 0; g < groups; ++g) {
        int4_params::prefetch(ws, wl, g, n);
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + g * n)));
        const __m512 l = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wl + g * n)));
        const __m512 scale[2] = {_mm512_permutexvar_ps(first8, s), _mm512_permutexvar_ps(last8, s)};
        const __m512 low[2] = {_mm512_permutexvar_ps(first8, l), _mm512_permutexvar_ps(last8, l)};
        for (int step = 0; step < 4; ++step) {
            const __m512i v = _mm512_loadu_si512(w + (g * 4 + step) * 64);
            uint16_t* rows = out + (g * 16 + step * 4) * 32;  // 4 rows of 32 bfloat16: pairs 0, 1 low, 0, 1 high
            for (int c = 0; c < 2; ++c) {
                __m512 widened[2][2];  // [low or high nibbles][outputs 0-7 or 8-15]
                for (int half = 0; half < 2; ++half) {
                    const __m512i bytes = _mm512_permutexvar_epi8(picks[c][half], v);
                    const __m512i lo = _mm512_and_si512(bytes, nibble);
                    const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(bytes, 4), nibble);
                    widened[0][half] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), scale[half], low[half]);
                    widened[1][half] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), scale[half], low[half]);
                }
                for (int nib = 0; nib < 2; ++nib)
                    _mm512_storeu_si512(rows + (2 * nib + c) * 32, (__m512i)_mm512_cvtne2ps_pbh(widened[nib][1], widened[nib][0]));
            }
        }
    }
    int4_tiles::memory_barrier();
}

// x (m, k) float32 -> bfloat16 rows (nearest even), then zero rows up to `padded`.
inline void round_rows(const float* x, int64_t m, int64_t k, int64_t padded, uint16_t* out) {
    at::parallel_for(0, padded, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            uint16_t* o = out + r * k;
            if (r >= m) {
                std::fill(o, o + k, uint16_t{0});
                continue;
            }
            for (int64_t c = 0; c < k; c += 32)  // k: whole groups of 32
                _mm512_storeu_si512(o + c, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + r * k + c + 16),
                                                                        _mm512_loadu_ps(x + r * k + c)));
        }
    });
}

// out rows r0.. (rows of them, at most 32) for blocks j and j + 1 (two = true) or j alone: a (32 rows
// of k bfloat16, stride k), b0 / b1 (the blocks' widened weights), bias (the blocks' part) or null.
template <bool kTwo>
inline void tile_rows(const uint16_t* a, int64_t k, const uint16_t* b0, const uint16_t* b1, const float* bias,
                      float* out, int64_t ldo, int64_t rows) {
    int4_tiles::zero_square_sums<kTwo>();
    const int64_t a_stride = k * 2;
    for (int64_t c = 0; c < k; c += 32) {  // a group of 32 columns: 16 rows of B each
        _tile_loadd(4, a + c, a_stride);
        _tile_loadd(5, a + 16 * k + c, a_stride);
        _tile_loadd(6, b0 + c * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if constexpr (kTwo) {
            _tile_loadd(7, b1 + c * 16, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    alignas(64) float sums[4][256];
    int4_tiles::store_square_sums<kTwo>(sums);
    const int64_t blocks = kTwo ? 2 : 1;
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < blocks; ++j) {
            __m512 v = _mm512_load_ps(sums[(r / 16) * 2 + j] + (r % 16) * 16);
            if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j * 16));
            _mm512_storeu_ps(out + r * ldo + j * 16, v);
        }
    }
}

// On AMX-BF16 tiles: each thread takes an even share of the pairs of 16-output blocks, widens each pair
// once and runs every 32 rows against it.
inline at::Tensor product(const at::Tensor& x, const at::Tensor& packed, const at::Half* ws,
                            const at::Half* wl, const float* bias) {
    const int64_t m = x.size(0), k = x.size(1), blocks = packed.size(0), n = blocks * 16, groups = k / 32;
    const int64_t padded = (m + 31) / 32 * 32;
    const auto xc = x.contiguous();
    auto xb = at::empty({padded, k}, x.options().dtype(at::kBFloat16));
    auto* a = reinterpret_cast<uint16_t*>(xb.data_ptr());
    round_rows(xc.data_ptr<float>(), m, k, padded, a);
    auto out = at::empty({m, n}, x.options());
    float* op = out.data_ptr<float>();
    const uint8_t* w = packed.data_ptr<uint8_t>();
    const int64_t block_bytes = k * 8;
    at::parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
        const std::unique_ptr<uint16_t[]> wide(new uint16_t[2 * k * 16]);  // every byte written before it is read
        uint16_t* b0 = wide.get();
        uint16_t* b1 = b0 + k * 16;
        int4_tiles::configure_square();
        for (int64_t pair = begin; pair < end; ++pair) {
            const int64_t j = 2 * pair;
            const bool two = j + 1 < blocks;
            widen_block(w + j * block_bytes, groups, ws + j * 16, wl + j * 16, n, b0);
            if (two) widen_block(w + (j + 1) * block_bytes, groups, ws + j * 16 + 16, wl + j * 16 + 16, n, b1);
            const float* bj = bias != nullptr ? bias + j * 16 : nullptr;
            for (int64_t m0 = 0; m0 < m; m0 += 32) {
                const int64_t rows = std::min<int64_t>(32, m - m0);
                if (two)
                    tile_rows<true>(a + m0 * k, k, b0, b1, bj, op + m0 * n + j * 16, n, rows);
                else
                    tile_rows<false>(a + m0 * k, k, b0, b1, bj, op + m0 * n + j * 16, n, rows);
            }
        }
        int4_tiles::release();
    });
    return out;
}

}  // namespace int4_bf16_tiles

#endif
