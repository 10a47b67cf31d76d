"""The BERT encoder against transformers: a tiny random model with padding in the batch, and the
packaged all-MiniLM-L6-v2 against transformers' BertModel + mean pooling + L2 normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmserve.cli import default_embedding_model_path
from lmserve.embeddings.embedder import EncoderEmbedder, pad_right
from lmserve.embeddings.worker import embed_in_batches
from lmserve.model.bert import load_bert
from tests.helpers.embedding_reference import minilm_reference

LENGTHS = (3, 12, 1, 7)


def tiny_bert(hidden_act: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=40, hidden_act=hidden_act,
                                     layer_norm_eps=1e-12)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # LayerNorms start as ones/zeros and biases as zeros: make them matter
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.normal_(0.5, 0.3)
    return model


def random_batch(vocab_size: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in LENGTHS]


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_tiny_bert_matches_transformers_with_padding(tmp_path, hidden_act):
    reference = tiny_bert(hidden_act)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    model = load_bert(tmp_path)
    batch = random_batch(reference.config.vocab_size)
    ids, mask = pad_right(batch, torch.device("cpu"))
    ours = model(ids, mask)  # (B, L, H)
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert torch.allclose(ours[mask], theirs[mask], atol=1e-5), (ours[mask] - theirs[mask]).abs().max()
    for row, seq in enumerate(batch):  # batched == one-by-one: padding changes nothing
        alone = model(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.bool))[0]
        assert torch.allclose(ours[row, : len(seq)], alone, atol=1e-5)


def test_checkpoint_names_may_carry_a_bert_prefix(tmp_path):
    reference = tiny_bert("gelu")
    reference.save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({f"bert.{name}": t for name, t in tensors.items()}, tmp_path / "model.safetensors")
    batch = [random_batch(120)[1]]
    ids, mask = pad_right(batch, torch.device("cpu"))
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
    assert torch.allclose(load_bert(tmp_path)(ids, mask), expected, atol=1e-5)


def test_loading_is_strict(tmp_path):
    tiny_bert("gelu").save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["encoder.layer.1.output.dense.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing 1 parameters.*encoder.layer.1.output.dense.bias"):
        load_bert(tmp_path)


# ---------------------------------------------------------------- the packaged all-MiniLM-L6-v2

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Une phrase en français, avec des accents: élève, à côté.",
]


@pytest.fixture(scope="module")
def minilm():
    return EncoderEmbedder.from_folder(default_embedding_model_path())


@pytest.fixture(scope="module")
def reference_embeddings():
    return minilm_reference(SENTENCES)


def test_minilm_tokenizes_like_transformers(minilm, reference_embeddings):
    ids, _ = reference_embeddings
    assert [minilm.tokenizer.encode(s) for s in SENTENCES] == ids
    assert minilm.max_input_tokens == 256 and minilm.dim == 384


def test_minilm_vectors_and_cosines_match_the_reference(minilm, reference_embeddings):
    _, expected = reference_embeddings
    batch = [minilm.tokenizer.encode(s) for s in SENTENCES]
    ours = embed_in_batches(minilm, batch, max_batch_tokens=60)  # several padded forwards
    assert np.abs(ours - expected).max() < 1e-4
    assert np.abs(ours @ ours.T - expected @ expected.T).max() < 1e-4
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_minilm_similarity_makes_sense(minilm):
    vectors = minilm.embed([minilm.tokenizer.encode(s) for s in SENTENCES[:4]]).numpy()
    cosine = vectors @ vectors.T
    assert cosine[0, 1] > 0.6 > cosine[0, 3]  # eating vs eating, eating vs drums


def test_minilm_batch_equals_one_by_one(minilm):
    batch = [minilm.tokenizer.encode(s) for s in SENTENCES]
    together = minilm.embed(batch)
    alone = torch.cat([minilm.embed([ids]) for ids in batch])
    assert torch.allclose(together, alone, atol=1e-5)
