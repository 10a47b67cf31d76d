"""Steps run their layers in C++ (lmserve/kernels/decoder.cpp) with the same ATen ops as the Python
layers: the hidden states and the KV they write must be bit-identical, for every weight format
(float32, bf16 oneDNN-packed, int8 weight-only copies and W8A8, int4's W4A8, q/k/v biases), for step
sizes on both sides of the small-step copies' row limit, and for every kind of step: whole prompts, decode-only, and
decodes mixed with a first prompt chunk and a later one (attending to cached context)."""

from __future__ import annotations

import pytest
import torch

from lmserve.cache.kv_cache import allocate_kv_caches
from lmserve.cli import default_model_path
from lmserve.kernels import native_module
from lmserve.model.attention import AttentionMetadata, PrefillSeq
from lmserve.model import linear
from lmserve.model.weight_formats import floating
from lmserve.model.weight_formats.floating import Bf16Panels, FloatWeight, OneDNNPackedWeight
from lmserve.model.weight_formats.int4 import (Int4WeightOnly, W4A8Pairs, W4A8Weight, int4_linear_supported,
                                               int4_pairs_run)
from lmserve.model.weight_formats.int8 import W8A8Weight
from lmserve.weights.load import load_weights
from tests.helpers.attention_cases import prompt_kernel_path
from tests.helpers.tiny_models import save_hf_folder, tiny_hf_model

BLOCK = 4
BLOCKS_PER_SEQ = 8  # room for each sequence's prompt and decoded tokens


SMALL_CHUNKS = ((0, 5), (5, 4))  # (start, length): the whole context first, then attending to it


def hidden_states(model, num_seqs: int, steps: int, kv_dtype: torch.dtype, native: bool, seed: int = 0,
                  chunks=SMALL_CHUNKS):
    """Prefill num_seqs random prompts of different lengths one by one, then decode `steps` random
    tokens for all of them together, the first decode steps also carrying a newcomer's prompt in
    `chunks`; returns every step's output and the caches."""
    kept, model.native = model.native, (model.native if native else None)
    try:
        g = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        newcomer_blocks = max(BLOCKS_PER_SEQ, -(-max(start + count for start, count in chunks) // BLOCK))
        caches = allocate_kv_caches(model.config, num_seqs * BLOCKS_PER_SEQ + newcomer_blocks, BLOCK, kv_dtype,
                                    torch.device("cpu"))
        lengths = [3 + 2 * s % 9 for s in range(num_seqs)]
        outputs = prompts_one_by_one(model, caches, lengths, BLOCKS_PER_SEQ, g)
        table = torch.arange(num_seqs * BLOCKS_PER_SEQ).view(num_seqs, BLOCKS_PER_SEQ)
        newcomer = num_seqs * BLOCKS_PER_SEQ * BLOCK  # its first slot
        for step in range(steps):
            positions = torch.tensor(lengths)
            slots = positions + torch.arange(num_seqs) * BLOCKS_PER_SEQ * BLOCK
            ids = torch.randint(vocab, (num_seqs,), generator=g)
            prefills = []
            if step < len(chunks):
                start, count = chunks[step]
                end = start + count
                context = torch.arange(end) + newcomer if start else None
                prefills.append(PrefillSeq(num_seqs, count, end, context))
                positions = torch.cat([positions, torch.arange(start, end)])
                slots = torch.cat([slots, torch.arange(start, end) + newcomer])
                ids = torch.cat([ids, torch.randint(vocab, (count,), generator=g)])
            meta = AttentionMetadata(slots, num_seqs, table, torch.tensor(lengths) + 1, prefills, BLOCK)
            outputs.append(model(ids, positions, caches, meta))
            lengths = [n + 1 for n in lengths]
        return outputs, caches
    finally:
        model.native = kept


def prompts_one_by_one(model, caches, lengths: list[int], blocks_per_seq: int, g: torch.Generator) -> list:
    """A random prompt of lengths[s] tokens for each sequence s, each in a step of its own, in the
    cache from block s * blocks_per_seq on; returns the steps' hidden states."""
    outputs = []
    for s, n in enumerate(lengths):
        slots = torch.arange(n) + s * blocks_per_seq * BLOCK
        meta = AttentionMetadata(slots, 0, None, None, [PrefillSeq(0, n, n, None)])
        outputs.append(model(torch.randint(model.config.vocab_size, (n,), generator=g), torch.arange(n), caches, meta))
    return outputs


class Counting:
    """Wraps the native decoder, counts the steps it runs and holds it to leaving the hidden states it
    is given as they were (its layers add their residuals in place, into a copy)."""

    def __init__(self, native):
        self.native, self.calls = native, 0

    def forward(self, x, *args):
        self.calls += 1
        given = x.clone()
        out = self.native.forward(x, *args)
        assert torch.equal(x, given) and out.data_ptr() != x.data_ptr()
        return out


def assert_native_matches_python(model, num_seqs: int, kv_dtype: torch.dtype, steps: int = 3, chunks=SMALL_CHUNKS):
    assert model.native is not None, "native decoder not enabled: run python -m lmserve.kernels"
    python_out, python_caches = hidden_states(model, num_seqs, steps, kv_dtype, native=False, chunks=chunks)
    kept = model.native
    model.native = counting = Counting(kept)
    try:
        native_out, native_caches = hidden_states(model, num_seqs, steps, kv_dtype, native=True, chunks=chunks)
    finally:
        model.native = kept
    assert counting.calls == num_seqs + steps  # every step ran natively, mixed ones included
    assert_identical((python_out, python_caches), (native_out, native_caches))


def assert_identical(python, native):
    """Two runs' (step outputs, caches), bit for bit."""
    (python_out, python_caches), (native_out, native_caches) = python, native
    for step, (a, b) in enumerate(zip(python_out, native_out)):
        assert torch.equal(a, b), (step, (a - b).abs().max())
    for (k1, v1), (k2, v2) in zip(python_caches, native_caches):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.fixture(scope="module")
def tiny_qwen2_folder(tmp_path_factory):
    return save_hf_folder(tiny_hf_model("qwen2"), tmp_path_factory.mktemp("qwen2"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bfloat16-onednn", "int8", "int4", "int4-without-kernels"])
@pytest.mark.parametrize("num_seqs", [1, 3, 10])  # 10 rows: past int8's and int4's small-step limits
def test_tiny_qwen2_native_decode_is_bit_identical(tiny_qwen2_folder, dtype, num_seqs, monkeypatch):
    if dtype == "int4-without-kernels":  # quantized as where the W4A8 and packed W8A8 products do not
        # run (torch's weight-only int4 kernel, then W8A8 on torch._int_mm); the layers still run in C++
        monkeypatch.setattr(linear, "int4_linear_supported", lambda: False)
        monkeypatch.setattr(linear, "packs_weights", lambda: False)
        model, _, _ = load_weights(tiny_qwen2_folder, "int4")
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert isinstance(qkv.small_step_copy.storage, Int4WeightOnly)
        assert isinstance(qkv.storage, W8A8Weight) and qkv.storage.weight.dtype == torch.int8
        assert_native_matches_python(model, num_seqs, torch.bfloat16)
        return
    if dtype == "bfloat16-onednn":  # bf16 as CPUs the panels do not serve lay it out (plain without AVX512-BW)
        monkeypatch.setattr(floating, "bf16_panels_run", lambda: False)
        model, _, _ = load_weights(tiny_qwen2_folder, "bfloat16")
        layout = OneDNNPackedWeight if floating.packs_bf16() else FloatWeight
        assert isinstance(model.model.layers[0].self_attn.qkv_proj.storage, layout)
        assert_native_matches_python(model, num_seqs, torch.bfloat16)
        return
    model, _, _ = load_weights(tiny_qwen2_folder, dtype)
    qkv = model.model.layers[0].self_attn.qkv_proj
    if dtype == "bfloat16":  # the kernels' panels where they run, oneDNN's layout elsewhere
        assert isinstance(qkv.storage, floating.bf16_layout())
    if dtype == "int8":
        assert isinstance(qkv.storage, W8A8Weight) and qkv.weight is None  # and past the small-step limit, W8A8
    if dtype == "int4":  # W4A8 at every step where the kernels run it
        assert isinstance(qkv.storage, W4A8Pairs if int4_pairs_run() else W4A8Weight) == int4_linear_supported()
        assert qkv.weight is None
    assert_native_matches_python(model, num_seqs, torch.float32 if dtype == "float32" else torch.bfloat16)


@pytest.fixture(scope="module")
def tiny_qwen2_wide_heads_folder(tmp_path_factory):
    """head_dim 32: steps over a bf16 or int8 cache take the prompt attention kernels."""
    return save_hf_folder(tiny_hf_model("qwen2", hidden_size=128), tmp_path_factory.mktemp("qwen2-d32"))


PROMPT_KERNEL_EVENTS = ("lmserve::prompt_attention", "lmserve::paged_prompt_attention")  # RECORD_FUNCTION names


def prompt_kernel_calls(model, kv_dtype, chunks, native: bool) -> tuple[int, int]:
    """How often each prompt attention kernel entry ran over hidden_states' steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hidden_states(model, 3, 3, kv_dtype, native=native, chunks=chunks)
    counts = {event.key: event.count for event in prof.key_averages()}
    return tuple(counts.get(name, 0) for name in PROMPT_KERNEL_EVENTS)


@pytest.mark.parametrize("chunks", [SMALL_CHUNKS, ((0, 100), (100, 40)), ((0, 130), (130, 40))],
                         ids=["few-rows", "mixed", "many-rows"])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_prompt_attention_runs_alike_from_both_layers(tiny_qwen2_wide_heads_folder, kv_dtype, chunks):
    """Whole prompts (the kernel's own-rows entry) and a chunk after cached context (its paged
    entry), from the C++ layers (which skip the chunk's mask for it) and the Python ones; with
    AMX-BF16 tiles chunks of many rows take PyTorch's attention instead, from both layers alike,
    and a step can hold a chunk of each kind."""
    model, _, _ = load_weights(tiny_qwen2_wide_heads_folder, "int4")
    width = 32 + (4 if kv_dtype == torch.int8 else 0)
    module = native_module()
    cache = torch.zeros(2, 4, width, dtype=kv_dtype)
    (_, whole), (_, after) = chunks
    chosen = [module.prompt_attention_chosen(cache, 4, whole, False), module.prompt_attention_chosen(cache, 4, after, True)]
    kernels, amx = prompt_kernel_path() is not None, module.amx_bf16_usable()
    after_rows = 32 if kv_dtype == torch.int8 else 24
    assert chosen == [kernels and not (amx and whole >= 128), kernels and not (amx and after >= after_rows)]
    # where chosen, the kernels ran, once a layer, in the prompt's own step (whole prompts of the
    # decoding sequences: 3 to 7 rows, always the kernel's where it runs) and the newcomer's
    layers = model.config.num_hidden_layers
    expected = (layers * (3 * kernels + chosen[0]), layers * chosen[1])
    for native in (False, True):
        assert prompt_kernel_calls(model, kv_dtype, chunks, native) == expected, native
    assert_native_matches_python(model, 3, kv_dtype, chunks=chunks)


@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_default_model_native_decode_is_bit_identical(dtype):
    model, _, _ = load_weights(default_model_path(), dtype, max_positions=256)
    kv_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    for num_seqs in (1, 9):
        assert_native_matches_python(model, num_seqs, kv_dtype, steps=2)


def test_steps_without_a_cache_use_the_python_layers(tiny_qwen2_folder):
    """Decoder embeddings run whole prompts with no KV cache: the native decoder is not for them."""
    model, _, _ = load_weights(tiny_qwen2_folder, "float32")

    class Refuse:
        def forward(self, *args):
            raise AssertionError("native decoder called for a step without a KV cache")

    kept, model.native = model.native, Refuse()
    try:
        meta = AttentionMetadata(torch.arange(5), 0, None, None, [PrefillSeq(0, 5, 5, None)])
        out = model(torch.arange(5), torch.arange(5), [None] * model.config.num_hidden_layers, meta)
    finally:
        model.native = kept
    assert out.shape == (5, model.config.hidden_size) and torch.isfinite(out).all()
