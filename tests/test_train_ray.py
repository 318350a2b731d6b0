"""Training on a local Ray in this process: a worker killed mid-run, and the stage after it sized on every CPU.
(SFT then IPO on synthetic users, and the HF export served, run in test_demo.py.)"""

import json
import os
import signal
import threading
import time

import pytest

from fspo_ray.data.synthetic import write_synthetic
from fspo_ray.scheduling import replica_cpus
from fspo_ray.train.config import parse_train_config
from fspo_ray.train.run import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def users(tmp_path_factory) -> dict[str, str]:
    return write_synthetic(str(tmp_path_factory.mktemp("users")), n_train_users=16, n_test_users=4, pairs_per_user=12)


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


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
    # The next stage's batch-inference replica, sized the moment training returns (its workers are still
    # handing their CPUs back), asks for both of the 2-CPU Ray's CPUs: one would leave a core idle.
    assert replica_cpus(1, on_gpu=False) == 2
    killer.join()
    assert killed, "no worker was killed"

    log = metrics(cfg.run_dir)
    examples = [m["counters/examples"] for m in log]
    assert examples == list(range(4, examples[-1] + 1, 4))  # the replayed steps are logged once
    per_epoch = 16 * (12 // 2) // 4 * 4  # users × episodes per user, whole steps of 4
    assert examples[-1] == 2 * per_epoch
    for rank in (0, 1):
        with open(os.path.join(cfg.run_dir, "example_ids", f"rank{rank}.jsonl")) as f:
            entries = [json.loads(line) for line in f]
        assert [e["step"] for e in entries] == list(range(1, 2 * per_epoch // 4 + 1))
    assert os.path.exists(os.path.join(cfg.run_dir, "LATEST", "model.safetensors"))
