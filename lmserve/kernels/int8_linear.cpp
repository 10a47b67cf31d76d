// Projections with int8 weights and int8 activations (W8A8): each row of the input is quantized
// symmetrically to int8 with its own scale, multiplied by the int8 weight with int32 accumulation,
// and the int32 sums are scaled back to float32. The product runs on this file's AVX512-VNNI kernel
// where the weight was packed for it at load (model/int8.py's pack_weight: 1.3-2.3x oneDNN's
// at::_int_mm at 9-64 rows, about even from 256) and on at::_int_mm otherwise. The arithmetic is
// the one lmserve/model/int8.py spells out in ATen ops, step for step, so both give the same
// results bit for bit (this file is built with -ffp-contract=off: no fused multiply-adds where the
// ATen ops round twice).
#include "aten.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "int8_rows.h"
#include "int8_tiles.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
// One butterfly stage of pair distance h (1, 2, 4 or 8) inside a vector of 16: lanes with bit h
// clear become a + b, the others a - b, where a is the lower lane of the pair and b the upper.
inline __m512 butterfly_in_vector(__m512 x, int h) {
    static const __m512i partner[4] = {
        _mm512_set_epi32(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1),
        _mm512_set_epi32(13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2),
        _mm512_set_epi32(11, 10, 9, 8, 15, 14, 13, 12, 3, 2, 1, 0, 7, 6, 5, 4),
        _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8)};
    static const __mmask16 upper[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};
    const int stage = h == 1 ? 0 : h == 2 ? 1 : h == 4 ? 2 : 3;
    const __m512 p = _mm512_permutexvar_ps(partner[stage], x);
    return _mm512_mask_blend_ps(upper[stage], _mm512_add_ps(x, p), _mm512_sub_ps(p, x));
}
#endif

// hadamard's stages from h on, one pair at a time (in float32 for hadamard, float64 for rotated_int8).
template <typename T>
void hadamard_stages(T* row, int64_t cols, int64_t block, int64_t h) {
    for (; h < block; h *= 2)
        for (int64_t j = 0; j < cols; j += 2 * h)
            for (int64_t i = j; i < j + h; ++i) {
                const T a = row[i], b = row[i + h];
                row[i] = a + b;
                row[i + h] = a - b;
            }
}

// In place: each block of `block` values (a power of two) times the unnormalized Walsh-Hadamard
// matrix, stage h = 1, 2, 4, ...: (a, b) at distance h -> (a + b, a - b). hadamard_rows in
// model/int8.py performs the same additions in the same order.
void hadamard(float* row, int64_t cols, int64_t block) {
    int64_t h = 1;
#if defined(__AVX512F__)
    if (block >= 16) {
        for (int64_t c = 0; c < cols; c += 16) {
            __m512 v = _mm512_loadu_ps(row + c);
            for (int hh = 1; hh < 16; hh *= 2) v = butterfly_in_vector(v, hh);
            _mm512_storeu_ps(row + c, v);
        }
        for (h = 16; h < block; h *= 2)
            for (int64_t j = 0; j < cols; j += 2 * h)
                for (int64_t i = j; i < j + h; i += 16) {
                    const __m512 a = _mm512_loadu_ps(row + i), b = _mm512_loadu_ps(row + i + h);
                    _mm512_storeu_ps(row + i, _mm512_add_ps(a, b));
                    _mm512_storeu_ps(row + i + h, _mm512_sub_ps(a, b));
                }
        return;
    }
#endif
    hadamard_stages(row, cols, block, h);
}

// x (M, K) float32 -> (M, K) int8 and (M,) float32 scales: x ~ q * scale, scale = max|x| / 127,
// after a Walsh-Hadamard transform of each `block` values (block 1: none), which spreads a few large
// channels over their block so that one per-row scale fits every value of the row. With `pad_to`,
// zero rows of q follow up to a multiple of it (for the tiles, which read whole tiles).
std::tuple<at::Tensor, at::Tensor> quantize_padded_rows(const at::Tensor& x_in, int64_t block, int64_t pad_to) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x: float32 (M, K)");
    TORCH_CHECK(block >= 1 && (block & (block - 1)) == 0 && x_in.size(1) % block == 0, "block: a power of two dividing K");
    const auto x = x_in.contiguous();
    const int64_t rows = x.size(0), cols = x.size(1), padded = (rows + pad_to - 1) / pad_to * pad_to;
    auto q = at::empty({padded, cols}, x.options().dtype(at::kChar));
    if (padded > rows) q.narrow(0, rows, padded - rows).zero_();
    auto scales = at::empty({rows}, x.options());
    const float* xp = x.data_ptr<float>();
    int8_t* qp = q.data_ptr<int8_t>();
    float* sp = scales.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> rotated(block > 1 ? cols : 0);
        for (int64_t r = begin; r < end; ++r) {
            const float* row = xp + r * cols;
            if (block > 1) {
                std::copy(row, row + cols, rotated.begin());
                hadamard(rotated.data(), cols, block);
                row = rotated.data();
            }
            sp[r] = quantize_row(row, qp + r * cols, cols);
        }
    });
    return {q, scales};
}

// A weight's W8A8 copy, as model/weight_formats/int8.py's rotated_int8 gives it: (N, K) float32 ->
// (N, K) int8 and (N,) bfloat16 scales of W H / block, each row against its own scale (its largest
// magnitude / 127, rounded to bfloat16 first), round half to even. The transform runs in float64
// stage by stage as hadamard does, where the torch version multiplies by H in float64: a block's
// sums of float32 values are exact in float64 unless its magnitudes span more than ~2^23, and
// even then the two round to the same float32 all but never (tested on heavy-tailed rows). A row
// holding a NaN or an infinity keeps torch's scale (NaN, inf) and q 0.
std::tuple<at::Tensor, at::Tensor> rotated_int8(const at::Tensor& weight, int64_t block) {
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
                "weight: contiguous float32 (N, K)");
    TORCH_CHECK(block >= 1 && (block & (block - 1)) == 0 && weight.size(1) % block == 0, "block: a power of two dividing K");
    const int64_t rows = weight.size(0), cols = weight.size(1);
    auto q = at::empty({rows, cols}, weight.options().dtype(at::kChar));
    auto scales = at::empty({rows}, weight.options().dtype(at::kBFloat16));
    const float* wp = weight.data_ptr<float>();
    int8_t* qp = q.data_ptr<int8_t>();
    at::BFloat16* sp = scales.data_ptr<at::BFloat16>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        std::vector<double> wide(cols);
        std::vector<float> rotated(cols);
        for (int64_t r = begin; r < end; ++r) {
            std::copy(wp + r * cols, wp + (r + 1) * cols, wide.begin());
            hadamard_stages(wide.data(), cols, block, 1);
            float top = 0.f;
            bool nan = false;
            for (int64_t c = 0; c < cols; ++c) {
                rotated[c] = static_cast<float>(wide[c] / static_cast<double>(block));
                nan |= std::isnan(rotated[c]);
                top = std::max(top, std::fabs(rotated[c]));
            }
            int8_t* out = qp + r * cols;
            if (nan || !std::isfinite(top)) {  // torch's scale (its amax takes a NaN), and nothing in the row to keep
                sp[r] = at::BFloat16(nan ? std::numeric_limits<float>::quiet_NaN() : top / 127.f);
                std::fill(out, out + cols, 0);
                continue;
            }
            sp[r] = at::BFloat16(std::max(top, 1e-12f) / 127.f);
            const float scale = static_cast<float>(sp[r]);
            for (int64_t c = 0; c < cols; ++c)
                out[c] = static_cast<int8_t>(std::clamp(std::nearbyint(rotated[c] / scale), -127.f, 127.f));
        }
    });
    return {q, scales};
}

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, int64_t block) {
    return quantize_padded_rows(x, block, 1);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LMSERVE_VNNI_GEMM 1  // the packed product runs here, on AVX512-VNNI
#define LMSERVE_W8A8_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__)
#define LMSERVE_VNNI_GEMM 1  // and on AVX2 (int8_avx2.h)
#endif

#if defined(LMSERVE_VNNI_GEMM)
namespace {

#if defined(LMSERVE_W8A8_VNNI)
// The packed weight: (N/16, K/4, 16, 4) uint8 holding w + 128, so that vpdpbusd (unsigned bytes
// times signed bytes, four products summed into each int32 lane) takes 64 bytes of weight, four
// columns of K for 16 outputs, against four bytes of one activation row broadcast to every lane.
// sum_k (w + 128) a = sum_k w a + 128 sum_k a: the second term (kOffset times the row sum) is
// subtracted before scaling, so the int32 sums are exactly at::_int_mm's.
constexpr int32_t kOffset = 128;
constexpr int kRows = 4;    // activation rows a register tile covers
constexpr int kBlocks = 4;  // 16-output blocks a register tile covers: 16 int32 accumulators

#define LM_TILE(X) X(0, 0) X(0, 1) X(0, 2) X(0, 3) X(1, 0) X(1, 1) X(1, 2) X(1, 3) \
    X(2, 0) X(2, 1) X(2, 2) X(2, 3) X(3, 0) X(3, 1) X(3, 2) X(3, 3)

// out[i, 16 j + l] for i < R, j < B from rows a (stride k) and B blocks of the packed weight from w
// (each k * 16 bytes, one after another). Named accumulators and an inline-asm vpdpbusd: with an
// array of vectors and the intrinsic, GCC 12 spills the accumulators or copies them every step.
// Over the k loop, one cache line of the weights that follow (prefetch, every `prefetch_every`
// steps) is fetched, so the next tile's weights arrive from memory while this one computes.
template <int R, int B>
inline void vnni_tile(const int8_t* a, int64_t k, const uint8_t* w, const int32_t* row_offsets,
                      const float* x_scales, const float* w_scales, const float* bias, float* out, int64_t ldo,
                      const uint8_t* prefetch, int64_t prefetch_every) {
    static_assert(R >= 1 && R <= kRows && B >= 1 && B <= kBlocks, "tile size");
#define LM_ZERO(i, j) __m512i c##i##j = _mm512_setzero_si512();
    LM_TILE(LM_ZERO)
#undef LM_ZERO
    const int64_t block_bytes = k * 16;
    __m512i w0, w1, w2, w3, a0, a1, a2, a3;
    for (int64_t g = 0; g < k / 4; ++g) {
        if (prefetch != nullptr && g % prefetch_every == 0)
            _mm_prefetch(reinterpret_cast<const char*>(prefetch + (g / prefetch_every) * 64), _MM_HINT_T0);
        const uint8_t* wg = w + g * 64;
        w0 = _mm512_loadu_si512(wg);
        if constexpr (B > 1) w1 = _mm512_loadu_si512(wg + block_bytes);
        if constexpr (B > 2) w2 = _mm512_loadu_si512(wg + 2 * block_bytes);
        if constexpr (B > 3) w3 = _mm512_loadu_si512(wg + 3 * block_bytes);
        const int8_t* ag = a + g * 4;
        a0 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(ag));
        if constexpr (R > 1) a1 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(ag + k));
        if constexpr (R > 2) a2 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(ag + 2 * k));
        if constexpr (R > 3) a3 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(ag + 3 * k));
#define LM_DOT(i, j) if constexpr (R > i && B > j) asm("vpdpbusd %2, %1, %0" : "+v"(c##i##j) : "v"(w##j), "v"(a##i));
        LM_TILE(LM_DOT)
#undef LM_DOT
    }
    // ((float) sum * x_scale) * w_scale (+ bias): int8_linear's order of operations, below and in model/int8.py
#define LM_STORE(i, j) if constexpr (R > i && B > j) { \
        __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(c##i##j, _mm512_set1_epi32(row_offsets[i]))); \
        v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(x_scales[i])), _mm512_loadu_ps(w_scales + j * 16)); \
        if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j * 16)); \
        _mm512_storeu_ps(out + i * ldo + j * 16, v); }
    LM_TILE(LM_STORE)
#undef LM_STORE
}
#undef LM_TILE
#else
}  // namespace
#include "int8_avx2.h"
namespace {
#endif

// Rows [0, m) against B weight blocks, kRows at a time; `next_lines` cache lines of the weights
// that follow are prefetched, spread over the full-height tiles.
template <int B>
void vnni_rows(int64_t m, const int8_t* a, int64_t k, const uint8_t* w, const int32_t* row_offsets,
               const float* x_scales, const float* w_scales, const float* bias, float* out, int64_t ldo,
               int64_t next_lines) {
    const int64_t tiles = m / kRows;
    const int64_t per_tile = tiles > 0 ? (next_lines + tiles - 1) / tiles : 0;
    const int64_t every = per_tile > 0 ? std::max<int64_t>(1, (k / 4) / per_tile) : 1;
    int64_t i = 0;
    for (int64_t t = 0; t < tiles; ++t, i += kRows) {
        const uint8_t* prefetch = per_tile > 0 ? w + B * k * 16 + t * per_tile * 64 : nullptr;
        vnni_tile<kRows, B>(a + i * k, k, w, row_offsets + i, x_scales + i, w_scales, bias, out + i * ldo, ldo,
                            prefetch, every);
    }
    switch (m - i) {
#define LM_TAIL(r) case r: vnni_tile<r, B>(a + i * k, k, w, row_offsets + i, x_scales + i, w_scales, bias, \
                                           out + i * ldo, ldo, nullptr, 1); break;
        LM_TAIL(1) LM_TAIL(2) LM_TAIL(3)
#undef LM_TAIL
        default: break;
    }
}

// (M, K) int8 rows with (M,) scales (xq may hold zero rows after them) times the packed (N/16, K/4,
// 16, 4) weight -> (M, N) float32.
// Each thread takes an even share of the 16-output blocks and, 64 rows at a time, runs every row
// against each tile of its blocks, so a tile's weights are read from memory once per 64 rows.
at::Tensor vnni_product(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& packed,
                        const at::Tensor& w_scales, const float* bias, bool on_tiles) {
    const int64_t m = x_scales.size(0), k = xq.size(1), blocks = packed.size(0), n = blocks * 16;
    auto out = at::empty({m, n}, x_scales.options());
    const int8_t* a = xq.data_ptr<int8_t>();
    std::vector<int32_t> row_offsets(m);  // zeros on AVX2, whose tile multiplies w itself (int8_avx2.h)
#if defined(LMSERVE_W8A8_VNNI)
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t r = 0; r < m; ++r) {
        const int8_t* row = a + r * k;
        __m512i sum = _mm512_setzero_si512();
        int64_t c = 0;
        for (; c + 64 <= k; c += 64) sum = _mm512_dpbusd_epi32(sum, ones, _mm512_loadu_si512(row + c));
        int32_t total = _mm512_reduce_add_epi32(sum);
        for (; c < k; ++c) total += row[c];
        row_offsets[r] = kOffset * total;
    }
#endif
    const uint8_t* w = packed.data_ptr<uint8_t>();
    const float* xs = x_scales.data_ptr<float>();
    const float* ws = w_scales.data_ptr<float>();
    float* op = out.data_ptr<float>();
#if defined(LMSERVE_W8A8_TILES)
    if (on_tiles) {
        int8_tiles::product(a, m, k, w, blocks, row_offsets.data(), xs, ws, bias, op);
        return out;
    }
#endif
    const int64_t block_bytes = k * 16, lines_per_block = k / 4;
    constexpr int64_t kChunkRows = 64;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t m0 = 0; m0 < m; m0 += kChunkRows) {
            const int64_t rows = std::min(kChunkRows, m - m0);
            const int8_t* am = a + m0 * k;
            for (int64_t j = begin; j < end;) {
                const int64_t width = std::min<int64_t>(kBlocks, end - j);
                const int64_t next_lines = std::min<int64_t>(kBlocks, end - j - width) * lines_per_block;
                const uint8_t* wj = w + j * block_bytes;
                const float* bj = bias != nullptr ? bias + j * 16 : nullptr;
                float* oj = op + m0 * n + j * 16;
                const int32_t* offsets = row_offsets.data() + m0;
                switch (width) {
#define LM_WIDTH(b) case b: vnni_rows<b>(rows, am, k, wj, offsets, xs + m0, ws + j * 16, bj, oj, n, next_lines); break;
                    LM_WIDTH(1) LM_WIDTH(2) LM_WIDTH(3) LM_WIDTH(4)
#undef LM_WIDTH
                }
                j += width;
            }
        }
    });
    return out;
}

}  // namespace
#endif

// A projection's optional bias as contiguous float32, checked to hold N values (int8_linear,
// int4_linear, bf16_linear).
std::optional<at::Tensor> float_bias(const std::optional<at::Tensor>& bias, int64_t n) {
    if (!bias) return std::nullopt;
    auto b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == n, "bias: (N,)");
    return b;
}

// Whether int8_linear takes packed weights here (built for a CPU with AVX512-VNNI or AVX2).
bool int8_packed_supported() {
#if defined(LMSERVE_VNNI_GEMM)
    return true;
#else
    return false;
#endif
}

// The path int8_linear takes for a packed weight of K columns in a step of `rows` rows: "int8_tiles"
// (AMX-INT8, from 16 rows, K a multiple of 64) or "registers" (AVX512-VNNI).
std::string int8_linear_path(int64_t rows, int64_t k) {
#if defined(LMSERVE_W8A8_TILES) && defined(LMSERVE_VNNI_GEMM)
    if (rows >= int8_tiles::kMinRows && int8_tiles::fits(k) && int4_tiles::usable()) return "int8_tiles";
#endif
    return "registers";
}

// x (M, K) float32, weight (N, K) int8 or packed (N/16, K/4, 16, 4) uint8 (pack_weight in
// model/int8.py) with (N,) float32 scales, bias (N,) float32 or none -> (M, N) float32
// = (int32 sums * x_scale[m]) * w_scale[n] (+ bias[n]). The weight was quantized after the same
// blockwise transform (and its 1/block), so the transforms cancel in the product. A packed weight
// runs on int8_linear_path's choice for `path` "auto", or on "int8_tiles" or "registers" as asked:
// the same results bit for bit.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& w_scales,
                       const std::optional<at::Tensor>& bias, int64_t block, const std::string& path) {
    const bool packed = weight.scalar_type() == at::kByte;
    TORCH_CHECK(packed ? weight.dim() == 4 && weight.size(2) == 16 && weight.size(3) == 4 && weight.is_contiguous()
                       : weight.dim() == 2 && weight.scalar_type() == at::kChar,
                "weight: int8 (N, K) or packed uint8 (N/16, K/4, 16, 4)");
    const int64_t n = packed ? weight.size(0) * 16 : weight.size(0), k = packed ? weight.size(1) * 4 : weight.size(1);
    TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.numel() == n && w_scales.is_contiguous(),
                "weight scales: float32 (N,)");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x: (M, K) with the weight's K");
    TORCH_CHECK(path == "auto" || path == "int8_tiles" || path == "registers", "path: auto, int8_tiles or registers");
    const bool tiles_here = packed && int8_linear_path(std::numeric_limits<int64_t>::max(), k) == "int8_tiles";
    TORCH_CHECK(path != "int8_tiles" || tiles_here, "no AMX-INT8 tiles for this weight here");
    const bool on_tiles = path == "int8_tiles" || (path == "auto" && packed && int8_linear_path(x.size(0), k) == "int8_tiles");
    const auto b = float_bias(bias, n);
#if defined(LMSERVE_W8A8_TILES)
    auto [xq, x_scales] = quantize_padded_rows(x, block, on_tiles ? int8_tiles::kChunkRows : 1);
#else
    auto [xq, x_scales] = quantize_rows(x, block);
#endif
    if (packed) {
#if defined(LMSERVE_VNNI_GEMM)
        return vnni_product(xq, x_scales, weight, w_scales, b ? b->data_ptr<float>() : nullptr, on_tiles);
#else
        TORCH_CHECK(false, "packed int8 weights need a build with AVX512-VNNI or AVX2 (int8_packed_supported())");
#endif
    }
    const auto sums = at::_int_mm(xq, weight.t());  // (M, N) int32
    const int64_t rows = sums.size(0), cols = sums.size(1);
    auto out = at::empty({rows, cols}, x.options());
    const int32_t* ap = sums.data_ptr<int32_t>();
    const float* xs = x_scales.data_ptr<float>();
    const float* ws = w_scales.data_ptr<float>();
    const float* bp = b ? b->data_ptr<float>() : nullptr;
    float* op = out.data_ptr<float>();
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const int32_t* a = ap + r * cols;
            float* o = op + r * cols;
            const float s = xs[r];
            int64_t c = 0;
#if defined(__AVX512F__)
            const __m512 sv = _mm512_set1_ps(s);
            for (; c + 16 <= cols; c += 16) {
                __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(a + c)), sv), _mm512_loadu_ps(ws + c));
                if (bp) v = _mm512_add_ps(v, _mm512_loadu_ps(bp + c));
                _mm512_storeu_ps(o + c, v);
            }
#endif
            for (; c < cols; ++c) {
                float v = static_cast<float>(a[c]) * s * ws[c];
                if (bp) v = v + bp[c];
                o[c] = v;
            }
        }
    });
    return out;
}

// Rows `ids` of the float weight an int8_linear weight stands for: weight (N, K) int8 or packed
// (N/16, K/4, 16, 4) uint8, quantized after rotate_weight (W H / block), with (N,) float32 scales
// -> (T, K) float32 = hadamard(q[id]) * scale[id], since (W H / block) H = W. A tied head's W8A8
// copy serves as the embedding table this way (weight_rows_reference in model/int8.py: the same
// values bit for bit; the transform of small integers is exact in float32).
at::Tensor int8_weight_rows(const at::Tensor& weight, const at::Tensor& w_scales, const at::Tensor& ids_in,
                            int64_t block) {
    const bool packed = weight.scalar_type() == at::kByte;
    TORCH_CHECK(packed ? weight.dim() == 4 && weight.size(2) == 16 && weight.size(3) == 4 && weight.is_contiguous()
                       : weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
                "weight: int8 (N, K) or packed uint8 (N/16, K/4, 16, 4)");
    const int64_t n = packed ? weight.size(0) * 16 : weight.size(0), k = packed ? weight.size(1) * 4 : weight.size(1);
    TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.numel() == n && w_scales.is_contiguous(),
                "weight scales: float32 (N,)");
    TORCH_CHECK(block >= 1 && (block & (block - 1)) == 0 && k % block == 0, "block: a power of two dividing K");
    const auto ids = ids_in.to(at::kLong).contiguous();
    TORCH_CHECK(ids.dim() == 1, "ids: (T,)");
    const int64_t rows = ids.size(0);
    const int64_t* ip = ids.data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(ip[r] >= 0 && ip[r] < n, "id ", ip[r], " out of range [0, ", n, ")");
    auto out = at::empty({rows, k}, w_scales.options());
    const float* sp = w_scales.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const int64_t id = ip[r];
            float* row = op + r * k;
            if (packed) {  // output id's 4 bytes of each K group sit at (id / 16, g, id % 16)
                const uint8_t* base = weight.data_ptr<uint8_t>() + (id / 16) * k * 16 + (id % 16) * 4;
                for (int64_t g = 0; g < k / 4; ++g)
                    for (int b = 0; b < 4; ++b) row[g * 4 + b] = static_cast<float>(static_cast<int32_t>(base[g * 64 + b]) - 128);
            } else {
                const int8_t* source = weight.data_ptr<int8_t>() + id * k;
                for (int64_t c = 0; c < k; ++c) row[c] = static_cast<float>(source[c]);
            }
            if (block > 1) hadamard(row, k, block);
            const float scale = sp[id];
            for (int64_t c = 0; c < k; ++c) row[c] = row[c] * scale;
        }
    });
    return out;
}
