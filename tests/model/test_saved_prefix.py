"""Saving a cached prefix's KV to a file and restoring it, on tiny random models: a restarted engine
restored from the file reports the prefix as cached and computes exactly what the first engine does
from its own cache; a file of another model, a damaged one or one that does not fit is handled as
LLMEngine.restore_prefix documents; and all of it through AsyncEngine."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass

import pytest
import torch

from lmserve.engine.async_engine import AsyncEngine
from lmserve.engine.step_types import EngineClosed
from lmserve.request import SamplingParams
from tests.helpers.real_engine import tiny_engine
from tests.helpers.tiny_models import save_hf_folder, tiny_hf_model

BLOCK = 4  # tiny_engine's block size
PROMPT = torch.randint(0, 300, (23,), generator=torch.Generator().manual_seed(5)).tolist()  # 5 full blocks
OTHER = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(6)).tolist()
GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=3)


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[list[tuple[int, float]]]  # per token: the sampled one, then the top 3
    num_cached_tokens: int


def finish(engine, request_id: str) -> Generation:
    """Step `engine` until `request_id` finishes; what it generated."""
    token_ids, logprobs, last = [], [], None
    while last is None or last.finish_reason is None:
        for output in engine.step().outputs:
            if output.request_id == request_id:
                token_ids += output.new_token_ids
                logprobs += [[(s.sampled.token_id, s.sampled.logprob)] + [(t.token_id, t.logprob) for t in s.top]
                             for s in output.new_logprobs or []]
                last = output
    return Generation(token_ids, logprobs, last.num_cached_tokens)


def run(engine, prompt: list[int], params: SamplingParams = GREEDY, request_id: str = "r") -> Generation:
    engine.add_request(request_id, prompt, params)
    return finish(engine, request_id)


def assert_close(got: Generation, expected: Generation) -> None:
    assert got.token_ids == expected.token_ids
    for got_row, expected_row in zip(got.logprobs, expected.logprobs, strict=True):
        assert [i for i, _ in got_row] == [i for i, _ in expected_row]
        assert [lp for _, lp in got_row] == pytest.approx([lp for _, lp in expected_row], abs=1e-5)


def assert_untouched(engine) -> None:
    """Nothing was restored: every block free and the prompt finds nothing cached."""
    load = engine.load()
    assert load.num_free_kv_blocks == load.num_kv_blocks
    assert run(engine, PROMPT).num_cached_tokens == 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_hf_folder(tiny_hf_model("llama", seed=0), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def saved(folder, tmp_path_factory):
    """A float32 engine's file of PROMPT's cached prefix, and what PROMPT generated with nothing
    cached and then with its prefix cached."""
    engine = tiny_engine(folder)
    uncached, cached = run(engine, PROMPT), run(engine, PROMPT)
    assert (uncached.num_cached_tokens, cached.num_cached_tokens) == (0, 5 * BLOCK)
    path = tmp_path_factory.mktemp("slots") / "prompt.bin"
    assert engine.save_prefix(PROMPT, path) == 5 * BLOCK
    return path, uncached, cached


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_a_restarted_engine_restored_from_the_file_computes_what_the_first_did(folder, tmp_path, dtype):
    first = tiny_engine(folder, dtype)
    uncached, cached = run(first, PROMPT), run(first, PROMPT)
    assert first.save_prefix(PROMPT, tmp_path / "slot.bin") == 5 * BLOCK
    restarted = tiny_engine(folder, dtype)
    assert restarted.restore_prefix(tmp_path / "slot.bin") == 5 * BLOCK
    restored = run(restarted, PROMPT)
    assert restored.num_cached_tokens == 5 * BLOCK
    assert restored == cached  # the same KV bits: bit-identical logprobs
    if dtype == "float32":
        assert_close(restored, uncached)


def test_an_int8_kv_cache_is_saved_and_restored_with_its_scales(folder, tmp_path):
    first = tiny_engine(folder, kv_cache_dtype="int8")
    uncached, cached = run(first, PROMPT), run(first, PROMPT)
    assert first.save_prefix(PROMPT, tmp_path / "slot.bin") == 5 * BLOCK
    restarted = tiny_engine(folder, kv_cache_dtype="int8")
    assert restarted.restore_prefix(tmp_path / "slot.bin") == 5 * BLOCK
    restored = run(restarted, PROMPT)
    assert restored.num_cached_tokens == 5 * BLOCK and restored == cached  # rows and scales came back


def test_float32_restore_matches_the_run_without_any_cache(folder, saved):
    path, uncached, _ = saved
    engine = tiny_engine(folder)
    assert engine.restore_prefix(path) == 5 * BLOCK
    assert engine.load().num_free_kv_blocks == engine.load().num_kv_blocks  # restored blocks are evictable
    restored = run(engine, PROMPT)
    assert restored.num_cached_tokens == 5 * BLOCK
    assert_close(restored, uncached)


def test_generated_tokens_are_saved_too(folder, tmp_path):
    engine = tiny_engine(folder)
    generated = run(engine, PROMPT).token_ids
    sequence = PROMPT + generated  # 31 tokens, the last never run through the model: 7 full blocks
    assert engine.save_prefix(sequence, tmp_path / "all.bin") == 7 * BLOCK
    restarted = tiny_engine(folder)
    assert restarted.restore_prefix(tmp_path / "all.bin") == 7 * BLOCK
    assert run(restarted, sequence[:30]).num_cached_tokens == 7 * BLOCK


def test_restoring_twice_keeps_the_blocks_already_cached(folder, saved):
    path, _, _ = saved
    engine = tiny_engine(folder)
    assert engine.restore_prefix(path) == 5 * BLOCK
    assert engine.restore_prefix(path) == 5 * BLOCK
    assert run(engine, PROMPT).num_cached_tokens == 5 * BLOCK


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    return save_hf_folder(tiny_hf_model("llama", seed=0, num_hidden_layers=3), tmp_path_factory.mktemp("deeper"))


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    return save_hf_folder(tiny_hf_model("llama", seed=1), tmp_path_factory.mktemp("reseeded"))


@pytest.mark.parametrize("model, settings, difference", [
    ("three_layers", {}, "num_hidden_layers: the file's 2, this engine's 3"),
    ("other_weights", {}, "weights: the file's '"),
    ("folder", {"dtype": "bfloat16"}, "dtype: the file's 'float32', this engine's 'bfloat16'"),
    ("folder", {"block_size": 8, "num_blocks": 32}, "block_size: the file's 4, this engine's 8"),
    ("folder", {"kv_cache_dtype": "int8"}, "kv_dtype: the file's 'float32', this engine's 'int8'"),
], ids=["layers", "weights", "dtype", "block_size", "kv_dtype"])
def test_a_file_of_another_model_or_layout_is_refused_naming_the_difference(request, saved, model, settings,
                                                                            difference):
    engine = tiny_engine(request.getfixturevalue(model), **settings)
    with pytest.raises(ValueError, match="was saved by another model or KV layout") as refused:
        engine.restore_prefix(saved[0])
    assert difference in str(refused.value)
    assert_untouched(engine)


def damage_by_truncating(data: bytes) -> bytes:
    return data[:-1000]


def damage_by_flipping(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    return bytes(flipped)


@pytest.mark.parametrize("damage, error", [(damage_by_truncating, "is truncated: it holds"),
                                           (damage_by_flipping, "is corrupt: its checksum does not match")])
def test_a_damaged_file_is_refused_and_restores_nothing(folder, saved, tmp_path, damage, error):
    path = tmp_path / "damaged.bin"
    path.write_bytes(damage(saved[0].read_bytes()))
    engine = tiny_engine(folder)
    with pytest.raises(ValueError, match=error):
        engine.restore_prefix(path)
    assert_untouched(engine)


def test_a_nearly_full_pool_takes_the_leading_blocks_that_fit_and_spares_running_requests(folder, saved):
    path, uncached, _ = saved
    busy = SamplingParams(temperature=0, max_tokens=2, logprobs=3)
    alone = run(tiny_engine(folder), OTHER, busy)
    engine = tiny_engine(folder, num_blocks=12)
    engine.add_request("busy", OTHER, busy)
    [prefilled] = engine.step().outputs  # its 30-token prompt holds 8 of the 12 blocks, room for 32 tokens
    assert engine.load().num_free_kv_blocks == 4
    assert engine.restore_prefix(path) == 4 * BLOCK  # of the file's 5 blocks
    decoded = finish(engine, "busy")  # reading the blocks it holds
    assert prefilled.new_token_ids + decoded.token_ids == alone.token_ids
    assert decoded.logprobs == alone.logprobs[1:]  # bit-identical: nothing wrote over its blocks
    restored = run(engine, PROMPT)
    assert restored.num_cached_tokens == 4 * BLOCK
    assert_close(restored, uncached)


def test_a_partly_cached_prefix_keeps_its_cached_blocks_when_the_rest_takes_the_last_free_ones(folder, saved):
    path, uncached, _ = saved
    engine = tiny_engine(folder, num_blocks=8)
    run(engine, PROMPT[:9], SamplingParams(temperature=0, max_tokens=1))  # caches PROMPT's first 2 blocks
    engine.add_request("busy", OTHER[:14], SamplingParams(temperature=0, max_tokens=2))
    engine.step()  # holds 4 blocks: 4 free, the 2 cached ones among them, least recently used last
    assert engine.restore_prefix(path) == 4 * BLOCK  # the 2 cached, then 2 of the other 3
    finish(engine, "busy")
    restored = run(engine, PROMPT)
    assert restored.num_cached_tokens == 4 * BLOCK
    assert_close(restored, uncached)


def test_saving_with_nothing_cached_replaces_the_file_with_an_empty_one(folder, saved, tmp_path):
    path = tmp_path / "slot.bin"
    shutil.copy(saved[0], path)  # an older save that must not survive
    engine = tiny_engine(folder)
    assert engine.save_prefix(PROMPT, path) == 0
    assert engine.save_prefix(PROMPT[:BLOCK - 1], path) == 0  # not one full block
    assert tiny_engine(folder).restore_prefix(path) == 0
    assert_untouched(engine)


def test_forget_prefix_drops_free_blocks_and_spares_held_ones(folder):
    engine = tiny_engine(folder)
    run(engine, PROMPT)
    engine.add_request("holder", PROMPT, GREEDY)
    engine.step()  # holds PROMPT's 5 cached blocks
    assert engine.forget_prefix(PROMPT) == 0
    engine.abort_request("holder")
    assert engine.forget_prefix(PROMPT) == 5 * BLOCK
    assert engine.forget_prefix(PROMPT) == 0
    assert run(engine, PROMPT).num_cached_tokens == 0


def test_the_model_is_known_by_its_checkpoints_contents_read_at_start(folder, tmp_path):
    moved = shutil.copytree(folder, tmp_path / "moved")
    engine = tiny_engine(moved)
    shutil.rmtree(moved)
    run(engine, PROMPT)
    assert engine.save_prefix(PROMPT, tmp_path / "slot.bin") == 5 * BLOCK
    assert tiny_engine(folder).restore_prefix(tmp_path / "slot.bin") == 5 * BLOCK  # same contents elsewhere


def test_an_engine_whose_checkpoint_is_not_on_disk_refuses_to_save(folder, tmp_path):
    engine = tiny_engine(folder, model_path=str(tmp_path / "gone"))
    run(engine, PROMPT)
    with pytest.raises(ValueError, match="is not on disk"):
        engine.save_prefix(PROMPT, tmp_path / "slot.bin")
    assert not (tmp_path / "slot.bin").exists()


def test_a_closed_engine_refuses(folder, saved, tmp_path):
    engine = tiny_engine(folder)
    engine.close()
    with pytest.raises(EngineClosed):
        engine.save_prefix(PROMPT, tmp_path / "slot.bin")
    with pytest.raises(EngineClosed):
        engine.restore_prefix(saved[0])
    with pytest.raises(EngineClosed):
        engine.forget_prefix(PROMPT)


async def generate(engine: AsyncEngine, request_id: str, prompt: list[int], params=GREEDY):
    outputs = [o async for o in engine.generate(request_id, prompt, params)]
    return [t for o in outputs for t in o.new_token_ids], outputs[-1].num_cached_tokens


def test_async_engine_saves_between_steps_restores_and_forgets(folder, saved, tmp_path):
    path, uncached, _ = saved
    first, restarted = AsyncEngine(tiny_engine(folder)), AsyncEngine(tiny_engine(folder))
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(path.read_bytes()[:100])

    async def main():
        await generate(first, "warm", PROMPT)
        long = first.generate("long", OTHER, SamplingParams(temperature=0, max_tokens=220))
        await anext(long)
        saved_count = await first.save_prefix(PROMPT, tmp_path / "slot.bin")
        assert first.snapshot()["num_running"] == 1  # saved between the steps of a running request
        assert [o async for o in long][-1].finish_reason is not None
        restored_count = await restarted.restore_prefix(tmp_path / "slot.bin")
        after_restore = await generate(restarted, "again", PROMPT)
        with pytest.raises(ValueError, match="truncated"):
            await restarted.restore_prefix(truncated)
        return saved_count, restored_count, after_restore, await restarted.forget_prefix(PROMPT)

    try:
        saved_count, restored_count, (token_ids, num_cached), forgotten = asyncio.run(main())
    finally:
        first.close()
        restarted.close()
    assert (saved_count, restored_count, num_cached, forgotten) == (5 * BLOCK,) * 4
    assert token_ids == uncached.token_ids
    with pytest.raises(EngineClosed):
        asyncio.run(first.save_prefix(PROMPT, tmp_path / "late.bin"))
