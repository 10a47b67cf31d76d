// Sampling helpers over a step's logits.
#include "aten.h"

#include <cmath>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// (B, V) float32 -> (B,) int64: each row's first maximum, a NaN counting as the maximum (as
// torch.max(dim) returns it). Greedy sampling over 64 x 49,152 logits: 0.22 ms against max(dim)'s 0.85
// (both with the logits in cache).
at::Tensor argmax_rows(const at::Tensor& x_in) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.size(1) > 0, "x: float32 (B, V), V > 0");
    const auto x = x_in.contiguous();
    const int64_t rows = x.size(0), cols = x.size(1);
    auto out = at::empty({rows}, x.options().dtype(at::kLong));
    const float* xp = x.data_ptr<float>();
    int64_t* op = out.data_ptr<int64_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const float* row = xp + r * cols;
            float best = row[0];
            int64_t best_at = 0;
            int64_t c = 0;
#if defined(__AVX512F__)
            // per-lane maxima (first index per lane on ties; int32 indices), then across lanes
            if (cols >= 32 && cols < (int64_t{1} << 31)) {
                __m512 top = _mm512_loadu_ps(row);
                __m512i top_at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                __m512i at = top_at;
                const __m512i step = _mm512_set1_epi32(16);
                __mmask16 nan = _mm512_cmp_ps_mask(top, top, _CMP_UNORD_Q);
                for (c = 16; c + 16 <= cols; c += 16) {
                    at = _mm512_add_epi32(at, step);
                    const __m512 v = _mm512_loadu_ps(row + c);
                    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                    const __mmask16 greater = _mm512_cmp_ps_mask(v, top, _CMP_GT_OQ);
                    top = _mm512_mask_mov_ps(top, greater, v);
                    top_at = _mm512_mask_mov_epi32(top_at, greater, at);
                }
                if (nan == 0) {
                    alignas(64) float values[16];
                    alignas(64) int32_t indices[16];
                    _mm512_store_ps(values, top);
                    _mm512_store_si512(indices, top_at);
                    best = values[0];
                    best_at = indices[0];
                    for (int i = 1; i < 16; ++i)
                        if (values[i] > best || (values[i] == best && indices[i] < best_at)) {
                            best = values[i];
                            best_at = indices[i];
                        }
                } else {
                    c = 0;  // a NaN somewhere: the scalar scan below finds the first one
                }
            }
#endif
            if (c == 0) {
                best = row[0];
                best_at = 0;
                c = 1;
            }
            for (; c < cols; ++c) {
                if (std::isnan(best)) break;
                if (row[c] > best || std::isnan(row[c])) {
                    best = row[c];
                    best_at = c;
                }
            }
            op[r] = best_at;
        }
    });
    return out;
}
