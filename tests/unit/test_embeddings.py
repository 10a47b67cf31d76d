"""Pooling, sentence-transformers config reading, and the embedding worker's batching."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest
import torch

from lmserve.cli import default_embedding_model_path
from lmserve.embeddings.pooling import Pooling, read_sentence_transformer_config
from lmserve.embeddings.worker import EmbeddingWorker, _chunks, embed_in_batches
from lmserve.weights.gguf import UnsupportedModelError

# (B=2, L=3, H=2); the second row has one padding position holding a value that must not count
HIDDEN = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, -6.0]],
                       [[2.0, 0.0], [4.0, 2.0], [100.0, 100.0]]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


@pytest.mark.parametrize("mode, expected", [
    ("mean", [[3.0, 0.0], [3.0, 1.0]]),
    ("cls", [[1.0, 2.0], [2.0, 0.0]]),
    ("max", [[5.0, 4.0], [4.0, 2.0]]),
    ("last", [[5.0, -6.0], [4.0, 2.0]]),
])
def test_pooling_modes_ignore_padding(mode, expected):
    assert torch.equal(Pooling(mode, normalize=False)(HIDDEN, MASK), torch.tensor(expected))


def test_normalized_pooling_is_unit_length_and_parallel():
    raw = Pooling("mean", normalize=False)(HIDDEN, MASK)
    unit = Pooling("mean", normalize=True)(HIDDEN, MASK)
    assert torch.allclose(unit.norm(dim=1), torch.ones(2))
    assert torch.allclose(unit * raw.norm(dim=1, keepdim=True), raw)


def test_unknown_pooling_mode_is_refused():
    with pytest.raises(ValueError, match="weighted"):
        Pooling("weighted", normalize=False)


def test_packaged_minilm_config_is_read_from_its_files():
    config = read_sentence_transformer_config(default_embedding_model_path())
    assert config.pooling == Pooling("mean", normalize=True)
    assert config.max_seq_length == 256


def _st_folder(tmp_path, pooling: dict, modules=("Transformer", "Pooling")):
    entries = [{"idx": i, "name": str(i), "path": "1_Pooling" if kind == "Pooling" else "",
                "type": f"sentence_transformers.models.{kind}"} for i, kind in enumerate(modules)]
    (tmp_path / "modules.json").write_text(json.dumps(entries))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return tmp_path


def test_cls_pooling_without_normalize(tmp_path):
    folder = _st_folder(tmp_path, {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    config = read_sentence_transformer_config(folder)
    assert config.pooling == Pooling("cls", normalize=False) and config.max_seq_length is None


@pytest.mark.parametrize("pooling, modules, message", [
    ({"pooling_mode_mean_tokens": True}, ("Transformer", "Pooling", "Dense"), "Dense"),
    ({"pooling_mode_mean_sqrt_len_tokens": True}, ("Transformer", "Pooling"), "mean_sqrt_len"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, ("Transformer", "Pooling"), "max"),
])
def test_pipelines_we_cannot_reproduce_are_refused(tmp_path, pooling, modules, message):
    with pytest.raises(UnsupportedModelError, match=message):
        read_sentence_transformer_config(_st_folder(tmp_path, pooling, modules))


def test_plain_hf_folder_gets_mean_pooling_normalized(tmp_path):
    assert read_sentence_transformer_config(tmp_path).pooling == Pooling("mean", normalize=True)


# ---------------------------------------------------------------- batching


class RecordingEmbedder:
    """vector = (length, sum of ids, first id); records each forward's batch. With `gate`, the
    first forward waits for it, so that later requests queue up meanwhile."""

    dim = 3
    vocab_size = 1000
    max_input_tokens = 16
    tokenizer = None

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[list[list[int]]] = []
        self.gate = gate
        self.started = threading.Event()

    def embed(self, batch: list[list[int]]) -> torch.Tensor:
        self.calls.append(batch)
        self.started.set()
        if self.gate is not None and len(self.calls) == 1:
            self.gate.wait(10)
        return torch.tensor([[len(ids), sum(ids), ids[0]] for ids in batch], dtype=torch.float32)


def test_chunks_respect_the_padded_token_budget():
    lengths = [5, 1, 3, 3, 8]
    order = sorted(range(5), key=lambda i: lengths[i])
    chunks = _chunks(order, lengths, max_batch_tokens=9)
    assert chunks == [[1, 2, 3], [0], [4]]  # 3 x 3 = 9 fits; 4 x 5 would not
    assert all(len(c) * max(lengths[i] for i in c) <= 9 for c in chunks)


def test_embed_in_batches_returns_rows_in_input_order():
    embedder = RecordingEmbedder()
    inputs = [[7] * 5, [1], [2, 2, 2], [3, 3, 3], [9] * 8]
    out = embed_in_batches(embedder, inputs, max_batch_tokens=9)
    assert out.dtype == np.float32
    assert out.tolist() == [[len(ids), sum(ids), ids[0]] for ids in inputs]
    assert [len(call) for call in embedder.calls] == [3, 1, 1]


def test_requests_arriving_together_share_one_forward():
    gate = threading.Event()
    embedder = RecordingEmbedder(gate)
    worker = EmbeddingWorker(embedder, max_batch_tokens=64)

    async def scenario():
        first = asyncio.ensure_future(worker.embed([[1, 2]]))
        await asyncio.get_running_loop().run_in_executor(None, embedder.started.wait, 10)
        later = [asyncio.ensure_future(worker.embed([[10 + k], [20 + k, 1]])) for k in range(3)]
        await asyncio.sleep(0.05)  # let the three jobs reach the queue while the first forward runs
        gate.set()
        return await first, await asyncio.gather(*later)

    first, later = asyncio.run(scenario())
    worker.shutdown()
    assert first.tolist() == [[2, 3, 1]]
    assert [rows.tolist() for rows in later] == [[[1, 10 + k, 10 + k], [2, 21 + k, 20 + k]] for k in range(3)]
    assert len(embedder.calls) == 2 and len(embedder.calls[1]) == 6  # the three requests, one forward


def test_requests_cancelled_while_queued_are_not_computed():
    # a client that hung up while its job waited behind a long forward costs no forward of its own
    gate = threading.Event()
    embedder = RecordingEmbedder(gate)
    worker = EmbeddingWorker(embedder, max_batch_tokens=64)

    async def scenario():
        first = asyncio.ensure_future(worker.embed([[1, 2]]))
        await asyncio.get_running_loop().run_in_executor(None, embedder.started.wait, 10)
        gone = asyncio.ensure_future(worker.embed([[7] * 9]))
        kept = asyncio.ensure_future(worker.embed([[5]]))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        return await first, await kept

    first, kept = asyncio.run(scenario())
    worker.shutdown()
    assert kept.tolist() == [[1, 5, 5]]
    assert embedder.calls == [[[1, 2]], [[5]]]


def gated_worker_of_8_tokens() -> tuple[threading.Event, RecordingEmbedder, EmbeddingWorker]:
    """A worker whose forwards take at most 8 tokens, and whose first forward waits for the gate."""
    gate = threading.Event()
    embedder = RecordingEmbedder(gate)
    embedder.max_input_tokens = 8
    return gate, embedder, EmbeddingWorker(embedder, max_batch_tokens=8)


def test_a_request_abandoned_mid_run_skips_its_remaining_forwards():
    # 4 inputs of 8 ids with a budget of 8 tokens: 4 forwards; the client leaves during the first
    gate, embedder, worker = gated_worker_of_8_tokens()

    async def scenario():
        gone = asyncio.ensure_future(worker.embed([[i] * 8 for i in range(1, 5)]))
        await asyncio.get_running_loop().run_in_executor(None, embedder.started.wait, 10)
        gone.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        return await worker.embed([[5]])  # served next: the worker is free again

    after = asyncio.run(scenario())
    worker.shutdown()
    assert after.tolist() == [[1, 5, 5]]
    assert embedder.calls == [[[1] * 8], [[5]]]  # one forward of the abandoned request, not four


def test_a_run_shared_with_a_waiting_client_is_finished():
    # two requests in one run: one client leaving does not cut the other's forwards
    gate, embedder, worker = gated_worker_of_8_tokens()

    async def scenario():
        first = asyncio.ensure_future(worker.embed([[9]]))
        await asyncio.get_running_loop().run_in_executor(None, embedder.started.wait, 10)
        gone = asyncio.ensure_future(worker.embed([[1] * 8, [2] * 8]))
        kept = asyncio.ensure_future(worker.embed([[3] * 8]))
        await asyncio.sleep(0.05)
        gate.set()  # both wait behind the first forward, then run together: 3 forwards
        while len(embedder.calls) < 2:
            await asyncio.sleep(0.001)
        gone.cancel()
        return await first, await kept

    first, kept = asyncio.run(scenario())
    worker.shutdown()
    assert kept.tolist() == [[8, 24, 3]]
    assert len(embedder.calls) == 4


def test_a_failing_forward_fails_its_requests_and_the_worker_lives_on():
    class Flaky(RecordingEmbedder):
        def embed(self, batch):
            if batch[0][0] == 0:
                raise RuntimeError("device fell over")
            return super().embed(batch)

    worker = EmbeddingWorker(Flaky(), max_batch_tokens=64)

    async def scenario():
        with pytest.raises(RuntimeError, match="device fell over"):
            await worker.embed([[0]])
        return await worker.embed([[5]])

    assert asyncio.run(scenario()).tolist() == [[1, 5, 5]]
    worker.shutdown()
