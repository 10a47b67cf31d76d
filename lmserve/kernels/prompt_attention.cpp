// Prompt attention over the paged KV cache: a prefill chunk's query rows, the last rows of their
// context, each attending causally to the cached keys up to itself. For bf16 and int8 caches on
// CPUs with AVX512-BF16, where it replaces PyTorch's CPU flash attention (which widens bf16 to
// float32 on such CPUs and took 27% of a 128-token prompt's time, 69% of a 2,000-token one:
// bench/RESULTS.md, "2026-12-05").
//
// The context's keys and values are read from the cache once per call (by slot, int8 rows times
// their scale rounded to bf16 as dequantize_rows does) into dpbf16 pairs: keys as 16 positions x
// 2 dims per vector, values as 2 positions x 16 dims. A task is ROWS query rows x HEADS query heads
// of one kv head; it walks the keys 16 positions at a time with a running maximum and sum (flash
// style), skipping the chunks past its last row, and multiplies the softmax weights, rounded to
// bf16, into the values. The query rows are rounded to bf16 as PyTorch's path rounds them (the
// cache's dtype); scores, maximum, sum and outputs are float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "paged_attention_rows.h"  // row_scale, exp16

namespace {

#if defined(__AVX512BF16__)
constexpr int64_t kMaxHeadDim = 256;

// Row t of the chunk as bf16 bits: a bf16 row as stored, an int8 row's values times its scale.
template <typename T>
inline void row_bits(const T* row, uint16_t* dst, int64_t dim) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
        std::memcpy(dst, row, sizeof(uint16_t) * dim);
    } else {
        const __m512 scale = _mm512_set1_ps(row_scale(row, dim));
        for (int64_t d = 0; d < dim; d += 16) {
            const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d))));
            const __m256bh b = _mm512_cvtneps_pbh(_mm512_mul_ps(x, scale));
            std::memcpy(dst + d, &b, 32);
        }
    }
}

// keys (num_kv_heads, chunks, dim / 2, 16) and values (num_kv_heads, chunks, 8, dim) in pairs of
// bf16: keys[.., d2, lane] = (k[16c + lane][2 d2], k[..][2 d2 + 1]);
// values[.., t2, d] = (v[16c + 2 t2][d], v[16c + 2 t2 + 1][d]). Positions past the context are zeros.
template <typename T>
void pack(const T* k_cache, const T* v_cache, const int64_t* slots, int64_t context_len, int64_t num_kv_heads,
          int64_t num_slots, int64_t dim, uint32_t* keys, uint32_t* values) {
    const int64_t chunks = (context_len + 15) / 16, stride = row_stride<T>(dim);
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
                const int64_t row = (h * num_slots + slots[t]) * stride;
                row_bits(k_cache + row, k_rows.data() + lane * dim, dim);
                row_bits(v_cache + row, v_rows.data() + lane * dim, dim);
            }
            uint32_t* kc = keys + x * (dim / 2) * 16;
            for (int64_t d2 = 0; d2 < dim / 2; ++d2)
                for (int lane = 0; lane < 16; ++lane) {
                    uint32_t word;
                    std::memcpy(&word, k_rows.data() + lane * dim + 2 * d2, 4);
                    kc[d2 * 16 + lane] = word;
                }
            uint32_t* vc = values + x * 8 * dim;
            for (int t2 = 0; t2 < 8; ++t2)
                for (int64_t d = 0; d < dim; ++d)
                    vc[t2 * dim + d] = v_rows[2 * t2 * dim + d] | (uint32_t(v_rows[(2 * t2 + 1) * dim + d]) << 16);
        }
    });
}

// q (query_len, num_heads, dim) float32 rows at positions context_len - query_len ...; out the same shape.
template <int HEADS, int ROWS>
void attend(const float* q, const uint32_t* keys, const uint32_t* values, float* out, int64_t query_len,
            int64_t context_len, int64_t num_heads, int64_t num_kv_heads, int64_t dim, float scale) {
    constexpr int N = HEADS * ROWS;  // (row, head) pairs per task, rows outer
    const int64_t group = num_heads / num_kv_heads, head_sets = group / HEADS, offset = context_len - query_len;
    const int64_t chunks = (context_len + 15) / 16, row_blocks = (query_len + ROWS - 1) / ROWS;
    const int64_t pairs = dim / 2;
    const int64_t lanes = num_kv_heads * head_sets;
    at::parallel_for(0, lanes * row_blocks, 1, [&](int64_t begin, int64_t end) {
        alignas(64) float acc[N * kMaxHeadDim];
        alignas(64) float weights[N * 16];
        alignas(64) uint32_t weight_pairs[N * 8];
        alignas(64) uint32_t qp[N * kMaxHeadDim / 2];
        float top[N], sum[N];
        for (int64_t x = begin; x < end; ++x) {
            // Row blocks from both ends in turn, so that a contiguous share of tasks (each thread's)
            // holds as many long rows as short ones.
            const int64_t lane = x % lanes, turn = x / lanes;
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
            for (int i = 0; i < N; ++i) top[i] = -INFINITY, sum[i] = 0.f;
            std::fill(acc, acc + N * dim, 0.f);
            const int64_t last = offset + r0 + rows - 1;  // the task's last row attends to keys 0..last
            const uint32_t* kh = keys + h * chunks * pairs * 16;
            const uint32_t* vh = values + h * chunks * 8 * dim;
            for (int64_t c = 0; c <= last / 16; ++c) {
                __m512 s[N];
                for (int i = 0; i < N; ++i) s[i] = _mm512_setzero_ps();
                for (int64_t d2 = 0; d2 < pairs; ++d2) {
                    const __m512bh k = (__m512bh)_mm512_loadu_si512(kh + (c * pairs + d2) * 16);
                    for (int i = 0; i < N; ++i)
                        s[i] = _mm512_dpbf16_ps(s[i], (__m512bh)_mm512_set1_epi32(qp[i * pairs + d2]), k);
                }
                for (int r = 0; r < ROWS; ++r) {
                    const int64_t n = r >= rows ? 0 : std::min<int64_t>(16, offset + r0 + r - 16 * c + 1);
                    const __mmask16 valid = n <= 0 ? 0 : static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
                    for (int g = 0; g < HEADS; ++g) {
                        const int i = r * HEADS + g;
                        if (!valid) {
                            _mm512_store_ps(weights + 16 * i, _mm512_setzero_ps());
                            continue;
                        }
                        const __m512 scores = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY),
                                                                   _mm512_mul_ps(s[i], _mm512_set1_ps(scale)));
                        const float chunk_top = _mm512_reduce_max_ps(scores);
                        if (chunk_top > top[i]) {  // rescale what was summed against the old maximum (0 at first)
                            const float alpha = std::exp(top[i] - chunk_top);
                            sum[i] *= alpha;
                            const __m512 av = _mm512_set1_ps(alpha);
                            for (int64_t d = 0; d < dim; d += 16)
                                _mm512_store_ps(acc + i * dim + d, _mm512_mul_ps(_mm512_load_ps(acc + i * dim + d), av));
                            top[i] = chunk_top;
                        }
                        const __m512 e = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(scores, _mm512_set1_ps(top[i]))));
                        sum[i] += _mm512_reduce_add_ps(e);
                        _mm512_store_ps(weights + 16 * i, e);
                    }
                }
                for (int i = 0; i < N; ++i) {
                    const __m256bh b = _mm512_cvtneps_pbh(_mm512_load_ps(weights + 16 * i));
                    std::memcpy(weight_pairs + 8 * i, &b, 32);
                }
                for (int64_t d = 0; d < dim; d += 16) {
                    __m512 a[N];
                    for (int i = 0; i < N; ++i) a[i] = _mm512_load_ps(acc + i * dim + d);
                    for (int t2 = 0; t2 < 8; ++t2) {
                        const __m512bh v = (__m512bh)_mm512_loadu_si512(vh + (c * 8 + t2) * dim + d);
                        for (int i = 0; i < N; ++i)
                            a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)_mm512_set1_epi32(weight_pairs[8 * i + t2]), v);
                    }
                    for (int i = 0; i < N; ++i) _mm512_store_ps(acc + i * dim + d, a[i]);
                }
            }
            for (int r = 0; r < rows; ++r)
                for (int g = 0; g < HEADS; ++g) {
                    const int i = r * HEADS + g;
                    const __m512 inv = _mm512_set1_ps(1.f / sum[i]);
                    float* o = out + ((r0 + r) * num_heads + head0 + g) * dim;
                    for (int64_t d = 0; d < dim; d += 16)
                        _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_load_ps(acc + i * dim + d), inv));
                }
        }
    });
}

// Query heads per task: the largest divisor of the group up to 8 (a task's scores and outputs
// stay in registers up to 16 pairs).
int64_t heads_per_task(int64_t group) {
    for (int64_t heads = std::min<int64_t>(group, 8); heads > 1; --heads)
        if (group % heads == 0) return heads;
    return 1;
}

template <int HEADS>
void attend_heads(const float* q, const uint32_t* keys, const uint32_t* values, float* out, int64_t query_len,
                  int64_t context_len, int64_t num_heads, int64_t num_kv_heads, int64_t dim, float scale) {
    // About 12 (row, head) pairs per task, as the prototype measured best for 3 heads (4 rows); up to
    // 16 accumulators and a key vector stay within the 32 registers.
    constexpr int kRows = HEADS >= 6 ? 2 : 12 / HEADS;
    attend<HEADS, kRows>(q, keys, values, out, query_len, context_len, num_heads, num_kv_heads, dim, scale);
}
#endif

}  // namespace

bool prompt_attention_supported(const torch::Tensor& k_cache, int64_t num_heads) {
#if defined(__AVX512BF16__)
    const auto dtype = k_cache.scalar_type();
    if (dtype != at::kBFloat16 && dtype != at::kChar) return false;
    const int64_t dim = k_cache.size(2) - (dtype == at::kChar ? kScaleBytes : 0);
    return dim % 32 == 0 && dim <= kMaxHeadDim && num_heads % k_cache.size(0) == 0;
#else
    (void)k_cache, (void)num_heads;
    return false;
#endif
}

torch::Tensor paged_prompt_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                     const torch::Tensor& slots, double scale) {
    RECORD_FUNCTION("lmserve::paged_prompt_attention", std::vector<c10::IValue>());  // torch.profiler sees it
    TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "q: float32 (query_len, H, D)");
    TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                    k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
                "caches: contiguous (Hkv, slots, D), one dtype");
    TORCH_CHECK(prompt_attention_supported(k_cache, q.size(1)), "prompt attention: a bf16 or int8 cache, head_dim a "
                "multiple of 32 up to 256, AVX512-BF16 (prompt_attention_supported)");
    const int64_t query_len = q.size(0), num_heads = q.size(1), dim = q.size(2), context_len = slots.numel();
    const int64_t num_kv_heads = k_cache.size(0), num_slots = k_cache.size(1);
    TORCH_CHECK(k_cache.size(2) == dim + (k_cache.scalar_type() == at::kChar ? kScaleBytes : 0), "head_dim");
    TORCH_CHECK(query_len >= 1 && context_len >= query_len, "the query rows are the last of their context");
    const auto slot_ids = slots.to(at::kLong).contiguous();
    const int64_t* s = slot_ids.data_ptr<int64_t>();
    for (int64_t t = 0; t < context_len; ++t)
        TORCH_CHECK(s[t] >= 0 && s[t] < num_slots, "cache slot ", s[t], " outside 0..", num_slots - 1);
    auto out = torch::empty({query_len, num_heads, dim}, q.options());
#if defined(__AVX512BF16__)
    const auto q_rows = q.contiguous();
    const int64_t chunks = (context_len + 15) / 16;
    std::vector<uint32_t> keys(num_kv_heads * chunks * 16 * dim / 2), values(num_kv_heads * chunks * 16 * dim / 2);
    if (k_cache.scalar_type() == at::kBFloat16)
        pack(k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), s, context_len, num_kv_heads,
             num_slots, dim, keys.data(), values.data());
    else
        pack(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), s, context_len, num_kv_heads, num_slots, dim,
             keys.data(), values.data());
    const auto run = [&](auto heads) {
        attend_heads<decltype(heads)::value>(q_rows.data_ptr<float>(), keys.data(), values.data(), out.data_ptr<float>(),
                                             query_len, context_len, num_heads, num_kv_heads, dim, static_cast<float>(scale));
    };
    switch (heads_per_task(num_heads / num_kv_heads)) {
        case 1: run(std::integral_constant<int, 1>{}); break;
        case 2: run(std::integral_constant<int, 2>{}); break;
        case 3: run(std::integral_constant<int, 3>{}); break;
        case 4: run(std::integral_constant<int, 4>{}); break;
        case 5: run(std::integral_constant<int, 5>{}); break;
        case 6: run(std::integral_constant<int, 6>{}); break;
        case 7: run(std::integral_constant<int, 7>{}); break;
        default: run(std::integral_constant<int, 8>{}); break;
    }
#endif
    return out;
}
