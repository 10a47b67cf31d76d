// The decoder layers of a step on the CPU, run from C++: the same operations in the same order as
// lmserve/model/llama.py and model/attention.py, ATen ops or the native kernels both call (so the
// same results, bit for bit), without ~50
// Python-level op calls per layer. At a few sequences a step is dominated by that dispatch, not by
// arithmetic, and steps that carry a prompt chunk beside many decodes are as common as decode-only ones.
#include <torch/csrc/utils/pybind.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#include <ATen/core/dispatch/Dispatcher.h>
#include "aten.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "int8_rows.h"
#include "paged_attention_rows.h"  // exp16
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& w_scales,
                       const std::optional<at::Tensor>& bias, int64_t block, const std::string& path);
std::string int8_linear_path(int64_t rows, int64_t k);
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, int64_t block);
at::Tensor int8_weight_rows(const at::Tensor& weight, const at::Tensor& w_scales, const at::Tensor& ids,
                            int64_t block);
bool int8_packed_supported();
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scales,
                       const at::Tensor& w_lows, const std::optional<at::Tensor>& bias, const std::string& path);
at::Tensor int4_pairs_linear(const at::Tensor& x, const at::Tensor& pairs,
                             const std::optional<at::Tensor>& bias);
void int4_pairs_linear_add(const at::Tensor& x, const at::Tensor& pairs, const std::optional<at::Tensor>& bias,
                           at::Tensor& out);
at::Tensor pack_int4_pairs(const at::Tensor& packed, const at::Tensor& w_scales,
                           const at::Tensor& w_lows);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_groups(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4_groups(const at::Tensor& weight);
at::Tensor pack_int4(const at::Tensor& q);
std::tuple<at::Tensor, at::Tensor> rotated_int8(const at::Tensor& weight, int64_t block);
bool int4_linear_supported();
bool int4_quantize_supported();
bool int4_tiles_supported();
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
bool f32_linear_supported();
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                       int64_t n_size);
at::Tensor bf16_panels(const at::Tensor& weight);
at::Tensor bf16_panel_rows(const at::Tensor& panels, const at::Tensor& ids, int64_t n_size, int64_t k_size);
bool bf16_linear_supported();
bool int4_bf16_tiles_supported();
bool prompt_attention_supported(const at::Tensor& k_cache, int64_t num_heads);
bool prompt_attention_chosen(const at::Tensor& k_cache, int64_t num_heads, int64_t query_rows,
                             bool after_context);
bool amx_bf16_usable();
at::Tensor paged_prompt_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& slots, double scale);
at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);
std::string int4_linear_path(int64_t rows);
bool int4_rows_alike(int64_t a, int64_t b);
at::Tensor argmax_rows(const at::Tensor& x);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                  const at::Tensor& context_lens, int64_t block_size, double scale,
                                  bool share_prefixes);
bool decode_shares_prefixes(const at::Tensor& k_cache, int64_t num_heads, const at::Tensor& block_table,
                            const at::Tensor& context_lens, int64_t block_size);

namespace {

constexpr int64_t kInt4Group = 32;  // INT4_GROUP in model/int8.py

enum Narrow : int64_t { kNone = 0, kInt8 = 1, kInt4 = 2 };
enum Layout : int64_t { kPlain = 0, kOneDNN = 1, kPanels = 2 };  // a float weight's (model/weight_formats/floating.py)

// One projection as model/llama.py's Linear holds it.
struct NativeLinear {
    at::Tensor weight;  // plain (N, K), oneDNN-packed or bf16 panels (Layout); undefined once quantized
    std::optional<at::Tensor> bias;
    int64_t layout;  // Layout
    int64_t outputs;  // N, for panels (their shape rounds it up)
    int64_t narrow;  // Narrow
    at::Tensor narrow_weight, narrow_scales;
    int64_t small_step_tokens;  // steps of at most this many tokens use the narrow copy
    at::Tensor wide_weight, wide_scales;  // int8 (N, K) or packed, float32 (N,): larger steps, int8 activations
    int64_t wide_block;  // Hadamard block of the wide weight's columns (model/int8.py)
    // W4A8 for every step (int4_linear.cpp), or undefined; scales and lows undefined in the pairs layout
    at::Tensor int4_weight, int4_scales, int4_lows;

    at::Tensor operator()(const at::Tensor& x) const {
        if (int4_weight.defined()) {  // float32 rows in and out; the decoder's are (no cast: ~240 calls a step)
            const bool as_is = x.scalar_type() == at::kFloat;
            const auto rows = as_is ? x : x.to(at::kFloat);
            auto out = int4_scales.defined() ? int4_linear(rows, int4_weight, int4_scales, int4_lows, bias, "auto")
                                             : int4_pairs_linear(rows, int4_weight, bias);
            return as_is ? out : out.to(x.scalar_type());
        }
        if (narrow != kNone && x.size(0) <= small_step_tokens) {
            auto xb = x.to(at::kBFloat16).contiguous();
            auto out = narrow == kInt4 ? at::_weight_int4pack_mm_for_cpu(xb, narrow_weight, kInt4Group, narrow_scales)
                                       : at::_weight_int8pack_mm(xb, narrow_weight, narrow_scales);
            if (bias) out = out + *bias;
            return out.to(x.scalar_type());
        }
        if (wide_weight.defined()) return int8_linear(x.to(at::kFloat), wide_weight, wide_scales, bias, wide_block, "auto").to(x.scalar_type());
        if (layout == kPanels) return bf16_linear(x, weight, bias, outputs).to(x.scalar_type());
        if (layout == kOneDNN) {
            static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
            std::vector<c10::IValue> stack{x.to(weight.scalar_type()), weight,
                                           bias ? c10::IValue(*bias) : c10::IValue(),
                                           c10::IValue(std::string("none")),
                                           c10::IValue(c10::List<std::optional<c10::Scalar>>({std::nullopt})),
                                           c10::IValue(std::string(""))};
            op.callBoxed(&stack);
            return stack[0].toTensor().to(x.scalar_type());
        }
        if (weight.scalar_type() == at::kFloat) return f32_linear(x.to(at::kFloat), weight, bias).to(x.scalar_type());
        return at::linear(x.to(weight.scalar_type()), weight, bias).to(x.scalar_type());
    }

    // target += (*this)(x), bit for bit: a W4A8 pairs weight adds into float32 rows as it stores them
    // (no product tensor, no ATen add: two of each a layer; one-row steps 1.5% faster on SmolLM2).
    void add_to(const at::Tensor& x, at::Tensor& target) const {
        if (int4_weight.defined() && !int4_scales.defined() && x.scalar_type() == at::kFloat &&
            target.scalar_type() == at::kFloat && target.is_contiguous())
            int4_pairs_linear_add(x, int4_weight, bias, target);
        else
            target.add_((*this)(x));
    }
};

// x (M, H) float32 -> x * (1 / sqrt(mean(x^2) + eps)) * weight, row by row: each row's sum of
// squares in 16 float32 lanes, then one reduction. One pass and one call where ATen's rms_norm is
// ~5 ops (8-16 us a call from Python at 1-64 rows against 0.8-4; 61 calls a step). model/llama.py's RMSNorm calls this too
// (through rms_norm below), so its layers and these give the same results; against F.rms_norm they agree
// to float32 rounding (a test holds them to that).
at::Tensor rms_norm_rows(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x: float32 (M, H)");
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x_in.size(1),
                "weight: float32 (H,)");
    const auto x = x_in.contiguous();
    const int64_t rows = x.size(0), cols = x.size(1);
    auto out = at::empty_like(x);
    const float* xp = x.data_ptr<float>();
    const float* wp = weight.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float epsilon = static_cast<float>(eps);
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const float* row = xp + r * cols;
            float* o = op + r * cols;
            float squares = 0.f;
            int64_t c = 0;
#if defined(__AVX512F__)
            __m512 acc = _mm512_setzero_ps();
            for (; c + 16 <= cols; c += 16) {
                const __m512 v = _mm512_loadu_ps(row + c);
                acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
            }
            squares = _mm512_reduce_add_ps(acc);
#endif
            for (; c < cols; ++c) squares += row[c] * row[c];
            const float inv = 1.f / std::sqrt(squares / static_cast<float>(cols) + epsilon);
            c = 0;
#if defined(__AVX512F__)
            const __m512 iv = _mm512_set1_ps(inv);
            for (; c + 16 <= cols; c += 16)
                _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(row + c), iv), _mm512_loadu_ps(wp + c)));
#endif
            for (; c < cols; ++c) o[c] = row[c] * inv * wp[c];
        }
    });
    return out;
}

namespace {

// rms_norm_rows for float32 rows and weight, ATen's rms_norm otherwise. Bound as `rms_norm`:
// model/llama.py's RMSNorm calls it on the CPU too, so the rule is written once.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
    if (weight.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && x.dim() == 2)
        return rms_norm_rows(x, weight, eps);
    return at::rms_norm(x, {x.size(-1)}, weight, eps);
}

}  // namespace

// silu(gate) * up for rows of [gate | up] (T, 2I) float32 -> (T, I): one pass where ATen's silu
// and mul are two with a (T, I) tensor between them (7% of a 2,000-token prefill on the
// Qwen2-0.5B shape, bench/RESULTS.md). silu(g) = g / (1 + exp(-g)), exp as exp16 computes it (a
// relative error of ~2e-7 where ATen's Sleef exp has ~1e-7): model/llama.py's MLP calls this too
// (through silu_mul below), so its layers and these give the same results.
at::Tensor silu_mul_rows(const at::Tensor& gate_up_in) {
    TORCH_CHECK(gate_up_in.device().is_cpu() && gate_up_in.dim() == 2 && gate_up_in.scalar_type() == at::kFloat &&
                gate_up_in.size(1) % 2 == 0, "gate_up: float32 (T, 2I) on the CPU");
    const auto gate_up = gate_up_in.contiguous();
    const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
    auto out = at::empty({rows, width}, gate_up.options());
    const float* src = gate_up.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(width, 1));  // ATen's, in rows
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const float* g = src + r * 2 * width;
            const float* u = g + width;
            float* o = dst + r * width;
            int64_t c = 0;
#if defined(__AVX512F__)
            const __m512 one = _mm512_set1_ps(1.f), below = _mm512_set1_ps(-88.3f), inf = _mm512_set1_ps(INFINITY);
            for (; c + 16 <= width; c += 16) {
                const __m512 gv = _mm512_loadu_ps(g + c);
                // exp16 clamps its argument at 88.3: below -88.3 the denominator is taken as infinite, so
                // silu is -0 (its exact value is under 4e-37 in magnitude) and NaN for -inf, as ATen's
                const __m512 denominator = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(gv, below, _CMP_LT_OQ),
                                                                _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))), inf);
                const __m512 silu = _mm512_div_ps(gv, denominator);
                _mm512_storeu_ps(o + c, _mm512_mul_ps(silu, _mm512_loadu_ps(u + c)));
            }
#endif
            for (; c < width; ++c) o[c] = g[c] / (1.f + std::exp(-g[c])) * u[c];
        }
    });
    return out;
}

namespace {

// silu_mul_rows for float32 rows, ATen's silu and mul otherwise. Bound as `silu_mul`.
at::Tensor silu_mul(const at::Tensor& gate_up) {
    if (gate_up.scalar_type() == at::kFloat && gate_up.dim() == 2) return silu_mul_rows(gate_up);
    const auto halves = gate_up.chunk(2, -1);
    return at::silu(halves[0]) * halves[1];
}

// weights/gguf_blocks.py's dequantization, the same float32 operations in the same order (so the
// gguf package's values bit for bit): (blocks, type size) uint8 of GGML type Q4_0 (2), Q4_1 (3) or
// Q8_0 (8) -> (blocks, 32) float32. A block's first 16 values are its bytes' low nibbles.
at::Tensor gguf_dequantize(const at::Tensor& blocks, int64_t qtype) {
    const int64_t type_size = qtype == 2 ? 18 : qtype == 3 ? 20 : qtype == 8 ? 34 : 0;
    TORCH_CHECK(type_size > 0, "GGML type: Q4_0 (2), Q4_1 (3) or Q8_0 (8)");
    TORCH_CHECK(blocks.dim() == 2 && blocks.size(1) == type_size && blocks.scalar_type() == at::kByte &&
                blocks.is_contiguous(), "blocks: contiguous uint8 (n, ", type_size, ")");
    auto out = at::empty({blocks.size(0), 32}, blocks.options().dtype(at::kFloat));
    const uint8_t* in = blocks.data_ptr<uint8_t>();
    float* op = out.data_ptr<float>();
    const auto half_at = [](const uint8_t* p) {
        uint16_t bits;
        std::memcpy(&bits, p, sizeof(bits));
        return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
    };
    at::parallel_for(0, blocks.size(0), 2048, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const uint8_t* b = in + i * type_size;
            float* o = op + i * 32;
            const float d = half_at(b);
            if (qtype == 8) {
                for (int j = 0; j < 32; ++j) o[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
            } else if (qtype == 3) {
                const float m = half_at(b + 2);
                for (int j = 0; j < 16; ++j) {
                    o[j] = static_cast<float>(b[4 + j] & 0x0F) * d + m;
                    o[j + 16] = static_cast<float>(b[4 + j] >> 4) * d + m;
                }
            } else {
                for (int j = 0; j < 16; ++j) {
                    o[j] = (static_cast<float>(b[2 + j] & 0x0F) - 8.f) * d;
                    o[j + 16] = (static_cast<float>(b[2 + j] >> 4) - 8.f) * d;
                }
            }
        }
    });
    return out;
}

}  // namespace

struct NativeLayer {
    NativeLinear qkv, o, gate_up, down;
    at::Tensor input_norm, post_attention_norm;
};

template <typename T>
void store_row(const float* src, T* dst, int64_t n) {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d]);  // float -> bf16/half: round to nearest even, as .to()
}

// An int8 cache row: n values and then their scale's 4 bytes (int8_rows.h), as quantize_rows in
// model/attention.py computes them.
template <>
void store_row<int8_t>(const float* src, int8_t* dst, int64_t n) {
    const float scale = quantize_row(src, dst, n);
    std::memcpy(dst + n, &scale, sizeof(scale));
}

// The attention inputs of a step from its q/k/v projection, in one pass instead of ~14 ATen ops:
// q and k rotated exactly as apply_rotary in model/rope.py computes them (x * cos, rotated * sin and
// their sum each rounded once: this file is built without FMA contraction), k and v written to
// their cache slots (checked by the caller) in the cache's dtype as write_kv's index_copy_ after
// .to() does. Returns q (n, H, D) and k (n, Hkv, D).
template <typename T>
std::pair<at::Tensor, at::Tensor> rope_and_cache(const at::Tensor& qkv, const at::Tensor& cos,
                                                 const at::Tensor& sin, int64_t heads, int64_t kv_heads,
                                                 int64_t dim, const at::Tensor& slots,
                                                 const at::Tensor& k_cache, const at::Tensor& v_cache) {
    const int64_t n = qkv.size(0), width = qkv.size(1), half = dim / 2, num_slots = k_cache.size(1);
    const int64_t stride = row_stride<T>(dim);  // an int8 row ends with its scale
    TORCH_CHECK(qkv.is_contiguous() && width == (heads + 2 * kv_heads) * dim, "qkv: contiguous (n, (H + 2 Hkv) D)");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                k_cache.size(0) == kv_heads && k_cache.size(2) == stride, "caches: contiguous (Hkv, slots, D)");
    TORCH_CHECK(slots.numel() == n && cos.numel() == n * dim && sin.numel() == n * dim, "one slot and angle row per token");
    auto q = at::empty({n, heads, dim}, qkv.options());
    auto k = at::empty({n, kv_heads, dim}, qkv.options());
    const float* src = qkv.data_ptr<float>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    float* qp = q.data_ptr<float>();
    float* kp = k.data_ptr<float>();
    T* kc = k_cache.data_ptr<T>();
    T* vc = v_cache.data_ptr<T>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
            const float* row = src + t * width;
            const float* c = cp + t * dim;
            const float* s = sp + t * dim;
            const auto rope = [&](const float* x, float* out) {
                for (int64_t d = 0; d < half; ++d) {
                    const float a = x[d] * c[d], b = -x[d + half] * s[d];
                    out[d] = a + b;
                }
                for (int64_t d = half; d < dim; ++d) {
                    const float a = x[d] * c[d], b = x[d - half] * s[d];
                    out[d] = a + b;
                }
            };
            for (int64_t h = 0; h < heads; ++h) rope(row + h * dim, qp + (t * heads + h) * dim);
            for (int64_t h = 0; h < kv_heads; ++h) {
                float* kr = kp + (t * kv_heads + h) * dim;
                rope(row + (heads + h) * dim, kr);
                store_row(kr, kc + (h * num_slots + slot[t]) * stride, dim);
                store_row(row + (heads + kv_heads + h) * dim, vc + (h * num_slots + slot[t]) * stride, dim);
            }
        }
    });
    return {q, k};
}

// One sequence's chunk of prompt tokens in a step (PrefillSeq in model/attention.py): the rows
// [query_start, query_start + query_len), attending to context_len tokens; slot_ids holds the cache
// slots of the whole context when the chunk is not the whole of it.
using Prefill = std::tuple<int64_t, int64_t, int64_t, std::optional<at::Tensor>>;

// _gather in model/attention.py (an int8 row widened and times its scale)
at::Tensor gather(const at::Tensor& cache_part, const at::Tensor& slots, at::ScalarType dtype) {
    auto rows = cache_part.index_select(1, slots.reshape(-1));
    if (cache_part.scalar_type() == at::kChar) {
        const int64_t dim = cache_part.size(2) - kScaleBytes;
        const auto scales = rows.narrow(2, dim, kScaleBytes).contiguous().view(at::kFloat);  // (Hkv, n, 1)
        return (rows.narrow(2, 0, dim).to(at::kFloat) * scales).to(dtype);
    }
    return rows.to(dtype).view({cache_part.size(0), slots.numel(), cache_part.size(2)});
}

// The dtype prefill attention computes in: the cache's, bfloat16 for int8 rows (as for a bf16 cache).
at::ScalarType attention_dtype(const at::Tensor& cache_part) {
    return cache_part.scalar_type() == at::kChar ? at::kBFloat16 : cache_part.scalar_type();
}

// How a chunk's attention runs in every layer of a step, decided once per step: the prompt attention
// kernels (prompt_attention_chosen in kernels/prompt_attention.cpp, asked as paged_attention in
// model/attention.py asks it), or PyTorch's with the causal mask of a chunk that attends to earlier
// context (_prefill_attention's; none for a chunk that is the whole of its context).
struct ChunkPlan {
    bool kernel;
    std::optional<at::Tensor> mask;
};

ChunkPlan chunk_plan(const Prefill& seq, const std::vector<at::Tensor>& k_caches, int64_t num_heads,
                     const at::TensorOptions& options) {
    const auto& [query_start, query_len, context_len, slot_ids] = seq;
    if (!k_caches.empty() && prompt_attention_chosen(k_caches[0], num_heads, query_len, slot_ids.has_value()))
        return {true, std::nullopt};  // the kernel masks as it goes
    if (!slot_ids) return {false, std::nullopt};
    return {false, at::ones({query_len, context_len}, options.dtype(at::kBool)).tril(context_len - query_len)};
}

// A prefill chunk's attention as paged_attention in model/attention.py takes it, op for op: the
// prompt attention kernels where the step's plan has them, else _prefill_attention's ops with the
// plan's mask.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& k_cache, const at::Tensor& v_cache, const Prefill& seq,
                             const ChunkPlan& plan, double scale) {
    const auto& slot_ids = std::get<3>(seq);
    const auto& mask = plan.mask;
    if (plan.kernel)
        return (slot_ids ? paged_prompt_attention(q.to(at::kFloat), k_cache, v_cache, *slot_ids, scale)
                         : prompt_attention(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), scale))
            .to(q.scalar_type());
    const auto dtype = attention_dtype(k_cache);
    at::Tensor keys, values;
    const bool causal = !slot_ids;
    if (!slot_ids) {
        keys = k.transpose(0, 1).to(dtype);
        values = v.transpose(0, 1).to(dtype);
    } else {
        keys = gather(k_cache, *slot_ids, dtype);
        values = gather(v_cache, *slot_ids, dtype);
    }
    auto out = at::scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0).to(dtype), keys.unsqueeze(0),
                                                values.unsqueeze(0), mask, 0.0, causal, scale, true);
    return out.squeeze(0).transpose(0, 1).to(q.scalar_type());
}

class NativeDecoder {
  public:
    NativeDecoder(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t intermediate_size,
                  double eps, double scale)
        : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim),
          intermediate_size_(intermediate_size), eps_(eps), scale_(scale) {}

    void add_layer(const std::vector<NativeLinear>& linears, at::Tensor input_norm,
                   at::Tensor post_attention_norm) {
        TORCH_CHECK(linears.size() == 4, "qkv, o, gate_up, down");
        layers_.push_back({linears[0], linears[1], linears[2], linears[3], std::move(input_norm),
                           std::move(post_attention_norm)});
        int64_t bytes = 0;
        for (const auto& linear : linears) {
            all_int4_ = all_int4_ && linear.int4_weight.defined();
            for (const auto* t : {&linear.int4_weight, &linear.int4_scales, &linear.int4_lows})
                if (t->defined()) bytes += t->nbytes();
        }
        largest_layer_bytes = std::max(largest_layer_bytes, bytes);
    }

    // x (T, hidden) float32: the step's first num_decodes rows are single-token decodes, then the
    // prefill chunks; returns the hidden states after the last layer.
    at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                       const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                       const at::Tensor& slot_mapping, int64_t num_decodes,
                       const std::optional<at::Tensor>& block_table,
                       const std::optional<at::Tensor>& context_lens, int64_t block_size,
                       const std::vector<Prefill>& prefills) const {
        TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(), "one cache per layer");
        TORCH_CHECK(num_decodes == 0 || (block_table && context_lens), "decodes need a block table and lengths");
        TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x: float32 (T, hidden)");
        const int64_t n = x.size(0);
        // The rope tables are float32 (model/rope.py), the projections return float32 and the
        // attention kernel takes float32 or bf16 caches: the fused pass below covers every step.
        TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && head_dim_ % 2 == 0,
                    "float32 rope tables, even head_dim");
        const auto cos_rows = cos.reshape({n, head_dim_}).contiguous();
        const auto sin_rows = sin.reshape({n, head_dim_}).contiguous();
        const auto slots = slot_mapping.to(at::kLong).contiguous();
        const int64_t num_slots = k_caches.empty() ? 0 : k_caches[0].size(1);  // allocate_kv_caches: one size
        for (int64_t t = 0; t < n; ++t) {
            const int64_t slot = slots.data_ptr<int64_t>()[t];
            TORCH_CHECK(slot >= 0 && slot < num_slots, "cache slot ", slot, " outside 0..", num_slots - 1);
        }
        std::vector<ChunkPlan> plans;
        for (const auto& seq : prefills) plans.push_back(chunk_plan(seq, k_caches, num_heads_, x.options()));
        // The layers add their residuals into a copy of x in place (a new tensor for each of a layer's
        // two sums was an allocation and an ATen add each: bench/RESULTS.md, thirty-fifth sitting).
        x = x.clone(at::MemoryFormat::Contiguous);
        const StepRows rows{cos_rows, sin_rows, slots, num_decodes, block_table, context_lens, block_size};
        if (prefills.empty() && take_row_groups(num_decodes, rows, k_caches)) {
            const auto starts = group_starts(rows, n, at::get_num_threads() * kGroupsPerThread);
            if (static_cast<int64_t>(starts.size()) >= at::get_num_threads())
                return forward_row_groups(x, rows, starts, k_caches, v_caches);
        }
        for (size_t i = 0; i < layers_.size(); ++i)
            x = layer_forward(layers_[i], x, rows, k_caches[i], v_caches[i], prefills, plans, true);
        return x;
    }

  private:
    // What a step's rows need besides their hidden states: their rope angles and cache slots and,
    // for the decode rows (the first num_decodes), their block tables and context lengths.
    struct StepRows {
        at::Tensor cos, sin, slots;
        int64_t num_decodes;
        std::optional<at::Tensor> block_table, context_lens;
        int64_t block_size;

        StepRows slice(int64_t begin, int64_t end) const {  // decode rows [begin, end)
            return {cos.slice(0, begin, end), sin.slice(0, begin, end), slots.slice(0, begin, end), end - begin,
                    block_table->slice(0, begin, end), context_lens->slice(0, begin, end), block_size};
        }
    };

    // One layer over x (T, hidden): model/llama.py's DecoderLayer.forward (share_prefixes: the
    // decode rows' attention may take the shared pass, as paged_attention's always may).
    at::Tensor layer_forward(const NativeLayer& layer, at::Tensor x, const StepRows& rows,
                             const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const std::vector<Prefill>& prefills,
                             const std::vector<ChunkPlan>& plans, bool share_prefixes) const {
        const int64_t n = x.size(0), num_decodes = rows.num_decodes;
        const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
        const auto& cos_rows = rows.cos;
        const auto& sin_rows = rows.sin;
        const auto& slots = rows.slots;
        auto h = rms_norm(x, layer.input_norm, eps_);
        const auto qkv = layer.qkv(h).contiguous();
        TORCH_CHECK(qkv.scalar_type() == at::kFloat && k_cache.scalar_type() == v_cache.scalar_type(),
                    "float32 projections, one cache dtype");
        at::Tensor q, k;
        if (k_cache.scalar_type() == at::kFloat)
            std::tie(q, k) = rope_and_cache<float>(qkv, cos_rows, sin_rows, num_heads_, num_kv_heads_, head_dim_,
                                                   slots, k_cache, v_cache);
        else if (k_cache.scalar_type() == at::kBFloat16)
            std::tie(q, k) = rope_and_cache<c10::BFloat16>(qkv, cos_rows, sin_rows, num_heads_, num_kv_heads_,
                                                           head_dim_, slots, k_cache, v_cache);
        else if (k_cache.scalar_type() == at::kChar)
            std::tie(q, k) = rope_and_cache<int8_t>(qkv, cos_rows, sin_rows, num_heads_, num_kv_heads_,
                                                    head_dim_, slots, k_cache, v_cache);
        else
            TORCH_CHECK(false, "KV cache: float32, bfloat16 or int8 rows");
        const auto v = qkv.slice(1, q_size + kv_size).view({n, num_kv_heads_, head_dim_});
        // paged_attention in model/attention.py
        const auto decode_attention = [&] {
            return paged_decode_attention(q.slice(0, 0, num_decodes).to(at::kFloat).contiguous(), k_cache, v_cache,
                                          *rows.block_table, *rows.context_lens, rows.block_size, scale_,
                                          share_prefixes);
        };
        if (prefills.empty() && num_decodes == n)  // a decode-only step: its rows are the output
            return finish_layer(layer, x, decode_attention());
        auto attn = at::empty_like(q);
        if (num_decodes > 0) attn.slice(0, 0, num_decodes).copy_(decode_attention());
        for (size_t p = 0; p < prefills.size(); ++p) {
            const auto& seq = prefills[p];
            const int64_t start = std::get<0>(seq), end = start + std::get<1>(seq);
            attn.slice(0, start, end).copy_(prefill_attention(q.slice(0, start, end), k.slice(0, start, end),
                                                              v.slice(0, start, end), k_cache, v_cache, seq,
                                                              plans[p], scale_));
        }
        return finish_layer(layer, x, attn);
    }

    // The layer after its attention: the output projection and residual, then the MLP.
    at::Tensor finish_layer(const NativeLayer& layer, at::Tensor x, const at::Tensor& attn) const {
        layer.o.add_to(attn.flatten(1), x);  // x is forward's own copy: the sums go into it in place
        const auto h = rms_norm(x, layer.post_attention_norm, eps_);
        const auto gate_up = layer.gate_up(h);
        TORCH_CHECK(gate_up.size(1) == 2 * intermediate_size_, "gate_up: (T, 2 * intermediate_size)");
        layer.down.add_to(silu_mul(gate_up), x);
        return x;
    }

    // A decode-only step of many rows as independent groups of rows, each through every layer: no
    // thread waits for another between kernels (a step's ~10 parallel regions a layer each end with
    // one; through the server, where the HTTP loop and the clients take the cores from time to time,
    // a thread losing its core for a millisecond held the other there). A thread takes the least
    // advanced group no thread holds, a layer at a time, so the groups of a thread that lost its
    // core go on on the other. Taken where every projection is W4A8 on the same path at a group's
    // rows as at the step's (group_starts: its rows computed independently, the same results bit
    // for bit), no rows attend to a shared prefix together (the shared pass wants the whole
    // group's rows; groups then never take it, since a subset can pass its rule where the whole
    // step did not), and a layer's weights are small enough to be read again by each group from
    // the cores' shared cache (SmolLM2's 2 MB layers; the Qwen2-0.5B shape's 9.3 MB ones ran 7%
    // slower as groups).
    bool take_row_groups(int64_t num_decodes, const StepRows& rows, const std::vector<at::Tensor>& k_caches) const {
        if (row_group_rows <= 0 || num_decodes < row_group_rows || !all_int4_ || layers_.empty() ||
            largest_layer_bytes > row_group_layer_bytes || at::get_num_threads() < 2 || at::in_parallel_region())
            return false;
        return !decode_shares_prefixes(k_caches[0], num_heads_, *rows.block_table, *rows.context_lens,
                                       rows.block_size);
    }

    // The first row of each of up to `count` groups of near equal size, moved on past rows that
    // attend to the row before them (a sequence's draft rows attend to the ones before, written in
    // the same layer: a row whose context holds the block of the row before's slot). A group whose
    // rows int4_linear would compute otherwise than the step's (one row: the residual pass; AMX
    // tiles by row count) joins the group before it, or the next; none at all if that fails.
    static std::vector<int64_t> group_starts(const StepRows& rows, int64_t n, int64_t count) {
        const auto table = rows.block_table->contiguous();
        const auto* t = table.data_ptr<int64_t>();
        const auto* lens = rows.context_lens->data_ptr<int64_t>();
        const auto* slots = rows.slots.data_ptr<int64_t>();
        const int64_t width = table.size(1);
        const auto follows = [&](int64_t r) {
            const int64_t* row = t + r * width;
            const int64_t* end = row + (lens[r] + rows.block_size - 1) / rows.block_size;  // its context's blocks
            return std::find(row, end, slots[r - 1] / rows.block_size) != end;
        };
        std::vector<int64_t> starts{0};
        for (int64_t g = 1; g < count; ++g) {
            int64_t r = std::max(n * g / count, starts.back() + 1);
            while (r < n && follows(r)) ++r;
            if (r < n) starts.push_back(r);
        }
        const auto alike = [&](int64_t rows_in_group) { return int4_rows_alike(rows_in_group, n); };
        std::vector<int64_t> kept{0};
        for (size_t g = 1; g < starts.size(); ++g)
            if (alike(starts[g] - kept.back())) kept.push_back(starts[g]);  // else the group goes on
        if (kept.size() > 1 && !alike(n - kept.back())) kept.pop_back();  // the last joins the one before
        kept.push_back(n);
        for (size_t g = 0; g + 1 < kept.size(); ++g)
            if (!alike(kept[g + 1] - kept[g])) return {};
        kept.pop_back();
        return kept;
    }

    at::Tensor forward_row_groups(const at::Tensor& x, const StepRows& rows, std::vector<int64_t> starts,
                                  const std::vector<at::Tensor>& k_caches,
                                  const std::vector<at::Tensor>& v_caches) const {
        const int64_t n = x.size(0), threads = at::get_num_threads();
        const int64_t count = static_cast<int64_t>(starts.size());
        starts.push_back(n);
        const int num_layers = static_cast<int>(layers_.size());
        std::vector<at::Tensor> hidden(count);
        std::vector<StepRows> parts;
        for (int64_t g = 0; g < count; ++g) {
            hidden[g] = x.slice(0, starts[g], starts[g + 1]);
            parts.push_back(rows.slice(starts[g], starts[g + 1]));
        }
        std::vector<std::atomic<int>> next_layer(count);  // a group's next layer (value-initialized: 0)
        std::vector<std::atomic<bool>> held(count);       // a thread is running it
        std::atomic<bool> failed{false};
        const std::vector<Prefill> no_prefills;
        const std::vector<ChunkPlan> no_plans;
        at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
            const c10::InferenceMode inference;  // as the calling thread's forward runs (its workers' is off)
            for (int64_t me = begin; me < end; ++me) {
                while (!failed.load(std::memory_order_relaxed)) {
                    int64_t pick = -1;
                    int least = num_layers;  // finished groups are not picked
                    for (int64_t i = 0; i < count; ++i) {
                        const int64_t g = (me * kGroupsPerThread + i) % count;  // its own groups first on ties
                        const int layer = next_layer[g].load(std::memory_order_acquire);
                        if (layer < least && !held[g].load(std::memory_order_relaxed)) {
                            least = layer;
                            pick = g;
                        }
                    }
                    if (pick < 0) break;  // the unfinished groups are other threads' now, and they go on
                    if (held[pick].exchange(true, std::memory_order_acquire)) continue;
                    const int layer = next_layer[pick].load(std::memory_order_acquire);
                    if (layer < num_layers) {
                        try {
                            hidden[pick] = layer_forward(layers_[layer], hidden[pick], parts[pick], k_caches[layer],
                                                         v_caches[layer], no_prefills, no_plans, false);
                        } catch (...) {
                            failed.store(true);
                            held[pick].store(false, std::memory_order_release);
                            throw;  // at::parallel_for rethrows it on the calling thread
                        }
                        next_layer[pick].store(layer + 1, std::memory_order_release);
                    }
                    held[pick].store(false, std::memory_order_release);
                }
            }
        });
        row_group_steps_.fetch_add(1, std::memory_order_relaxed);
        return at::cat(hidden);
    }

  public:
    // Decode-only steps of at least this many rows run as row groups (0: never), on models whose
    // layers hold at most row_group_layer_bytes of weights. Engine alone on SmolLM2, 2 threads:
    // 8-row steps 20% slower as groups, 16 within the noise, 24-64 no slower; beside a process
    // taking a tenth of the machine, 24-64 rows 5-12% faster (bench/RESULTS.md).
    int64_t row_group_rows = kRowGroupRows;
    int64_t row_group_layer_bytes = kRowGroupLayerBytes;

    int64_t largest_layer_bytes = 0;  // a layer's W4A8 weights with their scales and lows, the largest

    int64_t row_group_steps() const { return row_group_steps_.load(); }  // steps that ran as row groups

  private:
    static constexpr int64_t kRowGroupRows = 24;
    static constexpr int64_t kRowGroupLayerBytes = int64_t{4} << 20;
    static constexpr int64_t kGroupsPerThread = 2;  // so that a thread can take another's second group
    bool all_int4_ = true;  // every projection W4A8 (int4_linear)
    mutable std::atomic<int64_t> row_group_steps_{0};

    int64_t num_heads_, num_kv_heads_, head_dim_, intermediate_size_;
    double eps_, scale_;
    std::vector<NativeLayer> layers_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache",
          py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"), py::arg("context_lens"),
          py::arg("block_size"), py::arg("scale"), py::arg("share_prefixes") = true);
    m.def("paged_prompt_attention", &paged_prompt_attention, "a prefill chunk's causal attention over its context's cache slots");
    m.def("prompt_attention", &prompt_attention, "a whole prompt's causal attention over its own keys and values, in bf16");
    m.def("prompt_attention_supported", &prompt_attention_supported, "whether paged_prompt_attention takes this cache and head count here");
    m.def("prompt_attention_chosen", &prompt_attention_chosen,
          "whether a prefill chunk of query_rows rows (after cached context or a whole prompt) takes the prompt "
          "attention kernels over this cache here", py::arg("k_cache"), py::arg("num_heads"), py::arg("query_rows"),
          py::arg("after_context"));
    m.def("amx_bf16_usable", &amx_bf16_usable, "whether this CPU has AMX-BF16 tiles this process may use");
    m.def("int8_linear", &int8_linear, "x @ weight.T with int8 weights and per-row int8 activations",
          py::arg("x"), py::arg("weight"), py::arg("w_scales"), py::arg("bias"), py::arg("block"),
          py::arg("path") = "auto");
    m.def("int8_linear_path", &int8_linear_path, "the path int8_linear takes for a packed weight in a step of this many rows");
    m.def("argmax_rows", &argmax_rows, "each row's first maximum (NaN counts as the maximum)");
    m.def("rms_norm", &rms_norm, "rms_norm_rows for float32 rows and weight, ATen's rms_norm otherwise");
    m.def("silu_mul", &silu_mul, "silu(gate) * up of rows [gate | up]: silu_mul_rows for float32 rows, ATen otherwise");
    m.def("silu_mul_rows", &silu_mul_rows, "silu(gate) * up of float32 rows [gate | up], in one pass");
    m.def("rms_norm_rows", &rms_norm_rows, "float32 rows times 1 / sqrt(mean(x^2) + eps) times a float32 weight");
    m.def("quantize_rows", &quantize_rows, "blockwise Hadamard transform, then per-row symmetric int8");
    m.def("int8_weight_rows", &int8_weight_rows, "rows of the float weight an int8_linear weight stands for");
    m.def("int4_linear", &int4_linear, "x @ weight.T with packed 4-bit weights and int8 activations in groups of 32",
          py::arg("x"), py::arg("packed"), py::arg("w_scales"), py::arg("w_lows"), py::arg("bias"),
          py::arg("path") = "auto");
    m.def("int4_pairs_linear", &int4_pairs_linear, "int4_linear on a weight in pack_int4_pairs' layout",
          py::arg("x"), py::arg("pairs"), py::arg("bias") = py::none());
    m.def("int4_pairs_linear_add", &int4_pairs_linear_add, "out += int4_pairs_linear(x, pairs, bias), in place",
          py::arg("x"), py::arg("pairs"), py::arg("bias"), py::arg("out"));
    // The load's conversions let go of the GIL, as the decoder's forward does: a model loaded on
    // demand converts its weights on its engine's thread while the others serve.
    m.def("gguf_dequantize", &gguf_dequantize, "float32 values of Q4_0, Q4_1 or Q8_0 GGUF blocks",
          py::call_guard<py::gil_scoped_release>());
    m.def("quantize_int4_groups", &quantize_int4_groups, "float32 weight rows -> 4-bit integers with a float16 scale and low per group of 32",
          py::call_guard<py::gil_scoped_release>());
    m.def("pack_int4", &pack_int4, "4-bit integers (N, K) -> the int4 product's (N/16, K/8, 16, 4) byte layout",
          py::call_guard<py::gil_scoped_release>());
    m.def("pack_int4_pairs", &pack_int4_pairs, "pack_int4's layout with its scales and lows -> one stream a pair of blocks",
          py::call_guard<py::gil_scoped_release>());
    m.def("rotated_int8", &rotated_int8, "float32 weight rows -> int8 of their blockwise Hadamard transform, a bfloat16 scale per row",
          py::call_guard<py::gil_scoped_release>());
    m.def("quantize_groups", &quantize_groups, "int8 in groups of 32 columns, each with its scale and sum");
    m.def("int4_linear_supported", &int4_linear_supported, "whether int4_linear runs here (AVX512-VNNI or AVX2)");
    m.def("int4_quantize_supported", &int4_quantize_supported, "whether quantize_int4_groups runs here (AVX-512 or AVX2)");
    m.def("int4_tiles_supported", &int4_tiles_supported, "whether int4_linear runs larger steps on AMX-INT8 tiles here");
    m.def("int4_linear_path", &int4_linear_path, "the path int4_linear takes for a step of this many rows");
    m.def("int4_bf16_tiles_supported", &int4_bf16_tiles_supported, "whether int4_linear runs larger steps on AMX-BF16 tiles here");
    m.def("f32_linear", &f32_linear,
          "x @ weight.T + bias in float32, each output summed in one order whatever the rows",
          py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
    m.def("f32_linear_supported", &f32_linear_supported, "whether f32_linear runs its own kernel here (AVX-512 or AVX2)");
    m.def("bf16_linear", &bf16_linear, "x @ weight.T + bias for a bf16 weight in bf16_panels' layout, in float32",
          py::arg("x"), py::arg("panels"), py::arg("bias"), py::arg("n_size"));
    m.def("bf16_panels", &bf16_panels, "(N, K) bf16 weight -> bf16_linear's (N/32, K/2, 32, 2) panels",
          py::call_guard<py::gil_scoped_release>());
    m.def("bf16_panel_rows", &bf16_panel_rows, "rows of the (N, K) weight bf16_panels laid out, as float32");
    m.def("bf16_linear_supported", &bf16_linear_supported,
          "whether bf16_linear runs its own kernel here (AVX512-BF16)");
    m.def("int8_packed_supported", &int8_packed_supported, "whether int8_linear takes packed weights (AVX512-VNNI)");
    py::class_<NativeLinear>(m, "NativeLinear")
        .def(py::init([](std::optional<at::Tensor> weight, std::optional<at::Tensor> bias, int64_t layout,
                         int64_t outputs, int64_t narrow, std::optional<at::Tensor> narrow_weight,
                         std::optional<at::Tensor> narrow_scales, int64_t small_step_tokens,
                         std::optional<at::Tensor> wide_weight, std::optional<at::Tensor> wide_scales,
                         int64_t wide_block, std::optional<at::Tensor> int4_weight,
                         std::optional<at::Tensor> int4_scales, std::optional<at::Tensor> int4_lows) {
            return NativeLinear{weight.value_or(at::Tensor()), std::move(bias), layout, outputs, narrow,
                                narrow_weight.value_or(at::Tensor()), narrow_scales.value_or(at::Tensor()),
                                small_step_tokens, wide_weight.value_or(at::Tensor()),
                                wide_scales.value_or(at::Tensor()), wide_block,
                                int4_weight.value_or(at::Tensor()), int4_scales.value_or(at::Tensor()),
                                int4_lows.value_or(at::Tensor())};
        }));
    py::class_<NativeDecoder>(m, "NativeDecoder")
        .def(py::init<int64_t, int64_t, int64_t, int64_t, double, double>())
        .def("add_layer", &NativeDecoder::add_layer)
        .def_readwrite("row_group_rows", &NativeDecoder::row_group_rows)
        .def_readwrite("row_group_layer_bytes", &NativeDecoder::row_group_layer_bytes)
        .def_readonly("largest_layer_bytes", &NativeDecoder::largest_layer_bytes)
        .def_property_readonly("row_group_steps", &NativeDecoder::row_group_steps)
        // Without the GIL: the HTTP thread streams the previous step's tokens while this one computes
        // (through the server: 64 streams 428 -> 477 tok/s, 1 stream 88.6 -> 97.4).
        .def("forward", &NativeDecoder::forward, py::call_guard<py::gil_scoped_release>());
}
