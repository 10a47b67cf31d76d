// Decode attention that reads the paged KV cache in place: one query token per sequence,
// each (sequence, kv head) pair handled by one task, its group of query heads sharing every
// key and value row it reads. No gather copy, no padding to the longest sequence.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
    uint32_t bits = static_cast<uint32_t>(x.x) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
}

// Widen one row of head_dim values to float32.
inline void widen(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, sizeof(float) * n); }
inline void widen(const c10::BFloat16* src, float* dst, int64_t n) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    int64_t d = 0;
#if defined(__AVX512F__)
    for (; d + 16 <= n; d += 16) {
        __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + d));
        _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
#endif
    for (; d < n; ++d) dst[d] = to_float(src[d]);
}

inline float dot(const float* a, const float* b, int64_t n) {
    int64_t d = 0;
    float total = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= n; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    total = _mm512_reduce_add_ps(acc);
#endif
    for (; d < n; ++d) total += a[d] * b[d];
    return total;
}

inline void axpy(float p, const float* x, float* y, int64_t n) {  // y += p * x
    int64_t d = 0;
#if defined(__AVX512F__)
    const __m512 pv = _mm512_set1_ps(p);
    for (; d + 16 <= n; d += 16) _mm512_storeu_ps(y + d, _mm512_fmadd_ps(pv, _mm512_loadu_ps(x + d), _mm512_loadu_ps(y + d)));
#endif
    for (; d < n; ++d) y[d] += p * x[d];
}

#if defined(__AVX512F__)
// exp for 16 lanes: 2^round(x log2 e) times a degree-6 polynomial on the remainder (|r| <= ln2/2,
// relative error ~2e-7), as libm would give within float32 rounding.
inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3f)), _mm512_set1_ps(-87.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

// In place: s[0:n] = softmax(s[0:n]), in float32.
inline void softmax(float* s, int64_t n) {
    float top = -INFINITY;
    for (int64_t t = 0; t < n; ++t) top = s[t] > top ? s[t] : top;
    float total = 0.f;
    int64_t t = 0;
#if defined(__AVX512F__)
    const __m512 topv = _mm512_set1_ps(top);
    __m512 sum = _mm512_setzero_ps();
    for (; t + 16 <= n; t += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), topv));
        _mm512_storeu_ps(s + t, e);
        sum = _mm512_add_ps(sum, e);
    }
    total = _mm512_reduce_add_ps(sum);
#endif
    for (; t < n; ++t) {
        s[t] = std::exp(s[t] - top);
        total += s[t];
    }
    const float inv = 1.f / total;
    for (t = 0; t < n; ++t) s[t] *= inv;
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
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

// head_dim a multiple of 16, GROUP query heads per kv head. Scores 16 positions at a time, the 16
// accumulators in registers, with one transposing reduction; values one 16-wide slice of head_dim
// at a time, even and odd positions in separate accumulators (independent FMA chains).
template <int GROUP, typename T>
void decode_avx512(const float* q, const T* k_cache, const T* v_cache, const int64_t* table,
                   const int64_t* lens, float* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                   int64_t num_slots, int64_t head_dim, int64_t max_blocks, int64_t block_size, float scale) {
    const int64_t chunks = head_dim / 16;
    at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores, keys(16 * head_dim);
        std::vector<int64_t> rows;
        for (int64_t task = begin; task < end; ++task) {
            const int64_t s = task / num_kv_heads, h = task % num_kv_heads;
            const int64_t len = lens[s];
            const float* qs = q + (s * num_heads + h * GROUP) * head_dim;
            const int64_t* blocks = table + s * max_blocks;
            rows.resize(len);  // offset of each position's row within one head's cache
            for (int64_t b = 0, t = 0; t < len; ++b)
                for (int64_t o = 0; o < block_size && t < len; ++o, ++t) rows[t] = (blocks[b] * block_size + o) * head_dim;
            const T* kh = k_cache + h * num_slots * head_dim;
            const T* vh = v_cache + h * num_slots * head_dim;
            scores.resize(GROUP * len);
            for (int64_t t0 = 0; t0 < len; t0 += 16) {
                const int64_t n = std::min<int64_t>(16, len - t0);
                for (int64_t i = 0; i < n; ++i)
                    for (int64_t c = 0; c < chunks; ++c)
                        _mm512_storeu_ps(keys.data() + i * head_dim + 16 * c, load16(kh + rows[t0 + i] + 16 * c));
                if (n < 16) std::fill(keys.begin() + n * head_dim, keys.end(), 0.f);
                for (int g = 0; g < GROUP; ++g) {
                    __m512 acc[16];
                    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
                    for (int64_t c = 0; c < chunks; ++c) {
                        const __m512 qv = _mm512_loadu_ps(qs + g * head_dim + 16 * c);
                        for (int i = 0; i < 16; ++i)
                            acc[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(keys.data() + i * head_dim + 16 * c), acc[i]);
                    }
                    const __m512 r = _mm512_mul_ps(sum16x16(acc), _mm512_set1_ps(scale));
                    _mm512_mask_storeu_ps(scores.data() + g * len + t0, static_cast<__mmask16>((1u << n) - 1), r);
                }
            }
            for (int g = 0; g < GROUP; ++g) softmax(scores.data() + g * len, len);
            float* os = out + (s * num_heads + h * GROUP) * head_dim;
            for (int64_t c = 0; c < chunks; ++c) {
                __m512 even[GROUP], odd[GROUP];
                for (int g = 0; g < GROUP; ++g) even[g] = odd[g] = _mm512_setzero_ps();
                int64_t t = 0;
                for (; t + 2 <= len; t += 2) {
                    const __m512 v0 = load16(vh + rows[t] + 16 * c), v1 = load16(vh + rows[t + 1] + 16 * c);
                    for (int g = 0; g < GROUP; ++g) {
                        even[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * len + t]), v0, even[g]);
                        odd[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * len + t + 1]), v1, odd[g]);
                    }
                }
                if (t < len) {
                    const __m512 v0 = load16(vh + rows[t] + 16 * c);
                    for (int g = 0; g < GROUP; ++g) even[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * len + t]), v0, even[g]);
                }
                for (int g = 0; g < GROUP; ++g) _mm512_storeu_ps(os + g * head_dim + 16 * c, _mm512_add_ps(even[g], odd[g]));
            }
        }
    });
}

// decode_avx512 for this group size if one is compiled for it (1-8); false otherwise.
template <typename T>
bool decode_fast(int64_t group, const float* q, const T* k, const T* v, const int64_t* table, const int64_t* lens,
                 float* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t num_slots,
                 int64_t head_dim, int64_t max_blocks, int64_t block_size, float scale) {
    if (head_dim % 16 != 0) return false;
    switch (group) {
#define LMSERVE_GROUP(G) \
    case G: decode_avx512<G>(q, k, v, table, lens, out, num_seqs, num_heads, num_kv_heads, num_slots, head_dim, max_blocks, block_size, scale); return true;
        LMSERVE_GROUP(1) LMSERVE_GROUP(2) LMSERVE_GROUP(3) LMSERVE_GROUP(4)
        LMSERVE_GROUP(5) LMSERVE_GROUP(6) LMSERVE_GROUP(7) LMSERVE_GROUP(8)
#undef LMSERVE_GROUP
        default: return false;
    }
}
#endif

template <typename T>
void decode(const float* q, const T* k_cache, const T* v_cache, const int64_t* table,
            const int64_t* lens, float* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
            int64_t num_slots, int64_t head_dim, int64_t max_blocks, int64_t block_size, float scale) {
    const int64_t group = num_heads / num_kv_heads;
    at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores, row(head_dim), acc;
        for (int64_t task = begin; task < end; ++task) {
            const int64_t s = task / num_kv_heads, h = task % num_kv_heads;
            const int64_t len = lens[s];
            const float* qs = q + (s * num_heads + h * group) * head_dim;  // the group's heads are consecutive
            const T* kh = k_cache + h * num_slots * head_dim;
            const T* vh = v_cache + h * num_slots * head_dim;
            scores.resize(group * len);
            for (int64_t b = 0, t = 0; t < len; ++b) {  // block by block: no division per position
                const T* block = kh + table[s * max_blocks + b] * block_size * head_dim;
                for (int64_t o = 0; o < block_size && t < len; ++o, ++t) {
                    widen(block + o * head_dim, row.data(), head_dim);
                    for (int64_t g = 0; g < group; ++g) scores[g * len + t] = dot(qs + g * head_dim, row.data(), head_dim) * scale;
                }
            }
            for (int64_t g = 0; g < group; ++g) softmax(scores.data() + g * len, len);
            acc.assign(group * head_dim, 0.f);
            for (int64_t b = 0, t = 0; t < len; ++b) {
                const T* block = vh + table[s * max_blocks + b] * block_size * head_dim;
                for (int64_t o = 0; o < block_size && t < len; ++o, ++t) {
                    widen(block + o * head_dim, row.data(), head_dim);
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
    TORCH_CHECK(k_cache.size(2) == head_dim && num_heads % num_kv_heads == 0, "head shapes");
    auto out = torch::empty_like(q);
    const auto* table = block_table.data_ptr<int64_t>();
    const auto run = [&](auto... args) {
#if defined(__AVX512F__)
        if (decode_fast(num_heads / num_kv_heads, args...)) return;
#endif
        decode(args...);
    };
    const auto* lens = context_lens.data_ptr<int64_t>();
    if (k_cache.scalar_type() == at::kBFloat16) {
        run(q.data_ptr<float>(), k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), table, lens,
               out.data_ptr<float>(), num_seqs, num_heads, num_kv_heads, num_slots, head_dim, block_table.size(1),
               block_size, static_cast<float>(scale));
    } else {
        TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "caches: float32 or bfloat16");
        run(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), table, lens,
               out.data_ptr<float>(), num_seqs, num_heads, num_kv_heads, num_slots, head_dim, block_table.size(1),
               block_size, static_cast<float>(scale));
    }
    return out;
}
