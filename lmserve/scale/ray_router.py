"""PrefixRouter (scale/router.py) as Ray Serve's request router for a model's replicas.

Ray Serve calls `choose_replicas` for each call of a deployment handle; the ingress calls
`EngineReplica.generate(request_id, prompt_ids, params)`, so the prompt's token ids are the
call's second argument, and their full blocks hash as the replicas' prefix caches hash them.
The answer is ranked: the router's choice first, then the rest from least to most loaded, which
Ray Serve tries in turn when a replica is at its max_ongoing_requests. Loads are the requests
this router has in flight on each replica (each ingress routes its own).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ray.serve._private.request_router.request_router import RequestRouter

from lmserve.cache.prefix import hash_full_blocks
from lmserve.scale.router import DEFAULT_MAX_BLOCKS, DEFAULT_MAX_EXTRA_QUEUE, DEFAULT_MAX_QUEUE_RATIO, PrefixRouter

PROMPT_ARG = 1  # EngineReplica.generate(request_id, prompt_ids, params)


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
        self._in_flight: Counter = Counter()  # replica unique id -> requests sent and not completed

    async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list[list]:
        if not candidate_replicas:
            return []
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        loads = {replica_id: self._in_flight[replica_id] for replica_id in by_id}
        hashes = self._prompt_hashes(pending_request)
        chosen = self._prefix.choose(hashes, loads)
        self._prefix.routed(chosen, hashes)
        rest = sorted((r for r in by_id if r != chosen), key=loads.__getitem__)
        return [[by_id[chosen]], *([by_id[r]] for r in rest)]

    def _prompt_hashes(self, pending_request: Any) -> list[bytes]:
        args = getattr(pending_request, "args", None) or ()
        if len(args) <= PROMPT_ARG or not isinstance(args[PROMPT_ARG], list):
            return []  # a call other than generate (describe): any replica
        # Every full block: the replica caches them all, and the router forgets a prompt's tail
        # first as the replica's cache does (the lookup reads only the first max_blocks).
        return hash_full_blocks(args[PROMPT_ARG], self._block_size)

    def on_send_request(self, replica_id: Any) -> None:
        super().on_send_request(replica_id)
        self._in_flight[replica_id.unique_id] += 1

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        key = replica_id.unique_id
        self._in_flight[key] = max(0, self._in_flight[key] - 1)

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
        self._in_flight.pop(replica, None)
