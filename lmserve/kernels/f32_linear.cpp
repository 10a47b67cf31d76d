// float32 projections, y = x W^T + b, the `float32` path's every product (model/weight_formats/
// floating.py, and decoder.cpp's NativeLinear).
//
// Batch-invariant by construction: each output is one dot product of a row of x and a row of W,
// summed in 16 lanes over K in order (fused multiply-adds, the last partial vector masked), then
// across the lanes by _mm512_reduce_add_ps, then plus the bias. Nothing in that depends on how many
// rows the step has, which tile a row falls in, or which thread computes it, so a row's outputs are
// the same bits in a step of 1 row or of 512. It also reads the weights of a step of few rows
// about twice as fast as the library product it replaces (at::linear), and is no slower on prompt
// chunks (bench/RESULTS.md, twenty-eighth sitting).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <optional>
#include <utility>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
namespace {

// R rows of x by C rows of W: R x C outputs, each a dot product over the K columns.
template <int R, int C>
void tile(const float* x, const float* w, int64_t k_size, float* y, int64_t ldy, const float* bias) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= k_size; k += 16) {
        __m512 wv[C];
        for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_ps(w + c * k_size + k);
        for (int r = 0; r < R; ++r) {
            const __m512 xv = _mm512_loadu_ps(x + r * k_size + k);
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    if (k < k_size) {  // the same multiply-adds, the lanes past K zero (masked loads in the loop above halve its speed)
        const __mmask16 mask = __mmask16((1u << (k_size - k)) - 1);
        __m512 wv[C];
        for (int c = 0; c < C; ++c) wv[c] = _mm512_maskz_loadu_ps(mask, w + c * k_size + k);
        for (int r = 0; r < R; ++r) {
            const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * k_size + k);
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) {
            const float sum = _mm512_reduce_add_ps(acc[r][c]);
            y[r * ldy + c] = bias != nullptr ? sum + bias[c] : sum;
        }
}

using Tile = void (*)(const float*, const float*, int64_t, float*, int64_t, const float*);

template <int R, int... C>
constexpr std::array<Tile, sizeof...(C)> row_of_tiles(std::integer_sequence<int, C...>) {
    return {tile<R, C + 1>...};
}

// Tiles of up to R rows by C outputs, the remainders' smaller ones included: tiles[r - 1][c - 1].
template <int R, int C>
struct Tiles {
    std::array<std::array<Tile, C>, R> table;
    constexpr Tiles() : table(make(std::make_integer_sequence<int, R>())) {}
    template <int... Rs>
    static constexpr std::array<std::array<Tile, C>, R> make(std::integer_sequence<int, Rs...>) {
        return {row_of_tiles<Rs + 1>(std::make_integer_sequence<int, C>())...};
    }
};

// The tile shape only orders the work (which weights stay in registers while which rows pass):
// one row, eight outputs at a time keep more of the weight's rows streaming; larger steps reuse
// each weight vector over five rows (5 x 5: 25 accumulators, 31 of the 32 registers; the fastest
// of the shapes tried, bench/RESULTS.md).
template <int R, int C>
void product(const float* x, const float* w, const float* bias, float* y, int64_t m_size, int64_t n_size,
             int64_t k_size) {
    static constexpr Tiles<R, C> tiles;
    const int64_t blocks = (n_size + C - 1) / C;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
            const int64_t n = b * C, cols = std::min<int64_t>(C, n_size - n);
            for (int64_t m = 0; m < m_size; m += R) {
                const int64_t rows = std::min<int64_t>(R, m_size - m);
                tiles.table[rows - 1][cols - 1](x + m * k_size, w + n * k_size, k_size, y + m * n_size + n, n_size,
                                                bias != nullptr ? bias + n : nullptr);
            }
        }
    });
}

}  // namespace
#endif

bool f32_linear_supported() {
#if defined(__AVX512F__)
    return true;
#else
    return false;
#endif
}

// x (..., K) float32, weight (N, K) float32, bias (N,) float32 or none -> (..., N) float32;
// at::linear where the kernel does not run (no AVX-512, other dtypes or layouts).
torch::Tensor f32_linear(const torch::Tensor& x, const torch::Tensor& weight,
                         const std::optional<torch::Tensor>& bias) {
#if defined(__AVX512F__)
    const bool plain = x.scalar_type() == at::kFloat && x.device().is_cpu() && weight.scalar_type() == at::kFloat &&
                       weight.dim() == 2 && weight.is_contiguous() && weight.size(1) > 0 &&
                       x.size(-1) == weight.size(1) &&
                       (!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous()));
    if (plain) {
        const int64_t k_size = weight.size(1), n_size = weight.size(0);
        const auto rows = x.reshape({-1, k_size}).contiguous();
        const int64_t m_size = rows.size(0);
        auto y = torch::empty({m_size, n_size}, x.options());
        const float* b = bias ? bias->data_ptr<float>() : nullptr;
        const float* xp = rows.data_ptr<float>();
        const float* wp = weight.data_ptr<float>();
        if (m_size <= 2)
            product<1, 8>(xp, wp, b, y.data_ptr<float>(), m_size, n_size, k_size);
        else
            product<5, 5>(xp, wp, b, y.data_ptr<float>(), m_size, n_size, k_size);
        auto sizes = x.sizes().vec();
        sizes.back() = n_size;
        return y.view(sizes);
    }
#endif
    return at::linear(x, weight, bias);
}
