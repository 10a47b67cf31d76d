"""Decode-only steps of many rows run as groups of rows, each through every layer, with no thread
waiting for another between kernels (kernels/decoder.cpp, forward_row_groups). Each row's arithmetic
is the one the whole step's kernels give it, so the hidden states and the KV written must equal the
Python layers' bit for bit; the groups must keep a sequence's draft rows together (each attends to
the ones before it, written in the same layer) and off one-row groups (int4_linear's residual pass),
steps whose rows share a prefix keep the whole step (the shared pass wants all of a group's rows),
and groups never take the shared pass the whole step did not."""

from __future__ import annotations

import pytest
import torch

from lmserve.cache.kv_cache import allocate_kv_caches
from lmserve.kernels import native_module
from lmserve.model.attention import AttentionMetadata, PrefillSeq
from lmserve.model.weight_formats.int4 import int4_linear_supported
from lmserve.weights.load import load_weights
from tests.helpers.tiny_models import save_hf_folder, tiny_hf_model
from tests.model.test_native_decoder import BLOCK, assert_identical, hidden_states, prompts_one_by_one

GROUPS = int4_linear_supported()  # every projection W4A8 (AVX512-VNNI): row groups can run

# With AMX, int4_linear runs steps of 16-63 rows on AMX-INT8 tiles and fewer on the registers
# (int4_linear_path): a group must take its step's path (decoder.cpp, group_starts), so steps of
# fewer than 32 rows keep whole steps there, and so do steps whose draft rows move a split off
# 16 / 16 or more (as [3] * 11's, at row 18, leaving 15 rows on the registers).
TILES = GROUPS and native_module().int4_tiles_supported()


def expected(taken: int, taken_with_tiles: int) -> int:
    """The steps that run as row groups here, of `taken` on AVX512-VNNI and `taken_with_tiles` with AMX."""
    return 0 if not GROUPS else taken_with_tiles if TILES else taken


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # head_dim 64: a bf16 cache takes the shared pass where the CPU has AVX512-BF16
    folder = save_hf_folder(tiny_hf_model("qwen2", hidden_size=256, intermediate_size=128, max_position_embeddings=4096),
                            tmp_path_factory.mktemp("qwen2-d64"))
    loaded, _, _ = load_weights(folder, "int4")
    assert loaded.native is not None, "native decoder not enabled: run python -m lmserve.kernels"
    return loaded


@pytest.fixture(autouse=True)
def two_threads():
    kept = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(kept)


def run_both(model, step):
    """step(native: bool) -> (outputs, caches), once through the native decoder and once through
    the Python layers; returns (Python's, native's, how many native steps ran as row groups)."""
    before = model.native.row_group_steps
    native = step(True)
    return step(False), native, model.native.row_group_steps - before


@pytest.mark.parametrize("num_seqs, taken, taken_with_tiles", [(23, 0, 0), (24, 2, 0), (40, 2, 2)])
def test_decode_steps_of_many_rows_run_as_row_groups_bit_for_bit(model, num_seqs, taken, taken_with_tiles):
    """hidden_states: prompts one by one, then 4 decode steps of all sequences, the first two with
    a newcomer's prompt chunk beside them (those keep the whole step): from 24 rows the two
    decode-only steps run as row groups."""
    python, native, ran = run_both(model, lambda on: hidden_states(model, num_seqs, 4, torch.bfloat16, native=on))
    assert ran == expected(taken, taken_with_tiles)
    assert_identical(python, native)


@pytest.mark.parametrize("rows, layer_bytes, taken", [(0, 0, 0), (24, -1, 0), (24, 0, 2)])
def test_row_groups_turned_off_and_refused_for_large_layers(model, rows, layer_bytes, taken):
    """row_group_rows 0 turns them off; layers holding more weight bytes than row_group_layer_bytes
    keep whole steps (each group reads a layer's weights again)."""
    native = model.native
    kept = native.row_group_rows, native.row_group_layer_bytes
    assert (native.largest_layer_bytes > 0) == GROUPS  # W4A8 layers, small ones (below)
    assert native.largest_layer_bytes <= native.row_group_layer_bytes
    native.row_group_rows, native.row_group_layer_bytes = rows, native.largest_layer_bytes + layer_bytes
    try:
        _, _, ran = run_both(model, lambda on: hidden_states(model, 24, 4, torch.bfloat16, native=on))
    finally:
        native.row_group_rows, native.row_group_layer_bytes = kept
    assert ran == expected(taken, 0)  # 24 rows: none with AMX


def draft_steps(model, rows_per_seq: list[int], native: bool, seed: int = 0):
    """Prompts one by one, then one decode step where sequence s runs rows_per_seq[s] rows (its
    token and its drafts: consecutive positions, each attending to the context up to itself)."""
    kept, model.native = model.native, (model.native if native else None)
    try:
        g = torch.Generator().manual_seed(seed)
        vocab, per_seq = model.config.vocab_size, 8
        num_seqs = len(rows_per_seq)
        caches = allocate_kv_caches(model.config, num_seqs * per_seq, BLOCK, torch.bfloat16, torch.device("cpu"))
        lengths = [3 + 5 * s % 13 for s in range(num_seqs)]
        outputs = prompts_one_by_one(model, caches, lengths, per_seq, g)
        table_rows, positions, slots, lens = [], [], [], []
        for s, (n, count) in enumerate(zip(lengths, rows_per_seq)):
            for position in range(n, n + count):
                table_rows.append(torch.arange(s * per_seq, (s + 1) * per_seq))
                positions.append(position)
                slots.append(s * per_seq * BLOCK + position)
                lens.append(position + 1)
        rows = len(positions)
        meta = AttentionMetadata(torch.tensor(slots), rows, torch.stack(table_rows), torch.tensor(lens), [], BLOCK)
        outputs.append(model(torch.randint(vocab, (rows,), generator=g), torch.tensor(positions), caches, meta))
        return outputs, caches
    finally:
        model.native = kept


@pytest.mark.parametrize("rows_per_seq, taken", [
    ([3] * 11, 1),  # quarters end inside sequences' rows: after rows 7 and 15
    ([1, 4, 2, 3, 1, 1, 4, 2, 3, 2, 1, 4], 1),  # after row 13
    ([1] * 5 + [7] + [1] * 12, 1),  # moved past the 7 rows, the second group would be one row
    ([24], 0),  # one sequence's rows: one group, the whole step
])
def test_a_sequences_draft_rows_stay_in_one_group(model, rows_per_seq, taken):
    """A group starting inside a sequence's rows would attend to keys its neighbour had not written
    yet; a group of one row would take int4_linear's residual pass, which the whole step does not."""
    python, native, ran = run_both(model, lambda on: draft_steps(model, rows_per_seq, on))
    assert ran == expected(taken, 0)  # with AMX none: under 32 rows, or a group under 16
    assert_identical(python, native)


def sharers_step(model, prefixes: list[int], native: bool):
    """A sequence per entry of `prefixes`, reading that many tokens of one prompt (as the prefix
    cache lays a shared prompt's blocks out; 0: nothing of it) and writing 2 tokens of its own; then
    one decode step of all of them."""
    kept, model.native = model.native, (model.native if native else None)
    try:
        g = torch.Generator().manual_seed(1)
        vocab, num_seqs, shared = model.config.vocab_size, len(prefixes), max(prefixes)
        prompt_blocks, own_blocks = shared // BLOCK, 2
        caches = allocate_kv_caches(model.config, prompt_blocks + num_seqs * own_blocks, BLOCK, torch.bfloat16,
                                    torch.device("cpu"))
        meta = AttentionMetadata(torch.arange(shared), 0, None, None, [PrefillSeq(0, shared, shared, None)])
        outputs = [model(torch.randint(vocab, (shared,), generator=g), torch.arange(shared), caches, meta)]
        tables, slots = [], []
        for s, prefix in enumerate(prefixes):
            own = prompt_blocks + s * own_blocks
            table = torch.cat([torch.arange(prefix // BLOCK), torch.arange(own, own + own_blocks)])
            own_slots = torch.arange(2) + own * BLOCK
            context = torch.cat([torch.arange(prefix), own_slots]) if prefix else None
            meta = AttentionMetadata(own_slots, 0, None, None, [PrefillSeq(0, 2, prefix + 2, context)])
            outputs.append(model(torch.randint(vocab, (2,), generator=g), torch.arange(prefix, prefix + 2), caches, meta))
            tables.append(torch.nn.functional.pad(table, (0, prompt_blocks + own_blocks - len(table))))
            slots.append(own * BLOCK + 2)
        lens = torch.tensor(prefixes) + 3
        meta = AttentionMetadata(torch.tensor(slots), num_seqs, torch.stack(tables), lens, [], BLOCK)
        outputs.append(model(torch.randint(vocab, (num_seqs,), generator=g), lens - 1, caches, meta))
        return outputs, caches
    finally:
        model.native = kept


def test_a_step_sharing_a_prefix_keeps_its_rows_together(model):
    """32 sequences over one 1,024-token prefix: where the shared pass runs (AVX512-BF16), the step
    is not split; without it, the groups take it."""
    from lmserve.kernels import cpu_flags

    python, native, ran = run_both(model, lambda on: sharers_step(model, [1024] * 32, on))
    assert ran == (GROUPS and "avx512_bf16" not in cpu_flags())
    assert_identical(python, native)


def test_groups_never_take_the_shared_pass_the_whole_step_did_not(model):
    """8 sequences over a 2,048-token prompt, 8 more over its first 512 tokens, 16 of their own: the
    whole step does not take the shared pass (16 x 512 shared reads, under its 16,384), the first
    group of rows (the 8 deep ones, 8 x 2,048) would: groups must not."""
    python, native, ran = run_both(model, lambda on: sharers_step(model, [2048] * 8 + [512] * 8 + [0] * 16, on))
    assert ran == GROUPS
    assert_identical(python, native)


def test_the_engine_gives_the_same_tokens_with_and_without_row_groups():
    """32 greedy requests on the default model (int4) through the real runner (its block tables
    padded with block 0, its slots): the same tokens whether its decode steps run as groups."""
    from lmserve.cli import default_model_path
    from lmserve.request import SamplingParams
    from lmserve.weights.load import load_model
    from tests.helpers.real_engine import PROMPTS, chat_ids, make_engine

    loaded = load_model(default_model_path(), "int4", max_positions=1024)
    prompts = [chat_ids(loaded.tokenizer, f"{text} ({i})") for i in range(4) for text in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=44, ignore_eos=True)  # a prompt a step is seated
    tokens, steps = [], []
    for rows in (0, 24):
        engine = make_engine(loaded, kv_bytes=256 << 20, budget=512, max_seqs=32, prefix_caching=False)
        native = engine.model.native
        native.row_group_rows, before = rows, native.row_group_steps
        tokens.append(engine.generate(prompts, params))
        steps.append(native.row_group_steps - before)
    assert steps[0] == 0 and (steps[1] >= 8) == GROUPS, steps  # steps of 24-32 rows decoding (with AMX, the 32-row ones)
    assert tokens[0] == tokens[1]
