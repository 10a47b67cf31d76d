// The prompt attention kernel's dpbf16 path (AVX512-BF16; kernels/prompt_attention.cpp drives it).
// Rows are packed into dpbf16 pairs: keys as 16 positions x 2 dims per vector, values as 2
// positions x 16 dims. A task is ROWS query rows x HEADS query heads of one kv head; it walks the
// keys 64 positions at a time, skipping the 16-position chunks past its last row, and multiplies
// the softmax weights, rounded to bf16, into the values. Taking 64 keys per maximum instead of 16
// (one horizontal maximum and one rescale per 64, the sums kept as vectors) ran 1.3-1.5x faster on
// a 2-core AMD EPYC; 128 and 5 query rows for 3 heads were no faster.
#pragma once

#include "aten.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "paged_attention_rows.h"  // widen, exp16

namespace {

#if defined(__AVX512BF16__)
#define LMSERVE_PROMPT_BF16 1
constexpr int64_t kMaxHeadDim = 256;
using Element = uint16_t;  // what pack_row() writes of a row: bf16 bits
using Packed = uint32_t;   // what pack() writes and attend reads: pairs of them

// A row as bf16 bits: a bf16 row as stored; a float32 row, or an int8 row's values times its scale
// (widen), rounded to bf16.
template <typename T>
inline void pack_row(const T* row, uint16_t* dst, int64_t dim) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {  // dim is a multiple of 32: whole vectors, no call
        for (int64_t d = 0; d < dim; d += 32) _mm512_storeu_si512(dst + d, _mm512_loadu_si512(row + d));
    } else {
        alignas(64) float wide[kMaxHeadDim];
        widen(row, wide, dim);
        for (int64_t d = 0; d < dim; d += 16) {
            const __m256bh b = _mm512_cvtneps_pbh(_mm512_load_ps(wide + d));
            std::memcpy(dst + d, &b, 32);
        }
    }
}

// dst[j * 16 + i] = the 32-bit word j of row i, for 16 rows of 16 words each `stride` words apart:
// pairs, then quads within each 128-bit lane, then the lanes.
inline void transpose16(const uint16_t* rows, int64_t stride, uint32_t* dst) {
    const uint32_t* src = reinterpret_cast<const uint32_t*>(rows);
    __m512i r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * stride);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // r[i + c]: rows i..i+3, word 4k + c in 128-bit lane k
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int c = 0; c < 4; ++c) {
        const __m512i even_lo = _mm512_shuffle_i32x4(r[c], r[4 + c], _MM_SHUFFLE(2, 0, 2, 0));
        const __m512i odd_lo = _mm512_shuffle_i32x4(r[c], r[4 + c], _MM_SHUFFLE(3, 1, 3, 1));
        const __m512i even_hi = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], _MM_SHUFFLE(2, 0, 2, 0));
        const __m512i odd_hi = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], _MM_SHUFFLE(3, 1, 3, 1));
        t[c] = _mm512_shuffle_i32x4(even_lo, even_hi, _MM_SHUFFLE(2, 0, 2, 0));
        t[8 + c] = _mm512_shuffle_i32x4(even_lo, even_hi, _MM_SHUFFLE(3, 1, 3, 1));
        t[4 + c] = _mm512_shuffle_i32x4(odd_lo, odd_hi, _MM_SHUFFLE(2, 0, 2, 0));
        t[12 + c] = _mm512_shuffle_i32x4(odd_lo, odd_hi, _MM_SHUFFLE(3, 1, 3, 1));
    }
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * 16, t[i]);
}

// dst[d] = a[d] | b[d] << 16 for d < 32: two rows' bf16 values in pairs.
inline void interleave32(const uint16_t* a, const uint16_t* b, uint32_t* dst) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    const __m512i x = _mm512_loadu_si512(a), y = _mm512_loadu_si512(b);
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(x, lo, y));
    _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi16(x, hi, y));
}

// keys (num_kv_heads, chunks, dim / 2, 16) and values (num_kv_heads, chunks, 8, dim) in pairs of
// bf16: keys[.., d2, lane] = (k[16c + lane][2 d2], k[..][2 d2 + 1]);
// values[.., t2, d] = (v[16c + 2 t2][d], v[16c + 2 t2 + 1][d]). Positions past the context are
// zeros. rows(h, t, k_bits, v_bits) writes position t's key and value rows of kv head h.
template <typename Rows>
void pack(const Rows& rows, int64_t context_len, int64_t num_kv_heads, int64_t dim, uint32_t* keys, uint32_t* values) {
    const int64_t chunks = (context_len + 15) / 16;
    at::parallel_for(0, num_kv_heads * chunks, 4, [&](int64_t begin, int64_t end) {
        std::vector<uint16_t> k_rows(16 * dim), v_rows(16 * dim);
        for (int64_t x = begin; x < end; ++x) {
            const int64_t h = x / chunks, c = x % chunks;
            for (int lane = 0; lane < 16; ++lane) {
                const int64_t t = 16 * c + lane;
                if (t >= context_len) {
                    std::fill_n(k_rows.data() + lane * dim, dim, 0);
                    std::fill_n(v_rows.data() + lane * dim, dim, 0);
                    continue;
                }
                rows(h, t, k_rows.data() + lane * dim, v_rows.data() + lane * dim);
            }
            uint32_t* kc = keys + x * (dim / 2) * 16;
            for (int64_t d2 = 0; d2 < dim / 2; d2 += 16)  // 16 lanes x 16 pairs at a time
                transpose16(k_rows.data() + 2 * d2, dim / 2, kc + d2 * 16);
            uint32_t* vc = values + x * 8 * dim;
            for (int t2 = 0; t2 < 8; ++t2)
                for (int64_t d = 0; d < dim; d += 32)
                    interleave32(v_rows.data() + 2 * t2 * dim + d, v_rows.data() + (2 * t2 + 1) * dim + d, vc + t2 * dim + d);
        }
    });
}

// q (query_len, num_heads, dim) float32 rows, row r attending to the keys at positions 0 ..
// min(offset + r, context_len - 1) (offset context_len - query_len: a prompt chunk, causal; offset
// context_len - 1: rows that follow the whole context, as decode rows do); out the same shape, and
// where lse is given, each (row, head)'s log of its softmax sum, lse (query_len, num_heads).
// Keys are taken 64 at a time (four chunks of 16, fewer past the task's last row): the scores of all
// four, then one maximum per (row, head) over them, then their weights, then the values; the sums
// stay vectors until the end.
template <int HEADS, int ROWS>
void attend(const float* q, const uint32_t* keys, const uint32_t* values, float* out, float* lse, int64_t query_len,
            int64_t context_len, int64_t offset, int64_t num_heads, int64_t num_kv_heads, int64_t dim, float scale) {
    constexpr int N = HEADS * ROWS;  // (row, head) pairs per task, rows outer
    constexpr int kSub = 4;          // 16-key chunks per block
    const int64_t group = num_heads / num_kv_heads, head_sets = group / HEADS;
    const int64_t chunks = (context_len + 15) / 16, row_blocks = (query_len + ROWS - 1) / ROWS;
    const int64_t pairs = dim / 2;
    const int64_t lanes = num_kv_heads * head_sets;
    at::parallel_for(0, lanes * row_blocks, 1, [&](int64_t begin, int64_t end) {
        alignas(64) float acc[N * kMaxHeadDim];
        alignas(64) float scores[N * 16 * kSub];
        alignas(64) uint32_t weight_pairs[N * 8 * kSub];
        alignas(64) uint32_t qp[N * kMaxHeadDim / 2];
        float top[N];
        __m512 sums[N];
        for (int64_t x = begin; x < end; ++x) {
            // A lane's row blocks one after another (its packed keys and values stay in the core's
            // cache from one to the next), taken from both ends in turn, so that a contiguous share
            // of tasks (each thread's) holds as many long rows as short ones.
            const int64_t lane = x / row_blocks, turn = x % row_blocks;
            const int64_t block = turn % 2 == 0 ? turn / 2 : row_blocks - 1 - turn / 2;
            const int64_t h = lane / head_sets, head0 = h * group + (lane % head_sets) * HEADS;
            const int64_t r0 = block * ROWS, rows = std::min<int64_t>(ROWS, query_len - r0);
            for (int r = 0; r < ROWS; ++r)
                for (int g = 0; g < HEADS; ++g) {
                    const float* qr = q + (std::min<int64_t>(r0 + r, query_len - 1) * num_heads + head0 + g) * dim;
                    for (int64_t d = 0; d < dim; d += 32) {
                        const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qr + d + 16), _mm512_loadu_ps(qr + d));
                        std::memcpy(qp + (r * HEADS + g) * pairs + d / 2, &b, 64);
                    }
                }
            for (int i = 0; i < N; ++i) top[i] = -INFINITY, sums[i] = _mm512_setzero_ps();
            std::fill(acc, acc + N * dim, 0.f);
            const int64_t last = std::min(offset + r0 + rows - 1, context_len - 1);  // the task's rows attend to keys 0..last
            const uint32_t* kh = keys + h * chunks * pairs * 16;
            const uint32_t* vh = values + h * chunks * 8 * dim;
            for (int64_t c0 = 0; c0 <= last / 16; c0 += kSub) {
                const int sub = static_cast<int>(std::min<int64_t>(kSub, last / 16 + 1 - c0));
                for (int u = 0; u < sub; ++u) {
                    __m512 s[N];
                    for (int i = 0; i < N; ++i) s[i] = _mm512_setzero_ps();
                    for (int64_t d2 = 0; d2 < pairs; ++d2) {
                        const __m512bh k = (__m512bh)_mm512_loadu_si512(kh + ((c0 + u) * pairs + d2) * 16);
                        for (int i = 0; i < N; ++i)
                            s[i] = _mm512_dpbf16_ps(s[i], (__m512bh)_mm512_set1_epi32(qp[i * pairs + d2]), k);
                    }
                    for (int i = 0; i < N; ++i)
                        _mm512_store_ps(scores + (i * kSub + u) * 16, _mm512_mul_ps(s[i], _mm512_set1_ps(scale)));
                }
                for (int r = 0; r < ROWS; ++r) {
                    // keys of this block the row attends to: 0 past the task's rows
                    const int64_t n = r >= rows ? 0 : std::min<int64_t>(16 * sub, std::min(offset + r0 + r, last) - 16 * c0 + 1);
                    for (int g = 0; g < HEADS; ++g) {
                        const int i = r * HEADS + g;
                        if (n <= 0) {
                            std::fill_n(weight_pairs + i * 8 * kSub, 8 * sub, 0u);
                            continue;
                        }
                        __mmask16 valid[kSub];
                        __m512 block_top = _mm512_set1_ps(-INFINITY);
                        for (int u = 0; u < sub; ++u) {
                            const int64_t m = std::max<int64_t>(0, std::min<int64_t>(16, n - 16 * u));
                            valid[u] = static_cast<__mmask16>(m >= 16 ? 0xFFFF : (1u << m) - 1);
                            block_top = _mm512_mask_max_ps(block_top, valid[u], block_top, _mm512_load_ps(scores + (i * kSub + u) * 16));
                        }
                        const float t = _mm512_reduce_max_ps(block_top);
                        if (t > top[i]) {  // rescale what was summed against the old maximum (0 at first)
                            const __m512 alpha = _mm512_set1_ps(std::exp(top[i] - t));
                            sums[i] = _mm512_mul_ps(sums[i], alpha);
                            for (int64_t d = 0; d < dim; d += 16)
                                _mm512_store_ps(acc + i * dim + d, _mm512_mul_ps(_mm512_load_ps(acc + i * dim + d), alpha));
                            top[i] = t;
                        }
                        const __m512 tv = _mm512_set1_ps(top[i]);
                        for (int u = 0; u < sub; ++u) {
                            const __m512 e = _mm512_maskz_mov_ps(valid[u], exp16(_mm512_sub_ps(_mm512_load_ps(scores + (i * kSub + u) * 16), tv)));
                            sums[i] = _mm512_add_ps(sums[i], e);
                            const __m256bh b = _mm512_cvtneps_pbh(e);
                            std::memcpy(weight_pairs + (i * kSub + u) * 8, &b, 32);
                        }
                    }
                }
                const uint32_t* vb = vh + c0 * 8 * dim;
                for (int64_t d = 0; d < dim; d += 16) {
                    __m512 a[N];
                    for (int i = 0; i < N; ++i) a[i] = _mm512_load_ps(acc + i * dim + d);
                    for (int t2 = 0; t2 < 8 * sub; ++t2) {
                        const __m512bh v = (__m512bh)_mm512_loadu_si512(vb + t2 * dim + d);
                        for (int i = 0; i < N; ++i)
                            a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)_mm512_set1_epi32(weight_pairs[i * 8 * kSub + t2]), v);
                    }
                    for (int i = 0; i < N; ++i) _mm512_store_ps(acc + i * dim + d, a[i]);
                }
            }
            for (int r = 0; r < rows; ++r)
                for (int g = 0; g < HEADS; ++g) {
                    const int i = r * HEADS + g;
                    const float sum = _mm512_reduce_add_ps(sums[i]);
                    const __m512 inv = _mm512_set1_ps(1.f / sum);
                    if (lse) lse[(r0 + r) * num_heads + head0 + g] = top[i] + std::log(sum);
                    float* o = out + ((r0 + r) * num_heads + head0 + g) * dim;
                    for (int64_t d = 0; d < dim; d += 16)
                        _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_load_ps(acc + i * dim + d), inv));
                }
        }
    });
}


template <int HEADS>
void attend_heads(const float* q, const uint32_t* keys, const uint32_t* values, float* out, float* lse,
                  int64_t query_len, int64_t context_len, int64_t offset, int64_t num_heads, int64_t num_kv_heads,
                  int64_t dim, float scale) {
    // About 12 (row, head) pairs per task, as the prototype measured best for 3 heads (4 rows); up to
    // 16 accumulators and a key vector stay within the 32 registers.
    constexpr int kRows = HEADS >= 6 ? 2 : 12 / HEADS;
    attend<HEADS, kRows>(q, keys, values, out, lse, query_len, context_len, offset, num_heads, num_kv_heads, dim, scale);
}
#endif

}  // namespace
