// Projections with 4-bit weights and int8 activations (W4A8), as llama.cpp multiplies Q4_1 by Q8_1:
// the weight keeps its own 4-bit integers q (0..15) with a scale and a low value per group of 32
// input columns (w = q * scale + low: Q4_1's form, and Q4_0's with low = -8 * scale), each row of
// the input is quantized to int8 in the same groups of 32, each with its own scale, and every
// group's int32 sum is scaled back in float32:
//   out[m, n] = sum_g x_scale[m, g] * w_scale[g, n] * sum_k q[n, k] x_q[m, k] + w_low[g, n] * x_sum[m, g]
// where x_sum[m, g] = x_scale[m, g] * sum_k x_q[m, k] (the group's sum as quantized). Group-wise
// activation scales keep one large channel from coarsening the rest of its row (no Hadamard
// transform needed), and the weight stays the GGUF's own 4-bit values at half the bytes of int8.
// model/int8.py's int4_linear_reference spells the same arithmetic out in float64.
#include "aten.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <memory>
#include <tuple>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "avx2_fold.h"
#include "int4_bf16_tiles.h"
#include "int4_params.h"
#include "int4_registers.h"
#include "int4_tiles.h"

std::optional<at::Tensor> float_bias(const std::optional<at::Tensor>& bias, int64_t n);  // int8_linear.cpp

namespace {

constexpr int64_t kGroup = 32;       // INT4_GROUP in model/int8.py, Q4_0/Q4_1's block
constexpr float kMinAbsMax = 1e-12f;  // MIN_ABS_MAX in model/int8.py
// Steps of at most this many rows (single-token decodes) quantize the activations twice: the int8
// rows and then what they missed, run as as many more rows and added: the activations keep ~15 bits
// where int8 keeps 7, for 18-21% more time on a one-row step's 120 projections (measured against the
// build without; RESIDUAL_ROWS in model/int8.py).
constexpr int64_t kResidualRows = 1;

// One group of 32: v ~ out * scale, scale = max|v| / 127, rounded half to even; sum = scale * sum(out).
inline void quantize_group(const float* v, int8_t* out, float& scale_out, float& sum_out) {
#if defined(__AVX512F__)
    const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
    const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float scale = std::max(top, kMinAbsMax) / 127.f;
    const __m512 sv = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // half to even, as nearbyint
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_div_ps(v0, sv), kNearest), lo), hi));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_div_ps(v1, sv), kNearest), lo), hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtsepi32_epi8(q1));
    scale_out = scale;
    sum_out = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1))) * scale;
#elif defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 x[4];
    for (int h = 0; h < 4; ++h) x[h] = _mm256_loadu_ps(v + 8 * h);
    const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, x[0]), _mm256_andnot_ps(sign, x[1])),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, x[2]), _mm256_andnot_ps(sign, x[3])));
    const float top = avx2_fold::fold(m, avx2_fold::max);
    const float scale = std::max(top, kMinAbsMax) / 127.f;
    const __m256 sv = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    __m256i q[4];
    for (int h = 0; h < 4; ++h)  // nearbyint: round half to even
        q[h] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(
            _mm256_round_ps(_mm256_div_ps(x[h], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi));
    // packs work within 128-bit lanes: the bytes come out as q0[0:4] q1[0:4] q2[0:4] q3[0:4] | q0[4:8] ...
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i total8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i total4 = _mm_add_epi32(_mm256_castsi256_si128(total8), _mm256_extracti128_si256(total8, 1));
    total4 = _mm_add_epi32(total4, _mm_shuffle_epi32(total4, 0x4E));
    total4 = _mm_add_epi32(total4, _mm_shuffle_epi32(total4, 0xB1));
    scale_out = scale;
    sum_out = static_cast<float>(_mm_cvtsi128_si32(total4)) * scale;
#else
    float top = 0.f;
    for (int64_t c = 0; c < kGroup; ++c) top = std::max(top, std::fabs(v[c]));
    const float scale = std::max(top, kMinAbsMax) / 127.f;
    int32_t total = 0;
    for (int64_t c = 0; c < kGroup; ++c) {  // nearbyint: round half to even, as torch.round
        const int32_t value = static_cast<int32_t>(std::min(127.f, std::max(-127.f, std::nearbyint(v[c] / scale))));
        out[c] = static_cast<int8_t>(value);
        total += value;
    }
    scale_out = scale;
    sum_out = static_cast<float>(total) * scale;
#endif
}

// Where a row block's int8 values, scales and sums go (quantize_into).
struct GroupRows {
    int8_t* q;
    float* scales;
    float* sums;
};

// A buffer of the calling thread, grown as needed and kept between calls: a one-row step runs ~120
// products, and each allocated its activations' three tensors and a narrowed output (with ATen's
// bookkeeping ~0.5-1 us each, on the main thread while the other waits: one-row steps on SmolLM2
// took 0.953-0.963 of the time without them, paired; bench/RESULTS.md). What stays held is the
// largest step's int8 rows (by their size ~1 MB a thread for SmolLM2's 512-token chunks).
template <typename T>
T* thread_buffer(std::vector<T>& buffer, int64_t size) {
    if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
    return buffer.data();
}

// Room for `rows` rows of `cols` columns in the calling thread's buffers, valid until its next call.
GroupRows thread_group_rows(int64_t rows, int64_t cols) {
    static thread_local std::vector<int8_t> q_buffer;
    static thread_local std::vector<float> scale_buffer, sum_buffer;
    const int64_t groups = cols / kGroup;
    return {thread_buffer(q_buffer, rows * cols), thread_buffer(scale_buffer, rows * groups),
            thread_buffer(sum_buffer, rows * groups)};
}

// quantize_groups of x (rows, cols) into `out`, and with `residual` `rows` more rows after the first:
// what those missed (x - q * scale, rounded as model/int8.py's ATen ops round it), quantized the
// same way. With `padded` past those rows, zero rows follow up to it (for the tiles, which read
// whole tiles).
void quantize_into(const float* xp, int64_t rows, int64_t cols, bool residual, int64_t padded, const GroupRows& out) {
    const int64_t groups = cols / kGroup, out_rows = residual ? 2 * rows : rows;
    if (padded > out_rows) {
        std::fill(out.q + out_rows * cols, out.q + padded * cols, int8_t{0});
        std::fill(out.scales + out_rows * groups, out.scales + padded * groups, 0.f);
        std::fill(out.sums + out_rows * groups, out.sums + padded * groups, 0.f);
    }
    int8_t* qp = out.q;
    float* sp = out.scales;
    float* up = out.sums;
    const int64_t second = rows * groups;  // the residual rows' first group
    at::parallel_for(0, rows * groups, 64, [&](int64_t begin, int64_t end) {
        float missed[kGroup];
        for (int64_t i = begin; i < end; ++i) {  // groups are contiguous: row r, group g is i = r * groups + g
            quantize_group(xp + i * kGroup, qp + i * kGroup, sp[i], up[i]);
            if (!residual) continue;
            int64_t c = 0;
#if defined(__AVX512F__)
            const __m512 sv = _mm512_set1_ps(sp[i]);
            for (; c < kGroup; c += 16) {
                const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qp + i * kGroup + c))));
                _mm512_storeu_ps(missed + c, _mm512_sub_ps(_mm512_loadu_ps(xp + i * kGroup + c), _mm512_mul_ps(q, sv)));
            }
#endif
            for (; c < kGroup; ++c)
                missed[c] = xp[i * kGroup + c] - static_cast<float>(qp[i * kGroup + c]) * sp[i];
            quantize_group(missed, qp + (second + i) * kGroup, sp[second + i], up[second + i]);
        }
    });
}

// x (M, K) float32 as a float32 tensor of contiguous rows, without a copy where it is one.
at::Tensor float_rows(const at::Tensor& x) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) % kGroup == 0, "x: (M, K), K a multiple of 32");
    return (x.scalar_type() == at::kFloat ? x : x.to(at::kFloat)).contiguous();
}

}  // namespace

// x (M, K) float32 -> (M, K) int8, (M, K/32) float32 scales and (M, K/32) float32 sums: in each group
// of 32 columns x ~ q * scale, scale = max|x| / 127, rounded half to even, and sum = scale * sum(q).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_groups(const at::Tensor& x_in) {
    TORCH_CHECK(x_in.scalar_type() == at::kFloat, "x: float32 (M, K)");
    const auto x = float_rows(x_in);
    const int64_t rows = x.size(0), cols = x.size(1), groups = cols / kGroup;
    auto q = at::empty({rows, cols}, x.options().dtype(at::kChar));
    auto scales = at::empty({rows, groups}, x.options());
    auto sums = at::empty({rows, groups}, x.options());
    quantize_into(x.data_ptr<float>(), rows, cols, false, rows,
                  {q.data_ptr<int8_t>(), scales.data_ptr<float>(), sums.data_ptr<float>()});
    return {q, scales, sums};
}

// Whether int4_linear runs here (built for a CPU with AVX512-VNNI or AVX2: int4_registers.h).
bool int4_linear_supported() {
#if defined(LMSERVE_W4A8_GEMM)
    return true;
#else
    return false;
#endif
}

// Whether int4_linear runs steps of 16 rows and more on AMX-INT8 tiles here (a build for a CPU with
// them, on an OS that lets this process use them).
bool int4_tiles_supported() {
#if defined(LMSERVE_W4A8_TILES) && defined(LMSERVE_W4A8_GEMM)
    return int4_tiles::usable();
#else
    return false;
#endif
}

// Whether int4_linear runs steps of 64 rows and more on AMX-BF16 tiles here.
bool int4_bf16_tiles_supported() {
#if defined(LMSERVE_W4_BF16_TILES) && defined(LMSERVE_W4A8_GEMM)
    return int4_tiles::usable();
#else
    return false;
#endif
}

// The path int4_linear takes for a step of `rows` rows: "bf16_tiles", "int8_tiles" or "registers".
std::string int4_linear_path(int64_t rows) {
#if defined(LMSERVE_W4_BF16_TILES)
    if (rows >= int4_bf16_tiles::kMinRows && int4_bf16_tiles_supported()) return "bf16_tiles";
#endif
#if defined(LMSERVE_W4A8_TILES)
    if (rows >= int4_tiles::kRows && int4_tiles_supported()) return "int8_tiles";
#endif
    return "registers";
}

// Whether int4_linear computes a row alike in steps of `a` and of `b` rows: the same path, and the
// residual pass for both or neither (each row's arithmetic is then its own, whatever the others).
bool int4_rows_alike(int64_t a, int64_t b) {
    return int4_linear_path(a) == int4_linear_path(b) && (a <= kResidualRows) == (b <= kResidualRows);
}

#if defined(LMSERVE_W4A8_GEMM)
namespace {

// The operands of one product: m rows of quantized activations (a, with their group scales xs and
// sums xu), the packed weight w with its group scales ws and lows wl, the bias bp or null, and out.
struct W4A8Operands {
    int64_t m, k, n, groups;
    const int8_t* a;
    const float* xs;
    const float* xu;
    const uint8_t* w;
    const at::Half* ws;
    const at::Half* wl;
    const float* bp;
    float* op;
    bool add = false;  // the product added to what op holds (the register tiles only)
};

constexpr int64_t kChunkRows = 64;  // rows a register tile's weights serve before the next tile's

// On the register tiles, the blocks layout: each thread takes an even share of the 16-output blocks
// and, 64 rows at a time, runs every row against each tile of its blocks.
void w4a8_registers(const W4A8Operands& p) {
    const int64_t block_bytes = p.k * 8, blocks = p.n / 16;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t m0 = 0; m0 < p.m; m0 += kChunkRows) {
            const int64_t rows = std::min(kChunkRows, p.m - m0);
            for (int64_t j = begin; j < end;) {
                const int64_t width = std::min<int64_t>(int4_registers::kBlocks, end - j);
                const float* bj = p.bp != nullptr ? p.bp + j * 16 : nullptr;
                const int8_t* a = p.a + m0 * p.k;
                const float* xs = p.xs + m0 * p.groups;
                const float* xu = p.xu + m0 * p.groups;
                float* out = p.op + m0 * p.n + j * 16;
                const int4_registers::Blocks layout{p.w + j * block_bytes, block_bytes, p.ws + j * 16, p.wl + j * 16,
                                                    p.n};
                if (width == 2)
                    int4_registers::rows<2>(rows, a, p.k, xs, xu, p.groups, layout, bj, out, p.n);
                else
                    int4_registers::rows<1>(rows, a, p.k, xs, xu, p.groups, layout, bj, out, p.n);
                j += width;
            }
        }
    });
}

// On the register tiles, the pairs layout (int4_registers.h; p.ws and p.wl unused): each thread
// takes an even share of the pairs and, 64 rows at a time, runs every row against each.
void w4a8_pairs(const W4A8Operands& p) {
    const int64_t pair_bytes = p.groups * int4_registers::kPairGroupBytes;
    at::parallel_for(0, p.n / 32, 1, [&](int64_t begin, int64_t end) {
        for (int64_t m0 = 0; m0 < p.m; m0 += kChunkRows)
            for (int64_t j = begin; j < end; ++j)
                int4_registers::rows<2>(std::min(kChunkRows, p.m - m0), p.a + m0 * p.k, p.k, p.xs + m0 * p.groups,
                                        p.xu + m0 * p.groups, p.groups, int4_registers::Pair{p.w + j * pair_bytes},
                                        p.bp != nullptr ? p.bp + j * 32 : nullptr, p.op + m0 * p.n + j * 32, p.n,
                                        p.add);
    });
}

#if defined(LMSERVE_W4A8_TILES)
// On AMX tiles: each thread takes an even share of the 16-output blocks, unpacks each block once and
// runs every 16 rows against it. The activations are padded to whole tiles.
void w4a8_tiles(const W4A8Operands& p) {
    const int64_t block_bytes = p.k * 8, blocks = p.n / 16;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        const std::unique_ptr<uint8_t[]> unpacked(new uint8_t[p.groups * 512]);  // written before it is read
        int4_tiles::configure();
        for (int64_t j = begin; j < end; ++j) {
            int4_tiles::unpack_block(p.w + j * block_bytes, p.groups, unpacked.get());
            for (int64_t m0 = 0; m0 < p.m; m0 += int4_tiles::kRows)
                int4_tiles::block_rows(p.a + m0 * p.k, p.k, p.xs + m0 * p.groups, p.xu + m0 * p.groups, p.groups,
                                       unpacked.get(), p.ws + j * 16, p.wl + j * 16, p.n,
                                       p.bp != nullptr ? p.bp + j * 16 : nullptr, p.op + m0 * p.n + j * 16, p.n,
                                       std::min(int4_tiles::kRows, p.m - m0));
        }
        int4_tiles::release();
    });
}
#endif

// Quantizes x's rows in groups (each row twice in a step of kResidualRows or fewer: the int8 rows,
// then what they missed), has `run` multiply them by the weight into (m, n) (the operands' weight
// fields left for it to fill), and in a residual step sums each row's two halves and adds the bias
// once. With `add_to` ((M, N) float32 rows) the product is added to those instead (out + (product
// + bias), as ATen's add_ gives it) and no tensor is returned; `run` must then honour the
// operands' `add` (w4a8_pairs does).
template <typename Run>
at::Tensor w4a8_product(const at::Tensor& x_in, int64_t n, std::optional<at::Tensor> bias, int64_t pad_to,
                        const Run& run, float* add_to = nullptr) {
    const auto x = float_rows(x_in);
    const int64_t rows_in = x.size(0), k = x.size(1);
    const bool residual = rows_in <= kResidualRows;  // what the int8 rows missed, run as more rows
    const int64_t m = residual ? 2 * rows_in : rows_in, padded = (m + pad_to - 1) / pad_to * pad_to;
    const GroupRows quantized = thread_group_rows(padded, k);
    quantize_into(x.data_ptr<float>(), rows_in, k, residual, padded, quantized);
    std::optional<at::Tensor> added_bias;
    if (residual) std::swap(added_bias, bias);  // added once, after the two halves are summed
    at::Tensor out;
    if (add_to == nullptr) out = at::empty({rows_in, n}, x.options());
    static thread_local std::vector<float> both_buffer;  // a residual step's two halves, summed into out
    float* op = residual ? thread_buffer(both_buffer, m * n) : add_to != nullptr ? add_to : out.data_ptr<float>();
    W4A8Operands operands{m, k, n, k / kGroup, quantized.q, quantized.scales, quantized.sums,
                          nullptr, nullptr, nullptr, bias ? bias->data_ptr<float>() : nullptr, op};
    operands.add = add_to != nullptr && !residual;
    run(operands);
    if (!residual) return out;
    const float* ab = added_bias ? added_bias->data_ptr<float>() : nullptr;
    float* sum = add_to != nullptr ? add_to : out.data_ptr<float>();
    for (int64_t i = 0; i < rows_in * n; ++i) {
        float v = op[i] + op[rows_in * n + i];
        if (ab != nullptr) v = v + ab[i % n];
        sum[i] = add_to != nullptr ? sum[i] + v : v;
    }
    return out;
}

}  // namespace
#endif

// x (M, K) float32, packed (N/16, K/8, 16, 4) uint8 (pack_int4 in model/int8.py), scales and lows
// (K/32, N) float16, bias (N,) float32 or none -> (M, N) float32. `path` "auto" takes
// int4_linear_path's choice: steps of 64 rows and more on AMX-BF16 tiles and of 16 and more on
// AMX-INT8 tiles where there are any, the rest on the register tiles; "bf16_tiles", "int8_tiles" or "registers" asks for one. The INT8 tiles give the
// register tiles' results bit for bit; the BF16 tiles round the activations to bfloat16 instead.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scales,
                       const at::Tensor& w_lows, const std::optional<at::Tensor>& bias,
                       const std::string& path) {
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 4 &&
                packed.is_contiguous(), "weight: packed uint8 (N/16, K/8, 16, 4)");
    const int64_t blocks = packed.size(0), n = blocks * 16, k = packed.size(1) * 8, groups = k / kGroup;
    TORCH_CHECK(k % kGroup == 0, "weight: K a multiple of 32");
    for (const auto* t : {&w_scales, &w_lows})
        TORCH_CHECK(t->scalar_type() == at::kHalf && t->dim() == 2 && t->size(0) == groups && t->size(1) == n &&
                    t->is_contiguous(), "weight scales and lows: float16 (K/32, N)");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x: (M, K) with the weight's K");
    TORCH_CHECK(path == "auto" || path == "bf16_tiles" || path == "int8_tiles" || path == "registers",
                "path: auto, bf16_tiles, int8_tiles or registers");
    TORCH_CHECK(path != "bf16_tiles" || int4_bf16_tiles_supported(), "no AMX-BF16 tiles here");
    TORCH_CHECK(path != "int8_tiles" || int4_tiles_supported(), "no AMX-INT8 tiles here");
    auto b = float_bias(bias, n);
#if defined(LMSERVE_W4A8_GEMM)
    const int64_t rows_in = x.size(0);
    const std::string chosen = path == "auto" ? int4_linear_path(rows_in) : path;
#if defined(LMSERVE_W4_BF16_TILES)
    if (chosen == "bf16_tiles")
        return int4_bf16_tiles::product(x.to(at::kFloat), packed, w_scales.data_ptr<at::Half>(), w_lows.data_ptr<at::Half>(),
                             b ? b->data_ptr<float>() : nullptr);
#endif
    const bool on_tiles = chosen == "int8_tiles";
#if defined(LMSERVE_W4A8_TILES)
    const int64_t pad_to = on_tiles ? int4_tiles::kRows : 1;
#else
    const int64_t pad_to = 1;
#endif
    return w4a8_product(x, n, b, pad_to, [&](const W4A8Operands& operands) {
        W4A8Operands p = operands;
        p.w = packed.data_ptr<uint8_t>();
        p.ws = w_scales.data_ptr<at::Half>();
        p.wl = w_lows.data_ptr<at::Half>();
#if defined(LMSERVE_W4A8_TILES)
        if (on_tiles) {
            w4a8_tiles(p);
            return;
        }
#endif
        w4a8_registers(p);
    });
#else
    TORCH_CHECK(false, "int4_linear needs a build with AVX512-VNNI or AVX2 (int4_linear_supported())");
#endif
}

namespace {

// The product over a pairs weight, returned, or added to `add_to` ((M, N) float32 rows) where given.
at::Tensor pairs_product(const at::Tensor& x, const at::Tensor& pairs, const std::optional<at::Tensor>& bias,
                         float* add_to) {
    TORCH_CHECK(pairs.scalar_type() == at::kByte && pairs.dim() == 3 &&
                pairs.size(2) == int4_registers::kPairGroupBytes && pairs.is_contiguous(),
                "weight: uint8 pairs (N/32, K/32, 640)");
    const int64_t n = pairs.size(0) * 32, k = pairs.size(1) * kGroup;
    TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x: (M, K) with the weight's K");
    auto b = float_bias(bias, n);
#if defined(LMSERVE_W4A8_GEMM)
    return w4a8_product(x, n, b, 1, [&](const W4A8Operands& operands) {
        W4A8Operands p = operands;
        p.w = pairs.data_ptr<uint8_t>();
        w4a8_pairs(p);
    }, add_to);
#else
    TORCH_CHECK(false, "the pairs layout's product needs a build with AVX512-VNNI or AVX2 (int4_linear_supported())");
#endif
}

}  // namespace

// int4_linear on the weight in the pairs layout (int4_registers.h; pack_int4_pairs), on the register
// tiles at every step: x (M, K) float32, pairs (N/32, K/32, 640) uint8, bias (N,) or none -> (M, N)
// float32, the register tiles' results bit for bit.
at::Tensor int4_pairs_linear(const at::Tensor& x, const at::Tensor& pairs,
                             const std::optional<at::Tensor>& bias) {
    return pairs_product(x, pairs, bias, nullptr);
}

// out += int4_pairs_linear(x, pairs, bias), bit for bit, with no tensor between: out (M, N) contiguous
// float32 (the native decoder's residual sums, which took a new tensor and an ATen add each).
void int4_pairs_linear_add(const at::Tensor& x, const at::Tensor& pairs, const std::optional<at::Tensor>& bias,
                           at::Tensor& out) {
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == x.size(0) &&
                out.size(1) == pairs.size(0) * 32, "out: contiguous float32 (M, N)");
    pairs_product(x, pairs, bias, out.data_ptr<float>());
}

// The blocks layout (packed (N/16, K/8, 16, 4) uint8 with (K/32, N) float16 scales and lows) ->
// the pairs layout (N/32, K/32, 640) uint8 (int4_registers.h), N a multiple of 32.
at::Tensor pack_int4_pairs(const at::Tensor& packed, const at::Tensor& w_scales, const at::Tensor& w_lows) {
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 4 &&
                packed.is_contiguous() && packed.size(0) % 2 == 0 && packed.size(1) % 4 == 0,
                "weight: packed uint8 (N/16, K/8, 16, 4), N a multiple of 32 and K of 32");
    const int64_t n = packed.size(0) * 16, groups = packed.size(1) / 4;
    for (const auto* t : {&w_scales, &w_lows})
        TORCH_CHECK(t->scalar_type() == at::kHalf && t->dim() == 2 && t->size(0) == groups && t->size(1) == n &&
                    t->is_contiguous(), "weight scales and lows: float16 (K/32, N)");
    constexpr int64_t kBlockGroup = int4_registers::kGroupBytes, kPairGroup = int4_registers::kPairGroupBytes;
    auto pairs = at::empty({n / 32, groups, kPairGroup}, packed.options());
    const uint8_t* w = packed.data_ptr<uint8_t>();
    const auto* ws = reinterpret_cast<const uint8_t*>(w_scales.data_ptr<at::Half>());
    const auto* wl = reinterpret_cast<const uint8_t*>(w_lows.data_ptr<at::Half>());
    uint8_t* out = pairs.data_ptr<uint8_t>();
    at::parallel_for(0, n / 32, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p)
            for (int64_t g = 0; g < groups; ++g) {
                uint8_t* dst = out + (p * groups + g) * kPairGroup;
                for (int64_t j = 0; j < 2; ++j)
                    std::memcpy(dst + j * kBlockGroup, w + ((2 * p + j) * groups + g) * kBlockGroup, kBlockGroup);
                std::memcpy(dst + 2 * kBlockGroup, ws + (g * n + 32 * p) * 2, 64);
                std::memcpy(dst + 2 * kBlockGroup + 64, wl + (g * n + 32 * p) * 2, 64);
            }
    });
    return pairs;
}

// pack_int4 (model/weight_formats/int4.py): (N, K) uint8 in 0..15 -> (N/16, K/8, 16, 4) uint8, byte
// [j, s, l, b] holding q[16 j + l, 8 s + b] in its low nibble and q[16 j + l, 8 s + 4 + b] in its high one.
at::Tensor pack_int4(const at::Tensor& q) {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous() && q.size(0) % 16 == 0 &&
                q.size(1) % 8 == 0, "q: contiguous uint8 (N, K), N a multiple of 16 and K of 8");
    const int64_t n = q.size(0), k = q.size(1), steps = k / 8;
    auto packed = at::empty({n / 16, steps, 16, 4}, q.options());
    const uint8_t* qp = q.data_ptr<uint8_t>();
    uint8_t* out = packed.data_ptr<uint8_t>();
    at::parallel_for(0, n / 16, 1, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j)
            for (int64_t s = 0; s < steps; ++s)
                for (int64_t l = 0; l < 16; ++l) {
                    const uint8_t* row = qp + (16 * j + l) * k + 8 * s;
                    uint8_t* bytes = out + ((j * steps + s) * 16 + l) * 4;
                    for (int b = 0; b < 4; ++b) bytes[b] = static_cast<uint8_t>(row[b] | row[4 + b] << 4);
                }
    });
    return packed;
}

// model/weight_formats/int4.py's _quantize_rows, op for op in float32 (each value rounded where
// torch rounds it: the scales and lows to float16 and back, q half to even), so the weights it
// gives are those of the PyTorch version bit for bit: (N, K) float32 -> (N, K) uint8 q in 0..15,
// (N, K/32) float16 scales and lows. Each group takes Q4_1's grid (min and max at 0 and 15) or
// Q4_0's ((q - 8) * d, the value of largest magnitude at q = 0) where that one is strictly closer.
// Built with AVX-512 or AVX2 (int4_quantize_supported); elsewhere model/weight_formats/int4.py runs
// its PyTorch version.
bool int4_quantize_supported() {
#if defined(__AVX512F__) || defined(__AVX2__)
    return true;
#else
    return false;
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4_groups(const at::Tensor& weight) {
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                weight.size(1) % kGroup == 0, "weight: contiguous float32 (N, K), K a multiple of 32");
#if defined(__AVX512F__)
    const int64_t n = weight.size(0), groups = weight.size(1) / kGroup;
    auto q = at::empty({n, groups * kGroup}, weight.options().dtype(at::kByte));
    auto scales = at::empty({n, groups}, weight.options().dtype(at::kHalf));
    auto lows = at::empty_like(scales);
    const float* w = weight.data_ptr<float>();
    uint8_t* qp = q.data_ptr<uint8_t>();
    at::Half* sp = scales.data_ptr<at::Half>();
    at::Half* lp = lows.data_ptr<at::Half>();
    const auto half = [](float x) { return static_cast<float>(static_cast<at::Half>(x)); };
    at::parallel_for(0, n * groups, 256, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g) {
            const float* v = w + g * kGroup;
            const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
            if (_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q)) {
                // torch's min, max and argmax take the NaN: scale and low NaN, q 0
                std::memset(qp + g * kGroup, 0, kGroup);
                sp[g] = lp[g] = static_cast<at::Half>(std::numeric_limits<float>::quiet_NaN());
                continue;
            }
            const float lo = _mm512_reduce_min_ps(_mm512_min_ps(a, b)), hi = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
            const __m512 abs_a = _mm512_abs_ps(a), abs_b = _mm512_abs_ps(b);
            const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(abs_a, abs_b)));
            const uint32_t at_top = static_cast<uint32_t>(_mm512_cmp_ps_mask(abs_a, top, _CMP_EQ_OQ)) |
                                    static_cast<uint32_t>(_mm512_cmp_ps_mask(abs_b, top, _CMP_EQ_OQ)) << 16;
            const float extreme = v[at_top != 0 ? __builtin_ctz(at_top) : 0];  // the first of the largest
            const float low1 = half(lo), scale1 = half((hi - low1) / 15.f), scale0 = half(extreme / -8.f);
            const float grid_scale[2] = {scale1, scale0}, grid_low[2] = {low1, -8.f * scale0};
            alignas(64) float grid_q[2][kGroup];
            float error[2];
            for (int s = 0; s < 2; ++s) {
                const float divisor = grid_scale[s] == 0.f ? 1.f : grid_scale[s];  // a constant group: q = 0
                const __m512 low = _mm512_set1_ps(grid_low[s]), scale = _mm512_set1_ps(grid_scale[s]);
                __m512 worst = _mm512_setzero_ps();
                __mmask16 nan = 0;  // a grid whose scale overflowed float16 misses by NaN: never the closer one
                for (int h = 0; h < 2; ++h) {
                    const __m512 x = h == 0 ? a : b;
                    const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_sub_ps(x, low), _mm512_set1_ps(divisor)),
                                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    const __m512 c = _mm512_min_ps(_mm512_max_ps(r, _mm512_setzero_ps()), _mm512_set1_ps(15.f));
                    _mm512_store_ps(grid_q[s] + 16 * h, c);
                    const __m512 miss = _mm512_abs_ps(_mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(c, scale), low), x));
                    nan |= _mm512_cmp_ps_mask(miss, miss, _CMP_UNORD_Q);
                    worst = _mm512_max_ps(worst, miss);
                }
                error[s] = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(worst);
            }
            const int s = error[1] < error[0] ? 1 : 0;
            for (int i = 0; i < kGroup; ++i) qp[g * kGroup + i] = static_cast<uint8_t>(grid_q[s][i]);
            sp[g] = static_cast<at::Half>(grid_scale[s]);
            lp[g] = static_cast<at::Half>(grid_low[s]);
        }
    });
    return {q, scales, lows};
#elif defined(__AVX2__)
    // The AVX-512 steps above in 8 lanes, four vectors a group; the bits are the same (each value is
    // one float32 operation on the same operands; only the min and max reductions are ordered otherwise).
    const int64_t n = weight.size(0), groups = weight.size(1) / kGroup;
    auto q = at::empty({n, groups * kGroup}, weight.options().dtype(at::kByte));
    auto scales = at::empty({n, groups}, weight.options().dtype(at::kHalf));
    auto lows = at::empty_like(scales);
    const float* w = weight.data_ptr<float>();
    uint8_t* qp = q.data_ptr<uint8_t>();
    at::Half* sp = scales.data_ptr<at::Half>();
    at::Half* lp = lows.data_ptr<at::Half>();
    const auto half = [](float x) { return static_cast<float>(static_cast<at::Half>(x)); };
    const auto unordered = [](__m256 a) { return _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)); };
    at::parallel_for(0, n * groups, 256, [&](int64_t begin, int64_t end) {
        const __m256 sign = _mm256_set1_ps(-0.f), zero = _mm256_setzero_ps(), fifteen = _mm256_set1_ps(15.f);
        for (int64_t g = begin; g < end; ++g) {
            const float* v = w + g * kGroup;
            __m256 x[4], magnitude[4];
            int nan = 0;
            for (int h = 0; h < 4; ++h) {
                x[h] = _mm256_loadu_ps(v + 8 * h);
                magnitude[h] = _mm256_andnot_ps(sign, x[h]);
                nan |= unordered(x[h]);
            }
            if (nan) {  // torch's min, max and argmax take the NaN: scale and low NaN, q 0
                std::memset(qp + g * kGroup, 0, kGroup);
                sp[g] = lp[g] = static_cast<at::Half>(std::numeric_limits<float>::quiet_NaN());
                continue;
            }
            using avx2_fold::fold, avx2_fold::max, avx2_fold::min;
            const float lo = fold(_mm256_min_ps(_mm256_min_ps(x[0], x[1]), _mm256_min_ps(x[2], x[3])), min);
            const float hi = fold(_mm256_max_ps(_mm256_max_ps(x[0], x[1]), _mm256_max_ps(x[2], x[3])), max);
            const __m256 top = _mm256_set1_ps(fold(_mm256_max_ps(_mm256_max_ps(magnitude[0], magnitude[1]),
                                                                 _mm256_max_ps(magnitude[2], magnitude[3])), max));
            uint32_t at_top = 0;
            for (int h = 0; h < 4; ++h)
                at_top |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(magnitude[h], top, _CMP_EQ_OQ))) << 8 * h;
            const float extreme = v[at_top != 0 ? __builtin_ctz(at_top) : 0];  // the first of the largest
            const float low1 = half(lo), scale1 = half((hi - low1) / 15.f), scale0 = half(extreme / -8.f);
            const float grid_scale[2] = {scale1, scale0}, grid_low[2] = {low1, -8.f * scale0};
            alignas(32) float grid_q[2][kGroup];
            float error[2];
            for (int s = 0; s < 2; ++s) {
                const float divisor = grid_scale[s] == 0.f ? 1.f : grid_scale[s];  // a constant group: q = 0
                const __m256 low = _mm256_set1_ps(grid_low[s]), scale = _mm256_set1_ps(grid_scale[s]);
                __m256 worst = zero;
                int missed_by_nan = 0;  // a grid whose scale overflowed float16 misses by NaN: never the closer one
                for (int h = 0; h < 4; ++h) {
                    const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(x[h], low), _mm256_set1_ps(divisor)),
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    const __m256 c = _mm256_min_ps(_mm256_max_ps(r, zero), fifteen);
                    _mm256_store_ps(grid_q[s] + 8 * h, c);
                    const __m256 miss = _mm256_andnot_ps(sign, _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(c, scale), low), x[h]));
                    missed_by_nan |= unordered(miss);
                    worst = _mm256_max_ps(worst, miss);
                }
                error[s] = missed_by_nan ? std::numeric_limits<float>::quiet_NaN() : fold(worst, max);
            }
            const int s = error[1] < error[0] ? 1 : 0;
            for (int i = 0; i < kGroup; ++i) qp[g * kGroup + i] = static_cast<uint8_t>(grid_q[s][i]);
            sp[g] = static_cast<at::Half>(grid_scale[s]);
            lp[g] = static_cast<at::Half>(grid_low[s]);
        }
    });
    return {q, scales, lows};
#else
    TORCH_CHECK(false, "quantize_int4_groups needs a build with AVX-512 or AVX2 (int4_quantize_supported())");
#endif
}
