// bf16 projections, y = x W^T + b, on CPUs with AVX512-BF16 dot products (vdpbf16ps) and no AMX
// tiles (model/weight_formats/floating.py, decoder.cpp's NativeLinear).
//
// The weight lives in panels of 32 outputs: (N/32, K/2, 32, 2), each pair of columns of 32 rows
// one 64-byte vector, the pairs in order, outputs and columns past the weight's zero. A step of one
// row then reads the whole weight front to back, one stream, and each vector is one vdpbf16ps into
// two accumulators' 16 outputs each after a broadcast of the row's pair: no sums across lanes.
// Larger steps keep up to 12 rows' accumulators for the panel (24 of the 32 registers), so each
// weight vector loaded serves 12 rows. It reads the weight 1.6-1.9x as fast as oneDNN's product on
// its own blocked layout at 1-8 rows, 1.2-1.4x at 16-64, and is about as fast on prompt chunks
// (bench/RESULTS.md, twenty-ninth sitting), in the same memory.
//
// x is rounded to bf16 (nearest even) and the products summed in float32: oneDNN's arithmetic,
// except that outputs stay float32 where oneDNN rounds them to bf16.
#include "aten.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <utility>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

std::optional<at::Tensor> float_bias(const std::optional<at::Tensor>& bias, int64_t n);  // int8_linear.cpp

namespace {

constexpr int64_t kPanel = 32;  // outputs per panel: two vectors of 16 float32 accumulators

// Where the panels of a weight with `pairs` pairs of columns hold its value [n, k].
inline int64_t panel_offset(int64_t n, int64_t k, int64_t pairs) {
    return (n / kPanel) * pairs * kPanel * 2 + (k / 2) * kPanel * 2 + (n % kPanel) * 2 + k % 2;
}

#if defined(__AVX512BF16__)
constexpr int kVectors = kPanel / 16;
constexpr int kMaxRows = 12;

// R rows of x (bf16, pairs of columns read as 32-bit words) by one panel: R x 32 outputs.
template <int R>
void tile(const uint32_t* x, int64_t ldx, const uint16_t* panel, int64_t pairs, float* y, int64_t ldy,
          int64_t cols, const float* bias) {
    __m512 acc[R][kVectors];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
        __m512bh w[kVectors];
        for (int v = 0; v < kVectors; ++v)
            w[v] = (__m512bh)_mm512_loadu_si512(panel + (p * kVectors + v) * 32);
        for (int r = 0; r < R; ++r) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * ldx + p]));
            for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xv, w[v]);
        }
    }
    for (int v = 0; v < kVectors; ++v) {
        const int64_t c = v * 16;
        if (c >= cols) break;
        const __mmask16 mask = cols - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (cols - c)) - 1);
        const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + c) : _mm512_setzero_ps();
        for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy + c, mask, _mm512_add_ps(acc[r][v], b));
    }
}

using Tile = void (*)(const uint32_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, int64_t, const float*);

template <int... Rs>
constexpr std::array<Tile, sizeof...(Rs)> tiles_of(std::integer_sequence<int, Rs...>) {
    return {tile<Rs + 1>...};
}

constexpr auto kTiles = tiles_of(std::make_integer_sequence<int, kMaxRows>());
#endif

// Panels as bf16_panels lays them out, of an (n_size, k_size) weight.
void check_panels(const at::Tensor& panels, int64_t n_size, int64_t k_size) {
    TORCH_CHECK(panels.dim() == 4 && panels.size(2) == kPanel && panels.size(3) == 2 &&
                panels.scalar_type() == at::kBFloat16 && panels.is_contiguous(), "panels: bf16_panels' layout");
    TORCH_CHECK((k_size + 1) / 2 == panels.size(1) && n_size > 0 && (n_size + kPanel - 1) / kPanel == panels.size(0),
                "the weight's N or K do not fit the panels");
}

}  // namespace

bool bf16_linear_supported() {
#if defined(__AVX512BF16__)
    return true;
#else
    return false;
#endif
}

// (N, K) bf16 -> panels (ceil(N/32), ceil(K/2), 32, 2), outputs and columns past the weight zero.
at::Tensor bf16_panels(const at::Tensor& weight_in) {
    TORCH_CHECK(weight_in.dim() == 2 && weight_in.scalar_type() == at::kBFloat16 && weight_in.device().is_cpu(),
                "weight: (N, K) bfloat16 on the CPU");
    const auto weight = weight_in.contiguous();
    const int64_t n_size = weight.size(0), k_size = weight.size(1);
    const int64_t panels = (n_size + kPanel - 1) / kPanel, pairs = (k_size + 1) / 2;
    auto out = at::zeros({panels, pairs, kPanel, 2}, weight.options());
    const uint16_t* src = reinterpret_cast<const uint16_t*>(weight.data_ptr());
    uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b)
            for (int64_t n = b * kPanel; n < std::min(n_size, (b + 1) * kPanel); ++n) {
                const uint16_t* row = src + n * k_size;
                for (int64_t k = 0; k < k_size; ++k) dst[panel_offset(n, k, pairs)] = row[k];
            }
    });
    return out;
}

// Rows `ids` of the (N, K) weight the panels hold, as float32 (T, K): a tied model's embeddings
// read from its head (model/linear.py's HeadEmbedding), the same values as the bf16 table it replaces.
at::Tensor bf16_panel_rows(const at::Tensor& panels, const at::Tensor& ids_in, int64_t n_size,
                           int64_t k_size) {
    check_panels(panels, n_size, k_size);
    const auto ids = ids_in.reshape({-1}).to(at::kLong).contiguous();
    const int64_t count = ids.numel(), pairs = panels.size(1);
    const int64_t* idp = ids.data_ptr<int64_t>();
    for (int64_t t = 0; t < count; ++t)
        TORCH_CHECK(idp[t] >= 0 && idp[t] < n_size, "id ", idp[t], " out of range for ", n_size, " rows");
    auto out = at::empty({count, k_size}, panels.options().dtype(at::kFloat));
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(panels.data_ptr());
    float* op = out.data_ptr<float>();
    at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
            const int64_t n = idp[t];
            float* row = op + t * k_size;
            for (int64_t k = 0; k < k_size; ++k) {
                const uint32_t bits = static_cast<uint32_t>(wp[panel_offset(n, k, pairs)]) << 16;
                std::memcpy(row + k, &bits, sizeof(float));  // bf16 -> float32: the high half, exactly
            }
        }
    });
    return out;
}

// x (..., K) float32 or bf16, panels of an (N, K) weight, bias (N,) or none -> (..., N) float32.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                       int64_t n_size) {
    const int64_t k_size = x.size(-1), pairs = panels.size(1);
    check_panels(panels, n_size, k_size);
    const auto b = float_bias(bias, n_size);
#if defined(__AVX512BF16__)
    // Rows of x in bf16, padded to whole pairs of columns (the panels' are zero past K).
    auto rows = x.reshape({-1, k_size}).to(at::kBFloat16);
    if (k_size % 2 != 0) rows = at::constant_pad_nd(rows, {0, 1});
    rows = rows.contiguous();
    const int64_t m_size = rows.size(0);
    auto y = at::empty({m_size, n_size}, x.options().dtype(at::kFloat));
    const float* bp = b ? b->data_ptr<float>() : nullptr;
    const uint32_t* xp = reinterpret_cast<const uint32_t*>(rows.data_ptr());
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(panels.data_ptr());
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
            const int64_t n = p * kPanel, cols = std::min<int64_t>(kPanel, n_size - n);
            for (int64_t m = 0; m < m_size; m += kMaxRows) {
                const int64_t count = std::min<int64_t>(kMaxRows, m_size - m);
                kTiles[count - 1](xp + m * pairs, pairs, wp + p * pairs * kPanel * 2, pairs, yp + m * n_size + n,
                                  n_size, cols, bp != nullptr ? bp + n : nullptr);
            }
        }
    });
    auto sizes = x.sizes().vec();
    sizes.back() = n_size;
    return y.view(sizes);
#else
    // The same values without the instructions: the weight unpacked, the product in float32.
    auto weight = panels.permute({0, 2, 1, 3}).reshape({-1, pairs * 2}).narrow(0, 0, n_size).narrow(1, 0, k_size);
    return at::linear(x.to(at::kBFloat16).to(at::kFloat), weight.to(at::kFloat), b);
#endif
}
