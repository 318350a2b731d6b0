"""The personalization service over real HTTP: Ray Serve on loopback, the tiny model, the transformers engine."""

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import tempfile
import time

import httpx
import hypothesis
import pytest
import schemathesis
from conftest import free_port

from fspo_ray.data.episodes import Episode
from fspo_ray.data.prompts import Shot, strip_completion_header
from fspo_ray.data.tokenize import PromptStyle, fit_episode, render_episode

pytestmark = pytest.mark.slow
KEY = "s3cret"
HISTORY = [
    {"question": "How do I brew coffee?", "preferred": "Certainly. Grind fresh beans. That is all.",
     "dispreferred": "Hey! Grind fresh beans. You are going to love it!"},
    {"question": "How do I sleep better?", "preferred": "Indeed. Keep a fixed bedtime. Proceed with care.",
     "dispreferred": "Yo! Keep a fixed bedtime. Enjoy every minute!"},
]  # fmt: skip
QUERY = "How do I bake bread?"
# The trained app's run, as training recorded it in fspo_run.json: HISTORY and QUERY (130 tokens) fit.
TRAINED_LIMITS = {"max_prompt_length": 200, "max_length": 300}
TRAINED_MAX_NEW_TOKENS = 200  # the trained app's server-side limit on what a request may ask for


def service_app(model: str, backend: str, cpus: float, env: dict | None = None, generator: dict | None = None,
                ingress_replicas: int = 1, **ingress):  # fmt: skip
    """Our application as serve/config.yaml deploys it (an ingress and its engine deployment), test-sized;
    `generator` overrides the engine deployment's options."""
    from serve.app import Personalizer
    from serve.generator import Generator

    engine = Generator.options(**{"ray_actor_options": {"num_cpus": cpus}, **(generator or {})}).bind(model, backend)
    runtime_env = {"runtime_env": {"env_vars": env}} if env else {}
    ingress.setdefault("store_url", f"sqlite://{tempfile.mkdtemp()}/histories.db")  # not the user's own
    return Personalizer.options(num_replicas=ingress_replicas, ray_actor_options={"num_cpus": 0, **runtime_env}
                                ).bind(engine, **ingress)  # fmt: skip


@pytest.fixture(scope="module")
def service(local_ray, tmp_path_factory, trained_tiny):
    from ray import serve

    from fspo_ray.models import build_tiny_model

    model = build_tiny_model(str(tmp_path_factory.mktemp("model") / "tiny"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = service_app(model, "transformers", 0.25, env={"FSPO_TEST_KEY": KEY}, api_key_env="FSPO_TEST_KEY",
                      max_requests_per_replica=2)  # fmt: skip
    serve.run(app, name="fspo", route_prefix="/")
    for mode in ("generated", "teacher_forced"):  # the same weights, recorded as trained in another prompt style
        folder = tmp_path_factory.mktemp(mode) / "LATEST"
        shutil.copytree(model, folder)
        (folder / "fspo_run.json").write_text(json.dumps({"description_mode": mode, "preferred_only": False}))
        serve.run(service_app(str(folder), "transformers", 0.25), name=mode, route_prefix=f"/{mode}")
    run = tmp_path_factory.mktemp("runs") / "trained" / "LATEST"  # a run folder, as training exports it
    shutil.copytree(trained_tiny, run)
    (run / "fspo_run.json").write_text(json.dumps({"description_mode": "none", "preferred_only": False,
                                                   **TRAINED_LIMITS}))  # fmt: skip
    serve.run(service_app(str(run), "transformers", 0.25, max_new_tokens_limit=TRAINED_MAX_NEW_TOKENS),
              name="trained", route_prefix="/trained")  # fmt: skip
    yield {"url": f"http://127.0.0.1:{port}", "model": model, "trained": trained_tiny}
    serve.shutdown()


def post(service, body, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{service['url']}/v1/personalize", json=body, headers=headers, timeout=120, **kwargs)


def direct_greedy(model_path: str, prompt: str, max_new_tokens: int) -> tuple[int, str]:
    """(prompt tokens, answer) with plain transformers on the training prompt text, tokenized as training
    does: its examples (everything before "# Task") and the rest apart (docs/data.md)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(model_path), AutoModelForCausalLM.from_pretrained(model_path)
    cut = max(prompt.find("# Task\n"), 0)
    parts = [part for part in (prompt[:cut], prompt[cut:]) if part]
    ids = torch.tensor([[i for part in parts for i in tokenizer(part, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()  # fmt: skip
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    return ids.shape[1], strip_completion_header(tokenizer.decode(out))[1]


def training_prompt(history, query, description=None, **style) -> str:
    """The prompt training builds for this history and query (generated mode needs descriptions only
    for its completions, so placeholders do)."""
    shots = tuple(Shot(**h) for h in history)
    episode = Episode("u", shots, Shot(query, "x", "y"), description or "d", "e")
    return render_episode(episode, PromptStyle(**style)).prompt


def post_trained(service, body):
    return httpx.post(f"{service['url']}/trained/v1/personalize", json=body, timeout=120)


def numbered_history(n: int) -> list[dict]:
    return [{"question": f"{h['question']} ({i})", "preferred": h["preferred"], "dispreferred": h["dispreferred"]}
            for i, h in zip(range(n), HISTORY * n)]  # fmt: skip


def test_a_history_is_fitted_to_the_runs_limits_exactly_as_training_fits_it(service):
    """A history of 8 shots (about 440 tokens) on a run trained with max_prompt_length=200: the served
    prompt is the one training's fit_episode builds under the run's limits (the same shots, the same
    tokens, so the same greedy answer), not one fitted to the model's 2,048-token context."""
    from transformers import AutoTokenizer

    tokenizer, history = AutoTokenizer.from_pretrained(service["trained"]), numbered_history(8)
    body = post_trained(service, {"history": history, "query": QUERY, "max_new_tokens": 24}).json()
    episode = Episode("u", tuple(Shot(**h) for h in history), Shot(QUERY, "x", "y"))
    fitted = fit_episode(episode, tokenizer, **TRAINED_LIMITS)  # a one-token answer: max_prompt_length binds
    assert 0 < fitted.shots_dropped < 8
    assert (body["shots_used"], body["shots_dropped"]) == (fitted.text.shots_used, fitted.shots_dropped)
    assert body["usage"]["prompt_tokens"] == len(fitted.tokens["prompt_ids"])
    assert body["response"] == direct_greedy(service["trained"], fitted.text.prompt, 24)[1]
    # A long answer asked for: room for it within max_length (300 - 160 = 140 prompt tokens), and no more.
    body = post_trained(service, {"history": history, "query": QUERY, "max_new_tokens": 160}).json()
    budget = TRAINED_LIMITS["max_length"] - 160
    assert body["usage"]["prompt_tokens"] <= budget and body["shots_used"] < fitted.text.shots_used
    one_more = render_episode(episode, shots_dropped=body["shots_dropped"] - 1).prompt
    assert len(tokenizer(one_more, add_special_tokens=False)["input_ids"]) > budget


def test_a_query_over_the_prompt_budget_is_refused_before_any_prefill(service):
    """413 naming the limits, plain and streamed (a JSON error, not an event stream); the engine is not
    called (it generates nothing)."""
    before = healthz(service, "/trained")["tokens_generated"]
    for stream in (False, True):
        response = post_trained(service, {"query": "zq " * 300, "max_new_tokens": 8, "stream": stream})
        assert response.status_code == 413, response.text
        assert small_json_error(response)["detail"] == ("the query does not fit: this model's prompts hold at most"
                                                        " 200 tokens (max_prompt_length=200; max_length=300 minus"
                                                        " max_new_tokens=8)")  # fmt: skip
    assert healthz(service, "/trained")["tokens_generated"] == before


def test_max_new_tokens_is_bounded_by_the_servers_limit(service):
    response = post_trained(service, {"query": QUERY, "max_new_tokens": TRAINED_MAX_NEW_TOKENS + 1})
    assert response.status_code == 422
    assert small_json_error(response)["detail"][0]["loc"] == ["body", "max_new_tokens"]
    assert "at most 200 on this server" in response.json()["detail"][0]["msg"]
    schema = httpx.get(f"{service['url']}/trained/openapi.json").json()["components"]["schemas"]
    assert schema["PersonalizeRequest"]["properties"]["max_new_tokens"]["maximum"] == TRAINED_MAX_NEW_TOKENS


def test_answer_uses_the_training_prompt_exactly(service):
    """On the briefly trained tiny model, whose greedy answers are real text that depends on the prompt."""
    answers = {}
    for query in (QUERY, "Can you explain how to learn to juggle?"):
        response = post_trained(service, {"history": HISTORY, "query": query, "max_new_tokens": 24})
        assert response.status_code == 200, response.text
        body = response.json()
        prompt_tokens, answer = direct_greedy(service["trained"], training_prompt(HISTORY, query), 24)
        assert body["usage"]["prompt_tokens"] == prompt_tokens
        assert body["response"] == answer  # same prompt, same greedy continuation, header stripped
        assert (body["shots_used"], body["shots_dropped"], body["model"]) == (2, 0, "trained")
        answers[query] = answer
    assert all(answers.values()) and len(set(answers.values())) == 2  # non-empty, and the prompt matters


def test_empty_history_is_a_zero_shot_prompt(service):
    body = post(service, {"history": [], "query": QUERY, "max_new_tokens": 8}).json()
    assert body["usage"]["prompt_tokens"] == direct_greedy(service["model"], training_prompt([], QUERY), 1)[0]
    assert body["shots_used"] == 0


def test_prompts_follow_the_style_the_model_was_trained_on(service):
    """The served prompt is the trained one: a description mode the model was not trained with is a 422
    naming the field, not a prompt it never saw (the model's fspo_run.json records its style)."""
    for field, extra in (("rationalize", {"rationalize": True}), ("user_description", {"user_description": "Hi."})):
        refused = post(service, {"history": HISTORY, "query": QUERY, **extra})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", field], refused.text
    url = service["url"]
    request = {"history": HISTORY, "query": QUERY, "max_new_tokens": 8}
    generated = httpx.post(f"{url}/generated/v1/personalize", json=request, timeout=120).json()
    expected = training_prompt(HISTORY, QUERY, description_mode="generated")
    assert generated["usage"]["prompt_tokens"] == direct_greedy(service["model"], expected, 1)[0]
    given = httpx.post(f"{url}/teacher_forced/v1/personalize", json={"history": HISTORY, "query": QUERY,
                       "user_description": "Likes formal.", "max_new_tokens": 8}, timeout=120).json()  # fmt: skip
    expected = training_prompt(HISTORY, QUERY, description_mode="teacher_forced", description="Likes formal.")
    assert given["usage"]["prompt_tokens"] == direct_greedy(service["model"], expected, 1)[0]
    assert given["user_description"] == "Likes formal."
    missing = httpx.post(f"{url}/teacher_forced/v1/personalize", json={"query": QUERY}, timeout=120)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "user_description"]


def test_streaming_sends_the_same_answer_as_events(service):
    request = {"history": HISTORY, "query": QUERY, "max_new_tokens": 24, "stream": True}
    with httpx.stream("POST", f"{service['url']}/trained/v1/personalize", json=request, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    tokens = "".join(json.loads(e)["token"] for e in events[:-2])
    plain = post_trained(service, {**request, "stream": False}).json()["response"]
    assert plain and tokens.strip() == final["response"] == plain


def test_long_history_drops_oldest_shots_and_an_oversized_query_is_413(service):
    long_shot = {"question": "Q " * 300, "preferred": "yes " * 300, "dispreferred": "no " * 300}
    body = post(service, {"history": [long_shot] * 6 + HISTORY, "query": QUERY, "max_new_tokens": 16}).json()
    assert body["shots_dropped"] > 0 and body["shots_used"] + body["shots_dropped"] == 8
    too_big = post(service, {"history": [], "query": "zq " * 2600, "max_new_tokens": 1024})
    assert too_big.status_code == 413 and "does not fit" in too_big.json()["detail"]


@pytest.mark.parametrize("body, field", [
    ({"query": QUERY, "max_new_tokens": 0}, "max_new_tokens"),
    ({"query": QUERY, "history": [HISTORY[0]] * 65}, "history"),
    ({"query": ""}, "query"),
    ({"query": QUERY, "temperature": 5}, "temperature"),
    ({"query": QUERY, "history": [{"question": "q", "preferred": "p"}]}, "dispreferred"),
    ({"query": QUERY, "colour": "red"}, "colour"),
])  # fmt: skip
def test_invalid_bodies_are_422_naming_the_field(service, body, field):
    response = post(service, body)
    assert response.status_code == 422
    assert any(field in map(str, error["loc"]) for error in response.json()["detail"])


def test_api_key_is_required_when_configured(service):
    for key in (None, "wrong"):
        response = post(service, {"query": QUERY}, key=key)
        assert response.status_code == 401 and "Bearer" in response.json()["detail"]


def test_overload_is_503_with_retry_after(service):
    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            calls = [client.post(f"{service['url']}/v1/personalize", headers={"Authorization": f"Bearer {KEY}"},
                                 json={"query": f"{QUERY} {i}", "max_new_tokens": 64, "temperature": 0.5, "seed": i})
                     for i in range(8)]  # fmt: skip
            return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and "overloaded" in refused.json()["detail"]


def test_health_and_docs(service):
    health = httpx.get(f"{service['url']}/healthz").json()
    assert {k: health[k] for k in ("status", "model", "backend")} == {"status": "ok", "model": "tiny",
                                                                      "backend": "transformers"}  # fmt: skip
    post_doc = httpx.get(f"{service['url']}/openapi.json").json()["paths"]["/v1/personalize"]["post"]
    assert {"200", "401", "413", "422", "503"} <= set(post_doc["responses"])
    assert "text/event-stream" in post_doc["responses"]["200"]["content"]
    assert post_doc["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/PersonalizeRequest")
    assert httpx.get(f"{service['url']}/docs").status_code == 200


def post_raw(service, content, key=KEY, headers=None):
    headers = {"Content-Type": "application/json", **(headers or {})}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{service['url']}/v1/personalize", content=content, headers=headers, timeout=120)


def small_json_error(response) -> dict:
    assert response.headers["content-type"] == "application/json", response.text[:200]
    assert len(response.content) <= 4096
    return response.json()


MANY_BAD_SHOTS = json.dumps({"query": QUERY, "history": [{"question": "", "preferred": ""}] * 64}).encode()


HOSTILE_BODIES = [  # (body, the field its 422 must name)
    (b'{"query": "x", "temperature": NaN}', "temperature"),
    (b'{"query": "x", "temperature": Infinity}', "temperature"),
    (b'{"query": "x", "top_p": 1e309}', "top_p"),
    (b'{"query": "a\\ud800b"}', None),  # a lone surrogate: no tokenizer can take it
    (b'{"query": "x", "stream": true, "temperature": 1e-38}', "temperature"),  # overflowed sampling, then hung
    (b'{"query": "\xff\xfe"}', None),  # not UTF-8
    (b"not json", None),
    (b"[1]", None),
    (b'{"query": "x", "' + b"k" * 200_000 + b'": 1}', "kkkk"),  # an unknown field's name is not echoed whole
    (MANY_BAD_SHOTS, "history"),  # 192 errors: the first few are shown, the rest counted
]  # fmt: skip


@pytest.mark.parametrize("content, field", HOSTILE_BODIES)
def test_hostile_bodies_get_small_json_422s(service, content, field):
    response = post_raw(service, content)
    assert response.status_code == 422
    body = small_json_error(response)
    if field:
        assert any(field in str(part) for error in body["detail"] for part in error["loc"]), body
    assert all(set(error) == {"loc", "msg", "type"} for error in body["detail"])  # never the input
    assert body["errors_not_shown"] == (192 - len(body["detail"]) if content is MANY_BAD_SHOTS else 0)


def test_a_body_over_the_limit_is_413_before_it_is_parsed(service):
    """Not JSON at all, so a parser would have answered 422: the size is checked first, from the
    declared length, and counted as it arrives when no length is declared."""
    response = post_raw(service, b"x" * (4 * 2**20 + 1))
    assert response.status_code == 413 and "4194304 bytes" in small_json_error(response)["detail"]
    chunked = post_raw(service, (b"x" * 2**20 for _ in range(5)))
    assert chunked.status_code == 413 and "limit" in small_json_error(chunked)["detail"]


def test_the_key_is_checked_before_the_body_in_constant_form(service):
    for key in (None, "wrong", KEY[:-1]):
        response = post_raw(service, b"x" * 100_000, key=key)  # an invalid body: no 422 before the key
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "Bearer" in small_json_error(response)["detail"]
    for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive (RFC 9110)
        body = json.dumps({"query": QUERY, "max_new_tokens": 2}).encode()
        assert post_raw(service, body, key=None, headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200


def healthz(service, route: str = "") -> dict:
    return httpx.get(f"{service['url']}{route}/healthz", timeout=10).json()


def wait_idle(service) -> dict:
    deadline = time.monotonic() + 60
    while (health := healthz(service))["in_flight"] or health["generating"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    return health


def test_streams_hold_admission_and_stop_when_their_client_leaves(service):
    """Two 1,024-token streams fill this replica's 2 slots until their clients leave; then the replica
    is idle again after a few tokens, not after the 2,048 it was asked for."""
    before = wait_idle(service)["tokens_generated"]
    request = {"query": QUERY, "max_new_tokens": 1024, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=120) as client, contextlib.ExitStack() as streams:
        first = streams.enter_context(client.stream("POST", f"{service['url']}/v1/personalize", json=request,
                                                    headers=headers))  # fmt: skip
        first_lines = first.iter_lines()  # held: dropping the iterator would close the connection
        assert next(first_lines).startswith("data: ")
        second = streams.enter_context(client.stream("POST", f"{service['url']}/v1/personalize", json=request,
                                                     headers=headers))  # fmt: skip
        assert second.status_code == 200 and healthz(service)["in_flight"] == 2
        refused = post(service, {"query": QUERY, "max_new_tokens": 2})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    after = wait_idle(service)["tokens_generated"]
    assert after - before < 200, (before, after)
    assert post(service, {"query": QUERY, "max_new_tokens": 2}).status_code == 200


def test_a_history_of_64_long_shots_is_fitted_off_the_event_loop(service):
    """64 shots of 3 x 8,000 characters: answered, with the shots that fit, while /healthz answers."""
    shot = {"question": "why " * 2000, "preferred": "yes " * 2000, "dispreferred": "no! " * 2000}
    recent = {"question": "How do I rest?", "preferred": "Sleep.", "dispreferred": "Do not."}
    history = [shot] * 63 + [recent]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, service, {"history": history, "query": QUERY, "max_new_tokens": 8})
        assert healthz(service)["status"] == "ok"
        body = answer.result().json()
    assert (body["shots_used"], body["shots_dropped"]) == (1, 63)  # the newest fits, a long one does not


def test_the_readme_curl_request(service):
    from test_readme import curl_request

    body = curl_request()
    response = post(service, body)
    assert response.status_code == 200
    assert response.json()["shots_used"] == len(body["history"]) == 1


def fuzz(url: str, examples: int, clients: int = 1, key: str = KEY) -> dict:
    """Schemathesis's valid and invalid requests for every operation in /openapi.json, `examples` per
    operation and mode, sent by `clients` concurrent clients: every answer as documented, every error JSON
    of at most 4 KB. Valid lengths above 8 tokens become 8 (a server's max_new_tokens_limit does the same
    for its own), and valid requests keep to the served model's prompt style (no description asked of a
    model trained without one: that 422 is tested on its own). (Its pytest plugin does not run under
    pytest 9, so the strategies are driven directly: the cases are drawn first, then sent.) The status of
    each answer, and each failure: a check that failed, or a connection dropped or timed out."""
    import requests
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    cases = []
    settings = hypothesis.settings(max_examples=examples, deadline=None, database=None,
                                   suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
    for operation in map(lambda result: result.ok(), schema.get_all_operations()):
        takes_input = operation.method.upper() != "GET" or "{" in operation.path or operation.query.items
        # (GET /healthz and /v1/models take no input, so they have no invalid one)
        for mode in list(schemathesis.GenerationMode) if takes_input else [schemathesis.GenerationMode.POSITIVE]:
            strategy = operation.as_strategy(generation_mode=mode)
            settings(hypothesis.given(strategy)(lambda case: cases.append(case)))()

    def send(case) -> tuple[int | None, str | None]:
        generates = {"/v1/personalize": "max_new_tokens", "/v1/chat/completions": "max_tokens"}.get(case.path)
        if generates and isinstance(case.body, dict):  # a valid or absent length becomes 8; an invalid one is kept
            field = "max_completion_tokens" if "max_completion_tokens" in case.body else generates
            tokens = case.body.get(field, 256)
            if type(tokens) in (int, float) and 8 < tokens <= 1024 and tokens == int(tokens):
                case.body[field] = 8
            if case.meta.generation.mode == schemathesis.GenerationMode.POSITIVE:
                case.body.pop("rationalize", None)
                case.body.pop("user_description", None)
        try:
            response = case.call(headers={"Authorization": f"Bearer {key}"}, timeout=300)
        except requests.RequestException as e:
            return None, f"{case.method} {case.path}: {type(e).__name__}"
        try:  # a valid request may still be refused, as documented: a 413 for a long question, a 409
            case.validate_response(response, excluded_checks=[positive_data_acceptance])
            if response.status_code >= 400:
                assert response.headers["content-type"] == ["application/json"], response.headers["content-type"]
                assert len(response.content) <= 4096, len(response.content)
        except Exception as e:  # an assertion here, or schemathesis's group of the checks that failed
            return response.status_code, f"{case.method} {case.path} -> {response.status_code}: {str(e)[:300]}"
        return response.status_code, None

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        sent = list(pool.map(send, cases))
    statuses = [status for status, _ in sent if status is not None]
    print(f"{len(sent)} fuzzed requests: " + ", ".join(f"{s}: {statuses.count(s)}" for s in sorted(set(statuses))))
    return {"statuses": statuses, "failures": [failure for _, failure in sent if failure]}


def test_fuzzed_requests_get_no_5xx_and_small_json_errors(service):
    fuzzed = fuzz(service["url"], int(os.environ.get("FSPO_FUZZ_EXAMPLES", "40")), clients=2)
    assert fuzzed["failures"] == [] and 200 in fuzzed["statuses"] and 422 in fuzzed["statuses"]
    assert max(fuzzed["statuses"]) < 500
