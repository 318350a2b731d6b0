"""The personalization service against hostile clients, measured: the requests that once crashed,
wedged or blocked it, queries over the prompt budget, a 300-request burst, recovery after them, and
(with --fuzz) thousands of schema-fuzzed requests to every endpoint in /openapi.json (with the admin key,
which may call them all) from concurrent clients beside long queries. Loopback only, bounded.

    python benchmarks/serve_hostile.py --backend transformers [--model RUN_OR_HF_FOLDER]
    python benchmarks/serve_hostile.py --backend vllm
    python benchmarks/serve_hostile.py --model smollm2-135m --fuzz 1000 --out benchmarks/results-serve-fuzz-smollm2.json

Starts its own Ray and Serve app (the tiny model unless --model is given; serve/config.yaml's limits, but
`max_new_tokens_limit`, which --max-new-tokens-limit sets so that a fuzz run's answers stay short), prints
one line per check and writes them to --out. `--fuzz N` draws N examples per operation and mode (about 2N
requests for each POST operation).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import sys
import tempfile
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the app, and the suite's fuzz driver

KEY, ADMIN = "bench-key", "bench-admin-key"
SHOT = {"question": "How do I rest?", "preferred": "Certainly. Sleep. That is all.", "dispreferred": "Yo! Sleep!"}
# Legal bodies whose query alone is over any prompt budget this app has: 8,000 CJK characters (about 8,000
# tokens on SmolLM2), 3,000 digits (one token each), 8,000 characters of words. Once they were prefilled.
LONG_QUERIES = ["漢字" * 4000, "0" * 3000, "why " * 2000]


def check(results: list, name: str, ok: bool, **measured) -> None:
    results.append({"check": name, "ok": ok, **measured})
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {json.dumps(measured)}", flush=True)


def error_ok(response: httpx.Response) -> bool:
    return response.headers.get("content-type") == "application/json" and len(response.content) <= 4096


async def run(url: str, results: list) -> None:
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=400)) as client:
        replica = (await client.get("/healthz")).json()["replica"]
        def post(content, headers=auth):
            return client.post("/v1/personalize", content=content, headers=headers)

        quoted = [b'{"query":"x","temperature":NaN}', b'{"query":"x","temperature":Infinity}',
                  b'{"query":"x","top_p":1e309}', b'{"query":"a\\ud800b"}', b'{"query":"x","temperature":1e-38}',
                  b'{"query":"x","stream":true,"temperature":1e-38}']  # fmt: skip
        responses = [await post(body) for body in quoted]
        check(results, "quoted bad numbers and strings: 422 JSON <= 4 KB",
              all(r.status_code == 422 and error_ok(r) for r in responses),
              statuses=[r.status_code for r in responses],
              max_bytes=max(len(r.content) for r in responses))  # fmt: skip

        big = b'{"query": "' + b"x" * 50_000_000 + b'"}'
        for name, headers in (("with the key", auth), ("without the key", {"Content-Type": "application/json"})):
            started = time.perf_counter()
            try:
                r = await post(big, headers)
                status, ok = r.status_code, r.status_code in (401, 413) and error_ok(r)
            except httpx.HTTPError as e:  # the server may close the connection on a refused upload
                status, ok = type(e).__name__, False
            check(results, f"a 50 MB body {name}: refused, small JSON", ok, status=status,
                  seconds=round(time.perf_counter() - started, 2))  # fmt: skip

        for stream in (False, True):
            seconds, statuses = [], []
            for query in LONG_QUERIES:
                started = time.perf_counter()
                r = await post(json.dumps({"query": query, "max_new_tokens": 16, "stream": stream}))
                seconds.append(time.perf_counter() - started)
                statuses.append(r.status_code)
            check(results, f"queries over the prompt budget{' (streamed)' if stream else ''}: 413 JSON in < 1 s",
                  statuses == [413] * len(LONG_QUERIES) and max(seconds) < 1, statuses=statuses,
                  max_seconds=round(max(seconds), 3))  # fmt: skip

        lower_case = {**auth, "Authorization": f"bearer {KEY}"}
        lower = await post(json.dumps({"query": "Hi?", "max_new_tokens": 2}), lower_case)
        check(results, "'bearer KEY' accepted", lower.status_code == 200, status=lower.status_code)

        crashers = [post(b'{"query":"x","stream":true,"temperature":1e-38}') for _ in range(10)]
        crashers += [post(b'{"query":"x","temperature":1e-38}') for _ in range(10)]
        innocents = [post(json.dumps({"query": f"How do I cook {i}?", "max_new_tokens": 16, "temperature": 0.5,
                                      "seed": i})) for i in range(12)]  # fmt: skip
        # 32 in all: the replica's admission limit, so none of them is refused for load
        done = await asyncio.gather(*crashers, *innocents)
        started = time.perf_counter()
        after = await post(json.dumps({"history": [SHOT], "query": "How do I cook rice?", "max_new_tokens": 16}))
        check(results, "20 crash/stall requests beside 12 innocent ones, then a normal request",
              all(r.status_code == 422 for r in done[:20]) and all(r.status_code == 200 for r in done[20:])
              and after.status_code == 200, statuses=sorted({r.status_code for r in done}),
              innocent_ok=sum(r.status_code == 200 for r in done[20:]),
              normal_after_s=round(time.perf_counter() - started, 3))  # fmt: skip

        long_shot = {"question": "why " * 2000, "preferred": "yes " * 2000, "dispreferred": "no! " * 2000}
        body = json.dumps({"history": [long_shot] * 64, "query": "How do I rest?", "max_new_tokens": 16})
        health_s = []

        async def poll_health(stop: asyncio.Event) -> None:
            while not stop.is_set():
                started = time.perf_counter()
                await client.get("/healthz")
                health_s.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

        stop = asyncio.Event()
        poller = asyncio.create_task(poll_health(stop))
        started = time.perf_counter()
        r = await post(body)
        seconds = time.perf_counter() - started
        stop.set()
        await poller
        check(results, "64 shots x 8,000 characters: answered in <= 2 s, /healthz in <= 1 s meanwhile",
              r.status_code in (200, 413) and seconds <= 2 and max(health_s) <= 1, status=r.status_code,
              seconds=round(seconds, 3), healthz_max_s=round(max(health_s), 3))  # fmt: skip

        burst = await asyncio.gather(*(post(json.dumps({"query": f"Question {i}?", "max_new_tokens": 16}))
                                       for i in range(300)), return_exceptions=True)  # fmt: skip
        statuses = [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in burst]
        app_503 = [r for r in burst if isinstance(r, httpx.Response) and r.status_code == 503 and error_ok(r)]
        other_503 = [r for r in burst if isinstance(r, httpx.Response) and r.status_code == 503 and not error_ok(r)]
        after = await post(json.dumps({"query": "How do I cook rice?", "max_new_tokens": 16}))
        check(results, "300-request burst: 503s are JSON with Retry-After, normal service right after",
              all(r.headers.get("retry-after") for r in app_503) and not other_503 and after.status_code == 200
              and set(statuses) <= {200, 503},
              counts={str(s): statuses.count(s) for s in set(statuses)},
              serve_proxy_503=len(other_503))  # fmt: skip
        now = (await client.get("/healthz")).json()["replica"]
        check(results, "no replica restarted", now == replica, replica_before=replica, replica_after=now)


def fuzz_run(url: str, examples: int, clients: int, results: list) -> None:
    """Schema-fuzzed requests from `clients` concurrent clients (the suite's driver), while one more client
    sends long queries in turn, plain and streamed: no answer >= 500, no dropped connection, every answer
    as documented, long queries refused with 413 in < 1 s, and the same engine replica throughout."""
    import httpx as sync_http
    from test_serve import fuzz

    replica = sync_http.get(f"{url}/healthz", timeout=60).json()["replica"]
    stop, long_answers = threading.Event(), []

    def long_client() -> None:
        with sync_http.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {KEY}"}) as client:
            while not stop.is_set():
                for query in LONG_QUERIES:
                    for stream in (False, True):
                        started = time.perf_counter()
                        try:
                            r = client.post("/v1/personalize", json={"query": query, "stream": stream,
                                                                     "max_new_tokens": 16})  # fmt: skip
                            long_answers.append((r.status_code, time.perf_counter() - started))
                        except sync_http.HTTPError as e:
                            long_answers.append((type(e).__name__, time.perf_counter() - started))

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        sender = pool.submit(long_client)
        try:
            fuzzed = fuzz(url, examples, clients=clients, key=ADMIN)  # it may call every endpoint
        finally:
            stop.set()
            sender.result()
    seconds = time.perf_counter() - started
    statuses = fuzzed["statuses"]
    dropped = [f for f in fuzzed["failures"] if "->" not in f]
    check(results, f"{len(statuses) + len(dropped)} fuzzed requests from {clients} clients: none >= 500, none"
                   " dropped, every answer as documented",
          not fuzzed["failures"] and max(statuses) < 500, seconds=round(seconds),
          counts={str(s): statuses.count(s) for s in sorted(set(statuses))}, dropped=len(dropped),
          failures=fuzzed["failures"][:5], failures_total=len(fuzzed["failures"]))  # fmt: skip
    long_statuses, long_seconds = [status for status, _ in long_answers], max(s for _, s in long_answers)
    check(results, "long queries meanwhile: 413 JSON in < 1 s, plain and streamed",
          set(long_statuses) == {413} and long_seconds < 1, sent=len(long_answers),
          statuses=sorted(set(map(str, long_statuses))), max_seconds=round(long_seconds, 3))  # fmt: skip
    now = sync_http.get(f"{url}/healthz", timeout=60).json()["replica"]
    check(results, "no replica restarted during the fuzzing", now == replica, replica_before=replica,
          replica_after=now)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--model", default=None, help="a run or HF folder; default: the tiny model, built here")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--fuzz", type=int, default=0, help="examples per operation and mode (0: no fuzzing)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent fuzzing clients")
    parser.add_argument("--max-new-tokens-limit", type=int, default=16, help="the server's max_new_tokens_limit")
    parser.add_argument("--skip-checks", action="store_true", help="only the fuzzing")
    parser.add_argument("--out", default=None, help="JSON results (default benchmarks/results-serve-<backend>.json)")
    args = parser.parse_args()

    import ray
    from ray import serve

    from fspo_ray.models import build_tiny_model
    from serve.app import build_app

    model = args.model or build_tiny_model(os.path.join(tempfile.mkdtemp(), "tiny"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"FSPO_KEY": KEY, "FSPO_ADMIN": ADMIN}})  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    app = build_app(model=model, backend=args.backend, api_key_env="FSPO_KEY", admin_key_env="FSPO_ADMIN",
                    store_url=os.path.join(tempfile.mkdtemp(), "histories.db"),
                    max_new_tokens_limit=args.max_new_tokens_limit)  # fmt: skip
    serve.run(app, name="fspo", route_prefix="/")
    results: list = []
    url = f"http://127.0.0.1:{args.port}"
    try:
        if not args.skip_checks:
            asyncio.run(run(url, results))
        if args.fuzz:
            fuzz_run(url, args.fuzz, args.clients, results)
    finally:
        serve.shutdown()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), f"results-serve-{args.backend}.json")
    with open(out, "w") as f:
        json.dump({"backend": args.backend, "model": args.model or "tiny (random)", "fuzz_examples": args.fuzz,
                   "clients": args.clients, "max_new_tokens_limit": args.max_new_tokens_limit,
                   "date": time.strftime("%Y-%m-%d"), "checks": results}, f, indent=1)  # fmt: skip
    print(f"{sum(r['ok'] for r in results)}/{len(results)} checks passed; written to {out}")


if __name__ == "__main__":
    main()
