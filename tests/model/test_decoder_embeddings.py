"""Embeddings from the chat (decoder) model: a tiny random Llama against transformers' final
normed hidden states, and the packaged SmolLM2 for shape, unit norm and batch invariance."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from lmserve.embeddings.embedder import DecoderEmbedder
from lmserve.embeddings.pooling import Pooling
from lmserve.embeddings.worker import decoder_worker
from lmserve.weights.load import load_weights
from tests.helpers.tiny_models import save_hf_folder, tiny_hf_model

LENGTHS = (5, 1, 17, 9)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    reference = tiny_hf_model("llama", seed=3)
    folder = save_hf_folder(reference, tmp_path_factory.mktemp("tiny-llama"))
    model, _, _ = load_weights(folder)  # no tokenizer: these tests feed token ids
    return reference, model


def batch_of(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in LENGTHS]


def reference_vectors(reference, batch: list[list[int]], mode: str) -> torch.Tensor:
    """transformers' last_hidden_state (after the final norm), pooled one sequence at a time."""
    rows = []
    with torch.no_grad():
        for ids in batch:
            hidden = reference.model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (L, H)
            rows.append(hidden.mean(0) if mode == "mean" else hidden[-1])
    return F.normalize(torch.stack(rows), dim=1)


@pytest.mark.parametrize("mode", ["mean", "last"])
def test_tiny_llama_matches_transformers_hidden_states(tiny, mode):
    reference, model = tiny
    embedder = DecoderEmbedder(model, None, Pooling(mode, normalize=True), 256)
    batch = batch_of(model.config.vocab_size)
    ours = embedder.embed(batch)
    expected = reference_vectors(reference, batch, mode)
    assert ours.shape == (len(batch), model.config.hidden_size)
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


def test_tiny_llama_batch_equals_one_by_one(tiny):
    _, model = tiny
    embedder = DecoderEmbedder(model, None, Pooling("mean", normalize=True), 256)
    batch = batch_of(model.config.vocab_size)
    alone = torch.cat([embedder.embed([ids]) for ids in batch])
    assert torch.allclose(embedder.embed(batch), alone, atol=1e-5)


def test_smollm2_embeddings_shape_norm_and_batch_invariance(default_model):
    embedder = DecoderEmbedder(default_model.model, default_model.tokenizer, Pooling("mean", normalize=True), 2048)
    texts = ["The capital of France is Paris.", "Paris is France's capital city.", "I like green tea."]
    batch = [default_model.tokenizer.encode(t) for t in texts]
    together = embedder.embed(batch)
    assert together.shape == (3, default_model.config.hidden_size) and together.dtype == torch.float32
    assert torch.allclose(together.norm(dim=1), torch.ones(3), atol=1e-5)
    alone = torch.cat([embedder.embed([ids]) for ids in batch])
    assert torch.allclose(together, alone, atol=1e-4)
    assert not torch.allclose(together[0], together[2], atol=1e-2)  # different texts, different vectors


class EngineStub:
    """What decoder_worker reads from an AsyncEngine: model, tokenizer, max_model_len."""

    def __init__(self, loaded):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_model_len = 2048


def test_decoder_worker_embeds_off_the_event_loop(default_model):
    worker = decoder_worker(EngineStub(default_model), "last")
    ids = default_model.tokenizer.encode("hello there")

    async def run():
        return await asyncio.gather(worker.embed([ids]), worker.embed([ids, ids[:1]]))

    single, pair = asyncio.run(run())
    worker.shutdown()
    assert worker.embedder.pooling == Pooling("last", normalize=True) and worker.embedder.max_input_tokens == 2048
    assert abs(single[0] - pair[0]).max() < 1e-4 and abs(pair[0] - pair[1]).max() > 1e-3
