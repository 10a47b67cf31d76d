// Decode attention that reads the paged KV cache in place: one query token per sequence,
// each (sequence, kv head) pair handled by one task, its group of query heads sharing every
// key and value row it reads. No gather copy, no padding to the longest sequence. Sequences that
// share a long cached prefix attend to it first in one pass for all of them (shared_prefixes,
// paged_decode_attention).
//
// Caches are float32, bfloat16, or int8 rows: head_dim int8 values followed by the row's float32
// scale (4 bytes), one row per (kv head, slot) as for the float types (model/attention.py
// quantize_rows). An int8 row's scale multiplies its scores after the dot products and its
// softmax weight before the values are summed, so the rows are read as stored.
#include "aten.h"

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

bool prompt_attention_supported(const at::Tensor& k_cache, int64_t num_heads);  // kernels/prompt_attention.cpp
void shared_prefix_attention(const float* q, int64_t num_rows, int64_t num_heads, int64_t dim,
                             const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* blocks,
                             int64_t context_len, int64_t block_size, double scale, float* out, float* lse);

namespace {

// What paged_decode_attention attended already: for each sequence whose first positions it shares
// with others (shared_prefixes), where its own positions start, and its query rows' output and
// log-sum over the shared ones. Empty (starts null) for a step with nothing shared.
struct Attended {
    const int64_t* starts = nullptr;    // (S,) whole blocks; 0 for a sequence alone
    const int64_t* own_lens = nullptr;  // (S,) the positions left to each sequence's own tasks
    const float* out = nullptr;         // (S, H, D), rows of sequences with a start
    const float* lse = nullptr;         // (S, H)
    int64_t first(int64_t s) const { return starts ? starts[s] : 0; }
};

// The shapes decode_tiled is compiled for: head_dim 64 or 128, 1-8 query heads per kv head.
inline bool fast_shape(int64_t group, int64_t head_dim) {
    return (head_dim == 64 || head_dim == 128) && group >= 1 && group <= 8;
}

// When a shared pass pays (kernel alone, SmolLM2's heads, bench/RESULTS.md "2026-12-05
// (seventeenth sitting)"): without it the shared rows are read again by each sequence, but from the
// core's caches, and their products largely hide behind the waits for each sequence's own rows from
// memory; the pass packs the shared rows once and multiplies them at the prompt kernel's rate. It
// lost at 2 and 4 sequences (up to 2,000 shared positions: packing, and too few rows to fill both
// cores), at 128 shared positions, and at 8 sequences over 512 with many positions of their own;
// where this rule takes it, it won 1.06-2.2x (16 sequences over 1,024 up to 64 over 2,000).
constexpr int64_t kMinSharing = 8;             // sequences
constexpr int64_t kMinSharedPositions = 512;
constexpr int64_t kMinSharedReads = 16 * 1024;  // sequences x shared positions

// Sequences whose block tables begin with the same blocks (a prefix cache hit, n completions of one
// prompt, a system prompt): those holding the same first kMinSharedPositions' blocks form a group
// (sequences that part before then could not share enough, so they do not cut a group's prefix
// short), sharing the blocks they all hold in the same places, up to each one's last whole block
// before its current position (so each keeps at least one position of its own). Groups where the
// pass pays (above): own positions at most half the shared ones on average.
struct SharedPrefix {
    std::vector<int64_t> members;
    int64_t positions;
};
std::vector<SharedPrefix> shared_prefixes(const int64_t* table, const int64_t* lens, int64_t num_seqs,
                                          int64_t max_blocks, int64_t block_size) {
    const int64_t key_blocks = (kMinSharedPositions + block_size - 1) / block_size;
    const auto whole_blocks = [&](int64_t s) { return (lens[s] - 1) / block_size; };
    const auto key = [&](int64_t s) { return table + s * max_blocks; };
    std::vector<int64_t> order;
    for (int64_t s = 0; s < num_seqs; ++s)
        if (whole_blocks(s) >= key_blocks) order.push_back(s);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return std::lexicographical_compare(key(a), key(a) + key_blocks, key(b), key(b) + key_blocks);
    });
    std::vector<SharedPrefix> groups;
    for (size_t i = 0, j; i < order.size(); i = j) {
        const int64_t* lead = key(order[i]);
        for (j = i + 1; j < order.size() && std::equal(lead, lead + key_blocks, key(order[j])); ++j) {}
        const int64_t members = static_cast<int64_t>(j - i);
        if (members < kMinSharing) continue;
        int64_t blocks = whole_blocks(order[i]), own = 0;
        for (size_t m = i + 1; m < j; ++m) {
            const int64_t* row = key(order[m]);
            const int64_t limit = std::min(blocks, whole_blocks(order[m]));
            for (blocks = key_blocks; blocks < limit && row[blocks] == lead[blocks]; ++blocks) {}
        }
        const int64_t positions = blocks * block_size;
        for (size_t m = i; m < j; ++m) own += lens[order[m]] - positions;
        if (positions >= kMinSharedPositions && members * positions >= kMinSharedReads && 2 * own <= positions * members)
            groups.push_back({std::vector<int64_t>(order.begin() + i, order.begin() + j), positions});
    }
    return groups;
}

// Runs body(begin, end) over the (sequence, kv head) tasks, task = sequence * num_kv_heads + head,
// one contiguous range per thread, split where the threads' shares of context positions are equal
// rather than their shares of tasks: a running batch's sequences differ in length (the oldest are
// longest), and with an even split by count the thread holding the long ones finishes last while
// the other waits.
template <typename Body>
void for_each_task_range(const int64_t* lens, int64_t num_seqs, int64_t num_kv_heads, const Body& body) {
    constexpr int64_t kTaskCost = 16;  // a task's fixed cost, in positions
    const int64_t num_tasks = num_seqs * num_kv_heads;
    const int64_t parts = std::min<int64_t>(at::get_num_threads(), num_tasks);
    if (parts <= 1 || at::in_parallel_region()) {
        body(0, num_tasks);
        return;
    }
    int64_t total = 0;
    for (int64_t s = 0; s < num_seqs; ++s) total += (lens[s] + kTaskCost) * num_kv_heads;
    std::vector<int64_t> bounds(parts + 1, num_tasks);
    bounds[0] = 0;
    int64_t done = 0, part = 1;
    for (int64_t task = 0; task < num_tasks && part < parts; ++task) {
        while (part < parts && done * parts >= total * part) bounds[part++] = task;
        done += lens[task / num_kv_heads] + kTaskCost;
    }
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
            if (bounds[i] < bounds[i + 1]) body(bounds[i], bounds[i + 1]);
    });
}

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

// Positions between a row's prefetch into L1 and its use (measured on a 2-core AMD EPYC, 64 sequences
// of 200-1,000 positions, 30 layers' caches: 16 and 32 slower, 96 and 128 no faster), and between a
// chunk's prefetch into L2 and its use. A server's running sequences hold blocks scattered over the
// cache (each takes the next free block as it grows, and the free list is in the order blocks were
// freed), so each block of a head is a piece on its own (16 positions of SmolLM2's bf16 rows: 2 KB),
// where the hardware's prefetchers stop: at each chunk's start the chunk eight chunks ahead is
// fetched into L2, unless its rows follow on from the row before (blocks in order, which the
// hardware follows). Measured with 64-dim bf16 rows and 16-position blocks. Kernel alone, 30
// layers' bf16 caches, blocks shuffled: 64 sequences of 1,024 positions 1.07-1.22x the speed
// without it, 64 of 256 1.10x; blocks in order 0.97-1.04x (one sequence of 2,048: 0.96-0.97x).
// Engine alone after mixed traffic scattered the blocks (before the skip rule checked every row of
// a chunk): 64 x 1,024 and 32 x ~1,530 positions 1.08-1.10x and 1.17x the decode tok/s, 64 x
// 128-384 within the noise (bench/RESULTS.md, "Decode attention over scattered blocks"). int8 rows
// do not take it (their arithmetic bounds them: 0.83-0.96x with it).
constexpr int64_t kAhead = 64;
constexpr int64_t kFarAhead = 128;

template <int DIM, typename T>
inline void prefetch_row(const T* row) {  // the whole row: DIM values (and an int8 row's scale)
    const char* p = reinterpret_cast<const char*>(row);
    for (int64_t b = 0; b < static_cast<int64_t>(sizeof(T)) * row_stride<T>(DIM); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

// The same into L2, as an asm statement: GCC 12 dropped the far chunk's loop of _mm_prefetch calls
// (a loop with no effect it can see; no prefetcht1 was left in the build).
template <int DIM, typename T>
inline void prefetch_row_l2(const T* row) {
    const char* p = reinterpret_cast<const char*>(row);
    for (int64_t b = 0; b < static_cast<int64_t>(sizeof(T)) * row_stride<T>(DIM); b += 64)
        asm volatile("prefetcht1 %0" : : "m"(*(p + b)));
}

// The keys and values of positions [first, first + 16) of a task (rows keys / values, len of them),
// then of the next task's past the end, fetched into L2; not when each of those key rows continues
// the row before it (blocks in order, which the hardware's prefetchers follow; a chunk that starts
// a block, or past a task's end starts mid-block in the next task's, is checked row by row, so any
// block size and any length take it). Out of line: inlined into decode_tiled's chunk loop it cost
// that loop registers (one sequence of 2,048 positions in order 0.89-1.00x the speed without it;
// out of line 0.96-0.97x in the medians).
template <int DIM, typename T>
__attribute__((noinline)) void prefetch_far_chunk(const T* const* keys, const T* const* values, int64_t len,
                                                  const T* const* next_keys, const T* const* next_values,
                                                  int64_t next_len, int64_t first) {
    constexpr int64_t kStride = row_stride<T>(DIM);
    const auto at = [&](const T* const* own, const T* const* next, int64_t j) -> const T* {
        if (j < len) return own[j];
        return j - len < next_len ? next[j - len] : nullptr;
    };
    int64_t end = first;  // past the chunk's last row
    bool in_order = true;
    for (const T* before = at(keys, next_keys, first - 1); end < first + 16; ++end) {
        const T* key = at(keys, next_keys, end);
        if (key == nullptr) break;
        in_order = in_order && before != nullptr && key == before + kStride;
        before = key;
    }
    if (in_order) return;
    for (int64_t j = first; j < end; ++j) {
        prefetch_row_l2<DIM>(at(keys, next_keys, j));
        prefetch_row_l2<DIM>(at(values, next_values, j));
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

// One query token per sequence, GROUP query heads per kv head, head_dim DIM (64 or 128). Each
// (sequence, kv head) task reads its keys and values once, 16 positions at a time and both
// together: the 16 scores of every query head, then their softmax weights against a running
// maximum (the sum and the partial outputs rescaled when it grows, as flash attention does), then
// the 16 value rows into the outputs. The cache is far larger than the CPU's caches and a core
// keeps only a few dozen lines in flight, so the rows kAhead positions ahead are prefetched into L1
// one position per value row summed, and at each chunk's start the chunk kFarAhead positions ahead
// into L2 (prefetch_far_chunk), both running on into the next task's first rows. Prefetching the
// next chunk's 16 rows into L1 at once, as a two-pass version of this kernel did, read 1.1-1.8x
// slower on the machine above (kAhead's measurement), blocks in order or scattered.
//
// A sequence whose first positions were attended already (paged_decode_attention's shared
// prefixes: `shared` gives where its own positions start, a whole block, and its rows' output and
// log-sum over those positions) starts from that state instead of nothing and reads its own.
template <int GROUP, int DIM, typename T>
void decode_tiled(const float* q, const T* k_cache, const T* v_cache, const int64_t* table,
                  const int64_t* lens, float* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                  int64_t num_slots, int64_t max_blocks, int64_t block_size, float scale, const Attended& shared) {
    constexpr bool kDotBf16 =
#if defined(__AVX512BF16__)
        std::is_same_v<T, c10::BFloat16>;
#else
        false;
#endif
    for_each_task_range(shared.own_lens ? shared.own_lens : lens, num_seqs, num_kv_heads, [&](int64_t begin, int64_t end) {
        constexpr int64_t kStride = row_stride<T>(DIM);
        constexpr bool kInt8 = std::is_same_v<T, int8_t>;
        // The row addresses of this task and the next, each padded to whole 16s with a row of zeros
        // (their scores are masked to -inf): [task parity][keys, values].
        std::vector<const T*> rows[2][2];
        int64_t lengths[2] = {0, 0};
        const std::vector<T> zeros(kStride, T(0));
        const auto gather = [&](int64_t task, int slot) {
            const int64_t s = task / num_kv_heads, h = task % num_kv_heads, first = shared.first(s);
            const int64_t len = lens[s] - first;  // the positions this task reads
            const int64_t* blocks = table + s * max_blocks + first / block_size;
            const T* kh = k_cache + h * num_slots * kStride;
            const T* vh = v_cache + h * num_slots * kStride;
            auto& keys = rows[slot][0];
            auto& values = rows[slot][1];
            keys.assign((len + 15) / 16 * 16, zeros.data());
            values.assign(keys.size(), zeros.data());
            for (int64_t b = 0, t = 0; t < len; ++b)
                for (int64_t o = 0, row = blocks[b] * block_size; o < block_size && t < len; ++o, ++t) {
                    keys[t] = kh + (row + o) * kStride;
                    values[t] = vh + (row + o) * kStride;
                }
            lengths[slot] = len;
        };
        if (begin < end) gather(begin, 0);
        int64_t unfetched = kAhead;  // the current task's first rows not yet prefetched
        alignas(64) float acc[GROUP * DIM];
        alignas(64) float weights[GROUP * 16];
        for (int64_t task = begin; task < end; ++task) {
            const int cur = (task - begin) & 1, nxt = cur ^ 1;
            const bool has_next = task + 1 < end;
            if (has_next) gather(task + 1, nxt);
            const int64_t s = task / num_kv_heads, h = task % num_kv_heads;
            const int64_t len = lengths[cur], padded = (len + 15) / 16 * 16, next_len = has_next ? lengths[nxt] : 0;
            const T* const* keys = rows[cur][0].data();
            const T* const* values = rows[cur][1].data();
            const T* const* next_keys = rows[nxt][0].data();
            const T* const* next_values = rows[nxt][1].data();
            for (int64_t i = 0; i < std::min(unfetched, len); ++i) prefetch_row<DIM>(keys[i]), prefetch_row<DIM>(values[i]);
            unfetched = std::max<int64_t>(0, kAhead - len);  // the next task's first rows this one leaves
            const float* qs = q + (s * num_heads + h * GROUP) * DIM;
#if defined(__AVX512BF16__)
            __m512bh qb[GROUP * DIM / 32];
            if constexpr (kDotBf16)
                for (int i = 0; i < GROUP * DIM / 32; ++i)
                    qb[i] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qs + 32 * i + 16), _mm512_loadu_ps(qs + 32 * i));
#endif
            float top[GROUP], sum[GROUP];
            if (shared.first(s) > 0) {  // the shared positions' output as if summed against their log-sum
                const int64_t row = s * num_heads + h * GROUP;
                for (int g = 0; g < GROUP; ++g) top[g] = shared.lse[row + g], sum[g] = 1.f;
                std::memcpy(acc, shared.out + row * DIM, sizeof(float) * GROUP * DIM);
            } else {
                for (int g = 0; g < GROUP; ++g) top[g] = -INFINITY, sum[g] = 0.f;
                std::fill(acc, acc + GROUP * DIM, 0.f);
            }
            for (int64_t t0 = 0; t0 < padded; t0 += 16) {
                if constexpr (!kInt8)  // see kFarAhead
                    prefetch_far_chunk<DIM>(keys, values, len, next_keys, next_values, next_len, t0 + kFarAhead);
#if defined(__AVX512BF16__)
                if constexpr (kDotBf16) score16<GROUP, DIM>(qb, keys + t0, weights, 16, scale);
                else
#endif
                    score16<GROUP, DIM>(qs, keys + t0, weights, 16, scale);
                const int64_t n = std::min<int64_t>(16, len - t0);
                const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
                __m512 value_scales = _mm512_set1_ps(1.f);
                if constexpr (kInt8) {  // each key row's scale on its scores, each value row's on its weight
                    alignas(64) float ks[16], vs[16];
                    for (int i = 0; i < 16; ++i) {
                        ks[i] = i < n ? row_scale(keys[t0 + i], DIM) : 1.f;
                        vs[i] = i < n ? row_scale(values[t0 + i], DIM) : 1.f;
                    }
                    for (int g = 0; g < GROUP; ++g)
                        _mm512_store_ps(weights + 16 * g, _mm512_mul_ps(_mm512_load_ps(weights + 16 * g), _mm512_load_ps(ks)));
                    value_scales = _mm512_load_ps(vs);
                }
                for (int g = 0; g < GROUP; ++g) {
                    const __m512 scores = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY), _mm512_load_ps(weights + 16 * g));
                    const float chunk_top = _mm512_reduce_max_ps(scores);
                    if (chunk_top > top[g]) {  // rescale what was summed against the old maximum (0 at first)
                        const float alpha = std::exp(top[g] - chunk_top);
                        sum[g] *= alpha;
                        const __m512 av = _mm512_set1_ps(alpha);
                        for (int c = 0; c < DIM / 16; ++c)
                            _mm512_store_ps(acc + g * DIM + 16 * c, _mm512_mul_ps(_mm512_load_ps(acc + g * DIM + 16 * c), av));
                        top[g] = chunk_top;
                    }
                    const __m512 e = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(scores, _mm512_set1_ps(top[g]))));
                    sum[g] += _mm512_reduce_add_ps(e);
                    _mm512_store_ps(weights + 16 * g, _mm512_mul_ps(e, value_scales));
                }
                for (int c0 = 0; c0 < DIM / 16; c0 += 4) {  // 64 dims per pass: GROUP x 4 accumulators
                    // Two interleaved accumulator sets when one head alone would leave only four FMA chains.
                    constexpr int kSets = GROUP == 1 ? 2 : 1;
                    __m512 a[kSets][GROUP][4];
                    for (int g = 0; g < GROUP; ++g)
                        for (int c = 0; c < 4; ++c) {
                            a[0][g][c] = _mm512_load_ps(acc + g * DIM + 16 * (c0 + c));
                            if constexpr (kSets == 2) a[kSets - 1][g][c] = _mm512_setzero_ps();
                        }
                    for (int64_t i = 0; i < n; ++i) {
                        // Position j's rows, or past the end the next task's (written out: a call here
                        // would spill every accumulator).
                        if (c0 == 0) {
                            if (const int64_t j = t0 + i + kAhead; j < len) {
                                prefetch_row<DIM>(keys[j]);
                                prefetch_row<DIM>(values[j]);
                            } else if (j - len < next_len) {
                                prefetch_row<DIM>(next_keys[j - len]);
                                prefetch_row<DIM>(next_values[j - len]);
                            }
                        }
                        const int set = kSets == 1 ? 0 : static_cast<int>(i & 1);
                        __m512 v[4];
                        for (int c = 0; c < 4; ++c) v[c] = load16(values[t0 + i] + 16 * (c0 + c));
                        for (int g = 0; g < GROUP; ++g) {
                            const __m512 w = _mm512_set1_ps(weights[16 * g + i]);
                            for (int c = 0; c < 4; ++c) a[set][g][c] = _mm512_fmadd_ps(w, v[c], a[set][g][c]);
                        }
                    }
                    for (int g = 0; g < GROUP; ++g)
                        for (int c = 0; c < 4; ++c) {
                            __m512 total = a[0][g][c];
                            if constexpr (kSets == 2) total = _mm512_add_ps(total, a[kSets - 1][g][c]);
                            _mm512_store_ps(acc + g * DIM + 16 * (c0 + c), total);
                        }
                }
            }
            float* os = out + (s * num_heads + h * GROUP) * DIM;
            for (int g = 0; g < GROUP; ++g) {
                const __m512 inv = _mm512_set1_ps(1.f / sum[g]);
                for (int c = 0; c < DIM / 16; ++c)
                    _mm512_storeu_ps(os + g * DIM + 16 * c, _mm512_mul_ps(_mm512_load_ps(acc + g * DIM + 16 * c), inv));
            }
        }
    });
}

// decode_tiled for this group size (1-8) and head_dim (64, 128) if compiled; false otherwise.
template <typename T>
bool decode_fast(int64_t group, const float* q, const T* k, const T* v, const int64_t* table, const int64_t* lens,
                 float* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t num_slots,
                 int64_t head_dim, int64_t max_blocks, int64_t block_size, float scale, const Attended& shared) {
    if (!fast_shape(group, head_dim)) return false;
    switch (group * 1000 + head_dim) {
#define LMSERVE_TILE(G, D) \
    case G * 1000 + D: decode_tiled<G, D>(q, k, v, table, lens, out, num_seqs, num_heads, num_kv_heads, num_slots, max_blocks, block_size, scale, shared); return true;
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
    for_each_task_range(lens, num_seqs, num_kv_heads, [&](int64_t begin, int64_t end) {
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

// Whether this cache and head shape take the shared pass: a bf16 cache, a shape decode_fast runs,
// and the prompt kernel's dpbf16 path (AVX512-BF16; its float32 path, on AVX2, is for prompts only).
bool shared_pass_runs(const at::Tensor& k_cache, int64_t num_heads, int64_t head_dim) {
#if defined(__AVX512BF16__)
    return k_cache.scalar_type() == at::kBFloat16 && fast_shape(num_heads / k_cache.size(0), head_dim) &&
           prompt_attention_supported(k_cache, num_heads);
#else
    (void)k_cache, (void)num_heads, (void)head_dim;
    return false;
#endif
}

}  // namespace

// Whether paged_decode_attention(..., share_prefixes=true) over these sequences attends some of
// their prefixes together (a group of shared_prefixes).
bool decode_shares_prefixes(const at::Tensor& k_cache, int64_t num_heads, const at::Tensor& block_table,
                            const at::Tensor& context_lens, int64_t block_size) {
    if (!shared_pass_runs(k_cache, num_heads, k_cache.size(2))) return false;
    const auto table = block_table.contiguous();
    const auto lens = context_lens.contiguous();
    return !shared_prefixes(table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), lens.numel(), table.size(1),
                            block_size).empty();
}

// One query row per sequence over its context in the paged cache. Where share_prefixes holds, the
// cache is bf16 and prompt_attention_supported takes it (AVX512-BF16), sequences that begin with
// the same cache blocks (shared_prefixes) attend to those together first, each shared row read once
// for the group (shared_prefix_attention: the query rounded to bf16 as here, its softmax weights
// to bf16 as a prompt's are), then each to its own positions from there. An int8 cache keeps this
// kernel's float32 query and exact rows (the prompt kernel would round both to bf16).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                  const at::Tensor& context_lens, int64_t block_size, double scale,
                                  bool share_prefixes) {
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
    auto out = at::empty_like(q);
    // A bf16 cache is attended with the query rounded to bf16 too, on every CPU (the dpbf16 kernel
    // multiplies bf16 pairs exactly; elsewhere the rounded copy gives the same products in float32).
    // The dpbf16 kernel rounds the query itself as it packs its pairs (round to nearest even, as
    // the copy would be), so it takes the query as given: the copy's two passes were half of a
    // one-row call (~5 of ~9 us at 160 positions).
    const bool dpbf16_rounds =
#if defined(__AVX512BF16__)
        k_cache.scalar_type() == at::kBFloat16 && fast_shape(num_heads / num_kv_heads, head_dim);
#else
        false;
#endif
    const bool round_here = k_cache.scalar_type() == at::kBFloat16 && !dpbf16_rounds;
    const auto q_used = round_here ? q.to(at::kBFloat16).to(at::kFloat) : q;
    const auto* table = block_table.data_ptr<int64_t>();
    const auto* lens = context_lens.data_ptr<int64_t>();
    Attended shared;
    std::vector<int64_t> starts, own_lens;
    std::vector<float> shared_out, shared_lse;
    if (share_prefixes && shared_pass_runs(k_cache, num_heads, head_dim)) {
        const auto groups = shared_prefixes(table, lens, num_seqs, block_table.size(1), block_size);
        if (!groups.empty()) {
            const int64_t row = num_heads * head_dim;  // one sequence's query rows
            starts.assign(num_seqs, 0);
            shared_out.resize(num_seqs * row);
            shared_lse.resize(num_seqs * num_heads);
            std::vector<float> rows, rows_out, rows_lse;
            for (const auto& group : groups) {
                const int64_t n = static_cast<int64_t>(group.members.size());
                rows.resize(n * row), rows_out.resize(n * row), rows_lse.resize(n * num_heads);
                for (int64_t i = 0; i < n; ++i)
                    std::memcpy(rows.data() + i * row, q.data_ptr<float>() + group.members[i] * row, sizeof(float) * row);
                shared_prefix_attention(rows.data(), n, num_heads, head_dim, k_cache, v_cache,
                                        table + group.members[0] * block_table.size(1), group.positions, block_size,
                                        scale, rows_out.data(), rows_lse.data());
                for (int64_t i = 0; i < n; ++i) {
                    const int64_t s = group.members[i];
                    std::memcpy(shared_out.data() + s * row, rows_out.data() + i * row, sizeof(float) * row);
                    std::memcpy(shared_lse.data() + s * num_heads, rows_lse.data() + i * num_heads,
                                sizeof(float) * num_heads);
                    starts[s] = group.positions;
                }
            }
            own_lens.resize(num_seqs);
            for (int64_t s = 0; s < num_seqs; ++s) own_lens[s] = lens[s] - starts[s];
            shared = {starts.data(), own_lens.data(), shared_out.data(), shared_lse.data()};
        }
    }
    const auto run = [&](auto... args) {
#if defined(__AVX512F__)
        if (decode_fast(num_heads / num_kv_heads, args..., shared)) return;
#endif
        TORCH_CHECK(!shared.starts, "decode attention: shared prefixes without the tiled kernel");
        decode(args...);
    };
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
