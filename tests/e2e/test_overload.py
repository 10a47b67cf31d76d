"""A real server under many more concurrent requests than its queue holds: every request is
answered (200, or 429/503 with Retry-After), none hangs, and another client's request is served
after at most one turn of the flooding client's queue."""

from __future__ import annotations

import asyncio

import httpx

from tests.helpers.live_server import KEYED_MAX_QUEUED as MAX_QUEUED, KEYED_MAX_RUNNING as MAX_RUNNING, KEYS
from tests.helpers.prometheus import metric_samples

BURST = 40
FLOOD_KEY, PROBE_KEY = KEYS


async def chat(http: httpx.AsyncClient, key: str, tag: str, finished: list[str]) -> httpx.Response:
    # Same prompt and length for everyone, greedy, no early end: requests run in lockstep, so those
    # let in later finish later.
    body = {"messages": [{"role": "user", "content": "Count to one hundred."}], "max_tokens": 48,
            "temperature": 0, "ignore_eos": True}
    response = await http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    finished.append(tag)
    return response


async def queued(http: httpx.AsyncClient) -> float:
    samples = metric_samples((await http.get("/metrics")).text)
    return sum(value for (name, _), value in samples.items() if name == "lmserve:num_requests_queued")


async def overload(url: str) -> tuple[list[httpx.Response], httpx.Response, list[str], dict]:
    finished: list[str] = []
    limits = httpx.Limits(max_connections=BURST + 8)
    async with httpx.AsyncClient(base_url=url, timeout=180, limits=limits) as http:
        burst = [asyncio.ensure_future(chat(http, FLOOD_KEY, f"a{i}", finished)) for i in range(BURST)]
        while await queued(http) < MAX_QUEUED - 1:  # the flood holds the queue
            await asyncio.sleep(0.01)
        finished.append("probe sent")
        probe = await chat(http, PROBE_KEY, "probe", finished)
        answers = await asyncio.gather(*burst)
        samples = metric_samples((await http.get("/metrics")).text)
    return answers, probe, finished, samples


def test_a_flood_is_answered_at_once_and_does_not_keep_another_client_waiting(keyed_server):
    answers, probe, finished, samples = asyncio.run(overload(keyed_server))
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {200, 429, 503}, statuses
    assert all("Retry-After" in answer.headers for answer in answers if answer.status_code != 200)
    # Those running and those queued are served, but one: the probe pushes the flood's newest out.
    assert statuses.count(200) >= MAX_RUNNING + MAX_QUEUED - 1 and statuses.count(429) >= 1
    rejected = {reason: value for (name, labels), value in samples.items()
                if name == "lmserve:requests_rejected_total" for key, reason in labels if key == "reason"}
    assert rejected == {"queue_full": statuses.count(429), "queue_timeout": statuses.count(503)}
    assert probe.status_code == 200
    # While the probe waited and ran, the flood finished at most its running requests and one
    # turn more; what it still had queued finished after the probe.
    served = [tag for tag in finished if not tag.startswith("a") or statuses[int(tag[1:])] == 200]
    during = served[served.index("probe sent") + 1:served.index("probe")]
    after = served[served.index("probe") + 1:]
    assert len(during) <= MAX_RUNNING + 1, served
    assert len(after) >= 1, served

