"""Serving latency and throughput: our app against vLLM's own OpenAI-compatible server on the same prompts.

    python benchmarks/serve_latency.py                                   # both engines, SmolLM2-135M
    python benchmarks/serve_latency.py --engines vllm --layouts 2-affinity --levels 8

For each engine and layout (1 replica; 2 with user affinity; 2 with Serve's default power-of-two routing):
- time to first token, measured as a max_new_tokens=1 request (the prefill and one token), for each user's
  first request (a history of at least --history-tokens) and their repeat (the same history, a new
  question); medians over --users users and their ratio;
- requests and completion tokens per second at each concurrency level (greedy, --max-new-tokens).
Then the same prompt token ids go to `vllm serve` (one engine, prefix caching on, as ours) for the ratio
of our throughput to the engine's own. Loopback only; every phase is bounded. Writes --out (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUTS = {"1": (1, True), "2-affinity": (2, True), "2-default": (2, False)}  # replicas, user affinity


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def users(model_path: str, n_users: int, history_tokens: int, queries: int) -> list[dict]:
    """Held-out synthetic users, each with the fewest shots whose prompt reaches `history_tokens`, and the
    prompt token ids our app builds for each of their questions (to send the engine the same ones)."""
    from transformers import AutoTokenizer

    from fspo_ray.data.prompts import Shot
    from fspo_ray.data.readers import read_pairs
    from fspo_ray.data.synthetic import write_synthetic
    from fspo_ray.data.tokenize import fit_prompt
    from fspo_ray.train.export import read_run_info, run_prompt_style

    tokenizer, style = AutoTokenizer.from_pretrained(model_path), run_prompt_style(read_run_info(model_path))
    data = write_synthetic(tempfile.mkdtemp(), n_train_users=1, n_test_users=n_users, pairs_per_user=64 + queries)
    by_user: dict[str, list] = {}
    for pair in read_pairs(data["test"]):
        by_user.setdefault(pair.user_id, []).append(pair)
    out = []
    for pairs in by_user.values():
        held_out, pool = pairs[:queries], pairs[queries:]
        for n in range(1, len(pool) + 1):
            shots = tuple(Shot(p.question, p.preferred, p.dispreferred) for p in pool[:n])
            prompts = [fit_prompt(shots, q.question, tokenizer, 10**6, style=style)[0] for q in held_out]
            if len(prompts[0]) >= history_tokens:
                break
        history = [{"question": s.question, "preferred": s.preferred, "dispreferred": s.dispreferred} for s in shots]
        out.append({"history": history, "queries": [q.question for q in held_out], "prompts": prompts})
    return out


class Ours:
    def __init__(self, url: str):
        self.http = httpx.AsyncClient(base_url=url, timeout=300)

    async def complete(self, user: dict, query: int, max_new_tokens: int) -> tuple[int, int]:
        """(prompt tokens, completion tokens)"""
        body = {"history": user["history"], "query": user["queries"][query], "max_new_tokens": max_new_tokens}
        reply = await self.http.post("/v1/personalize", json=body)
        reply.raise_for_status()
        usage = reply.json()["usage"]
        return usage["prompt_tokens"], usage["completion_tokens"]


class Engine(Ours):
    async def complete(self, user: dict, query: int, max_new_tokens: int) -> tuple[int, int]:
        body = {"model": "m", "prompt": user["prompts"][query], "max_tokens": max_new_tokens, "temperature": 0}
        reply = await self.http.post("/v1/completions", json=body)
        reply.raise_for_status()
        usage = reply.json()["usage"]
        return usage["prompt_tokens"], usage["completion_tokens"]


async def measure(client: Ours, population: list[dict], levels: list[int], max_new_tokens: int) -> dict:
    first, repeat = [], []
    for user in population:  # one at a time: a prefill alone on the engine
        for query, times in ((0, first), (1, repeat)):
            started = time.perf_counter()
            prompt_tokens, _ = await client.complete(user, query, 1)
            times.append(time.perf_counter() - started)
            assert prompt_tokens == len(user["prompts"][query]), (prompt_tokens, len(user["prompts"][query]))
    result = {"prompt_tokens": statistics.median(len(u["prompts"][0]) for u in population),
              "ttft_first_s": statistics.median(first), "ttft_repeat_s": statistics.median(repeat)}  # fmt: skip
    result["ttft_ratio"] = result["ttft_repeat_s"] / result["ttft_first_s"]
    work = [(u, q) for q in range(2, len(population[0]["queries"])) for u in population]  # warm histories
    for level in levels:
        queue = list(work[: max(2 * level, 16)])
        tokens = 0

        async def worker() -> None:
            nonlocal tokens
            while queue:
                user, query = queue.pop()
                tokens += (await client.complete(user, query, max_new_tokens))[1]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(level)))
        elapsed = time.perf_counter() - started
        n = min(len(work), max(2 * level, 16))
        result[f"c{level}"] = {"requests_per_s": n / elapsed, "tokens_per_s": tokens / elapsed}
    return result


def run_ours(model: str, engine: str, layout: str, population, levels, max_new_tokens) -> dict:
    import ray
    from ray import serve

    from serve.app import Personalizer
    from serve.generator import Generator

    replicas, affinity = LAYOUTS[layout]
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0.75}}
        if not affinity:  # Serve's default router
            options["request_router_config"] = {"request_router_class": serve.config.RequestRouterConfig(
                ).request_router_class}  # fmt: skip
        generator = Generator.options(**options).bind(model, engine)
        serve.run(Personalizer.bind(generator, model), name="fspo", route_prefix="/")
        return asyncio.run(measure(Ours(f"http://127.0.0.1:{port}"), population, levels, max_new_tokens))
    finally:
        serve.shutdown()
        ray.shutdown()


def run_engine(model: str, max_model_len: int, population, levels, max_new_tokens) -> dict:
    """`vllm serve` with our VLLMEngine's settings on this machine."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
               "--host", "127.0.0.1", "--served-model-name", "m", "--enable-prefix-caching",
               "--max-model-len", str(max_model_len), "--dtype", "float32", "--enforce-eager"]  # fmt: skip
    log = open(os.path.join(tempfile.mkdtemp(), "vllm-serve.log"), "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None and time.monotonic() < deadline, f"vllm serve did not start: {log.name}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        return asyncio.run(measure(Engine(f"http://127.0.0.1:{port}"), population, levels, max_new_tokens))
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a preset, run folder or HF folder")
    parser.add_argument("--engines", nargs="+", default=["vllm", "transformers"])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 8, 32], help="concurrency levels")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--history-tokens", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results-serve-latency.json"))  # fmt: skip
    args = parser.parse_args()

    from fspo_ray.models import resolve_model

    model = resolve_model(args.model)
    queries = 2 + max(2 * max(args.levels), 16) // args.users + 1
    population = users(model, args.users, args.history_tokens, queries)
    rows = []
    for engine in args.engines:
        for layout in args.layouts:
            rows.append({"server": f"fspo-ray {engine}", "layout": layout,
                         **run_ours(model, engine, layout, population, args.levels, args.max_new_tokens)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        if engine == "vllm":
            from transformers import AutoConfig

            max_model_len = AutoConfig.from_pretrained(model).max_position_embeddings
            rows.append({"server": "vllm serve", "layout": "1",
                         **run_engine(model, max_model_len, population, args.levels, args.max_new_tokens)})
            print(json.dumps(rows[-1]), flush=True)
    ours, theirs = (next((r for r in rows if r["server"] == s and r["layout"] == "1"), None)
                    for s in ("fspo-ray vllm", "vllm serve"))  # fmt: skip
    summary = {}
    if ours and theirs:
        summary = {f"throughput_ratio_c{c}": ours[f"c{c}"]["tokens_per_s"] / theirs[f"c{c}"]["tokens_per_s"]
                   for c in args.levels}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "users": args.users, "rows": rows, "ours_over_engine": summary}, f, indent=1)
    print(json.dumps(summary), f"written to {args.out}")


if __name__ == "__main__":
    main()
