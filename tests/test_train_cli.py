"""`python -m jobs.train` as users run it: the seed's command lines, interrupt and resume, `ray job submit`.

Each test starts its own Ray (a subprocess's local one, or `ray start --head`), as a user would.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def train_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "jobs.train", *overrides]


def run(cmd: list[str], timeout: int = 420, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def planned_examples(output: str) -> int:
    return int(re.search(r"^\[\w+\] ([\d,]+) episodes of ", output, re.M)[1].replace(",", ""))


@pytest.fixture(scope="module")
def dpo_json(tmp_path_factory) -> str:
    """The DPO codebase's JSON contract: 20 prompts × 2 pairs."""
    data = {
        f"\n\nHuman: question {i}?\n\nAssistant:": {
            "responses": [f"Sure: answer {i}.", f"No. Go away {i}.", "Hmm."],
            "pairs": [[0, 1], [0, 2]],
            "sft_target": f"Sure: answer {i}.",
        }
        for i in range(20)
    }
    path = tmp_path_factory.mktemp("data") / "sampled.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_seed_command_lines_chain_sft_into_ipo(dpo_json, tmp_path):
    """fspo-method.md §3, with only the launcher replaced and model/datasets/storage made local."""
    common = [f"datasets=[{dpo_json}]", "trainer=FSDPTrainer", "sample_during_eval=false", "eval_every=1_000_000",
              "do_first_eval=false", "debug=false", "wandb.project=P", "max_prompt_length=2048", "max_length=2048",
              f"storage_path={tmp_path}"]  # fmt: skip
    sft = run(train_command("model=tiny", "n_epochs=1", "loss=sft", "lr=1e-7", "exp_name=X", *common, "batch_size=8"))
    assert "note: sample_during_eval has no effect here" in sft.stdout
    archive = tmp_path / "X" / "LATEST" / "policy.pt"  # the seed's spelling; our run holds an HF folder there
    ipo = run(train_command("model=tiny", "n_epochs=2", "loss=ipo", "lr=1e-7", "loss.beta=0.05", "exp_name=Y",
                            *common, "batch_size=4", f"model.archive={archive}"))  # fmt: skip

    # The console holds our lines; Ray's INFO lines and what its workers print went to the run's log beside it.
    assert " INFO " not in sft.stdout + sft.stderr and "RayTrainWorker" not in sft.stdout + sft.stderr
    assert "RayTrainWorker" in (tmp_path / "X.log").read_text()
    sft_log, ipo_log = metrics(tmp_path / "X"), metrics(tmp_path / "Y")
    assert sft_log[-1]["counters/examples"] == planned_examples(sft.stdout) == 40  # 40 pairs, 1 epoch
    assert ipo_log[-1]["counters/examples"] == planned_examples(ipo.stdout) == 80  # 2 epochs
    assert "; reference scored for 40 (" in ipo.stdout  # scored once before training, not again per epoch
    first = ipo_log[0]
    # The IPO policy and its reference both start from the SFT export: h = 0, so the loss is (1/(2β))² (the
    # reference's scores were precomputed in other batches: equal up to float noise).
    assert abs(first["rewards_train/chosen"]) < 1e-5 and abs(first["rewards_train/rejected"]) < 1e-5
    assert first["loss/train"] == pytest.approx((1 / (2 * 0.05)) ** 2)
    assert ipo_log[-1]["rewards_train/margins"] > 0  # it learned to prefer the preferred answers
    for name in ("logps_train/chosen", "logps_train/rejected", "rewards_train/accuracies", "grad_norm", "lr",
                 "examples_per_second", "tokens_per_second", "padding_fraction", "counters/updates"):  # fmt: skip
        assert name in ipo_log[-1]


def test_interrupted_run_resumes_at_its_data_position(dpo_json, tmp_path):
    cmd = train_command("model=tiny", f"datasets=[{dpo_json}]", "loss=sft", "lr=1e-4", "exp_name=R", "n_epochs=4",
                        "batch_size=4", "eval_every=16", "log_example_ids=true", f"storage_path={tmp_path}",
                        "zero_stage=2", "lr_schedule=cosine", "warmup_steps=4")  # fmt: skip
    run_dir = tmp_path / "R"
    first = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:  # kill the whole job (driver, local Ray, workers) once a checkpoint is committed and training moved on
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            snapshot = run_dir / "checkpoint_manager_snapshot.json"
            steps = [m["step"] for m in metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []
            if snapshot.exists() and steps and max(steps) > 5:
                break
            assert first.poll() is None, "training ended before it could be interrupted"
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint within 300 s")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    checkpoints = sorted(p.name for p in run_dir.glob("step-*"))
    assert checkpoints and "LATEST" not in os.listdir(run_dir)

    resumed = run(cmd)
    log = metrics(run_dir)
    planned = planned_examples(resumed.stdout)
    assert [m["counters/examples"] for m in log] == list(range(4, planned + 1, 4))  # each step once
    # The schedule came back with the checkpoint, across the kill too. After optimizer step s of 40: a linear
    # warmup (s+1)/5 · lr for s < 4, then lr · ½(1 + cos(π (s−4)/36)), worked out here by hand.
    assert planned // 4 == 40
    lr = {m["step"]: m["lr"] for m in log}
    expected = {1: 4e-5, 2: 6e-5, 3: 8e-5, 4: 1e-4, 13: 8.535534e-5, 22: 5e-5, 31: 1.464466e-5, 40: 0.0}
    assert {s: lr[s] for s in expected} == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert all(lr[s] > lr[s + 1] for s in range(4, 40))  # the cosine falls at every step after the warmup
    ids_by_step: dict[int, list] = {}
    for rank_file in sorted((run_dir / "example_ids").glob("rank*.jsonl")):
        entries = [json.loads(line) for line in rank_file.read_text().splitlines()]
        assert [e["step"] for e in entries] == list(range(1, planned // 4 + 1))  # each step once per rank
        for e in entries:
            ids_by_step.setdefault(e["step"], []).extend(e["ids"])
    steps_per_epoch = 40 // 4
    for epoch in range(4):  # every episode exactly once per epoch: none twice, none skipped
        seen = [
            i for s in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1) for i in ids_by_step[s]
        ]
        assert len(seen) == len(set(seen)) == 40
