"""Fill-in-the-middle on a real model: a tiny random llama whose GGUF carries the default model's
tokenizer plus three FIM tokens and llama.cpp's fim_*_token_id keys, served by `lmserve serve`."""

from __future__ import annotations

import gguf
import httpx
import pytest

from lmserve.cli import default_model_path
from lmserve.text.tokenizer import Tokenizer
from lmserve.weights.gguf import GGUFFile
from tests.helpers.live_server import start_server
from tests.helpers.tiny_models import tiny_hf_model, write_gguf

FIM_TEXTS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]
T = gguf.GGUFValueType


def fim_tokenizer_metadata() -> dict:
    """The default model's tokenizer with three FIM control tokens appended."""
    meta = GGUFFile.open(default_model_path()).metadata
    tokens = list(meta["tokenizer.ggml.tokens"]) + FIM_TEXTS
    first = len(tokens) - 3
    return {
        "tokenizer.ggml.model": (meta["tokenizer.ggml.model"], T.STRING),
        "tokenizer.ggml.pre": (meta["tokenizer.ggml.pre"], T.STRING),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.token_type": (list(meta["tokenizer.ggml.token_type"]) + [3, 3, 3], T.ARRAY, T.INT32),
        "tokenizer.ggml.merges": (list(meta["tokenizer.ggml.merges"]), T.ARRAY, T.STRING),
        "tokenizer.ggml.bos_token_id": (meta["tokenizer.ggml.bos_token_id"], T.UINT32),
        "tokenizer.ggml.eos_token_id": (meta["tokenizer.ggml.eos_token_id"], T.UINT32),
        "tokenizer.ggml.fim_pre_token_id": (first, T.UINT32),
        "tokenizer.ggml.fim_suf_token_id": (first + 1, T.UINT32),
        "tokenizer.ggml.fim_mid_token_id": (first + 2, T.UINT32),
    }


@pytest.fixture(scope="module")
def fim_gguf(tmp_path_factory):
    metadata = fim_tokenizer_metadata()
    vocab_size = len(metadata["tokenizer.ggml.tokens"][0])
    model = tiny_hf_model("llama", vocab_size=vocab_size, max_position_embeddings=512)
    return write_gguf(model, tmp_path_factory.mktemp("fim") / "fim.gguf", "llama", tokenizer_metadata=metadata)


def test_the_tokenizer_reads_fim_ids_from_the_gguf(fim_gguf):
    tokenizer = Tokenizer.from_gguf(GGUFFile.open(fim_gguf))
    first = tokenizer.vocab_size - 3
    assert (tokenizer.fim.prefix, tokenizer.fim.suffix, tokenizer.fim.middle) == (first, first + 1, first + 2)
    assert tokenizer.fim.missing == []


def test_infill_and_suffix_on_a_served_fim_model(fim_gguf):
    proc, url, _ = start_server(str(fim_gguf), "--no-embedding-model", "--max-model-len", "256")
    try:
        body = httpx.post(f"{url}/infill", json={"input_prefix": "def f(", "input_suffix": "):\n", "n_predict": 4,
                                                 "temperature": 0}, timeout=60).json()
        assert body["tokens_predicted"] == 4 and body["stop_type"] == "limit"
        assert body["prompt"].index("<fim_prefix>def f(") < body["prompt"].index("<fim_suffix>):\n<fim_middle>")
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "a = ", "suffix": "\n", "max_tokens": 2},
                              timeout=60)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
