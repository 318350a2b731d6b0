"""Training on a local Ray in this process: FSPO on synthetic users, the HF export, a worker killed mid-run."""

import json
import os
import signal
import threading
import time

import pytest

from fspo_ray.data.synthetic import write_synthetic
from fspo_ray.train.config import parse_train_config
from fspo_ray.train.run import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def users(tmp_path_factory) -> dict[str, str]:
    return write_synthetic(str(tmp_path_factory.mktemp("users")), n_train_users=48, n_test_users=16, pairs_per_user=12)


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train(*overrides: str):
    cfg = parse_train_config(list(overrides))
    run_training(cfg)
    return cfg


def test_fspo_sft_then_ipo_with_zero2_learns_on_held_out_users(local_ray, users, tmp_path):
    data = [f"datasets=[{users['train']}]", f"eval_datasets=[{users['test']}]", "shots=2", "passes=1",
            "batch_size=8", "n_eval_examples=64", "eval_batch_size=16", "zero_stage=2", f"storage_path={tmp_path}",
            "max_prompt_length=384", "max_length=512", "optimizer=AdamW", "warmup_steps=2"]  # fmt: skip
    sft = train("model=tiny", *data, "loss=sft", "lr=3e-3", "exp_name=sft", "eval_every=1_000_000")
    ipo = train("model=tiny", *data, "loss=ipo", "loss.beta=0.1", "lr=3e-4", "exp_name=ipo", "eval_every=96",
                f"model.archive={sft.run_dir}")  # fmt: skip

    evals = [m for m in metrics(ipo.run_dir) if "rewards_eval/accuracies" in m]
    assert evals[0]["step"] == 0 and evals[0]["rewards_eval/accuracies"] == 0.0  # policy == reference: no margin
    assert evals[-1]["rewards_eval/accuracies"] > evals[0]["rewards_eval/accuracies"]
    print("held-out rewards_eval/accuracies by step:", [(m["step"], m["rewards_eval/accuracies"]) for m in evals])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = os.path.join(ipo.run_dir, "LATEST")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(export), AutoTokenizer.from_pretrained(export)
    prompt = tokenizer("# Task\n", add_special_tokens=False, return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def _kill_one_worker_after_checkpoint(run_dir: str, killed: list) -> None:
    import psutil

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not killed:
        if os.path.exists(os.path.join(run_dir, "checkpoint_manager_snapshot.json")):
            workers = [
                p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])
            ]
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append(workers[-1].pid)
        time.sleep(0.2)


def test_killed_worker_restarts_from_the_last_checkpoint(local_ray, users, tmp_path):
    cfg = parse_train_config([
        "model=tiny", f"datasets=[{users['train']}]", "shots=1", "passes=1", "loss=sft", "batch_size=4",
        "n_epochs=2", "eval_every=32", "max_failures=1", "log_example_ids=true", f"storage_path={tmp_path}",
        "exp_name=killed", "lr=1e-4",
    ])  # fmt: skip
    killed: list = []
    killer = threading.Thread(target=_kill_one_worker_after_checkpoint, args=(cfg.run_dir, killed))
    killer.start()
    run_training(cfg)
    killer.join()
    assert killed, "no worker was killed"

    log = metrics(cfg.run_dir)
    examples = [m["counters/examples"] for m in log]
    assert examples == list(range(4, examples[-1] + 1, 4))  # the replayed steps are logged once
    per_epoch = 48 * (12 // 2) // 4 * 4  # users × episodes per user, whole steps of 4
    assert examples[-1] == 2 * per_epoch
    for rank in (0, 1):
        with open(os.path.join(cfg.run_dir, "example_ids", f"rank{rank}.jsonl")) as f:
            entries = [json.loads(line) for line in f]
        assert [e["step"] for e in entries] == list(range(1, 2 * per_epoch // 4 + 1))
    assert os.path.exists(os.path.join(cfg.run_dir, "LATEST", "model.safetensors"))
