// The prompt attention kernel's float32 path (AVX2 with FMA, where the CPU has no bf16 dot
// products; kernels/prompt_attention.cpp drives it). The same rows as the dpbf16 path's, rounded
// to bf16 and held as float32; products and softmax weights in float32, so it comes within float32
// rounding of a float32 pass over those rows (~3e-6 on tests/unit/test_prompt_attention.py's cases).
// Keys are packed 8 positions per vector (transposed), values as rows. A task is about kTaskPairs
// (row, head) pairs of one kv head; for each block of kBlockKeys keys it takes the scores of
// kGroup pairs at a time (16 keys x 6 pairs in 12 registers, a query value broadcast once for two
// key vectors, as a GEMM's inner kernel), then each pair's maximum, rescale and weights, then the
// values, kGroup pairs at a time. PyTorch's flash attention ran the causal part of a 2,000-token
// prompt's chunks at 40-41 GFLOP/s on a 2-core AMD EPYC of the first Zen generation, 17-24 on
// prompts of 128-512 tokens; this path 55-57 and 40-52 (bench/RESULTS.md, "forty-third sitting").
// 96 pairs a task instead of 48 were no faster.
#pragma once

#include "aten.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "constant_dispatch.h"
#include "paged_attention_rows.h"  // widen, exp8, sum8

namespace {

#if !defined(__AVX512BF16__) && defined(__AVX2__) && defined(__FMA__)
#define LMSERVE_PROMPT_F32 1
constexpr int64_t kMaxHeadDim = 256;
using Element = float;  // what pack_row() writes of a row
using Packed = float;   // what pack() writes and attend reads

// x rounded to bf16 (to nearest, ties to even, as PyTorch's conversion rounds), held as float32.
inline __m256 round_bf16(__m256 x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
    return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// A row as the dpbf16 path's pack_row gives it, widened: a bf16 row as stored; a float32 row, or an
// int8 row's values times its scale, rounded to bf16.
template <typename T>
inline void pack_row(const T* row, float* dst, int64_t dim) {
    widen(row, dst, dim);
    if constexpr (!std::is_same_v<T, c10::BFloat16>)
        for (int64_t d = 0; d < dim; d += 8) _mm256_storeu_ps(dst + d, round_bf16(_mm256_loadu_ps(dst + d)));
}

// dst[j * 8 + i] = rows[i * stride + j] for an 8 x 8 block: pairs, then quads, then 128-bit lanes.
inline void transpose8(const float* rows, int64_t stride, float* dst) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows + i * stride);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {  // r[i + c]: rows i..i+3 of columns c and c + 4
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int c = 0; c < 4; ++c) {
        _mm256_storeu_ps(dst + c * 8, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
        _mm256_storeu_ps(dst + (c + 4) * 8, _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
    }
}

// keys (num_kv_heads, chunks, dim, 8) and values (num_kv_heads, chunks * 8, dim) in float32,
// chunks of 8 positions, an even number of them (16-position steps): keys[.., c, d, lane] =
// k[8c + lane][d]. Positions past the context are zeros. rows(h, t, k, v) writes position t's key
// and value rows of kv head h.
template <typename Rows>
void pack(const Rows& rows, int64_t context_len, int64_t num_kv_heads, int64_t dim, float* keys, float* values) {
    const int64_t chunks = 2 * ((context_len + 15) / 16);
    at::parallel_for(0, num_kv_heads * chunks, 8, [&](int64_t begin, int64_t end) {
        alignas(32) float k_rows[8 * kMaxHeadDim];
        for (int64_t x = begin; x < end; ++x) {
            const int64_t h = x / chunks, c = x % chunks;
            float* vc = values + x * 8 * dim;
            for (int lane = 0; lane < 8; ++lane) {
                const int64_t t = 8 * c + lane;
                if (t >= context_len) {
                    std::fill_n(k_rows + lane * dim, dim, 0.f);
                    std::fill_n(vc + lane * dim, dim, 0.f);
                    continue;
                }
                rows(h, t, k_rows + lane * dim, vc + lane * dim);
            }
            float* kc = keys + x * dim * 8;
            for (int64_t d = 0; d < dim; d += 8) transpose8(k_rows + d, dim, kc + d * 8);
        }
    });
}

constexpr int kGroup = 6;        // (row, head) pairs multiplied together: 2 vectors each, 12 of the 16 registers
constexpr int kBlockKeys = 64;   // keys per running maximum
constexpr int kTaskPairs = 48;   // (row, head) pairs per task, about: each block's keys read once for all of them

// scores[i * kBlockKeys + t] = scale * (q_i . k_t), for the P pairs whose query rows are qs (P, dim)
// and the 16 * halves keys of a block (packed as pack() leaves them), 16 keys at a time.
template <int P>
void group_scores(const float* qs, const float* keys, int64_t dim, int halves, float scale, float* scores) {
    for (int c = 0; c < halves; ++c) {
        const float* k0 = keys + 2 * c * dim * 8;
        const float* k1 = k0 + dim * 8;
        __m256 s[P][2];
        for (int i = 0; i < P; ++i) s[i][0] = s[i][1] = _mm256_setzero_ps();
        for (int64_t d = 0; d < dim; ++d) {
            const __m256 a = _mm256_loadu_ps(k0 + d * 8), b = _mm256_loadu_ps(k1 + d * 8);
            for (int i = 0; i < P; ++i) {
                const __m256 x = _mm256_broadcast_ss(qs + i * dim + d);
                s[i][0] = _mm256_fmadd_ps(x, a, s[i][0]);
                s[i][1] = _mm256_fmadd_ps(x, b, s[i][1]);
            }
        }
        const __m256 sv = _mm256_set1_ps(scale);
        for (int i = 0; i < P; ++i) {
            _mm256_store_ps(scores + i * kBlockKeys + 16 * c, _mm256_mul_ps(s[i][0], sv));
            _mm256_store_ps(scores + i * kBlockKeys + 16 * c + 8, _mm256_mul_ps(s[i][1], sv));
        }
    }
}

// acc[i * dim + d] += sum over the block's `keys` keys t of weights[i * kBlockKeys + t] * v_t[d],
// for P pairs, 16 dims at a time.
template <int P>
void group_values(const float* weights, const float* values, int64_t dim, int keys, float* acc) {
    for (int64_t d = 0; d < dim; d += 16) {
        __m256 a[P][2];
        for (int i = 0; i < P; ++i) {
            a[i][0] = _mm256_load_ps(acc + i * dim + d);
            a[i][1] = _mm256_load_ps(acc + i * dim + d + 8);
        }
        for (int t = 0; t < keys; ++t) {
            const __m256 x = _mm256_loadu_ps(values + t * dim + d), y = _mm256_loadu_ps(values + t * dim + d + 8);
            for (int i = 0; i < P; ++i) {
                const __m256 w = _mm256_broadcast_ss(weights + i * kBlockKeys + t);
                a[i][0] = _mm256_fmadd_ps(w, x, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(w, y, a[i][1]);
            }
        }
        for (int i = 0; i < P; ++i) {
            _mm256_store_ps(acc + i * dim + d, a[i][0]);
            _mm256_store_ps(acc + i * dim + d + 8, a[i][1]);
        }
    }
}

// As the dpbf16 attend: q (query_len, num_heads, dim), row r attending to keys 0 ..
// min(offset + r, context_len - 1); out the same shape, lse where given. A task is ROWS rows x
// HEADS heads of one kv head (kTaskPairs pairs, about); it walks the keys kBlockKeys at a time:
// every pair's scores, kGroup pairs at a time, then each pair's maximum, rescale and weights, then
// the values, kGroup pairs at a time.
template <int HEADS>
void attend_heads(const float* q, const float* keys, const float* values, float* out, float* lse, int64_t query_len,
                  int64_t context_len, int64_t offset, int64_t num_heads, int64_t num_kv_heads, int64_t dim,
                  float scale) {
    constexpr int ROWS = std::max(1, kTaskPairs / HEADS), N = ROWS * HEADS;
    const int64_t group = num_heads / num_kv_heads, head_sets = group / HEADS;
    const int64_t chunks = 2 * ((context_len + 15) / 16), row_blocks = (query_len + ROWS - 1) / ROWS;
    const int64_t lanes = num_kv_heads * head_sets;
    at::parallel_for(0, lanes * row_blocks, 1, [&](int64_t begin, int64_t end) {
        alignas(32) float acc[N * kMaxHeadDim];
        alignas(32) float qs[N * kMaxHeadDim];      // the query rows, rounded to bf16
        alignas(32) float scores[N * kBlockKeys];   // then the block's weights
        float top[N], sums[N];
        const __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const auto first = [&](int64_t m) {  // a mask of the first m lanes (none for m <= 0, all from 8)
            return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(m)), lane_index));
        };
        for (int64_t x = begin; x < end; ++x) {
            // a lane's row blocks one after another, taken from both ends in turn (as the dpbf16 attend)
            const int64_t lane = x / row_blocks, turn = x % row_blocks;
            const int64_t block = turn % 2 == 0 ? turn / 2 : row_blocks - 1 - turn / 2;
            const int64_t h = lane / head_sets, head0 = h * group + (lane % head_sets) * HEADS;
            const int64_t r0 = block * ROWS, rows = std::min<int64_t>(ROWS, query_len - r0);
            const int pairs = static_cast<int>(rows) * HEADS;
            for (int r = 0; r < rows; ++r)
                for (int g = 0; g < HEADS; ++g) {
                    const float* qr = q + ((r0 + r) * num_heads + head0 + g) * dim;
                    float* qd = qs + (r * HEADS + g) * dim;
                    for (int64_t d = 0; d < dim; d += 8) _mm256_store_ps(qd + d, round_bf16(_mm256_loadu_ps(qr + d)));
                }
            std::fill_n(top, N, -INFINITY);
            std::fill_n(sums, N, 0.f);
            std::fill_n(acc, pairs * dim, 0.f);
            // the task's rows attend to keys 0..last
            const int64_t last = std::min(offset + r0 + rows - 1, context_len - 1);
            const float* kh = keys + h * chunks * 8 * dim;
            const float* vh = values + h * chunks * 8 * dim;
            for (int64_t c0 = 0; c0 <= last; c0 += kBlockKeys) {
                const int halves = static_cast<int>((std::min<int64_t>(kBlockKeys, last + 1 - c0) + 15) / 16);
                for (int i0 = 0; i0 < pairs; i0 += kGroup)
                    with_constant<kGroup>(std::min(kGroup, pairs - i0), [&](auto p) {
                        group_scores<decltype(p)::value>(qs + i0 * dim, kh + c0 * dim, dim, halves, scale,
                                                         scores + i0 * kBlockKeys);
                    });
                for (int i = 0; i < pairs; ++i) {
                    float* s = scores + i * kBlockKeys;
                    // keys of this block the pair's row attends to (none: weights 0)
                    const int64_t n = std::min<int64_t>(16 * halves, std::min(offset + r0 + i / HEADS, last) - c0 + 1);
                    if (n <= 0) {
                        std::fill_n(s, 16 * halves, 0.f);
                        continue;
                    }
                    __m256 most = _mm256_set1_ps(-INFINITY);
                    for (int u = 0; u < 2 * halves; ++u) {
                        most = _mm256_max_ps(most, _mm256_blendv_ps(most, _mm256_load_ps(s + 8 * u), first(n - 8 * u)));
                    }
                    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(most), _mm256_extractf128_ps(most, 1));
                    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                    const float t = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
                    if (t > top[i]) {  // rescale what was summed against the old maximum (0 at first)
                        const float alpha = std::exp(top[i] - t);
                        sums[i] *= alpha;
                        const __m256 av = _mm256_set1_ps(alpha);
                        for (int64_t d = 0; d < dim; d += 8)
                            _mm256_store_ps(acc + i * dim + d, _mm256_mul_ps(_mm256_load_ps(acc + i * dim + d), av));
                        top[i] = t;
                    }
                    const __m256 tv = _mm256_set1_ps(top[i]);
                    __m256 total = _mm256_setzero_ps();
                    for (int u = 0; u < 2 * halves; ++u) {
                        const __m256 scores_u = _mm256_load_ps(s + 8 * u);
                        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(scores_u, tv)), first(n - 8 * u));
                        _mm256_store_ps(s + 8 * u, e);
                        total = _mm256_add_ps(total, e);
                    }
                    sums[i] += sum8(total);
                }
                for (int i0 = 0; i0 < pairs; i0 += kGroup)
                    with_constant<kGroup>(std::min(kGroup, pairs - i0), [&](auto p) {
                        group_values<decltype(p)::value>(scores + i0 * kBlockKeys, vh + c0 * dim, dim, 16 * halves,
                                                         acc + i0 * dim);
                    });
            }
            for (int r = 0; r < rows; ++r)
                for (int g = 0; g < HEADS; ++g) {
                    const int i = r * HEADS + g;
                    const __m256 inv = _mm256_set1_ps(1.f / sums[i]);
                    if (lse) lse[(r0 + r) * num_heads + head0 + g] = top[i] + std::log(sums[i]);
                    float* o = out + ((r0 + r) * num_heads + head0 + g) * dim;
                    for (int64_t d = 0; d < dim; d += 8)
                        _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_load_ps(acc + i * dim + d), inv));
                }
        }
    });
}

#endif

}  // namespace
