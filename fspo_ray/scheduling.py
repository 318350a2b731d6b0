"""How fspo-ray asks Ray for resources: the rules every stage shares, in one place.

GPUs are used when the cluster has them (a `use_gpu` setting overrides it). Batch-inference replicas
(reference scoring, evaluation, data generation) take one GPU each on a GPU cluster; on CPUs they share
out the CPUs, because Ray gives an actor as many torch threads as CPUs it asked for: one CPU each left
half of a 2-core machine idle.

The free CPUs are read once they settle: a stage that has just returned (Ray Train's workers, the last
pass's actors) hands its CPUs back a moment later, and a snapshot taken in between gave the next
replica one torch thread on a 2-core box. Something long-lived (Serve replicas, another job) keeps its
CPUs and the count holds still: then the wait ends after `SETTLE_S`, never later than `WAIT_S`.
"""

from __future__ import annotations

import time

SETTLE_S = 1.0  # the free CPUs held still this long: nothing more is coming back
WAIT_S = 10.0  # the longest a stage waits for them
POLL_S = 0.05


def resolve_use_gpu(setting: bool | None = None) -> bool:
    """`setting`, or when it is None, whether the cluster has GPUs."""
    import ray

    return setting if setting is not None else ray.cluster_resources().get("GPU", 0) > 0


def settled_free_cpus() -> float:
    """Ray's free CPUs once every CPU is free, or once the count has held still for SETTLE_S."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    free = ray.available_resources().get("CPU", 0)
    now = still_since = started = time.monotonic()
    while free < total and now - still_since < SETTLE_S and now - started < WAIT_S:
        time.sleep(POLL_S)
        now, latest = time.monotonic(), ray.available_resources().get("CPU", 0)
        if latest != free:
            free, still_since = latest, now
    return free


def replica_cpus(concurrency: int, on_gpu: bool) -> int:
    """CPUs each of `concurrency` batch-inference replicas asks for: one beside a GPU; on CPUs the free ones
    shared out, but no more than the largest node has, since a larger ask is never scheduled."""
    import ray

    if on_gpu:
        return 1
    largest = max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
    return max(1, min(int(largest), int(settled_free_cpus()) // concurrency))
