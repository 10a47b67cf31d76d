// Prompt attention over the paged KV cache: a prefill chunk's query rows, the last rows of their
// context, each attending causally to the keys up to itself. For bf16 and int8 caches on CPUs with
// AVX512-BF16, where it replaces PyTorch's CPU flash attention (which widens bf16 to float32 on
// such CPUs and took 27% of a 128-token prompt's time, 69% of a 2,000-token one: bench/RESULTS.md,
// "2026-12-05"); on CPUs with AMX-BF16 tiles only for chunks of few rows (prompt_attention_chosen).
//
// A whole prompt (prompt_attention) reads its own keys and values as computed, rounded to bf16; a
// chunk after a cached prefix (paged_prompt_attention) reads its context's rows from the cache by
// slot, int8 rows times their scale rounded to bf16 as dequantize_rows does. Either is packed once
// per call into dpbf16 pairs: keys as 16 positions x 2 dims per vector, values as 2 positions x 16
// dims. A task is ROWS query rows x HEADS query heads of one kv head; it walks the keys 64
// positions at a time with a running maximum and sum (flash style), skipping the 16-position
// chunks past its last row, and multiplies the softmax weights, rounded to bf16, into the values.
// The query rows are rounded to bf16 as PyTorch's path rounds them (it computes in the cache's
// dtype, bf16 for int8 rows); scores, maximum, sum and outputs are float32. Taking 64 keys per
// maximum instead of 16 (one horizontal maximum and one rescale per 64, the sums kept as vectors)
// ran 1.3-1.5x faster on a 2-core AMD EPYC; 128 and 5 query rows for 3 heads were no faster.
//
// The same tasks serve decode rows over a prefix they share (shared_prefix_attention, called by
// kernels/paged_attention.cpp): every row follows the whole shared context, and its softmax sum
// is returned with its output, for the decode kernel to go on from.
#include "aten.h"
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <cpuid.h>

#include "amx_state.h"
#include "paged_attention_rows.h"  // widen, exp16

namespace {

#if defined(__AVX512BF16__)
constexpr int64_t kMaxHeadDim = 256;

// A row as bf16 bits: a bf16 row as stored; a float32 row, or an int8 row's values times its scale
// (widen), rounded to bf16.
template <typename T>
inline void row_bits(const T* row, uint16_t* dst, int64_t dim) {
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

// Query heads per task: the largest divisor of the group up to 8 (a task's scores and outputs
// stay in registers up to 16 pairs).
int64_t heads_per_task(int64_t group) {
    for (int64_t heads = std::min<int64_t>(group, 8); heads > 1; --heads)
        if (group % heads == 0) return heads;
    return 1;
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
#else
template <typename T>
inline void row_bits(const T*, uint16_t*, int64_t) {}  // never called: attend_rows packs nothing here
#endif

}  // namespace

namespace {

// Room for `words` packed words, kept by the calling thread (the engine's) from call to call, one
// buffer for every kind of call: a fresh buffer this size is mapped and faulted in page by page each
// time, 30 times a step. It keeps the largest context's size (3 kv heads of 64 at 8,192 positions:
// 6 MiB).
inline uint32_t* packing_buffer(size_t words) {
    thread_local std::vector<uint32_t> packed;
    if (packed.size() < words) packed.resize(words);
    return packed.data();
}

// Attention of q's rows (query_len, num_heads, dim) over the context that rows(h, t, k_bits, v_bits)
// gives, packed first; offset and lse as attend takes them.
template <typename Rows>
void attend_rows(const float* q, int64_t query_len, int64_t num_heads, int64_t dim, const Rows& rows,
                 int64_t context_len, int64_t offset, int64_t num_kv_heads, double scale, float* out, float* lse) {
#if defined(__AVX512BF16__)
    const int64_t chunks = (context_len + 15) / 16;
    const size_t packed_words = num_kv_heads * chunks * 16 * dim / 2;  // pack writes every one, padding included
    uint32_t* keys = packing_buffer(2 * packed_words);
    uint32_t* values = keys + packed_words;
    pack(rows, context_len, num_kv_heads, dim, keys, values);
    const auto run = [&](auto heads) {
        attend_heads<decltype(heads)::value>(q, keys, values, out, lse, query_len, context_len, offset,
                                             num_heads, num_kv_heads, dim, static_cast<float>(scale));
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
#else
    (void)q, (void)query_len, (void)num_heads, (void)dim, (void)rows, (void)context_len, (void)offset,
        (void)num_kv_heads, (void)scale, (void)out, (void)lse;
#endif
}

// A chunk's rows, the last of their context: causal.
template <typename Rows>
at::Tensor attend_chunk(const at::Tensor& q, const Rows& rows, int64_t context_len, int64_t num_kv_heads,
                        double scale) {
    const int64_t query_len = q.size(0), num_heads = q.size(1), dim = q.size(2);
    TORCH_CHECK(query_len >= 1 && context_len >= query_len, "the query rows are the last of their context");
    auto out = at::empty({query_len, num_heads, dim}, q.options());
    const auto q_rows = q.contiguous();
    attend_rows(q_rows.data_ptr<float>(), query_len, num_heads, dim, rows, context_len, context_len - query_len,
                num_kv_heads, scale, out.data_ptr<float>(), nullptr);
    return out;
}

bool shape_supported(int64_t dim, int64_t num_heads, int64_t num_kv_heads) {
#if defined(__AVX512BF16__)
    return dim % 32 == 0 && dim <= kMaxHeadDim && num_heads % num_kv_heads == 0;
#else
    (void)dim, (void)num_heads, (void)num_kv_heads;
    return false;
#endif
}

// body(rows), rows(h, t, k_bits, v_bits) writing the bf16 bits of position t's key and value rows of
// kv head h, read from cache slot slot_of(t) of a bf16 or int8 cache.
template <typename SlotOf, typename Body>
auto with_cached_rows(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t dim, const SlotOf& slot_of,
                      const Body& body) {
    const int64_t num_slots = k_cache.size(1), stride = k_cache.size(2);
    const auto cached = [&](const auto* k, const auto* v) {
        const auto rows = [&](int64_t h, int64_t t, uint16_t* k_bits, uint16_t* v_bits) {
            const int64_t row = (h * num_slots + slot_of(t)) * stride;
            row_bits(k + row, k_bits, dim);
            row_bits(v + row, v_bits, dim);
        };
        return body(rows);
    };
    if (k_cache.scalar_type() == at::kBFloat16)
        return cached(k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>());
    return cached(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>());
}

constexpr const char* kRefusal = "prompt attention: a bf16 or int8 cache, head_dim a multiple of 32 up to 256, "
                                 "AVX512-BF16 (prompt_attention_supported)";

}  // namespace

// Whether the prompt attention kernels take a step over this cache: bf16 or int8 rows (a float32
// cache keeps PyTorch's exact path), head_dim a multiple of 32 up to 256, AVX512-BF16.
bool prompt_attention_supported(const at::Tensor& k_cache, int64_t num_heads) {
    const auto dtype = k_cache.scalar_type();
    if (dtype != at::kBFloat16 && dtype != at::kChar) return false;
    return shape_supported(k_cache.size(2) - (dtype == at::kChar ? kScaleBytes : 0), num_heads, k_cache.size(0));
}

// Whether this CPU has AMX-BF16 tiles and this process may use them, whatever this build's own
// instructions (PyTorch's oneDNN decides at run time, as this does). Asked once: under a hypervisor
// CPUID traps, and every prefill chunk asks (in every layer, in the Python layers).
bool amx_bf16_usable() {
    static const bool usable = [] {
        unsigned int a = 0, b = 0, c = 0, d = 0;
        const bool has_bf16_tiles = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 22));
        return has_bf16_tiles && amx_tile_state_granted();
    }();
    return usable;
}

// Whether a prefill chunk of query_rows rows over this cache takes the prompt attention kernels
// (else PyTorch's attention, in bfloat16 for a bf16 or int8 cache): wherever they run
// (prompt_attention_supported), except on CPUs with AMX-BF16 tiles, where PyTorch's flash attention
// runs its products on the tiles and is faster from a few dozen rows on: a whole prompt (its own
// keys and values) of kAmxWholeRows rows or more, a chunk after cached context (the context's rows
// read from the cache, an int8 one widened first) of kAmxBf16ChunkRows or kAmxInt8ChunkRows or more
// (bench/RESULTS.md, "twenty-third sitting": the kernel about as fast to 4.6x faster below them,
// PyTorch up to 2.3x faster above, 3.2x on a whole 2,000-token prompt).
bool prompt_attention_chosen(const at::Tensor& k_cache, int64_t num_heads, int64_t query_rows,
                             bool after_context) {
    if (!prompt_attention_supported(k_cache, num_heads)) return false;
    if (!amx_bf16_usable()) return true;
    constexpr int64_t kAmxWholeRows = 128, kAmxBf16ChunkRows = 24, kAmxInt8ChunkRows = 32;
    const int64_t from = !after_context ? kAmxWholeRows
                         : k_cache.scalar_type() == at::kChar ? kAmxInt8ChunkRows : kAmxBf16ChunkRows;
    return query_rows < from;
}

// A chunk after a cached prefix: q (query_len, H, D) float32, the last query_len positions of the
// context whose cache slots are `slots` (context_len,). Returns (query_len, H, D) float32.
at::Tensor paged_prompt_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& slots, double scale) {
    RECORD_FUNCTION("lmserve::paged_prompt_attention", std::vector<c10::IValue>());  // torch.profiler sees it
    TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "q: float32 (query_len, H, D)");
    TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                    k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
                "caches: contiguous (Hkv, slots, D), one dtype");
    TORCH_CHECK(prompt_attention_supported(k_cache, q.size(1)), kRefusal);
    const int64_t dim = q.size(2), context_len = slots.numel(), num_slots = k_cache.size(1);
    TORCH_CHECK(k_cache.size(2) == dim + (k_cache.scalar_type() == at::kChar ? kScaleBytes : 0), "head_dim");
    const auto slot_ids = slots.to(at::kLong).contiguous();
    const int64_t* s = slot_ids.data_ptr<int64_t>();
    for (int64_t t = 0; t < context_len; ++t)
        TORCH_CHECK(s[t] >= 0 && s[t] < num_slots, "cache slot ", s[t], " outside 0..", num_slots - 1);
    return with_cached_rows(k_cache, v_cache, dim, [&](int64_t t) { return s[t]; }, [&](const auto& rows) {
        return attend_chunk(q, rows, context_len, k_cache.size(0), scale);
    });
}

// Decode rows of sequences whose first context_len positions are the same cache blocks (`blocks`,
// whole blocks of block_size): q (G, H, D) float32, the G sequences' query rows. Writes
// out (G, H, D), their attention over those positions alone, and lse (G, H), the log of each (row,
// head)'s softmax sum, from which paged_decode_attention goes on over each sequence's own
// positions: the shared rows are read once for all G rather than once per sequence. Its softmax
// weights are rounded to bf16 as a prompt's are (and as flash attention rounds them for its second
// product): 0.7-1.2e-3 from the decode kernel's float32 weights on the tests' cases. Splitting
// each into two bf16 halves came within 3e-6 of it but cost the pass 15-44%, most of what it saves
// in an engine step (bench/RESULTS.md, "2026-12-05 (seventeenth sitting)"). The caller checks
// prompt_attention_supported.
void shared_prefix_attention(const float* q, int64_t num_rows, int64_t num_heads, int64_t dim,
                             const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* blocks,
                             int64_t context_len, int64_t block_size, double scale, float* out, float* lse) {
    RECORD_FUNCTION("lmserve::shared_prefix_attention", std::vector<c10::IValue>());
    const auto slot_of = [&](int64_t t) { return blocks[t / block_size] * block_size + t % block_size; };
    with_cached_rows(k_cache, v_cache, dim, slot_of, [&](const auto& rows) {
        attend_rows(q, num_rows, num_heads, dim, rows, context_len, context_len - 1, k_cache.size(0), scale, out, lse);
        return 0;
    });
}

// A whole prompt, its own rows: q (L, H, D), k and v (L, Hkv, D) float32, attended causally with
// keys and values rounded to bf16 (what a bf16 cache holds; an int8 cache's prompt attends to its
// rows as computed, as PyTorch's path does, and later chunks to their int8 rows).
at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
    RECORD_FUNCTION("lmserve::prompt_attention", std::vector<c10::IValue>());
    TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                    v.scalar_type() == at::kFloat && k.dim() == 3 && k.sizes() == v.sizes() &&
                    k.size(0) == q.size(0) && k.size(2) == q.size(2),
                "q (L, H, D), k and v (L, Hkv, D): float32");
    TORCH_CHECK(shape_supported(q.size(2), q.size(1), k.size(1)), kRefusal);
    const auto keys = k.contiguous(), values = v.contiguous();
    const int64_t num_kv_heads = k.size(1), dim = k.size(2);
    const float* kp = keys.data_ptr<float>();
    const float* vp = values.data_ptr<float>();
    const auto rows = [&](int64_t h, int64_t t, uint16_t* k_bits, uint16_t* v_bits) {
        row_bits(kp + (t * num_kv_heads + h) * dim, k_bits, dim);
        row_bits(vp + (t * num_kv_heads + h) * dim, v_bits, dim);
    };
    return attend_chunk(q, rows, k.size(0), num_kv_heads, scale);
}
