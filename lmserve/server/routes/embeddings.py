"""POST /embeddings: token ids per input, vectors from the embedding worker, OpenAI's response;
llama.cpp's (a list of {index, embedding}) for its `content` form, also at /embedding."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from lmserve.server.errors import CLIENT_CLOSED_REQUEST
from lmserve.server.protocol import EmbeddingRequest, EmbeddingResponse, LlamaEmbedding
from lmserve.server.requests.embeddings import embedding_inputs, normalized
from lmserve.server.responses.embeddings import embedding_response
from lmserve.server.routes.disconnect import until_disconnected
from lmserve.server.state import State, json_response

router = APIRouter()


@router.post("/embeddings", response_model=EmbeddingResponse | list[LlamaEmbedding])  # OpenAI's; llama.cpp's
@router.post("/embedding", include_in_schema=False)  # llama.cpp's older name
async def create_embeddings(body: EmbeddingRequest, request: Request, state: State) -> Response:
    lease = await state.embedding_model(body.model, body.keep_alive)
    try:
        worker = lease.model.embedder()
        # In a worker thread, as generation plans are: up to 2048 texts to tokenize.
        batch = await anyio.to_thread.run_sync(embedding_inputs, body, worker.embedder, abandon_on_cancel=True)
        vectors = await until_disconnected(request.receive, worker.embed(batch))
    finally:
        lease.release()
    if vectors is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if body.content is not None:
        vectors = normalized(vectors, body.embd_normalize, worker.embedder.pooling.normalize)
        return JSONResponse([{"index": i, "embedding": [row.tolist()]} for i, row in enumerate(vectors)])
    num_tokens = sum(len(ids) for ids in batch)
    return json_response(embedding_response(lease.entry.id, vectors, num_tokens, body.encoding_format))
