"""The personalization service over real HTTP: Ray Serve on loopback, the tiny model, the transformers engine."""

import asyncio
import json
import socket

import httpx
import pytest

from fspo_ray.data.episodes import Episode
from fspo_ray.data.prompts import Shot, strip_completion_header
from fspo_ray.data.tokenize import PromptStyle, render_episode

pytestmark = pytest.mark.slow
KEY = "s3cret"
HISTORY = [
    {"question": "How do I brew coffee?", "preferred": "Certainly. Grind fresh beans. That is all.",
     "dispreferred": "Hey! Grind fresh beans. You are going to love it!"},
    {"question": "How do I sleep better?", "preferred": "Indeed. Keep a fixed bedtime. Proceed with care.",
     "dispreferred": "Yo! Keep a fixed bedtime. Enjoy every minute!"},
]  # fmt: skip
QUERY = "How do I bake bread?"


@pytest.fixture(scope="module")
def service(local_ray, tmp_path_factory):
    from ray import serve

    from fspo_ray.models import build_tiny_model
    from serve.app import Personalizer

    model = build_tiny_model(str(tmp_path_factory.mktemp("model") / "tiny"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = Personalizer.options(ray_actor_options={"runtime_env": {"env_vars": {"FSPO_TEST_KEY": KEY}}}).bind(
        model=model, backend="transformers", api_key_env="FSPO_TEST_KEY", max_requests_per_replica=2
    )
    serve.run(app, name="fspo", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "model": model}
    serve.shutdown()


def post(service, body, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{service['url']}/v1/personalize", json=body, headers=headers, timeout=120, **kwargs)


def direct_greedy(model_path: str, prompt: str, max_new_tokens: int) -> tuple[int, str]:
    """(prompt tokens, answer) with plain transformers on the training prompt text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(model_path), AutoModelForCausalLM.from_pretrained(model_path)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
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


def test_answer_uses_the_training_prompt_exactly(service):
    response = post(service, {"history": HISTORY, "query": QUERY, "max_new_tokens": 24})
    assert response.status_code == 200, response.text
    body = response.json()
    prompt_tokens, answer = direct_greedy(service["model"], training_prompt(HISTORY, QUERY), 24)
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["response"] == answer  # same prompt, same greedy continuation, header stripped
    assert (body["shots_used"], body["shots_dropped"], body["model"]) == (2, 0, "tiny")
    assert not body["response"].startswith("## Preferred Response")


def test_empty_history_is_a_zero_shot_prompt(service):
    body = post(service, {"history": [], "query": QUERY, "max_new_tokens": 8}).json()
    assert body["usage"]["prompt_tokens"] == direct_greedy(service["model"], training_prompt([], QUERY), 1)[0]
    assert body["shots_used"] == 0


def test_rationalize_and_given_description_use_their_prompts(service):
    body = post(service, {"history": HISTORY, "query": QUERY, "rationalize": True, "max_new_tokens": 8}).json()
    expected = training_prompt(HISTORY, QUERY, description_mode="generated")
    assert body["usage"]["prompt_tokens"] == direct_greedy(service["model"], expected, 1)[0]
    given = post(service, {"history": HISTORY, "query": QUERY, "user_description": "Likes formal.",
                           "max_new_tokens": 8}).json()  # fmt: skip
    expected = training_prompt(HISTORY, QUERY, description_mode="teacher_forced", description="Likes formal.")
    assert given["usage"]["prompt_tokens"] == direct_greedy(service["model"], expected, 1)[0]
    assert given["user_description"] == "Likes formal."


def test_streaming_sends_the_same_answer_as_events(service):
    request = {"history": HISTORY, "query": QUERY, "max_new_tokens": 24, "stream": True}
    with httpx.stream("POST", f"{service['url']}/v1/personalize", json=request,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    tokens = "".join(json.loads(e)["token"] for e in events[:-2])
    assert tokens.strip() == final["response"] == post(service, {**request, "stream": False}).json()["response"]


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
    assert httpx.get(f"{service['url']}/healthz").json() == {"status": "ok", "model": "tiny", "backend": "transformers"}
    assert "/v1/personalize" in httpx.get(f"{service['url']}/openapi.json").json()["paths"]
    assert httpx.get(f"{service['url']}/docs").status_code == 200


def test_the_readme_curl_request(service):
    from test_readme import curl_request

    body = curl_request()
    response = post(service, body)
    assert response.status_code == 200
    assert response.json()["shots_used"] == len(body["history"]) == 1
