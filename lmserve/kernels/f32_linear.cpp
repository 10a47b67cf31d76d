// float32 projections, y = x W^T + b, the `float32` path's every product (model/weight_formats/
// floating.py, and decoder.cpp's NativeLinear).
//
// Batch-invariant by construction: each output is one dot product of a row of x and a row of W,
// summed in 16 lanes over K in order (8 on AVX2; fused multiply-adds, the last partial vector
// masked), then across the lanes in a fixed order, then plus the bias. Nothing in that depends on how many
// rows the step has, which tile a row falls in, or which thread computes it, so a row's outputs are
// the same bits in a step of 1 row or of 512. It also reads the weights of a step of few rows
// about twice as fast as the library product it replaces (at::linear), and is no slower on prompt
// chunks (bench/RESULTS.md, twenty-eighth sitting).
#include "aten.h"

#include <algorithm>
#include <array>
#include <optional>
#include <utility>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define LMSERVE_F32_LINEAR 1
#endif

#include "avx2_fold.h"

#if defined(LMSERVE_F32_LINEAR)
namespace {

// The vector the tiles sum in: 16 lanes on AVX-512, 8 on AVX2.
#if defined(__AVX512F__)
struct Lanes {
    using V = __m512;
    static constexpr int64_t kWidth = 16;
    static V zero() { return _mm512_setzero_ps(); }
    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static V load_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p); }
    static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
// one row, eight outputs at a time keep more of the weight's rows streaming; larger steps reuse
// each weight vector over five rows (5 x 5: 25 accumulators, 31 of the 32 registers; the fastest
// of the shapes tried, bench/RESULTS.md)
constexpr int kFewRows[2] = {1, 8}, kManyRows[2] = {5, 5};
#else
struct Lanes {
    using V = __m256;
    static constexpr int64_t kWidth = 8;
    static V zero() { return _mm256_setzero_ps(); }
    static V load(const float* p) { return _mm256_loadu_ps(p); }
    static V load_first(const float* p, int64_t n) {
        return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    }
    static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static float sum(V v) { return avx2_fold::fold(v, avx2_fold::add); }
};
// 16 registers: 1 x 6 (6 accumulators, 6 weight vectors) and 3 x 3 (9, 3)
constexpr int kFewRows[2] = {1, 6}, kManyRows[2] = {3, 3};
#endif

// R rows of x by C rows of W: R x C outputs, each a dot product over the K columns.
template <int R, int C>
void tile(const float* x, const float* w, int64_t k_size, float* y, int64_t ldy, const float* bias) {
    using V = Lanes::V;
    constexpr int64_t kWidth = Lanes::kWidth;
    V acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = Lanes::zero();
    int64_t k = 0;
    for (; k + kWidth <= k_size; k += kWidth) {
        V wv[C];
        for (int c = 0; c < C; ++c) wv[c] = Lanes::load(w + c * k_size + k);
        for (int r = 0; r < R; ++r) {
            const V xv = Lanes::load(x + r * k_size + k);
            for (int c = 0; c < C; ++c) acc[r][c] = Lanes::fmadd(xv, wv[c], acc[r][c]);
        }
    }
    if (k < k_size) {  // the same multiply-adds, the lanes past K zero (masked loads in the loop above halve its speed)
        V wv[C];
        for (int c = 0; c < C; ++c) wv[c] = Lanes::load_first(w + c * k_size + k, k_size - k);
        for (int r = 0; r < R; ++r) {
            const V xv = Lanes::load_first(x + r * k_size + k, k_size - k);
            for (int c = 0; c < C; ++c) acc[r][c] = Lanes::fmadd(xv, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) {
            const float sum = Lanes::sum(acc[r][c]);
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
// kFewRows and kManyRows above.
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
#if defined(LMSERVE_F32_LINEAR)
    return true;
#else
    return false;
#endif
}

// x (..., K) float32, weight (N, K) float32, bias (N,) float32 or none -> (..., N) float32;
// at::linear where the kernel does not run (neither AVX-512 nor AVX2, other dtypes or layouts).
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias) {
#if defined(LMSERVE_F32_LINEAR)
    const bool plain = x.scalar_type() == at::kFloat && x.device().is_cpu() && weight.scalar_type() == at::kFloat &&
                       weight.dim() == 2 && weight.is_contiguous() && weight.size(1) > 0 &&
                       x.size(-1) == weight.size(1) &&
                       (!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous()));
    if (plain) {
        const int64_t k_size = weight.size(1), n_size = weight.size(0);
        const auto rows = x.reshape({-1, k_size}).contiguous();
        const int64_t m_size = rows.size(0);
        auto y = at::empty({m_size, n_size}, x.options());
        const float* b = bias ? bias->data_ptr<float>() : nullptr;
        const float* xp = rows.data_ptr<float>();
        const float* wp = weight.data_ptr<float>();
        if (m_size <= 2)
            product<kFewRows[0], kFewRows[1]>(xp, wp, b, y.data_ptr<float>(), m_size, n_size, k_size);
        else
            product<kManyRows[0], kManyRows[1]>(xp, wp, b, y.data_ptr<float>(), m_size, n_size, k_size);
        auto sizes = x.sizes().vec();
        sizes.back() = n_size;
        return y.view(sizes);
    }
#endif
    return at::linear(x, weight, bias);
}
