"""The fleet's loader on the packaged model: preloaded messages come from the prefix cache, and
closing the model lets go of it."""

from __future__ import annotations

import asyncio
import gc

import pytest

from lmserve.cli import default_model_path
from lmserve.config import CacheConfig, EmbeddingConfig, EngineConfig, SchedulerConfig
from lmserve.fleet.catalogue import ModelEntry
from lmserve.fleet.models import model_loader
from lmserve.request import SamplingParams

SYSTEM = ("You are the assistant of a small bakery in Lyon. Answer in one short sentence, name prices in "
          "euros, never promise deliveries, and recommend the croissants when asked what is good today.")


def first_request_cached_tokens(preload) -> tuple[int, int]:
    """(prompt tokens, of those cached) of the first request to a model loaded with `preload`."""
    defaults = EngineConfig(str(default_model_path()), "unused", dtype="float32",
                            cache=CacheConfig(16, 32 << 20), scheduler=SchedulerConfig(max_model_len=512))
    entry = ModelEntry(id="smol", source=str(default_model_path()), preload=preload)
    try:
        model = model_loader(defaults, EmbeddingConfig("", ""))(entry)
    finally:
        gc.unfreeze()  # the loader freezes what it loaded, as a server wants; not this test process
    engine = model.engine
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is good today?"}]
    ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages), add_special_tokens=False)

    async def run():
        return [o async for o in engine.generate("first", ids, SamplingParams(temperature=0, max_tokens=2))]

    outputs = asyncio.run(run())
    system_turn = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages[:1], add_generation_prompt=False),
                                          add_special_tokens=False)
    model.close("the test is over")
    assert engine.model is None  # closed: the weights are let go
    return len(system_turn), outputs[-1].num_cached_tokens


def test_preloaded_messages_are_cached_for_the_first_request():
    system_tokens, cold = first_request_cached_tokens(None)
    _, warm = first_request_cached_tokens([{"role": "system", "content": SYSTEM}])
    assert cold == 0
    assert warm == system_tokens // 16 * 16 >= 32  # every full KV block of the system turn


@pytest.mark.parametrize("dtype", ["int4", "int8", "bfloat16", "float32"])
def test_the_size_estimate_matches_the_loaded_weights(dtype):
    from lmserve.fleet.models import weights_bytes
    from lmserve.weights.load import load_model
    from lmserve.weights.size import estimated_weight_bytes

    loaded = load_model(default_model_path(), dtype, max_positions=512)
    actual = weights_bytes(loaded.model)
    assert abs(estimated_weight_bytes(default_model_path(), dtype) - actual) <= 0.03 * actual
