"""The load generator: streaming /v1/completions requests, `concurrency` of them in flight."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from bench.sse import SSEDecoder, error_message, parse_chunk


@dataclass(frozen=True)
class Target:
    """Where to send requests: the server's base URL (no /v1) and the model id it serves."""

    url: str
    model: str
    timeout_s: float = 900.0


@dataclass
class RequestResult:
    """One request as the client saw it. Times are seconds from sending the request."""

    error: str | None = None
    ttft_s: float | None = None  # first non-empty text chunk
    first_event_s: float | None = None  # first chunk with choices: the TTFT fallback if no text came
    e2e_s: float = 0.0
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of every non-empty text chunk
    usage: dict | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        # The server's count when it sent usage; otherwise one token per content chunk (a lower bound).
        if self.usage and "completion_tokens" in self.usage:
            return int(self.usage["completion_tokens"])
        return len(self.chunk_times_s)

    @property
    def prompt_tokens(self) -> int | None:
        return int(self.usage["prompt_tokens"]) if self.usage and "prompt_tokens" in self.usage else None

    @property
    def cached_tokens(self) -> int | None:
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        return details.get("cached_tokens")

    def to_json(self) -> dict:
        return {"error": self.error, "ttft_s": self.ttft_s, "e2e_s": self.e2e_s,
                "output_tokens": self.output_tokens, "num_chunks": len(self.chunk_times_s),
                "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens}


def completion_body(model: str, prompt_ids: list[int], max_tokens: int, json_schema: dict | None = None,
                    temperature: float = 0.0) -> dict:
    """Streamed at `temperature` (0: greedy; each server's other sampling settings its defaults),
    exactly `max_tokens` out (`ignore_eos`, an extension lmserve and llama.cpp share); or, under
    `json_schema` (another), until the schema's value is complete."""
    body = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return body | ({"ignore_eos": True} if json_schema is None else {"json_schema": json_schema})


async def send_request(
    client: httpx.AsyncClient, target: Target, prompt_ids: list[int], max_tokens: int, json_schema: dict | None = None,
    temperature: float = 0.0,
) -> RequestResult:
    result = RequestResult()
    sent = time.perf_counter()
    try:
        body = completion_body(target.model, prompt_ids, max_tokens, json_schema, temperature)
        async with client.stream("POST", f"{target.url}/v1/completions", json=body) as response:
            await _read_response(response, sent, result)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.e2e_s = time.perf_counter() - sent
    if result.ok and result.ttft_s is None:
        # E.g. max_tokens 1 and a token that is half a UTF-8 character: no text, yet a token came.
        result.ttft_s = result.first_event_s
    if result.ok and result.ttft_s is None:
        result.error = "the stream ended without any token"
    return result


async def _read_response(response: httpx.Response, sent: float, result: RequestResult) -> None:
    if response.status_code != 200:
        body = (await response.aread()).decode(errors="replace")
        result.error = f"HTTP {response.status_code}: {_json_error(body)}"
        return
    decoder = SSEDecoder()
    async for line in response.aiter_lines():
        payload = decoder.feed(line)
        if payload is not None and not _take_chunk(payload, time.perf_counter() - sent, result):
            return
    tail = decoder.flush()
    if tail is not None:
        _take_chunk(tail, time.perf_counter() - sent, result)


def _take_chunk(payload: str, elapsed_s: float, result: RequestResult) -> bool:
    """Record one event; False once the stream is over ([DONE] or an error)."""
    chunk = parse_chunk(payload)
    if chunk.error:
        result.error = chunk.error
    if chunk.has_choices and result.first_event_s is None:
        result.first_event_s = elapsed_s
    if chunk.text:
        result.ttft_s = elapsed_s if result.ttft_s is None else result.ttft_s
        result.chunk_times_s.append(elapsed_s)
    if chunk.usage:
        result.usage = chunk.usage
    return not (chunk.done or chunk.error)


def _json_error(body: str) -> str:
    try:
        return error_message(json.loads(body).get("error", body))
    except (ValueError, AttributeError):
        return body[:300]


def new_client(target: Target, concurrency: int) -> httpx.AsyncClient:
    # trust_env=False: a proxy from the environment must never sit between us and a local server.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(timeout=httpx.Timeout(target.timeout_s, connect=10.0), limits=limits, trust_env=False)


async def run_requests(
    target: Target,
    prompts: Sequence[list[int]],
    max_tokens: int,
    concurrency: int,
    on_done: Callable[[RequestResult], None] = lambda result: None,
) -> tuple[list[RequestResult], float]:
    """Send every prompt with exactly `concurrency` requests in flight (fewer only at the tail).

    Returns the results in prompt order and the wall time from the first send to the last finish.
    """
    return await run_jobs(target, [[(prompt_ids, max_tokens)] for prompt_ids in prompts], concurrency, on_done)


async def run_jobs(
    target: Target,
    jobs: Sequence[Sequence[tuple[list[int], int]]],
    concurrency: int,
    on_done: Callable[[RequestResult], None] = lambda result: None,
    json_schema: dict | None = None,
    temperature: float = 0.0,
) -> tuple[list[RequestResult], float]:
    """Run `concurrency` jobs at once (fewer only at the tail); a job is turns of (prompt ids,
    max_tokens), each sent when the one before it has finished (a conversation), each under
    `json_schema` if one is given, all at `temperature`.

    Returns the results in job then turn order and the wall time from the first send to the last finish.
    """
    results: list[list[RequestResult]] = [[] for _ in jobs]
    pending = iter(enumerate(jobs))  # shared: each worker takes the next job when it is free

    async def worker(client: httpx.AsyncClient) -> None:
        for index, turns in pending:
            for prompt_ids, max_tokens in turns:
                result = await send_request(client, target, prompt_ids, max_tokens, json_schema, temperature)
                results[index].append(result)
                on_done(result)

    async with new_client(target, concurrency) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall_s = time.perf_counter() - start
    return [result for turns in results for result in turns], wall_s
