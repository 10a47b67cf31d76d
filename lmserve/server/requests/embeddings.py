"""/v1/embeddings requests -> checked token-id lists, one per input; llama.cpp's normalisations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from lmserve.server.errors import bad_request
from lmserve.server.protocol import EmbeddingRequest
from lmserve.server.requests.tokens import checked_token_ids, encode_text

if TYPE_CHECKING:
    from lmserve.embeddings.embedder import Embedder

MAX_INPUTS = 2048  # OpenAI's limit on the number of inputs in one request


def embedding_inputs(request: EmbeddingRequest, embedder: Embedder) -> list[list[int]]:
    """One token-id list per input, each non-empty, in the vocabulary and within the model's
    input length; `dimensions` checked too. Texts get the model's special tokens (BERT's
    [CLS] ... [SEP]); token-id inputs are taken exactly as given."""
    _check_dimensions(request.dimensions, embedder.dim)
    items = _input_items(_inputs(request))
    if len(items) > MAX_INPUTS:
        raise bad_request(f"'input' has {len(items)} items; at most {MAX_INPUTS} are allowed", param="input")
    return [_input_ids(item, param, embedder) for param, item in items]


def _inputs(request: EmbeddingRequest) -> str | list[str] | list[int] | list[list[int]]:
    if (request.input is None) == (request.content is None):
        raise bad_request("send 'input' (OpenAI) or 'content' (llama.cpp), one of them", param="input")
    if request.content is not None and request.dimensions is not None:
        raise bad_request("'dimensions' goes with 'input', not llama.cpp's 'content'", param="dimensions")
    return request.input if request.input is not None else request.content


def normalized(vectors: np.ndarray, norm: int, model_normalizes: bool) -> np.ndarray:
    """llama.cpp's embd_normalize of (n, dim) `vectors`: -1 none, 0 scaled so the largest
    magnitude is 32760 (int16's range), 1 taxicab, 2 Euclidean, p > 2 the p-norm. Every norm is
    blind to scale, so a vector the model already L2-normalised gives the same result; only -1
    needs the raw vector, which such a model never hands out."""
    if norm == -1:
        if model_normalizes:
            raise bad_request("embd_normalize -1: this model's embeddings are always L2-normalised",
                              param="embd_normalize", code="unsupported_parameter")
        return vectors
    if norm == 0:
        scale = np.abs(vectors).max(axis=1, keepdims=True) / 32760.0
    else:
        scale = (np.abs(vectors) ** norm).sum(axis=1, keepdims=True) ** (1.0 / norm)
    return vectors / np.where(scale > 0, scale, 1.0)


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
        ids = encode_text(embedder.tokenizer, item, add_special_tokens=True, param=param,
                          max_num_tokens=embedder.max_input_tokens)
    else:
        ids = checked_token_ids(item, embedder.vocab_size, param)
    if len(ids) > embedder.max_input_tokens:
        raise bad_request(f"'{param}' has {len(ids)} tokens; this model's maximum input length is "
                          f"{embedder.max_input_tokens} tokens", param=param, code="context_length_exceeded")
    return ids
