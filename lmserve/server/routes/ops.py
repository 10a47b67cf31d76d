"""The operator's routes: llama.cpp's /tokenize, /detokenize and /props, Prometheus /metrics, /health,
and the status document at / (`lmserve ps`)."""

from __future__ import annotations

import importlib.metadata
import time
from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from lmserve.fleet.fleet import ModelStatus, Slot
from lmserve.request import DEFAULT_DRY_BREAKERS, DryPenalty, SamplerChain, SamplingParams
from lmserve.server.errors import ERROR_RESPONSES, bad_request
from lmserve.server.metrics import CONTENT_TYPE
from lmserve.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    HealthStatus,
    TokenizeRequest,
    TokenizeResponse,
    TokenPiece,
)
from lmserve.server.requests.peer_sampling import LLAMA_REPEAT_LAST_N, sampler_names
from lmserve.server.requests.tokens import encode_text
from lmserve.server.responses.llama_native import generation_settings
from lmserve.server.state import ServerState, State, json_response
from lmserve.server.web import page, wants_page
from lmserve.text.chat_template import CHATML_TEMPLATE

BUILD_INFO = f"lmserve {importlib.metadata.version('lmserve')}"  # read once: it is package metadata on disk

# Served with and without /v1, like the OpenAI routes.
token_router = APIRouter(tags=["tokens"])
# Served at the root only.
server_router = APIRouter(tags=["server"])


@token_router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, state: State) -> Response:
    tokenizer = await _tokenizer(state, body.model)
    # In a worker thread, as the answer too: megabytes of text take seconds, the loop serves on.
    return await anyio.to_thread.run_sync(_tokenize, body, tokenizer)


def _tokenize(body: TokenizeRequest, tokenizer) -> Response:
    ids = encode_text(tokenizer, body.content, add_special_tokens=body.add_special, param="content",
                      parse_special=body.parse_special)
    tokens = [TokenPiece(id=i, piece=piece(tokenizer.token_bytes(i))) for i in ids] if body.with_pieces else ids
    return json_response(TokenizeResponse(tokens=tokens))


@token_router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, state: State) -> Response:
    """Special tokens are kept in the text, as llama.cpp does."""
    tokenizer = await _tokenizer(state, body.model)
    return await anyio.to_thread.run_sync(_detokenize, body, tokenizer)


def _detokenize(body: DetokenizeRequest, tokenizer) -> Response:
    for position, token_id in enumerate(body.tokens):
        if not 0 <= token_id < tokenizer.vocab_size:
            raise bad_request(f"token id {token_id} is not in the vocabulary (0 to {tokenizer.vocab_size - 1})",
                              param=f"tokens[{position}]", code="invalid_token_id")
    content = tokenizer.decode(body.tokens, skip_special_tokens=False)
    return json_response(DetokenizeResponse(content=content))


async def _tokenizer(state: ServerState, model: str | None):
    """The tokenizer of the chat model `model` names (loaded first if it is not)."""
    lease = await state.chat_model(model)
    lease.release()  # a tokenizer outlives its engine's unloading: nothing of the model is held
    return lease.model.engine.tokenizer


def piece(raw: bytes) -> str | list[int]:
    """A token's bytes as llama.cpp shows them: text if valid UTF-8, otherwise the byte values."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


@server_router.get("/health", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def health(state: State) -> JSONResponse:
    if not state.ready:  # 200 once the models served from start-up (chat and embedding) can answer
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok", **total_load(state)})


def total_load(state: ServerState) -> dict[str, int]:
    """The loaded chat models' load, added up (llama.cpp's /health fields, for one model or several)."""
    total = {"num_running": 0, "num_waiting": 0, "num_kv_blocks": 0, "num_free_kv_blocks": 0}
    for engine in state.loaded_engines().values():
        for key, value in engine.snapshot().items():
            total[key] += value
    return total


@server_router.get("/", responses=ERROR_RESPONSES)
async def status(request: Request, state: State) -> Response:
    """The server's state for programs (`lmserve ps`): every model with its status, requests and
    memory. A browser (a request that accepts HTML) gets the web chat page instead."""
    if wants_page(request.headers):
        return page()
    return JSONResponse({"status": "ok" if state.ready else "loading",
                         "models": [model_status(state, slot) for slot in state.fleet.slots()]},
                        headers={"Vary": "Accept"})  # browsers get the page here


def model_status(state: ServerState, slot: Slot) -> dict[str, Any]:
    loaded = slot.status is ModelStatus.LOADED
    load = slot.model.engine.snapshot() if loaded and slot.entry.kind == "chat" else {}
    unloads_in = state.fleet.unloads_in(slot)
    return {
        "id": slot.entry.id,
        "kind": slot.entry.kind,
        "status": slot.status.value,
        "error": slot.error,
        "download": {"done": slot.progress[0], "total": slot.progress[1]}
        if slot.status is ModelStatus.DOWNLOADING and slot.progress else None,
        "aliases": list(slot.entry.aliases),
        "pinned": slot.entry.pinned,
        "requests": slot.leases,  # requests holding the model: running, waiting or streaming out
        "running": load.get("num_running", 0),
        "waiting": load.get("num_waiting", 0),
        "memory_mib": round(slot.model.memory_bytes() / 2**20) if loaded else 0,  # weights + KV blocks in use
        "loaded_seconds": round(time.monotonic() - slot.loaded_at, 1) if loaded else None,
        "unloads_in_seconds": None if unloads_in is None else round(unloads_in, 1),
    }


@server_router.get("/props", responses=ERROR_RESPONSES)
async def props(state: State, model: str | None = None) -> JSONResponse:
    """llama.cpp's GET /props (`?model=ID` with several models, as its router takes), with the
    fields lmserve can fill truthfully."""
    lease = await state.chat_model(model)
    lease.release()
    engine = lease.model.engine
    tokenizer = engine.tokenizer
    return JSONResponse({
        "default_generation_settings": {
            "id": 0, "id_task": -1, "n_ctx": engine.max_model_len, "is_processing": False,
            "speculative": engine.config.scheduler.num_speculative_tokens > 0,  # prompt lookup
            # the model's defaults (its --config ones over the server's --temp and the like)
            "params": generation_settings(SamplingParams(), engine.max_model_len, lease.entry.id)
            | default_params(lease.entry.defaults),
            "prompt": "",
            "next_token": {"has_next_token": True, "has_new_line": False, "n_remain": -1, "n_decoded": 0,
                           "stopping_word": ""},
        },
        "total_slots": len(state.slot_table(lease).slots),
        "model_path": engine.config.model_path,
        "model_alias": lease.entry.id,
        "chat_template": tokenizer.chat_template or CHATML_TEMPLATE,  # the template the chat route renders
        "chat_template_caps": {},
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "modalities": {"vision": False, "audio": False},
        "build_info": BUILD_INFO,
        "is_sleeping": False,
    })


# The sampling fields /props shows, in llama.cpp's names (and llama.cpp's request fields').
_SHOWN = ("seed", "temperature", "dynatemp_range", "dynatemp_exponent", "top_k", "top_p", "min_p", "top_n_sigma",
          "xtc_probability", "xtc_threshold", "typical_p", "repeat_last_n", "repeat_penalty", "presence_penalty",
          "frequency_penalty", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
          "dry_sequence_breakers", "mirostat", "mirostat_tau", "mirostat_eta", "ignore_eos")


def default_params(model_defaults: dict[str, Any]) -> dict[str, Any]:
    """What a request gets for each sampling field it leaves out, in llama.cpp's names: the model's
    defaults (its --config defaults over the server's --temp and the like), else lmserve's."""
    defaults = _lmserve_defaults() | _in_llama_cpp_names(model_defaults)
    stop = defaults["stop"]
    n_predict = defaults["max_tokens"] or -1  # -1: the rest of the context (a chat request's default)
    return {
        **{name: defaults[name] for name in _SHOWN},
        "stop": [stop] if isinstance(stop, str) else list(stop),
        "n_predict": n_predict,
        "max_tokens": n_predict,
        "n_probs": 0,
        # lmserve's own order unless a default names one (its fast path then, shown as none)
        "samplers": sampler_names(defaults["samplers"]) if defaults["samplers"] is not None else [],
    }


def _lmserve_defaults() -> dict[str, Any]:
    """What a request that sends no sampling field runs with, by llama.cpp's request fields."""
    own, chain, dry = SamplingParams(), SamplerChain(), DryPenalty(multiplier=1.0)
    return {
        "seed": -1, "temperature": own.temperature, "dynatemp_range": chain.dynatemp_range,
        "dynatemp_exponent": chain.dynatemp_exponent, "top_k": own.top_k, "top_p": own.top_p, "min_p": own.min_p,
        "top_n_sigma": -1.0, "xtc_probability": chain.xtc_probability, "xtc_threshold": chain.xtc_threshold,
        "typical_p": chain.typical_p, "repeat_last_n": LLAMA_REPEAT_LAST_N, "repeat_penalty": own.repetition_penalty,
        "presence_penalty": own.presence_penalty, "frequency_penalty": own.frequency_penalty, "dry_multiplier": 0.0,
        "dry_base": dry.base, "dry_allowed_length": dry.allowed_length, "dry_penalty_last_n": dry.window,
        "dry_sequence_breakers": list(DEFAULT_DRY_BREAKERS), "mirostat": chain.mirostat,
        "mirostat_tau": chain.mirostat_tau, "mirostat_eta": chain.mirostat_eta, "stop": own.stop,
        "ignore_eos": own.ignore_eos, "max_tokens": None, "samplers": None,
    }


def _in_llama_cpp_names(defaults: dict[str, Any]) -> dict[str, Any]:
    """vLLM's repetition_penalty (a --config default) is llama.cpp's repeat_penalty over the
    whole context (-1) unless a repeat_last_n default says otherwise."""
    renamed = dict(defaults)
    if "repetition_penalty" in renamed:
        renamed["repeat_penalty"] = renamed.pop("repetition_penalty")
        renamed.setdefault("repeat_last_n", -1)
    return renamed


@server_router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> Response:
    loads = {model: engine.snapshot() for model, engine in state.loaded_engines().items()}
    return Response(state.metrics.render(loads, state.queued_sequences()), media_type=CONTENT_TYPE)
