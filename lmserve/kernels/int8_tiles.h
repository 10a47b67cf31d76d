// int8_linear.cpp's product with packed weights on AMX-INT8 tiles, for steps of 16 rows and more. The
// packed weight, (N/16, K/4, 16, 4) bytes of w + 128, is already the tiles' B layout: 16 rows of a
// 16-output block's 64 bytes are 64 columns of K. With one scale per row and per output, the int32
// sums run over the whole of K in the tiles and are scaled once, with int8_linear.cpp's arithmetic
// in its order: the results are the register kernel's bit for bit.
#pragma once

#include "int4_tiles.h"

#if defined(LMSERVE_W4A8_TILES)
#define LMSERVE_W8A8_TILES 1

#include <algorithm>

namespace int8_tiles {

constexpr int64_t kMinRows = 16;
constexpr int64_t kChunkRows = 32;  // rows of a pass: two tiles; the activations come padded to a multiple

// Whether a weight of K columns fits the tiles: whole 64-column steps.
inline bool fits(int64_t k) { return k % 64 == 0; }

// Rows r0 .. r0 + rows - 1 (rows <= 32; a holds 32 readable rows, stride k) against blocks j and
// j + 1 (kTwo) or j alone, w0 / w1 their packed bytes. out = ((float) (sum - offset) * x_scale) *
// w_scale (+ bias), as vnni_tile in int8_linear.cpp.
template <bool kTwo>
inline void tile_rows(const int8_t* a, int64_t k, const uint8_t* w0, const uint8_t* w1, const int32_t* offsets,
                      const float* x_scales, const float* w_scales, const float* bias, float* out, int64_t ldo,
                      int64_t rows) {
    int4_tiles::zero_square_sums<kTwo>();
    for (int64_t c = 0; c < k; c += 64) {
        _tile_loadd(4, a + c, k);
        _tile_loadd(5, a + 16 * k + c, k);
        _tile_loadd(6, w0 + c * 16, 64);
        _tile_dpbsud(0, 4, 6);
        _tile_dpbsud(2, 5, 6);
        if constexpr (kTwo) {
            _tile_loadd(7, w1 + c * 16, 64);
            _tile_dpbsud(1, 4, 7);
            _tile_dpbsud(3, 5, 7);
        }
    }
    alignas(64) int32_t sums[4][256];
    int4_tiles::store_square_sums<kTwo>(sums);
    const int64_t blocks = kTwo ? 2 : 1;
    for (int64_t r = 0; r < rows; ++r) {
        const __m512i offset = _mm512_set1_epi32(offsets[r]);
        const __m512 x_scale = _mm512_set1_ps(x_scales[r]);
        for (int64_t j = 0; j < blocks; ++j) {
            const __m512i s = _mm512_load_si512(sums[(r / 16) * 2 + j] + (r % 16) * 16);
            __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(s, offset));
            v = _mm512_mul_ps(_mm512_mul_ps(v, x_scale), _mm512_loadu_ps(w_scales + j * 16));
            if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j * 16));
            _mm512_storeu_ps(out + r * ldo + j * 16, v);
        }
    }
}

// (m, k) int8 rows a (zero rows after them up to a multiple of kChunkRows) with their offsets (128
// times each row's sum) and scales times the packed weight (blocks of k * 16 bytes) -> out (m, n).
// Each thread takes an even share of the pairs of blocks and runs every 32 rows against each pair.
inline void product(const int8_t* a, int64_t m, int64_t k, const uint8_t* w, int64_t blocks, const int32_t* offsets,
                    const float* x_scales, const float* w_scales, const float* bias, float* out) {
    const int64_t n = blocks * 16, block_bytes = k * 16;
    at::parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
        int4_tiles::configure_square();
        for (int64_t pair = begin; pair < end; ++pair) {
            const int64_t j = 2 * pair;
            const uint8_t* w0 = w + j * block_bytes;
            const float* bj = bias != nullptr ? bias + j * 16 : nullptr;
            for (int64_t m0 = 0; m0 < m; m0 += kChunkRows) {
                const int64_t count = std::min(kChunkRows, m - m0);
                if (j + 1 < blocks)
                    tile_rows<true>(a + m0 * k, k, w0, w0 + block_bytes, offsets + m0, x_scales + m0,
                                    w_scales + j * 16, bj, out + m0 * n + j * 16, n, count);
                else
                    tile_rows<false>(a + m0 * k, k, w0, nullptr, offsets + m0, x_scales + m0,
                                     w_scales + j * 16, bj, out + m0 * n + j * 16, n, count);
            }
        }
        int4_tiles::release();
    });
}

}  // namespace int8_tiles

#endif
