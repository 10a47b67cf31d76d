"""Embedding vectors -> OpenAI's /v1/embeddings response, as floats or base64."""

from __future__ import annotations

import base64

import numpy as np

from lmserve.server.protocol import Embedding, EmbeddingResponse, EmbeddingUsage


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
