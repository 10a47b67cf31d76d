"""The prefix-aware router as Ray Serve drives it (scale/ray_router.py), without starting Ray: Ray
Serve routes several requests at once and reports a send only later, so the router counts a
request's load from the moment it chooses, follows the replica Ray Serve finally assigned, and
lets go when the request completes or is given up."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.request_router import RequestRouter

from lmserve.scale.ray_router import PrefixAwareRequestRouter
from lmserve.scale.router import DEFAULT_MAX_EXTRA_QUEUE

DEPLOYMENT = DeploymentID(name="lmserve-engine-m", app_name="lmserve")
BLOCK = 4
SHARED = list(range(100, 100 + 8 * BLOCK))  # eight full blocks of one system prompt


def replica(name: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=ReplicaID(unique_id=name, deployment_id=DEPLOYMENT))


def request(n: int, prompt: list[int], internal_id: str | None = None) -> PendingRequest:
    metadata = RequestMetadata(request_id=f"r{n}", internal_request_id=internal_id or f"internal-{n}",
                               call_method="generate")
    return PendingRequest(args=[f"r{n}", prompt, {}], kwargs={}, metadata=metadata)


@pytest.fixture
def router():
    router = PrefixAwareRequestRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(block_size=BLOCK, capacity_blocks=256)
    return router


def test_a_burst_sharing_a_prefix_spills_once_its_replica_is_overloaded(router):
    """Every request is chosen before any is sent, as when a burst arrives at once: the holder of
    the prefix takes requests only until it is more than max_extra_queue ahead of the other."""
    replicas = [replica("a"), replica("b")]
    order: list[str] = []

    async def burst():
        for n in range(16):
            pending = request(n, SHARED + [n])
            order.append((await router.choose_replicas(replicas, pending))[0][0].replica_id.unique_id)

    asyncio.run(burst())
    spill = DEFAULT_MAX_EXTRA_QUEUE + 1  # the holder's load when it first counts as overloaded
    assert len(set(order[:spill])) == 1 and order[spill] != order[0]
    counts = Counter(order)
    assert max(counts.values()) - min(counts.values()) <= spill


def test_a_claim_follows_the_replica_ray_serve_assigned(router):
    """Counted against the chosen replica before anything is sent; Ray Serve tries the ranked list
    in turn, so a request chosen for a full replica and sent to the other counts against the
    other, and its completion there ends it."""
    a, b = replica("a"), replica("b")

    async def run():
        pending = request(0, SHARED)
        chosen = (await router.choose_replicas([a, b], pending))[0][0]
        other = b if chosen is a else a
        assert router._in_flight() == Counter({chosen.replica_id.unique_id: 1})
        pending.future.set_result(other)
        assert router._in_flight() == Counter({other.replica_id.unique_id: 1})
        router.on_request_completed(other.replica_id, "internal-0")
        assert router._in_flight() == Counter()

    asyncio.run(run())


def test_a_request_given_up_before_assignment_stops_counting(router):
    a = replica("a")

    async def run():
        pending = request(0, SHARED)
        await router.choose_replicas([a], pending)
        assert router._in_flight() == Counter({"a": 1})
        pending.future.cancel()
        assert router._in_flight() == Counter()

    asyncio.run(run())


def test_a_rejected_attempt_completing_late_leaves_its_retry_counted(router):
    """A replica at its max_ongoing_requests rejects the request; Ray Serve routes it again with a
    new future, and the rejected attempt's completion arrives after the retry was chosen."""
    a, b = replica("a"), replica("b")

    async def run():
        pending = request(0, SHARED)
        await router.choose_replicas([a, b], pending)
        pending.future.set_result(a)
        pending.reset_future()
        await router.choose_replicas([b], pending)  # a is full: only b left
        router.on_request_completed(a.replica_id, "internal-0")  # the rejected attempt
        assert router._in_flight() == Counter({"b": 1})
        pending.future.set_result(b)
        router.on_request_completed(b.replica_id, "internal-0")
        assert router._in_flight() == Counter()

    asyncio.run(run())


def test_a_rejected_attempt_completing_late_on_the_retry_s_replica_leaves_the_retry_counted(router):
    """The retry went back to the replica that had rejected it (it had room again by then): the
    rejected attempt's completion ends nothing; the retry's own completion ends its claim."""
    a = replica("a")

    async def run():
        pending = request(0, SHARED)
        await router.choose_replicas([a], pending)
        pending.future.set_result(a)
        pending.reset_future()
        await router.choose_replicas([a], pending)
        router.on_request_completed(a.replica_id, "internal-0")  # the rejected attempt
        assert router._in_flight() == Counter({"a": 1})
        pending.future.set_result(a)
        router.on_request_completed(a.replica_id, "internal-0")
        assert router._in_flight() == Counter() and not router._stale

    asyncio.run(run())


def test_calls_sharing_one_request_id_each_count(router):
    """Behind Ray Serve's proxy the calls of one HTTP request (n > 1, several prompts) share its id."""
    a, b = replica("a"), replica("b")

    async def run():
        calls = [request(n, SHARED, internal_id="shared") for n in range(3)]
        for pending in calls:
            await router.choose_replicas([a, b], pending)
        assert sum(router._in_flight().values()) == 3
        calls[0].future.set_result(a)
        router.on_request_completed(a.replica_id, "shared")
        assert sum(router._in_flight().values()) == 2

    asyncio.run(run())


def test_a_caller_cancelled_after_its_replica_was_assigned_stops_counting(router, monkeypatch):
    """Ray Serve assigned a replica, but the caller was cancelled before it woke to send: nothing
    was sent, so no completion will come."""
    a = replica("a")

    async def assigned_then_cancelled(self, pending_request, *, is_retry=False):
        await self.choose_replicas([a], pending_request)
        pending_request.future.set_result(a)
        raise asyncio.CancelledError

    monkeypatch.setattr(RequestRouter, "_choose_replica_for_request", assigned_then_cancelled)

    async def run():
        pending = request(0, SHARED)
        with pytest.raises(asyncio.CancelledError):
            await router._choose_replica_for_request(pending)
        assert router._in_flight() == Counter() and router._claims == {}

    asyncio.run(run())


def test_a_dead_replica_takes_its_requests_and_prefixes_with_it(router):
    a, b = replica("a"), replica("b")

    async def run():
        pending = request(0, SHARED)
        chosen = (await router.choose_replicas([a, b], pending))[0][0]
        pending.future.set_result(chosen)
        router.on_replica_actor_died(chosen.replica_id)
        assert router._in_flight() == Counter()
        survivor = b if chosen is a else a
        assert router._prefix.longest_holders(router._prompt_hashes(request(1, SHARED)),
                                              {"a": 0, "b": 0}) == []
        assert (await router.choose_replicas([survivor], request(1, SHARED)))[0][0] is survivor

    asyncio.run(run())
