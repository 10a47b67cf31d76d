"""bf16 matmul weights and KV cache (float32 activations), and the int8 KV cache, against the float32
model on the default model: the fast paths must stay close, measured teacher-forced so one early flip
does not compound."""

from __future__ import annotations

import pytest
import torch

from lmserve.cache.kv_cache import allocate_kv_caches
from lmserve.cli import default_model_path
from lmserve.model.attention import AttentionMetadata, PrefillSeq
from lmserve.model.linear import HeadEmbedding
from lmserve.model.weight_formats.floating import Bf16Panels, bf16_layout, bf16_panels_run
from lmserve.model.weight_formats.int4 import (Int4WeightOnly, W4A8Pairs, W4A8Weight, int4_linear_supported,
                                               int4_pairs_run)
from lmserve.model.weight_formats.int8 import Int8WeightOnly, W8A8Weight, int8_matmul_pays, packs_weights
from lmserve.request import SamplingParams
from lmserve.weights.load import load_model
from tests.helpers.real_engine import PROMPTS, chat_ids, make_engine


# The int8 KV cache (--kv-cache-dtype int8), measured on 2026-12-03 over four prompts: alone (float32
# weights) per-prompt KL 4.8-8.1e-4, top-1 agreement 0.995; under int4 weights 1.9-2.7e-3 and 0.969,
# against 1.4-2.1e-3 and 0.984 for int4 weights with the bf16 cache.
KV_INT8_MAX_KL = 2e-3
INT4_KV_INT8_MAX_KL = 4e-3
CHUNKED_MAX_KL = 2e-3  # test_int4_chunked_prefill_tracks_float32: 5.3e-4 and 7.4e-4 measured


@pytest.fixture(scope="module")
def bf16_model():
    return load_model(default_model_path(), "bfloat16", max_positions=2048)


def all_logits(model, ids: list[int]) -> torch.Tensor:
    caches = allocate_kv_caches(model.config, (len(ids) + 15) // 16, 16, torch.float32, torch.device("cpu"))
    meta = AttentionMetadata(torch.arange(len(ids)), 0, None, None, [PrefillSeq(0, len(ids), len(ids), None)])
    return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), caches, meta))


@pytest.fixture(scope="module")
def int8_model():
    return load_model(default_model_path(), "int8", max_positions=2048)


def decoded_logits(model, seqs: list[tuple[list[int], int]], kv_dtype: torch.dtype) -> list[torch.Tensor]:
    """For each (ids, num_prompt) in `seqs`, the logits for positions num_prompt-1 .. len(ids)-2: each
    prompt prefilled alone into its own blocks, then each later token fed as a decode step reading the
    paged cache, as the engine decodes: one row a step for one sequence, a row for each sequence
    beside it for several (all must have as many tokens after their prompt)."""
    num_blocks = [(len(ids) + 15) // 16 for ids, _ in seqs]
    firsts = [sum(num_blocks[:i]) for i in range(len(seqs))]
    caches = allocate_kv_caches(model.config, sum(num_blocks), 16, kv_dtype, torch.device("cpu"))
    rows = []
    for (ids, n), first in zip(seqs, firsts):
        meta = AttentionMetadata(first * 16 + torch.arange(n), 0, None, None, [PrefillSeq(0, n, n, None)])
        rows.append([model.compute_logits(model(torch.tensor(ids[:n]), torch.arange(n), caches, meta))[-1]])
    table = torch.tensor([[first + min(j, count - 1) for j in range(max(num_blocks))]
                          for count, first in zip(num_blocks, firsts)])  # padded with each one's last block
    [steps] = {len(ids) - 1 - n for ids, n in seqs}
    for step in range(steps):
        positions = torch.tensor([n + step for _, n in seqs])
        meta = AttentionMetadata(torch.tensor(firsts) * 16 + positions, len(seqs), table, positions + 1, [], 16,
                                 decode_kernel=False)
        logits = model.compute_logits(model(torch.tensor([ids[n + step] for ids, n in seqs]), positions, caches, meta))
        for row, out in zip(logits, rows):
            out.append(row)
    return [torch.stack(out) for out in rows]


def test_bf16_weights_are_actually_bf16(bf16_model):
    layer = bf16_model.model.model.layers[0]
    qkv, head = layer.self_attn.qkv_proj.storage, bf16_model.model.lm_head.storage
    layout = bf16_layout()  # laid out for the CPU's product where it has one
    assert isinstance(qkv, layout) and isinstance(head, layout)
    for storage in (qkv, head):
        assert (storage.panels if layout is Bf16Panels else storage.weight).dtype == torch.bfloat16
    assert layer.input_layernorm.weight.dtype == torch.float32
    embed = bf16_model.model.model.embed_tokens
    if layout is Bf16Panels:  # the tied model reads its embeddings from the head's panels: one copy
        assert isinstance(embed, HeadEmbedding) and embed.head is head and list(embed.parameters()) == []
    else:
        assert embed.weight.dtype == torch.bfloat16  # half the table's memory


def test_a_tied_bf16_model_reads_the_tables_own_values_from_the_heads_panels(default_model, bf16_model):
    if not bf16_panels_run():  # oneDNN's layout cannot give rows back: the model keeps its bf16 table
        assert isinstance(bf16_model.model.model.embed_tokens, torch.nn.Embedding)
        return
    ids = torch.tensor([0, 1, 2, 7, 4095, 4096, 30000, default_model.config.vocab_size - 1])
    table = default_model.model.model.embed_tokens.weight.detach()  # float32
    got = bf16_model.model.model.embed_tokens(ids)
    assert got.dtype == torch.float32 and torch.equal(got, table[ids].bfloat16().float())


@pytest.fixture(scope="module")
def reference(default_model) -> list[tuple[list[int], list[int], torch.Tensor]]:
    """The float32 model's greedy outputs for the first four prompts, 48 tokens each, and its
    prefill logits at each output position, computed once for the file's teacher-forced tests:
    (prompt, output, logits) per prompt."""
    prompts = [chat_ids(default_model.tokenizer, p) for p in PROMPTS[:4]]
    outputs = make_engine(default_model).generate(prompts, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    return [(prompt, output, all_logits(default_model.model, prompt + output)[len(prompt) - 1:-1])
            for prompt, output in zip(prompts, outputs)]


def test_bf16_tracks_float32_teacher_forced(reference, bf16_model):
    """bf16 weights and KV cache, over the four prompts every teacher-forced test here shares."""
    assert teacher_forced_agreement(reference, bf16_model, 2e-3, one_row_steps=False) >= 0.95


def teacher_forced_agreement(reference, model, max_kl: float,
                             kv_dtype: torch.dtype = torch.bfloat16, one_row_steps: bool = True) -> float:
    """Top-1 agreement of `model`'s decode steps (a `kv_dtype` KV cache; one token a step, or with
    one_row_steps False the prompts side by side, a row each) with the float32 reference's prefill
    logits over the reference's own greedy outputs; every prompt's mean KL must stay under max_kl.
    Side by side gives the same logits where no path depends on the step's rows (bf16 weights,
    float32 ones) and a quarter of the steps; the int4 and int8 weights' one-row paths are their own."""
    seqs = [(prompt + output, len(prompt)) for prompt, output, _ in reference]
    if one_row_steps:
        decoded = [decoded_logits(model.model, [seq], kv_dtype)[0] for seq in seqs]
    else:  # the prompts decoded together, a row each per step
        decoded = decoded_logits(model.model, seqs, kv_dtype)
    agree = total = 0
    for (prompt, output, a), b in zip(reference, decoded):
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += len(output)
        kl = (a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean().item()
        print(f"KL {kl:.2e}")
        assert 0 < kl < max_kl, kl
    print(f"top-1 agreement {agree / total:.3f}")
    return agree / total


def test_int8_single_token_steps_track_float32_teacher_forced(reference, int8_model):
    """--dtype int8: one-token decode steps run on int8 weight copies (the prompt's prefill on W8A8),
    or on W8A8 too where its weights are packed (faster there from one row: model/linear.py)."""
    layer = int8_model.model.model.layers[0]
    for linear in (layer.mlp.gate_up_proj, int8_model.model.lm_head):
        assert isinstance(linear.storage, W8A8Weight)
        if packs_weights():
            assert linear.small_step_copy is None and linear.storage.weight.dtype == torch.uint8
        else:
            small = linear.small_step_copy.storage
            assert isinstance(small, Int8WeightOnly) and small.weight.dtype == torch.int8
    assert teacher_forced_agreement(reference, int8_model, 8e-3) >= 0.95


def test_int4_single_token_steps_track_float32_teacher_forced(reference, int4_model):
    """--dtype int4: the Q4_1 projections keep the file's own 4-bit integers, float16 scales and
    lows, and run W4A8 at every step where the kernels do (int8 activations in groups of 32, as
    llama.cpp multiplies Q4_1 by Q8_1; one-token steps quantize the activations twice, the int8
    rows and what they missed); the Q8_0 head stays int8 (W8A8). Measured: per-prompt KL 1.3-2.7e-3,
    top-1 agreement 0.969 (with the activations quantized once: 2.6-3.8e-3 and 0.958). Torch's
    weight-only int4 kernel (bf16 activations), which this replaced for one-token steps: 1.9-2.8e-3
    and 0.984; --dtype int8, all W8A8: 3.9-5.8e-3, 0.990."""
    layer = int4_model.model.model.layers[0]
    for linear in (layer.mlp.gate_up_proj, layer.self_attn.qkv_proj):
        if int4_linear_supported():
            assert isinstance(linear.storage, W4A8Pairs if int4_pairs_run() else W4A8Weight)
            assert linear.small_step_copy is None
        else:
            assert isinstance(linear.small_step_copy.storage, Int4WeightOnly)
    head_copy = int4_model.model.lm_head.small_step_copy
    assert (head_copy is None) if packs_weights() else isinstance(head_copy.storage, Int8WeightOnly)
    assert teacher_forced_agreement(reference, int4_model, 4e-3) >= 0.95


def test_an_int8_kv_cache_alone_stays_close_to_float32(default_model, reference):
    """float32 weights, keys and values stored as int8 rows: what the cache's quantization costs by itself."""
    assert teacher_forced_agreement(reference, default_model, KV_INT8_MAX_KL, kv_dtype=torch.int8,
                                    one_row_steps=False) >= 0.97


def test_int4_weights_with_an_int8_kv_cache_track_float32_teacher_forced(reference, int4_model):
    """--kv-cache-dtype int8 on the default path (int4 weights): the two errors together."""
    assert teacher_forced_agreement(reference, int4_model, INT4_KV_INT8_MAX_KL, kv_dtype=torch.int8) >= 0.95


def chunked_prefill_logits(model, ids: list[int], chunks: list[int], kv_dtype: torch.dtype) -> torch.Tensor:
    """Every position's logits with the prompt prefilled in chunks of these sizes, each after the
    one before (reading its context back from a `kv_dtype` cache), as chunked prefill and prefix hits run."""
    caches = allocate_kv_caches(model.config, (len(ids) + 15) // 16, 16, kv_dtype, torch.device("cpu"))
    rows, start = [], 0
    for size in chunks:
        end = start + size
        context = torch.arange(end) if start else None
        meta = AttentionMetadata(torch.arange(start, end), 0, None, None, [PrefillSeq(0, size, end, context)])
        rows.append(model.compute_logits(model(torch.tensor(ids[start:end]), torch.arange(start, end), caches, meta)))
        start = end
    return torch.cat(rows)


@pytest.fixture(scope="module")
def long_prompt(default_model) -> tuple[list[int], torch.Tensor]:
    """A 512-token prompt and the float32 model's logits over it, for both cache dtypes below."""
    ids = chat_ids(default_model.tokenizer, " ".join(PROMPTS) * 8)[:512]
    assert len(ids) == 512
    return ids, all_logits(default_model.model, ids)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_int4_chunked_prefill_tracks_float32(long_prompt, int4_model, kv_dtype):
    """A 512-token prompt as a whole first chunk of 128 tokens and six of 64 after it: the prompt
    attention kernels' paths where they run, PyTorch's on CPUs with AMX-BF16 tiles (these chunk
    sizes; kernels/prompt_attention.cpp). Measured on AMX (PyTorch's path): mean KL 5.3e-4 (bf16
    cache) and 7.4e-4 (int8), top-1 0.990. Both paths on a 1,024-token prompt of README text (128,
    then 64s): bf16 cache 1.47e-3 on the kernels, 1.42e-3 on PyTorch's; int8 cache 2.06e-3 and 2.07e-3."""
    ids, reference = long_prompt
    logits = chunked_prefill_logits(int4_model.model, ids, [128] + [64] * 6, kv_dtype)
    a, b = reference.log_softmax(-1), logits.log_softmax(-1)
    kl = (a.exp() * (a - b)).sum(-1).mean().item()
    agreement = (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()
    print(f"KL {kl:.2e}, top-1 agreement {agreement:.3f}")
    assert 0 < kl < CHUNKED_MAX_KL and agreement >= 0.95


def test_the_native_layers_write_the_int8_rows_the_pytorch_layers_write(default_model, int4_model):
    model = int4_model.model
    assert model.native is not None, "the native kernels are built by scripts/setup.sh"
    ids = chat_ids(default_model.tokenizer, PROMPTS[0])

    def prefill_caches():
        caches = allocate_kv_caches(model.config, (len(ids) + 15) // 16, 16, torch.int8, torch.device("cpu"))
        meta = AttentionMetadata(torch.arange(len(ids)), 0, None, None, [PrefillSeq(0, len(ids), len(ids), None)])
        model(torch.tensor(ids), torch.arange(len(ids)), caches, meta)
        return caches

    native = prefill_caches()
    model.native, saved = None, model.native
    try:
        python = prefill_caches()
    finally:
        model.native = saved
    head_dim = model.config.head_dim
    for native_rows, python_rows in zip((r for pair in native for r in pair), (r for pair in python for r in pair)):
        values = (native_rows[..., :head_dim].int() - python_rows[..., :head_dim].int()).abs()
        assert values.max() <= 1 and (values > 0).float().mean() < 0.01  # a rounding tie at most, rarely
        torch.testing.assert_close(native_rows[..., head_dim:].contiguous().view(torch.float32),
                                   python_rows[..., head_dim:].contiguous().view(torch.float32), rtol=1e-5, atol=0)


def test_a_tied_quantized_model_reads_its_embeddings_from_the_heads_int8_copy(default_model, int4_model):
    """No table of its own (bf16, 54 MiB on this model): rows come back from the Q8_0 head's W8A8
    copy within int8 rounding (measured: at most 1.0% of a row's norm; bf16 rounding is 0.16%).
    The teacher-forced tests above and below run with it."""
    if not int8_matmul_pays():
        pytest.skip("no int8 dot products: the head keeps bf16 weights and the embeddings their table")
    embed, head = int4_model.model.model.embed_tokens, int4_model.model.lm_head
    assert isinstance(embed, HeadEmbedding) and isinstance(head.storage, W8A8Weight) and embed.head is head.storage
    assert list(embed.parameters()) == []
    ids = torch.arange(0, default_model.config.vocab_size, 7)
    exact = default_model.model.model.embed_tokens(ids)
    relative = (embed(ids) - exact).norm(dim=1) / exact.norm(dim=1)
    assert relative.max() < 0.02, relative.max()


def test_int4_batched_steps_track_float32_teacher_forced(reference, int4_model):
    """--dtype int4: the whole sequence in one step. Steps of 64 rows and more run on AMX-BF16 tiles
    where the CPU has them (the weight widened to bfloat16, bfloat16 activations): per-prompt KL
    7.6-8.6e-4, top-1 agreement 1.000; on W4A8 (int8 activations in groups of 32): 2.3-4.7e-3 and
    0.969. The W8A8 path this replaced for int4 (int8
    activations after a blockwise Hadamard transform, model/weight_formats/int8.py, as --dtype int8 still runs):
    3.5-6.4e-3 and 0.979; W8A8 without the transform: 3.6e-2 and 0.89."""
    layer = int4_model.model.model.layers[0]
    down = layer.mlp.down_proj
    assert isinstance(down.storage, W4A8Pairs if int4_pairs_run() else W4A8Weight) == int4_linear_supported()
    assert down.weight is None
    agree = total = 0
    for prompt, output, a in reference:
        ids = prompt + output
        assert len(ids) >= 64  # past the small-step limit, and on the BF16 tiles where there are any
        b = all_logits(int4_model.model, ids)[len(prompt) - 1:-1]
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += len(output)
        kl = (a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean().item()
        print(f"KL {kl:.2e}")
        assert 0 < kl < 1e-2, kl
    print(f"top-1 agreement {agree / total:.3f}")
    assert agree / total >= 0.95


def test_decode_path_matches_prefill_logits(default_model):
    """The helper above is the engine's decode path: with float32 everything it equals prefill."""
    ids = chat_ids(default_model.tokenizer, PROMPTS[0]) + [28, 29, 30, 31, 32, 33]
    expected = all_logits(default_model.model, ids)[len(ids) - 7:-1]
    [alone] = decoded_logits(default_model.model, [(ids, len(ids) - 6)], torch.float32)
    assert torch.allclose(alone, expected, atol=1e-3)
    other = chat_ids(default_model.tokenizer, PROMPTS[1]) + [28, 29, 30, 31, 32, 33]  # another length, beside it
    together = decoded_logits(default_model.model, [(ids, len(ids) - 6), (other, len(other) - 6)], torch.float32)
    assert torch.allclose(together[0], expected, atol=1e-3)
    assert torch.allclose(together[1], all_logits(default_model.model, other)[len(other) - 7:-1], atol=1e-3)


# Phrasings whose first answer token leads the float32 runner-up by > 1 nat. The bare "What is the
# capital of France?" is a near-tie in float32 ("The" over "L" by 0.08 nats), which bf16 rounding
# flips on some CPUs (seen on an AMD EPYC), so it tests the CPU rather than the weights.
CLEAR_PARIS_PROMPTS = ["What is the capital city of France? Answer in one sentence.", "Name the capital of France."]


def test_bf16_answers_paris(bf16_model):
    engine = make_engine(bf16_model)
    prompts = [chat_ids(bf16_model.tokenizer, p) for p in CLEAR_PARIS_PROMPTS]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=20))
    assert all("Paris" in bf16_model.tokenizer.decode(out) for out in outs)
