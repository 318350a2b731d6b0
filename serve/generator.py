"""The engine deployment: the model, behind a handle that the API's ingress calls with prompt tokens.

It is its own deployment so that it can be routed by user (fspo_ray.serve.routing: a request carries
the user's `affinity_key`, which only a handle call exposes to the router; an HTTP body is read after
routing) and scaled apart from the ingress. Serve restarts a replica whose engine fails its probe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ray import serve

from fspo_ray.engines import Generation, Sampling, TransformersEngine, make_engine
from fspo_ray.models import resolve_model


@serve.deployment(
    max_ongoing_requests=64,  # vLLM batches continuously; the ingress bounds what is in flight per client
    health_check_period_s=5,  # Serve calls check_health (a real engine probe) this often
    health_check_timeout_s=20,  # and restarts the replica when it fails or takes longer
    request_router_config={"request_router_class": "fspo_ray.serve.routing:UserAffinityRouter"},
    ray_actor_options={"num_cpus": 0.75},  # with the ingress's 0.25: one app per CPU
)
class Generator:
    def __init__(self, model: str, backend: str = "auto", stall_timeout_s: float = 30.0,
                 probe_timeout_s: float = 10.0, max_model_len: int | None = None, kv_cache_gib: float | None = None,
                 gpu_memory_utilization: float = 0.9):  # fmt: skip
        self.model_path = resolve_model(model)
        self.engine = make_engine(backend, self.model_path, max_model_len, kv_cache_gib, gpu_memory_utilization)
        self.stall_timeout_s, self.probe_timeout_s = stall_timeout_s, probe_timeout_s
        self.problem: str | None = None  # what the last health probe found wrong
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def check_health(self) -> None:
        """A wedged engine is replaced instead of answering nothing forever; a busy one (a long prefill
        included) is left alone."""
        self.problem = await self.engine.probe(self.probe_timeout_s, self.stall_timeout_s)
        if self.problem:
            raise RuntimeError(f"engine unhealthy: {self.problem}")

    def status(self) -> dict:
        return {"replica": self.replica, "model_path": self.model_path, "backend": self.engine.name,
                "max_model_len": self.engine.max_model_len,
                "generating": self.engine.generating, "tokens_generated": self.engine.tokens_generated,
                "problem": self.problem}  # fmt: skip

    async def generate(self, prompt: list[int], sampling: Sampling, affinity_key: str | None = None):
        """(the generation, this replica's id). `affinity_key` is for the router."""
        if not isinstance(self.engine, TransformersEngine):
            return await self.engine.generate(prompt, sampling), self.replica  # vLLM batches continuously itself
        result = await self._batched(prompt, sampling)
        if isinstance(result, Exception):
            raise result
        return result, self.replica

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, prompts: list[list[int]], samplings: list[Sampling]) -> list[Generation | Exception]:
        """Concurrent requests with the same sampling settings share one generate call; a failure is
        returned to the request that caused it alone."""
        return await asyncio.to_thread(self.engine.generate_many, prompts, samplings)

    async def stream(self, prompt: list[int], sampling: Sampling, affinity_key: str | None = None
                     ) -> AsyncIterator[str | Generation]:  # fmt: skip
        """This replica's id, then the answer's text piece by piece, then the whole `Generation`; cancelled
        (its client left), the engine stops generating."""
        yield self.replica
        async with contextlib.aclosing(self.engine.stream(prompt, sampling, self.stall_timeout_s)) as pieces:
            async for piece in pieces:
                yield piece
