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
    const auto* lens = context_lens.data_ptr<int64_t>();
    if (k_cache.scalar_type() == at::kBFloat16) {
        decode(q.data_ptr<float>(), k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), table, lens,
               out.data_ptr<float>(), num_seqs, num_heads, num_kv_heads, num_slots, head_dim, block_table.size(1),
               block_size, static_cast<float>(scale));
    } else {
        TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "caches: float32 or bfloat16");
        decode(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), table, lens,
               out.data_ptr<float>(), num_seqs, num_heads, num_kv_heads, num_slots, head_dim, block_table.size(1),
               block_size, static_cast<float>(scale));
    }
    return out;
}
