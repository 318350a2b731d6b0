"""Serving latency and throughput: our app against vLLM's own OpenAI-compatible server on the same prompts.

    python benchmarks/serve_latency.py                      # vLLM and vllm serve, SmolLM2-135M (30 min on 2 cores)
    python benchmarks/serve_latency.py --engines transformers --layouts 1 2-affinity --levels 1 8 --rounds 1

For each engine and layout (1 replica; 2 with user affinity; 2 with Serve's default power-of-two routing):
- time to first token, measured as a max_new_tokens=1 request (the prefill and one token), for each user's
  first request (a history of at least --history-tokens) and their repeat (the same history, a new
  question); medians over --users users, their ratio, the worst user's and how many users' repeat took
  at most a third of their first;
- requests and completion tokens per second at each concurrency level (greedy, --max-new-tokens; medians
  of --rounds rounds).
With vLLM, the same prompt token ids also go to `vllm serve` (one engine with our engine's settings): its
time to first token while its cache is cold, then its throughput rounds with no Ray running, half before
our app's and half after, so that drift shows in neither alone. Loopback only; every phase is bounded.
Writes --out (JSON) with our throughput over the engine's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
    from fspo_ray.data.tokenize import PromptStyle, fit_prompt
    from fspo_ray.runinfo import read_run_info

    tokenizer, style = AutoTokenizer.from_pretrained(model_path), PromptStyle.from_run_info(read_run_info(model_path))
    data = write_synthetic(tempfile.mkdtemp(), n_train_users=1, n_test_users=n_users, pairs_per_user=64 + queries)
    by_user: dict[str, list] = {}
    for pair in read_pairs(data["test"]):
        by_user.setdefault(pair.user_id, []).append(pair)
    out = []
    for pairs in by_user.values():
        held_out, pool = pairs[:queries], pairs[queries:]
        for n in range(1, len(pool) + 1):
            shots = tuple(Shot(p.question, p.preferred, p.dispreferred) for p in pool[:n])
            if len(fit_prompt(shots, held_out[0].question, tokenizer, 10**6, style=style)[0]) >= history_tokens:
                break
        prompts = [fit_prompt(shots, q.question, tokenizer, 10**6, style=style)[0] for q in held_out]
        history = [{"question": s.question, "preferred": s.preferred, "dispreferred": s.dispreferred} for s in shots]
        out.append({"history": history, "queries": [q.question for q in held_out], "prompts": prompts})
    return out


class Ours:
    def __init__(self, url: str):
        self.url = url

    async def complete(self, http: httpx.AsyncClient, user: dict, query: int, max_new_tokens: int) -> tuple[int, int]:
        """(prompt tokens, completion tokens)"""
        body = {"history": user["history"], "query": user["queries"][query], "max_new_tokens": max_new_tokens}
        reply = await http.post("/v1/personalize", json=body)
        reply.raise_for_status()
        usage = reply.json()["usage"]
        return usage["prompt_tokens"], usage["completion_tokens"]


class Engine(Ours):
    async def complete(self, http: httpx.AsyncClient, user: dict, query: int, max_new_tokens: int) -> tuple[int, int]:
        body = {"model": "m", "prompt": user["prompts"][query], "max_tokens": max_new_tokens, "temperature": 0}
        reply = await http.post("/v1/completions", json=body)
        reply.raise_for_status()
        usage = reply.json()["usage"]
        return usage["prompt_tokens"], usage["completion_tokens"]


async def time_to_first_token(client: Ours, population: list[dict]) -> dict:
    """Every user's first request, then every user's repeat with a new question (other users' requests come
    between a user's two, as they would), one at a time: a prefill alone on the engine. max_new_tokens=1."""
    seconds: dict[int, list[float]] = {0: [], 1: []}
    async with httpx.AsyncClient(base_url=client.url, timeout=300) as http:
        for query in (0, 1):
            for user in population:
                started = time.perf_counter()
                prompt_tokens, _ = await client.complete(http, user, query, 1)
                seconds[query].append(time.perf_counter() - started)
                assert prompt_tokens == len(user["prompts"][query]), (prompt_tokens, len(user["prompts"][query]))
    ratios = [r / f for f, r in zip(seconds[0], seconds[1])]
    first, repeat = statistics.median(seconds[0]), statistics.median(seconds[1])
    return {"prompt_tokens": statistics.median(len(u["prompts"][0]) for u in population), "ttft_first_s": first,
            "ttft_repeat_s": repeat, "ttft_ratio": repeat / first, "ttft_ratio_worst_user": max(ratios),
            "users_repeat_within_a_third": sum(r <= 1 / 3 for r in ratios)}  # fmt: skip


async def throughput(client: Ours, population: list[dict], level: int, max_new_tokens: int) -> dict:
    """`level` clients sending the users' other questions (their histories are warm) until 3 x level (at
    least 24) are answered."""
    queue = [(u, q) for q in range(2, len(population[0]["queries"])) for u in population][: max(3 * level, 24)]
    n, tokens = len(queue), 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            user, query = queue.pop()
            tokens += (await client.complete(http, user, query, max_new_tokens))[1]

    async with httpx.AsyncClient(base_url=client.url, timeout=300) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(level)))
        elapsed = time.perf_counter() - started
    return {"requests_per_s": n / elapsed, "tokens_per_s": tokens / elapsed}


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


@contextlib.contextmanager
def our_app(model: str, engine: str, layout: str):
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
        # A model without a run gets 1,024 prompt tokens; these histories are ~1,000 tokens plus the query.
        serve.run(Personalizer.bind(generator, base_max_prompt_length=2048), name="fspo", route_prefix="/")
        yield Ours(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def vllm_serve(model: str):
    """`vllm serve` with our VLLMEngine's settings on this machine."""
    from transformers import AutoConfig

    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
               "--host", "127.0.0.1", "--served-model-name", "m", "--enable-prefix-caching", "--max-model-len",
               str(AutoConfig.from_pretrained(model).max_position_embeddings), "--dtype", "float32",
               "--enforce-eager"]  # fmt: skip
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
        yield Engine(f"http://127.0.0.1:{port}")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a preset, run folder or HF folder")
    parser.add_argument("--engines", nargs="+", default=["vllm"], choices=["vllm", "transformers"])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 8, 32], help="concurrency levels")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--history-tokens", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="throughput rounds of each server (medians)")
    parser.add_argument("--out", help="default: benchmarks/results-serve-latency-<engines>.json")
    args = parser.parse_args()
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        f"results-serve-latency-{'-'.join(args.engines)}.json")  # fmt: skip

    from fspo_ray.models import resolve_model

    model = resolve_model(args.model)
    queries = 2 + max(3 * max(args.levels), 24) // args.users + 1
    population = users(model, args.users, args.history_tokens, queries)
    rows, ratios = [], {}
    for engine in args.engines:
        with contextlib.ExitStack() as stack:
            raw = stack.enter_context(vllm_serve(model)) if engine == "vllm" else None
            raw_runs: dict[int, list] = {level: [] for level in args.levels}

            def engine_rounds(n: int) -> None:  # with no Ray running: the engine alone, as a user would run it
                for level in args.levels:
                    raw_runs[level] += [asyncio.run(throughput(raw, population, level, args.max_new_tokens))
                                        for _ in range(n)]  # fmt: skip

            if raw:  # its cache cold first; then half its rounds before ours and half after (drift shows)
                raw_row = {"server": "vllm serve", "layout": "1", **asyncio.run(time_to_first_token(raw, population))}
                engine_rounds((args.rounds + 1) // 2)
            for layout in args.layouts:
                with our_app(model, engine, layout) as ours:
                    row = {"server": f"fspo-ray {engine}", "layout": layout,
                           **asyncio.run(time_to_first_token(ours, population))}  # fmt: skip
                    for level in args.levels:
                        row[f"c{level}"] = median_of([asyncio.run(throughput(ours, population, level,
                                                      args.max_new_tokens)) for _ in range(args.rounds)])  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
            if raw:
                engine_rounds(args.rounds // 2)
                raw_row.update({f"c{level}": median_of(runs) for level, runs in raw_runs.items()})
                rows.append(raw_row)
                print(json.dumps(raw_row), flush=True)
                if "1" in args.layouts:
                    ours = next(r for r in rows if r["server"] == "fspo-ray vllm" and r["layout"] == "1")
                    ratios = {f"tokens_per_s_c{level}": ours[f"c{level}"]["tokens_per_s"] / raw_row[f"c{level}"][
                        "tokens_per_s"] for level in args.levels}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "users": args.users, "max_new_tokens": args.max_new_tokens,
                   "rounds": args.rounds, "rows": rows, "ours_over_engine": ratios}, f, indent=1)
    print(json.dumps(ratios), f"written to {args.out}")


if __name__ == "__main__":
    main()
