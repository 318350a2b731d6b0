"""How fspo-ray asks Ray for resources: the rules every stage shares, in one place.

GPUs are used when the cluster has them (a `use_gpu` setting overrides it). Batch-inference replicas
(reference scoring, evaluation, data generation) take one GPU each on a GPU cluster; on CPUs they share
out the CPUs, because Ray gives an actor as many torch threads as CPUs it asked for: one CPU each left
half of a 2-core machine idle.
"""

from __future__ import annotations


def resolve_use_gpu(setting: bool | None = None) -> bool:
    """`setting`, or when it is None, whether the cluster has GPUs."""
    import ray

    return setting if setting is not None else ray.cluster_resources().get("GPU", 0) > 0


def replica_cpus(concurrency: int, on_gpu: bool) -> int:
    """CPUs each of `concurrency` batch-inference replicas asks for: one beside a GPU; on CPUs the free ones
    shared out, but no more than the largest node has, since a larger ask is never scheduled."""
    import ray

    if on_gpu:
        return 1
    largest = max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
    return max(1, min(int(largest), int(ray.available_resources().get("CPU", 1)) // concurrency))
