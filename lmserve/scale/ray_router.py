"""PrefixRouter (scale/router.py) as Ray Serve's request router for a model's replicas.

Ray Serve calls `choose_replicas` for each call of a deployment handle; the ingress calls
`EngineReplica.generate(request_id, prompt_ids, params)`, so the prompt's token ids are the
call's second argument, and their full blocks hash as the replicas' prefix caches hash them.
The answer is ranked: the router's choice first, then the rest from least to most loaded, which
Ray Serve tries in turn when a replica is at its max_ongoing_requests. Loads are the requests
this router has in flight on each replica (each ingress routes its own), counted from the moment
one is chosen: Ray Serve routes several requests at once and tells the router of a send only
after the request's routing task has yielded, so a burst would otherwise see every replica idle
and send one shared prefix's whole burst to one replica.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ray.serve._private.request_router.request_router import RequestRouter

from lmserve.cache.prefix import hash_full_blocks
from lmserve.scale.router import DEFAULT_MAX_BLOCKS, DEFAULT_MAX_EXTRA_QUEUE, DEFAULT_MAX_QUEUE_RATIO, PrefixRouter

PROMPT_ARG = 1  # EngineReplica.generate(request_id, prompt_ids, params)


@dataclass
class _Claim:
    """A request this router chose a replica for and has not heard the end of."""

    request: Any  # the PendingRequest: a retry is routed again as the same object
    replica: str  # unique id: the one chosen, then the one Ray Serve assigned
    future: Any  # this attempt's future (a retry gets a new one): done once assigned or given up


class PrefixAwareRequestRouter(RequestRouter):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.initialize_state()  # Ray Serve calls it again with the deployment's kwargs

    def initialize_state(self, block_size: int = 16, capacity_blocks: int = 1024, max_blocks: int = DEFAULT_MAX_BLOCKS,
                         max_extra_queue: int = DEFAULT_MAX_EXTRA_QUEUE,
                         max_queue_ratio: float = DEFAULT_MAX_QUEUE_RATIO, **_: Any) -> None:
        """From RequestRouterConfig.request_router_kwargs (scale/application.py sets them from the model)."""
        self._block_size = block_size
        self._prefix = PrefixRouter(capacity_blocks, max_blocks=max_blocks, max_extra_queue=max_extra_queue,
                                    max_queue_ratio=max_queue_ratio)
        # internal request id -> its requests' claims: behind Ray Serve's proxy the calls one HTTP
        # request makes (n > 1, several prompts) share the HTTP request's id
        self._claims: dict[str, list[_Claim]] = {}
        # (internal request id, replica) -> completions still to come from attempts a full replica
        # rejected after their retry was chosen: they must not end the retry's claim
        self._stale: Counter = Counter()

    async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list[list]:
        if not candidate_replicas:
            return []
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        in_flight = self._in_flight()
        loads = {replica_id: in_flight[replica_id] for replica_id in by_id}
        hashes = self._prompt_hashes(pending_request)
        chosen = self._prefix.choose(hashes, loads)
        self._prefix.routed(chosen, hashes)
        if pending_request is not None:
            self._claim(pending_request, chosen)
        rest = sorted((r for r in by_id if r != chosen), key=loads.__getitem__)
        return [[by_id[chosen]], *([by_id[r]] for r in rest)]

    async def _choose_replica_for_request(self, pending_request: Any, *, is_retry: bool = False) -> Any:
        """Ray Serve's: a caller cancelled while it waits (its client went away) sends nothing,
        even when a replica was already assigned, so no completion will end its claim."""
        try:
            return await super()._choose_replica_for_request(pending_request, is_retry=is_retry)
        except asyncio.CancelledError:
            self._release(pending_request)
            raise

    def _prompt_hashes(self, pending_request: Any) -> list[bytes]:
        args = getattr(pending_request, "args", None) or ()
        if len(args) <= PROMPT_ARG or not isinstance(args[PROMPT_ARG], list):
            return []  # a call other than generate (describe): any replica
        # Every full block: the replica caches them all, and the router forgets a prompt's tail
        # first as the replica's cache does (the lookup reads only the first max_blocks).
        return hash_full_blocks(args[PROMPT_ARG], self._block_size)

    def _claim(self, pending_request: Any, chosen: str) -> None:
        request_id = pending_request.metadata.internal_request_id
        claims = self._claims.setdefault(request_id, [])
        for claim in claims:
            if claim.request is pending_request:  # chosen again: all replicas were full, or a retry
                if claim.future is not pending_request.future:  # a retry: the attempt before was sent
                    earlier = self._assigned(claim)
                    if earlier is not None:
                        self._stale[request_id, earlier] += 1
                claim.replica, claim.future = chosen, pending_request.future
                return
        claims.append(_Claim(pending_request, chosen, pending_request.future))

    def _release(self, pending_request: Any) -> None:
        request_id = pending_request.metadata.internal_request_id
        claims = [claim for claim in self._claims.get(request_id, ()) if claim.request is not pending_request]
        self._set_claims(request_id, claims)

    def _set_claims(self, request_id: str, claims: list[_Claim]) -> None:
        if claims:
            self._claims[request_id] = claims
        else:
            self._claims.pop(request_id, None)

    def _in_flight(self) -> Counter:
        """Requests per replica: chosen and not completed. A claim follows the replica Ray Serve
        assigned (the ranked list's next when the first was full) and is dropped when Ray Serve
        gave up on the request before assigning it."""
        counts: Counter = Counter()
        for request_id, claims in list(self._claims.items()):
            live = [claim for claim in claims if self._assigned(claim) is not None]
            self._set_claims(request_id, live)
            counts.update(claim.replica for claim in live)
        return counts

    @staticmethod
    def _assigned(claim: _Claim) -> str | None:
        """The claim's replica as Ray Serve assigned it; None once the request was given up."""
        if claim.future.done():
            if claim.future.cancelled() or claim.future.exception() is not None:
                return None
            claim.replica = claim.future.result().replica_id.unique_id
        return claim.replica

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        replica = replica_id.unique_id
        if self._stale[internal_request_id, replica]:
            self._stale[internal_request_id, replica] -= 1
            if not self._stale[internal_request_id, replica]:
                del self._stale[internal_request_id, replica]
            return
        claims = self._claims.get(internal_request_id, [])
        # Only an attempt assigned to that replica: a claim still being routed is a retry's.
        for claim in claims:
            if claim.future.done() and self._assigned(claim) == replica:
                claims.remove(claim)
                break
        self._set_claims(internal_request_id, claims)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id.unique_id)

    def update_replicas(self, replicas: list) -> None:
        before = {replica_id.unique_id for replica_id in self._replica_id_set}
        super().update_replicas(replicas)
        for gone in before - {replica_id.unique_id for replica_id in self._replica_id_set}:
            self._forget(gone)

    def _forget(self, replica: str) -> None:
        self._prefix.forget(replica)
        for request_id, claims in list(self._claims.items()):
            self._set_claims(request_id, [claim for claim in claims if self._assigned(claim) != replica])
        for stale in [key for key in self._stale if key[1] == replica]:
            del self._stale[stale]
