"""/v1/embeddings: request -> checked token-id lists, vectors -> OpenAI's response shape."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import numpy as np

from lmserve.server.convert import checked_token_ids, encode_text
from lmserve.server.errors import bad_request
from lmserve.server.protocol import (
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)

if TYPE_CHECKING:
    from lmserve.embeddings.embedder import Embedder

MAX_INPUTS = 2048  # OpenAI's limit on the number of inputs in one request


def embedding_inputs(request: EmbeddingRequest, embedder: Embedder) -> list[list[int]]:
    """One token-id list per input, each non-empty, in the vocabulary and within the model's
    input length; `dimensions` checked too. Texts get the model's special tokens (BERT's
    [CLS] ... [SEP]); token-id inputs are taken exactly as given."""
    _check_dimensions(request.dimensions, embedder.dim)
    items = _input_items(request.input)
    if len(items) > MAX_INPUTS:
        raise bad_request(f"'input' has {len(items)} items; at most {MAX_INPUTS} are allowed", param="input")
    return [_input_ids(item, param, embedder) for param, item in items]


def _check_dimensions(dimensions: int | None, native: int) -> None:
    # Truncating a vector is only meaningful for Matryoshka-trained models; none served here is.
    if dimensions is not None and dimensions != native:
        raise bad_request(f"'dimensions' must be {native} for this model (its embedding size), not {dimensions}",
                          param="dimensions")


def _input_items(value: str | list[str] | list[int] | list[list[int]]) -> list[tuple[str, str | list[int]]]:
    """(param naming it, item) for each text or token-id list of the request."""
    if isinstance(value, str):
        return [("input", value)]
    if not value:
        raise bad_request("'input' must not be empty", param="input")
    if isinstance(value[0], int):
        return [("input", value)]
    return [(f"input[{i}]", item) for i, item in enumerate(value)]


def _input_ids(item: str | list[int], param: str, embedder: Embedder) -> list[int]:
    if not item:
        raise bad_request(f"'{param}' must not be empty", param=param)
    if isinstance(item, str):
        ids = encode_text(embedder.tokenizer, item, add_special_tokens=True, param=param)
    else:
        ids = checked_token_ids(item, embedder.vocab_size, param)
    if len(ids) > embedder.max_input_tokens:
        raise bad_request(f"'{param}' has {len(ids)} tokens; this model's maximum input length is "
                          f"{embedder.max_input_tokens} tokens", param=param, code="context_length_exceeded")
    return ids


def embedding_response(model_id: str, vectors: np.ndarray, num_tokens: int,
                       encoding_format: str | None) -> EmbeddingResponse:
    """vectors (N, dim) float32 -> OpenAI's list of embeddings, as floats or base64."""
    encode = _base64 if encoding_format == "base64" else np.ndarray.tolist
    data = [Embedding(index=i, embedding=encode(row)) for i, row in enumerate(vectors)]
    return EmbeddingResponse(data=data, model=model_id, usage=EmbeddingUsage(prompt_tokens=num_tokens,
                                                                             total_tokens=num_tokens))


def _base64(row: np.ndarray) -> str:
    """Little-endian float32 bytes, base64: what the openai client decodes with np.frombuffer."""
    return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
