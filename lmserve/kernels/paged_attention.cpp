// Decode attention that reads the paged KV cache in place: one query token per sequence,
// each (sequence, kv head) pair handled by one task, its group of query heads sharing every
// key and value row it reads. No gather copy, no padding to the longest sequence.
//
// Caches are float32, bfloat16, or int8 rows: head_dim int8 values followed by the row's float32
// scale (4 bytes), one row per (kv head, slot) as for the float types (model/attention.py
// quantize_rows). An int8 row's scale multiplies its scores after the dot products and its
// softmax weight before the values are summed, so the rows are read as stored.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "paged_attention_rows.h"

namespace {

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const int8_t* p) {  // unscaled: the caller applies the row's scale
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// r[i] = sum of v[i]'s 16 lanes, for 16 vectors at once: 15 shuffle-adds instead of 16 reductions.
inline __m512 sum16x16(const __m512* v) {
    __m512 pairs[8], quads[4];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of v[4i .. 4i+3]
        const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
        quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(3, 1, 3, 1)));
}

constexpr int64_t kAhead = 48;  // positions between a key row's prefetch and its use

template <int DIM, typename T>
inline void prefetch_row(const T* row, int hint_l1) {  // the whole row: DIM values
    const char* p = reinterpret_cast<const char*>(row);
    for (int64_t b = 0; b < static_cast<int64_t>(sizeof(T)) * DIM; b += 64) {
        if (hint_l1) _mm_prefetch(p + b, _MM_HINT_T0);
        else _mm_prefetch(p + b, _MM_HINT_T1);
    }
}

// Scores of 16 positions for each of the GROUP query heads: scores[g * stride + i] = q_g . k_i * scale.
// The 16 accumulators stay in registers and meet in one transposing reduction.
template <int GROUP, int DIM, typename T>
inline void score16(const float* q, const T* const* keys, float* scores, int64_t stride, float scale) {
    for (int g = 0; g < GROUP; ++g) {
        __m512 acc[16];
        for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
        for (int c = 0; c < DIM / 16; ++c) {
            const __m512 qv = _mm512_loadu_ps(q + g * DIM + 16 * c);
            for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(qv, load16(keys[i] + 16 * c), acc[i]);
        }
        _mm512_storeu_ps(scores + g * stride, _mm512_mul_ps(sum16x16(acc), _mm512_set1_ps(scale)));
    }
}

#if defined(__AVX512BF16__)
// A bf16 cache: the query is rounded to bf16 once (as the PyTorch path's bf16 matmuls do above
// FLOAT32_DECODE_SEQS sequences; the entry point rounds it for every kernel and CPU) and each
// product pair is one dpbf16 instruction on the cached row as stored, with float32 accumulation.
template <int GROUP, int DIM>
inline void score16(const __m512bh* q, const c10::BFloat16* const* keys, float* scores, int64_t stride, float scale) {
    for (int g = 0; g < GROUP; ++g) {
        __m512 acc[16];
        for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
        for (int c = 0; c < DIM / 32; ++c)
            for (int i = 0; i < 16; ++i)
                acc[i] = _mm512_dpbf16_ps(acc[i], q[g * (DIM / 32) + c], (__m512bh)_mm512_loadu_si512(keys[i] + 32 * c));
        _mm512_storeu_ps(scores + g * stride, _mm512_mul_ps(sum16x16(acc), _mm512_set1_ps(scale)));
    }
}
#endif

// Softmax of s[0:n] in place without the final division (s[n:padded] must be -inf); returns 1 / sum.
inline float softmax_unnormalized(float* s, int64_t padded) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < padded; t += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(s + t));
    const __m512 topv = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < padded; t += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), topv));
        _mm512_storeu_ps(s + t, e);
        sum = _mm512_add_ps(sum, e);
    }
    return 1.f / _mm512_reduce_add_ps(sum);
}

// One query token per sequence, GROUP query heads per kv head, head_dim DIM (64 or 128). Per
// (sequence, kv head) task: scores 16 positions at a time from the rows in place (the next rows
// prefetched: the cache is far larger than the CPU's caches), a vectorised softmax, then the values
// one position at a time into GROUP x 4 register accumulators (64 dims per pass).
template <int GROUP, int DIM, typename T>
void decode_tiled(const float* q, const T* k_cache, const T* v_cache, const int64_t* table,
                  const int64_t* lens, float* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                  int64_t num_slots, int64_t max_blocks, int64_t block_size, float scale) {
    constexpr bool kDotBf16 =
#if defined(__AVX512BF16__)
        std::is_same_v<T, c10::BFloat16>;
#else
        false;
#endif
    at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
        constexpr int64_t kStride = row_stride<T>(DIM);
        constexpr bool kInt8 = std::is_same_v<T, int8_t>;
        std::vector<float> scores;
        std::vector<const T*> keys, values;
        const std::vector<T> zeros(kStride, T(0));
        for (int64_t task = begin; task < end; ++task) {
            const int64_t s = task / num_kv_heads, h = task % num_kv_heads;
            const int64_t len = lens[s], padded = (len + 15) / 16 * 16;
            const float* qs = q + (s * num_heads + h * GROUP) * DIM;
            const int64_t* blocks = table + s * max_blocks;
            const T* kh = k_cache + h * num_slots * kStride;
            const T* vh = v_cache + h * num_slots * kStride;
            // Past the end: a row of zeros, never a branch. Their scores are set to -inf below, which
            // exp16's clamp turns into ~1e-38 each in the sum: nothing in float32 terms.
            keys.assign(padded + kAhead, zeros.data());
            values.resize(padded);
            for (int64_t b = 0, t = 0; t < len; ++b)
                for (int64_t o = 0, row = blocks[b] * block_size; o < block_size && t < len; ++o, ++t) {
                    keys[t] = kh + (row + o) * kStride;
                    values[t] = vh + (row + o) * kStride;
                }
            scores.resize(GROUP * padded);
#if defined(__AVX512BF16__)
            __m512bh qb[GROUP * DIM / 32];
            if constexpr (kDotBf16)
                for (int i = 0; i < GROUP * DIM / 32; ++i)
                    qb[i] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qs + 32 * i + 16), _mm512_loadu_ps(qs + 32 * i));
#endif
            for (int64_t t0 = 0; t0 < padded; t0 += 16) {
                for (int64_t i = t0 + kAhead; i < std::min(t0 + kAhead + 16, len); ++i) prefetch_row<DIM>(keys[i], 1);
                for (int64_t i = t0; i < std::min(t0 + 16, len); ++i) prefetch_row<DIM>(values[i], 0);
#if defined(__AVX512BF16__)
                if constexpr (kDotBf16) {
                    score16<GROUP, DIM>(qb, keys.data() + t0, scores.data() + t0, padded, scale);
                    continue;
                }
#endif
                score16<GROUP, DIM>(qs, keys.data() + t0, scores.data() + t0, padded, scale);
            }
            if constexpr (kInt8)  // each key row's scale, on its scores
                for (int64_t t = 0; t < len; ++t) {
                    const float ks = row_scale(keys[t], DIM);
                    for (int g = 0; g < GROUP; ++g) scores[g * padded + t] *= ks;
                }
            float inv[GROUP];
            for (int g = 0; g < GROUP; ++g) {
                std::fill(scores.begin() + g * padded + len, scores.begin() + (g + 1) * padded, -INFINITY);
                inv[g] = softmax_unnormalized(scores.data() + g * padded, padded);
            }
            if constexpr (kInt8)  // each value row's scale, on its weights
                for (int64_t t = 0; t < len; ++t) {
                    const float vs = row_scale(values[t], DIM);
                    for (int g = 0; g < GROUP; ++g) scores[g * padded + t] *= vs;
                }
            float* os = out + (s * num_heads + h * GROUP) * DIM;
            for (int c0 = 0; c0 < DIM / 16; c0 += 4) {
                // Two interleaved accumulator sets when one head alone would leave only four FMA chains.
                constexpr int kSets = GROUP == 1 ? 2 : 1;
                __m512 acc[kSets][GROUP][4];
                for (int a = 0; a < kSets; ++a)
                    for (int g = 0; g < GROUP; ++g)
                        for (int c = 0; c < 4; ++c) acc[a][g][c] = _mm512_setzero_ps();
                for (int64_t t = 0; t < len; ++t) {
                    const int a = kSets == 1 ? 0 : static_cast<int>(t & 1);
                    __m512 v[4];
                    for (int c = 0; c < 4; ++c) v[c] = load16(values[t] + 16 * (c0 + c));
                    for (int g = 0; g < GROUP; ++g) {
                        const __m512 p = _mm512_set1_ps(scores[g * padded + t]);
                        for (int c = 0; c < 4; ++c) acc[a][g][c] = _mm512_fmadd_ps(p, v[c], acc[a][g][c]);
                    }
                }
                for (int g = 0; g < GROUP; ++g)
                    for (int c = 0; c < 4; ++c) {
                        __m512 total = acc[0][g][c];
                        if constexpr (kSets == 2) total = _mm512_add_ps(total, acc[kSets - 1][g][c]);
                        _mm512_storeu_ps(os + g * DIM + 16 * (c0 + c), _mm512_mul_ps(total, _mm512_set1_ps(inv[g])));
                    }
            }
        }
    });
}

// decode_tiled for this group size (1-8) and head_dim (64, 128) if compiled; false otherwise.
template <typename T>
bool decode_fast(int64_t group, const float* q, const T* k, const T* v, const int64_t* table, const int64_t* lens,
                 float* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t num_slots,
                 int64_t head_dim, int64_t max_blocks, int64_t block_size, float scale) {
    if (head_dim != 64 && head_dim != 128) return false;
    switch (group * 1000 + head_dim) {
#define LMSERVE_TILE(G, D) \
    case G * 1000 + D: decode_tiled<G, D>(q, k, v, table, lens, out, num_seqs, num_heads, num_kv_heads, num_slots, max_blocks, block_size, scale); return true;
#define LMSERVE_GROUP(G) LMSERVE_TILE(G, 64) LMSERVE_TILE(G, 128)
        LMSERVE_GROUP(1) LMSERVE_GROUP(2) LMSERVE_GROUP(3) LMSERVE_GROUP(4)
        LMSERVE_GROUP(5) LMSERVE_GROUP(6) LMSERVE_GROUP(7) LMSERVE_GROUP(8)
#undef LMSERVE_GROUP
#undef LMSERVE_TILE
        default: return false;
    }
}
#endif

template <typename T>
void decode(const float* q, const T* k_cache, const T* v_cache, const int64_t* table,
            const int64_t* lens, float* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
            int64_t num_slots, int64_t head_dim, int64_t max_blocks, int64_t block_size, float scale) {
    const int64_t group = num_heads / num_kv_heads, stride = row_stride<T>(head_dim);
    at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores, row(head_dim), acc;
        for (int64_t task = begin; task < end; ++task) {
            const int64_t s = task / num_kv_heads, h = task % num_kv_heads;
            const int64_t len = lens[s];
            const float* qs = q + (s * num_heads + h * group) * head_dim;  // the group's heads are consecutive
            const T* kh = k_cache + h * num_slots * stride;
            const T* vh = v_cache + h * num_slots * stride;
            scores.resize(group * len);
            for (int64_t b = 0, t = 0; t < len; ++b) {  // block by block: no division per position
                const T* block = kh + table[s * max_blocks + b] * block_size * stride;
                for (int64_t o = 0; o < block_size && t < len; ++o, ++t) {
                    widen(block + o * stride, row.data(), head_dim);
                    for (int64_t g = 0; g < group; ++g) scores[g * len + t] = dot(qs + g * head_dim, row.data(), head_dim) * scale;
                }
            }
            for (int64_t g = 0; g < group; ++g) softmax(scores.data() + g * len, len);
            acc.assign(group * head_dim, 0.f);
            for (int64_t b = 0, t = 0; t < len; ++b) {
                const T* block = vh + table[s * max_blocks + b] * block_size * stride;
                for (int64_t o = 0; o < block_size && t < len; ++o, ++t) {
                    widen(block + o * stride, row.data(), head_dim);
                    for (int64_t g = 0; g < group; ++g) axpy(scores[g * len + t], row.data(), acc.data() + g * head_dim, head_dim);
                }
            }
            std::memcpy(out + (s * num_heads + h * group) * head_dim, acc.data(), sizeof(float) * group * head_dim);
        }
    });
}

}  // namespace

torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& block_table,
                                     const torch::Tensor& context_lens, int64_t block_size, double scale) {
    TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous float32 (S, H, D)");
    TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous(), "caches: contiguous (Hkv, slots, D)");
    TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "caches of one dtype");
    TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.is_contiguous() && block_table.dim() == 2, "block table: int64 (S, B)");
    TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.numel() == q.size(0), "context lengths: int64 (S,)");
    const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
    const int64_t num_kv_heads = k_cache.size(0), num_slots = k_cache.size(1);
    const bool int8_rows = k_cache.scalar_type() == at::kChar;
    TORCH_CHECK(k_cache.size(2) == head_dim + (int8_rows ? 4 : 0) && num_heads % num_kv_heads == 0, "head shapes");
    {  // every context within its block-table row, and not empty (the kernels index by these)
        const auto* l = context_lens.data_ptr<int64_t>();
        const int64_t capacity = block_table.size(1) * block_size;
        for (int64_t s = 0; s < num_seqs; ++s)
            TORCH_CHECK(l[s] >= 1 && l[s] <= capacity, "context length ", l[s], " outside 1..", capacity);
    }
    auto out = torch::empty_like(q);
    // A bf16 cache is attended with the query rounded to bf16 too, on every CPU (the dpbf16 kernel
    // multiplies bf16 pairs exactly; elsewhere the rounded copy gives the same products in float32).
    const auto q_used = k_cache.scalar_type() == at::kBFloat16 ? q.to(at::kBFloat16).to(at::kFloat) : q;
    const auto* table = block_table.data_ptr<int64_t>();
    const auto run = [&](auto... args) {
#if defined(__AVX512F__)
        if (decode_fast(num_heads / num_kv_heads, args...)) return;
#endif
        decode(args...);
    };
    const auto* lens = context_lens.data_ptr<int64_t>();
    if (k_cache.scalar_type() == at::kBFloat16) {
        run(q_used.data_ptr<float>(), k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), table, lens,
               out.data_ptr<float>(), num_seqs, num_heads, num_kv_heads, num_slots, head_dim, block_table.size(1),
               block_size, static_cast<float>(scale));
    } else if (int8_rows) {
        run(q.data_ptr<float>(), k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), table, lens,
               out.data_ptr<float>(), num_seqs, num_heads, num_kv_heads, num_slots, head_dim, block_table.size(1),
               block_size, static_cast<float>(scale));
    } else {
        TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "caches: float32, bfloat16 or int8 rows");
        run(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), table, lens,
               out.data_ptr<float>(), num_seqs, num_heads, num_kv_heads, num_slots, head_dim, block_table.size(1),
               block_size, static_cast<float>(scale));
    }
    return out;
}
