// Prompt attention over the paged KV cache: a prefill chunk's query rows, the last rows of their
// context, each attending causally to the keys up to itself, for bf16 and int8 caches, where it
// replaces PyTorch's CPU flash attention. Two paths, one per kind of CPU:
// - dpbf16 (AVX512-BF16, kernels/prompt_attention_bf16.h): PyTorch widens bf16 to float32 on such
//   CPUs and took 27% of a 128-token prompt's time, 69% of a 2,000-token one (bench/RESULTS.md,
//   "2026-12-05"); on CPUs with AMX-BF16 tiles only for chunks of few rows (prompt_attention_chosen).
// - float32 (AVX2 with FMA, kernels/prompt_attention_f32.h): 1.4-1.6x PyTorch's speed on chunks of a
//   2,000-token prompt, 2.2-2.7x on prompts of 64-512 tokens, 5-9x on one row (bench/RESULTS.md,
//   "forty-third sitting").
//
// A whole prompt (prompt_attention) reads its own keys and values as computed, rounded to bf16; a
// chunk after a cached prefix (paged_prompt_attention) reads its context's rows from the cache by
// slot, int8 rows times their scale rounded to bf16 as dequantize_rows does. Either is packed once
// per call (pack_row, pack) and attended in tasks of query rows x query heads of one kv head, each
// walking the keys 64 positions at a time with a running maximum and sum (flash style), up to its
// last row's position. The query rows are rounded to bf16 as PyTorch's path rounds them (it
// computes in the cache's dtype, bf16 for int8 rows); scores, maximum, sum and outputs are float32,
// and the softmax weights too on the float32 path (the dpbf16 path rounds them to bf16).
//
// The dpbf16 path's tasks also serve decode rows over a prefix they share (shared_prefix_attention,
// called by kernels/paged_attention.cpp): every row follows the whole shared context, and its
// softmax sum is returned with its output, for the decode kernel to go on from.
#include "aten.h"
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <cpuid.h>

#include "amx_state.h"

#include "constant_dispatch.h"
#include "paged_attention_rows.h"  // widen
#include "prompt_attention_bf16.h"
#include "prompt_attention_f32.h"

namespace {

#if !defined(LMSERVE_PROMPT_BF16) && !defined(LMSERVE_PROMPT_F32)
using Element = uint16_t;
template <typename T>
inline void pack_row(const T*, uint16_t*, int64_t) {}  // never called: attend_rows packs nothing here
#endif

// Query heads per task: the largest divisor of the group up to 8 (the dpbf16 path's scores and
// outputs stay in registers up to 16 pairs).
int64_t heads_per_task(int64_t group) {
    for (int64_t heads = std::min<int64_t>(group, 8); heads > 1; --heads)
        if (group % heads == 0) return heads;
    return 1;
}


// Room for `words` packed words, kept by the calling thread (the engine's) from call to call, one
// buffer for every kind of call: a fresh buffer this size is mapped and faulted in page by page each
// time, 30 times a step. It keeps the largest context's size (3 kv heads of 64 at 8,192 positions:
// 6 MiB in bf16 pairs, 12 MiB in float32).
inline uint32_t* packing_buffer(size_t words) {
    thread_local std::vector<uint32_t> packed;
    if (packed.size() < words) packed.resize(words);
    return packed.data();
}

// Attention of q's rows (query_len, num_heads, dim) over the context that rows(h, t, k, v) gives,
// packed first; offset and lse as attend takes them.
template <typename Rows>
void attend_rows(const float* q, int64_t query_len, int64_t num_heads, int64_t dim, const Rows& rows,
                 int64_t context_len, int64_t offset, int64_t num_kv_heads, double scale, float* out, float* lse) {
#if defined(LMSERVE_PROMPT_BF16) || defined(LMSERVE_PROMPT_F32)
    // pack writes every element, padding included: 16-position steps of dim values, keys and values
    const size_t packed = num_kv_heads * ((context_len + 15) / 16) * 16 * dim * sizeof(Element) / sizeof(Packed);
    Packed* keys = reinterpret_cast<Packed*>(packing_buffer(2 * packed * sizeof(Packed) / sizeof(uint32_t)));
    Packed* values = keys + packed;
    pack(rows, context_len, num_kv_heads, dim, keys, values);
    const auto run = [&](auto heads) {
        attend_heads<decltype(heads)::value>(q, keys, values, out, lse, query_len, context_len, offset,
                                             num_heads, num_kv_heads, dim, static_cast<float>(scale));
    };
    with_constant<8>(heads_per_task(num_heads / num_kv_heads), run);
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
#if defined(LMSERVE_PROMPT_BF16) || defined(LMSERVE_PROMPT_F32)
    return dim % 32 == 0 && dim <= kMaxHeadDim && num_heads % num_kv_heads == 0;
#else
    (void)dim, (void)num_heads, (void)num_kv_heads;
    return false;
#endif
}

// body(rows), rows(h, t, k, v) writing position t's key and value rows of kv head h as pack_row
// gives them (bf16 bits, or float32 values), read from cache slot slot_of(t) of a bf16 or int8 cache.
template <typename SlotOf, typename Body>
auto with_cached_rows(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t dim, const SlotOf& slot_of,
                      const Body& body) {
    const int64_t num_slots = k_cache.size(1), stride = k_cache.size(2);
    const auto cached = [&](const auto* k, const auto* v) {
        const auto rows = [&](int64_t h, int64_t t, Element* k_row, Element* v_row) {
            const int64_t row = (h * num_slots + slot_of(t)) * stride;
            pack_row(k + row, k_row, dim);
            pack_row(v + row, v_row, dim);
        };
        return body(rows);
    };
    if (k_cache.scalar_type() == at::kBFloat16)
        return cached(k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>());
    return cached(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>());
}

constexpr const char* kRefusal = "prompt attention: a bf16 or int8 cache, head_dim a multiple of 32 up to 256, "
                                 "AVX512-BF16 or AVX2 with FMA (prompt_attention_supported)";

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
    const auto rows = [&](int64_t h, int64_t t, Element* k_row, Element* v_row) {
        pack_row(kp + (t * num_kv_heads + h) * dim, k_row, dim);
        pack_row(vp + (t * num_kv_heads + h) * dim, v_row, dim);
    };
    return attend_chunk(q, rows, k.size(0), num_kv_heads, scale);
}
