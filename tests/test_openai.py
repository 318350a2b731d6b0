"""The OpenAI-compatible API, stored histories and feedback over real HTTP: the official `openai` client
against the running Serve app (the briefly trained tiny model, two ingress replicas), once with the
SQLite store and once with a real PostgreSQL server, checked with SQL beside the service."""

import concurrent.futures
import json
import os
import shutil

import httpx
import openai
import pytest
from conftest import free_port
from test_serve import HISTORY, QUERY, direct_greedy, fuzz, service_app, small_json_error, training_prompt
from test_store import postgres_url, sql  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow
KEY, ADMIN = "user-key", "admin-key"
MAX_PAIRS = 300  # the app's max_pairs_per_user


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def service(request, local_ray, tmp_path_factory, trained_tiny):
    from ray import serve

    if request.param == "sqlite":
        store = f"sqlite://{tmp_path_factory.mktemp('store') / 'histories.db'}"
    else:
        store = request.getfixturevalue("postgres_url")
        import psycopg

        with psycopg.connect(store, autocommit=True) as db:
            for table in ("pairs", "answers", "users"):
                db.execute(f"DROP TABLE IF EXISTS {table}")
    port = free_port()
    run = tmp_path_factory.mktemp("runs") / "trained" / "LATEST"
    shutil.copytree(trained_tiny, run)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = service_app(str(run), "transformers", 0.25, env={"FSPO_TEST_KEY": KEY, "FSPO_TEST_ADMIN": ADMIN},
                      ingress_replicas=2, api_key_env="FSPO_TEST_KEY", admin_key_env="FSPO_TEST_ADMIN",
                      store_url=store, max_pairs_per_user=MAX_PAIRS, max_new_tokens_limit=64)  # fmt: skip
    serve.run(app, name="openai", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "store": store, "trained": trained_tiny,
           "client": openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)}  # fmt: skip
    serve.shutdown()


def call(service, method: str, path: str, key: str = KEY, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{service['url']}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                         **kwargs)  # fmt: skip


def store_history(service, user: str, pairs: list[dict]) -> dict:
    response = call(service, "POST", f"/v1/users/{user}/preferences", json={"pairs": pairs})
    assert response.status_code == 200, response.text
    return response.json()


def test_models_lists_the_served_model(service):
    assert [m.id for m in service["client"].models.list()] == ["trained"]


def test_chat_with_a_stored_history_answers_as_personalize_and_training_do(service):
    """The user's history is stored once; the official client's plain and streamed completions name only the
    user, and answer what /v1/personalize answers with that user's id and what the training prompt makes the
    model write, greedily."""
    store_history(service, "ada", HISTORY)
    client = service["client"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUERY}]
    plain = client.chat.completions.create(model="trained", messages=messages, user="ada", max_tokens=24)
    personalized = call(service, "POST", "/v1/personalize", json={"user_id": "ada", "query": QUERY,
                                                                  "max_new_tokens": 24}).json()  # fmt: skip
    prompt_tokens, expected = direct_greedy(service["trained"], training_prompt(HISTORY, QUERY), 24)
    assert expected and plain.choices[0].message.content == personalized["response"] == expected
    assert personalized["shots_used"] == 2 and plain.model_extra["fspo"]["shots_used"] == 2
    assert plain.usage.prompt_tokens == prompt_tokens and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.total_tokens == prompt_tokens + plain.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="trained", messages=messages, user="ada", max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == expected and chunks[-1].usage.prompt_tokens == prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    # The same history sent in the body (extra_body), without storing it: the same answer.
    other = client.chat.completions.create(model="trained", messages=messages, max_tokens=24,
                                           extra_body={"preferences": HISTORY})  # fmt: skip
    assert other.choices[0].message.content == expected


def test_invalid_chat_requests_get_openai_shaped_4xx(service):
    client = service["client"]
    cases = [
        (openai.BadRequestError, {"messages": [{"role": "user", "content": QUERY}], "temperature": 5}, "temperature"),
        (openai.BadRequestError, {"messages": [{"role": "system", "content": "Hi."}]}, "messages"),
        (openai.BadRequestError, {"messages": [{"role": "user", "content": QUERY}], "max_tokens": 65}, "max_tokens"),
        (openai.BadRequestError, {"messages": [{"role": "user", "content": QUERY}], "user": "a b"}, "user"),
        (openai.NotFoundError, {"messages": [{"role": "user", "content": QUERY}], "model": "gpt-4o"}, None),
    ]
    for error, body, param in cases:
        with pytest.raises(error) as raised:
            client.chat.completions.create(**{"model": "trained", **body})
        assert raised.value.status_code < 500 and raised.value.body["type"], raised.value.body
        assert raised.value.body.get("param") == param, raised.value.body
        assert len(raised.value.response.content) <= 4096
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{service['url']}/v1", api_key="wrong", max_retries=0).models.list()
    too_long = call(service, "POST", "/v1/chat/completions", json={"model": "trained", "messages": [
        {"role": "user", "content": "zq " * 2600}]})  # fmt: skip
    assert too_long.status_code == 413 and "does not fit" in too_long.json()["error"]["message"]


def test_reading_and_deleting_need_the_admin_key_and_delete_leaves_no_row(service):
    store_history(service, "bob", HISTORY)
    client = openai.OpenAI(base_url=f"{service['url']}/v1", api_key=KEY, max_retries=0)
    client.chat.completions.create(model="trained", messages=[{"role": "user", "content": QUERY}], user="bob",
                                   max_tokens=4)  # an answer kept for feedback by id  # fmt: skip
    for method, path in (("GET", "/v1/users/bob/preferences"), ("DELETE", "/v1/users/bob")):
        refused = call(service, method, path)
        assert refused.status_code == 403 and "admin key" in small_json_error(refused)["detail"]
    page = call(service, "GET", "/v1/users/bob/preferences?limit=1", key=ADMIN).json()
    assert [p["question"] for p in page["pairs"]] == [HISTORY[1]["question"]] and page["next_before"]
    rest = call(service, "GET", f"/v1/users/bob/preferences?before={page['next_before']}", key=ADMIN).json()
    assert [p["question"] for p in rest["pairs"]] == [HISTORY[0]["question"]] and rest["next_before"] is None
    assert sql(service["store"], "SELECT COUNT(*) FROM answers WHERE user_id = ?", "bob") == [(1,)]
    deleted = call(service, "DELETE", "/v1/users/bob", key=ADMIN).json()
    assert deleted == {"user_id": "bob", "pairs_deleted": 2}
    for table in ("pairs", "answers", "users"):
        assert sql(service["store"], f"SELECT COUNT(*) FROM {table} WHERE user_id = ?", "bob") == [(0,)]
    bad = call(service, "GET", "/v1/users/bob%27%3B%20DROP%20TABLE%20pairs/preferences", key=ADMIN)
    assert bad.status_code == 422 and small_json_error(bad)["detail"][0]["loc"][-1] == "user_id"


def test_feedback_by_texts_and_by_answer_ids_becomes_pairs(service):
    client = service["client"]
    answers = [client.chat.completions.create(model="trained", messages=[{"role": "user", "content": QUERY}],
                                              user="cy", max_tokens=n) for n in (2, 6)]  # fmt: skip
    by_ids = call(service, "POST", "/v1/feedback", json={"user_id": "cy", "answers": {
        "preferred": answers[1].id, "dispreferred": answers[0].id}}).json()  # fmt: skip
    tea = {"user_id": "cy", "pair": {"question": "Tea or coffee?", "preferred": "Tea.", "dispreferred": "Coffee."}}
    by_texts, again = (call(service, "POST", "/v1/feedback", json=tea).json() for _ in range(2))
    assert by_ids["added"] and by_texts["added"] and not again["added"] and again["id"] == by_texts["id"]
    rows = sql(service["store"], "SELECT question, preferred, dispreferred, source FROM pairs WHERE user_id = ?"
                                 " ORDER BY seq", "cy")  # fmt: skip
    texts = [answer.choices[0].message.content.strip() for answer in answers]
    assert rows == [(QUERY, texts[1], texts[0], "feedback"),
                    ("Tea or coffee?", "Tea.", "Coffee.", "feedback")]  # fmt: skip
    unknown = call(service, "POST", "/v1/feedback", json={"user_id": "cy", "answers": {
        "preferred": "chatcmpl-nope", "dispreferred": answers[0].id}})  # fmt: skip
    assert unknown.status_code == 404 and "chatcmpl-nope" in small_json_error(unknown)["detail"]


def test_two_replicas_appending_at_once_lose_and_duplicate_nothing(service):
    """200 pairs for one user from 8 clients through both ingress replicas, each pair sent twice (a retry)."""
    pairs = [{"id": f"p{i}", "question": f"Q{i}?", "preferred": f"Yes {i}.", "dispreferred": f"No {i}."}
             for i in range(200)]  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        added = list(pool.map(lambda p: store_history(service, "dee", [p])["added"], pairs + pairs))
    assert sum(added) == 200
    ids = [row[0] for row in sql(service["store"], "SELECT pair_id FROM pairs WHERE user_id = ?", "dee")]
    assert sorted(ids) == sorted(p["id"] for p in pairs)


def test_writes_are_bounded(service):
    pair = {"question": "Q?", "preferred": "Yes.", "dispreferred": "No."}
    too_many = call(service, "POST", "/v1/users/eve/preferences", json={"pairs": [pair] * 65})
    too_long = call(service, "POST", "/v1/users/eve/preferences", json={"pairs": [{**pair, "question": "q" * 8001}]})
    conflict = [call(service, "POST", "/v1/users/eve/preferences", json={"pairs": [{**pair, "id": "x",
                                                                                 "preferred": p}]})
                for p in ("A.", "B.")]  # fmt: skip
    assert too_many.status_code == too_long.status_code == 422 and conflict[0].status_code == 200
    assert conflict[1].status_code == 409 and "'x'" in small_json_error(conflict[1])["detail"]
    for start in range(1, MAX_PAIRS, 64):  # fill the user's history to the limit
        store_history(service, "eve", [{**pair, "id": f"f{i}"} for i in range(start, min(start + 64, MAX_PAIRS))])
    full = call(service, "POST", "/v1/users/eve/preferences", json={"pairs": [{**pair, "id": "one-more"}]})
    assert full.status_code == 413 and f"the limit is {MAX_PAIRS}" in small_json_error(full)["detail"]


def test_fuzzed_requests_across_all_endpoints_get_no_5xx(service):
    """Every operation in /openapi.json, valid and invalid, with the admin key (it may do everything)."""
    fuzzed = fuzz(service["url"], int(os.environ.get("FSPO_FUZZ_EXAMPLES", "30")), clients=4, key=ADMIN)
    assert fuzzed["failures"] == [] and max(fuzzed["statuses"]) < 500
    assert {200, 400, 422} <= set(fuzzed["statuses"]), sorted(set(fuzzed["statuses"]))
    paths = json.loads(httpx.get(f"{service['url']}/openapi.json").text)["paths"]
    assert {"/v1/chat/completions", "/v1/models", "/v1/users/{user_id}/preferences", "/v1/users/{user_id}",
            "/v1/feedback", "/v1/personalize"} <= set(paths)  # fmt: skip


def test_the_readme_python_example_runs_against_the_service(service, capsys):
    """README's Python block, as written but for the address and key: it stores a pair for `ada` and the
    official client answers with it in the prompt."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "openai.OpenAI" in b)
    code = block.replace("http://127.0.0.1:8000/v1", f"{service['url']}/v1").replace('"unused"', f'"{KEY}"')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.strip()
    assert printed and printed == namespace["reply"].choices[0].message.content.strip()
    assert namespace["reply"].model_extra["fspo"]["shots_used"] >= 1  # the stored pair was in the prompt
