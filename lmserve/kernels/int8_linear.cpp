// Projections with int8 weights and int8 activations (W8A8): each row of the input is quantized
// symmetrically to int8 with its own scale, multiplied by the int8 weight with int32 accumulation
// (oneDNN's VNNI kernels behind at::_int_mm: ~1.7x bf16's speed at 64 rows), and the int32 sums are
// scaled back to float32. The arithmetic is the one lmserve/model/int8.py spells out in ATen ops,
// step for step, so both give the same results bit for bit (this file is built with
// -ffp-contract=off: no fused multiply-adds where the ATen ops round twice).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr float kMinAbsMax = 1e-12f;  // MIN_ABS_MAX in model/int8.py: an all-zero row gets a finite scale

}  // namespace

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
    for (; h < block; h *= 2)
        for (int64_t j = 0; j < cols; j += 2 * h)
            for (int64_t i = j; i < j + h; ++i) {
                const float a = row[i], b = row[i + h];
                row[i] = a + b;
                row[i + h] = a - b;
            }
}

// x (M, K) float32 -> (M, K) int8 and (M,) float32 scales: x ~ q * scale, scale = max|x| / 127,
// after a Walsh-Hadamard transform of each `block` values (block 1: none), which spreads a few large
// channels over their block so that one per-row scale fits every value of the row.
std::tuple<torch::Tensor, torch::Tensor> quantize_rows(const torch::Tensor& x_in, int64_t block) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x: float32 (M, K)");
    TORCH_CHECK(block >= 1 && (block & (block - 1)) == 0 && x_in.size(1) % block == 0, "block: a power of two dividing K");
    const auto x = x_in.contiguous();
    const int64_t rows = x.size(0), cols = x.size(1);
    auto q = torch::empty({rows, cols}, x.options().dtype(at::kChar));
    auto scales = torch::empty({rows}, x.options());
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
            int8_t* out = qp + r * cols;
            float top = 0.f;
            int64_t c = 0;
#if defined(__AVX512F__)
            __m512 topv = _mm512_setzero_ps();
            for (; c + 16 <= cols; c += 16) topv = _mm512_max_ps(topv, _mm512_abs_ps(_mm512_loadu_ps(row + c)));
            top = _mm512_reduce_max_ps(topv);
#endif
            for (; c < cols; ++c) top = std::max(top, std::fabs(row[c]));
            const float scale = std::max(top, kMinAbsMax) / 127.f;
            sp[r] = scale;
            c = 0;
#if defined(__AVX512F__)
            const __m512 sv = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
            for (; c + 16 <= cols; c += 16) {
                __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(row + c), sv),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
            }
#endif
            for (; c < cols; ++c)  // nearbyint: round half to even, as torch.round
                out[c] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(row[c] / scale))));
        }
    });
    return {q, scales};
}

// x (M, K) float32, weight (N, K) int8 with (N,) float32 scales, bias (N,) float32 or none
// -> (M, N) float32 = (int32 sums * x_scale[m]) * w_scale[n] (+ bias[n]). The weight was quantized
// after the same blockwise transform (and its 1/block), so the transforms cancel in the product.
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& w_scales,
                          const std::optional<torch::Tensor>& bias, int64_t block) {
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "weight: int8 (N, K)");
    TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.numel() == weight.size(0) && w_scales.is_contiguous(),
                "weight scales: float32 (N,)");
    TORCH_CHECK(x.size(-1) == weight.size(1), "x and weight: the same K");
    auto [xq, x_scales] = quantize_rows(x, block);
    const auto sums = at::_int_mm(xq, weight.t());  // (M, N) int32
    const int64_t rows = sums.size(0), cols = sums.size(1);
    auto out = torch::empty({rows, cols}, x.options());
    std::optional<torch::Tensor> b;
    if (bias) {
        b = bias->to(at::kFloat).contiguous();
        TORCH_CHECK(b->numel() == cols, "bias: (N,)");
    }
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
