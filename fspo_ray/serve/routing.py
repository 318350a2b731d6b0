"""Which engine replica answers a request: the one that holds the user's history in its prefix cache.

A user's prompt starts with their shots, so their next request reuses the KV blocks of the last one:
vLLM prefills a 1,200-token history in seconds and a cached one in a fraction of that. Serve's default
(power of two choices) sends a user's next request to a replica that never saw their history half the
time with two replicas. Here each request carries an `affinity_key` (the user's id, or a hash of the
first shot in their prompt); rendezvous hashing maps a key to a replica, so keys move only when their
own replica comes or goes, and no state is shared between routers (one per proxy and ingress replica).
Serve LLM's PrefixCacheAffinityRouter matches prompt text in a tree held by an extra actor, with a
blocking call per request, and needs `ray[llm]`; a key per user needs neither.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


def rendezvous_weight(key: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest(), "big")


class UserAffinityRouter(FIFOMixin, RequestRouter):
    """A request with an `affinity_key` goes to its key's replica, or to the runner-up when that one is full
    or does not answer Serve's queue-length probe for 1.5 s; when the key's replica has `max_imbalance` more
    requests queued than the least-loaded one, or there is no key, it goes to the less loaded of two random
    replicas (Serve's default)."""

    def initialize_state(self, max_imbalance: int = 8):
        self.max_imbalance = max_imbalance

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = None
        if pending_request is not None:
            key = pending_request.kwargs.get("affinity_key")
            # Without it Serve asks again at once, in a busy loop, when every replica named here is full.
            pending_request.routing_context.should_backoff = True
        power_of_two = [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        if key is None or len(candidate_replicas) < 2:
            return power_of_two
        ranked = sorted(candidate_replicas, key=lambda r: rendezvous_weight(key, r.replica_id.unique_id), reverse=True)
        # Queue lengths Serve has seen lately (probes and the requests it sent); unknown ones count as idle.
        queued = [self.replica_queue_len_cache.get(r.replica_id) or 0 for r in ranked]
        if queued[0] - min(queued) > self.max_imbalance:
            return power_of_two
        # Serve probes a replica whose queue length it has not heard of for 10 s with a 0.1 s deadline, doubled at
        # each rank it moves on to. A replica prefilling on busy CPUs can miss that one, and its user then pays a
        # whole-history prefill on the runner-up: the key's replica gets 0.1 + 0.2 + 0.4 + 0.8 s first.
        return [[ranked[0]]] * 4 + [[ranked[1]]]
