"""A storm of streams on a real server, about 40% of them cut by their clients at random points
(before the first token, mid-stream, near the end): afterwards nothing is left running or waiting,
every KV block is free again, every uncut stream is complete to the exact token, the metrics add
up, and the server answers as it did before the storm."""

from __future__ import annotations

import asyncio
import json
import random

import httpx

from tests.helpers.prometheus import metric_samples

STREAMS = 64
CUT = 26  # about 40%
MAX_TOKENS = 24


def _body(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Tell story number {i}."}], "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "temperature": 0.8, "seed": i, "logprobs": True, "stream": True,
            "stream_options": {"include_usage": True}}


async def _stream(http: httpx.AsyncClient, i: int, cut_after: int | None) -> dict:
    """One stream; with `cut_after`, the client closes its connection once that many tokens came."""
    tokens, usage, finish, done = 0, None, None, False
    async with http.stream("POST", "/v1/chat/completions", json=_body(i)) as response:
        assert response.status_code == 200
        if cut_after == 0:
            return {"cut": True}
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[len("data: "):])
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                tokens += len((choice.get("logprobs") or {}).get("content") or [])
                finish = choice.get("finish_reason") or finish
            if cut_after is not None and tokens >= cut_after:
                return {"cut": True}  # leaving the block closes the connection mid-stream
    return {"cut": False, "tokens": tokens, "usage": usage, "finish": finish, "done": done}


def _totals(samples: dict, name: str) -> dict[str, float]:
    """{finished_reason or '': value} of a counter, summed over models."""
    out: dict[str, float] = {}
    for (sample, labels), value in samples.items():
        if sample == name:
            reason = dict(labels).get("finished_reason", "")
            out[reason] = out.get(reason, 0.0) + value
    return out


def _gauge(samples: dict, name: str) -> float:
    return sum(value for (sample, _), value in samples.items() if sample == name)


async def _settled(http: httpx.AsyncClient, timeout: float = 60.0) -> dict:
    """/metrics once nothing runs, waits or holds a KV block (or the last look at the deadline)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = metric_samples((await http.get("/metrics")).text)
        busy = sum(_gauge(samples, name) for name in ("lmserve:num_requests_running", "lmserve:num_requests_waiting",
                                                      "lmserve:num_requests_queued", "lmserve:kv_cache_usage_perc"))
        if busy == 0 or asyncio.get_running_loop().time() > deadline:
            return samples
        await asyncio.sleep(0.2)


async def _one_greedy(http: httpx.AsyncClient) -> str:
    body = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 16, "temperature": 0}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    return response.json()["choices"][0]["message"]["content"]


async def _storm(url: str):
    rng = random.Random(7)
    cut = set(rng.sample(range(STREAMS), CUT))
    # a few as soon as the headers came (0: while their prefill may still be queued), the rest mid-stream
    cut_after = {i: 0 if k < 4 else rng.randrange(1, MAX_TOKENS - 1) for k, i in enumerate(sorted(cut))}
    limits = httpx.Limits(max_connections=STREAMS + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        before_text = await _one_greedy(http)
        before = await _settled(http)
        results = await asyncio.gather(*(_stream(http, i, cut_after.get(i)) for i in range(STREAMS)))
        after = await _settled(http)
        after_text = await _one_greedy(http)
    return cut, cut_after, results, before, after, before_text, after_text


def test_a_disconnect_storm_loses_nothing_and_leaks_nothing(server):
    cut, cut_after, results, before, after, before_text, after_text = asyncio.run(_storm(server["url"]))
    assert sorted(i for i, result in enumerate(results) if result["cut"]) == sorted(cut)

    for i, result in enumerate(results):
        if not result["cut"]:
            assert result["done"] and result["finish"] == "length", (i, result)
            assert result["tokens"] == MAX_TOKENS == result["usage"]["completion_tokens"], (i, result)

    # nothing left behind: no sequence running, waiting or queued, every KV block back in the pool
    for name in ("lmserve:num_requests_running", "lmserve:num_requests_waiting", "lmserve:num_requests_queued",
                 "lmserve:kv_cache_usage_perc"):
        assert _gauge(after, name) == 0, name

    # the counters add up: every uncut stream finished by length; every request that reached the
    # engine finished once, by length or abort; tokens counted lie between what was delivered and
    # what could have been generated
    done_before = _totals(before, "lmserve:request_success_total")
    done_after = _totals(after, "lmserve:request_success_total")
    delta = {reason: done_after[reason] - done_before.get(reason, 0) for reason in done_after
             if done_after[reason] != done_before.get(reason, 0)}
    uncut = STREAMS - CUT
    assert delta.get("length", 0) >= uncut
    assert delta.get("abort", 0) >= 1
    assert set(delta) <= {"length", "abort"}, delta
    assert delta.get("length", 0) + delta.get("abort", 0) <= STREAMS
    generated = (_gauge(after, "lmserve:generation_tokens_total")
                 - _gauge(before, "lmserve:generation_tokens_total"))
    assert uncut * MAX_TOKENS + sum(cut_after.values()) <= generated <= STREAMS * MAX_TOKENS

    # and the server is as it was: the same greedy request gets the same answer
    assert after_text == before_text
